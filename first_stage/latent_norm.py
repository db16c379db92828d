"""How a pipeline maps an export's latent into the diffusion model's space and back: one type that the
export writes from and every reader (the export's own check, the model card, latent statistics, the
diffusability probe) reads with.

Kinds, each as diffusers pipelines apply it to a latent z (B, C, h, w):

- ``global``: z' = (z − shift_factor) · scaling_factor (SD3 and FLUX pipelines; SD 1.x/2.x pipelines
  read ``scaling_factor`` alone, i.e. a shift of 0).
- ``per_channel``: z' = (z − latents_mean_c) · scaling_factor / latents_std_c (the SDXL pipelines, and
  every pipeline that reads ``latents_mean``/``latents_std``, e.g. LTX and Wan).
- ``batch_norm``: FLUX.2's ``AutoencoderKLFlux2``. z is cut into 2×2 patches, (B, C, h, w) →
  (B, 4C, h/2, w/2) with patch channel k = c·4 + 2·pi + pj (einops ``c (i pi) (j pj) -> (c pi pj) i j``,
  BFL's ``AutoEncoder.encode`` and diffusers' ``Flux2Pipeline._patchify_latents``; diffusers' Ideogram4
  pipeline reads ``(pi pj c)`` instead), then z'_k = (z_k − running_mean_k) / sqrt(running_var_k + eps),
  the VAE's ``bn`` in eval mode. The statistics live in the model's ``bn`` buffers, not in its config;
  eps is the config's ``batch_norm_eps`` (1e-4, hard-coded in BFL's code; ERNIE-Image's pipeline uses 1e-5).

Every kind is ``z' = (layout(z) − shift_k) · scale_k`` per channel k of the layout (the identity for the
first two, the patches for ``batch_norm``): :meth:`LatentNormalizer.shift_and_scale`. ``normalize``
returns what the diffusion model sees — patches, for ``batch_norm`` — and ``denormalize`` takes that back
to the (B, C, h, w) latent the decoder reads. A new kind is a branch of ``shift_and_scale``, ``layout``,
``config_entries`` and ``describe``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("global", "per_channel", "batch_norm")
PATCH_ORDER = "(c pi pj)"  # how batch_norm's patch channels are ordered (BFL's code, diffusers' Flux2Pipeline)


@dataclass(frozen=True)
class LatentNormalizer:
    """A latent normalisation: ``kind`` and the fields it reads: the diffusers config fields
    (``latents_mean`` and ``latents_std`` only for ``per_channel``, one value per latent channel), or for
    ``batch_norm`` the BatchNorm's ``running_mean`` and ``running_var`` (one value per patch channel, in
    :data:`PATCH_ORDER`), its ``eps`` and the ``patch_size``."""

    kind: str
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    running_mean: tuple[float, ...] | None = None
    running_var: tuple[float, ...] | None = None
    eps: float = 0.0
    patch_size: tuple[int, int] = (1, 1)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"latent normalisation must be one of {KINDS}, got {self.kind!r}")
        per_channel = self.latents_mean is not None and self.latents_std is not None
        if per_channel != (self.kind == "per_channel"):
            raise ValueError("latents_mean and latents_std are set for 'per_channel' normalisation only, and both")
        if per_channel and len(self.latents_mean) != len(self.latents_std):
            raise ValueError(f"latents_mean has {len(self.latents_mean)} channels, latents_std {len(self.latents_std)}")
        batch_norm = self.running_mean is not None and self.running_var is not None
        if batch_norm != (self.kind == "batch_norm") or (self.kind != "batch_norm" and self.patch_size != (1, 1)):
            raise ValueError("running_mean, running_var and patch_size are set for 'batch_norm' normalisation only")
        if batch_norm and len(self.running_mean) != len(self.running_var):
            raise ValueError(f"running_mean has {len(self.running_mean)} channels, running_var {len(self.running_var)}")

    @classmethod
    def of(cls, vae: nn.Module) -> LatentNormalizer:
        """What pipelines read from a VAE: the running statistics of an ``AutoencoderKLFlux2``'s ``bn``
        (with its config's ``batch_norm_eps`` and ``patch_size``), else :meth:`from_vae_config`."""
        bn = getattr(vae, "bn", None)
        if not isinstance(bn, nn.BatchNorm2d):
            return cls.from_vae_config(vae.config)
        return cls("batch_norm", running_mean=_floats(bn.running_mean), running_var=_floats(bn.running_var),
                   eps=float(vae.config.batch_norm_eps), patch_size=tuple(vae.config.patch_size))

    def with_statistics(self, mean: Sequence[float], var: Sequence[float]) -> LatentNormalizer:
        """This ``batch_norm`` normaliser with other running statistics (stored as float32, as the buffers)."""
        return dataclasses.replace(self, running_mean=_floats(torch.as_tensor(mean, dtype=torch.float32)),
                                   running_var=_floats(torch.as_tensor(var, dtype=torch.float32)))

    def write_to(self, vae: nn.Module) -> None:
        """Set an ``AutoencoderKLFlux2``'s ``bn`` running statistics to this normaliser's (float32)."""
        if self.kind != "batch_norm" or not isinstance(getattr(vae, "bn", None), nn.BatchNorm2d):
            raise ValueError(f"only a 'batch_norm' normaliser is written into a VAE's bn, and only one with a bn "
                             f"(got {self.kind!r} for a {type(vae).__name__})")
        with torch.no_grad():
            vae.bn.running_mean.copy_(torch.tensor(self.running_mean))
            vae.bn.running_var.copy_(torch.tensor(self.running_var))

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

    def layout(self, z: torch.Tensor) -> torch.Tensor:
        """The latent (B, C, h, w) in the layout whose channels are normalised: itself, or for ``batch_norm``
        its patches (B, C·pi·pj, h/pi, w/pj) in :data:`PATCH_ORDER`."""
        pi, pj = self.patch_size
        if (pi, pj) == (1, 1):
            return z
        b, c, h, w = z.shape
        if h % pi or w % pj:
            raise ValueError(f"a {h}×{w} latent cannot be cut into {pi}×{pj} patches for the FLUX.2 BatchNorm "
                             f"normalisation: its sides must be multiples of {pi} and {pj}")
        patches = z.view(b, c, h // pi, pi, w // pj, pj).permute(0, 1, 3, 5, 2, 4)  # (B, C, pi, pj, h', w')
        return patches.reshape(b, c * pi * pj, h // pi, w // pj)

    def unlayout(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`layout`: patches (B, C·pi·pj, h', w') back to the latent (B, C, h'·pi, w'·pj)."""
        pi, pj = self.patch_size
        if (pi, pj) == (1, 1):
            return z
        b, k, h, w = z.shape
        c = k // (pi * pj)
        return z.reshape(b, c, pi, pj, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * pi, w * pj)

    def shift_and_scale(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale), each (channels,) float64, with z' = (layout(z) − shift) · scale per channel."""
        if self.kind == "global":
            return (torch.full((channels,), self.shift_factor, dtype=torch.float64),
                    torch.full((channels,), self.scaling_factor, dtype=torch.float64))
        if self.kind == "per_channel":
            mean, std = self.latents_mean, self.latents_std
            scale = self.scaling_factor / torch.tensor(std, dtype=torch.float64)
        else:
            mean, var = self.running_mean, torch.tensor(self.running_var, dtype=torch.float64)
            scale = (var + self.eps).rsqrt()
        if len(mean) != channels:
            raise ValueError(f"the {self.kind} normalisation has {len(mean)} channels, the latent {channels}")
        return torch.tensor(mean, dtype=torch.float64), scale

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latent for an encoder latent z (B, C, h, w), as pipelines encode; for
        ``batch_norm`` it is the patches (B, 4C, h/2, w/2) the transformer reads."""
        z = self.layout(z)
        shift, scale = (t.to(z.device, z.dtype).view(1, -1, 1, 1) for t in self.shift_and_scale(z.shape[1]))
        return (z - shift) * scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The encoder latent (B, C, h, w) for a diffusion model's latent (what :meth:`normalize` returns),
        as pipelines decode."""
        shift, scale = (t.to(z.device, z.dtype).view(1, -1, 1, 1) for t in self.shift_and_scale(z.shape[1]))
        return self.unlayout(z / scale + shift)

    def channel_scale(self, channels: int) -> torch.Tensor:
        """The factor each channel of the layout is multiplied by, (C,) float64: how the carried and implied
        normalisers of latent statistics compare."""
        return self.shift_and_scale(channels)[1]

    def over(self, other: LatentNormalizer, channels: int) -> torch.Tensor:
        """Per channel, how much more this normaliser scales than ``other`` (C,): the carried over the
        implied normaliser of latent statistics, 1 where the carried one is calibrated."""
        return self.channel_scale(channels) / other.channel_scale(channels)

    def config_entries(self) -> dict:
        """The config fields that carry this normalisation: for ``AutoencoderKL`` all four (the unused ones
        None); for ``batch_norm`` the ``AutoencoderKLFlux2`` fields (its statistics are the ``bn`` buffers)."""
        if self.kind == "batch_norm":
            return {"batch_norm_eps": self.eps, "patch_size": list(self.patch_size)}
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
        if self.kind == "batch_norm":
            var, (pi, pj) = self.running_var, self.patch_size
            return (f"BatchNorm over {pi}×{pj} patches: z' = (patches(z)_k − running_mean_k) / sqrt(running_var_k + "
                    f"{self.eps:g}), k over {len(var)} patch channels in order {PATCH_ORDER}, running_var "
                    f"{min(var):.4g} … {max(var):.4g} (the VAE's bn: FLUX.2 pipelines, BFL's AutoEncoder.encode)")
        std = self.latents_std
        return (f"per channel: z' = (z − latents_mean_c) · {self.scaling_factor:.5g} / latents_std_c, latents_std "
                f"{min(std):.4g} … {max(std):.4g} over {len(std)} channels (SDXL-style pipelines)")


def _floats(t: torch.Tensor) -> tuple[float, ...]:
    """A float32 tensor's values as Python floats (exact)."""
    return tuple(float(v) for v in t.detach().float().cpu().tolist())


def worst_ratio(ratios: torch.Tensor) -> float:
    """The ratio of ``ratios`` (C,) farthest from 1 on a log scale: 1 only when every channel is calibrated."""
    return ratios[ratios.log().abs().argmax()].item()
