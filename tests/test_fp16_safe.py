"""The fp16-safe fine-tune (first_stage/fp16_safe.py): a tiny VAE built to overflow fp16 fails the export's audit,
and after the fine-tune passes it with its fp32 outputs and latents within the tolerances below.

The VAE overflows by construction: two ResnetBlock2D conv1s (one in the encoder, one in the decoder) are scaled
so that their outputs reach 4 × fp16's largest value; each feeds a GroupNorm, which divides the scale out again,
so the fp32 function is the original's (but for GroupNorm's eps).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from conftest import training_accelerator
from first_stage.config import ConfigError, ModelConfig, load_config
from first_stage.export import FP16_MAX, fp16_overflow_check
from first_stage.fp16_safe import (RESCALE_TARGET, Fp16SafeTerm, activation_excess, groupnorm_fed_convs,
                                   probe_batch, rescale_groupnorm_fed)
from first_stage.model import AutoencoderWrapper, new_autoencoder
from first_stage.terms import build_terms
from first_stage.trainer import TrainingState, build_parts, train_step

REPO = Path(__file__).resolve().parents[1]
# The stated tolerances of the fine-tune, against the overflowing original in fp32 on the probe images:
OUTPUT_TOLERANCE = 0.05  # max |Δ| of the decodings of the original's latents (posterior means), images in [-1, 1]
LATENT_TOLERANCE = 0.05  # max |Δ| of the posterior means, as a fraction of the original's largest |mean|
RESCALE_TOLERANCE = 1e-4  # rescaling alone: max |Δ| of outputs and latents (GroupNorm's eps, fp32 rounding)
# The blocks whose conv1 is scaled up: one in the encoder (the latents overflow), one in the decoder.
SCALED = ("encoder.down_blocks.1.resnets.0", "decoder.up_blocks.0.resnets.1")
# The test's fine-tune: a random tiny VAE moves fast (one Adam step at lr 1e-4 moves its outputs by 0.1), hence
# lr 1e-5; its latents are small (std 0.2), hence a latent weight 10 x the recipe's.
FINETUNE = ["data.resolution=32", "train.batch_size=2", "loss.perceptual_weight=0", "train.ema=false",
            "optimizer.lr=1e-5", "fp16_safe.enabled=true", "teacher.output_weight=10", "teacher.latent_weight=1000"]
STEPS = 10


def probe_images() -> torch.Tensor:
    """The fine-tune's probe batch: two 32² centre crops of the sample photos."""
    return probe_batch(load_config(None, ["data.resolution=32", "train.batch_size=2"]), torch.device("cpu"))


def conv1_peaks(vae, x: torch.Tensor) -> dict[str, float]:
    """The fp32 peak |output| of each conv1 of :data:`SCALED` on ``x``."""
    peaks = {}
    handles = [vae.get_submodule(name).conv1.register_forward_hook(
        lambda m, args, out, name=name: peaks.__setitem__(name, out.abs().max().item())) for name in SCALED]
    with torch.no_grad():
        vae.decode(vae.encode(x).latent_dist.mode())
    for handle in handles:
        handle.remove()
    return peaks


def overflowing_vae(x: torch.Tensor) -> AutoencoderKL:
    """The tiny preset with the conv1 of each :data:`SCALED` block scaled, weight and bias, so that its output on
    ``x`` peaks at 4 × FP16_MAX."""
    torch.manual_seed(0)
    vae = new_autoencoder(ModelConfig(preset="tiny")).eval()
    for name, peak in conv1_peaks(vae, x).items():
        conv = vae.get_submodule(name).conv1
        with torch.no_grad():
            conv.weight.mul_(4 * FP16_MAX / peak)
            conv.bias.mul_(4 * FP16_MAX / peak)
    return vae


