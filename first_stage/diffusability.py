"""The diffusability probe: how well a small latent diffusion model learns a VAE's latents.

Two probe families, sized from the latent shape (:func:`build_probe`): a diffusers ``UNet2DModel``
(``PROBES``) and a latent diffusion transformer (:class:`ProbeDiT`, ``DIT_PROBES``: DiT/SiT-style
adaLN-zero blocks on patches of 1 or 2 latent pixels; ``small`` and ``base`` are DiT-S and DiT-B).
Both are trained with the flow-matching (rectified-flow) objective of SD3, FLUX, SiT and LightningDiT:
x_t = (1 − t)·x₀ + t·ε, the model predicts the velocity v = ε − x₀, timesteps are logit-normal
(t = sigmoid(n), n ~ N(0, 1)); an EMA of the weights (:func:`ema_update`) is what is evaluated and
sampled. What it measures: the loss on held-out latents at a fixed grid of timesteps
(:func:`held_out_loss`), its ratio to the Gaussian optimum per timestep, weighted as training samples
t (:func:`weighted_ratio`), and samples drawn with an Euler ODE solver from fixed noise (:func:`sample`).

Everything random is a function of a seed and the sample's place (its id, the step, its position
in the global batch), never of the process count: the global batch of a step is drawn on every
process and each takes its slice (:func:`train_probe`), so one process and several train the same
probe to float rounding. :func:`gaussian_reference` is the closed-form optimal loss for
independent Gaussian latents of the same per-channel variance: a probe that learned only the
marginal variance gets that; structure it exploits shows as loss below it.

:func:`probe_vae` is the whole measurement of one VAE: encode the images through the evaluation
driver (:func:`first_stage.evaluation.stream_images`) or read them back from the latent cache
(:func:`cache_key`), then for each normalisation asked (``channel`` first by default: per-channel
mean/std, which ranks VAEs by what their latents are, not how they are scaled; ``exported``: as a
pipeline reads the VAE, :class:`first_stage.latent_norm.LatentNormalizer` — the FLUX.2 class's
BatchNorm gives the probe 2×2 patches, (4C, h/2, w/2), as FLUX.2's transformer sees them) train
the probe with several seeds, evaluate it and draw samples from the first.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from diffusers import UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import DataConfig
from .data import DataError, describe
from .alignment import load_foundation_model
from .evaluation import build_fid, stream_images
from .latent_norm import LatentNormalizer
from .latent_stats import DEPLOYED_STD_TOLERANCE, GAUSSIAN_TAIL, reduce_sum
from .dit import DIT_NAMES, DIT_SIZES, ProbeDiT, dit_patch, repa_loss, repa_projector
from .model import Autoencoder

# Channel widths per level; a latent of side s gets min(levels, log2(s / 4) + 1) of them (fewer when
# s does not halve that often exactly), so the lowest resolution is at least 4×4 (f8 latents get a level
# more than f16 latents at the same image size). Attention at every level but the first.
PROBES = {
    "tiny": {"widths": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8},  # CPU, minutes
    "small": {"widths": (64, 128, 256), "layers_per_block": 2, "norm_num_groups": 32},
    "base": {"widths": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},  # ~DiT-B scale
}
# The transformer's hidden width, depth and heads: ``small`` is DiT-S, ``base`` DiT-B (and LightningDiT-B's
# width/depth/heads: the "LightningDiT-B proxy" of VA-VAE and its successors), ``tiny`` a CPU test size.
DIT_PROBES = {name: DIT_SIZES[name] for name in ("tiny", "small", "base")}
FAMILIES = ("unet", "dit")
TIME_SCALE = 1000.0  # t in [0, 1] enters the sinusoidal embedding as t · 1000, like DDPM's steps
NORMALISATIONS = ("channel", "exported")


class RepaProbe(nn.Module):
    """A DiT probe trained with REPA's alignment (REPA; REPA-E's transformer step): its tokens after block
    ``depth``, through REPA's projector, are pulled toward a vision model's patch tokens of the same image.
    Called without tokens it is the DiT alone (what evaluation and sampling run)."""

    def __init__(self, dit: ProbeDiT, feature_dim: int, depth: int, projector_dim: int):
        super().__init__()
        self.dit, self.depth = dit, depth
        self.projector = repa_projector(dit.embed.out_channels, projector_dim, feature_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None):
        """The velocity; with ``tokens`` (B, N, D), (the velocity, the REPA loss against them)."""
        if tokens is None:
            return self.dit(x, t, class_labels)
        prediction, features = self.dit.run(x, t, class_labels, features_at=self.depth)
        return prediction, repa_loss(self.projector(features), tokens)


def repa_depth(preset: str, depth: int | None) -> int:
    """The block REPA reads in a DiT probe of ``preset``: ``depth``, or a third of the blocks (4 of DiT-B's 12)."""
    blocks = DIT_PROBES[preset]["depth"]
    chosen = depth if depth is not None else max(1, blocks // 3)
    if not 1 <= chosen <= blocks:
        raise ValueError(f"probe setting repa_depth must be in [1, {blocks}] for the {preset} DiT, got {chosen}")
    return chosen


def build_probe(latent_shape: tuple[int, int, int], preset: str = "tiny", family: str = "unet",
                repa: tuple[int, int] | None = None, num_classes: int = 0) -> nn.Module:
    """The probe for latents (C, h, w) (square): a ``UNet2DModel`` from ``PROBES[preset]`` or a
    :class:`ProbeDiT` from ``DIT_PROBES[preset]``; with ``repa`` = (the vision model's width, the block REPA
    reads), that DiT in a :class:`RepaProbe` (projector width 2048 as REPA's, the hidden width for ``tiny``).
    ``num_classes`` > 0: class-conditional (a class embedding added to the time embedding: DiT's ``LabelEmbedder``
    without dropout, the U-Net's ``num_class_embeds``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown probe family {family!r}; choose from {list(FAMILIES)}")
    presets = PROBES if family == "unet" else DIT_PROBES
    if preset not in presets:
        raise ValueError(f"unknown probe preset {preset!r}; choose from {sorted(presets)}")
    channels, side, _ = latent_shape
    if family == "dit":
        dit = ProbeDiT(channels, side, patch=dit_patch(side), num_classes=num_classes, **DIT_PROBES[preset])
        if repa is None:
            return dit
        return RepaProbe(dit, repa[0], repa[1], DIT_PROBES[preset]["hidden"] if preset == "tiny" else 2048)
    if repa is not None:
        raise ValueError("the REPA term is for the DiT probe (--probe-family dit)")
    spec = PROBES[preset]
    levels = max(1, min(len(spec["widths"]), int(math.log2(max(side, 4) / 4)) + 1))
    while side % 2 ** (levels - 1):  # every downsampling must halve exactly, or the skips do not line up
        levels -= 1
    widths = spec["widths"][:levels]
    return UNet2DModel(
        sample_size=side, in_channels=channels, out_channels=channels, block_out_channels=widths,
        layers_per_block=spec["layers_per_block"], norm_num_groups=spec["norm_num_groups"],
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1),
        up_block_types=("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=8, add_attention=levels > 1, num_class_embeds=num_classes or None)


def probe_name(family: str, preset: str, latent_shape: tuple[int, int, int]) -> str:
    """What ran, as a report names it: ``UNet2DModel tiny`` or ``DiT-B/1``."""
    if family == "dit":
        return f"{DIT_NAMES[preset]}/{dit_patch(latent_shape[1])}"
    return f"UNet2DModel {preset}"


def velocity(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The probe's velocity at ``x`` (B, C, h, w), times ``t`` (B,) in [0, 1], for class ``labels`` (B,) of a
    class-conditional probe; either family."""
    out = model(x, t * TIME_SCALE) if labels is None else model(x, t * TIME_SCALE, labels)
    return out.sample if hasattr(out, "sample") else out


def flow_loss(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample flow-matching loss (B,): mean over elements of (v̂(x_t, t) − (ε − x₀))²."""
    tt = t.view(-1, 1, 1, 1).to(x0.dtype)
    xt = (1 - tt) * x0 + tt * noise
    return (velocity(model, xt, t, labels).float() - (noise - x0).float()).pow(2).flatten(1).mean(1)


def repa_flow_loss(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample flow-matching loss (B,), REPA loss) of a :class:`RepaProbe` against vision ``tokens``."""
    tt = t.view(-1, 1, 1, 1).to(x0.dtype)
    prediction, align = model((1 - tt) * x0 + tt * noise, t * TIME_SCALE, labels, tokens)
    return (prediction.float() - (noise - x0).float()).pow(2).flatten(1).mean(1), align


def gaussian_reference(channel_var: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The optimal flow-matching loss at each t for latents whose elements are independent
    Gaussians of variance σ_c² (any means): E[v | x_t] is then linear and the residual variance
    per element is σ²/((1 − t)²σ² + t²); averaged over channels. (T,) for t (T,)."""
    s2 = channel_var.double().view(-1, 1)
    tt = t.double().view(1, -1)
    return (s2 / ((1 - tt) ** 2 * s2 + tt**2)).mean(0)


def timestep_grid(points: int) -> torch.Tensor:
    """The fixed evaluation timesteps (k + ½)/points, k = 0 … points − 1."""
    return (torch.arange(points, dtype=torch.float64) + 0.5) / points


def logit_normal_density(t: torch.Tensor) -> torch.Tensor:
    """The density of t = sigmoid(n), n ~ N(0, 1), the training timesteps: φ(logit t) / (t(1 − t))."""
    t = t.double()
    logit = torch.log(t / (1 - t))
    return torch.exp(-0.5 * logit**2) / (math.sqrt(2 * math.pi) * t * (1 - t))


def timestep_weights(grid: torch.Tensor) -> torch.Tensor:
    """Weights (T,) summing to 1 of the grid's timesteps: the logit-normal density there, so an average
    over the grid weighs each t as training samples it (the ends, t = 1/16 and 15/16 of an 8-point grid,
    get 0.11× the weight of the middle, where a plain mean gives them as much)."""
    density = logit_normal_density(grid)
    return density / density.sum()


def weighted_ratio(loss: torch.Tensor, reference: torch.Tensor, grid: torch.Tensor) -> float:
    """The headline: the per-t ratios loss/reference (T,) averaged with :func:`timestep_weights` (a
    ratio per t, so no timestep dominates because its loss is large; weighted as training samples t)."""
    return (timestep_weights(grid) * loss.double() / reference.double()).sum().item()


def training_reference(channel_var: torch.Tensor, points: int = 4096) -> float:
    """The Gaussian optimum of the *training* loss: :func:`gaussian_reference` averaged over logit-normal
    t (midpoint rule on ``points`` points of (0, 1)): what the training loss is compared with."""
    grid = timestep_grid(points)
    density = logit_normal_density(grid)
    return ((density * gaussian_reference(channel_var, grid)).sum() / density.sum()).item()


def seeded_normal(shape: tuple[int, ...], *seed: int) -> torch.Tensor:
    """N(0, I) of ``shape`` from a generator seeded by ``seed`` (a tuple of ints)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(hash(seed) & (2**63 - 1)))


@torch.no_grad()
def held_out_loss(model, latents: torch.Tensor, ids: list[int], grid: torch.Tensor, seed: int, batch_size: int,
                  accelerator, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The mean flow-matching loss over held-out ``latents`` (N, C, h, w) at each timestep of
    ``grid`` (T,), with noise seeded by (seed, image id, timestep index): the same figure at every
    evaluation and for every VAE compared. The images are split over processes and the sums
    combined. Returns (T,) float64."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(grid), dtype=torch.float64)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(latents), world))
    for start in range(0, len(mine), batch_size):
        rows = mine[start:start + batch_size]
        x0 = latents[rows].to(accelerator.device)
        for k, t in enumerate(grid.tolist()):
            noise = torch.stack([seeded_normal(tuple(latents.shape[1:]), seed, 1, ids[i], k) for i in rows])
            tt = torch.full((len(rows),), t, device=accelerator.device)
            with accelerator.autocast():
                y = None if labels is None else labels[rows].to(accelerator.device)
                sums[k] += flow_loss(model, x0, noise.to(accelerator.device), tt, y).double().sum().cpu()
    model.train(was_training)
    return reduce_sum(accelerator, sums) / len(latents)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema ← d·ema + (1 − d)·model, d = min(``decay``, (1 + step)/(10 + step)) (the warm-up keeps short
    runs from evaluating mostly the initial weights)."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)


def train_probe(accelerator, model, optimizer, train: torch.Tensor, steps: int, batch_size: int, seed: int,
                evaluate: Callable[[int, float | None], None] | None = None, eval_every: int = 0, warmup: int = 100,
                ema: nn.Module | None = None, ema_decay: float = 0.999, tokens: torch.Tensor | None = None,
                repa_weight: float = 0.0, labels: torch.Tensor | None = None) -> dict:
    """Train the prepared ``model`` on ``train`` latents (N, C, h, w) for ``steps`` steps of a global
    batch of ``batch_size`` (divisible by the process count): data order, timesteps and noise of
    step s are drawn from (seed, s) on every process, which takes its slice. Linear lr warm-up over
    ``warmup`` steps, gradient clipping at 1, ``ema`` (an unprepared copy) updated after every step.
    Calls ``evaluate(step, training loss since the last call, or None)`` every ``eval_every`` steps and
    at the end. With ``tokens`` (N, T, D), the vision tokens of the ``train`` images, a :class:`RepaProbe`
    adds ``repa_weight`` × REPA (the training loss reported stays the flow-matching loss); with ``labels``
    (N,), a class-conditional probe gets each latent's class. Returns the cost: steps/s and wall time
    (evaluation excluded)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the {world} processes")
    local = batch_size // world
    base_lr = [group["lr"] for group in optimizer.param_groups]
    shape = tuple(train.shape[1:])
    trained = 0.0
    running = torch.zeros(2, dtype=torch.float64)  # this process's (loss sum, count) since the last evaluation
    model.train()
    for step in range(steps):
        if evaluate is not None and eval_every and step % eval_every == 0:
            evaluate(step, _running_mean(accelerator, running))
        start = time.time()
        g = torch.Generator().manual_seed(hash((seed, 2, step)) & (2**63 - 1))
        rows = torch.randint(len(train), (batch_size,), generator=g)  # sampled with replacement
        t = torch.sigmoid(torch.randn(batch_size, generator=g, dtype=torch.float64)).float()  # logit-normal
        noise = torch.randn((batch_size, *shape), generator=g)
        mine = slice(rank * local, (rank + 1) * local)
        for group, lr in zip(optimizer.param_groups, base_lr):
            group["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))
        x0, eps, tt = (v[mine].to(accelerator.device) for v in (train[rows], noise, t))
        y = None if labels is None else labels[rows[mine]].to(accelerator.device)
        with accelerator.autocast():
            if tokens is None:
                loss = total = flow_loss(model, x0, eps, tt, y).mean()
            else:
                flow, align = repa_flow_loss(model, x0, eps, tt, tokens[rows[mine]].to(accelerator.device), y)
                loss, total = flow.mean(), flow.mean() + repa_weight * align
        accelerator.backward(total)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, accelerator.unwrap_model(model), ema_decay, step)
        running += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # bill the step's kernels to the step
        trained += time.time() - start
    if evaluate is not None:
        evaluate(steps, _running_mean(accelerator, running))
    return {"steps_per_s": steps / max(trained, 1e-9), "train_seconds": trained}


def _running_mean(accelerator, running: torch.Tensor) -> float | None:
    """The training loss averaged over processes and the steps since the last call (None before any);
    resets ``running``."""
    total = reduce_sum(accelerator, running.clone())
    running.zero_()
    return (total[0] / total[1]).item() if total[1] > 0 else None


@torch.no_grad()
def sample(model, noise: torch.Tensor, steps: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = v̂(x, t) from t = 1 (``noise``, (K, C, h, w)) to t = 0 with ``steps``
    Euler steps; returns the sampled latents (K, C, h, w)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least one Euler step, got {steps}")
    was_training = model.training
    model.eval()
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        v = velocity(model, x, torch.full((len(x),), t, device=x.device), labels).float()
        x = x + (t_next - t) * v
    model.train(was_training)
    return x


def dct_high_share(latents: torch.Tensor) -> float:
    """The share of the latents' (N, C, h, w) energy in the high DCT band — coefficients (u, v) with
    u ≥ h/2 or v ≥ w/2, what a 2× downsampling discards — after removing each channel's mean. White
    noise gives 1 − ⌈h/2⌉⌈w/2⌉/(hw) (0.75 for even sides); smooth latents give less."""
    x = latents.double() - latents.double().mean(dim=(0, 2, 3), keepdim=True)
    h, w = x.shape[-2:]
    coefficients = _dct_matrix(h) @ x @ _dct_matrix(w).T  # (N, C, h, w), orthonormal 2-D DCT-II
    energy = coefficients.pow(2).sum(dim=(0, 1))  # (h, w)
    low = energy[:(h + 1) // 2, :(w + 1) // 2].sum()
    return (1 - low / energy.sum().clamp_min(1e-300)).item()


def _dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n, n): row u is the u-th basis vector."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (k[None] + 0.5) * k[:, None] / n) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


@dataclass(frozen=True)
class ProbeSettings:
    """How :func:`probe_vae` measures a VAE (``eval/diffusability.py``'s options of the same names)."""

    num_images: int = 1000  # images encoded, held-out ones included
    held_out: int = 128  # images the probe never trains on
    latents: str = "mean"  # "mean": the posterior mean; "sample": one sample per image, seeded by the image
    # Each normalisation trains its own probes; the first is the ranking figure. "channel": per-channel
    # mean/std of the training latents (scale-invariant); "exported": as a pipeline reads the VAE's config.
    normalise: tuple[str, ...] = NORMALISATIONS
    probe_family: str = "unet"
    probe: str = "tiny"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    eval_every: int | None = None  # default: steps / 10
    timesteps: int = 8  # points of the held-out timestep grid
    seeds: int = 3  # probes trained per normalisation: seed, seed + 1, …
    ema_decay: float = 0.999  # the evaluated and sampled weights: an EMA of the trained ones (see ema_update)
    group_pattern: str | None = None  # regex: images whose file names match alike are held out together
    # REPA for the DiT probe: a vision model (a local folder or a cached Hugging Face id, as alignment.model) whose
    # patch tokens the probe's tokens after block repa_depth (None: a third of the blocks) align to, weight repa_weight
    # (REPA's proj_coeff 0.5); None: off.
    repa_model: str | None = None
    repa_weight: float = 0.5
    repa_depth: int | None = None
    samples: int = 16  # samples shown
    sample_steps: int = 50  # Euler steps per sample
    fid_samples: int | None = None  # default: the held-out images
    encode_batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        for name in ("held_out", "steps", "timesteps", "samples", "sample_steps", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe setting {name} must be at least 1, got {getattr(self, name)}")
        normalise = (self.normalise,) if isinstance(self.normalise, str) else tuple(self.normalise)
        if not normalise or any(n not in NORMALISATIONS for n in normalise) or len(set(normalise)) < len(normalise):
            raise ValueError(f"probe setting normalise must be distinct values of {list(NORMALISATIONS)}, "
                             f"got {self.normalise!r}")
        object.__setattr__(self, "normalise", normalise)  # a list from argparse becomes a tuple
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"probe setting ema_decay must be in [0, 1), got {self.ema_decay}")
        presets = PROBES if self.probe_family == "unet" else DIT_PROBES
        if self.probe_family not in FAMILIES or self.probe not in presets:
            raise ValueError(f"probe setting probe must be one of {sorted(presets)} for family "
                             f"{self.probe_family!r} (families: {list(FAMILIES)}), got {self.probe!r}")
        if self.group_pattern is not None:
            re.compile(self.group_pattern)
        if self.repa_model is not None:
            if self.probe_family != "dit":
                raise ValueError("probe setting repa_model: the REPA term is for the DiT probe (probe_family dit)")
            repa_depth(self.probe, self.repa_depth)
            if self.repa_weight < 0:
                raise ValueError(f"probe setting repa_weight must be >= 0, got {self.repa_weight}")


@torch.no_grad()
def _encode(vae: Autoencoder, settings: ProbeSettings, held_from: int, fid, vision, batch: dict) -> list[tuple]:
    """(image id, latent (C, h, w), file name, vision tokens (T, D) fp16 or None, class label or None) of each
    image of a batch; the
    held-out images (id ≥ ``held_from``) also enter ``fid`` as real images. ``vision``: the REPA term's
    vision model (:class:`first_stage.alignment.FoundationFeatures`), whose tokens are taken on the DiT probe's
    token grid as REPA's DINOv2 sees the image (ImageNet-normalised, bicubic, 14 pixels per token)."""
    x = batch["pixel_values"]
    posterior = vae.encode(x.to(vae.dtype)).latent_dist
    z = posterior.mean.float().cpu()
    if settings.latents == "sample":  # one sample per image, seeded by the image
        noise = torch.stack([seeded_normal(tuple(z.shape[1:]), settings.seed, 4, i) for i in batch["ids"]])
        z = z + posterior.std.float().cpu() * noise
    held = [k for k, i in enumerate(batch["ids"]) if i >= held_from]
    if fid is not None and held:
        fid.update((x[held].float() + 1) / 2, real=True)
    names = batch.get("names") or [None] * len(batch["ids"])
    tokens = [None] * len(batch["ids"])
    if vision is not None:
        side = LatentNormalizer.of(vae).layout(z[:1]).shape[-1]  # what the probe reads (FLUX.2: 2×2 patches)
        grid = (side // dit_patch(side),) * 2
        features = vision(x.to(vision.mean.device), grid, normalize=True, interpolation="bicubic")
        tokens = list(features.flatten(2).transpose(1, 2).half().cpu())  # (B, T, D)
    labels = batch.get("labels") or [None] * len(batch["ids"])
    return list(zip(batch["ids"], z, [str(n) for n in names], tokens, labels))


def probe_normaliser(vae: Autoencoder, train: torch.Tensor, kind: str) -> LatentNormalizer:
    """How latents enter the probe: ``exported``, as a pipeline reads the VAE (its config's global or per
    channel scale, or the FLUX.2 class's BatchNorm over patches); ``channel``, per-channel mean and std of
    the ``train`` latents (N, C, h, w) — for the FLUX.2 class per patch channel, in its BatchNorm's layout,
    so the probe sees the same patches either way."""
    carried = LatentNormalizer.of(vae)
    if kind == "exported":
        return carried
    if kind != "channel":
        raise ValueError(f"normalise must be 'exported' or 'channel', got {kind!r}")
    if carried.kind == "batch_norm":
        patches = carried.layout(train)
        return carried.with_statistics(patches.mean(dim=(0, 2, 3)), patches.var(dim=(0, 2, 3), unbiased=False))
    channel_std = train.std(dim=(0, 2, 3)).clamp_min(1e-12)
    return LatentNormalizer.measured("per_channel", train.mean().item(), train.std().item(),
                                     train.mean(dim=(0, 2, 3)).tolist(), channel_std.tolist())


def tail(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    """P(|ẑ| > 4) of latents (N, C, h, w) standardised by per-channel ``mean`` and ``std`` (C,)."""
    return ((x - mean.view(1, -1, 1, 1)).abs() > 4 * std.view(1, -1, 1, 1)).double().mean().item()


@torch.no_grad()
def draw_samples(probe, vae: Autoencoder, norm: LatentNormalizer, shape: tuple[int, int, int], count: int,
                 settings: ProbeSettings, accelerator, fid, labels: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``count`` latents from fixed noise (sample k from (seed, k)), split over processes;
    decode them (denormalised by ``norm``); feed the decoded ones to ``fid`` as generated images.
    A class-conditional probe draws sample k of class ``labels[k % len(labels)]`` (the held-out images'
    classes, in order). Returns, on every process, all sampled latents (count, C, h, w) and the first
    ``settings.samples`` decoded images."""
    mine = list(range(accelerator.process_index, count, accelerator.num_processes))
    drawn, shown = [], []
    for start in range(0, len(mine), settings.batch_size):
        ks = mine[start:start + settings.batch_size]
        noise = torch.stack([seeded_normal(shape, settings.seed, 3, k) for k in ks]).to(accelerator.device)
        y = None if labels is None else labels[torch.tensor(ks) % len(labels)].to(accelerator.device)
        x = sample(probe, noise, settings.sample_steps, y)
        images = vae.decode(norm.denormalize(x.cpu()).to(vae.device, vae.dtype)).sample.float()
        if fid is not None:
            fid.update((images.clamp(-1, 1) + 1) / 2, real=False)
        drawn += list(zip(ks, x.cpu()))
        shown += [(k, image.cpu()) for k, image in zip(ks, images) if k < settings.samples]
    drawn, shown = (sorted(gather_object(items), key=lambda item: item[0]) for items in (drawn, shown))
    return torch.stack([x for _, x in drawn]), torch.stack([image for _, image in shown])


# What the latent cache depends on besides the VAE and the data: a cache written with other values is
# not read back.
_CACHE_SETTINGS = ("num_images", "latents", "seed")


def cache_key(source: str, data: DataConfig, images: int, settings: ProbeSettings) -> str:
    """The key the latent cache is written with and read back by: the VAE (``source``, and the size and
    modification time of every file under it when it is a path), the data (:func:`describe`), the number
    of images and the settings that change the encoded latents (:data:`_CACHE_SETTINGS`)."""
    files = []
    root = Path(source) if source else None
    if root is not None and root.exists():
        paths = [root] if root.is_file() else sorted(q for q in root.rglob("*") if q.is_file())
        files = [(str(q.relative_to(root.parent)), q.stat().st_size, q.stat().st_mtime_ns) for q in paths]
    key = {"vae": source, "files": files, "data": describe(data), "resolution": data.resolution, "images": images,
           "labels": data.label_column,
           **{name: getattr(settings, name) for name in _CACHE_SETTINGS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def read_cache(cache: Path | None, key: str) -> tuple[torch.Tensor, list[int], list[str], torch.Tensor | None] | None:
    """The raw latents (N, C, h, w), image ids, file names and class labels (N,) (or None: unlabelled) a cache
    written under ``key`` holds, or None (no file, another key, or a cache from before the raw latents were
    kept)."""
    if cache is None or not cache.is_file():
        return None
    with safe_open(cache, "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("key") != key or "names" not in metadata:
        return None
    tensors = load_file(cache)
    return tensors["latents"], tensors["ids"].tolist(), json.loads(metadata["names"]), tensors.get("labels")


def split_held_out(ids: list[int], names: list[str], held_from: int, settings: ProbeSettings) -> list[bool]:
    """Which images are held out. Default: those with id ≥ ``held_from`` (the last of the seeded random
    pick: a random subset). With ``group_pattern``: images are grouped by the pattern's first match in
    their file name (group 1 when it has one; the whole name when it does not match), groups are taken
    in an order seeded by ``seed`` until at least ``held_out`` images are held out — so the tiles of one
    photograph are all on one side."""
    if settings.group_pattern is None:
        return [i >= held_from for i in ids]
    pattern = re.compile(settings.group_pattern)
    groups = []
    for name in names:
        match = pattern.search(Path(name).name)
        groups.append(name if match is None else match.group(1 if pattern.groups else 0))
    order = sorted(set(groups), key=lambda g: hashlib.blake2b(f"{settings.seed}:{g}".encode()).digest())
    held, count = set(), 0
    for g in order:
        if count >= settings.held_out:
            break
        held.add(g)
        count += groups.count(g)
    return [g in held for g in groups]


def probe_vae(vae: Autoencoder, accelerator, data: DataConfig, images: int, settings: ProbeSettings,
              inception_weights: str | None = None, cache: Path | None = None,
              source: str = "") -> tuple[dict, torch.Tensor]:
    """Encode ``images`` images of ``data`` (or read their latents back from ``cache`` when it was written
    with the same :func:`cache_key` and no gFID is asked, which needs the images), split off the held-out
    ones, and for each normalisation of ``settings.normalise`` train ``settings.seeds`` probes, evaluating
    their EMA weights on the held-out latents; draw samples (gFID with ``inception_weights``) from the
    first normalisation's first probe. Writes the raw latents, ids and names and the first
    normalisation's train/held-out latents to ``cache`` (a safetensors file, ``source`` naming the VAE in
    its metadata) when given. Returns, on the main process, the results and the decoded samples to show
    (K, 3, H, W); ({}, an empty tensor) on the others."""
    wall = time.time()
    held_from = images - settings.held_out  # ids are places in the random draw: the held-out ones are random
    if held_from < 1:
        raise DataError(f"{images} images of {describe(data)}: too few to hold out {settings.held_out} and train on "
                        "the rest; lower --held-out or raise --num-images")
    if settings.group_pattern is not None and inception_weights is not None:
        raise ValueError("a grouped held-out split (--group-pattern) cannot be combined with gFID yet: the real "
                         "images enter FID while they are encoded, before the groups are known")
    fid = build_fid(inception_weights, accelerator.device)
    key = cache_key(source, data, images, settings)
    # the cache holds latents only: gFID needs the images, REPA their vision tokens
    cached = read_cache(cache, key) if fid is None and settings.repa_model is None else None
    vision = None
    if settings.repa_model is not None:
        vision = load_foundation_model(settings.repa_model, "latent").to(accelerator.device)
    tokens = labels = None
    if cached is not None:
        latents, ids, names, labels = cached
        skipped = []
    else:
        encode = functools.partial(_encode, vae, settings, held_from, fid, vision)
        encoded, skipped = stream_images(accelerator, data, images, settings.encode_batch_size, settings.seed, encode)
        if not encoded:
            raise DataError(f"no decodable image among the images picked of {describe(data)}")
        latents = torch.stack([item[1] for item in encoded])  # (N, C, h, w), in id order
        ids, names = [item[0] for item in encoded], [item[2] for item in encoded]
        if vision is not None:
            tokens = torch.stack([item[3] for item in encoded])  # (N, T, D) fp16
        if data.label_column:
            labels = torch.tensor([item[4] for item in encoded])  # (N,) class-conditional probes
    if labels is not None and labels.min() < 0:
        raise DataError(f"data.label_column {data.label_column!r}: class labels must be >= 0, got {labels.min()}")
    num_classes = 0 if labels is None else int(labels.max()) + 1
    encode_seconds = time.time() - wall
    held_mask = split_held_out(ids, names, held_from, settings)
    if all(held_mask) or not any(held_mask):
        raise DataError(f"{describe(data)}: no decodable image left to {'train on' if all(held_mask) else 'hold out'}")
    train_rows = [k for k, h in enumerate(held_mask) if not h]
    held_rows = [k for k, h in enumerate(held_mask) if h]
    train_raw, held_raw = latents[train_rows], latents[held_rows]
    train_ids, held_ids = [ids[k] for k in train_rows], [ids[k] for k in held_rows]

    grid = timestep_grid(settings.timesteps)
    columns, first = {}, None
    for kind in settings.normalise:
        norm = probe_normaliser(vae, train_raw, kind)
        train, held = norm.normalize(train_raw), norm.normalize(held_raw)
        runs = [_probe_run(train, held, held_ids, grid, settings, settings.seed + j, accelerator,
                           tokens[train_rows] if tokens is not None else None,
                           None if labels is None else (labels[train_rows], labels[held_rows]), num_classes)
                for j in range(settings.seeds)]
        columns[kind] = _column(kind, norm, train, grid, runs)
        if first is None:
            first = (norm, train, held, runs[0]["probe"])
    norm, train, held, probe = first
    if cache is not None and accelerator.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": latents.contiguous(), "ids": torch.tensor(ids), "train": train.contiguous(),
                   "held_out": held.contiguous(), "train_ids": torch.tensor(train_ids),
                   "held_out_ids": torch.tensor(held_ids), **({} if labels is None else {"labels": labels})}, cache,
                  metadata={"vae": source, "key": key, "names": json.dumps(names), "latents": settings.latents,
                            "normalise": settings.normalise[0], "normaliser": norm.describe()})

    # Samples from fixed noise with the ranking column's first probe, decoded with the VAE (and gFID: a
    # collective, on every process).
    shape = tuple(train.shape[1:])
    count = max(settings.samples, (settings.fid_samples or len(held_ids)) if fid is not None else 0)
    drawn, shown = draw_samples(probe, vae, norm, shape, count, settings, accelerator, fid,
                                None if labels is None else labels[held_rows])
    gfid = fid.compute().item() if fid is not None else None
    if not accelerator.is_main_process:
        return {}, torch.empty(0)
    gfid_note = (f"{count} samples against the {len(held_ids)} held-out images" if fid is not None
                 else "not measured: no --inception-weights")
    mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3))
    ranking = columns[settings.normalise[0]]
    deployed_norm = probe_normaliser(vae, train_raw, "exported")
    deployed_std = deployed_norm.normalize(train_raw).std().item()
    costs = [run["cost"] for column in columns.values() for run in column.pop("runs")]
    return {
        "images": len(ids), "train_images": len(train_ids), "held_out_images": len(held_ids),
        "latent_shape": list(shape), "latents": settings.latents,
        "split": {"grouped": settings.group_pattern is not None, "group_pattern": settings.group_pattern},
        "cache": {"read_back": cached is not None, "key": key},
        "normalisation": ranking["normalisation"],
        "probe": {"family": settings.probe_family, "preset": settings.probe,
                  "name": probe_name(settings.probe_family, settings.probe, shape),
                  "parameters": sum(p.numel() for p in probe.parameters()), "steps": settings.steps,
                  "batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed,
                  "seeds": settings.seeds, "ema_decay": settings.ema_decay,
                  # class-conditional on data.label_column's classes, or None: unconditional
                  "classes": num_classes or None,
                  "repa": None if settings.repa_model is None else {
                      "model": settings.repa_model, "weight": settings.repa_weight,
                      "depth": repa_depth(settings.probe, settings.repa_depth), "tokens": list(tokens.shape[1:])}},
        "ranking": {"normalise": settings.normalise[0], "ratio": ranking["held_out_loss"]["ratio"],
                    "ratio_sd": ranking["held_out_loss"]["ratio_sd"]},
        "deployed": {"std": deployed_std, "pipeline": deployed_norm.describe(), "tolerance": DEPLOYED_STD_TOLERANCE,
                     "flag": not 1 / DEPLOYED_STD_TOLERANCE <= deployed_std <= DEPLOYED_STD_TOLERANCE},
        "columns": columns,
        "held_out_loss": ranking["held_out_loss"], "curve": ranking["curve"], "train_loss": ranking["train_loss"],
        "dct": {"high_share": dct_high_share(train),
                "white_noise": 1 - math.ceil(shape[1] / 2) * math.ceil(shape[2] / 2) / (shape[1] * shape[2])},
        "samples": {"count": count, "std": drawn.std().item(), "p_abs_gt_4": tail(drawn, mean, std),
                    "real_std": held.std().item(), "real_p_abs_gt_4": tail(held, mean, std),
                    "gaussian_p_abs_gt_4": GAUSSIAN_TAIL[4]},
        "gfid": gfid, "gfid_note": gfid_note,
        "cost": {"steps_per_s": sum(c["steps_per_s"] for c in costs) / len(costs),
                 "train_seconds": sum(c["train_seconds"] for c in costs), "probes_trained": len(costs),
                 "encode_seconds": encode_seconds, "wall_seconds": time.time() - wall},
        "skipped_files": skipped,
    }, shown


def _probe_run(train: torch.Tensor, held: torch.Tensor, held_ids: list[int], grid: torch.Tensor,
               settings: ProbeSettings, seed: int, accelerator, tokens: torch.Tensor | None = None,
               labels: tuple[torch.Tensor, torch.Tensor] | None = None, num_classes: int = 0) -> dict:
    """Train one probe from ``seed`` (its init, data order, timesteps and noise; the held-out noise stays
    that of ``settings.seed``, the same for every probe) and evaluate its EMA weights. Returns its curve
    [(step, held-out loss (T,), training loss or None)], cost and EMA probe."""
    torch.manual_seed(seed)  # the same initial weights for every VAE and on every process
    repa = None if tokens is None else (tokens.shape[-1], repa_depth(settings.probe, settings.repa_depth))
    model = build_probe(tuple(train.shape[1:]), settings.probe, settings.probe_family, repa, num_classes)
    train_labels, held_labels = labels if labels is not None else (None, None)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    curve = []
    evaluate = functools.partial(_evaluate, curve, ema, held, held_ids, grid, settings, accelerator, held_labels)
    cost = train_probe(accelerator, model, optimizer, train, settings.steps, settings.batch_size, seed, evaluate,
                       settings.eval_every or max(1, settings.steps // 10), settings.warmup, ema, settings.ema_decay,
                       tokens, settings.repa_weight, train_labels)
    del model, optimizer
    accelerator.free_memory()  # the Accelerator lets go of this probe and optimiser
    return {"seed": seed, "curve": curve, "cost": cost, "probe": ema}


def _evaluate(curve: list, model, held: torch.Tensor, held_ids: list[int], grid: torch.Tensor, settings: ProbeSettings,
              accelerator, held_labels: torch.Tensor | None, step: int, train_loss: float | None) -> None:
    """Append (step, held-out loss (T,), training loss) to ``curve``: what :func:`_probe_run` hands to
    :func:`train_probe`."""
    loss = held_out_loss(model, held, held_ids, grid, settings.seed, settings.batch_size, accelerator, held_labels)
    curve.append((step, loss, train_loss))


def _spread(values: list[float]) -> float:
    """The sample standard deviation (0 for one value)."""
    return torch.tensor(values, dtype=torch.float64).std().item() if len(values) > 1 else 0.0


def _column(kind: str, norm: LatentNormalizer, train: torch.Tensor, grid: torch.Tensor, runs: list[dict]) -> dict:
    """One normalisation's figures over its seeds: final, best and per-seed held-out ratios (weighted as
    training samples t), the seed-mean loss per timestep and curve, and the training loss against its
    Gaussian optimum."""
    channel_var = train.var(dim=(0, 2, 3))
    reference = gaussian_reference(channel_var, grid)
    train_reference = training_reference(channel_var)
    seeds = []
    for run in runs:
        ratios = [weighted_ratio(loss, reference, grid) for _, loss, _ in run["curve"]]
        best = min(range(len(ratios)), key=ratios.__getitem__)
        train_loss = run["curve"][-1][2]
        seeds.append({"seed": run["seed"], "ratio": ratios[-1], "best_ratio": ratios[best],
                      "best_step": run["curve"][best][0], "train_loss": train_loss,
                      "train_ratio": train_loss / train_reference if train_loss is not None else None})
    final = torch.stack([run["curve"][-1][1] for run in runs]).mean(0)  # (T,), mean over seeds
    curve = []
    for k, (step, _, _) in enumerate(runs[0]["curve"]):
        losses = torch.stack([run["curve"][k][1] for run in runs]).mean(0)
        trained = [run["curve"][k][2] for run in runs]
        curve.append({"step": step, "mean": losses.mean().item(), "per_timestep": losses.tolist(),
                      "ratio": sum(weighted_ratio(run["curve"][k][1], reference, grid) for run in runs) / len(runs),
                      "train_loss": sum(trained) / len(trained) if None not in trained else None})
    ratios = [s["ratio"] for s in seeds]
    train_losses = [s["train_loss"] for s in seeds]
    train_loss = sum(train_losses) / len(train_losses) if None not in train_losses else None
    return {
        "normalisation": {"kind": kind, "pipeline": norm.describe(), "config": norm.config_entries(),
                          "std": train.std().item(), "channel_std": train.std(dim=(0, 2, 3)).tolist()},
        "held_out_loss": {
            "timesteps": grid.tolist(), "per_timestep": final.tolist(), "mean": final.mean().item(),
            "gaussian_reference": reference.tolist(), "gaussian_reference_mean": reference.mean().item(),
            "weights": timestep_weights(grid).tolist(), "ratio_per_timestep": (final / reference).tolist(),
            "ratio": sum(ratios) / len(ratios), "ratio_sd": _spread(ratios),
            "ratio_unweighted": (final / reference).mean().item(),
            "best_ratio": sum(s["best_ratio"] for s in seeds) / len(seeds),
            "best_ratio_sd": _spread([s["best_ratio"] for s in seeds]), "seeds": seeds},
        "train_loss": {"mean": train_loss, "gaussian_reference": train_reference,
                       "ratio": train_loss / train_reference if train_loss is not None else None},
        "curve": curve, "runs": runs,
    }


def settings_from(options) -> ProbeSettings:
    """The :class:`ProbeSettings` of an object with attributes of the same names (parsed arguments)."""
    return ProbeSettings(**{f.name: getattr(options, f.name) for f in dataclasses.fields(ProbeSettings)})
