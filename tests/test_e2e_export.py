"""The export of a VAE tuned end to end (REPA-E, first_stage.e2e; issue 23 item 4), in process on tiny models: its
latent normaliser is its EMA transformer's BatchNorm (REPA-E's save_vae_weights.py: latents_mean = running_mean,
latents_std = sqrt(running_var); the FLUX.2 class: bn.* itself), through both export paths (train/train.py's
ExportSource.of_training, scripts/export.py on the checkpoint); the fine-tuning bundle carries the transformer and
its EMA and continues from them; an e2e run started from released weights reports how far its latents moved."""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from safetensors import safe_open
from safetensors.torch import load_file

from first_stage.checkpoint import (BUNDLE_DIR, EXPORT_REPORT, EXPORT_WEIGHTS, TRAINER_STATES, TRAINING_STATE,
                                    read_checkpoint, read_state, save_checkpoint)
from first_stage.compare import load_image_autoencoder, normalizer_of
from first_stage.config import ModelConfig, load_config
from first_stage.convert import BFL_FILE_NAME
from first_stage.e2e import TRANSFORMER_EMA_FILE, TRANSFORMER_FILE, E2ETransformer
from first_stage.export import ExportError, ExportOptions, ExportSource, e2e_normaliser, export_autoencoder
from first_stage.latent_norm import LatentNormalizer
from first_stage.model import new_autoencoder
from first_stage.trainer import TrainingState, accelerator_options, build_parts, run_files, train_step, trainer_states

from conftest import reset_accelerator
from test_e2e import E2E_TINY

REPO = Path(__file__).resolve().parents[1]
# A small discriminator as test_e2e's fixture has; four calibration images of the sample photos.
E2E_RUN = [*E2E_TINY, "discriminator.enabled=true", "discriminator.start=0", "discriminator.channels=16",
           "discriminator.adaptive=false", "discriminator.weight=0.1", "export.calibration_images=4", "data.split=all"]
# e2e.bn_eps stays 1e-4: flux2-tiny's batch_norm_eps
FLUX2 = ["model.preset=flux2-tiny", "export.latent_norm=batch_norm", "discriminator.enabled=false"]


@pytest.fixture
def reset():
    yield
    reset_accelerator()


@pytest.fixture(scope="module")
def kl_run(dinov2_folder, tmp_path_factory):
    """An e2e run of the tiny AutoencoderKL started from a "released" VAE, two steps, its checkpoint and the
    export train/train.py makes at its end: a dict of config, parts, released, checkpoint, export, report."""
    tmp = tmp_path_factory.mktemp("kl_run")
    torch.manual_seed(1)
    released = tmp / "released"
    new_autoencoder(ModelConfig(preset="tiny")).save_pretrained(released)
    config, parts, accelerator, checkpoint = trained_e2e([f"model.init_from={released}"], dinov2_folder,
                                                         sample_images(), tmp / "run")
    report = export_as_train_does(config, parts, sample_images(), tmp / "run" / "export", accelerator)
    reset_accelerator()
    return {"config": config, "parts": parts, "released": released, "checkpoint": checkpoint,
            "export": tmp / "run" / "export", "report": report}


def sample_images() -> torch.Tensor:
    """conftest's ``images`` (2, 3, 32, 32), for module-scoped fixtures."""
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=32, mode="bilinear") * 2 - 1


def trained_e2e(overrides: list[str], dinov2_folder, images, root: Path):
    """Training parts of a tiny e2e config, two train steps, and the checkpoint train/train.py writes of them:
    (config, parts, accelerator, checkpoint folder)."""
    config = load_config(None, [*E2E_RUN, f"e2e.model={dinov2_folder}", *overrides])
    accelerator = Accelerator(cpu=True, **accelerator_options(config.train))
    torch.manual_seed(0)
    parts = build_parts(config, accelerator)
    state = TrainingState()
    batch = {"pixel_values": images, "skipped": 0, "upsized": 0}
    for _ in range(2):
        train_step(accelerator, parts, config, state, iter([batch]))
    files = {**run_files(config, parts), TRAINING_STATE: json.dumps(state.state_dict())}
    checkpoint = save_checkpoint(accelerator, root / "checkpoints", state.step, files, 0, trainer_states(parts))
    return config, parts, accelerator, checkpoint


