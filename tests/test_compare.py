"""The compatibility report (first_stage.compare, eval/compare.py) on tiny random VAEs and images built here:
drift of a VAE against itself, against an exact per-channel affine map of its latents and against a
decoder-only fine-tune; tiled against untiled decodes; every listed class from a folder on disk."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKLQwenImage, AutoencoderTiny
from PIL import Image

import first_stage.compare
from first_stage.latent_stats import AffineDrift
from first_stage.compare import (IMAGE_AUTOENCODERS, Comparison, UnsupportedAutoencoderError,
                                 at_resolution, autoencoder_entry, band_mask, compare_notes, compare_plots,
                                 compare_report, compare_vaes, decode_latent, encode_latent, fp16_audit,
                                 load_image_autoencoder, normalizer_of, peak_memory, seam_error, tiling)
from first_stage.config import ConfigError, ModelConfig
from first_stage.evaluation import evaluation_data
from first_stage.model import new_autoencoder
from first_stage.reports import REPORT_SCHEMA

REPO = Path(__file__).resolve().parents[1]
DATA = "source=sample,split=all,resolution=32"


def tiny(name: str, **extra) -> torch.nn.Module:
    """A tiny random instance of an image autoencoder class (f2, 4 or 8 latent channels; AutoencoderTiny f8)."""
    torch.manual_seed(0)
    if name == "AutoencoderKL":
        return new_autoencoder(ModelConfig(preset="tiny"))
    if name == "AutoencoderKLFlux2":
        vae = new_autoencoder(ModelConfig(preset="flux2-tiny"))
        vae.bn.running_mean.uniform_(-0.5, 0.5)  # statistics as if calibrated, not the 0/1 of a fresh one
        vae.bn.running_var.uniform_(0.5, 2.0)
        return vae.eval()
    if name == "AutoencoderTiny":
        return AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                               num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4, latent_channels=4, **extra)
    if name == "AutoencoderDC":
        return AutoencoderDC(latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
                             decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16),
                             decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                             decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                             decoder_qkv_multiscales=((), ()), scaling_factor=0.5)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                  temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                  latents_std=[1.5, 2.0, 0.5, 1.0])


def images(n=4, side=32, seed=0) -> torch.Tensor:
    """(n, 3, side, side) smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=side, mode="bilinear")
    return x * 2 - 1


