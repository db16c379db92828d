"""Decoder distillation onto a frozen teacher (config section ``teacher``, first_stage.teacher): a FLUX.2-class
student with a narrower decoder and an AutoencoderTiny (TAESD) student, trained in process on the bundled
photographs, exported and loaded back in diffusers."""

import json

import pytest
from safetensors.torch import save_file
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderTiny

from conftest import training_accelerator
from first_stage.checkpoint import EXPORT_REPORT
from first_stage.convert import to_ldm_state_dict
from first_stage.config import ConfigError, DataConfig, ModelConfig, load_config
from first_stage.data import calibration_batches
from first_stage.export import ExportOptions, ExportSource, export_autoencoder
from first_stage.model import count_parameters, new_autoencoder
from first_stage.model import ENCODER_PREFIXES
from first_stage.teacher import Teacher, decode_cost
from first_stage.trainer import TrainingState, build_parts, train_step, validate

STEPS = 6


@pytest.fixture(scope="module")
def photographs():
    """Four of the bundled photographs, 32² centre crops: the batch every step trains on."""
    return next(calibration_batches(DataConfig(source="sample", split="all", resolution=32), 4, 4))["pixel_values"]


def save_teacher(folder, preset: str, **config):
    """A tiny random teacher of ``preset`` saved as a diffusers folder stating its normalisation."""
    torch.manual_seed(1)
    vae = new_autoencoder(ModelConfig(preset=preset))
    if isinstance(vae, AutoencoderKLFlux2):
        with torch.no_grad():  # statistics that are not the identity, so that a student must carry them
            vae.bn.running_mean.uniform_(-0.5, 0.5)
            vae.bn.running_var.uniform_(0.5, 2.0)
    vae.register_to_config(**config)
    vae.save_pretrained(folder)
    return vae


def train(overrides: list[str], photographs, steps: int = STEPS):
    """Train ``steps`` steps on the photographs in process; the parts and each step's logs."""
    config = load_config(None, ["data.resolution=32", "train.batch_size=4", "loss.perceptual_weight=0",
                                "optimizer.lr=1e-3", "regularizer.kl_weight=0", *overrides])
    with training_accelerator(config) as accelerator:
        torch.manual_seed(0)
        parts = build_parts(config, accelerator)
        state, logs = TrainingState(), []
        batch = {"pixel_values": photographs, "skipped": 0, "upsized": 0}
        for _ in range(steps):
            logs.append(train_step(accelerator, parts, config, state, iter([batch])))
        return config, parts, logs


def export(config, parts, photographs, out):
    vae = parts.raw_model.vae
    source = ExportSource(source="test", calibration="photographs", config=config,
                          loss_terms=parts.loss_fn.card_lines(), encoder_origin=parts.encoder_origin,
                          teacher=parts.teacher)
    return export_autoencoder(vae, out, [photographs[:2], photographs[2:]], source, ExportOptions(overwrite=True))


def test_flux2_small_decoder_keeps_the_teachers_encoder_and_loads_in_diffusers(tmp_path, photographs):
    """FLUX.2's small-decoder idea at tiny size: the student takes the teacher's encoder and BatchNorm bit for bit,
    only its narrower decoder trains, its distillation loss falls, and the export is an AutoencoderKLFlux2 with
    its own decoder widths whose latents and normalisation are the teacher's."""
    teacher = save_teacher(tmp_path / "teacher", "flux2-tiny")
    config, parts, logs = train([f"teacher.path={tmp_path / 'teacher'}", "model.preset=flux2-tiny",
                                 "model.overrides={decoder_block_out_channels: [32, 32]}", "model.trainable=decoder"],
                                photographs)
    student = parts.raw_model.vae
    assert logs[-1]["train/loss/teacher_output"] < 0.8 * logs[0]["train/loss/teacher_output"]
    theirs = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith(ENCODER_PREFIXES):
            assert torch.equal(value, theirs[key]), key
    assert count_parameters(student.decoder) < count_parameters(teacher.decoder)

    report = export(config, parts, photographs, tmp_path / "export")
    assert report["latents"]["normalisation_kept"] and report["batch_norm"]["kept"]
    loaded = AutoencoderKLFlux2.from_pretrained(tmp_path / "export")
    assert list(loaded.config.decoder_block_out_channels) == [32, 32]
    assert torch.equal(loaded.bn.running_mean, teacher.bn.running_mean)
    distillation = report["distillation"]
    assert distillation["parameter_ratio"] < 1 and distillation["flop_ratio"] < 1
    assert distillation["student"]["decoder_parameters"] == count_parameters(loaded.decoder) + count_parameters(
        loaded.post_quant_conv)
    assert "Decoder against its teacher" in (tmp_path / "export" / "README.md").read_text()
    assert not (tmp_path / "export" / "ae.safetensors").exists()  # BFL's code cannot hold another decoder width
    assert report["single_file_skipped"]