@torch.no_grad()
def outputs_and_latents(vae, x: torch.Tensor, latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the decoding of ``latents``, default ``vae``'s own posterior means of ``x``; those means), fp32."""
    mean = vae.encode(x).latent_dist.mean
    return vae.decode(mean if latents is None else latents).sample, mean


def test_the_penalty_is_zero_under_the_limit_and_pulls_down_above_it():
    a = torch.tensor([[1.0, -3.0, 4.0, -4.0]], requires_grad=True)  # (B=1, 4)
    under = activation_excess(a, 4.0, "sum")
    under.backward()
    assert under.item() == 0 and torch.all(a.grad == 0)
    b = torch.tensor([[2.0, -12.0, 8.0, 1.0]], requires_grad=True)
    over = activation_excess(b, 4.0, "sum")
    over.backward()
    assert over.item() == pytest.approx((12 / 4 - 1) ** 2 + (8 / 4 - 1) ** 2)  # 4 + 1
    # d/da relu(|a|/L - 1)²: 2 (|a|/L - 1) sign(a) / L, towards zero above the limit only
    assert torch.allclose(b.grad, torch.tensor([[0.0, -2 * 2 / 4, 2 * 1 / 4, 0.0]]))
    assert activation_excess(b.detach(), 4.0, "mean").item() == pytest.approx(5 / 4)  # averaged over elements
    c = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: activation_excess(t, 0.5, "sum"), (c,))


def test_rescaling_groupnorm_fed_convolutions_keeps_the_function(tmp_path):
    x = probe_images()
    vae = overflowing_vae(x)
    before = outputs_and_latents(vae, x)
    assert fp16_overflow_check(vae, x)["overflow"]
    convs = groupnorm_fed_convs(vae)
    assert set(SCALED) <= {name.removesuffix(".conv1") for name in convs}  # every ResnetBlock2D's conv1
    factors = rescale_groupnorm_fed(vae, x, 1000.0)
    assert set(factors) == {f"{name}.conv1" for name in SCALED}  # the others peak under 1000 already
    after = outputs_and_latents(vae, x, before[1])
    for got, want in zip(after, before):
        assert (got - want).abs().max().item() < RESCALE_TOLERANCE
    assert max(conv1_peaks(vae, x).values()) == pytest.approx(1000.0, rel=1e-4)
    assert not fp16_overflow_check(vae, x)["overflow"]
    vae.requires_grad_(False)  # a frozen convolution (the encoder of a decoder-only run) is left alone
    assert groupnorm_fed_convs(vae) == {}


def test_hooks_record_only_forward_passes_with_grad_and_the_penalty_lowers_the_peak():
    """Without rescaling, the penalty's gradient alone brings the peak down towards a limit set under the tiny
    VAE's own peak; a forward pass under no_grad leaves nothing behind."""
    x = probe_images()
    torch.manual_seed(0)
    vae = new_autoencoder(ModelConfig(preset="tiny"))
    config = load_config(None, ["fp16_safe.enabled=true", "fp16_safe.rescale=false", "fp16_safe.limit=4",
                                "model.init_from=unused", "teacher.path=unused", "data.resolution=32"])
    term = Fp16SafeTerm(config)
    assert term.build(vae, torch.device("cpu")) is None and term.rescaled == {}
    model = AutoencoderWrapper(vae)
    with torch.no_grad():
        out = model(x)
    assert term.loss(out, None) == (None, {})
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        value, logs = term.loss(model(x), None)
        history.append((logs["train/fp16_peak"], logs["train/loss/fp16_excess"]))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        assert term.recorder.excess == [] and term.recorder.seen == {}  # taken by the loss
    (peak0, excess0), (peak, excess) = history[0], history[-1]
    assert peak0 > 6 and excess0 > 10  # the tiny VAE peaks at about 7 against the limit 4
    assert peak < 0.75 * peak0 and excess < excess0 / 20
    assert "fp16-safe fine-tune" in term.card_line() and "no rescaling" in term.card_line()


@pytest.mark.parametrize("overrides, key", [
    (["teacher.path=null"], "needs teacher.path"),
    (["teacher.output_weight=0"], "teacher.output_weight"),
    (["fp16_safe.limit=0"], "fp16_safe.limit"),
    (["fp16_safe.limit=70000"], "fp16_safe.limit"),
    (["fp16_safe.activation_weight=-1"], "fp16_safe.activation_weight"),
    (["performance.compile=true"], "performance.compile"),
])
def test_nonsense_is_refused_at_load_naming_the_key(overrides, key):
    base = ["fp16_safe.enabled=true", "model.init_from=/vae", "teacher.path=/vae"]
    assert [t.name for t in build_terms(load_config(None, base))][-2:] == ["teacher", "fp16_safe"]
    with pytest.raises(ConfigError, match=key):
        load_config(None, base + overrides)


