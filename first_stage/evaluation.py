"""The evaluation driver and what the evaluation entry points share: loading VAEs and FID weights,
data specs, streaming images over processes (:func:`stream_images`), and the two measurements of
``eval/latent_stats.py`` (:func:`latent_statistics`, with the decoder-side non-locality) and
``eval/reconstruction.py`` (:func:`reconstruction`). The diffusability probe streams its images
through the same driver (:mod:`first_stage.diffusability`).

Every measurement takes the accelerator (never builds one), is called by every process, and returns
its result on the main process (an empty dict on the others).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from .checkpoint import load_vae
from .config import Config, DataConfig, with_overrides
from .data import DataError, available_images, calibration_batches, describe
from .latent_norm import LatentNormalizer
from .latent_stats import LatentStatistics, carried_and_implied, reduce_sum
from .model import Autoencoder, cast, decode_latent, downsampling_factor, encode_latent, is_tiny
from .perceptual import VGG16_FILENAME, load_lpips


def evaluation_autoencoder(path: str | Path, device, bf16: bool = False, **load) -> Autoencoder:
    """Any VAE source (:func:`first_stage.checkpoint.load_vae`, with its ``load`` arguments) on
    ``device``, in bf16 or fp32, in eval mode. An AutoencoderTiny is refused: these measurements read a posterior."""
    vae = load_vae(path, **load).vae
    if is_tiny(vae):
        raise ValueError(f"{path}: an AutoencoderTiny has no posterior for this measurement; eval/compare.py compares "
                         "it with its teacher")
    return cast(vae, torch.bfloat16 if bf16 else torch.float32, device)


def evaluate_each(paths: list[str], device, measure: Callable[[Autoencoder, int], dict], bf16: bool = False,
                  **load) -> list[dict]:
    """Load each VAE in turn (:func:`evaluation_autoencoder`), run ``measure(vae, index)`` (index from 1)
    and return the report entries: where it came from, the normalisation it carries, its results."""
    entries = []
    for index, path in enumerate(paths, 1):
        vae = evaluation_autoencoder(path, device, bf16, **load)
        entries.append({"path": str(path), "class": type(vae).__name__,
                        "scaling_factor": vae.config.get("scaling_factor"),
                        "shift_factor": vae.config.get("shift_factor"),
                        "normalisation": LatentNormalizer.of(vae).describe(),
                        "results": measure(vae, index)})
    return entries


def stream_images(accelerator, data: DataConfig, num_images: int, batch_size: int, seed: int,
                  measure: Callable[[dict], list[tuple]]) -> tuple[list[tuple], list[str]]:
    """The driver (k-diffusion's ``compute_features`` seam): this process's share of the ``num_images``
    images of ``data`` picked by ``seed`` (:func:`first_stage.data.calibration_batches`), in batches of
    ``batch_size``; each batch with an image goes to ``measure(batch)`` (``pixel_values`` on the
    accelerator's device), which returns items whose first element is an image id. Returns, on every
    process, every process's items in id order and the undecodable files. Every process must call it."""
    items, skipped = [], []
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = calibration_batches(data, num_images, batch_size, seed=seed, rank=rank, world_size=world)
    with tqdm(total=math.ceil(num_images / world), unit="img", disable=not accelerator.is_local_main_process) as bar:
        for batch in batches:
            skipped += batch["skipped_names"]
            bar.update(batch["pixel_values"].shape[0] + batch["skipped"])
            if batch["pixel_values"].shape[0]:  # every image of a batch may be undecodable
                items += measure({**batch, "pixel_values": batch["pixel_values"].to(accelerator.device)})
    return sorted(gather_object(items), key=lambda item: item[0]), gather_object(skipped)


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


def add_source_arguments(parser, lpips: bool = False) -> None:
    """The options every eval script reads its VAEs with (:func:`first_stage.checkpoint.load_vae`'s), and with
    ``lpips`` those of the LPIPS weights."""
    parser.add_argument("--weights", choices=["ema", "raw"], default=None,
                        help="training checkpoints: EMA or raw weights (default: the run's export.weights)")
    parser.add_argument("--single-file-config", default=None, help="diffusers folder with the config of single files")
    parser.add_argument("--norm-num-groups", type=int, default=None,
                        help="GroupNorm groups of a foreign weight file (not visible in its weights; default 32)")
    if lpips:
        parser.add_argument("--lpips-weights", default=None, help=f"torchvision's {VGG16_FILENAME}")
        parser.add_argument("--no-lpips", action="store_true", help="measure without LPIPS")


@dataclasses.dataclass
class EvaluationInputs:
    """What an eval script measures on: its data, output folder (made), how many images (and how many the data
    holds), the arguments its VAEs load with, and LPIPS (None when not asked for or ``--no-lpips``)."""

    data: DataConfig
    out: Path
    images: int
    available: int | None
    load: dict
    lpips: torch.nn.Module | None = None


def evaluation_inputs(args, accelerator, lpips: bool = False) -> EvaluationInputs:
    """The :class:`EvaluationInputs` of an eval script's arguments (:func:`add_source_arguments`, ``--data``,
    ``--out``, ``--num-images``)."""
    data = evaluation_data(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    perceptual = None
    if lpips and not args.no_lpips:
        option = f"to this script: --lpips-weights /path/to/{VGG16_FILENAME} (or measure without LPIPS: --no-lpips)"
        perceptual = load_lpips(args.lpips_weights, option=option).to(accelerator.device)
    images, available = images_to_measure(data, args.num_images, accelerator.print)
    load = {"weights": args.weights, "single_file_config": args.single_file_config,
            "norm_num_groups": args.norm_num_groups}
    return EvaluationInputs(data, out, images, available, load, perceptual)


def images_to_measure(data: DataConfig, asked: int, say: Callable[[str], None] = print) -> tuple[int, int | None]:
    """(how many images an evaluation of ``asked`` images of ``data`` measures, how many the data
    holds: None for a stream); says so when the data holds fewer than asked."""
    available = available_images(data)
    if available is not None and available < asked:
        say(f"note: asked for {asked} images; {describe(data)} holds {available}: measuring {available}")
        return available, available
    return asked, available


@torch.no_grad()
def nonlocality(vae: Autoencoder, z: torch.Tensor, delta: torch.Tensor, seeds: list[int],
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


def encode_mean(vae: Autoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior mean, log-variance) of images (B, 3, H, W), each (B, C, h, w) float32."""
    posterior = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.logvar.float()


def _first_pass(vae: Autoencoder, stats: LatentStatistics, batch: dict) -> list[tuple]:
    """The first pass of :func:`latent_statistics` over a batch; no items."""
    stats.first_pass(*encode_mean(vae, batch["pixel_values"]))
    return []


def _second_pass(vae: Autoencoder, stats: LatentStatistics, seed: int, nonlocality_images: int, margin: int,
                 batch: dict) -> list[tuple]:
    """The second pass of :func:`latent_statistics` over a batch: (image id, file, peak share,
    random share) of the images it perturbs."""
    z, _ = encode_mean(vae, batch["pixel_values"])
    stats.second_pass(z)
    # Each image's random position is seeded by the image: the same test whatever the process count.
    chosen = [i for i, image_id in enumerate(batch["ids"]) if image_id < nonlocality_images]
    if not chosen:
        return []
    found = nonlocality(vae, z[chosen], stats.std.float(), [hash((seed, batch["ids"][i])) for i in chosen], margin)
    return [(batch["ids"][i], batch["names"][i], p, r) for i, p, r in zip(chosen, found["peak"], found["random"])]


@torch.no_grad()
def latent_statistics(vae: Autoencoder, accelerator, data: DataConfig, num_images: int, batch_size: int,
                      seed: int = 0, nonlocality_images: int = 16, margin: int = 1) -> dict:
    """The statistics of :class:`first_stage.latent_stats.LatentStatistics` over ``num_images`` images
    (two passes over the same images), the carried normalisation against the one they imply, and the
    non-locality of the first ``nonlocality_images`` images of the pick (:func:`nonlocality`)."""
    side = data.resolution // downsampling_factor(vae.config)
    carried = LatentNormalizer.of(vae)
    stats = LatentStatistics(vae.config.latent_channels, (side, side), carried)
    first = functools.partial(_first_pass, vae, stats)
    _, skipped = stream_images(accelerator, data, num_images, batch_size, seed, first)
    stats.finish_first_pass(functools.partial(reduce_sum, accelerator))
    second = functools.partial(_second_pass, vae, stats, seed, nonlocality_images, margin)
    perturbed, _ = stream_images(accelerator, data, num_images, batch_size, seed, second)
    stats.combine(functools.partial(reduce_sum, accelerator), gather_object)
    if not accelerator.is_main_process:
        return {}
    if not stats.peak_zhat:
        raise DataError(f"no decodable image among the {num_images} picked of {describe(data)}")
    result = stats.result()
    result["scale"].update(carried_and_implied(carried, stats.layout_moments))
    peak, random = [p for _, _, p, _ in perturbed], [r for _, _, _, r in perturbed]
    result["nonlocality"] = {"images": len(perturbed), "margin_cells": margin, "files": [f for _, f, _, _ in perturbed],
                             "peak": peak, "random": random,
                             "peak_median": float(torch.tensor(peak).median()) if peak else None,
                             "random_median": float(torch.tensor(random).median()) if random else None}
    result["skipped_files"] = skipped
    return result


def _reconstruct(vae: Autoencoder, lpips, fid, lowest: WorstImages, batch: dict) -> list[tuple]:
    """The metrics of :func:`reconstruction` for a batch: (image id, file, PSNR, SSIM, LPIPS or None)
    of each image; the worst kept, FID fed."""
    x = batch["pixel_values"]
    rec = decode_latent(vae, encode_latent(vae, x)).float()
    metrics = reconstruction_metrics(x, rec, lpips)
    lowest.add(metrics["psnr"], x, rec, batch["names"])
    if fid is not None:
        fid.update((x.float() + 1) / 2, real=True)
        fid.update((rec.clamp(-1, 1) + 1) / 2, real=False)
    scores = [metrics[k].tolist() if k in metrics else [None] * len(x) for k in ("psnr", "ssim", "lpips")]
    return list(zip(batch["ids"], batch["names"], *scores))


@torch.no_grad()
def reconstruction(vae: Autoencoder, accelerator, data: DataConfig, num_images: int, batch_size: int, seed: int = 0,
                   lpips=None, fid=None, worst: int = 8) -> tuple[dict, list[tuple]]:
    """Per-image PSNR, SSIM and LPIPS (:func:`reconstruction_metrics`) of posterior-mean reconstructions,
    summarised, with rFID when ``fid`` is given (a collective); and the ``worst`` images by PSNR as
    (PSNR, file, image, reconstruction), worst first."""
    lowest = WorstImages(worst)
    measure = functools.partial(_reconstruct, vae, lpips, fid, lowest)
    items, skipped = stream_images(accelerator, data, num_images, batch_size, seed, measure)
    worst_items = sorted(gather_object(lowest.items()), key=lambda item: item[0])[:worst]
    rfid = fid.compute().item() if fid is not None else None  # torchmetrics syncs its states across processes
    if not accelerator.is_main_process:
        return {}, []
    if not items:
        raise DataError(f"no decodable image among the {num_images} picked of {describe(data)}")
    keys = ["psnr", "ssim"] + (["lpips"] if lpips is not None else [])
    per_image = {"file": [item[1] for item in items],
                 **{k: [item[2 + i] for item in items] for i, k in enumerate(("psnr", "ssim", "lpips")) if k in keys}}
    result = {"images": len(items), **{k: summarize(per_image[k]) for k in keys}, "rfid": rfid,
              "per_image": per_image, "skipped_files": skipped}
    return result, worst_items
