"""Learning from a frozen teacher VAE (config section ``teacher``): decoder distillation and the fp16-safe fine-tune.

The teacher is any VAE :func:`first_stage.checkpoint.load_vae` reads, frozen in fp32. What it teaches, for the
same latent ``z`` (the trained VAE's posterior sample)::

    output_weight · rec(teacher.decode(z), decode(z))        # rec: loss.pixel_loss + perceptual_weight · LPIPS
    latent_weight · |latents − teacher's latents|²           # posterior means; or, for an AutoencoderTiny,
                                                             # its encoder against the teacher's normalised means

both in ``loss.reduction``, beside the NLL against the image itself. Students:

- **a KL-class student** (``AutoencoderKL``, ``AutoencoderKLFlux2``) built fresh (``model.init_from`` null): it
  takes the teacher's encoder, quant_conv and BatchNorm bit for bit (:func:`adopt_encoder`) and trains its decoder
  (``model.trainable: decoder``), so its latents are the teacher's and the export keeps the teacher's
  normalisation. Its decoder may be narrower: ``AutoencoderKLFlux2``'s ``decoder_block_out_channels`` (FLUX.2's
  small decoder). ``AutoencoderKL`` has one width list for encoder and decoder, so a student of other decoder
  widths than its teacher's encoder cannot be an ``AutoencoderKL`` (:func:`adopt_encoder` says so);
- **an AutoencoderTiny** (TAESD), for any teacher: its decoder reads the teacher's normalised latents (the space
  a diffusion model samples, what pipelines hand an ``AutoencoderTiny`` with its scaling factor 1), its encoder
  learns to produce them. ``first_stage.model.AutoencoderWrapper`` runs the teacher's encoder for it;
- **the VAE itself** (the fp16-safe fine-tune, ``first_stage.fp16_safe``): ``model.init_from`` and
  ``teacher.path`` the same file, outputs and latents held while activations shrink.

:func:`decode_cost` measures what a student saves: decoder parameters, counted FLOPs and time per decode.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import is_run_or_checkpoint, load_vae, stated_normalisation
from .config import Config, ConfigError
from .latent_norm import LatentNormalizer
from .loss_term import LossContext, LossTerm, refuse_below
from .model import (ENCODER_PREFIXES, Autoencoder, AutoencoderOutput, cast, count_parameters, downsampling_factor,
                    encoder_fingerprint, has_batch_norm, is_tiny, preset_class)
from .performance import count_flops
from .regularizers import sum_reduce

# What a bench row's overrides say for a stand-in teacher (scripts/bench_train.py saves the recipe's model, freshly
# initialised, and puts its folder there); quoted in --set values, as YAML reserves "@".
TEACHER_STANDIN = "@teacher"


class Teacher:
    """The frozen teacher: its VAE (fp32, eval, no gradients) and the normaliser its pipelines read latents with."""

    def __init__(self, vae: Autoencoder, source: str):
        self.vae, self.source = vae, source
        self.norm = LatentNormalizer.of(vae)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor):
        """The posterior of images ``x``, computed in the teacher's dtype even under the student's autocast."""
        with torch.autocast(x.device.type, enabled=False):
            return self.vae.encode(x.to(self.vae.dtype)).latent_dist

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The teacher's decoding of latents ``z``, in its dtype even under the student's autocast."""
        with torch.autocast(z.device.type, enabled=False):
            return self.vae.decode(z.to(self.vae.dtype)).sample

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latent for ``z``, in the latent's own layout (B, C, h, w): a FLUX.2-class
        teacher's BatchNorm normalises 2x2 patches, which are put back in place."""
        return self.norm.unlayout(self.norm.normalize(z))


def load_teacher(config: Config, device: torch.device) -> Teacher | None:
    """The teacher of ``config`` on ``device``, checked against the student the config builds; None without one."""
    path = config.teacher.path
    if path is None:
        return None
    vae = cast(load_vae(path).vae, torch.float32, device).requires_grad_(False)
    if is_tiny(vae):
        raise ConfigError(f"teacher.path {path}: an AutoencoderTiny has no posterior to teach from")
    fresh = config.model.init_from is None
    if fresh and is_run_or_checkpoint(Path(path)):
        # a fresh student's latents and their normalisation are the teacher's: an export states them
        raise ConfigError(f"teacher.path {path} is a training run or checkpoint: a student built fresh takes its "
                          "teacher's latents and their normalisation, which a run has not measured; export it first "
                          "(scripts/export.py) and teach from the export")
    if preset_class(config.model.preset) == "AutoencoderTiny" and not (
            has_batch_norm(vae) or stated_normalisation(Path(path)) is not None):
        raise ConfigError(f"teacher.path {path}: an AutoencoderTiny student reads its teacher's normalised latents, "
                          "and this teacher states no measured normalisation (a latent-diffusion file: its scale was "
                          "a constant of the code): export it first (scripts/export.py) and teach from the export")
    return Teacher(vae, str(path))


