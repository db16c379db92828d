"""The library's training step, in process, on a tiny model: the generator/discriminator
alternation, the skip on a non-finite loss, the learning-rate schedule, and resuming safely."""

import copy
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import identical, training_accelerator
from first_stage.checkpoint import (AUTOENCODER_WEIGHTS, CONFIG_FILE, TRAINER_STATES,
                                    TRAINING_STATE, CheckpointError, check_checkpoint, legacy_state_files,
                                    save_checkpoint)
from first_stage.config import ConfigError, changed_since, load_config, to_dict, with_overrides
from first_stage.losses import discriminator_step_loss
from first_stage.trainer import (TrainingState, build_parts, lr_factor, micro_step,
                                 note_layout, posterior_noise, restore, run_files, train_step, trainer_states)

TINY = ["data.resolution=32", "train.batch_size=2", "loss.perceptual_weight=0", "discriminator.enabled=true",
        "discriminator.start=0", "discriminator.channels=16", "optimizer.warmup_steps=4"]


@pytest.fixture
def parts_and_accelerator():
    """Training parts of the tiny config on a one-process CPU Accelerator (reset afterwards)."""
    config = load_config(None, TINY)
    with training_accelerator(config) as accelerator:
        torch.manual_seed(0)
        yield config, build_parts(config, accelerator), accelerator


