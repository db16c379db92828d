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

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from diffusers import UNet2DModel
from safetensors.torch import save_file

from .config import DataConfig
from .data import DataError, describe
from .evaluation import build_fid, stream_images
from .latent_norm import LatentNormalizer
from .model import Autoencoder
from .latent_stats import GAUSSIAN_TAIL, reduce_sum

# Channel widths per level; a latent of side s gets min(levels, log2(s / 4) + 1) of them (fewer when
# s does not halve that often exactly), so the lowest resolution is at least 4×4 (f8 latents get a level
# more than f16 latents at the same image size). Attention at every level but the first.
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
    return reduce_sum(accelerator, sums) / len(latents)


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
    if steps < 1:
        raise ValueError(f"sampling needs at least one Euler step, got {steps}")
    model.eval()
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        v = model(x, torch.full((len(x),), t * TIME_SCALE, device=x.device)).sample.float()
        x = x + (t_next - t) * v
    model.train()
    return x


@dataclass(frozen=True)
class ProbeSettings:
    """How :func:`probe_vae` measures a VAE (``eval/diffusability.py``'s options of the same names)."""

    num_images: int = 1000  # images encoded, held-out ones included
    held_out: int = 128  # images the probe never trains on
    latents: str = "mean"  # "mean": the posterior mean; "sample": one sample per image, seeded by the image
    normalise: str = "exported"  # "exported": as a pipeline reads the VAE's config; "channel": per-channel mean/std
    probe: str = "tiny"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    eval_every: int | None = None  # default: steps / 10
    timesteps: int = 8  # points of the held-out timestep grid
    samples: int = 16  # samples shown
    sample_steps: int = 50  # Euler steps per sample
    fid_samples: int | None = None  # default: the held-out images
    encode_batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        for name in ("held_out", "steps", "timesteps", "samples", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe setting {name} must be at least 1, got {getattr(self, name)}")


@torch.no_grad()
def _encode(vae: Autoencoder, settings: ProbeSettings, held_from: int, fid, batch: dict) -> list[tuple]:
    """(image id, latent (C, h, w)) of each image of a batch; the held-out images (id ≥ ``held_from``)
    also enter ``fid`` as real images."""
    x = batch["pixel_values"]
    posterior = vae.encode(x.to(vae.dtype)).latent_dist
    z = posterior.mean.float().cpu()
    if settings.latents == "sample":  # one sample per image, seeded by the image
        noise = torch.stack([seeded_normal(tuple(z.shape[1:]), settings.seed, 4, i) for i in batch["ids"]])
        z = z + posterior.std.float().cpu() * noise
    held = [k for k, i in enumerate(batch["ids"]) if i >= held_from]
    if fid is not None and held:
        fid.update((x[held].float() + 1) / 2, real=True)
    return list(zip(batch["ids"], z))


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
                 settings: ProbeSettings, accelerator, fid) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``count`` latents from fixed noise (sample k from (seed, k)), split over processes;
    decode them (denormalised by ``norm``); feed the decoded ones to ``fid`` as generated images.
    Returns, on every process, all sampled latents (count, C, h, w) and the first ``settings.samples``
    decoded images."""
    mine = list(range(accelerator.process_index, count, accelerator.num_processes))
    drawn, shown = [], []
    for start in range(0, len(mine), settings.batch_size):
        ks = mine[start:start + settings.batch_size]
        noise = torch.stack([seeded_normal(shape, settings.seed, 3, k) for k in ks]).to(accelerator.device)
        x = sample(probe, noise, settings.sample_steps)
        images = vae.decode(norm.denormalize(x.cpu()).to(vae.device, vae.dtype)).sample.float()
        if fid is not None:
            fid.update((images.clamp(-1, 1) + 1) / 2, real=False)
        drawn += list(zip(ks, x.cpu()))
        shown += [(k, image.cpu()) for k, image in zip(ks, images) if k < settings.samples]
    drawn, shown = (sorted(gather_object(items), key=lambda item: item[0]) for items in (drawn, shown))
    return torch.stack([x for _, x in drawn]), torch.stack([image for _, image in shown])


def probe_vae(vae: Autoencoder, accelerator, data: DataConfig, images: int, settings: ProbeSettings,
              inception_weights: str | None = None, cache: Path | None = None,
              source: str = "") -> tuple[dict, torch.Tensor]:
    """Encode ``images`` images of ``data``, split off the held-out ones, normalise, train the probe,
    evaluate it and draw samples (gFID with ``inception_weights``). Writes the normalised latents to
    ``cache`` (a safetensors file, ``source`` naming the VAE in its metadata) when given. Returns, on
    the main process, the results and the decoded samples to show (K, 3, H, W); ({}, an empty
    tensor) on the others."""
    wall = time.time()
    held_from = images - settings.held_out  # ids are places in the random draw: the held-out ones are random
    if held_from < 1:
        raise DataError(f"{images} images of {describe(data)}: too few to hold out {settings.held_out} and train on "
                        "the rest; lower --held-out or raise --num-images")
    fid = build_fid(inception_weights, accelerator.device)
    encode = functools.partial(_encode, vae, settings, held_from, fid)
    encoded, skipped = stream_images(accelerator, data, images, settings.encode_batch_size, settings.seed, encode)
    if not encoded:
        raise DataError(f"no decodable image among the images picked of {describe(data)}")
    latents, ids = torch.stack([z for _, z in encoded]), [i for i, _ in encoded]  # (N, C, h, w), in id order
    encode_seconds = time.time() - wall
    split = sum(i < held_from for i in ids)
    if split == 0 or split == len(ids):
        raise DataError(f"{describe(data)}: no decodable image left to {'train on' if split == 0 else 'hold out'}")
    norm = probe_normaliser(vae, latents[:split], settings.normalise)
    normalised = norm.normalize(latents)
    train, held = normalised[:split], normalised[split:]
    train_ids, held_ids = ids[:split], ids[split:]
    if cache is not None and accelerator.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"train": train.contiguous(), "held_out": held.contiguous(), "train_ids": torch.tensor(train_ids),
                   "held_out_ids": torch.tensor(held_ids)}, cache,
                  metadata={"vae": source, "latents": settings.latents, "normalise": settings.normalise,
                            "normaliser": norm.describe()})

    # The probe: the same initial weights for every VAE and on every process.
    torch.manual_seed(settings.seed)
    model = build_probe(tuple(train.shape[1:]), settings.probe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    grid, curve = timestep_grid(settings.timesteps), []
    evaluate = functools.partial(_evaluate, curve, model, held, held_ids, grid, settings, accelerator)
    cost = train_probe(accelerator, model, optimizer, train, settings.steps, settings.batch_size, settings.seed,
                       evaluate, settings.eval_every or max(1, settings.steps // 10), settings.warmup)
    probe = accelerator.unwrap_model(model)
    accelerator.free_memory()  # the Accelerator lets go of this VAE's probe and optimiser

    # Samples from fixed noise, decoded with the VAE (and gFID: a collective, on every process).
    shape = tuple(train.shape[1:])
    count = max(settings.samples, (settings.fid_samples or len(held_ids)) if fid is not None else 0)
    drawn, shown = draw_samples(probe, vae, norm, shape, count, settings, accelerator, fid)
    gfid = fid.compute().item() if fid is not None else None
    if not accelerator.is_main_process:
        return {}, torch.empty(0)
    gfid_note = (f"{count} samples against the {len(held_ids)} held-out images" if fid is not None
                 else "not measured: no --inception-weights")
    mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3))
    reference = gaussian_reference(train.var(dim=(0, 2, 3)), grid)
    final = curve[-1][1]
    return {
        "images": len(ids), "train_images": len(train_ids), "held_out_images": len(held_ids),
        "latent_shape": list(shape), "latents": settings.latents,
        "normalisation": {"kind": settings.normalise, "pipeline": norm.describe(), "config": norm.config_entries(),
                          "std": train.std().item(), "channel_std": std.tolist()},
        "probe": {"preset": settings.probe, "parameters": sum(p.numel() for p in probe.parameters()),
                  "steps": settings.steps, "batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed},
        "held_out_loss": {"timesteps": grid.tolist(), "per_timestep": final.tolist(), "mean": final.mean().item(),
                          "gaussian_reference": reference.tolist(), "gaussian_reference_mean": reference.mean().item()},
        "curve": [{"step": step, "mean": loss.mean().item(), "per_timestep": loss.tolist()} for step, loss in curve],
        "samples": {"count": count, "std": drawn.std().item(), "p_abs_gt_4": tail(drawn, mean, std),
                    "real_std": held.std().item(), "real_p_abs_gt_4": tail(held, mean, std),
                    "gaussian_p_abs_gt_4": GAUSSIAN_TAIL[4]},
        "gfid": gfid, "gfid_note": gfid_note,
        "cost": {**cost, "encode_seconds": encode_seconds, "wall_seconds": time.time() - wall},
        "skipped_files": skipped,
    }, shown


def _evaluate(curve: list, model, held: torch.Tensor, held_ids: list[int], grid: torch.Tensor, settings: ProbeSettings,
              accelerator, step: int) -> None:
    """Append (step, held-out loss (T,)) to ``curve``: the evaluation :func:`probe_vae` hands to :func:`train_probe`."""
    curve.append((step, held_out_loss(model, held, held_ids, grid, settings.seed, settings.batch_size, accelerator)))


def settings_from(options) -> ProbeSettings:
    """The :class:`ProbeSettings` of an object with attributes of the same names (parsed arguments)."""
    return ProbeSettings(**{f.name: getattr(options, f.name) for f in dataclasses.fields(ProbeSettings)})