def student_spec(spec: str, latent_channels: int) -> tuple[str, dict]:
    """(preset, model overrides) of a student written ``preset[:w1-w2-...]`` (the decoder widths of a KL-class
    student: ``flux2:96-192-384-384`` is FLUX.2's small decoder); an AutoencoderTiny gets the teacher's
    ``latent_channels``."""
    preset, _, widths = spec.partition(":")
    if preset_class(preset) == "AutoencoderTiny":
        if widths:
            raise ValueError(f"student {spec}: an AutoencoderTiny takes no decoder widths here")
        return preset, {"latent_channels": latent_channels}
    return preset, {"decoder_block_out_channels": [int(w) for w in widths.split("-")]} if widths else {}


def check_student(student: Autoencoder, teacher: Teacher) -> None:
    """Refuse a student whose latent grid is not the teacher's, naming both."""
    mine = (student.config.latent_channels, downsampling_factor(student.config))
    theirs = (teacher.vae.config.latent_channels, downsampling_factor(teacher.vae.config))
    if mine != theirs:
        raise ConfigError(f"the student ({type(student).__name__}) has {mine[0]} latent channels at f{mine[1]}, its "
                          f"teacher {teacher.source} {theirs[0]} at f{theirs[1]}: set model.overrides to match")
    levels = len(student.config.decoder_block_out_channels) if is_tiny(student) else 0
    if levels and 2 ** (levels - 1) != mine[1]:
        raise ConfigError(f"model.overrides: the AutoencoderTiny's decoder has {levels} levels, so it does not "
                          f"upsample f{mine[1]} latents to the image size; give "
                          "decoder_block_out_channels and num_decoder_blocks as many levels as the encoder")