def export_as_train_does(config, parts, images, out: Path, accelerator) -> dict:
    """train/train.py's export block: the EMA weights into the VAE, ExportSource.of_training, export_autoencoder."""
    vae = parts.raw_model.vae
    parts.ema.copy_to(vae.parameters())
    source = ExportSource.of_training(parts, config, 2, str(out.parent), "ema")
    return export_autoencoder(vae, out, [images[:1], images[1:]], source,
                              ExportOptions.from_config(config.export, sample_size=config.data.resolution), accelerator)


def export_as_script_does(source: Path, out: Path, monkeypatch) -> None:
    """scripts/export.py's main() on ``source``, in this process (its own Accelerator)."""
    reset_accelerator()
    spec = importlib.util.spec_from_file_location("export_script", REPO / "scripts" / "export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["export.py", str(source), "--out", str(out), "--num-images", "4",
                                      "--batch-size", "2"])
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    script.main()


def ema_statistics(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The EMA transformer's BatchNorm statistics as the checkpoint holds them (float32)."""
    ema = read_state(checkpoint / TRAINER_STATES["transformer_ema"])
    return ema["bn.running_mean"], ema["bn.running_var"]


def assert_per_channel_is_the_batch_norm(export: Path, mean: torch.Tensor, var: torch.Tensor) -> None:
    """config.json's latents_mean is running_mean exactly, latents_std sqrt(running_var) to the sqrt's rounding."""
    config = json.loads((export / "config.json").read_text())
    assert config["scaling_factor"] == 1.0 and config["shift_factor"] is None
    assert torch.equal(torch.tensor(config["latents_mean"], dtype=torch.float32), mean)
    assert config["latents_mean"] == mean.tolist()  # the float32 values, exactly
    torch.testing.assert_close(torch.tensor(config["latents_std"], dtype=torch.float64), var.double().sqrt(),
                               rtol=1e-15, atol=0)


def test_e2e_export_of_a_kl_vae_is_its_ema_batch_norm_in_both_paths(kl_run, tmp_path, monkeypatch, reset):
    """An e2e run of an AutoencoderKL started from a released VAE: train.py's and scripts/export.py's exports both
    write the EMA BatchNorm as latents_mean / latents_std (not the calibration images' statistics), say so and
    by how much REPA-E's eps-free scale differs, report how far the latents moved and that diffusion models need
    adapting; compare reads the exported normaliser as written."""
    config, parts, checkpoint, report, released = (kl_run[k] for k in ("config", "parts", "checkpoint", "report",
                                                                       "released"))
    mean, var = ema_statistics(checkpoint)
    assert torch.equal(mean, parts.transformer_ema.bn.running_mean)  # the run's EMA is the checkpoint's
    assert int(read_state(checkpoint / TRAINER_STATES["transformer_ema"])["bn.num_batches_tracked"]) == 2

    assert_per_channel_is_the_batch_norm(kl_run["export"], mean, var)
    e = report["e2e"]
    assert e["step"] == 2 and e["transformer_steps"] == 2 and e["running_mean"] == mean.tolist()
    assert "EMA BatchNorm at step 2" in report["latents"]["origin"] and not report["latents"]["normalisation_kept"]
    assert f"NOT those of {released}" in report["latents"]["origin"]
    expected = ((var.double() + config.e2e.bn_eps) / var.double()).sqrt().max().item() - 1
    assert e["scale_over_transformer"] == pytest.approx(expected, rel=1e-9) and e["scale_over_transformer"] > 0
    assert report["latent_stats"]["num_images"] == 2  # the measured statistics stay in the report
    # drift from the released VAE the run started from, and the line that its diffusion models need adapting
    drift = report["latents"]["drift"]
    assert drift["from"] == str(released) and 0 < drift["overall"]["relative_error"]
    card = (kl_run["export"] / "README.md").read_text()
    assert "will need adapting" in card and "REPA-E retrains its DiT" in card
    assert "EMA BatchNorm at step 2" in card and "pipelines scale latents by up to" in card

    export_as_script_does(checkpoint, tmp_path / "script", monkeypatch)
    assert_per_channel_is_the_batch_norm(tmp_path / "script", mean, var)
    script_report = json.loads((tmp_path / "script" / EXPORT_REPORT).read_text())
    assert script_report["normalisation"] == report["normalisation"]
    assert script_report["latent_stats"]["num_images"] == 4  # the sample photos: another calibration, the same norm
    assert script_report["e2e"]["running_var"] == e["running_var"] and "drift" in script_report["latents"]
    for name in (TRANSFORMER_FILE, TRANSFORMER_EMA_FILE):  # the same bundle from both paths
        a, b = (load_file(export / BUNDLE_DIR / name) for export in (kl_run["export"], tmp_path / "script"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # eval/compare.py reads the normaliser pipelines read: the diffusers fields as written
    expected_norm = LatentNormalizer("per_channel", 1.0, latents_mean=tuple(mean.tolist()),
                                     latents_std=tuple(math.sqrt(v) for v in var.tolist()))
    assert normalizer_of(load_image_autoencoder(tmp_path / "script")) == expected_norm
    assert LatentNormalizer.of(AutoencoderKL.from_pretrained(kl_run["export"])) == expected_norm


def test_e2e_export_of_a_flux2_vae_writes_the_ema_buffers_into_bn(dinov2_folder, images, tmp_path, monkeypatch,
                                                                   reset):
    """A FLUX.2-class VAE: bn.running_mean / bn.running_var of the diffusers folder and of BFL's ae.safetensors
    are the EMA transformer's buffers bit for bit, through scripts/export.py; the normaliser is what the
    transformer read (the same eps)."""
    config, parts, _, checkpoint = trained_e2e(FLUX2, dinov2_folder, images, tmp_path / "run")
    mean, var = ema_statistics(checkpoint)
    assert mean.shape == (4 * parts.raw_model.vae.config.latent_channels,)
    export_as_script_does(checkpoint, tmp_path / "export", monkeypatch)
    for file in (tmp_path / "export" / EXPORT_WEIGHTS, tmp_path / "export" / BFL_FILE_NAME):
        with safe_open(str(file), "pt") as f:
            assert torch.equal(f.get_tensor("bn.running_mean"), mean), file
            assert torch.equal(f.get_tensor("bn.running_var"), var), file
    vae = AutoencoderKLFlux2.from_pretrained(tmp_path / "export")
    assert torch.equal(vae.bn.running_var, var) and vae.config.batch_norm_eps == config.e2e.bn_eps
    report = json.loads((tmp_path / "export" / EXPORT_REPORT).read_text())
    assert report["e2e"]["scale_over_transformer"] == 0 and report["e2e"]["repae_scale_over_transformer"] > 0
    assert "EMA BatchNorm at step 2" in report["batch_norm"]["origin"]
    assert "EMA BatchNorm at step 2" in (tmp_path / "export" / "README.md").read_text()


def test_e2e_bundle_continues_from_the_transformer_and_its_ema(kl_run, reset):
    """finetune/ holds the raw transformer and its EMA (BatchNorm buffers included), which load strictly into a
    fresh transformer; its config's e2e.init_from points at them, and build_parts on it starts from them."""
    config, parts, export = kl_run["config"], kl_run["parts"], kl_run["export"]
    bundle = export / BUNDLE_DIR
    assert {TRANSFORMER_FILE, TRANSFORMER_EMA_FILE, "config.yaml", "discriminator.safetensors"} <= set(
        kl_run["report"]["bundle"])
    fresh = E2ETransformer(parts.e2e.channels, parts.e2e.side, config.e2e, parts.e2e.vision.dim)
    for name, module in ((TRANSFORMER_FILE, parts.raw_transformer), (TRANSFORMER_EMA_FILE, parts.transformer_ema)):
        saved = load_file(bundle / name)
        fresh.load_state_dict(saved)  # strict
        assert all(torch.equal(saved[k], v.cpu()) for k, v in module.state_dict().items())
    assert TRANSFORMER_FILE in (export / "README.md").read_text()

    continued = load_config(bundle / "config.yaml")
    assert continued.e2e.init_from == str((bundle / TRANSFORMER_FILE).resolve())
    assert continued.model.init_from == str(export.resolve())
    accelerator = Accelerator(cpu=True, **accelerator_options(continued.train))
    again = build_parts(continued, accelerator)
    for new, old in ((again.raw_transformer, parts.raw_transformer), (again.transformer_ema, parts.transformer_ema)):
        assert all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())
    assert int(again.raw_transformer.bn.num_batches_tracked) == 2  # no re-measurement at the first step
    exported = AutoencoderKL.from_pretrained(export).state_dict()  # the continued run's VAE starts from the export
    assert all(torch.equal(v, exported[k]) for k, v in again.raw_model.vae.state_dict().items())


def test_e2e_checkpoint_reads_its_transformers_and_refusals_name_the_cause(kl_run, images, tmp_path):
    """read_checkpoint hands the transformer and its EMA on; a checkpoint without e2e_ema.pt, a global
    normalisation, or BatchNorm statistics of another size are refused naming the cause."""
    config, parts = kl_run["config"], kl_run["parts"]
    checkpoint = tmp_path / kl_run["checkpoint"].name
    shutil.copytree(kl_run["checkpoint"], checkpoint)
    found = read_checkpoint(checkpoint)
    assert torch.equal(found.transformer_ema["bn.running_var"], parts.transformer_ema.bn.running_var)
    assert found.transformer.keys() == parts.raw_transformer.state_dict().keys()
    source = ExportSource("test", "test", config=config, transformer_ema=found.transformer_ema)
    with pytest.raises(ValueError, match="per_channel"):
        export_autoencoder(found.vae, tmp_path / "global", [images], source, ExportOptions(latent_norm="global"))
    with pytest.raises(ValueError, match="transformer_ema"):  # an e2e run exported without its transformer
        export_autoencoder(found.vae, tmp_path / "none", [images], ExportSource("test", "test", config=config))
    with pytest.raises(ExportError, match="statistics"):
        e2e_normaliser(found.vae, {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)})
    (checkpoint / TRAINER_STATES["transformer_ema"]).unlink()
    with pytest.raises(FileNotFoundError, match="e2e_ema.pt"):
        read_checkpoint(checkpoint)


def test_e2e_sentence_cautions_when_the_normaliser_lags_the_latents():
    """The normaliser is not measured: when the calibration latents come out of it with a per-channel std far
    from 1 (the EMA lagging a short run's latent scale), the card's and printout's sentence says so."""
    from first_stage.reports import e2e_sentence

    e2e = {"ema_decay": 0.99, "transformer_steps": 200, "step": 200, "start_share": 0.134, "exported": "x",
           "transformer_normalised": "y", "eps_note": "z", "calibration_after": {"channel_std": [1.0, 1.1]}}
    assert "CAUTION" not in e2e_sentence({"e2e": e2e})
    e2e["calibration_after"]["channel_std"] = [1.0, 1.7]
    assert "CAUTION: the calibration images' latents come out of this normaliser with a per-channel std of 1 … 1.7" \
        in e2e_sentence({"e2e": e2e})
