"""LPIPS: behaviour, weight resolution and loading, and parity with the lpips v0.1 formula.

Weight files are stand-ins written to tmp_path (random tensors with the real checkpoint's keys);
TORCH_HOME points at a tmp dir and downloads are faked, so nothing real is read or fetched.
"""

import importlib.util
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from first_stage.perceptual import (
    LPIPS,
    VGG16_FILENAME,
    VGG16_URL,
    LPIPSWeightsNotFound,
    load_lpips,
    lpips_heads_path,
    normalize_channels,
    resolve_vgg16_weights,
)


@pytest.fixture(scope="module")
def vgg_state(vgg_file) -> dict[str, torch.Tensor]:
    return torch.load(vgg_file, weights_only=True)


@pytest.fixture(scope="module")
def lpips_model(vgg_file) -> LPIPS:
    return load_lpips(vgg_file, download=False)


@pytest.fixture(autouse=True)
def hub_checkpoints(monkeypatch, tmp_path) -> Path:
    """Point torch hub at an empty tmp dir and make any real download attempt fail the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(*args, **kwargs):
        raise AssertionError("test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return Path(torch.hub.get_dir()) / "checkpoints"


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=size, mode="bilinear")
    return x * 2 - 1


def reference_lpips(trunk: dict, heads: dict, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """lpips v0.1 written out plainly from the paper's code: same formula, no shared code."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):
        h = (x - shift) / scale
        outs = []
        for i in range(30):
            if i in (4, 9, 16, 23):
                h = F.max_pool2d(h, 2, 2)
            elif f"features.{i}.weight" in trunk:
                h = F.conv2d(h, trunk[f"features.{i}.weight"], trunk[f"features.{i}.bias"], padding=1)
            else:
                h = F.relu(h)
            if i in (3, 8, 15, 22, 29):
                outs.append(h)
        return outs

    val = 0
    for k, (a, b) in enumerate(zip(taps(x0), taps(x1))):
        na = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        nb = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        val = val + F.conv2d((na - nb) ** 2, heads[f"lin{k}.model.1.weight"]).mean([2, 3], keepdim=True)
    return val


# --- layout -----------------------------------------------------------------------------------


def test_state_dict_keys_match_torchvision_and_lpips():
    keys = set(LPIPS().state_dict())
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision VGG16 conv indices
    trunk = {f"features.{i}.{p}" for i in convs for p in ("weight", "bias")}
    heads = {f"lin{k}.model.1.weight" for k in range(5)}
    assert keys == trunk | heads
    pools = [i for i, m in enumerate(LPIPS().features) if isinstance(m, torch.nn.MaxPool2d)]
    assert pools == [4, 9, 16, 23]


# --- behaviour --------------------------------------------------------------------------------


def test_zero_for_identical_symmetric_positive(lpips_model):
    a, b = smooth_images(2, 32, seed=1), smooth_images(2, 32, seed=2)
    d_ab, d_ba = lpips_model(a, b), lpips_model(b, a)
    assert d_ab.shape == (2, 1, 1, 1)
    assert torch.equal(lpips_model(a, a), torch.zeros(2, 1, 1, 1))
    assert torch.equal(d_ab, d_ba)
    assert (d_ab > 0).all()


def test_frozen_eval_and_gradient_reaches_input(lpips_model):
    assert all(not p.requires_grad for p in lpips_model.parameters())
    lpips_model.train()
    assert not any(m.training for m in lpips_model.modules())
    a = smooth_images(2, 32, seed=1).requires_grad_(True)
    lpips_model(a, smooth_images(2, 32, seed=2)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_model.parameters())


@pytest.mark.parametrize("v0, v1", [(-1.0, -1.0), (0.0, 0.0), (1.0, 1.0), (-1.0, 1.0), (0.0, 1.0)])
def test_constant_images_finite(lpips_model, v0, v1):
    a = torch.full((1, 3, 32, 32), v0, requires_grad=True)
    d = lpips_model(a, torch.full((1, 3, 32, 32), v1))
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(a.grad).all()