def test_the_finetune_passes_the_audit_and_holds_outputs_and_latents(tmp_path):
    x = probe_images()
    original = overflowing_vae(x)
    original.save_pretrained(tmp_path / "vae")
    audit = fp16_overflow_check(original, x)
    assert audit["overflow"][0] == f"{SCALED[0]}.conv1"  # fails the audit where the scaled convolution is
    outputs, latents = outputs_and_latents(original, x)

    config = load_config(None, FINETUNE + [f"model.init_from={tmp_path / 'vae'}", f"teacher.path={tmp_path / 'vae'}"])
    with training_accelerator(config) as accelerator:
        torch.manual_seed(0)
        parts = build_parts(config, accelerator)
        term = parts.loss_fn.terms[-1]
        assert isinstance(term, Fp16SafeTerm) and set(term.rescaled) == {f"{name}.conv1" for name in SCALED}
        for peak in conv1_peaks(parts.raw_model.vae, x).values():  # brought to half the limit
            assert peak == pytest.approx(RESCALE_TARGET * config.fp16_safe.limit, rel=1e-4)
        state, batches = TrainingState(), iter(lambda: {"pixel_values": x, "skipped": 0, "upsized": 0}, None)
        logs = [train_step(accelerator, parts, config, state, batches) for _ in range(STEPS)]
        vae = parts.raw_model.vae.eval()
        assert state.skipped_steps == 0
        assert all(entry["train/fp16_peak"] < config.fp16_safe.limit for entry in logs)
        assert any("fp16-safe fine-tune" in line for line in parts.loss_fn.card_lines())

    after = fp16_overflow_check(vae, x)
    assert after["overflow"] == [] and after["peak"] < config.fp16_safe.limit
    tuned_outputs, tuned_latents = outputs_and_latents(vae, x, latents)
    output_error = (tuned_outputs - outputs).abs().max().item()
    latent_error = (tuned_latents - latents).abs().max().item() / latents.abs().max().item()
    print(f"fp16 peak before: overflow ({len(audit['overflow'])} modules), after: {after['peak']:.4g}; "
          f"output error {output_error:.3g} (tolerance {OUTPUT_TOLERANCE}), latent error {latent_error:.3g} "
          f"(tolerance {LATENT_TOLERANCE})")
    assert output_error < OUTPUT_TOLERANCE and latent_error < LATENT_TOLERANCE


@pytest.mark.slow
def test_train_then_export_writes_force_upcast_false(tmp_path):
    """The recipe through the entry points: train/train.py on the overflowing tiny VAE, then scripts/export.py,
    whose config.json says force_upcast false (the audit passes) though the source said true, keeps the source's
    stated scaling_factor (the latents were held to it) and reports how far the latents moved."""
    x = probe_images()
    source = overflowing_vae(x)
    source.register_to_config(force_upcast=True, scaling_factor=0.5)
    source.save_pretrained(tmp_path / "vae")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = FINETUNE + [f"model.init_from={tmp_path / 'vae'}", f"teacher.path={tmp_path / 'vae'}",
                       "model.preset=tiny", "data.source=sample", "discriminator.enabled=false", "train.max_steps=3",
                       "train.log_every=1", "train.checkpoint_every=3", "export.calibration_images=2",
                       f"train.output_dir={tmp_path / 'runs'}", "train.run_name=fp16"]
    train = [sys.executable, "train/train.py", "--config", "configs/fp16_safe.yaml"]
    for assignment in sets:
        train += ["--set", assignment]
    proc = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "scripts/export.py", str(tmp_path / "runs" / "fp16"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["force_upcast"] is False
    report = json.loads((out / "export_report.json").read_text())
    assert report["fp16"]["overflow_modules"] == [] and report["fp16"]["force_upcast"] is False
    assert any("fp16-safe fine-tune" in line for line in report["loss_terms"])
    assert json.loads((out / "config.json").read_text())["scaling_factor"] == 0.5
    assert report["latents"]["normalisation_kept"]
    drift = report["latents"]["drift"]["overall"]
    assert drift["cosine"] > 0.99 and 0 < drift["relative_error"] < 0.05
    assert "The latents moved from those of" in (out / "README.md").read_text()
