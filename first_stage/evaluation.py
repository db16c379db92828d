"""What the evaluation entry points share: loading VAEs and FID weights, data specs, the decoder-side
latent measurement (non-locality) and reconstruction metrics."""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .config import Config, DataConfig, with_overrides
from .checkpoint import load_vae
from .data import available_images, describe
from .model import cast


def evaluation_autoencoder(path: str | Path, device, bf16: bool = False, **load) -> AutoencoderKL:
    """Any VAE source (:func:`first_stage.checkpoint.load_vae`, with its ``load`` arguments) on
    ``device``, in bf16 or fp32, in eval mode."""
    return cast(load_vae(path, **load).vae, torch.bfloat16 if bf16 else torch.float32, device)


def evaluate_each(paths: list[str], device, measure: Callable[[AutoencoderKL, int], dict], bf16: bool = False,
                  **load) -> list[dict]:
    """Load each VAE in turn (:func:`evaluation_autoencoder`), run ``measure(vae, index)`` (index from 1)
    and return the report entries: where it came from, the scale it carries, its results."""
    entries = []
    for index, path in enumerate(paths, 1):
        vae = evaluation_autoencoder(path, device, bf16, **load)
        entries.append({"path": str(path), "scaling_factor": vae.config.scaling_factor,
                        "shift_factor": vae.config.shift_factor, "results": measure(vae, index)})
    return entries


def build_fid(path: str | None, device):
    """torchmetrics' FID on the given Inception weights (torch-fidelity's file), or None when none are
    given. Its ``compute()`` is a collective: every process must call it."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"--inception-weights: no file at {Path(path).resolve()}")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=path).to(device)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"rFID needs torch-fidelity: pip install torch-fidelity ({err})") from err


def data_from_spec(spec: str | None, base: Config | None = None, option: str = "--data") -> DataConfig:
    """``key=value,...`` settings of the ``data`` section over ``base`` (or the defaults), checked
    like ``--set``: e.g. ``source=imagefolder,path=/data/coco/val2017,resolution=256``."""
    overrides = [f"data.{item.strip()}" for item in (spec or "").split(",") if item.strip()]
    return with_overrides(base or Config(), overrides, option).data


def evaluation_data(spec: str | None) -> DataConfig:
    """The data of an evaluation (:func:`data_from_spec`) under the standard protocol unless the
    spec says otherwise: the short side resized to the resolution, then the centre crop, so the
    crop shows the picture, not a patch of native pixels. ``resize=`` (empty) crops native pixels;
    ``resize=N`` resizes to N first."""
    data = data_from_spec(spec)
    given = {item.split("=", 1)[0].strip() for item in (spec or "").split(",")}
    return data if "resize" in given else dataclasses.replace(data, resize=data.resolution)


def images_to_measure(data: DataConfig, asked: int, say: Callable[[str], None] = print) -> tuple[int, int | None]:
    """(how many images an evaluation of ``asked`` images of ``data`` measures, how many the data
    holds: None for a stream); says so when the data holds fewer than asked."""
    available = available_images(data)
    if available is not None and available < asked:
        say(f"note: asked for {asked} images; {describe(data)} holds {available}: measuring {available}")
        return available, available
    return asked, available


@torch.no_grad()
def nonlocality(vae: AutoencoderKL, z: torch.Tensor, delta: torch.Tensor, seeds: list[int],
                margin: int = 1) -> dict[str, list[float]]:
    """Perturb each latent (B, C, h, w) by ``delta`` (C,) at one position, decode, and return the share
    of the absolute pixel change that falls outside that position's patch widened by ``margin``
    latent cells: at the energy peak (``"peak"``) and at a random position (``"random"``), drawn
    for image ``i`` from ``seeds[i]`` (seed it by the image, and it does not depend on the batching)."""
    b, c, h, w = z.shape
    base = vae.decode(z.to(vae.device, vae.dtype)).sample.float()
    factor = base.shape[-1] // w  # pixels per latent cell
    peak = z.pow(2).sum(1).flatten(1).argmax(1)
    random = torch.cat([torch.randint(0, h * w, (1,), generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    shares = {}
    for name, flat in (("peak", peak), ("random", random)):
        rows, cols = flat // w, flat % w
        perturbed = z.clone()
        perturbed[torch.arange(b), :, rows, cols] += delta.to(z.dtype)
        change = (vae.decode(perturbed.to(vae.device, vae.dtype)).sample.float() - base).abs().sum(1).cpu()  # (B,H,W)
        inside = torch.zeros_like(change, dtype=torch.bool)
        for i in range(b):
            top, left = (int(rows[i]) - margin) * factor, (int(cols[i]) - margin) * factor
            size = (1 + 2 * margin) * factor
            inside[i, max(top, 0):top + size, max(left, 0):left + size] = True
        total = change.flatten(1).sum(1)
        outside = (change * ~inside).flatten(1).sum(1)
        shares[name] = (outside / total.clamp_min(1e-30)).tolist()
    return shares


def reconstruction_metrics(x: torch.Tensor, reconstruction: torch.Tensor, lpips=None) -> dict[str, torch.Tensor]:
    """Per-image PSNR and SSIM (torchmetrics, on [0, 1]) and LPIPS, for images in [-1, 1], each (B,).
    PSNR is +inf for an image reconstructed exactly."""
    a, b = (reconstruction.float().clamp(-1, 1) + 1) / 2, (x.float() + 1) / 2
    out = {
        "psnr": peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(a, b, data_range=1.0, reduction="none"),
    }
    if lpips is not None:
        out["lpips"] = lpips(reconstruction.float().clamp(-1, 1), x.float()).flatten()
    return {k: v.detach().cpu().double() for k, v in out.items()}


def summarize(values: list[float]) -> dict:
    """Mean ± std over images; non-finite values (PSNR of an exact reconstruction) are counted apart."""
    t = torch.tensor(values, dtype=torch.float64)
    finite = t[torch.isfinite(t)]
    return {
        "mean": finite.mean().item() if finite.numel() else None,
        "std": finite.std(unbiased=False).item() if finite.numel() else None,
        "images": int(t.numel()),
        "exact": int((~torch.isfinite(t)).sum()),  # images reconstructed exactly (PSNR = +inf)
    }


class WorstImages:
    """The ``k`` images with the lowest score (e.g. PSNR), with their names and reconstructions."""

    def __init__(self, k: int):
        self.k, self.heap, self.count = k, [], 0  # heap of (-score, count, name, image, reconstruction)

    def add(self, scores: torch.Tensor, x: torch.Tensor, reconstruction: torch.Tensor, names: list[str]) -> None:
        for score, name, image, rec in zip(scores.tolist(), names, x.cpu(), reconstruction.float().cpu()):
            item = (-score, self.count, name, image, rec)
            self.count += 1
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, item)
            elif item > self.heap[0]:
                heapq.heapreplace(self.heap, item)

    def items(self) -> list[tuple[float, str, torch.Tensor, torch.Tensor]]:
        """(score, name, image, reconstruction), worst first."""
        return [(-s, name, x, r) for s, _, name, x, r in sorted(self.heap, reverse=True)]
