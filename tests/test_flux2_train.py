"""Subprocess runs of train/train.py with the FLUX.2 class (preset flux2-tiny, diffusers' AutoencoderKLFlux2):
a decoder-only fine-tune of a released FLUX.2 VAE keeps its encoder and BatchNorm bit for bit, one that moves
the encoder re-measures the BatchNorm, exact resume, two processes equal to one, and resumes into another
architecture refused. 32² crops, a few steps each, LPIPS off; nothing is downloaded."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from safetensors.torch import load_file, save_file

from first_stage.checkpoint import (CONFIG_FILE, ENCODER_ORIGIN, EXPORT_REPORT, EXPORT_WEIGHTS,
                                    checkpoint_dirs)
from first_stage.config import ModelConfig
from first_stage.convert import BFL_FILE_NAME, to_bfl_state_dict
from first_stage.model import encoder_fingerprint, new_autoencoder

from conftest import cpu_env, launch_command
from test_train import EQUIVALENCE, assert_same_checkpoint, assert_same_training, run_train, train_losses, weights

pytestmark = pytest.mark.slow

FLUX2 = ["model.preset=flux2-tiny"]
NO_GAN = ["discriminator.enabled=false"]  # the GAN runs in the exact-resume test only: the rest stay short
# What fixes the latents of a FLUX.2-class VAE: first_stage.model.encoder_fingerprint hashes these.
LATENT_SIDE = ("encoder.", "quant_conv.", "bn.")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A "released" FLUX.2 VAE: flux2-tiny with weights off the preset's initialisation and BatchNorm statistics
    nobody would measure by chance, saved as a diffusers folder and in BFL's layout (``ae.safetensors``).
    Returns ({"diffusers": folder, "bfl": file}, the VAE)."""
    out = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    vae = new_autoencoder(ModelConfig(preset="flux2-tiny"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g))  # (4 * latent_channels,)
        vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(vae.bn.running_var.shape, generator=g))  # in [0.5, 2]
        vae.bn.num_batches_tracked.fill_(1000)  # as a BatchNorm that ran in training mode keeps it
    vae.save_pretrained(out / "diffusers")
    save_file({k: v.contiguous() for k, v in to_bfl_state_dict(vae).items()}, out / BFL_FILE_NAME)
    return {"diffusers": out / "diffusers", "bfl": out / BFL_FILE_NAME}, vae.eval()


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory, released):
    """A 2-step fine-tune of the released BFL file that trains everything (the encoder moves); its run folder."""
    sources, _ = released
    _, run = run_train(tmp_path_factory.mktemp("moved"), "moved", *FLUX2, *NO_GAN, "train.max_steps=2",
                       f"model.init_from={sources['bfl']}")
    return run


def exported_state(run) -> dict[str, torch.Tensor]:
    """The run's export read back as users do."""
    return AutoencoderKLFlux2.from_pretrained(run / "export").state_dict()


def report(run) -> dict:
    return json.loads((run / "export" / EXPORT_REPORT).read_text())


def copied_run(run, tmp_path, name):
    """A copy of ``run`` under ``tmp_path``/``name``, so a test resumes it without touching the shared run."""
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_decoder_finetune_keeps_the_released_encoder_and_batch_norm(tmp_path, released, layout):
    sources, vae = released
    source, state = sources[layout], vae.state_dict()
    _, run = run_train(tmp_path, "decoder", *FLUX2, *NO_GAN, "train.max_steps=2", f"model.init_from={source}",
                       "model.trainable=decoder")
    # Every checkpoint records where the encoder came from and its fingerprint then: the released VAE's.
    for ckpt in checkpoint_dirs(run / "checkpoints"):
        assert json.loads((ckpt / ENCODER_ORIGIN).read_text()) == \
            {"source": str(source), "fingerprint": encoder_fingerprint(vae)}
    exported = exported_state(run)
    assert exported.keys() == state.keys()
    kept = [k for k in state if k.startswith(LATENT_SIDE)]
    assert {"bn.running_mean", "bn.running_var"} <= set(kept)
    for key in kept:
        assert torch.equal(exported[key], state[key]), key
    assert any(not torch.equal(exported[k], v) for k, v in state.items() if k.startswith("decoder."))
    bn = report(run)["batch_norm"]
    assert bn["origin"].startswith(f"kept from {source}") and bn["kept"] is True
    assert f"so the latents are those of {source}" in (run / "export" / "README.md").read_text()
    # BFL's file holds the same encoder, quant_conv and BatchNorm, bit for bit, under BFL's names.
    bfl, released_bfl = load_file(run / "export" / BFL_FILE_NAME), to_bfl_state_dict(vae)
    for key in [k for k in released_bfl if k.startswith(("encoder.", "bn."))]:
        assert torch.equal(bfl[key], released_bfl[key]), key
    for key in ("bn.running_mean", "bn.running_var"):
        assert torch.equal(bfl[key], state[key]), key


def test_finetune_that_moves_the_encoder_re_measures_the_batch_norm(released, moved_run):
    sources, vae = released
    source, state = sources["bfl"], vae.state_dict()
    exported = exported_state(moved_run)
    assert any(not torch.equal(exported[k], v) for k, v in state.items() if k.startswith("encoder."))
    for key in ("bn.running_mean", "bn.running_var"):
        assert not torch.equal(exported[key], state[key]), key
    bn = report(moved_run)["batch_norm"]
    assert bn["origin"].startswith("re-measured at export") and bn["kept"] is False
    assert f"the latents of this VAE are NOT those of {source}" in bn["origin"]
    assert f"the latents of this VAE are NOT those of {source}" in (moved_run / "export" / "README.md").read_text()
    # Both files carry the statistics the report gives (float32, the same values).
    bfl = load_file(moved_run / "export" / BFL_FILE_NAME)
    for key, name in (("bn.running_mean", "running_mean"), ("bn.running_var", "running_var")):
        assert torch.equal(bfl[key], exported[key]), key
        assert torch.equal(exported[key], torch.tensor(bn[name], dtype=torch.float32)), key


