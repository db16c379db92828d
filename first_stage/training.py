"""Pieces of the training loop that are not the loop itself: learning-rate schedule, the run's own
counters, checkpoint discovery, reconstruction grids and per-batch latent statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file

from .config import OptimizerConfig, load_config
from .model import autoencoder_kwargs
from .regularizers import kl_per_element

CHECKPOINT_PREFIX = "checkpoint-"
AUTOENCODER_CONFIG = "autoencoder_config.json"  # the AutoencoderKL config, saved with each checkpoint


def lr_factor(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Linear warm-up, then constant or cosine decay to ``final_lr_ratio``; a pure function of the
    step, so restoring the step restores the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class TrainingState:
    """The run's counters, saved with every checkpoint (``register_for_checkpointing``)."""

    def __init__(self):
        self.step = 0  # optimiser updates done (skipped ones included)
        self.skipped_steps = 0  # non-finite losses or overflowing fp16 gradients
        self.consecutive_nonfinite = 0
        self.last_finite_step = -1
        self.skipped_images = 0  # corrupt or undecodable
        self.upsized_images = 0  # smaller than the crop

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-<step>`` folder."""
    return int(path.name[len(CHECKPOINT_PREFIX):])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (unfinished ones are hidden)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def resolve_resume(resume: str, root: Path) -> Path:
    """``latest`` → the newest complete checkpoint under ``root``; otherwise the given folder."""
    if resume == "latest":
        found = checkpoint_dirs(root)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint-<step> folder in {root.resolve()}")
        return found[-1]
    path = Path(resume)
    if not (path / "training_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: {path.resolve()} is not a complete checkpoint "
                                "(no training_state.json)")
    step = json.loads((path / "training_state.json").read_text())["step"]
    newer = [p.name for p in checkpoint_dirs(root) if checkpoint_step(p) > step]
    if newer:
        # Rotation and "latest" go by step: the newer checkpoints of the abandoned run would win.
        raise ValueError(f"--resume {resume}: {root.resolve()} holds newer checkpoints {newer}; move them "
                         "elsewhere (or give the run another train.run_name) before going back to step "
                         f"{step}")
    return path


def is_run_or_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a training run folder (with checkpoints/) or one checkpoint folder."""
    path = Path(path)
    return (path / "checkpoints").is_dir() or (path / "training_state.json").is_file()


def read_checkpoint(path: Path, weights: str = "ema") -> dict:
    """What an export needs from a training checkpoint (or from a run folder: its newest checkpoint).

    Returns ``{"path", "config", "step", "vae", "discriminator", "logvar"}``: the autoencoder holds
    the EMA weights (``weights="ema"``, when the run kept them) or the raw ones; ``discriminator``
    is a state dict or None. Tensors come from safetensors or ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = resolve_resume("latest", path / "checkpoints")
    if not (path / "training_state.json").is_file():
        raise FileNotFoundError(f"{path.resolve()} is neither a run folder (with checkpoints/) nor a complete "
                                "checkpoint (with training_state.json)")
    config = load_config(path / "config.yaml")
    arch = path / AUTOENCODER_CONFIG
    if arch.is_file():
        vae = AutoencoderKL.from_config(json.loads(arch.read_text()))
    elif config.model.init_from is None:
        vae = AutoencoderKL(**autoencoder_kwargs(config.model))
    else:
        raise FileNotFoundError(f"{arch} is missing and the run started from {config.model.init_from}: "
                                "cannot tell the architecture")
    state = load_file(str(path / "model.safetensors"))  # the training wrapper: vae.* and logvar
    vae.load_state_dict({k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")})
    if weights == "ema":
        if not config.train.ema:
            raise ValueError(f"{path}: the run kept no EMA weights (train.ema: false); export --weights raw")
        ema = [s for f in sorted(path.glob("custom_checkpoint_*.pkl"))
               if "shadow_params" in (s := torch.load(f, map_location="cpu", weights_only=True))]
        if len(ema) != 1:
            raise FileNotFoundError(f"{path}: expected one EMA state (custom_checkpoint_*.pkl with shadow_params), found {len(ema)}")
        params = list(vae.parameters())
        if len(ema[0]["shadow_params"]) != len(params):
            raise ValueError(f"{path}: EMA holds {len(ema[0]['shadow_params'])} tensors, the model {len(params)}")
        shadow = EMAModel(params)  # the class training saved it from
        shadow.load_state_dict(ema[0])
        shadow.copy_to(params)
    elif weights != "raw":
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    disc_file = path / "model_1.safetensors"
    return {
        "path": path, "config": config, "vae": vae.eval(),
        "step": int(json.loads((path / "training_state.json").read_text())["step"]),
        "discriminator": load_file(str(disc_file)) if config.discriminator.enabled and disc_file.is_file() else None,
        "logvar": float(state["logvar"]) if "logvar" in state else None,
    }


def save_grid(images: torch.Tensor, reconstructions: torch.Tensor, path: Path) -> np.ndarray:
    """Write a PNG with inputs on the top row and reconstructions below; returns it as (H,W,3) uint8."""
    rows = [torch.cat(list(t.float().clamp(-1, 1)), dim=2) for t in (images, reconstructions)]  # (3,H,B*W)
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


def latent_batch_stats(posterior: DiagonalGaussianDistribution, prefix: str = "val/latent") -> dict:
    """Cheap statistics of a batch of posteriors: scale, peak, log-variance and KL per channel."""
    mean, logvar = posterior.mean.float(), posterior.logvar.float()  # (B,C,h,w)
    kl_channel = kl_per_element(posterior).mean(dim=(0, 2, 3))  # (C,) nats per element
    stats = {
        f"{prefix}/std": mean.std().item(),
        f"{prefix}/max_abs": mean.abs().max().item(),
        f"{prefix}/mean_logvar": logvar.mean().item(),
        f"{prefix}/logvar_at_clamp": (logvar <= -30.0).float().mean().item(),
    }
    stats.update({f"{prefix}/kl_channel_{c}": v for c, v in enumerate(kl_channel.tolist())})
    return stats
