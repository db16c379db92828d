"""Typed, frozen run configuration, loaded from YAML and overridden with ``--set section.key=value``.

Every section is a frozen dataclass. Loading checks every key and type against the dataclass
fields: an unknown key or a wrong type raises :class:`ConfigError` naming the key, the file it came
from, and the closest valid key. The resolved config is written back as YAML with
:func:`save_config` and reloads to an equal object.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type."""


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"  # a key of first_stage.model.PRESETS
    # Constructor arguments of the preset's class (AutoencoderKL, AutoencoderKLFlux2) that replace the
    # preset's, e.g. {latent_channels: 16}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Weights to start from (fine-tuning), any source first_stage.checkpoint.load_vae reads: a training
    # run or checkpoint folder (its EMA weights), a diffusers AutoencoderKL or AutoencoderKLFlux2 folder, a
    # latent-diffusion single file (.safetensors/.ckpt) or BFL's FLUX.2 ae.safetensors, whose architecture
    # is read off its weights (and overrides). The class is the source's.
    init_from: str | None = None
    trainable: Literal["all", "decoder"] = "all"  # "decoder": the sd-vae-ft-MSE recipe


@dataclass(frozen=True)
class LossConfig:
    pixel_loss: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = 1.0
    # "sum": the latent-diffusion reduction (sum over C,H,W, mean over the batch).
    # "mean": per element; kl_weight_mean = kl_weight_sum * latent_elements / pixel_elements.
    reduction: Literal["sum", "mean"] = "sum"
    learn_logvar: bool = False  # the released SD VAE kept it frozen at logvar_init
    logvar_init: float = 0.0
    lpips_weights: str | None = None  # path to torchvision's vgg16-397923af.pth
    lpips_download: bool = True  # try torch.hub when the file is not found locally
    lpips_missing: Literal["error", "warn"] = "error"  # "warn" trains without the LPIPS term


@dataclass(frozen=True)
class RegularizerConfig:
    # "kl": kl_weight * KL(q(z|x) || N(0, I)). "mmd": mmd_weight * MMD²(aggregate posterior, N(0, I)),
    # WAE's penalty, instead of the KL (kl_weight and free_bits are then unused; the KL is still logged).
    kind: Literal["kl", "mmd"] = "kl"
    kl_weight: float = 1e-6  # in the reduction of loss.reduction
    schedule: Literal["constant", "linear"] = "constant"  # of kl_weight or mmd_weight, whichever applies
    warmup_steps: int = 0  # "linear": the weight ramps from 0 to its value over this many steps
    free_bits: float = 0.0  # per-channel floor, nats per latent element, below which KL is free
    # MMD² counts as a per-latent-element figure: times C*h*w in the "sum" reduction, as is in "mean"
    # (the kl_weight conversion between reductions applies unchanged).
    mmd_weight: float = 1.0
    # Latent positions (C-vectors) drawn per batch for the O(n²) kernel sums, against as many N(0, I) draws.
    mmd_samples: int = 1024


@dataclass(frozen=True)
class AlignmentConfig:
    """Representation alignment (VA-VAE's "vision foundation" loss): latents projected by a trained
    1x1 convolution are pulled towards a frozen vision model's patch features (docs/training.md)."""

    enabled: bool = False
    # A Hugging Face model id (read from the local cache only, never downloaded) or a local folder
    # holding config.json, the weights and preprocessor_config.json; loaded through transformers.
    model: str = "facebook/dinov2-large"
    # "latent": the image is resized so that the model's patch grid is the latent grid (VA-VAE: 224²
    # for an f16 latent of a 256² image); "model": the model's own image size, features resized
    # bilinearly to the latent grid.
    grid: Literal["latent", "model"] = "latent"
    weight: float = 0.1  # VA-VAE's vf_weight, times the adaptive weight when adaptive is on
    cos_weight: float = 1.0
    cos_margin: float = 0.5  # per position: relu(1 - cos_margin - cos(projected z, feature))
    distance_weight: float = 1.0
    distance_margin: float = 0.25  # per pair of positions: relu(|cos_zz - cos_ff| - distance_margin)
    adaptive: bool = True  # balance against the NLL by gradient norms at the encoder's last layer
    adaptive_weight_max: float = 1e8  # VA-VAE's clamp
    projection_init: str | None = None  # an export's finetune/alignment_projection.safetensors
    # By default the vision model sees what VA-VAE's does (LightningDiT vavae/ldm/models/
    # foundation_models.py forward_dinov2): the raw [-1, 1] image, resized with plain bilinear
    # (align_corners=False, no antialias), and the projection is a 1x1 convolution without bias
    # (vavae/ldm/models/autoencoder.py, reverse_proj). Departures from VA-VAE, each off by default:
    # normalize: the image processor's ImageNet mean/std, the input statistics DINOv2 was trained on
    # (on raw [-1, 1] input its patch features differ by about 2.7 at a feature scale of 3.4).
    normalize: bool = False
    # interpolation "bicubic": the image processor's own resampling, smoother than bilinear.
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    antialias: bool = False  # low-pass filter when shrinking (256 → 224), against aliasing
    # projection_bias: a bias in the projection (this package's projections before it followed
    # VA-VAE); true loads such a projection_init file, false loads VA-VAE's linear_proj.weight.
    projection_bias: bool = False


