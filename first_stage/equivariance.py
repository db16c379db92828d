"""What the decoder sees besides the plain latent: EQ-VAE's transformed latents, the downsampled
latents of the scale-equivariance term (arXiv 2502.14831), and noise on its input (RAE).

By default the operators are EQ-VAE's (zelaki/eqvae ``train_eqvae/ldm/models/autoencoder.py``):
``F.interpolate(mode="bilinear", align_corners=False)`` without antialias on latents and images,
one scale for both axes, ``torch.rot90(k, dims=[-1, -2])``, and a low-resolution branch whose scale
comes from the same n/32 grid; ``equivariance.antialias``, ``anisotropic`` and ``lowres_half`` are
this package's departures (docs/training.md).

Every random choice is a pure function of (seed, step) — and of the image's place in the step's
global batch, for per-image draws — so a resumed run draws the same, and every process takes the
same transform in a step (:func:`draw_step`, :func:`decoder_noise`). The transforms act alike
on latents and images (:class:`LatentTransform`), which is what makes the loss an equivariance loss:
for an exactly equivariant autoencoder ``D(T(E(x))) = T(x)`` and the term is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F

from .config import Config, ConfigError, EquivarianceConfig, LatentNoiseConfig
from .loss_term import BuiltSizes, LossContext, LossTerm, StepDraw
from .regularizers import sum_reduce

# Distinct streams of per-step and per-image randomness, beside the posterior noise, whose seeds are
# hash((seed, step, image)): these are 4-tuples, so no seed of theirs is a posterior-noise seed.
TRANSFORM_STREAM = 1
DECODER_NOISE_STREAM = 2
SCALE_GRID = 32  # EQ-VAE's scale factors are multiples of 1/32


def resize(t: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """``t`` (B,C,H,W) bilinearly resized to ``size`` (align_corners=False: EQ-VAE's operator), low-pass
    filtered first when it shrinks under ``antialias``; the same operator for latents and images.
    Computed in fp32 (the antialiased kernel has no bf16 CPU version), returned in ``t``'s dtype."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False, antialias=antialias).to(t.dtype)


@dataclass(frozen=True)
class LatentTransform:
    """Scale by (sy, sx), then rotate by ``quarter_turns``·90° as EQ-VAE does
    (``torch.rot90(k, dims=[-1, -2])``: clockwise on a displayed image)."""

    scale: tuple[float, float]
    quarter_turns: int = 0
    antialias: bool = False  # equivariance.antialias

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        """The (h', w') a (h, w) latent is scaled to, before the rotation: floor(h·sy) as
        ``F.interpolate(scale_factor=)`` gives in EQ-VAE, at least one cell."""
        return max(1, math.floor(h * self.scale[0])), max(1, math.floor(w * self.scale[1]))

    def apply(self, t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return torch.rot90(resize(t, size, self.antialias), self.quarter_turns, dims=(-1, -2))

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
        raise ConfigError(f"latent_noise.reference_std must be > 0 (or null: each image's own), "
                          f"got {cfg.reference_std}")


def scale_grid(cfg: EquivarianceConfig) -> list[float]:
    """The scale factors a transform draws from: n/32 in [min_scale, max_scale)."""
    return [n / SCALE_GRID for n in range(1, SCALE_GRID + 1) if cfg.min_scale <= n / SCALE_GRID < cfg.max_scale]


def draw_step(cfg: EquivarianceConfig, seed: int,
              step: int) -> tuple[LatentTransform | None, LatentTransform | None]:
    """This step's (EQ-VAE transform of the latent, low-resolution scaling of the image), at most one
    of them, from (seed, step) alone. As EQ-VAE: a transform with ``probability``, else with
    ``lowres_probability`` the image scaled by one factor from the same grid (``lowres_half``: by 1/2);
    the low-resolution image is ``lowres.image(x, factor)``."""
    if not cfg.enabled:
        return None, None
    u = torch.rand(4, generator=torch.Generator().manual_seed(hash((seed, step, -1, TRANSFORM_STREAM)))).tolist()
    scales = scale_grid(cfg)
    if u[0] >= cfg.probability:
        if u[1] >= cfg.lowres_probability:
            return None, None
        s = 0.5 if cfg.lowres_half else scales[int(u[2] * len(scales))]
        return None, LatentTransform((s, s), 0, cfg.antialias)
    sy = scales[int(u[1] * len(scales))]
    sx = scales[int(u[2] * len(scales))] if cfg.anisotropic else sy
    return LatentTransform((sy, sx), 1 + int(u[3] * 3) if cfg.rotations else 0, cfg.antialias), None


def smallest_sides(cfg: EquivarianceConfig, resolution: int, factor: int) -> list[tuple[str, int]]:
    """(config key, smallest image side it makes) for each part of a checked ``cfg`` that shrinks
    ``resolution``-pixel images of an f=``factor`` autoencoder: the transformed targets, the
    low-resolution inputs, and the scale term's downsampled images (on low-resolution steps too).
    Every such image is ``factor`` times a whole latent (:meth:`LatentTransform.image`)."""
    if not cfg.enabled:
        return []
    h = resolution // factor
    smallest = min(scale_grid(cfg))
    on_grid = LatentTransform((smallest, smallest)).latent_size(h, h)[0]  # latent side at the smallest factor
    sides, lowest = [], h
    if cfg.probability > 0:
        sides.append(("equivariance.min_scale", on_grid * factor))
    if cfg.lowres_probability > 0 and cfg.probability < 1:
        lowest = LatentTransform((0.5, 0.5)).latent_size(h, h)[0] if cfg.lowres_half else on_grid
        sides.append(("equivariance.lowres_probability", lowest * factor))
    if cfg.scale_weight > 0:  # down_s of the encoder's latent, whose smallest is a low-resolution step's
        sides.append(("equivariance.scale_factors", lowest // max(cfg.scale_factors) * factor))
    return sides


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


class EquivarianceSectionTerm(LossTerm):
    """What the two terms of the ``equivariance`` section share: its checks, and the size checks of
    the images it makes (:func:`smallest_sides`) for the keys the term owns."""

    section = "equivariance"
    size_keys: tuple[str, ...] = ()

    @classmethod
    def check(cls, config: Config) -> None:
        if config.equivariance.enabled:
            check_equivariance(config.equivariance)

    def check_sizes(self, sizes: BuiltSizes) -> None:
        res = self.config.data.resolution
        # LPIPS and the discriminator see transformed and low-resolution pairs; the scale term's
        # downsampled pairs go through the reconstruction loss only (LPIPS).
        takes = {"equivariance.scale_factors": max(sizes.lpips_side, sizes.factor)}
        for key, side in smallest_sides(self.config.equivariance, res, sizes.factor):
            if key in self.size_keys:
                needed = takes.get(key, max(sizes.lpips_side, sizes.discriminator_side, sizes.factor))
                sizes.refuse_smaller(key, side, needed, res)


class EqVAETerm(EquivarianceSectionTerm):
    """EQ-VAE as a loss-term unit: it adds no term of its own but changes what the reconstruction
    (NLL, LPIPS, GAN) compares: on a share of the steps the decoded latent is scaled and rotated and
    the target transformed alike, or (prior preservation) the image is encoded at low resolution."""

    name = "eq_vae"
    size_keys = ("equivariance.min_scale", "equivariance.lowres_probability")
    shapes_vary = True
    # as the EQ-VAE recipe sets it: half the steps transformed, a quarter of the others at low resolution
    bench_rows = {"equivariance": ["equivariance.enabled=true", "equivariance.lowres_probability=0.25"]}
    study_variant = ("eq-vae", bench_rows["equivariance"],
                     "EQ-VAE: half the steps decode a scaled and rotated latent against the same transform of the "
                     "image; a quarter of the others at low resolution")

    @classmethod
    def enabled(cls, config: Config) -> bool:
        e = config.equivariance
        return e.enabled and (e.probability > 0 or e.lowres_probability > 0)

    def plan(self, plan, draw: StepDraw) -> None:
        plan.transform, plan.lowres = draw_step(self.config.equivariance, draw.seed, draw.step)

    def loss(self, out, ctx: LossContext) -> tuple[None, dict]:
        return None, {"train/eq/transformed": float(ctx.plan.transform is not None),
                      "train/eq/lowres": float(ctx.plan.lowres is not None)}

    def card_line(self) -> str:
        e = self.config.equivariance
        parts = []
        if e.probability > 0:
            axes = "per axis" if e.anisotropic else "isotropically"
            rotated = " and rotated by k·90°" if e.rotations else ""
            parts.append(f"{e.probability:g} of the steps decode a latent scaled by n/32 in [{e.min_scale:g}, "
                         f"{e.max_scale:g}) ({axes}){rotated} against the same transform of the image")
        if e.lowres_probability > 0:
            scale = "1/2" if e.lowres_half else "a factor from the same grid"
            parts.append(f"{e.lowres_probability:g} of the others encode and reconstruct the image scaled by {scale}")
        resize = "antialiased bilinear" if e.antialias else "plain bilinear (EQ-VAE's operator)"
        return "equivariance (EQ-VAE): " + "; ".join(parts) + f"; resized with {resize}"


class ScaleEquivarianceTerm(EquivarianceSectionTerm):
    """The scale-equivariance term of arXiv 2502.14831: ``scale_weight · Σ_s rec(down_s(x), D(down_s(z)))``
    over ``scale_factors``, on every step."""

    name = "scale_equivariance"
    size_keys = ("equivariance.scale_factors",)
    bench_rows = {"scale_eq": ["equivariance.enabled=true", "equivariance.probability=0",
                               "equivariance.scale_weight=1"]}
    # Weight 1: the downsampled reconstructions count per pixel as the full one does (sum reduction), so
    # the 2x term weighs a quarter of the NLL, the 4x term a sixteenth.
    study_variant = ("scale-eq", ["equivariance.enabled=true", "equivariance.probability=0",
                                  "equivariance.scale_weight=1", "equivariance.scale_factors=[2,4]"],
                     "2502.14831: + rec(down(x), D(down(z))) for 2x and 4x downsampling, every step")

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.equivariance.enabled and config.equivariance.scale_weight > 0

    def plan(self, plan, draw: StepDraw) -> None:
        plan.scale_factors = self.config.equivariance.scale_factors
        plan.antialias = self.config.equivariance.antialias

    def loss(self, out, ctx: LossContext) -> tuple[torch.Tensor | None, dict]:
        if not out.scaled:  # a forward pass made without this term's plan
            return None, {}
        reduction = self.config.loss.reduction
        scale_loss = sum(sum_reduce(ctx.base.reconstruction_loss(xs, rs)[0], reduction) for xs, rs in out.scaled)
        return self.config.equivariance.scale_weight * scale_loss, {"train/loss/scale_eq": scale_loss.item()}

    def card_line(self) -> str:
        e = self.config.equivariance
        return (f"scale equivariance (arXiv 2502.14831), weight {e.scale_weight:g}: the reconstruction loss of "
                f"D(down_s(z)) against down_s(x) for s in {list(e.scale_factors)}, every step")


class LatentNoiseTerm(LossTerm):
    """RAE's decoder noise as a loss-term unit: no term of its own; the decoder reconstructs from
    z + u·tau·std·ε on a share of the images."""

    name, section = "latent_noise", "latent_noise"
    bench_rows = {"latent_noise": ["latent_noise.enabled=true"]}
    study_variant = ("latent-noise", ["latent_noise.enabled=true", "latent_noise.tau=0.8"],
                     "RAE: the decoder reconstructs from z + σε, σ ~ U(0, 0.8) x each image's latent std")

    @classmethod
    def check(cls, config: Config) -> None:
        if config.latent_noise.enabled:
            check_latent_noise(config.latent_noise)

    def plan(self, plan, draw: StepDraw) -> None:
        ncfg = self.config.latent_noise
        plan.decoder_noise, plan.noise_levels = decoder_noise(ncfg, draw.seed, draw.step, draw.first, draw.n,
                                                              draw.latent_shape, draw.device)
        plan.reference_std = ncfg.reference_std

    def loss(self, out, ctx: LossContext) -> tuple[None, dict]:
        if ctx.plan.noise_levels is None:  # a forward pass made without this term's plan
            return None, {}
        return None, {"train/latent_noise/level": ctx.plan.noise_levels.mean().item()}  # u·tau, in latent stds

    def card_line(self) -> str:
        n = self.config.latent_noise
        std = "each image's own latent std" if n.reference_std is None else f"{n.reference_std:g}"
        return (f"decoder noise (RAE): on {n.probability:g} of the images the decoder reconstructs from "
                f"z + u·{n.tau:g}·std·ε, u ~ U(0, 1), std = {std}")
