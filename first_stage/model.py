"""The autoencoder: diffusers' ``AutoencoderKL`` itself, built from named presets, plus a thin
training wrapper that runs the whole forward pass through one module (so DDP sees it)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from .config import ConfigError, ModelConfig
from .convert import autoencoder_from_ldm, infer_autoencoder_config, read_weights, split_ldm_checkpoint


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

_AUTOENCODER_ARGS = [p for p in inspect.signature(AutoencoderKL.__init__).parameters if p != "self"]


def autoencoder_kwargs(cfg: ModelConfig) -> dict:
    """The preset's ``AutoencoderKL`` arguments with ``cfg.overrides`` applied, names checked."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {cfg.preset!r}; choose from {sorted(PRESETS)}")
    unknown = [k for k in cfg.overrides if k not in _AUTOENCODER_ARGS]
    if unknown:
        raise ConfigError(f"model.overrides: {unknown} are not AutoencoderKL arguments; valid: {_AUTOENCODER_ARGS}")
    kwargs = {**PRESETS[cfg.preset], **cfg.overrides}
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        kwargs[key] = tuple(kwargs[key])
    if "block_out_channels" in cfg.overrides and "down_block_types" not in cfg.overrides:
        kwargs.update(_levels(kwargs["block_out_channels"]))  # keep one block type per level
    return kwargs


def build_autoencoder(cfg: ModelConfig) -> AutoencoderKL:
    """A fresh ``AutoencoderKL`` from the config, or one loaded from ``cfg.init_from``."""
    if cfg.init_from is not None:
        return load_autoencoder(cfg.init_from, cfg.overrides)
    return AutoencoderKL(**autoencoder_kwargs(cfg))


def load_autoencoder(path: str | Path, overrides: dict | None = None) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` folder (``config.json`` + weights), or a latent-diffusion
    single file (``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` read with ``weights_only=True``).

    A single file written by this package carries its architecture in its metadata; for any other
    the architecture is read off the weight shapes, except what weights do not show (GroupNorm
    groups: 32 as in latent-diffusion, unless ``overrides`` says otherwise).
    """
    path = Path(path)
    if path.is_file():
        state, metadata = read_weights(path)
        return autoencoder_from_ldm_weights(split_ldm_checkpoint(state)[0], metadata, overrides)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.init_from: no diffusers AutoencoderKL folder or weight file at {path.resolve()} "
            f"(looked for {path.resolve() / 'config.json'})"
        )
    return AutoencoderKL.from_pretrained(path)


def autoencoder_from_ldm_weights(vae_state: dict, metadata: dict[str, str], overrides: dict | None = None) -> AutoencoderKL:
    """An ``AutoencoderKL`` holding latent-diffusion VAE weights (no prefix), its architecture from the
    file's metadata (files written by this package) or from the weight shapes, then ``overrides``."""
    if "autoencoder_config" in metadata:
        config = json.loads(metadata["autoencoder_config"])
    else:
        config = infer_autoencoder_config(vae_state)
    config = {k: v for k, v in {**config, **(overrides or {})}.items() if k in _AUTOENCODER_ARGS}
    return autoencoder_from_ldm(vae_state, config)


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
