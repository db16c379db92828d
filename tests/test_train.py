"""Subprocess runs of train/train.py: smoke, exact resume, distributed and accumulation
equivalence, faults. Tiny preset, 32² crops, a few steps each; nothing is downloaded."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from first_stage.checkpoint import (AUTOENCODER_WEIGHTS, CONFIG_FILE, DISCRIMINATOR_WEIGHTS, EXPORT_WEIGHTS,
                                    STATUS_FILE, TRAINER_STATES, TRAINING_STATE, build_autoencoder, checkpoint_dirs,
                                    checkpoint_step, load_vae)
from first_stage.config import ModelConfig, load_config
from first_stage.lifecycle import LOCK_FILE

from conftest import cpu_env, identical, launch_command

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train" / "train.py")
pytestmark = pytest.mark.slow

# Small and fast, with every loss term on: LPIPS (stand-in weights), KL, and the GAN from step 2.
BASE = [
    "data.resolution=32", "val_data.resolution=32", "train.batch_size=2", "train.log_every=1",
    "train.image_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=5", "optimizer.warmup_steps=0",
    "optimizer.schedule=constant", "loss.lpips_missing=error", "loss.lpips_download=false",
    "discriminator.enabled=true", "discriminator.start=2", "discriminator.channels=16",
    "export.calibration_images=4",
]


# 8 of the 9 sample pictures per epoch in both layouts (batch 4 x 1, or 2 x 2), so the data matches.
# No GAN: its adaptive weight is computed per process, as in latent-diffusion.
EQUIVALENCE = ["train.max_steps=2", "train.checkpoint_every=1", "discriminator.enabled=false",
               "optimizer.lr=1e-3", "data.split=all"]


def run_train(tmp_path, name, *overrides, vgg_file=None, launch=None, env=None, check=True, resume=None, config=None):
    """Run train/train.py (on the recipe ``config``, default the package's defaults) in a subprocess; return
    (CompletedProcess, run directory)."""
    sets = [*BASE, f"train.output_dir={tmp_path}", f"train.run_name={name}", *overrides]
    if vgg_file is not None:
        sets.append(f"loss.lpips_weights={vgg_file}")
    else:
        sets.append("loss.perceptual_weight=0")
    args = [a for s in sets for a in ("--set", s)] + (["--resume", resume] if resume else [])
    cmd = (launch or [sys.executable]) + [TRAIN] + (["--config", str(config)] if config else []) + args
    full_env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=1800)  # a loaded machine
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc, tmp_path / name


def status(run_dir):
    return json.loads((run_dir / STATUS_FILE).read_text())


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return {m["step"]: m["train/loss/total"] for m in metrics(run_dir) if "train/loss/total" in m}


def weights(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"checkpoint-{step}" / AUTOENCODER_WEIGHTS)


def start_train(tmp_path, name, *overrides, launch=None, resume=None) -> subprocess.Popen:
    """Start a long run (no GAN, no LPIPS) in its own process group; its output goes to <tmp>/<name>.log."""
    sets = [*BASE, f"train.output_dir={tmp_path}", f"train.run_name={name}", "train.max_steps=100000",
            "discriminator.enabled=false", "loss.perceptual_weight=0", *overrides]
    cmd = (launch or [sys.executable]) + [TRAIN] + [a for s in sets for a in ("--set", s)]
    with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(cmd + (["--resume", resume] if resume else []), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TORCH_HOME": str(tmp_path / "th")}, start_new_session=True)


def wait_until(condition, proc: subprocess.Popen, what: str, log: Path | None = None, timeout: float = 900) -> None:
    """Poll ``condition`` until it holds; fail at once, with the run's ``log``, if ``proc`` ends first.
    The timeout is generous: a loaded machine is slow, and nothing here measures speed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group of ``proc`` (a launcher and its trainer); a group that has
    already left is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def test_smoke_accelerate_launch(tmp_path, vgg_file):
    _, run = run_train(tmp_path, "smoke", "train.max_steps=4", vgg_file=vgg_file, launch=launch_command(1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for ckpt in (run / "checkpoints").iterdir():
        assert {AUTOENCODER_WEIGHTS, "optimizer.bin", CONFIG_FILE, TRAINING_STATE} <= {p.name for p in ckpt.iterdir()}
    assert (run / "config.yaml").is_file()
    assert status(run) | {"time": None} == {"state": "finished", "step": 4, "exit_code": 0, "time": None,
                                            "reason": "reached train.max_steps=4",
                                            "last_checkpoint": str(run / "checkpoints" / "checkpoint-4")}
    logged = metrics(run)
    assert {"train/loss/lpips", "train/loss/g", "train/loss/disc", "val/psnr"} <= set().union(*logged)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    grid = Image.open(run / "samples" / "step-0000004.png")
    assert grid.size == (32 * 2, 32 * 2)  # 2 validation images, input row and reconstruction row
    vae = AutoencoderKL.from_pretrained(run / "export")
    report = json.loads((run / "export" / "export_report.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(report["latent_stats"]["scaling_factor"])
    assert vae.config.scaling_factor != 0.18215  # measured, not the SD default
    assert vae.config.sample_size == 32  # the training resolution: diffusers' tile size
    assert report["latent_stats"]["num_images"] == 4 and report["verification"]["diffusers"] == 0
    # scripts/export.py reads the same EMA weights back from the run's last checkpoint
    exported = load_file(run / "export" / EXPORT_WEIGHTS)
    ema, raw = (load_vae(run, w).vae.state_dict() for w in ("ema", "raw"))
    assert all(torch.equal(ema[k], v) for k, v in exported.items())
    assert any(not torch.equal(raw[k], v) for k, v in exported.items())
    # model.init_from takes the run itself too: its EMA weights
    started = build_autoencoder(ModelConfig(init_from=str(run))).state_dict()
    assert all(torch.equal(started[k], v) for k, v in exported.items())
    # The fine-tuning bundle: discriminator, log-variance, and a config that starts from this export.
    bundle = run / "export" / "finetune"
    assert {"discriminator.safetensors", "loss.safetensors", "config.yaml"} <= {p.name for p in bundle.iterdir()}
    continued = load_config(bundle / "config.yaml")
    assert Path(continued.model.init_from) == (run / "export").resolve()
    _, finetuned = run_train(tmp_path, "continued", "train.max_steps=1",
                             f"model.init_from={continued.model.init_from}",
                             f"discriminator.init_from={continued.discriminator.init_from}")
    assert (finetuned / "export" / "vae_ldm.safetensors").is_file()


def assert_same_checkpoint(straight: Path, resumed: Path, step: int) -> dict:
    """The two runs' checkpoints of ``step`` hold bit-identical weights, EMA, discriminator and its state;
    returns the weights."""
    a, b = weights(straight, step), weights(resumed, step)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for extra in (*TRAINER_STATES.values(), DISCRIMINATOR_WEIGHTS):  # the discriminator and the EMA too
        pa = straight / "checkpoints" / f"checkpoint-{step}" / extra
        pb = resumed / "checkpoints" / f"checkpoint-{step}" / extra
        if not pa.exists():  # a state this run does not keep (e2e's without e2e)
            assert not pb.exists(), extra
            continue
        if extra.endswith(".safetensors"):
            da, db = load_file(pa), load_file(pb)
            assert all(torch.equal(da[k], db[k]) for k in da), extra
        else:
            da, db = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
            assert str(da) == str(db), extra
    return a


def test_exact_resume(tmp_path, vgg_file):
    _, straight = run_train(tmp_path, "straight", "train.max_steps=6", vgg_file=vgg_file)
    run_train(tmp_path, "resumed", "train.max_steps=3", vgg_file=vgg_file)
    _, resumed = run_train(tmp_path, "resumed", "train.max_steps=6", vgg_file=vgg_file, resume="latest")
    losses_a, losses_b = train_losses(straight), train_losses(resumed)
    assert sorted(losses_a) == sorted(losses_b) == [1, 2, 3, 4, 5, 6]
    assert losses_a == losses_b
    assert_same_checkpoint(straight, resumed, 6)
    # Resuming with a config of another architecture is refused before anything is loaded, naming
    # what differs and the config the checkpoint was written under; the run's config.yaml is kept.
    run_config = (resumed / CONFIG_FILE).read_text()
    refused, _ = run_train(tmp_path, "resumed", "train.max_steps=8", "model.preset=sd-f8c4", vgg_file=vgg_file,
                           resume="latest", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "holds another architecture than this config builds" in refused.stderr
    assert "block_out_channels: [32, 64] in the checkpoint, [128, 256, 512, 512] in this config" in refused.stderr
    assert "vae.encoder.conv_in.weight: (32, 3, 3, 3) in the checkpoint, (128, 3, 3, 3) in this config" \
        in refused.stderr
    latest = max((resumed / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert f"--config {latest / CONFIG_FILE}" in refused.stderr
    assert train_losses(resumed) == losses_a  # nothing was trained or logged
    assert (resumed / CONFIG_FILE).read_text() == run_config


def assert_same_training(run_a, run_b, extra_keys=()):
    """The weights after step 2 agree to float noise, measured against the size of one update.

    Adam divides by sqrt(v): a gradient element near zero flips with summation order, so a few
    elements differ by up to lr. The norm of the difference must be < 1% of the norm of the step-2
    update; unsynchronised gradients would give a difference of the order of the update itself.
    """
    # The logged losses are means over the window's micro-batches and over processes: equal in both
    # layouts (step 1 is computed before any update; step 2 after one, equal to float noise).
    logged_a, logged_b = metrics(run_a), metrics(run_b)
    for key in ("train/loss/total", "train/loss/pixel", "train/loss/kl", *extra_keys):
        assert [m[key] for m in logged_a if key in m] == pytest.approx([m[key] for m in logged_b if key in m],
                                                                       rel=1e-5), key
    a, b, b1 = weights(run_a, 2), weights(run_b, 2), weights(run_b, 1)

    def flat(w):
        return torch.cat([w[k].flatten() for k in sorted(w) if k.startswith("vae.")])

    update = (flat(b) - flat(b1)).norm()
    assert update > 0
    assert (flat(a) - flat(b)).norm() < 0.01 * update


# Every X-regulariser on at once: alignment (the tiny DINOv2), EQ-VAE transforms, the
# scale-equivariance term and decoder noise. 32² crops keep every image at least 16 pixels (LPIPS)
# and 12 (a two-layer discriminator); low-resolution steps (LOWRES, down to 0.5x) would make the
# scale term's images 8 pixels, so they run where LPIPS is off.
X_REGULARISERS = ["equivariance.enabled=true", "equivariance.min_scale=0.5", "equivariance.scale_weight=0.5",
                  "equivariance.scale_factors=[2]", "latent_noise.enabled=true", "latent_noise.probability=0.75",
                  "alignment.enabled=true", "discriminator.n_layers=2"]
LOWRES = ["equivariance.lowres_probability=1.0"]  # with seed 0: step 0 transformed, step 1 at low resolution


def test_x_regularisers_resume_exactly_and_ship_the_projection(tmp_path, vgg_file, dinov2_folder):
    x = [*X_REGULARISERS, f"alignment.model={dinov2_folder}"]
    _, straight = run_train(tmp_path, "straight", "train.max_steps=4", *x, vgg_file=vgg_file)
    run_train(tmp_path, "resumed", "train.max_steps=2", *x, vgg_file=vgg_file)
    _, resumed = run_train(tmp_path, "resumed", "train.max_steps=4", *x, vgg_file=vgg_file, resume="latest")
    logged = metrics(straight)
    assert {"train/loss/align_cos", "train/loss/align_distance", "train/loss/scale_eq", "train/latent_noise/level",
            "train/loss/g", "train/loss/lpips"} <= set().union(*logged)
    assert 0 < sum(m.get("train/eq/transformed", 0) for m in logged) < 4  # some steps transformed, some not
    assert train_losses(straight) == train_losses(resumed)
    a, b = weights(straight, 4), weights(resumed, 4)
    assert any(k.startswith("projection.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The projection ships in the fine-tuning bundle, never in the diffusers weights, and the
    # bundle's config starts from it.
    bundle = straight / "export" / "finetune"
    projection = load_file(bundle / "alignment_projection.safetensors")
    assert all(torch.equal(projection[k], a[f"projection.{k}"]) for k in projection)
    assert not any("projection" in k for k in load_file(straight / "export" / EXPORT_WEIGHTS))
    continued = load_config(bundle / "config.yaml")
    assert Path(continued.alignment.projection_init) == (bundle / "alignment_projection.safetensors").resolve()
    # Every term that trained the export is in its checkpoints and its model card, with its weight.
    recorded = json.loads((straight / "checkpoints" / "checkpoint-4" / "loss_terms.json").read_text())
    card = (straight / "export" / "README.md").read_text()
    for start in ("reconstruction: l1 + 1 × LPIPS", "KL to N(0, I), weight 1e-06", "alignment to ",
                  "equivariance (EQ-VAE): 0.5 of the steps", "scale equivariance (arXiv 2502.14831), weight 0.5",
                  "decoder noise (RAE): on 0.75 of the images", "PatchGAN (2 layers"):
        assert any(line.startswith(start) for line in recorded), start
        assert f"  - {start}" in card, start


def test_x_regularisers_two_processes_equal_one_with_double_batch(tmp_path, dinov2_folder):
    # The adaptive alignment weight is per process (like the GAN's): off for this comparison.
    x = [*X_REGULARISERS, *LOWRES, f"alignment.model={dinov2_folder}", "alignment.adaptive=false"]
    _, two = run_train(tmp_path, "two", *EQUIVALENCE, *x, launch=launch_command(2), env=cpu_env())
    _, one = run_train(tmp_path, "one", *EQUIVALENCE, *x, "train.batch_size=4")
    assert_same_training(two, one, extra_keys=("train/loss/align_cos", "train/loss/scale_eq"))
    for run in (two, one):
        assert [(m["train/eq/transformed"], m["train/eq/lowres"]) for m in metrics(run) if "train/eq/lowres" in m] == \
            [(1.0, 0.0), (0.0, 1.0)]


def test_two_processes_equal_one_with_double_batch(tmp_path):
    _, two = run_train(tmp_path, "two", *EQUIVALENCE, launch=launch_command(2), env=cpu_env())
    _, one = run_train(tmp_path, "one", *EQUIVALENCE, "train.batch_size=4")
    assert_same_training(two, one)
    assert (two / LOCK_FILE).read_text() == (one / LOCK_FILE).read_text() == ""  # released (os._exit or not)


def test_accumulation_equals_larger_batch(tmp_path):
    _, accum = run_train(tmp_path, "accum", *EQUIVALENCE, "train.batch_size=2", "train.grad_accum=2")
    _, big = run_train(tmp_path, "big", *EQUIVALENCE, "train.batch_size=4")
    assert_same_training(accum, big)


def write_fault_folder(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"good{i}.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / "tiny.png")
    (folder / "corrupt.jpg").write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / "truncated.jpg")
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])


def test_corrupt_and_tiny_images_are_counted(tmp_path):
    write_fault_folder(tmp_path / "images")
    folder = ["data.source=imagefolder", f"data.path={tmp_path / 'images'}", "data.split=train"]
    _, run = run_train(tmp_path, "faults", *folder, "train.max_steps=6", "discriminator.enabled=false",
                       "train.batch_size=7", "val_data.source=sample", "val_data.split=validation")
    last = metrics(run)
    counts = [m for m in last if "data/skipped_images" in m][-1]
    # 6 steps over 7 files per epoch: every epoch sees the 2 bad files once and the tiny one once.
    assert counts["data/skipped_images"] == 2 * 6
    assert counts["data/upsized_images"] == 6


def test_nonfinite_loss_is_skipped(tmp_path):
    common = ["train.max_steps=4", "discriminator.enabled=false", "train.checkpoint_every=1"]
    _, run = run_train(tmp_path, "nan", *common, env={"FIRST_STAGE_INJECT_NONFINITE": "2"})
    logged = [m for m in metrics(run) if "train/skipped_steps" in m]
    assert logged[-1]["train/skipped_steps"] == 1
    before, after = weights(run, 2), weights(run, 3)  # the step at index 2 made no update
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, weights(run, 4)[k]) for k, a in after.items())


def test_too_many_nonfinite_stops_with_checkpoint(tmp_path):
    proc, run = run_train(tmp_path, "nan_stop", "train.max_steps=10", "discriminator.enabled=false",
                          "train.max_nonfinite=2", env={"FIRST_STAGE_INJECT_NONFINITE": "1,2,3"}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "last finite step was 0" in proc.stdout + proc.stderr
    assert (run / "checkpoints" / "checkpoint-3").is_dir()
    assert status(run)["state"] == "nonfinite" and status(run)["exit_code"] == 2 and status(run)["step"] == 3
    assert "last finite step was 0" in status(run)["reason"]


def test_e2e_watchdog_stops_when_the_gradients_vanish(tmp_path):
    """Steps whose loss is multiplied by 0 (FIRST_STAGE_INJECT_ZERO) have no gradient: after
    train.max_vanishing_steps of them in a row the run stops with a checkpoint, exit status 3 and status.json's
    state "vanished", naming the watchdog's key; a step with gradients in between resets the count."""
    proc, run = run_train(tmp_path, "zero", "train.max_steps=10", "discriminator.enabled=false",
                          "train.max_vanishing_steps=2", env={"FIRST_STAGE_INJECT_ZERO": "1,3,4,5"}, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert (run / "checkpoints" / "checkpoint-5").is_dir()
    assert status(run)["state"] == "vanished" and status(run)["exit_code"] == 3 and status(run)["step"] == 5
    assert "train.vanishing_grad_norm" in status(run)["reason"]
    norms = {m["step"]: m["train/grad_norm"] for m in metrics(run) if "train/grad_norm" in m}
    assert norms[2] == 0 and norms[4] == norms[5] == 0 and norms[1] > 0 and norms[3] > 0


# End-to-end tuning (REPA-E) at test size: a 2-block transformer, REPA at block 1, the tiny DINOv2.
E2E = ["e2e.enabled=true", "e2e.transformer=tiny", "e2e.encoder_depth=1", "e2e.projector_dim=16",
       "export.latent_norm=per_channel"]
E2E_FILES = ("e2e_transformer.pt", "e2e_ema.pt", "e2e_optimizer.pt", "e2e_scaler.pt")


def e2e_states(run_dir, step) -> dict:
    return {name: torch.load(run_dir / "checkpoints" / f"checkpoint-{step}" / name, weights_only=True)
            for name in E2E_FILES}


def flat_transformer(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().float() for k, v in sorted(state.items()) if not k.startswith("bn.")])


def test_e2e_exact_resume(tmp_path, dinov2_folder):
    """An e2e run resumed mid-way equals the straight one bit for bit: the VAE, the discriminator, the transformer,
    its EMA (BatchNorm buffers included), its optimiser and scaler, and every logged loss."""
    e2e = [*E2E, f"e2e.model={dinov2_folder}"]
    _, straight = run_train(tmp_path, "straight", "train.max_steps=4", *e2e)
    run_train(tmp_path, "resumed", "train.max_steps=2", *e2e)
    _, resumed = run_train(tmp_path, "resumed", "train.max_steps=4", *e2e, resume="latest")
    keys = ("train/loss/total", "train/e2e/vae_align", "train/e2e/denoise", "train/e2e/proj", "train/e2e_grad_norm")
    for key in keys:
        a = {m["step"]: m[key] for m in metrics(straight) if key in m}
        assert a == {m["step"]: m[key] for m in metrics(resumed) if key in m} and sorted(a) == [1, 2, 3, 4], key
    assert_same_checkpoint(straight, resumed, 4)
    a, b = e2e_states(straight, 4), e2e_states(resumed, 4)
    for name in E2E_FILES:  # bit for bit: weights, BatchNorm buffers, optimiser moments, scaler
        assert identical(a[name], b[name]), name
    assert int(a["e2e_ema.pt"]["bn.num_batches_tracked"]) == 4


def test_e2e_two_processes_equal_one_with_double_batch(tmp_path, dinov2_folder):
    """Two processes of 2 images train the VAE and the transformer as one process of 4: the latent BatchNorm's
    statistics are summed over processes (SyncBN), so its running statistics agree too."""
    e2e = [*EQUIVALENCE, *E2E, f"e2e.model={dinov2_folder}"]
    _, two = run_train(tmp_path, "two", *e2e, launch=launch_command(2), env=cpu_env())
    _, one = run_train(tmp_path, "one", *e2e, "train.batch_size=4")
    assert_same_training(two, one, extra_keys=("train/e2e/vae_align", "train/e2e/denoise", "train/e2e/proj"))
    a, b, b1 = (e2e_states(r, s)["e2e_transformer.pt"] for r, s in ((two, 2), (one, 2), (one, 1)))
    update = (flat_transformer(b) - flat_transformer(b1)).norm()
    assert update > 0 and (flat_transformer(a) - flat_transformer(b)).norm() < 0.01 * update
    for key in ("bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_e2e_watchdog_names_the_transformer(tmp_path, dinov2_folder):
    """With the losses multiplied by 0, both the VAE's and the transformer's gradient norms vanish: the run stops
    with exit status 3 and a reason naming both."""
    proc, run = run_train(tmp_path, "zero", "train.max_steps=6", "discriminator.enabled=false", *E2E,
                          f"e2e.model={dinov2_folder}", "train.max_vanishing_steps=2",
                          env={"FIRST_STAGE_INJECT_ZERO": "0,1"}, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert status(run)["state"] == "vanished" and status(run)["step"] == 2
    assert "the e2e transformer's gradient norm" in status(run)["reason"] and "the VAE's" in status(run)["reason"]


def test_sigterm_saves_resumable_checkpoint(tmp_path):
    proc = start_train(tmp_path, "preempt", "train.checkpoint_every=100000")
    run = tmp_path / "preempt"
    try:
        wait_until(lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 3, proc, "3 logged steps",
                   tmp_path / "preempt.log")
        kill_group(proc, signal.SIGTERM)
        proc.wait(timeout=1800)
    finally:
        kill_group(proc)
    out = (tmp_path / "preempt.log").read_text()
    assert proc.returncode == 143, out[-2000:]
    (ckpt,) = (run / "checkpoints").iterdir()
    step = int(ckpt.name.split("-")[1])
    assert step >= 2 and json.loads((ckpt / TRAINING_STATE).read_text())["step"] == step
    assert status(run)["state"] == "stopped" and status(run)["exit_code"] == 143
    assert status(run)["last_checkpoint"] == str(ckpt) and status(run)["reason"].startswith("SIGTERM")
    resumed, _ = run_train(tmp_path, "preempt", f"train.max_steps={step + 1}", "discriminator.enabled=false",
                           resume="latest")
    assert f"resumed from {ckpt}" in resumed.stdout + resumed.stderr
    # A corrupt file in the newest checkpoint: the run refuses to start and names it (no traceback).
    ckpt = checkpoint_dirs(run / "checkpoints")[-1]
    good = (ckpt / TRAINER_STATES["ema"]).read_bytes()
    (ckpt / TRAINER_STATES["ema"]).write_bytes(good[:100])
    refused, _ = run_train(tmp_path, "preempt", f"train.max_steps={step + 2}", "discriminator.enabled=false",
                           resume="latest", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"error: {ckpt / TRAINER_STATES['ema']}: refused" in refused.stderr


def test_sigterm_to_a_single_process_launcher_stops_the_trainer_with_a_checkpoint(tmp_path):
    """`accelerate launch` with one process does not forward SIGTERM: the trainer must not train on."""
    launcher = start_train(tmp_path, "orphan", "train.checkpoint_every=100000", launch=launch_command(1))
    run = tmp_path / "orphan"
    try:
        wait_until(lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 3, launcher, "3 logged steps",
                   tmp_path / "orphan.log")
        launcher.send_signal(signal.SIGTERM)  # the launcher alone, as a scheduler or `kill PID` does
        launcher.wait(timeout=1800)
        # The trainer outlives its launcher by the time it takes to save its checkpoint.
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not (run / STATUS_FILE).exists():
            time.sleep(0.2)
        assert status(run)["state"] == "stopped" and status(run)["exit_code"] == 143
        (ckpt,) = (run / "checkpoints").iterdir()
        assert status(run)["last_checkpoint"] == str(ckpt)
    finally:
        kill_group(launcher)  # the trainer, were it still there, is in the launcher's process group


def test_empty_batches_skip_the_step(tmp_path):
    folder = tmp_path / "images"
    write_fault_folder(folder)
    (folder / "tiny.png").unlink()
    for i in range(2, 4):
        (folder / f"good{i}.png").unlink()
    # 2 good and 2 bad files, batch 1: each bad file is an empty batch, whose step is skipped.
    _, run = run_train(tmp_path, "empty", "data.source=imagefolder", f"data.path={folder}", "train.max_steps=8",
                       "train.batch_size=1", "discriminator.enabled=false", "val_data.source=sample",
                       "val_data.split=validation", "train.checkpoint_every=8")
    last = [m for m in metrics(run) if "train/skipped_steps" in m][-1]
    assert last["data/skipped_images"] == 4 and last["train/skipped_steps"] == 4
    # The four steps that did train reach the export: it holds the last checkpoint's EMA weights.
    exported = AutoencoderKL.from_pretrained(run / "export").state_dict()
    ema = load_vae(run / "checkpoints" / "checkpoint-8").vae.state_dict()
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], v) for k, v in ema.items())


def test_streaming_data_trains(tmp_path):
    _, run = run_train(tmp_path, "stream", "data.streaming=true", "train.max_steps=3", "discriminator.enabled=false")
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and (run / "export" / "config.json").is_file()


def test_performance_switches_train_the_same(tmp_path):
    # Gradient checkpointing, channels_last and the fused optimiser change how, not what, is computed.
    switches = ["performance.gradient_checkpointing=true", "performance.channels_last=true",
                "performance.fused_optimizer=true"]
    _, fast = run_train(tmp_path, "fast", *EQUIVALENCE, *switches)
    _, plain = run_train(tmp_path, "plain", *EQUIVALENCE)
    assert_same_training(fast, plain)
    assert set(load_file(fast / "export" / EXPORT_WEIGHTS)) == \
        set(load_file(plain / "export" / EXPORT_WEIGHTS))


def test_data_where_nothing_decodes_stops_before_the_first_step(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"bad{i}.jpg").write_bytes(np.random.default_rng(i).integers(0, 255, 300, dtype=np.uint8).tobytes())
    proc, run = run_train(tmp_path, "undecodable", "data.source=imagefolder", f"data.path={folder}",
                          "train.max_steps=4", "discriminator.enabled=false", "val_data.source=sample",
                          "val_data.split=validation", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no image decodes" in proc.stderr and "tried 3 of its 3 files" in proc.stderr
    assert not (run / "checkpoints").exists()
    assert status(run)["state"] == "failed" and "no image decodes" in status(run)["reason"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no one can write: a read-only tmpfs for root (root ignores permission bits), else mode 555."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("running as root without the right to mount a read-only tmpfs: no read-only folder to try")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_unusable_output_folder_and_too_few_images_are_named_before_training(tmp_path, read_only_folder):
    proc, _ = run_train(read_only_folder, "run", "train.max_steps=2", "discriminator.enabled=false", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: train.output_dir: cannot write the run folder {read_only_folder / 'run'}" in proc.stderr
    # The sample pictures' train split has 7 images: no full batch of 16 (incomplete batches are dropped).
    proc, run = run_train(tmp_path, "big_batch", "train.batch_size=16", "train.max_steps=2",
                          "discriminator.enabled=false", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "its 7 images make no full batch of 16 on each of 1 process(es)" in proc.stderr
    assert status(run)["state"] == "failed"



def test_missing_lpips_or_dinov2_weights_are_one_error_line(tmp_path, dinov2_folder):
    """Both errors are FileNotFoundErrors without an errno: still one ``error:`` line, no traceback."""
    absent = tmp_path / "absent" / "vgg16-397923af.pth"
    proc, _ = run_train(tmp_path, "no_vgg", "train.max_steps=2", vgg_file=absent, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: " in proc.stderr and str(absent) in proc.stderr
    proc, _ = run_train(tmp_path, "no_dinov2", "train.max_steps=2", "alignment.enabled=true",
                        f"alignment.model={tmp_path / 'no_dinov2_here'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: " in proc.stderr and str(tmp_path / "no_dinov2_here") in proc.stderr


def test_second_trainer_of_a_live_run_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path):
    first = start_train(tmp_path, "shared", "train.checkpoint_every=2")
    run = tmp_path / "shared"
    try:
        wait_until(lambda: checkpoint_dirs(run / "checkpoints"), first, "a checkpoint", tmp_path / "shared.log")
        before = {name: (run / name).read_bytes() for name in (CONFIG_FILE, LOCK_FILE)}
        assert json.loads(before[LOCK_FILE])["pid"] == first.pid
        second, _ = run_train(tmp_path, "shared", "train.max_steps=100000", "discriminator.enabled=false",
                              resume="latest", check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"is in use by a live trainer (pid {first.pid} on host" in second.stderr
        assert {name: (run / name).read_bytes() for name in before} == before
        assert not (run / STATUS_FILE).exists() and first.poll() is None  # the first trains on, undisturbed
        # The same refusal from a two-process run: both processes leave, none trains alone.
        second, _ = run_train(tmp_path, "shared", "train.max_steps=100000", "discriminator.enabled=false",
                              launch=launch_command(2), env=cpu_env(), resume="latest", check=False)
        assert second.returncode != 0 and f"in use by a live trainer (pid {first.pid}" in second.stderr
        assert {name: (run / name).read_bytes() for name in before} == before
    finally:
        kill_group(first)  # SIGKILL: no handler runs, the lock is left to the kernel
    first.wait(timeout=1800)
    step = checkpoint_step(checkpoint_dirs(run / "checkpoints")[-1])
    third, _ = run_train(tmp_path, "shared", f"train.max_steps={step + 1}", "discriminator.enabled=false",
                         resume="latest")
    assert f"taking over the lock of {run} left by a trainer that ended without releasing it (pid {first.pid}" \
        in third.stderr
    assert status(run)["state"] == "finished" and (run / LOCK_FILE).read_text() == ""  # released cleanly


def test_discriminator_pretraining_resumes_exactly_and_ships_the_discriminator(tmp_path):
    """discriminator.pretrain_steps through train.py: the checkpoint at the end of the pre-training holds the
    initial VAE bit for bit and a trained discriminator; a run resumed inside the pre-training ends equal to one
    run straight; the export ships the discriminator in its fine-tuning bundle and its card says so."""
    common = ["discriminator.start=0", "discriminator.pretrain_steps=2", "train.checkpoint_every=1"]
    _, straight = run_train(tmp_path, "straight", *common, "train.max_steps=3")
    run_train(tmp_path, "resumed", *common, "train.max_steps=1")
    _, resumed = run_train(tmp_path, "resumed", *common, "train.max_steps=3", resume="latest")
    assert_same_checkpoint(straight, resumed, 3)
    first, pretrained, tuned = (weights(straight, step) for step in (1, 2, 3))
    assert all(torch.equal(first[k], pretrained[k]) for k in first if k.startswith("vae."))
    assert not all(torch.equal(first[k], tuned[k]) for k in first if k.startswith("vae."))
    discs = [load_file(straight / "checkpoints" / f"checkpoint-{s}" / DISCRIMINATOR_WEIGHTS) for s in (1, 2)]
    assert not all(torch.equal(discs[0][k], discs[1][k]) for k in discs[0])
    assert (straight / "export" / "finetune" / "discriminator.safetensors").is_file()
    assert "the discriminator alone, against the frozen VAE" in (straight / "export" / "README.md").read_text()


def test_taesd_distillation_recipe_resumes_exactly_and_exports(tmp_path):
    """configs/taesd_distill.yaml through train.py at tiny size (a taesd-tiny student of a saved tiny teacher, the
    GAN on from step 2): a run resumed mid-way ends bit for bit equal to one run straight, the checkpoint holds the
    student only, and scripts/export.py writes an AutoencoderTiny folder that diffusers loads, with the decode cost
    against the teacher's."""
    torch.manual_seed(0)
    teacher = build_autoencoder(ModelConfig(preset="tiny"))
    teacher.register_to_config(scaling_factor=0.5)
    teacher.save_pretrained(tmp_path / "teacher")
    recipe = REPO / "configs" / "taesd_distill.yaml"
    common = [f"teacher.path={tmp_path / 'teacher'}", "model.preset=taesd-tiny", "model.overrides={}",
              "data.source=sample", "data.path=null", "data.resize=null", "data.num_workers=0", "data.pin_memory=false",
              "train.mixed_precision=no", "train.ema_decay=0.9", "optimizer.warmup_steps=0"]
    _, straight = run_train(tmp_path, "straight", *common, "train.max_steps=4", config=recipe)
    run_train(tmp_path, "resumed", *common, "train.max_steps=2", config=recipe)
    _, resumed = run_train(tmp_path, "resumed", *common, "train.max_steps=4", config=recipe,
                           resume="latest")
    assert_same_checkpoint(straight, resumed, 4)
    assert all(key.startswith(("vae.encoder.", "vae.decoder.", "logvar")) for key in weights(straight, 4))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), str(straight), "--out",
                           str(tmp_path / "exported")], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "decoder against the teacher's" in proc.stdout
    from diffusers import AutoencoderTiny
    assert AutoencoderTiny.from_pretrained(tmp_path / "exported").config.scaling_factor == 1.0