def test_tiny_student_learns_the_teachers_normalised_latents(tmp_path, photographs):
    """An AutoencoderTiny student of an AutoencoderKL teacher: its decoder reads the teacher's normalised latents
    (scaling_factor 0.5 here), both its losses fall, the teacher is untouched, and the export loads in diffusers'
    AutoencoderTiny with scaling factor 1 and decodes as in memory."""
    teacher = save_teacher(tmp_path / "teacher", "tiny", scaling_factor=0.5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config, parts, logs = train([f"teacher.path={tmp_path / 'teacher'}", "model.preset=taesd-tiny",
                                 "teacher.latent_weight=1"], photographs)
    for key in ("train/loss/teacher_output", "train/loss/teacher_latent"):
        assert logs[-1][key] < 0.8 * logs[0][key], key
    stats = validate(parts, photographs, True, tmp_path / "grid.png")  # the teacher's latents and its own encoder
    assert {"val/psnr", "val/psnr_own_encoder"} <= stats.keys()
    assert all(torch.equal(v, before[k]) for k, v in parts.teacher.vae.state_dict().items())

    report = export(config, parts, photographs, tmp_path / "export")
    loaded = AutoencoderTiny.from_pretrained(tmp_path / "export")
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (1.0, 0.0)
    assert report["latents"]["origin"].startswith("its teacher's normalised latents")
    with torch.no_grad():
        z = AutoencoderKL.from_pretrained(tmp_path / "teacher").encode(photographs).latent_dist.mode() * 0.5
        assert torch.allclose(loaded.decode(z).sample, parts.raw_model.vae.eval().decode(z).sample, atol=1e-5)
    assert report["distillation"]["student"]["class"] == "AutoencoderTiny"
    assert "AutoencoderTiny.from_pretrained" in (tmp_path / "export" / "README.md").read_text()
    saved = json.loads((tmp_path / "export" / EXPORT_REPORT).read_text())
    assert saved["single_file_skipped"] and saved["latent_stats"] is None


def test_teacher_normalises_in_the_latents_own_layout(tmp_path):
    """A FLUX.2-class teacher normalises 2x2 patches with its BatchNorm and puts them back in place: per patch
    channel, (z - mean) / sqrt(var + eps), at the position the patch came from."""
    vae = save_teacher(tmp_path / "teacher", "flux2-tiny")
    teacher = Teacher(vae, "t")
    z = torch.randn(1, 8, 4, 4)
    normalised = teacher.normalise(z)
    channel = 8 * 2 * 2 - 1  # channel 7 at patch offset (1, 1): PATCH_ORDER (c pi pj)
    expected = (z[0, 7, 1::2, 1::2] - vae.bn.running_mean[channel]) / (vae.bn.running_var[channel] + 1e-4).sqrt()
    assert torch.allclose(normalised[0, 7, 1::2, 1::2], expected, atol=1e-6)


def test_students_a_class_cannot_hold_are_refused(tmp_path):
    """AutoencoderKL has one width list: a narrower decoder than its teacher's encoder is refused naming the key, and
    so is a student whose encoder has more blocks than its teacher's (part of it would stay random); an
    AutoencoderTiny without a teacher or without the term that trains its encoder, a fresh KL student that would
    train its encoder, and a teacher that states no measured normalisation for a TAESD student are refused at load
    or build."""
    teacher = save_teacher(tmp_path / "teacher", "tiny")
    save_file(to_ldm_state_dict(teacher), tmp_path / "ldm.safetensors")  # a latent-diffusion file states no scale
    common = [f"teacher.path={tmp_path / 'teacher'}", "model.trainable=decoder"]
    refusals = [
        (common + ["model.overrides={block_out_channels: [16, 32], norm_num_groups: 8}"],
         r"encoder.conv_in.bias is \(16,\), its teacher.s \(32,\).*one width list"),
        (common + ["model.overrides={layers_per_block: 2}"], r"encoder.down_blocks.0.resnets.1.*absent"),
        ([f"teacher.path={tmp_path / 'ldm.safetensors'}", "model.preset=taesd-tiny", "teacher.latent_weight=1"],
         "states no measured normalisation"),
    ]
    for overrides, message in refusals:
        accelerator = Accelerator(cpu=True)
        try:
            with pytest.raises(ConfigError, match=message):
                build_parts(load_config(None, overrides), accelerator)
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    with pytest.raises(ConfigError, match="teacher.latent_weight must be > 0"):
        load_config(None, [f"teacher.path={tmp_path / 'teacher'}", "model.preset=taesd-tiny"])
    with pytest.raises(ConfigError, match="AutoencoderTiny, which trains only as a distillation student"):
        load_config(None, ["model.preset=taesd-tiny"])
    with pytest.raises(ConfigError, match="model.trainable: decoder"):
        load_config(None, [f"teacher.path={tmp_path / 'teacher'}"])
    with pytest.raises(ConfigError, match="equivariance"):
        load_config(None, [f"teacher.path={tmp_path / 'teacher'}", "model.trainable=decoder",
                           "equivariance.enabled=true"])


def test_the_teacher_runs_in_its_own_dtype_under_the_students_autocast(tmp_path):
    """Accelerate autocasts the student's forward, inside which a TAESD student's teacher encodes: the teacher's
    posterior and decoding stay fp32 and equal to what it computes outside autocast."""
    teacher = Teacher(save_teacher(tmp_path / "teacher", "tiny").eval(), "t")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 16, 16)
    plain_mean, plain_image = teacher.posterior(x).mean, teacher.decode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, image = teacher.posterior(x).mean, teacher.decode(z)
    assert mean.dtype == image.dtype == torch.float32
    assert torch.equal(mean, plain_mean) and torch.equal(image, plain_image)


def test_decode_cost_counts_flops_and_parameters():
    """decode_cost's FLOPs grow with the latent area and its parameter count is the decoder's."""
    torch.manual_seed(0)
    vae = new_autoencoder(ModelConfig(preset="tiny")).eval()
    small, large = decode_cost(vae, torch.randn(1, 4, 4, 4), 1), decode_cost(vae, torch.randn(1, 4, 8, 8), 1)
    assert large["gflops_per_image"] == pytest.approx(4 * small["gflops_per_image"], rel=0.05)
    assert small["decoder_parameters"] == count_parameters(vae.decoder) + count_parameters(vae.post_quant_conv)
