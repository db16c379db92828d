"""The autoencoder: diffusers' ``AutoencoderKL`` itself, built from named presets, plus a thin
training wrapper that runs the whole forward pass through one module (so DDP sees it)."""

from __future__ import annotations

import copy
import inspect

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from .config import ConfigError, ModelConfig


def _levels(channels: tuple[int, ...]) -> dict:
    """Encoder/decoder block types for one level per entry of ``channels``."""
    return {
        "block_out_channels": channels,
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
    }


# AutoencoderKL constructor arguments. Downsampling factor = 2 ** (levels - 1).
PRESETS: dict[str, dict] = {
    # For tests and the quickstart: 2 levels (f2), < 1 M parameters.
    "tiny": {**_levels((32, 64)), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8},
    # SD 1.x kl-f8 (latent-diffusion autoencoder_kl_32x32x4): 83.65 M parameters.
    "sd-f8c4": {**_levels((128, 256, 512, 512)), "layers_per_block": 2, "latent_channels": 4},
    # SD3/FLUX-style: the same trunk with 16 latent channels.
    "f8c16": {**_levels((128, 256, 512, 512)), "layers_per_block": 2, "latent_channels": 16},
}

# Weight dtypes by the names configs and command lines use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTOENCODER_ARGS = [p for p in inspect.signature(AutoencoderKL.__init__).parameters if p != "self"]


def autoencoder_kwargs(cfg: ModelConfig) -> dict:
    """The preset's ``AutoencoderKL`` arguments with ``cfg.overrides`` applied, names checked."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {cfg.preset!r}; choose from {sorted(PRESETS)}")
    unknown = [k for k in cfg.overrides if k not in AUTOENCODER_ARGS]
    if unknown:
        raise ConfigError(f"model.overrides: {unknown} are not AutoencoderKL arguments; valid: {AUTOENCODER_ARGS}")
    kwargs = {**PRESETS[cfg.preset], **cfg.overrides}
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        kwargs[key] = tuple(kwargs[key])
    if "block_out_channels" in cfg.overrides and "down_block_types" not in cfg.overrides:
        kwargs.update(_levels(kwargs["block_out_channels"]))  # keep one block type per level
    return kwargs


def new_autoencoder(cfg: ModelConfig) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` of the config's preset and overrides (``cfg.init_from``
    is not read here: :func:`first_stage.checkpoint.build_autoencoder` loads it)."""
    return AutoencoderKL(**autoencoder_kwargs(cfg))


def downsampling_factor(config) -> int:
    """Pixels per latent cell along a side: one 2x downsampling between consecutive levels of an
    ``AutoencoderKL`` config."""
    return 2 ** (len(config.block_out_channels) - 1)


def cast(vae: AutoencoderKL, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
         copy_first: bool = False) -> AutoencoderKL:
    """``vae`` (or a copy) on ``device`` in ``dtype``, in eval mode. Uses ``nn.Module.to``: diffusers'
    ``ModelMixin.to`` (0.42) warns about fp32-only modules on every dtype cast, though AutoencoderKL has none."""
    return nn.Module.to(copy.deepcopy(vae) if copy_first else vae, device=device, dtype=dtype).eval()


def set_trainable(vae: AutoencoderKL, trainable: str) -> None:
    """Freeze what does not train: ``"decoder"`` freezes the encoder and quant_conv (latent space fixed)."""
    vae.requires_grad_(True)
    if trainable == "decoder":
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    elif trainable != "all":
        raise ConfigError(f"model.trainable: {trainable!r} is not 'all' or 'decoder'")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class AutoencoderWrapper(nn.Module):
    """What Accelerate prepares: the autoencoder and the loss's log-variance in one module.

    ``forward(x)`` encodes, samples the posterior and decodes in a single call, so that under DDP
    every parameter is used inside the wrapped forward. The log-variance lives here (not in the
    exported model) so that DDP averages its gradient like any other parameter.
    """

    def __init__(self, vae: AutoencoderKL, logvar_init: float = 0.0, learn_logvar: bool = False):
        super().__init__()
        self.vae = vae
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution, torch.Tensor]:
        """(B,3,H,W) images in [-1,1] → (reconstruction, posterior over (B,C,h,w), log-variance).

        The latent is ``mean + std * noise``; ``noise`` (B,C,h,w) defaults to fresh N(0, I) draws.
        """
        posterior = self.vae.encode(x).latent_dist
        if noise is None:
            z = posterior.sample()
        else:
            z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        reconstruction = self.vae.decode(z).sample
        return reconstruction, posterior, self.logvar

    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight, where the adaptive GAN weight is measured."""
        return self.vae.decoder.conv_out.weight