@pytest.mark.filterwarnings("ignore:Anomaly Detection")
def test_identical_images_finite_gradient(lpips_model):
    a = smooth_images(2, 32, seed=3).requires_grad_(True)
    with torch.autograd.detect_anomaly():
        lpips_model(a, a.detach().clone()).sum().backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.filterwarnings("ignore:Anomaly Detection")
def test_all_zero_features_no_nan_anywhere_in_backward():
    # A zeroed trunk makes every tap all-zero: where the reference's sqrt backward makes NaN.
    model = LPIPS()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    a = torch.zeros(1, 3, 32, 32, requires_grad=True)
    with torch.autograd.detect_anomaly():  # raises if any backward node returns NaN
        d = model(a, torch.zeros(1, 3, 32, 32))
        d.sum().backward()
    assert d.item() == 0.0 and torch.isfinite(a.grad).all()


def test_normalize_channels_matches_reference_and_is_safe_at_zero():
    x = torch.randn(2, 16, 4, 4)
    expected = x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + 1e-10)
    torch.testing.assert_close(normalize_channels(x), expected, rtol=1e-6, atol=1e-7)
    z = torch.zeros(1, 8, 2, 2, requires_grad=True)
    normalize_channels(z).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_autocast_output_is_fp32_and_equal(lpips_model):
    a, b = smooth_images(2, 32, seed=4), smooth_images(2, 32, seed=5)
    expected = lpips_model(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lpips_model(a, b)
        got_bf16_inputs = lpips_model(a.bfloat16(), b.bfloat16())
    assert got.dtype == torch.float32 and got_bf16_inputs.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_bf16_inputs, lpips_model(a.bfloat16().float(), b.bfloat16().float()))


# --- resolving the trunk file -----------------------------------------------------------------


def test_explicit_path_beats_hub_cache(hub_checkpoints, tmp_path):
    hub_checkpoints.mkdir(parents=True)
    (hub_checkpoints / VGG16_FILENAME).write_bytes(b"cached")
    explicit = tmp_path / "elsewhere.pth"
    explicit.write_bytes(b"explicit")
    assert resolve_vgg16_weights(explicit, download=False) == explicit


def test_hub_cache_used_without_path(hub_checkpoints):
    hub_checkpoints.mkdir(parents=True)
    (hub_checkpoints / VGG16_FILENAME).write_bytes(b"cached")
    assert resolve_vgg16_weights(None, download=False) == hub_checkpoints / VGG16_FILENAME


def test_missing_explicit_path_is_an_error_naming_it(hub_checkpoints, tmp_path):
    hub_checkpoints.mkdir(parents=True)
    (hub_checkpoints / VGG16_FILENAME).write_bytes(b"cached")  # not a fallback for a wrong path
    missing = tmp_path / "nope" / VGG16_FILENAME
    with pytest.raises(LPIPSWeightsNotFound, match="nope"):
        resolve_vgg16_weights(missing, download=True)