def test_exact_resume(tmp_path, released):
    sources, vae = released
    # Everything trains, the GAN from step 2: what the EMA and the discriminator restore is exercised too.
    common = [*FLUX2, f"model.init_from={sources['diffusers']}"]
    _, straight = run_train(tmp_path, "straight", *common, "train.max_steps=4")
    run_train(tmp_path, "resumed", *common, "train.max_steps=2")
    _, resumed = run_train(tmp_path, "resumed", *common, "train.max_steps=4", resume="latest")
    losses_a, losses_b = train_losses(straight), train_losses(resumed)
    assert sorted(losses_a) == sorted(losses_b) == [1, 2, 3, 4]
    assert losses_a == losses_b
    assert {"vae.bn.running_mean", "vae.bn.running_var"} <= set(assert_same_checkpoint(straight, resumed, 4))
    # Every checkpoint of both runs, the resumed one's included, names the released VAE the encoder started from.
    origin = {"source": str(sources["diffusers"]), "fingerprint": encoder_fingerprint(vae)}
    for run in (straight, resumed):
        ckpts = checkpoint_dirs(run / "checkpoints")
        assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-4"]
        for ckpt in ckpts:
            assert json.loads((ckpt / ENCODER_ORIGIN).read_text()) == origin, ckpt
    # The same weights give the same export: the BatchNorm re-measured alike in both.
    ea, eb = load_file(straight / "export" / EXPORT_WEIGHTS), load_file(resumed / "export" / EXPORT_WEIGHTS)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert report(straight)["batch_norm"] == report(resumed)["batch_norm"]
    assert report(straight)["batch_norm"]["origin"].startswith("re-measured at export")


def test_two_processes_equal_one_with_double_batch(tmp_path, released):
    sources, vae = released
    common = [*FLUX2, *EQUIVALENCE, f"model.init_from={sources['bfl']}"]
    _, two = run_train(tmp_path, "two", *common, launch=launch_command(2), env=cpu_env())
    _, one = run_train(tmp_path, "one", *common, "train.batch_size=4")
    assert_same_training(two, one)
    assert "vae.bn.running_mean" in weights(two, 2)
    origin = {"source": str(sources["bfl"]), "fingerprint": encoder_fingerprint(vae)}
    for run in (two, one):
        assert json.loads((run / "checkpoints" / "checkpoint-2" / ENCODER_ORIGIN).read_text()) == origin
    # The BatchNorm is re-measured over both processes' calibration images: the statistics of one process's.
    bn_two, bn_one = report(two)["batch_norm"], report(one)["batch_norm"]
    assert bn_two["origin"].startswith("re-measured at export") and bn_one["origin"].startswith("re-measured at export")
    for key in ("running_mean", "running_var"):
        assert bn_two[key] == pytest.approx(bn_one[key], rel=1e-3, abs=1e-5), key


def test_resume_into_an_autoencoder_kl_is_refused(tmp_path, moved_run):
    run = copied_run(moved_run, tmp_path, "moved")
    config, losses = (run / CONFIG_FILE).read_text(), train_losses(run)
    # The tiny AutoencoderKL preset with the checkpoint's latent channels has every weight shape of flux2-tiny:
    # only the BatchNorm tells them apart, and the refusal names it.
    refused, _ = run_train(tmp_path, "moved", *NO_GAN, "train.max_steps=4", "model.preset=tiny",
                           "model.overrides={latent_channels: 8}", resume="latest", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "holds another architecture than this config builds" in refused.stderr
    assert "the class, AutoencoderKLFlux2 in the checkpoint, AutoencoderKL in this config" in refused.stderr
    for key in ("vae.bn.running_mean", "vae.bn.running_var"):
        assert f"model.safetensors: {key}: (32,) in the checkpoint, absent in this config" in refused.stderr, key
    latest = checkpoint_dirs(run / "checkpoints")[-1]
    assert f"--config {latest / CONFIG_FILE}" in refused.stderr
    # The plain tiny preset differs in its latent channels too.
    refused, _ = run_train(tmp_path, "moved", *NO_GAN, "train.max_steps=4", "model.preset=tiny", resume="latest",
                           check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "latent_channels: 8 in the checkpoint, 4 in this config" in refused.stderr
    assert "vae.quant_conv.weight: (16, 16, 1, 1) in the checkpoint, (8, 8, 1, 1) in this config" in refused.stderr
    assert train_losses(run) == losses and (run / CONFIG_FILE).read_text() == config  # nothing trained or written


def test_resume_with_another_trainable_is_refused(tmp_path, released, moved_run):
    """The run trained everything; freezing the encoder on resume changes the optimiser's parameter group."""
    sources, _ = released
    run = copied_run(moved_run, tmp_path, "moved")
    refused, _ = run_train(tmp_path, "moved", *FLUX2, *NO_GAN, "train.max_steps=4", f"model.init_from={sources['bfl']}",
                           "model.trainable=decoder", resume="latest", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "model.trainable" in refused.stderr
    assert train_losses(run) == train_losses(moved_run)  # nothing trained