@dataclass(frozen=True)
class EquivarianceConfig:
    """EQ-VAE's transform-and-reconstruct scheme and the scale-equivariance term of
    arXiv 2502.14831, apart or together (docs/training.md)."""

    enabled: bool = False
    # EQ-VAE: with this probability a step's decoder gets the latent scaled and rotated and must
    # reproduce the image under the same transform; the other steps reconstruct plainly.
    probability: float = 0.5
    # Scale factors are the multiples of 1/32 in [min_scale, max_scale): EQ-VAE's 8/32 ... 31/32.
    min_scale: float = 0.25
    max_scale: float = 1.0
    # One factor for both axes, as EQ-VAE's paper config (zelaki/eqvae train_eqvae/configs/
    # eqvae_config.yaml, anisotropic: False). Departure, off by default: true draws separate factors
    # for height and width (EQ-VAE's own option), a richer set of transforms.
    anisotropic: bool = False
    rotations: bool = True  # and a rotation by k·90°, k drawn from {1, 2, 3} (EQ-VAE)
    # Prior preservation at low resolution: this share of the plain steps encodes and reconstructs
    # the image scaled by a factor drawn from the same grid (EQ-VAE's p_prior_s).
    lowres_probability: float = 0.0
    # Departure, off by default: the low-resolution steps always halve the image (this package's
    # former choice: one fixed size, so fewer shapes for torch.compile and the image-size checks).
    lowres_half: bool = False
    # Latents and images are scaled with plain bilinear (align_corners=False, no antialias), EQ-VAE's
    # operator (train_eqvae/ldm/models/autoencoder.py). Departure, off by default: antialias low-pass
    # filters before shrinking, against aliasing in the targets.
    antialias: bool = False
    # 2502.14831: + scale_weight * sum over factors s of rec(down_s(x), D(down_s(z))), every step
    # (low-resolution steps included); 0: off. Its paper says "bilinear"; its exact operator is
    # unverified, and the same operator as EQ-VAE's is used.
    scale_weight: float = 0.0
    scale_factors: tuple[int, ...] = (2, 4)


@dataclass(frozen=True)
class LatentNoiseConfig:
    """Noise on the decoder's input (RAE's noise_tau): it reconstructs from z + σ·ε, so a diffusion
    model's sampling errors decode gracefully (docs/training.md)."""

    enabled: bool = False
    tau: float = 0.8  # σ = u·tau·std with u ~ U(0, 1) per image (RAE's noise_tau)
    probability: float = 1.0  # share of images whose decoder input is noised
    # The std σ is relative to: None measures each image's own latent std (detached); a number
    # fixes it (e.g. 1/scaling_factor of an export).
    reference_std: float | None = None


@dataclass(frozen=True)
class DiscriminatorConfig:
    enabled: bool = False
    start: int = 50001  # first step at which the discriminator trains
    warmup_steps: int = 0  # its term reaches the generator only from start + warmup_steps
    # Steps at the start of the run in which ONLY the discriminator trains, against the frozen VAE's
    # reconstructions: for a VAE released without its discriminator, so that the fine-tune does not begin
    # against a random one. The VAE, its EMA and its learning-rate schedule start after them (needs start 0).
    pretrain_steps: int = 0
    weight: float = 0.5  # disc_weight: multiplies the adaptive weight
    n_layers: int = 3
    channels: int = 64
    norm: Literal["batch", "group", "none"] = "batch"
    loss: Literal["hinge", "non_saturating"] = "hinge"
    adaptive_weight_max: float = 1e4
    # false: the generator term is weight × g_loss, a fixed weight (REPA-E's 0.1, loss/losses.py), without the
    # adaptive weight's extra backward. The weight is stated against a per-element mean NLL (REPA-E's): under
    # loss.reduction "sum" it is multiplied by the 3·H·W elements the NLL sums over, keeping the same balance.
    adaptive: bool = True
    # Weights to start from: an export's finetune/discriminator.safetensors, or a latent-diffusion
    # autoencoder checkpoint holding loss.discriminator.* (n_layers, channels and norm must match).
    init_from: str | None = None


