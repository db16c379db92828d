"""What the decoder sees besides the plain latent: EQ-VAE's transformed latents, the downsampled
latents of the scale-equivariance term (arXiv 2502.14831), and noise on its input (RAE).

Every random choice is a pure function of (seed, step) — and of the image's place in the step's
global batch, for per-image draws — so a resumed run draws the same, and every process takes the
same transform in a step (:func:`draw_transform`, :func:`decoder_noise`). The transforms act alike
on latents and images (:class:`LatentTransform`), which is what makes the loss an equivariance loss:
for an exactly equivariant autoencoder ``D(T(E(x))) = T(x)`` and the term is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ConfigError, EquivarianceConfig, LatentNoiseConfig

# Distinct streams of per-step and per-image randomness, beside the posterior noise, whose seeds are
# hash((seed, step, image)): these are 4-tuples, so no seed of theirs is a posterior-noise seed.
TRANSFORM_STREAM = 1
DECODER_NOISE_STREAM = 2
SCALE_GRID = 32  # EQ-VAE's scale factors are multiples of 1/32


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``t`` (B,C,H,W) bilinearly resized to ``size``, antialiased when it shrinks; the same operator
    for latents and images. Computed in fp32 (the antialiased kernel has no bf16 CPU version) and
    returned in ``t``'s dtype."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(t.dtype)


@dataclass(frozen=True)
class LatentTransform:
    """Scale by (sy, sx), then rotate by ``quarter_turns``·90° (counter-clockwise, torch.rot90)."""

    scale: tuple[float, float]
    quarter_turns: int = 0

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        """The (h', w') a (h, w) latent is scaled to, before the rotation; at least one cell."""
        return max(1, round(h * self.scale[0])), max(1, round(w * self.scale[1]))

    def apply(self, t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return torch.rot90(resize(t, size), self.quarter_turns, dims=(2, 3))

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        """T(z) for a (B,C,h,w) latent."""
        return self.apply(z, self.latent_size(*z.shape[-2:]))

    def image(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        """T(x) for the image of an f=``factor`` latent: scaled to exactly ``factor`` times T's latent
        size, so the reconstruction of T(z) and the target have the same shape."""
        h, w = self.latent_size(x.shape[-2] // factor, x.shape[-1] // factor)
        return self.apply(x, (h * factor, w * factor))


def check_equivariance(cfg: EquivarianceConfig) -> None:
    """Refuse values outside their range, naming the key."""
    for key in ("probability", "lowres_probability"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"equivariance.{key} must be in [0, 1], got {getattr(cfg, key)}")
    if not 0 < cfg.min_scale < cfg.max_scale <= 1:
        raise ConfigError(f"equivariance: need 0 < min_scale < max_scale <= 1, got {cfg.min_scale}, {cfg.max_scale}")
    if not scale_grid(cfg):
        raise ConfigError(f"equivariance: no multiple of 1/{SCALE_GRID} in [min_scale, max_scale) = "
                          f"[{cfg.min_scale}, {cfg.max_scale})")
    if cfg.scale_weight < 0:
        raise ConfigError(f"equivariance.scale_weight must be >= 0, got {cfg.scale_weight}")
    if any(s < 2 for s in cfg.scale_factors) or (cfg.scale_weight > 0 and not cfg.scale_factors):
        raise ConfigError(f"equivariance.scale_factors must be integers >= 2 (at least one when scale_weight > 0), "
                          f"got {list(cfg.scale_factors)}")


def check_latent_noise(cfg: LatentNoiseConfig) -> None:
    """Refuse values outside their range, naming the key."""
    if cfg.tau < 0:
        raise ConfigError(f"latent_noise.tau must be >= 0, got {cfg.tau}")
    if not 0 <= cfg.probability <= 1:
        raise ConfigError(f"latent_noise.probability must be in [0, 1], got {cfg.probability}")
    if cfg.reference_std is not None and cfg.reference_std <= 0:
        raise ConfigError(f"latent_noise.reference_std must be > 0 (or null: each image's own), got {cfg.reference_std}")


def scale_grid(cfg: EquivarianceConfig) -> list[float]:
    """The scale factors a transform draws from: n/32 in [min_scale, max_scale)."""
    return [n / SCALE_GRID for n in range(1, SCALE_GRID + 1) if cfg.min_scale <= n / SCALE_GRID < cfg.max_scale]


def draw_transform(cfg: EquivarianceConfig, seed: int, step: int) -> tuple[LatentTransform | None, bool]:
    """This step's (transform or None, low-resolution prior preservation), from (seed, step) alone."""
    if not cfg.enabled:
        return None, False
    u = torch.rand(4, generator=torch.Generator().manual_seed(hash((seed, step, -1, TRANSFORM_STREAM)))).tolist()
    if u[0] >= cfg.probability:
        return None, u[1] < cfg.lowres_probability
    scales = scale_grid(cfg)
    sy = scales[int(u[1] * len(scales))]
    sx = scales[int(u[2] * len(scales))] if cfg.anisotropic else sy
    return LatentTransform((sy, sx), 1 + int(u[3] * 3) if cfg.rotations else 0), False


def decoder_noise(cfg: LatentNoiseConfig, seed: int, step: int, first: int, n: int,
                  latent_shape: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε (n,C,S,S) with S the larger latent side, noise levels u·tau (n,)) for the images at places
    ``first`` … ``first + n - 1`` of the step's global batch; the level is 0 for an image left
    clean (probability 1 - ``cfg.probability``). Seeded per image like the posterior noise."""
    channels, side = latent_shape[0], max(latent_shape[1:])
    eps, levels = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(hash((seed, step, first + i, DECODER_NOISE_STREAM)))
        eps.append(torch.randn((channels, side, side), generator=g))
        u, keep = torch.rand(2, generator=g).tolist()
        levels.append(u * cfg.tau if keep < cfg.probability else 0.0)
    return torch.stack(eps).to(device), torch.tensor(levels, device=device)


def add_decoder_noise(z: torch.Tensor, eps: torch.Tensor, levels: torch.Tensor,
                      reference_std: float | None) -> torch.Tensor:
    """z + σ·ε with σ = level · std per image; std is each image's own latent std (detached) or
    ``reference_std``; ε is cropped to z's (h, w) (i.i.d. draws, so any crop is as good)."""
    if reference_std is None:
        std = z.detach().float().flatten(1).std(1)  # (B,)
    else:
        std = torch.full_like(levels, reference_std)
    sigma = (levels * std).to(z.dtype).view(-1, 1, 1, 1)
    return z + sigma * eps[..., :z.shape[-2], :z.shape[-1]].to(z.dtype)
