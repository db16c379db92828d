"""The autoencoder: diffusers' ``AutoencoderKL`` or ``AutoencoderKLFlux2`` itself, built from named presets,
plus a thin training wrapper that runs the whole forward pass through one module (so DDP sees it).

The two classes share the encoder, decoder and posterior; ``AutoencoderKLFlux2`` adds ``bn``, a non-affine
``BatchNorm2d`` over 2×2-patchified latents whose running statistics are how FLUX.2 pipelines normalise
latents. Its ``encode``/``decode`` never call ``bn``, so training runs through the same wrapper and the
BatchNorm's statistics never move during training (it has no parameters): the export measures them
(:class:`first_stage.latent_norm.LatentNormalizer`, kind ``batch_norm``).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, AutoencoderTiny
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from .config import ConfigError, ModelConfig
from .equivariance import LatentTransform, add_decoder_noise, resize


def _levels(channels: tuple[int, ...], attention_at_lowest: bool = False) -> dict:
    """Encoder/decoder block types for one level per entry of ``channels``; with
    ``attention_at_lowest`` the lowest-resolution level has self-attention after each of its
    blocks (latent-diffusion's ``attn_resolutions`` at the latent resolution)."""
    down = ("DownEncoderBlock2D",) * len(channels)
    up = ("UpDecoderBlock2D",) * len(channels)
    if attention_at_lowest:  # the last down level and the first up level run at the latent resolution
        down, up = down[:-1] + ("AttnDownEncoderBlock2D",), ("AttnUpDecoderBlock2D",) + up[1:]
    return {"block_out_channels": channels, "down_block_types": down, "up_block_types": up}


# The autoencoder classes presets, checkpoints and imports build, by the name diffusers writes into a
# folder's config.json (``_class_name``).
# AutoencoderTiny (TAESD) is trained only as a distillation student (config section ``teacher``): its encoder
# and decoder work on the teacher's normalised latents, with no posterior of its own.
CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderKLFlux2": AutoencoderKLFlux2, "AutoencoderTiny": AutoencoderTiny}
Autoencoder = AutoencoderKL | AutoencoderKLFlux2 | AutoencoderTiny

# Constructor arguments of the class ``_class_name`` (AutoencoderKL when absent). Downsampling factor =
# 2 ** (levels - 1).
PRESETS: dict[str, dict] = {
    # For tests and the quickstart: 2 levels (f2), < 1 M parameters.
    "tiny": {**_levels((32, 64)), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8},
    # SD 1.x kl-f8 (latent-diffusion autoencoder_kl_32x32x4): 83.65 M parameters.
    "sd-f8c4": {**_levels((128, 256, 512, 512)), "layers_per_block": 2, "latent_channels": 4},
    # SD3/FLUX-style: the same trunk with 16 latent channels.
    "f8c16": {**_levels((128, 256, 512, 512)), "layers_per_block": 2, "latent_channels": 16},
    # VA-VAE's f16d32 (LightningDiT vavae: ch_mult 1,1,2,2,4, attn_resolutions [16] at 256²): five
    # levels, 32 latent channels, attention at the lowest resolution.
    "f16c32": {**_levels((128, 128, 256, 256, 512), attention_at_lowest=True), "layers_per_block": 2,
               "latent_channels": 32},
    # FLUX.2's VAE: diffusers' AutoencoderKLFlux2 defaults (BFL's AutoEncoderParams: ch 128, ch_mult 1,2,4,4,
    # 32 latent channels, BatchNorm over 2x2 patches, eps 1e-4): 84.05 M parameters.
    "flux2": {"_class_name": "AutoencoderKLFlux2", **_levels((128, 256, 512, 512)), "layers_per_block": 2,
              "latent_channels": 32},
    # For tests and the quickstart: the FLUX.2 class at 2 levels (f2). Widths stay multiples of 32 because
    # BFL's reference code hard-codes 32 GroupNorm groups, so its ae.safetensors layout loads there too.
    "flux2-tiny": {"_class_name": "AutoencoderKLFlux2", **_levels((32, 64)), "layers_per_block": 1,
                   "latent_channels": 8},
    # TAESD (madebyollin/taesd): diffusers' AutoencoderTiny defaults, f8, 64 channels throughout, 2.45 M
    # parameters; a distillation student of a teacher with 4 latent channels (override latent_channels for others).
    "taesd": {"_class_name": "AutoencoderTiny", "encoder_block_out_channels": (64, 64, 64, 64),
              "decoder_block_out_channels": (64, 64, 64, 64), "num_encoder_blocks": (1, 3, 3, 3),
              "num_decoder_blocks": (3, 3, 3, 1), "latent_channels": 4},
    # For tests: the TAESD shape at 2 levels (f2), a student of the "tiny" preset.
    "taesd-tiny": {"_class_name": "AutoencoderTiny", "encoder_block_out_channels": (16, 16),
                   "decoder_block_out_channels": (16, 16), "num_encoder_blocks": (1, 1), "num_decoder_blocks": (1, 1),
                   "latent_channels": 4},
}

# Weight dtypes by the names configs and command lines use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP16_MAX = torch.finfo(torch.float16).max  # 65504
# The state entries that fix a KL-class VAE's latents: encoder, quant_conv, the FLUX.2 BatchNorm's statistics.
ENCODER_PREFIXES = ("encoder.", "quant_conv.", "bn.running_")
CLASS_ARGS = {name: [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
              for name, cls in CLASSES.items()}
AUTOENCODER_ARGS = CLASS_ARGS["AutoencoderKL"]


def preset_class(preset: str) -> str:
    """The class name a preset builds."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return PRESETS[preset].get("_class_name", "AutoencoderKL")


def autoencoder_kwargs(cfg: ModelConfig) -> dict:
    """The preset's constructor arguments (of :func:`preset_class`) with ``cfg.overrides`` applied, names checked."""
    name = preset_class(cfg.preset)
    unknown = [k for k in cfg.overrides if k not in CLASS_ARGS[name]]
    if unknown:
        raise ConfigError(f"model.overrides: {unknown} are not {name} arguments; valid: {CLASS_ARGS[name]}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in {**PRESETS[cfg.preset], **cfg.overrides}.items() if k != "_class_name"}
    if "block_out_channels" in cfg.overrides and "down_block_types" not in cfg.overrides:
        kwargs.update(_levels(kwargs["block_out_channels"]))  # keep one block type per level
    return kwargs


def new_autoencoder(cfg: ModelConfig) -> Autoencoder:
    """A freshly initialised autoencoder of the config's preset and overrides (``cfg.init_from``
    is not read here: :func:`first_stage.checkpoint.build_autoencoder` loads it)."""
    return CLASSES[preset_class(cfg.preset)](**autoencoder_kwargs(cfg))


def class_of_config(config: dict, where: str) -> type:
    """The autoencoder class a diffusers config (``config.json`` as a dict) names; ``where`` is the
    file or folder it came from, for the error."""
    name = config.get("_class_name", "AutoencoderKL")
    if name not in CLASSES:
        raise ValueError(f"{where}: holds a {name}, not one of the autoencoder classes this package reads "
                         f"({', '.join(CLASSES)})")
    return CLASSES[name]


def autoencoder_from_config(config: dict, where: str) -> Autoencoder:
    """A freshly initialised autoencoder of the class and arguments of a diffusers config dict."""
    return class_of_config(config, where).from_config(config)


def has_batch_norm(vae: nn.Module) -> bool:
    """Whether ``vae`` is of the FLUX.2 class, whose latent normalisation is its BatchNorm over patches."""
    return isinstance(vae, AutoencoderKLFlux2)


def encoder_fingerprint(vae: Autoencoder) -> str:
    """SHA-256 of what fixes a VAE's latents: its encoder, quant_conv and (FLUX.2 class) BatchNorm statistics,
    as stored. Equal fingerprints mean bit-identical latents, so an export may keep the normalisation of the
    released VAE it started from instead of re-measuring it."""
    digest = hashlib.sha256()
    for key, value in sorted(vae.state_dict().items()):
        if key.startswith(ENCODER_PREFIXES):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_tiny(vae: nn.Module) -> bool:
    """Whether ``vae`` is an ``AutoencoderTiny`` (TAESD): no posterior, trained only as a distillation student."""
    return isinstance(vae, AutoencoderTiny)


def encode_latent(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The raw latent (B, C, h, w), in the VAE's dtype, of images (B, 3, H, W) in [-1, 1]: the posterior mode
    (= mean) of the KL classes, an ``AutoencoderTiny``'s ``latents``, an ``AutoencoderDC``'s ``latent``; an
    ``AutoencoderKLQwenImage`` encodes each image as one frame (B, 3, 1, H, W)."""
    x = x.to(vae.device, vae.dtype)
    if isinstance(vae, AutoencoderTiny):
        return vae.encode(x).latents
    if isinstance(vae, AutoencoderDC):
        return vae.encode(x).latent
    if isinstance(vae, AutoencoderKLQwenImage):
        return vae.encode(x.unsqueeze(2)).latent_dist.mode().squeeze(2)
    return vae.encode(x).latent_dist.mode()


def decode_latent(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in the VAE's dtype (about [-1, 1]) decoded from raw latents (B, C, h, w)."""
    z = z.to(vae.device, vae.dtype)
    if isinstance(vae, AutoencoderKLQwenImage):
        return vae.decode(z.unsqueeze(2)).sample.squeeze(2)
    return vae.decode(z).sample


def downsampling_factor(config) -> int:
    """Pixels per latent cell along a side: one 2x downsampling between consecutive levels of an
    ``AutoencoderKL``, ``AutoencoderKLFlux2`` or ``AutoencoderTiny`` (its encoder's levels) config."""
    levels = getattr(config, "encoder_block_out_channels", None) or config.block_out_channels
    return 2 ** (len(levels) - 1)


def cast(vae: Autoencoder, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
         copy_first: bool = False) -> Autoencoder:
    """``vae`` (or a copy) on ``device`` in ``dtype``, in eval mode. Uses ``nn.Module.to``: diffusers'
    ``ModelMixin.to`` (0.42) warns about fp32-only modules on every dtype cast, though AutoencoderKL has none.
    A FLUX.2-class ``bn`` stays float32: its statistics are the latent normalisation, read, never run."""
    vae = copy.deepcopy(vae) if copy_first else vae
    for name, child in vae.named_children():
        if dtype is not None and not (name == "bn" and has_batch_norm(vae)):
            nn.Module.to(child, dtype=dtype)
    return nn.Module.to(vae, device=device).eval()


def set_trainable(vae: Autoencoder, trainable: str) -> None:
    """Freeze what does not train: ``"decoder"`` freezes the encoder and quant_conv (latent space fixed).
    A FLUX.2-class ``bn`` has no parameters: nothing trains it by gradient."""
    vae.requires_grad_(True)
    if trainable == "decoder":
        vae.encoder.requires_grad_(False)
        if getattr(vae, "quant_conv", None) is not None:
            vae.quant_conv.requires_grad_(False)
    elif trainable != "all":
        raise ConfigError(f"model.trainable: {trainable!r} is not 'all' or 'decoder'")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class ForwardPlan:
    """What one forward pass does besides encode, sample, decode; each loss term fills in its part
    (``LossTerm.plan``; the fields' operators are in first_stage.equivariance)."""

    transform: LatentTransform | None = None  # EQ-VAE: decode T(z) against the target T(x)
    lowres: LatentTransform | None = None  # prior preservation: encode and reconstruct lowres.image(x)
    decoder_noise: torch.Tensor | None = None  # (B,C,S,S) ε for the decoder's input, cropped to the latent
    noise_levels: torch.Tensor | None = None  # (B,) u·tau per image (0: clean)
    reference_std: float | None = None  # latent_noise.reference_std
    scale_factors: tuple[int, ...] = ()  # 2502.14831: also decode down_s(z) for each s
    antialias: bool = False  # equivariance.antialias, for the scale term's resizes
    diffusion: object | None = None  # e2e: the transformer's t, noise and vision tokens (first_stage.e2e.DiffusionDraw)


class AutoencoderOutput(NamedTuple):
    """One forward pass. ``target`` is what ``reconstruction`` should equal: the input, or its
    transform under ``plan.transform``; ``inputs`` is what the encoder saw (the image, or its
    low-resolution version under ``plan.lowres``)."""

    reconstruction: torch.Tensor  # (B,3,H',W')
    posterior: DiagonalGaussianDistribution  # over (B,C,h,w)
    logvar: torch.Tensor  # the loss's scalar log-variance
    target: torch.Tensor  # (B,3,H',W')
    inputs: torch.Tensor  # (B,3,H,W)
    z: torch.Tensor  # (B,C,h,w) the posterior sample, before any transform or decoder noise
    projected: torch.Tensor | None = None  # (B,D,h,w) the alignment projection of z
    scaled: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # (down_s(x), D(down_s(z))) per factor s
    latents: torch.Tensor | None = None  # (B,C,h,w) an AutoencoderTiny student's own encoding of the inputs


def posterior_sample(posterior: DiagonalGaussianDistribution, noise: torch.Tensor | None) -> torch.Tensor:
    """``mean + std * noise``, with ``noise``'s top-left corner the size of the latent (smaller under
    ``plan.lowres``), or a fresh draw when ``noise`` is None."""
    if noise is None:
        return posterior.sample()
    noise = noise[..., :posterior.mean.shape[-2], :posterior.mean.shape[-1]]
    return posterior.mean + posterior.std * noise.to(posterior.mean.dtype)


class AutoencoderWrapper(nn.Module):
    """What Accelerate prepares: the autoencoder, the loss's log-variance and (with alignment) the
    trained 1x1 projection of latents to the vision model's features, in one module.

    ``forward(x)`` encodes, samples the posterior and decodes in a single call, so that under DDP
    every parameter is used inside the wrapped forward. The log-variance and the projection live
    here (not in the exported model) so that DDP averages their gradients like any other parameter.
    """

    def __init__(self, vae: Autoencoder, logvar_init: float = 0.0, learn_logvar: bool = False,
                 projection: nn.Module | None = None, teacher=None):
        super().__init__()
        self.vae = vae
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.projection = projection
        self.factor = downsampling_factor(vae.config)
        # An AutoencoderTiny student's first_stage.teacher.Teacher (a plain object, not a submodule: it is
        # frozen, never saved with the student), whose posterior gives the latents the student decodes.
        if is_tiny(vae) and teacher is None:
            raise ValueError("an AutoencoderTiny trains only as a distillation student: set teacher.path")
        self.teacher = teacher if is_tiny(vae) else None

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None,
                plan: ForwardPlan | None = None) -> AutoencoderOutput:
        """(B,3,H,W) images in [-1,1] → :class:`AutoencoderOutput`.

        The latent is ``mean + std * noise``; ``noise`` (B,C,h,w) defaults to fresh N(0, I) draws
        (under ``plan.lowres`` its top-left corner the size of the smaller latent is used).
        """
        plan = plan or ForwardPlan()
        if self.teacher is not None:
            return self._student_forward(x, noise)
        if plan.lowres is not None:
            x = plan.lowres.image(x, self.factor)
        posterior = self.vae.encode(x).latent_dist
        z = posterior_sample(posterior, noise)
        z_decoded, target = z, x
        if plan.transform is not None:
            z_decoded, target = plan.transform.latent(z), plan.transform.image(x, self.factor)
        if plan.noise_levels is not None:
            z_decoded = add_decoder_noise(z_decoded, plan.decoder_noise, plan.noise_levels, plan.reference_std)
        reconstruction = self.vae.decode(z_decoded).sample
        scaled = []
        for s in plan.scale_factors:
            side = (z.shape[-2] // s, z.shape[-1] // s)
            if min(side) < 1:
                raise ValueError(f"equivariance.scale_factors: a {tuple(z.shape[-2:])} latent cannot be "
                                 f"downsampled {s}x")
            x_scaled = resize(x, (side[0] * self.factor, side[1] * self.factor), plan.antialias)
            scaled.append((x_scaled, self.vae.decode(resize(z, side, plan.antialias)).sample))
        projected = self.projection(z) if self.projection is not None else None
        return AutoencoderOutput(reconstruction, posterior, self.logvar, target, x, z, projected, tuple(scaled))

    def _student_forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> AutoencoderOutput:
        """An AutoencoderTiny student's pass: the teacher's posterior sample, normalised as the teacher's
        pipelines normalise it, through the student's decoder; and the student's encoding of ``x``, which
        learns the teacher's normalised posterior mean (first_stage.teacher.TeacherTerm)."""
        posterior = self.teacher.posterior(x)
        z = posterior_sample(posterior, noise)
        reconstruction = self.vae.decode(self.teacher.normalise(z)).sample
        return AutoencoderOutput(reconstruction, posterior, self.logvar, x, x, z, latents=self.vae.encode(x).latents)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """(the decoding of the posterior mode, the posterior) of ``x``: for an AutoencoderTiny student the
        teacher's posterior, normalised, through the student's decoder."""
        if self.teacher is not None:
            posterior = self.teacher.posterior(x)
            return self.vae.decode(self.teacher.normalise(posterior.mode())).sample, posterior
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.mode()).sample, posterior

    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight, where the adaptive GAN weight is measured."""
        return self.vae.decoder.layers[-1].weight if is_tiny(self.vae) else self.vae.decoder.conv_out.weight

    def encoder_last_layer(self) -> torch.Tensor:
        """The encoder's output convolution weight, where the adaptive alignment weight is measured."""
        return self.vae.encoder.layers[-1].weight if is_tiny(self.vae) else self.vae.encoder.conv_out.weight
