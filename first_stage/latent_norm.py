"""How a pipeline maps an export's latent into the diffusion model's space and back: one type that the
export writes from and every reader (the export's own check, the model card, latent statistics, the
diffusability probe) reads with.

Kinds, each as diffusers pipelines apply it to a latent z (B, C, h, w):

- ``global``: z' = (z − shift_factor) · scaling_factor (SD3 and FLUX pipelines; SD 1.x/2.x pipelines
  read ``scaling_factor`` alone, i.e. a shift of 0).
- ``per_channel``: z' = (z − latents_mean_c) · scaling_factor / latents_std_c (the SDXL pipelines, and
  every pipeline that reads ``latents_mean``/``latents_std``, e.g. LTX and Wan).

A new kind is one more branch of :meth:`LatentNormalizer.normalize`, :meth:`~LatentNormalizer.denormalize`,
:meth:`~LatentNormalizer.config_entries` and :meth:`~LatentNormalizer.describe`. FLUX.2's BatchNorm over
2×2 patches fits the same seam: it folds z (B, C, h, w) into (B, 4C, h/2, w/2) patches, normalises each
of the 4C patch channels by its running mean and variance, and unfolds; that is why ``normalize`` and
``denormalize`` take and return whole latents rather than per-channel factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

KINDS = ("global", "per_channel")


@dataclass(frozen=True)
class LatentNormalizer:
    """A latent normalisation: ``kind`` and the diffusers config fields it reads (``latents_mean`` and
    ``latents_std`` only for ``per_channel``, one value per latent channel)."""

    kind: str
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"latent normalisation must be one of {KINDS}, got {self.kind!r}")
        per_channel = self.latents_mean is not None and self.latents_std is not None
        if per_channel != (self.kind == "per_channel"):
            raise ValueError("latents_mean and latents_std are set for 'per_channel' normalisation only, and both")
        if per_channel and len(self.latents_mean) != len(self.latents_std):
            raise ValueError(f"latents_mean has {len(self.latents_mean)} channels, latents_std {len(self.latents_std)}")

    @classmethod
    def from_vae_config(cls, config: Mapping) -> LatentNormalizer:
        """What a diffusers pipeline reads from an ``AutoencoderKL`` config (``vae.config`` or the dict of
        ``config.json``): per channel when ``latents_mean`` and ``latents_std`` are both set, else global."""
        mean, std = config.get("latents_mean"), config.get("latents_std")
        scaling = float(config.get("scaling_factor") or 1.0)
        if mean is not None and std is not None:
            return cls("per_channel", scaling, latents_mean=tuple(map(float, mean)), latents_std=tuple(map(float, std)))
        return cls("global", scaling, float(config.get("shift_factor") or 0.0))

    @classmethod
    def measured(cls, kind: str, mean: float, std: float, channel_mean: Sequence[float],
                 channel_std: Sequence[float]) -> LatentNormalizer:
        """The normaliser of ``kind`` that maps latents of the given mean and std (over all elements,
        and per channel) to mean 0 and std 1: ``global`` scales by 1/std, ``per_channel`` by 1/std_c."""
        if kind == "global":
            return cls("global", 1.0 / std, float(mean))
        return cls(kind, 1.0, latents_mean=tuple(map(float, channel_mean)), latents_std=tuple(map(float, channel_std)))

    def _channel(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        """``values`` (C,) as a (1, C, 1, 1) tensor on z's device and dtype."""
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latent for an encoder latent z (B, C, h, w), as pipelines encode."""
        if self.kind == "global":
            return (z - self.shift_factor) * self.scaling_factor
        return (z - self._channel(self.latents_mean, z)) * self.scaling_factor / self._channel(self.latents_std, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The encoder latent (B, C, h, w) for a diffusion model's latent, as pipelines decode."""
        if self.kind == "global":
            return z / self.scaling_factor + self.shift_factor
        return z * self._channel(self.latents_std, z) / self.scaling_factor + self._channel(self.latents_mean, z)

    def channel_scale(self, channels: int) -> torch.Tensor:
        """The factor each channel is multiplied by, (C,) float64: how the carried and implied
        normalisers of latent statistics compare."""
        if self.kind == "global":
            return torch.full((channels,), self.scaling_factor, dtype=torch.float64)
        return self.scaling_factor / torch.tensor(self.latents_std, dtype=torch.float64)

    def over(self, other: LatentNormalizer, channels: int) -> torch.Tensor:
        """Per channel, how much more this normaliser scales than ``other`` (C,): the carried over the
        implied normaliser of latent statistics, 1 where the carried one is calibrated."""
        return self.channel_scale(channels) / other.channel_scale(channels)

    def config_entries(self) -> dict:
        """The ``AutoencoderKL`` config fields that carry this normalisation (all four, the unused ones None)."""
        if self.kind == "global":
            return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                    "latents_mean": None, "latents_std": None}
        return {"scaling_factor": self.scaling_factor, "shift_factor": None,
                "latents_mean": list(self.latents_mean), "latents_std": list(self.latents_std)}

    def describe(self) -> str:
        """One line for model cards and reports."""
        if self.kind == "global":
            return (f"global: z' = (z − {self.shift_factor:.5g}) · {self.scaling_factor:.5g} "
                    "(shift_factor, scaling_factor: SD3/FLUX pipelines; SD 1.x/2.x ignore the shift)")
        std = self.latents_std
        return (f"per channel: z' = (z − latents_mean_c) · {self.scaling_factor:.5g} / latents_std_c, latents_std "
                f"{min(std):.4g} … {max(std):.4g} over {len(std)} channels (SDXL-style pipelines)")


def worst_ratio(ratios: torch.Tensor) -> float:
    """The ratio of ``ratios`` (C,) farthest from 1 on a log scale: 1 only when every channel is calibrated."""
    return ratios[ratios.log().abs().argmax()].item()