def compared(reference, candidate, x, batch=2) -> dict:
    """The comparison of two VAEs on ``x``, fed in batches of ``batch`` images."""
    comparison = Comparison(reference.eval(), candidate.eval())
    items = []
    for start in range(0, len(x), batch):
        part = x[start:start + batch]
        ids = list(range(start, start + len(part)))
        items += comparison.measure({"pixel_values": part, "ids": ids, "names": [f"img{i}" for i in ids]})
    return comparison.result(items)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions are dominated by thread synchronisation: on a busy 2-core machine one thread runs this
    file several times faster. The setting is restored for the tests after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_vae_against_itself_has_zero_drift_and_r2_one():
    vae = tiny("AutoencoderKL")
    result = compared(vae, vae, images())
    for kind in ("raw", "normalised"):
        d = result["latent_drift"][kind]
        assert d["r2"] == pytest.approx([1.0] * 4, abs=1e-12) and d["slope"] == pytest.approx([1.0] * 4, abs=1e-12)
        assert d["offset"] == pytest.approx([0.0] * 4, abs=1e-12)
        assert d["relative_error"] == [0.0] * 4 and d["overall"]["relative_error"] == 0.0
        assert d["overall"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    cross = result["cross_decoding"]["reference_to_candidate_vs_own"]["psnr"]
    # the same decoder; the latent went through normalise and denormalise, exact up to fp32 rounding
    assert cross["exact"] == 4 or cross["mean"] > 80


def test_an_exact_per_channel_affine_map_is_recovered():
    """B's raw latent is a_c · A_c + b_c per channel: its quant_conv's mean rows scaled by a_c, shifted by b_c."""
    reference = tiny("AutoencoderKL")
    candidate = copy.deepcopy(reference)
    a, b = torch.tensor([0.5, 2.0, -1.5, 3.0]), torch.tensor([0.1, -0.2, 0.3, 1.0])
    with torch.no_grad():  # quant_conv: (2C, 2C, 1, 1), the first C outputs the posterior mean
        candidate.quant_conv.weight[:4] *= a.view(4, 1, 1, 1)
        candidate.quant_conv.bias[:4] = candidate.quant_conv.bias[:4] * a + b
    raw = compared(reference, candidate, images())["latent_drift"]["raw"]
    assert raw["slope"] == pytest.approx(a.tolist(), abs=1e-6)
    assert raw["offset"] == pytest.approx(b.tolist(), abs=1e-6)
    assert raw["r2"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert raw["cosine"][2] < 0  # a negative slope turns the channel around


def test_drift_sums_do_not_depend_on_the_batching():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, 4, 4, generator=g)
    b = 0.7 * a + 0.1 * torch.randn(6, 3, 4, 4, generator=g)
    one, three = AffineDrift(3), AffineDrift(3)
    one.add(a, b)
    for i in range(0, 6, 2):
        three.add(a[i:i + 2], b[i:i + 2])
    x, y = one.result(), three.result()
    assert x["slope"] == pytest.approx(y["slope"], rel=1e-12) and x["r2"] == pytest.approx(y["r2"], rel=1e-12)
    flat_a, flat_b = a.transpose(0, 1).flatten(1).double(), b.transpose(0, 1).flatten(1).double()
    for c in range(3):  # numpy's least squares, independently
        slope, offset = torch.linalg.lstsq(torch.stack([flat_a[c], torch.ones_like(flat_a[c])], 1),
                                           flat_b[c, :, None]).solution.flatten().tolist()
        assert x["slope"][c] == pytest.approx(slope, rel=1e-9) and x["offset"][c] == pytest.approx(offset, abs=1e-9)
        r = torch.corrcoef(torch.stack([flat_a[c], flat_b[c]]))[0, 1].item()
        assert x["r2"][c] == pytest.approx(r * r, rel=1e-9)


def test_a_decoder_only_finetune_shows_zero_encoder_drift():
    reference = tiny("AutoencoderKL")
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        for p in candidate.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    result = compared(reference, candidate, images())
    for kind in ("raw", "normalised"):
        assert result["latent_drift"][kind]["overall"]["relative_error"] == 0.0
        assert result["latent_drift"][kind]["r2"] == pytest.approx([1.0] * 4, abs=1e-12)
    vs_own = result["cross_decoding"]["reference_to_candidate_vs_own"]["psnr"]
    assert vs_own["exact"] == 0 and vs_own["mean"] < 60  # the decoders differ, and the report shows it


def pointwise_decoder(vae: AutoencoderTiny) -> AutoencoderTiny:
    """``vae`` with every 3×3 kernel of its decoder reduced to its centre tap: each output pixel depends on its
    own latent cell only (AutoencoderTiny has no normalisation layer), so tiling cannot change the decode."""
    with torch.no_grad():
        for m in vae.decoder.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                centre = m.weight[:, :, 1, 1].clone()
                m.weight.zero_()
                m.weight[:, :, 1, 1] = centre
    return vae


SEAM_TOLERANCE = 1e-5  # fp32 rounding of the blend w·a + (1 − w)·a of two equal tiles


def test_tiled_and_untiled_decodes_agree_inside_the_overlap():
    """With a decoder that sees one latent cell per pixel, the two tiles blended in an overlap decode the same
    pixels, so diffusers' tiled decode equals the untiled one there and everywhere else."""
    vae = pointwise_decoder(tiny("AutoencoderTiny")).eval()
    x = images(1, 128)
    z = encode_latent(vae, x)
    with torch.no_grad():
        untiled = decode_latent(vae, z)
        with tiling(vae, 64) as grid:  # 64 px tiles = 8 latent cells, blended over 1 cell (8 px)
            tiled = decode_latent(vae, z)
    assert not vae.use_tiling and vae.tile_sample_min_size == 512  # restored
    assert grid == {"tile_px": 64, "stride_px": 56, "blend_px": 8}
    overlap = band_mask(128, 56, 8)
    assert overlap.sum() == 16  # two overlaps of 8 px along each side: at 56 and 112
    difference = (tiled - untiled).abs()
    assert difference[..., overlap, :].max() <= SEAM_TOLERANCE and difference[..., :, overlap].max() <= SEAM_TOLERANCE
    sweep = at_resolution(vae, [x], "cpu", tile=64)
    assert sweep["tiled"]["grid"]["tiles_per_side"] == 3 and sweep["seam"]["max_abs"] <= SEAM_TOLERANCE


def test_seam_error_of_a_kl_decoder_and_no_seam_within_one_tile():
    """The KL decoder (GroupNorm: statistics per tile) does change under tiling; the seam figures agree with
    a direct computation, and an image that fits in one tile is decoded exactly as untiled."""
    vae = tiny("AutoencoderKL")
    x = [images(1, 64)]
    tiled = at_resolution(vae, x, "cpu", tile=32)  # 32 px tiles blended over 8 px: stride 24
    seam, grid = tiled["seam"], tiled["tiled"]["grid"]
    assert grid == {"tile_px": 32, "stride_px": 24, "blend_px": 8, "tiles_per_side": 3}
    assert 0 < seam["mean_abs"] < seam["max_abs"] and len(seam["period_profile"]) == 24
    assert tiled["untiled"]["encode_status"] == "ok" and tiled["untiled"]["decode_peak_bytes"] > 0
    with torch.no_grad():
        z = encode_latent(vae, x[0])
        untiled = decode_latent(vae, z)
        with tiling(vae, 32):
            direct = decode_latent(vae, z)
    alone = seam_error(direct, untiled, grid)
    assert alone["max_abs"] == pytest.approx((direct - untiled).abs().max().item())
    one_tile = at_resolution(vae, x, "cpu", tile=64)
    assert one_tile["tiled"]["grid"]["tiles_per_side"] == 1 and one_tile["seam"]["max_abs"] == 0.0


def test_peak_memory_on_the_cpu_sees_a_temporary():
    size = 4 << 20
    out, peak, seconds = peak_memory(lambda: torch.ones(size // 4).sum() + torch.zeros(size // 4).sum(), "cpu")
    assert out.item() == size // 4 and peak >= size and seconds > 0


def untiled_decode_out_of_memory(vae, z):
    """decode_latent, except that an untiled decode runs out of memory as CUDA's allocator says it."""
    if not vae.use_tiling:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 19.90 GiB")
    return decode_latent(vae, z)


def test_running_out_of_memory_is_recorded_and_the_tiled_decode_still_runs(monkeypatch):
    monkeypatch.setattr(first_stage.compare, "decode_latent", untiled_decode_out_of_memory)
    result = at_resolution(tiny("AutoencoderKL"), [images(1, 64)], "cpu", tile=32)
    assert result["untiled"]["decode_status"].startswith("out of memory: CUDA out of memory")
    assert result["tiled"]["decode_status"] == "ok" and result["tiled"]["psnr"] is not None
    assert result["seam"] is None and result["untiled"]["psnr"] is None


@pytest.mark.parametrize("name", list(IMAGE_AUTOENCODERS))
def test_each_class_is_read_from_a_folder_and_compared(name, tmp_path):
    vae = tiny(name)
    vae.save_pretrained(tmp_path / name)
    loaded = load_image_autoencoder(tmp_path / name)
    assert type(loaded).__name__ == name
    x = images(2, 32)
    result = compared(vae, loaded, x)
    assert result["latent_drift"]["raw"]["overall"]["relative_error"] == 0.0
    assert result["latent_drift"]["normalised"]["overall"]["relative_error"] == 0.0
    sweep = at_resolution(loaded, [x[:1]], "cpu")
    assert sweep["untiled"]["decode_status"] == "ok" and sweep["untiled"]["psnr"] is not None
    if name != "AutoencoderTiny":  # 32 px fits in the class's default tile: no tiling, no seam
        assert sweep["seam"]["max_abs"] == 0.0
    audit = fp16_audit(loaded, x)
    assert audit["verdict"] and audit["peak"] > 0
    entry = autoencoder_entry(tmp_path / name, loaded, {})
    assert entry["class"] == name and entry["normalisation"]


def test_the_normalisation_of_each_class_follows_its_pipeline():
    z = torch.randn(2, 4, 8, 8)
    qwen = tiny("AutoencoderKLQwenImage")
    mean, std = torch.tensor(qwen.config.latents_mean).view(1, 4, 1, 1), torch.tensor(qwen.config.latents_std)
    # diffusers pipelines/qwenimage/pipeline_qwenimage_img2img.py: (z - latents_mean) * (1 / latents_std)
    expected = (z - mean) * (1.0 / std).view(1, 4, 1, 1)
    assert torch.allclose(normalizer_of(qwen).normalize(z), expected, atol=1e-6)
    # pipelines/sana/pipeline_sana.py decodes latents / scaling_factor
    assert torch.allclose(normalizer_of(tiny("AutoencoderDC")).denormalize(z), z / 0.5)
    assert torch.equal(normalizer_of(tiny("AutoencoderTiny")).normalize(z), z)  # scaling 1, shift 0
    flux2 = tiny("AutoencoderKLFlux2")
    assert normalizer_of(flux2).normalize(torch.randn(1, 8, 8, 8)).shape == (1, 32, 4, 4)  # 2×2 patches


def test_different_latent_shapes_are_skipped_with_the_reason():
    result = compared(tiny("AutoencoderKL"), tiny("AutoencoderTiny"), images(2, 32))
    assert "raw latent shapes differ: reference [4, 16, 16], candidate [4, 4, 4]" in result["latent_drift"]["raw"][
        "skipped"]
    assert "normalised latent shapes differ" in result["cross_decoding"]["skipped"]
    assert result["own_reconstruction"]["candidate"]["psnr"]["images"] == 2
    # the same raw shape (4, 16, 16), another class and normalisation: drift and cross-decoding both run
    other = compared(tiny("AutoencoderKL"), tiny("AutoencoderKLQwenImage"), images(2, 32))
    assert "skipped" not in other["latent_drift"]["raw"] and "skipped" not in other["cross_decoding"]


@pytest.mark.parametrize("name", ["AutoencoderKL", "AutoencoderTiny", "AutoencoderDC", "AutoencoderKLQwenImage"])
def test_fp16_audit_finds_where_each_class_overflows(name):
    """The audit encodes and decodes every class in fp16 (model.encode_latent / decode_latent): a VAE whose last
    decoder layer is scaled past fp16's 65504 overflows there first; as built it does not."""
    vae = tiny(name)
    x = images(2, 32)
    assert fp16_audit(vae, x)["overflow"] == []
    last = [(n, m) for n, m in vae.named_modules() if n.startswith("decoder") and isinstance(m, torch.nn.Conv2d)
            or n.startswith("decoder") and isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last[1].weight.mul_(1e7)  # outputs past fp16's 65504
    audit = fp16_audit(vae, x)
    assert last[0] in audit["overflow"] and audit["verdict"].startswith("overflows in fp16, first at decoder")


def test_unknown_class_and_missing_weights_and_path_are_named(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(UnsupportedAutoencoderError, match=r"config\.json: holds a AutoencoderKLWan"):
        load_image_autoencoder(folder)
    tiny("AutoencoderDC").save_pretrained(tmp_path / "dc", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.*safetensors"):
        load_image_autoencoder(tmp_path / "dc")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        load_image_autoencoder(tmp_path / "missing")


def test_report_validates_and_writes_markdown_and_plots(accelerator, tmp_path):
    reference, candidate = tiny("AutoencoderKL"), tiny("AutoencoderKLQwenImage")
    data = evaluation_data(DATA)
    comparison, skipped, kept = compare_vaes(reference, candidate, accelerator, data, 3, 2, keep=2)
    assert kept["reference_to_candidate"].shape == (2, 3, 32, 32)
    entries = []
    for vae in (reference, candidate):
        results = {"images": comparison["images"], "skipped_files": skipped,
                   "resolutions": [at_resolution(vae, [images(1, 32)], "cpu", tile=16)],
                   "fp16": fp16_audit(vae, kept["image"])}
        entries.append(autoencoder_entry("a", vae, results))
    rep = compare_report(data, entries, comparison, 3, 9, accelerator.device)
    jsonschema.validate(json.loads(json.dumps(rep)), REPORT_SCHEMA)
    assert rep["kind"] == "compare" and rep["comparison"]["memory_measure"].startswith("tracked CPU allocations")
    plots = compare_plots(rep, tmp_path)
    assert [p.name for p in plots] == ["drift_channels.png", "resolutions.png", "seam_profile.png"]
    notes = "\n".join(compare_notes(rep, plots))
    assert "reference latent → candidate decoder" in notes and "seam max" in notes and "fp16" in notes


def test_several_processes_are_refused():
    class TwoProcesses:
        num_processes = 2
    with pytest.raises(ConfigError, match="one process"):
        compare_vaes(None, None, TwoProcesses(), evaluation_data(DATA), 1, 1)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one_thread fixture, for the subprocess


@pytest.mark.slow
def test_compare_command_end_to_end(tmp_path, vgg_file):
    tiny("AutoencoderKL").save_pretrained(tmp_path / "a")
    tiny("AutoencoderKLQwenImage").save_pretrained(tmp_path / "b")
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "compare.py"), "--reference", str(tmp_path / "a"),
                           "--vae", str(tmp_path / "b"), "--data", DATA, "--num-images", "3", "--batch-size", "2",
                           "--resolutions", "32", "64", "--tile-size", "32", "--lpips-weights", str(vgg_file),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert [r["resolution"] for r in report["vaes"][0]["results"]["resolutions"]] == [32, 64]
    assert report["comparison"]["cross_decoding"]["reference_to_candidate"]["lpips"]["mean"] > 0
    assert "VAE compatibility" in (tmp_path / "out" / "report.md").read_text()
    for name in ("drift_channels", "resolutions", "seam_profile", "cross_decoding"):
        with Image.open(tmp_path / "out" / f"{name}.png") as image:
            image.verify()
    missing = subprocess.run([sys.executable, str(REPO / "eval" / "compare.py"), "--reference", str(tmp_path / "x"),
                              "--vae", str(tmp_path / "b"), "--no-lpips", "--out", str(tmp_path / "o2")],
                             capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and str(tmp_path / "x") in missing.stderr