@dataclass(frozen=True)
class TeacherConfig:
    """A frozen VAE whose outputs the trained one learns to match (docs/distillation.md): decoder distillation
    onto its latents (a student decoder of other widths, or an AutoencoderTiny) and the fp16-safe fine-tune
    (the teacher is the VAE's own fp32 original)."""

    # Any source first_stage.checkpoint.load_vae reads; None: no teacher. A student built fresh (model.init_from
    # null) of a KL class takes the teacher's encoder, quant_conv and BatchNorm bit for bit.
    path: str | None = None
    # output_weight * rec(teacher's decoding of z, the decoding of z) for the same latent z: loss.pixel_loss plus
    # loss.perceptual_weight x LPIPS, in loss.reduction, beside the NLL against the image itself.
    output_weight: float = 1.0
    # latent_weight * MSE of the latents to the teacher's, in loss.reduction: the posterior means (KL classes;
    # holds the encoder), or an AutoencoderTiny encoder's latents to the teacher's normalised posterior means.
    latent_weight: float = 0.0


@dataclass(frozen=True)
class Fp16SafeConfig:
    """The fp16-safe fine-tune (sdxl-vae-fp16-fix's idea, first_stage/fp16_safe.py, docs/training.md): with the
    ``teacher`` section holding the outputs and latents of the VAE's own fp32 original, a penalty on every
    activation of the trained VAE above ``limit`` brings them all under fp16's range with margin."""

    enabled: bool = False
    # activation_weight * sum over the VAE's module outputs a of relu(|a| / limit - 1)², per element in
    # loss.reduction: 1 per element at twice the limit (the package's choice; sdxl-vae-fp16-fix publishes none).
    activation_weight: float = 1.0
    # |activation| where the penalty starts: 8192 = 2^13, fp16's largest value 65504 / 8, three powers of two of
    # headroom for images and resolutions the fine-tune did not see (the package's choice).
    limit: float = 8192.0
    # Before the first step, scale down each trained convolution whose only consumer is a GroupNorm (a diffusers
    # ResnetBlock2D's conv1, read by norm2), weight and bias alike, so that its fp32 peak on a probe batch is
    # limit / 2: GroupNorm divides the scale out again, so the VAE's function is unchanged up to GroupNorm's eps.
    rescale: bool = True


@dataclass(frozen=True)
class E2EConfig:
    """End-to-end tuning against a latent diffusion transformer (REPA-E, End2End-Diffusion/REPA-E
    ``train_repae.py``; first_stage/e2e.py, docs/e2e.md). Defaults are REPA-E's where its code states them."""

    enabled: bool = False
    # The vision model whose patch tokens the REPA loss aligns to, as alignment.model: a local folder or a
    # Hugging Face id in the local cache (REPA-E: dinov2-vit-b). It sees what REPA-E's DINOv2 sees: the image in
    # [0, 1] normalised with ImageNet's mean and std, bicubic to 14 pixels per token of the transformer.
    model: str = "facebook/dinov2-base"
    # The transformer's width, depth and heads: a key of first_stage.dit.DIT_SIZES ("base": SiT-B/DiT-B).
    transformer: Literal["tiny", "small", "base", "large", "xlarge"] = "base"
    patch: int | None = None  # its patch size; None: 1 up to 16-wide latents, 2 above (SiT-B/2 for f8 at 256²)
    encoder_depth: int = 8  # the REPA projector reads the tokens after this block (REPA-E's --encoder-depth)
    projector_dim: int = 2048  # the projector MLP's hidden width
    # VAE step: + align_weight × the REPA loss of the align pass (transformer frozen, BatchNorm in eval mode), stated
    # against a per-element mean NLL as REPA-E's: under loss.reduction "sum" it is multiplied by the image's 3·H·W
    align_weight: float = 1.5  # --vae-align-proj-coeff
    proj_coeff: float = 0.5  # transformer step: flow-matching loss + proj_coeff × its REPA loss (--proj-coeff)
    path: Literal["linear", "cosine"] = "linear"  # the interpolant (--path-type)
    time_sampling: Literal["uniform", "lognormal"] = "uniform"  # how t is drawn (--weighting)
    # The transformer's AdamW (REPA-E: lr 1e-4, betas 0.9/0.999, wd 0, eps 1e-8, clip 1.0, constant lr).
    lr: float = 1.0e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1.0e-8
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999  # the transformer's EMA, its BatchNorm buffers included (no warm-up, REPA-E's)
    bn_momentum: float = 0.1  # the latent BatchNorm (affine off; its buffers are the exported normaliser)
    bn_eps: float = 1.0e-4
    # Images whose posterior samples give the BatchNorm's starting statistics before the first step of a new run
    # (REPA-E measures its dataset beforehand); 0: the first micro-batch's latents.
    bn_init_images: int = 1024
    # Continue from an export's finetune/e2e_transformer.safetensors (its EMA read from e2e_transformer_ema.safetensors
    # beside it when there); None: a new transformer, its BatchNorm measured at the first step.
    init_from: str | None = None


