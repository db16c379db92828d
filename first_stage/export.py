"""Export a trained autoencoder as a diffusers folder with a measured latent scale."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL


@torch.inference_mode()
def measure_latent_scale(vae: AutoencoderKL, batches: Iterable[torch.Tensor], gather=None) -> dict:
    """Mean and std of posterior samples over all images (latent-diffusion's ``scale_by_std``).

    Streams in float64 sums, so the result equals a one-shot computation over the same latents.
    ``gather`` (e.g. ``accelerator.reduce`` with ``"sum"``) combines the sums across processes.
    """
    sums = torch.zeros(3, dtype=torch.float64)  # (count, sum, sum of squares)
    images = 0
    for x in batches:
        if x.shape[0] == 0:  # every image of the batch was undecodable
            continue
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.sample().double().cpu()  # (B,C,h,w)
        sums += torch.stack([torch.tensor(z.numel(), dtype=torch.float64), z.sum(), z.pow(2).sum()])
        images += x.shape[0]
    if gather is not None:
        sums = gather(sums.to(vae.device)).cpu()
        images = int(gather(torch.tensor([images], device=vae.device)).item())
    count, total, total_sq = sums.tolist()
    if count == 0:
        raise ValueError("measure_latent_scale: no calibration images")
    mean = total / count
    std = max(total_sq / count - mean**2, 0.0) ** 0.5
    return {"scaling_factor": 1.0 / std, "latent_mean": mean, "latent_std": std, "num_images": images}


def export_diffusers(vae: AutoencoderKL, out_dir: str | Path, scale: dict | None = None, overwrite: bool = False) -> Path:
    """``save_pretrained`` into a temporary folder, then rename: a half-written export never has the
    final name. ``scale`` (from :func:`measure_latent_scale`) sets the config's ``scaling_factor``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"export: {out_dir.resolve()} exists; pass overwrite=True (--overwrite) to replace it")
    if scale is not None:
        vae.register_to_config(scaling_factor=float(scale["scaling_factor"]))
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
