"""The diffusability probe against known answers: the Gaussian optimum of flow matching, spatial
structure, per-channel normalisation of a per_channel export, and the script's process-count
independence, held-out split and refusals. CPU, tiny probes."""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import cpu_env, launch_command
from safetensors.torch import load_file
from test_latent_norm import spread_vae

from first_stage.data import calibration_batches
from first_stage.diffusability import (ProbeSettings, build_probe, gaussian_reference, held_out_loss, probe_vae,
                                       timestep_grid, train_probe)
from first_stage.evaluation import evaluation_autoencoder, evaluation_data
from first_stage.export import ExportOptions, ExportSource, export_autoencoder
from first_stage.reports import REPORT_SCHEMA

REPO = Path(__file__).resolve().parents[1]


def trained_held_out_loss(accelerator, train, held, steps, grid):
    """The held-out loss (T,) of a tiny probe trained ``steps`` steps on ``train``."""
    torch.manual_seed(0)
    model = build_probe(tuple(train.shape[1:]), "tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    train_probe(accelerator, model, optimizer, train, steps, 32, seed=0, warmup=20)
    return held_out_loss(model, held, list(range(len(held))), grid, 0, 64, accelerator)


def test_gaussian_reference_is_the_best_linear_predictor():
    """For x₀ ~ N(0, σ²) and ε ~ N(0, 1), the least-squares fit of v = ε − x₀ on x_t leaves σ²/((1−t)²σ² + t²)."""
    g = torch.Generator().manual_seed(0)
    sigma2, t = 0.3, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x0 = torch.randn(400_000, generator=g, dtype=torch.float64) * sigma2**0.5
    eps = torch.randn(400_000, generator=g, dtype=torch.float64)
    for k, tk in enumerate(t.tolist()):
        xt, v = (1 - tk) * x0 + tk * eps, eps - x0
        a = (v * xt).mean() / (xt * xt).mean()
        residual = (v - a * xt).pow(2).mean()
        assert residual.item() == pytest.approx(gaussian_reference(torch.tensor([sigma2]), t)[k].item(), rel=0.01)


def test_probe_approaches_the_gaussian_optimum(accelerator):
    """On independent N(0, 0.25) latents the best possible held-out loss is the closed form.

    Bounds: the held-out estimate is a mean over 128 × 64 elements per timestep (relative standard
    error ~2 %), so it may fall a few percent below the optimum, never far; 300 steps leave the tiny
    probe within ~6 % of it on average (measured 1.056; predicting zero would give 1.25 / 0.79 = 1.6×).
    """
    g = torch.Generator().manual_seed(1)
    train, held = torch.randn(512, 4, 4, 4, generator=g) * 0.5, torch.randn(128, 4, 4, 4, generator=g) * 0.5
    grid = timestep_grid(8)
    loss = trained_held_out_loss(accelerator, train, held, 300, grid)
    ratio = loss / gaussian_reference(torch.full((4,), 0.25), grid)
    assert 0.97 < ratio.mean().item() < 1.12, ratio
    assert (ratio > 0.93).all() and (ratio < 1.3).all(), ratio


def test_spatial_structure_is_easier_to_learn(accelerator):
    """Smooth latents against the same values shuffled over positions per image (same marginals)."""
    g = torch.Generator().manual_seed(2)
    coarse = torch.randn(640, 4, 2, 2, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=4, mode="bilinear", align_corners=True)
    smooth = smooth / smooth.std()
    order = torch.stack([torch.randperm(16, generator=g) for _ in range(640)])  # (N, 16) per image
    shuffled = torch.gather(smooth.flatten(2), 2, order[:, None, :].expand(-1, 4, -1)).view_as(smooth)
    grid = timestep_grid(4)
    easy = trained_held_out_loss(accelerator, smooth[:512], smooth[512:], 200, grid).mean()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    hard = trained_held_out_loss(Accelerator(cpu=True), shuffled[:512], shuffled[512:], 200, grid).mean()
    assert easy < 0.8 * hard, (easy, hard)


DATA = "source=sample,split=all,resolution=32"
SPREAD = [1.0, 30.0, 0.03, 1.0]  # latent channel scales 1000× apart


def spread_export(vae, out: Path) -> Path:
    """A ``per_channel`` export of ``vae`` with its channels spread by :data:`SPREAD`, calibrated on the
    nine sample photos the probe tests encode."""
    calibration = [b["pixel_values"] for b in calibration_batches(evaluation_data(DATA), 9, 4)]
    export_autoencoder(spread_vae(vae, SPREAD), out, calibration, ExportSource("test", "sample photos"),
                       ExportOptions(latent_norm="per_channel", single_file=None))
    return out


def assert_channels_normalised(cache: Path) -> None:
    """The probe's cached training latents have comparable scales in every channel (unnormalised they
    would be 1000× apart): it trained on them normalised per channel, as a pipeline reads the export."""
    std = load_file(cache)["train"].std(dim=(0, 2, 3))
    assert std.max() / std.min() < 3, std


def test_probe_normalises_a_per_channel_export_per_channel(accelerator, tiny_vae, tmp_path):
    """An export that carries latents_mean/latents_std (scaling_factor 1): the probe must use them."""
    vae = evaluation_autoencoder(spread_export(tiny_vae, tmp_path / "vae"), accelerator.device)
    settings = ProbeSettings(num_images=9, held_out=3, steps=2, batch_size=4, timesteps=2, samples=2, sample_steps=2,
                             encode_batch_size=4, seeds=1)
    cache = tmp_path / "cache.safetensors"
    result, shown = probe_vae(vae, accelerator, evaluation_data(DATA), 9, settings, cache=cache)
    assert_channels_normalised(cache)
    deployed = result["columns"]["exported"]["normalisation"]  # the ranking column is per-channel statistics
    assert deployed["pipeline"].startswith("per channel")
    assert deployed["config"]["latents_std"] == pytest.approx(vae.config.latents_std)
    assert shown.shape == (2, 3, 32, 32) and result["train_images"] == 6


def test_probe_settings_and_sampling_refuse_zero_steps():
    with pytest.raises(ValueError, match="timesteps"):
        ProbeSettings(timesteps=0)
    with pytest.raises(ValueError, match="sample_steps"):
        ProbeSettings(sample_steps=0)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--timesteps", "--sample-steps"])
def test_script_refuses_zero_timesteps_and_sample_steps(flag, tmp_path):
    """--timesteps 0 gave NaN figures and exit 0; --sample-steps 0 reported the initial noise as samples."""
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "diffusability.py"), "--vae", str(tmp_path),
                           "--out", str(tmp_path / "out"), flag, "0"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 2 and f"{flag} must be at least 1" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_script_two_processes_equal_one_and_never_trains_on_held_out(tiny_vae, tmp_path):
    spread_export(tiny_vae, tmp_path / "vae")
    common = [str(REPO / "eval" / "diffusability.py"), "--vae", str(tmp_path / "vae"), "--data", DATA,
              "--num-images", "9", "--held-out", "3", "--steps", "6", "--batch-size", "4", "--eval-every", "3",
              "--samples", "2", "--sample-steps", "3"]
    results = {}
    for name, cmd in (("one", [sys.executable, *common]), ("two", [*launch_command(2), *common])):
        proc = subprocess.run([*cmd, "--out", str(tmp_path / name)], capture_output=True, text=True, env=cpu_env(),
                              timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((tmp_path / name / "report.json").read_text())
        jsonschema.validate(report, REPORT_SCHEMA)
        results[name] = report["vaes"][0]["results"]
        cache = load_file(tmp_path / name / "latents" / "vae1.safetensors")
        train_ids, held_ids = set(cache["train_ids"].tolist()), set(cache["held_out_ids"].tolist())
        assert len(train_ids) == 6 and len(held_ids) == 3 and not train_ids & held_ids
        assert_channels_normalised(tmp_path / name / "latents" / "vae1.safetensors")
        assert all((tmp_path / name / png).is_file() for png in ("samples_vae1.png", "diffusability_loss.png"))
    one, two = results["one"], results["two"]
    assert [c["step"] for c in one["curve"]] == [0, 3, 6]
    for a, b in zip(one["curve"], two["curve"]):
        assert a["per_timestep"] == pytest.approx(b["per_timestep"], rel=1e-4), a["step"]
    assert one["samples"]["std"] == pytest.approx(two["samples"]["std"], rel=1e-3)
    assert one["gfid"] is None and "not measured" in one["gfid_note"]
    assert one["normalisation"]["pipeline"] == two["normalisation"]["pipeline"]