@dataclass(frozen=True)
class DataConfig:
    source: Literal["sample", "imagefolder", "hub", "webdataset"] = "sample"
    path: str | None = None  # folder, hub dataset name, or tar shard pattern
    name: str | None = None  # hub dataset configuration
    split: str = "train"
    image_column: str = "image"
    # A column of integer class labels, carried with each image (the diffusability probe is then class-conditional):
    # "label" for an imagefolder with class sub-folders or most hub datasets; None: unlabelled.
    label_column: str | None = None
    streaming: bool = False
    resolution: int = 256  # side of the square crop
    resize: int | None = None  # resize the short side to this before cropping; None keeps it
    random_crop: bool = True
    hflip: bool = True
    num_workers: int = 0  # decoding processes; 0 decodes in the training process
    pin_memory: bool = False  # page-locked batches for faster host-to-GPU copies (CUDA only)
    prefetch_factor: int = 2  # batches each worker decodes ahead (workers stay alive between epochs)
    shuffle_buffer: int = 1000  # streaming only


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-4  # effective learning rate, no hidden scaling by batch size
    disc_lr: float | None = None  # None: same as lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0  # cosine: lr at the last step, relative to lr
    grad_clip: float | None = None  # max global grad norm; None: no clipping


@dataclass(frozen=True)
class TrainConfig:
    run_name: str = "run"
    output_dir: str = "outputs"
    seed: int = 0
    max_steps: int = 1000  # optimiser updates
    batch_size: int = 4  # per process
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema: bool = True
    ema_decay: float = 0.999
    ema_warmup: bool = True
    log_every: int = 10
    image_every: int = 100  # reconstruction grids and latent statistics
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    max_nonfinite: int = 20  # consecutive non-finite (or empty-batch) skipped steps before the run stops
    # The watchdog (REPA-E #30: a run whose gradients decayed to zero): the run stops with a checkpoint and exit
    # status 3 after this many consecutive optimiser steps whose VAE gradient norm (unscaled, before clipping) is
    # at most vanishing_grad_norm; 0 switches it off.
    max_vanishing_steps: int = 20
    vanishing_grad_norm: float = 1.0e-10
    tracker: Literal["auto", "tensorboard", "wandb", "jsonl"] = "auto"


@dataclass(frozen=True)
class PerformanceConfig:
    """Speed and memory switches. Defaults are those measured faster on the CPU (docs/benchmarks.md);
    none changes the saved or exported weights' keys."""

    tf32: bool = False  # TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later)
    fused_optimizer: bool = False  # AdamW(fused=True): one kernel for the whole update
    compile: bool = False  # torch.compile the autoencoder, LPIPS and discriminator in place
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    channels_last: bool = False  # NHWC memory format for the networks and their inputs
    gradient_checkpointing: bool = False  # recompute the autoencoder's activations in backward
    attention: Literal["sdpa", "xformers"] = "sdpa"  # xformers: CUDA and the xformers package only