def test_nothing_found_without_download(hub_checkpoints):
    with pytest.raises(LPIPSWeightsNotFound) as info:
        resolve_vgg16_weights(None, download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert VGG16_FILENAME in msg
    assert str(hub_checkpoints / VGG16_FILENAME) in msg
    assert "loss.lpips_weights=" in msg and "TORCH_HOME" in msg
    assert "not attempted" in msg
    # An evaluation script names its own flag, not the training key.
    with pytest.raises(LPIPSWeightsNotFound) as info:
        load_lpips(None, download=False, option="to this script: --lpips-weights PATH (or --no-lpips)")
    assert "--lpips-weights PATH (or --no-lpips)" in str(info.value) and "loss.lpips_weights" not in str(info.value)


def test_download_into_hub_cache_when_allowed(hub_checkpoints, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst)))
        Path(dst).write_bytes(b"downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = resolve_vgg16_weights(None, download=True)
    assert calls == [(VGG16_URL, hub_checkpoints / VGG16_FILENAME)]
    assert VGG16_URL == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert path == hub_checkpoints / VGG16_FILENAME and path.read_bytes() == b"downloaded"


def test_failed_download_is_reported(hub_checkpoints, monkeypatch):
    def failing_download(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", failing_download)
    with pytest.raises(LPIPSWeightsNotFound) as info:
        resolve_vgg16_weights(None, download=True)
    msg = str(info.value)
    assert VGG16_URL in msg and "no route to host" in msg
    assert str(hub_checkpoints / VGG16_FILENAME) in msg


# --- loading ----------------------------------------------------------------------------------


def test_trunk_loaded_from_file(lpips_model, vgg_state):
    for key, value in lpips_model.state_dict().items():
        if key.startswith("features."):
            assert torch.equal(value, vgg_state[key]), key


def test_heads_come_from_torchmetrics(lpips_model):
    heads = torch.load(lpips_heads_path(), map_location="cpu", weights_only=True)
    assert lpips_heads_path().parts[-4:] == ("functional", "image", "lpips_models", "vgg.pth")
    for k in range(5):
        assert torch.equal(getattr(lpips_model, f"lin{k}").model[1].weight, heads[f"lin{k}.model.1.weight"])


def test_load_from_hub_cache(hub_checkpoints, vgg_file):
    hub_checkpoints.mkdir(parents=True)
    (hub_checkpoints / VGG16_FILENAME).symlink_to(vgg_file)
    model = load_lpips(download=False)
    saved = torch.load(vgg_file, map_location="cpu", weights_only=True)
    assert torch.equal(model.features[0].weight, saved["features.0.weight"])


def test_incomplete_checkpoint_is_a_clear_error(vgg_state, tmp_path):
    partial = {k: v for k, v in vgg_state.items() if k != "features.28.bias"}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(ValueError, match=r"(?s)partial\.pth.*features\.28\.bias"):
        load_lpips(path, download=False)


def test_wrong_shapes_are_a_clear_error(vgg_state, tmp_path):
    bad = dict(vgg_state, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"(?s)bad\.pth.*features\.0\.weight"):
        load_lpips(path, download=False)


def test_unreadable_heads_file_names_the_file_and_the_fix(vgg_file, tmp_path, monkeypatch):
    import first_stage.perceptual as perceptual

    broken = tmp_path / "vgg.pth"
    broken.write_bytes(lpips_heads_path().read_bytes()[:50])  # a truncated copy of torchmetrics' file
    monkeypatch.setattr(perceptual, "lpips_heads_path", lambda: broken)
    with pytest.raises(perceptual.LPIPSWeightsError, match=r"(?s)linear heads .*vgg\.pth.*reinstall"):
        load_lpips(vgg_file, download=False)


# --- parity -----------------------------------------------------------------------------------


def test_matches_plain_lpips_formula(lpips_model, vgg_state):
    heads = torch.load(lpips_heads_path(), map_location="cpu", weights_only=True)
    a, b = smooth_images(3, 64, seed=6), torch.rand(3, 3, 64, 64) * 2 - 1
    expected = reference_lpips(vgg_state, heads, a, b)
    torch.testing.assert_close(lpips_model(a, b), expected, rtol=1e-6, atol=1e-6)


def test_matches_lpips_package(lpips_model, vgg_state):
    """Runs where lpips and torchvision are importable (conftest.py says how on a CPU-only torch)."""
    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("lpips") is None:
        pytest.skip("needs the lpips and torchvision packages: pip install --no-deps --target .parity "
                    "torchvision==0.28.0 lpips==0.1.4, then PYTHONPATH=.parity (docs/training.md)")
    import lpips

    # pnet_rand: no torchvision download; pretrained: lpips' own v0.1 heads from its package.
    ref = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    # lpips splits the trunk into slice1..slice5 but keeps torchvision's layer indices.
    ends = (4, 9, 16, 23, 30)
    trunk = {}
    for key, value in vgg_state.items():
        if key.startswith("features."):
            _, index, param = key.split(".")
            slice_no = next(s for s, end in enumerate(ends, start=1) if int(index) < end)
            trunk[f"slice{slice_no}.{index}.{param}"] = value
    ref.net.load_state_dict(trunk, strict=True)
    a, b = smooth_images(2, 64, seed=7), smooth_images(2, 64, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(lpips_model(a, b), ref(a, b), rtol=1e-6, atol=1e-6)
