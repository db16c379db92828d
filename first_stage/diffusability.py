"""The diffusability probe: how well a small latent diffusion model learns a VAE's latents.

A diffusers ``UNet2DModel`` sized from the latent shape is trained with the flow-matching
(rectified-flow) objective of SD3, FLUX and SiT: x_t = (1 − t)·x₀ + t·ε, the model predicts the
velocity v = ε − x₀, timesteps are logit-normal (t = sigmoid(n), n ~ N(0, 1)). What it measures:
the loss on held-out latents at a fixed grid of timesteps (:func:`held_out_loss`), and samples
drawn with an Euler ODE solver from fixed noise (:func:`sample`).

Everything random is a function of a seed and the sample's place (its id, the step, its position
in the global batch), never of the process count: the global batch of a step is drawn on every
process and each takes its slice (:func:`train_probe`), so one process and several train the same
probe to float rounding. :func:`gaussian_reference` is the closed-form optimal loss for
independent Gaussian latents of the same per-channel variance: a probe that learned only the
marginal variance gets that; structure it exploits shows as loss below it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DModel

# Channel widths per level; a latent of side s gets min(levels, log2(s / 4) + 1) of them (fewer when
# s does not halve that often exactly), so the lowest resolution is at least 4×4 (f8 latents get a level more than f16 latents at the same
# image size). Attention at every level but the first.
PROBES = {
    "tiny": {"widths": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8},  # CPU, minutes
    "small": {"widths": (64, 128, 256), "layers_per_block": 2, "norm_num_groups": 32},
    "base": {"widths": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},  # ~DiT-B scale
}
TIME_SCALE = 1000.0  # t in [0, 1] enters the sinusoidal embedding as t · 1000, like DDPM's steps


def build_probe(latent_shape: tuple[int, int, int], preset: str = "tiny") -> UNet2DModel:
    """A ``UNet2DModel`` for latents (C, h, w) (square), from ``PROBES[preset]``."""
    if preset not in PROBES:
        raise ValueError(f"unknown probe preset {preset!r}; choose from {sorted(PROBES)}")
    channels, side, _ = latent_shape
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
        attention_head_dim=8, add_attention=levels > 1)


def flow_loss(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching loss (B,): mean over elements of (v̂(x_t, t) − (ε − x₀))²."""
    tt = t.view(-1, 1, 1, 1).to(x0.dtype)
    xt = (1 - tt) * x0 + tt * noise
    v = model(xt, t * TIME_SCALE).sample
    return (v.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)


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


def seeded_normal(shape: tuple[int, ...], *seed: int) -> torch.Tensor:
    """N(0, I) of ``shape`` from a generator seeded by ``seed`` (a tuple of ints)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(hash(seed) & (2**63 - 1)))


@torch.no_grad()
def held_out_loss(model, latents: torch.Tensor, ids: list[int], grid: torch.Tensor, seed: int, batch_size: int,
                  accelerator) -> torch.Tensor:
    """The mean flow-matching loss over held-out ``latents`` (N, C, h, w) at each timestep of
    ``grid`` (T,), with noise seeded by (seed, image id, timestep index): the same figure at every
    evaluation and for every VAE compared. The images are split over processes and the sums
    combined. Returns (T,) float64."""
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
                sums[k] += flow_loss(model, x0, noise.to(accelerator.device), tt).double().sum().cpu()
    model.train()
    if world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    return sums / len(latents)


def train_probe(accelerator, model, optimizer, train: torch.Tensor, steps: int, batch_size: int, seed: int,
                evaluate: Callable[[int], None] | None = None, eval_every: int = 0, warmup: int = 100) -> dict:
    """Train the prepared ``model`` on ``train`` latents (N, C, h, w) for ``steps`` steps of a global
    batch of ``batch_size`` (divisible by the process count): data order, timesteps and noise of
    step s are drawn from (seed, s) on every process, which takes its slice. Linear lr warm-up over
    ``warmup`` steps, gradient clipping at 1. Calls ``evaluate(step)`` every ``eval_every`` steps and
    at the end. Returns the cost: steps/s and wall time (evaluation excluded)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the {world} processes")
    local = batch_size // world
    base_lr = [group["lr"] for group in optimizer.param_groups]
    shape = tuple(train.shape[1:])
    trained = 0.0
    model.train()
    for step in range(steps):
        if evaluate is not None and eval_every and step % eval_every == 0:
            evaluate(step)
        start = time.time()
        g = torch.Generator().manual_seed(hash((seed, 2, step)) & (2**63 - 1))
        rows = torch.randint(len(train), (batch_size,), generator=g)  # sampled with replacement
        t = torch.sigmoid(torch.randn(batch_size, generator=g, dtype=torch.float64)).float()  # logit-normal
        noise = torch.randn((batch_size, *shape), generator=g)
        mine = slice(rank * local, (rank + 1) * local)
        for group, lr in zip(optimizer.param_groups, base_lr):
            group["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))
        with accelerator.autocast():
            loss = flow_loss(model, train[rows[mine]].to(accelerator.device), noise[mine].to(accelerator.device),
                             t[mine].to(accelerator.device)).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # bill the step's kernels to the step
        trained += time.time() - start
    if evaluate is not None:
        evaluate(steps)
    return {"steps_per_s": steps / max(trained, 1e-9), "train_seconds": trained}


@torch.no_grad()
def sample(model, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dx/dt = v̂(x, t) from t = 1 (``noise``, (K, C, h, w)) to t = 0 with ``steps``
    Euler steps; returns the sampled latents (K, C, h, w)."""
    model.eval()
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        v = model(x, torch.full((len(x),), t * TIME_SCALE, device=x.device)).sample.float()
        x = x + (t_next - t) * v
    model.train()
    return x