def grads(params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def test_generator_backward_freezes_the_discriminator_and_its_step_detaches(parts_and_accelerator, images):
    """micro_step's gradients equal the two passes written out: the generator loss with the
    discriminator frozen (its gradients reach the autoencoder only), and the discriminator loss on
    detached images (its gradients reach the discriminator only). Unfrozen, the discriminator would
    also collect the generator's adversarial gradient; undetached, the autoencoder would collect the
    discriminator's."""
    config, parts, accelerator = parts_and_accelerator
    model, disc = parts.raw_model, parts.raw_discriminator
    ae_params = [p for p in model.parameters() if p.requires_grad]
    noise = posterior_noise(0, 0, 0, accelerator, 2, 2, parts.latent_shape(32))
    assert all(p.requires_grad for p in disc.parameters())  # as built: micro_step must freeze it itself

    out = model(images, noise)
    reconstruction = out.reconstruction
    disc.requires_grad_(False)
    loss, _ = parts.loss_fn(out, 0, disc, model.last_layer())
    assert "train/loss/g" in _  # the adversarial term is in the generator loss
    expected_ae = torch.autograd.grad(loss, ae_params)
    disc.requires_grad_(True)
    d_loss, _ = discriminator_step_loss(disc, images, reconstruction.detach(), config.discriminator.loss)
    expected_disc = torch.autograd.grad(d_loss, list(disc.parameters()))

    finite, logs = micro_step(accelerator, parts, images, noise, 0, config)
    assert finite and "train/loss/disc" in logs
    for got, want in zip(grads(ae_params), expected_ae):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads(disc.parameters()), expected_disc):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_train_step_follows_the_lr_schedule_and_skips_nonfinite(parts_and_accelerator, images):
    config, parts, accelerator = parts_and_accelerator
    state = TrainingState()
    batches = iter([{"pixel_values": images, "skipped": 0, "upsized": 1}] * 3)
    before = [p.detach().clone() for p in parts.raw_model.parameters()]
    train_step(accelerator, parts, config, state, batches)
    assert state.step == 1 and state.skipped_steps == 0 and state.upsized_images == 1
    factor = lr_factor(0, config.optimizer, 1000)
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(config.optimizer.lr * factor)
    assert parts.disc_optimizer.param_groups[0]["lr"] == pytest.approx(parts.disc_lr * factor)
    trained = [p.detach().clone() for p in parts.raw_model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, trained))
    shadow = [s.clone() for s in parts.ema.shadow_params]
    everything = {name: copy.deepcopy(getattr(parts, name).state_dict())  # weights, BatchNorm statistics, optimisers
                  for name in ("raw_model", "raw_discriminator", "optimizer", "disc_optimizer", "disc_scaler")}

    train_step(accelerator, parts, config, state, batches, inject="nonfinite")
    for name, before_skip in everything.items():
        assert identical(getattr(parts, name).state_dict(), before_skip), name  # a skipped step changes nothing
    assert state.step == 2 and state.skipped_steps == 1 and state.consecutive_nonfinite == 1
    assert state.last_finite_step == 0
    assert all(torch.equal(a, p) for a, p in zip(trained, parts.raw_model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(shadow, parts.ema.shadow_params))
    assert all(p.grad is None for p in parts.raw_model.parameters())

    train_step(accelerator, parts, config, state, batches)
    assert state.consecutive_nonfinite == 0 and state.last_finite_step == 2
    factor = lr_factor(2, config.optimizer, 1000)
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(config.optimizer.lr * factor)


def test_discriminator_pretraining_leaves_the_vae_bit_for_bit(images):
    """discriminator.pretrain_steps: for a VAE released without a discriminator, the first steps train the
    discriminator alone against the frozen VAE's reconstructions. Weights, buffers, EMA and optimiser state
    of the VAE stay bit for bit; then the fine-tune starts with the schedule counted from there."""
    config = load_config(None, TINY + ["discriminator.pretrain_steps=2", "train.max_steps=10"])
    with training_accelerator(config) as accelerator:
        torch.manual_seed(0)
        parts = build_parts(config, accelerator)
        vae = {name: copy.deepcopy(getattr(parts, name).state_dict()) for name in ("raw_model", "optimizer", "ema")}
        disc = copy.deepcopy(parts.raw_discriminator.state_dict())
        state, batches = TrainingState(), iter([{"pixel_values": images, "skipped": 0, "upsized": 0}] * 3)
        for _ in range(2):
            logs = train_step(accelerator, parts, config, state, batches)
            assert "train/loss/disc" in logs and "train/loss/nll" not in logs and state.skipped_steps == 0
        for name, before in vae.items():
            assert identical(getattr(parts, name).state_dict(), before), name
        assert not identical(parts.raw_discriminator.state_dict(), disc)
        assert parts.disc_optimizer.param_groups[0]["lr"] == parts.disc_lr  # constant during the pre-training
        logs = train_step(accelerator, parts, config, state, batches)  # step 2: the fine-tune's first
        assert "train/loss/nll" in logs and "train/loss/g" in logs
        assert not identical(parts.raw_model.state_dict(), vae["raw_model"])
        factor = lr_factor(0, config.optimizer, 8)  # the warm-up starts after the pre-training
        assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(config.optimizer.lr * factor)
        assert "steps 0-1: the discriminator alone" in parts.loss_fn.card_lines()[-1]
    for wrong in (["discriminator.start=5"], ["discriminator.enabled=false"]):
        with pytest.raises(ConfigError, match="discriminator.enabled=true and discriminator.start=0"):
            load_config(None, TINY + ["discriminator.pretrain_steps=2", *wrong])


class RunsCode:
    """A pickle that runs a command when it is loaded with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def trained_checkpoint(parts, config, accelerator, images, root: Path) -> Path:
    """A real checkpoint of one training step, as train/train.py writes it."""
    state = TrainingState()
    train_step(accelerator, parts, config, state, iter([{"pixel_values": images, "skipped": 0, "upsized": 0}]))
    files = {**run_files(config, parts), TRAINING_STATE: json.dumps(state.state_dict())}
    return save_checkpoint(accelerator, root, state.step, files, 0, trainer_states(parts))


def test_a_checkpoint_saved_before_the_anchors_defaults_is_resumed_with_how_to_keep_its_objective(
        parts_and_accelerator, images, tmp_path, capsys):
    config, parts, accelerator = parts_and_accelerator
    ckpt = trained_checkpoint(parts, config, accelerator, images, tmp_path / "run" / "checkpoints")
    saved = to_dict(config)
    for key in ("antialias", "lowres_half"):  # the keys a config of first-stage 0.2 lacks
        del saved["equivariance"][key]
    (ckpt / CONFIG_FILE).write_text(yaml.safe_dump(saved))
    eq = with_overrides(config, ["equivariance.enabled=true"])
    assert changed_since(saved, config) == []  # equivariance off: nothing it trained with changes
    assert changed_since(saved, eq) == ["equivariance.antialias=true", "equivariance.lowres_half=true"]
    assert restore(accelerator, parts, ckpt, eq).step == 1
    assert ("trained before equivariance.antialias, equivariance.lowres_half existed; this config switches what it "
            "trained with. To keep it, resume with --set equivariance.antialias=true --set equivariance.lowres_half"
            "=true") in capsys.readouterr().out
    kept = with_overrides(eq, ["equivariance.antialias=true", "equivariance.lowres_half=true"])
    assert changed_since(saved, kept) == [] and changed_since(to_dict(eq), eq) == []


def test_resume_refuses_any_file_that_would_run_code(parts_and_accelerator, images, tmp_path):
    """Each file of a checkpoint replaced, one at a time, by a pickle that runs a command: restore
    refuses it, naming the file, before anything is restored, and the command never runs."""
    config, parts, accelerator = parts_and_accelerator
    good = trained_checkpoint(parts, config, accelerator, images, tmp_path / "run" / "checkpoints")
    names = sorted(p.name for p in good.iterdir())
    states = {v for k, v in TRAINER_STATES.items() if "transformer" not in k}  # e2e's are in the e2e tests
    assert {*states, AUTOENCODER_WEIGHTS, "optimizer.bin", "random_states_0.pkl"} <= set(names)
    assert restore(accelerator, parts, good).step == 1
    marker = tmp_path / "code-ran"
    for name in names:
        bad = tmp_path / f"bad-{name}" / good.name
        shutil.copytree(good, bad)
        with open(bad / name, "wb") as f:
            pickle.dump(RunsCode(marker), f)
        with pytest.raises(CheckpointError, match=re.escape(str(bad / name))):
            restore(accelerator, parts, bad)
        assert not marker.exists(), name


def test_resume_reads_checkpoints_of_the_previous_layout(parts_and_accelerator, images, tmp_path):
    """first-stage 0.1 kept EMA and the discriminator's optimiser and scaler in Accelerate's
    custom_checkpoint_<i>.pkl files: they resume the same, read with weights_only=True."""
    config, parts, accelerator = parts_and_accelerator
    new = trained_checkpoint(parts, config, accelerator, images, tmp_path / "new" / "checkpoints")
    old = tmp_path / "old" / new.name
    shutil.copytree(new, old)
    for name, legacy in legacy_state_files(discriminator=True).items():
        (old / TRAINER_STATES[name]).rename(old / legacy)
    shadow = [s.clone() for s in parts.ema.shadow_params]
    for s in parts.ema.shadow_params:
        s.zero_()
    assert restore(accelerator, parts, old).step == 1
    assert all(torch.equal(a, b) for a, b in zip(shadow, parts.ema.shadow_params))
    with open(old / legacy_state_files(discriminator=True)["ema"], "wb") as f:
        pickle.dump(RunsCode(tmp_path / "code-ran"), f)
    with pytest.raises(CheckpointError, match="custom_checkpoint_2.pkl"):
        restore(accelerator, parts, old)
    assert not (tmp_path / "code-ran").exists()


def test_truncated_weights_name_the_file_and_the_way_back(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        save_file({"w": torch.zeros(64)}, root / f"checkpoint-{step}" / AUTOENCODER_WEIGHTS)
    data = (root / "checkpoint-4" / AUTOENCODER_WEIGHTS).read_bytes()
    (root / "checkpoint-4" / AUTOENCODER_WEIGHTS).write_bytes(data[: len(data) // 2])
    check_checkpoint(root / "checkpoint-2")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file.*"
                                              r"--resume latest then takes checkpoint-2"):
        check_checkpoint(root / "checkpoint-4")


def test_resume_under_another_thread_count_warns(parts_and_accelerator, capsys):
    _, _, accelerator = parts_and_accelerator
    state = TrainingState()
    note_layout(accelerator, state)  # a new run records its layout, silently
    assert state.threads == torch.get_num_threads() and state.world_size == 1
    assert "warning" not in capsys.readouterr().out
    saved = TrainingState()
    saved.load_state_dict({**state.state_dict(), "threads": state.threads + 3})
    note_layout(accelerator, saved)
    out = capsys.readouterr().out
    assert f"threads {state.threads + 3} (now {state.threads})" in out and "not bit for bit" in out
    assert saved.threads == state.threads


def test_full_disk_during_a_save_names_the_cause_and_the_intact_checkpoint(parts_and_accelerator, images, tmp_path,
                                                                            monkeypatch):
    config, parts, accelerator = parts_and_accelerator
    intact = trained_checkpoint(parts, config, accelerator, images, tmp_path)
    import first_stage.checkpoint as checkpoint

    def disk_fills(obj, file, *args, **kwargs):  # what torch.save does when the disk fills mid-file
        Path(file).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", disk_fills)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0))
    with pytest.raises(CheckpointError, match=rf"(?s)checkpoint-2: no space left on the device.*"
                                              rf"newest intact checkpoint is {re.escape(str(intact))}"):
        save_checkpoint(accelerator, tmp_path, 2, {TRAINING_STATE: "{}"}, 0, trainer_states(parts))
    assert [p.name for p in tmp_path.iterdir()] == [intact.name]  # the partial files are gone
    check_checkpoint(intact)


def test_e2e_watchdog_counts_steps_without_gradient(parts_and_accelerator, images):
    """A step whose loss is multiplied by 0 logs a gradient norm of 0 and counts towards the watchdog; a step with
    gradients logs their norm (unscaled, before clipping) and resets the count."""
    config, parts, accelerator = parts_and_accelerator
    state = TrainingState()
    batch = {"pixel_values": images, "skipped": 0, "upsized": 0}
    logs = train_step(accelerator, parts, config, state, iter([batch]), inject="zero")
    assert logs["train/grad_norm"] == 0 and state.consecutive_vanishing == 1 and state.skipped_steps == 0
    logs = train_step(accelerator, parts, config, state, iter([batch]))
    assert logs["train/grad_norm"] > 0 and state.consecutive_vanishing == 0