def adopt_encoder(student: Autoencoder, teacher: Teacher) -> None:
    """Copy the teacher's encoder, quant_conv and (FLUX.2 class) BatchNorm into a fresh KL-class ``student``, bit
    for bit; a student whose encoder the teacher's weights do not fit is refused, naming the first key."""
    if type(student) is not type(teacher.vae):
        raise ConfigError(f"model.preset builds a {type(student).__name__}, the teacher {teacher.source} is a "
                          f"{type(teacher.vae).__name__}: a KL-class student is of its teacher's class (or use an "
                          "AutoencoderTiny preset, e.g. taesd)")
    mine = student.state_dict()
    taken = {k: v for k, v in teacher.vae.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    for key in sorted(set(taken) | {k for k in mine if k.startswith(ENCODER_PREFIXES)}):
        if key not in mine or key not in taken or mine[key].shape != taken[key].shape:
            shape = tuple(mine[key].shape) if key in mine else "absent"
            value = taken.get(key, torch.empty(0))
            hint = (" (AutoencoderKL has one width list, block_out_channels, for encoder and decoder: a decoder of "
                    "other widths needs AutoencoderKLFlux2's decoder_block_out_channels or an AutoencoderTiny)"
                    if not has_batch_norm(student) else "")
            theirs = tuple(value.shape) if key in taken else "absent"
            raise ConfigError(f"the student's {key} is {shape}, its teacher's {theirs}: the student must have the "
                              f"teacher's encoder{hint}")
    student.load_state_dict(taken, strict=False)
    if encoder_fingerprint(student) != encoder_fingerprint(teacher.vae):  # what the export's "kept" rests on
        raise RuntimeError("adopt_encoder: the student's encoder is not bit for bit its teacher's after the copy")


class TeacherTerm(LossTerm):
    """Output matching and latent matching against the frozen teacher (module docstring)."""

    name, section = "teacher", "teacher"
    teacher: Teacher | None = None  # set by first_stage.trainer.build_loss before build

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.teacher.path is not None

    @classmethod
    def check(cls, config: Config) -> None:
        refuse_below(config, 0, "teacher.output_weight", "teacher.latent_weight")
        tiny = preset_class(config.model.preset) == "AutoencoderTiny"
        if config.teacher.path is None:
            if tiny:
                raise ConfigError(f"model.preset {config.model.preset} is an AutoencoderTiny, which trains only as "
                                  "a distillation student: set teacher.path")
            return
        # The teacher decodes the plain latent: terms that decode another one would be matched against the wrong image.
        for section in ("equivariance", "latent_noise"):
            if getattr(config, section).enabled:
                raise ConfigError(f"teacher.path and {section}.enabled: the teacher's target is the decoding of the "
                                  f"plain latent, {section} decodes another one; disable one of them")
        if tiny:
            if config.alignment.enabled:
                raise ConfigError("alignment.enabled: an AutoencoderTiny student's latents are its teacher's; "
                                  "nothing to align")
            if config.performance.gradient_checkpointing:
                # diffusers 0.42's EncoderTiny skips its input scaling x → (x + 1)/2 under gradient checkpointing
                raise ConfigError("performance.gradient_checkpointing: diffusers' EncoderTiny (0.42) skips its "
                                  "input scaling when checkpointing; an AutoencoderTiny student trains without it")
            if config.discriminator.pretrain_steps:
                raise ConfigError("discriminator.pretrain_steps: pre-training a discriminator against an untrained "
                                  "AutoencoderTiny student teaches it nothing; set it to 0")
            if config.model.trainable == "all" and config.teacher.latent_weight <= 0:
                raise ConfigError("teacher.latent_weight must be > 0 for an AutoencoderTiny student that trains its "
                                  "encoder (model.trainable: all): its encoder learns the teacher's normalised latents "
                                  "from that term alone")
        elif config.model.init_from is None and config.model.trainable != "decoder":
            raise ConfigError(f"teacher.path with model.init_from null builds a student that takes the teacher's "
                              f"encoder: it trains its decoder only (model.trainable: decoder, not "
                              f"{config.model.trainable})")

    def loss(self, out: AutoencoderOutput, ctx: LossContext) -> tuple[torch.Tensor | None, dict]:
        t, reduction = self.config.teacher, ctx.base.cfg.reduction
        total, logs = None, {}
        if t.output_weight > 0:
            rec = ctx.base.reconstruction_loss(self.teacher.decode(out.z), out.reconstruction)[0]
            value = sum_reduce(rec, reduction)
            logs["train/loss/teacher_output"] = value.item()
            total = t.output_weight * value
        if t.latent_weight > 0:
            if out.latents is not None:  # an AutoencoderTiny's encoder learns the normalised posterior mean
                mine, theirs = out.latents, self.teacher.normalise(out.posterior.mean)
            else:
                mine, theirs = out.posterior.mean, self.teacher.posterior(out.inputs).mean
            value = sum_reduce((mine.float() - theirs.float()).pow(2), reduction)
            logs["train/loss/teacher_latent"] = value.item()
            total = t.latent_weight * value if total is None else total + t.latent_weight * value
        return total, logs

    def card_line(self) -> str:
        t = self.config.teacher
        return (f"teacher {t.path}: {t.output_weight:g} × the reconstruction loss of this decoding against the "
                f"teacher's decoding of the same latent, {t.latent_weight:g} × the squared error of the latents "
                "against the teacher's")


def decoder_parameters(vae: Autoencoder) -> int:
    """Parameters a decode runs: the decoder and (KL classes) post_quant_conv."""
    return count_parameters(vae.decoder) + count_parameters(getattr(vae, "post_quant_conv", None) or nn.Identity())


@torch.no_grad()
def decode_cost(vae: Autoencoder, latent: torch.Tensor, repeats: int = 3) -> dict:
    """What decoding ``latent`` (B, C, h, w) costs ``vae`` as it is (device, dtype): decoder parameters, FLOPs
    per image (``torch.utils.flop_counter``) and the median wall time of ``repeats`` decodes per image, in ms
    (after one untimed decode; CUDA is synchronised)."""
    latent = latent.to(vae.device, vae.dtype)
    sync = torch.cuda.synchronize if latent.device.type == "cuda" else (lambda: None)
    flops = count_flops(vae.decode, latent)  # attention included on the CPU too
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        vae.decode(latent)
        sync()
        times.append(time.perf_counter() - start)
    n = latent.shape[0]
    return {"class": type(vae).__name__, "decoder_parameters": decoder_parameters(vae),
            "gflops_per_image": flops / n / 1e9,
            "ms_per_image": statistics.median(times) / n * 1e3, "device": str(latent.device),
            "dtype": str(vae.dtype).removeprefix("torch."), "latent": list(latent.shape[1:]), "repeats": repeats}


def distillation_report(student: Autoencoder, teacher: Teacher, x: torch.Tensor, repeats: int = 3) -> dict:
    """The student's decode cost against its teacher's on the latents of images ``x``, as the export records it."""
    latent = teacher.posterior(x.to(teacher.vae.device)).mode()
    theirs = decode_cost(teacher.vae, latent, repeats)
    mine = decode_cost(student, teacher.normalise(latent) if is_tiny(student) else latent, repeats)
    return {"teacher_source": teacher.source, "student": mine, "teacher": theirs,
            "parameter_ratio": mine["decoder_parameters"] / theirs["decoder_parameters"],
            "flop_ratio": mine["gflops_per_image"] / theirs["gflops_per_image"],
            "speedup": theirs["ms_per_image"] / mine["ms_per_image"]}