@dataclass(frozen=True)
class ExportConfig:
    weights: Literal["ema", "raw"] = "ema"
    calibration_images: int = 64  # images whose latents give the measured scaling_factor
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # "global": scaling_factor = 1/std and shift_factor = mean (SD 1.x/2.x, SD3, FLUX pipelines);
    # "per_channel": latents_mean/latents_std per channel and scaling_factor 1 (SDXL-style pipelines).
    # "batch_norm": the BatchNorm over 2x2 patches of an AutoencoderKLFlux2, which exports it whatever this says
    # ("global" included) except "per_channel", which it refuses.
    latent_norm: Literal["global", "per_channel", "batch_norm"] = "global"
    # also write the single file: vae_ldm.safetensors in the latent-diffusion key layout, or for an
    # AutoencoderKLFlux2 ae.safetensors in Black Forest Labs' layout
    single_file: bool = True


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    equivariance: EquivarianceConfig = field(default_factory=EquivarianceConfig)
    latent_noise: LatentNoiseConfig = field(default_factory=LatentNoiseConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    fp16_safe: Fp16SafeConfig = field(default_factory=Fp16SafeConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val_data: DataConfig | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the field's type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".", source)
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads an unquoted `no` as false
            return "no"
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        # YAML 1.1 reads "1e-6" (no dot) as a string; accept any string float() reads exactly.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key below dataclass ``cls``."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        inner = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        keys += _dotted_keys(inner[0], f"{prefix}{name}.") if inner else [prefix + name]
    return keys


def _build(cls: type, raw: dict, prefix: str, source: str) -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys with the closest valid one."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            # The closest name in any section ('loss.klweight' -> 'regularizer.kl_weight'), this
            # section's first when two are as close.
            scored = [(difflib.SequenceMatcher(None, str(key), k.rsplit(".", 1)[-1]).ratio(), k.startswith(prefix), k)
                      for k in _dotted_keys(Config)]
            close = [k for ratio, _, k in sorted(scored, reverse=True)[:1] if ratio >= 0.6]
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(hints)})"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _convert(value, hints[key], prefix + key, source)
    return cls(**kwargs)


def _apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``section.key=value`` to the raw dict; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    dotted, text = assignment.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a section")
    node[leaf] = yaml.safe_load(text) if text.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config from YAML (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {Path(path).resolve()}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"{Path(path).resolve()}:{where}: not valid YAML ({problem})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for assignment in overrides:
        _apply_override(raw, assignment)
    if overrides:
        source += " with --set " + " ".join(overrides)
    return checked(_build(Config, raw, "", source), source)


def with_overrides(config: Config, overrides: list[str] | tuple[str, ...], source: str = "--set") -> Config:
    """``config`` with ``section.key=value`` assignments applied, checked like a config file."""
    raw = to_dict(config)
    for assignment in overrides:
        _apply_override(raw, assignment)
    source = f"{source} {' '.join(overrides)}"
    return checked(_build(Config, raw, "", source), source)


def checked(config: Config, source: str) -> Config:
    """``config`` after the range and cross-section checks of the run's sections and of every loss
    term (``first_stage.terms.check_config``); a failure names the key and ``source``."""
    from .terms import check_config  # the terms import this module

    try:
        check_config(config)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return config


# Keys added after runs were saved with the behaviour they now switch off, and the value that keeps it
# (alignment and equivariance followed VA-VAE and EQ-VAE by default from first-stage 0.3). A saved
# config is the whole resolved config, so a key it lacks was not there when the run started.
FORMER_DEFAULTS = {"alignment.normalize": True, "alignment.interpolation": "bicubic", "alignment.antialias": True,
                   "alignment.projection_bias": True, "equivariance.antialias": True, "equivariance.lowres_half": True}


def changed_since(saved: dict, config: Config) -> list[str]:
    """``--set`` assignments that keep what a run saved as ``saved`` (its config.yaml, as a dict) trained
    with, for each key of :data:`FORMER_DEFAULTS` it lacks whose value in ``config`` differs, in an
    enabled section."""
    keep = []
    for key, former in FORMER_DEFAULTS.items():
        section, name = key.split(".")
        current = getattr(getattr(config, section), name)
        if getattr(config, section).enabled and name not in (saved.get(section) or {}) and current != former:
            keep.append(f"{key}={str(former).lower() if isinstance(former, bool) else former}")
    return keep


def exported_weights(config: Config) -> str:
    """The weights a run's export takes: ``export.weights``, or the raw ones when it kept no EMA."""
    return config.export.weights if config.train.ema else "raw"


def to_dict(config: Config) -> dict:
    """The config as plain YAML-safe data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML; :func:`load_config` reads it back to an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(config))
    return path


def config_hash(config: Config) -> str:
    """A short, stable hash of the resolved config (recorded in checkpoints and exports)."""
    return hashlib.sha256(to_yaml(config).encode()).hexdigest()[:16]
