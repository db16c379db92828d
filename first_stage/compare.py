"""The compatibility report of a candidate VAE against a reference (``eval/compare.py``): does the candidate
drop in where the reference was?

- Any diffusers image autoencoder of :data:`IMAGE_AUTOENCODERS` (:func:`load_image_autoencoder`), behind one
  interface: :func:`encode_latent` (the raw latent, (B, C, h, w)), :func:`decode_latent` (images in [-1, 1])
  and :func:`normalizer_of` (how pipelines map that latent into the diffusion model's space).
- Latent drift on the same images (:class:`AffineDrift`): per channel the least-squares fit
  B_c ≈ slope_c · A_c + offset_c with R², cosine similarity and relative error ‖B − A‖ / ‖A‖, on the raw
  latents and on the normalised ones, streamed in float64 sums.
- Cross-decoding (:class:`Comparison`): the reference's normalised latents through the candidate's
  normaliser and decoder, and back; PSNR, SSIM, LPIPS against the image and against the latent's own decoder.
- Several resolutions (:func:`at_resolution`): untiled and tiled (diffusers' own tiling), the seam error of
  tiling (:func:`seam_error`) and the peak memory of each call (:func:`peak_memory`).
- The fp16 audit of each (:func:`fp16_audit`, the export's check through the interface above).

What a report means, figure by figure: docs/compare.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, AutoencoderTiny
# Figures are made without pyplot, as in first_stage.reports, so a notebook's backend is left alone.
from matplotlib.figure import Figure
from torch import nn

from .checkpoint import CheckpointError, check_weights_readable, load_vae
from .config import ConfigError, DataConfig
from .data import DataError, calibration_batches, describe
from .evaluation import reconstruction_metrics, stream_images, summarize
from .export import fp16_overflow_check
from .latent_norm import LatentNormalizer
from .latent_stats import AffineDrift
from .model import FP16_MAX, count_parameters, decode_latent, downsampling_factor, encode_latent
from .reports import report

# The classes this report reads, by the name diffusers writes into a folder's config.json (``_class_name``).
IMAGE_AUTOENCODERS = {cls.__name__: cls for cls in (AutoencoderKL, AutoencoderKLFlux2, AutoencoderTiny,
                                                      AutoencoderDC, AutoencoderKLQwenImage)}
KL_CLASSES = (AutoencoderKL, AutoencoderKLFlux2)  # what first_stage.checkpoint.load_vae reads itself

# Where each class's latent normalisation comes from (diffusers 0.42.1, paths under diffusers/pipelines/).
NORMALISATION_SOURCES = {
    "AutoencoderKL": "stable_diffusion/pipeline_stable_diffusion.py (latents / scaling_factor), "
                     "stable_diffusion_3/pipeline_stable_diffusion_3.py (latents / scaling_factor + shift_factor), "
                     "stable_diffusion_xl/pipeline_stable_diffusion_xl.py (latents_mean, latents_std)",
    "AutoencoderKLFlux2": "flux2/pipeline_flux2.py (_patchify_latents, then (z - bn.running_mean) / "
                          "sqrt(bn.running_var + batch_norm_eps))",
    "AutoencoderTiny": "stable_diffusion/pipeline_stable_diffusion.py reads the same scaling_factor/shift_factor "
                       "fields; shipped TAESD configs say 1.0 / 0.0: the identity (its latents are already the "
                       "teacher's normalised ones)",
    "AutoencoderDC": "sana/pipeline_sana.py (decode latents / scaling_factor), sana/pipeline_sana_controlnet.py "
                     "(encode latent * scaling_factor)",
    "AutoencoderKLQwenImage": "qwenimage/pipeline_qwenimage.py (decode latents / (1 / latents_std) + latents_mean), "
                              "qwenimage/pipeline_qwenimage_img2img.py (encode (z - latents_mean) * (1 / latents_std))",
}

MEMORY_MEASURES = {
    "cuda": "CUDA caching allocator: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
            "torch.cuda.memory_allocated before the call (what the call's tensors took at their peak; the "
            "allocator's reserved pool is larger)",
    "cpu": "tracked CPU allocations: torch.profiler(profile_memory=True) records every allocation and free of "
           "PyTorch's CPU allocator during the call; the peak of their running sum (not the process RSS: memory "
           "allocated outside PyTorch's allocator is not seen)",
}
# Attributes diffusers' tiling reads, saved and restored around a tiled call (:func:`tiling`).
_TILING_ATTRIBUTES = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_sample_min_height",
                      "tile_sample_min_width", "tile_sample_stride_height", "tile_sample_stride_width",
                      "tile_latent_min_height", "tile_latent_min_width")


class UnsupportedAutoencoderError(CheckpointError):
    """A folder holding an autoencoder class this report cannot read; the message names the file and class."""


class TilingUnsupported(ValueError):
    """A VAE whose diffusers tiling cannot run on its latents; the message says why."""


def load_image_autoencoder(source: str | Path, **load) -> nn.Module:
    """Any VAE of :data:`IMAGE_AUTOENCODERS`, in eval mode on the CPU: the sources
    :func:`first_stage.checkpoint.load_vae` reads (with its ``load`` arguments), and diffusers folders of the
    other classes, read with ``from_pretrained`` from safetensors weights only."""
    path = Path(source)
    config_file = path / "config.json"
    if not (path.is_dir() and config_file.is_file()):
        return load_vae(path, **load).vae  # runs, checkpoints, single files; a missing path is named there
    name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
    if name not in IMAGE_AUTOENCODERS:
        raise UnsupportedAutoencoderError(f"{config_file.resolve()}: holds a {name}, not one of the autoencoder "
                                          f"classes the comparison reads ({', '.join(IMAGE_AUTOENCODERS)})")
    if issubclass(IMAGE_AUTOENCODERS[name], KL_CLASSES):
        return load_vae(path, **load).vae
    files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path.resolve()}: no diffusion_pytorch_model*.safetensors; a {name} is read from "
                                "safetensors weights only")
    for file in files:
        check_weights_readable(file)
    return IMAGE_AUTOENCODERS[name].from_pretrained(path, use_safetensors=True).eval()


def normalizer_of(vae: nn.Module) -> LatentNormalizer:
    """How pipelines map this VAE's raw latent into the diffusion model's space (:data:`NORMALISATION_SOURCES`):
    the KL classes as :meth:`LatentNormalizer.of` reads them; ``AutoencoderTiny`` and ``AutoencoderDC`` their
    ``scaling_factor`` (and Tiny's ``shift_factor``): z' = (z − shift) · scaling_factor; ``AutoencoderKLQwenImage``
    per channel z' = (z − latents_mean_c) / latents_std_c (a per-channel normaliser with scaling_factor 1)."""
    return LatentNormalizer.of(vae)  # every class's config fields fall in one of its kinds, as documented above


def downsampling(vae: nn.Module) -> int:
    """Pixels per latent cell along a side."""
    if isinstance(vae, (AutoencoderDC, AutoencoderKLQwenImage)):
        return vae.spatial_compression_ratio
    return downsampling_factor(vae.config)


def autoencoder_entry(path: str | Path, vae: nn.Module, results: dict) -> dict:
    """A report's ``vaes`` entry: where the VAE came from, its class, its normalisation, its results."""
    name = type(vae).__name__
    return {"path": str(path), "class": name, "parameters": count_parameters(vae),
            "scaling_factor": vae.config.get("scaling_factor"), "shift_factor": vae.config.get("shift_factor"),
            "downsampling": downsampling(vae), "normalisation": normalizer_of(vae).describe(),
            "normalisation_source": NORMALISATION_SOURCES[name], "results": results}


def shape_difference(what: str, reference: tuple, candidate: tuple) -> str | None:
    """Why ``what`` cannot be compared (shapes (C, h, w) differ), or None when it can."""
    if tuple(reference) == tuple(candidate):
        return None
    return f"{what} shapes differ: reference {list(reference)}, candidate {list(candidate)} (C, h, w)"


class Comparison:
    """Latent drift, own reconstructions and cross-decoding of two VAEs on the same images, accumulated over
    batches: :meth:`measure` is :func:`first_stage.evaluation.stream_images`' measure, :meth:`result` the
    summary. ``keep`` images of the first batches are kept for a picture of the cross-decodes."""

    def __init__(self, reference: nn.Module, candidate: nn.Module, lpips=None, keep: int = 4):
        self.vaes = (reference, candidate)
        self.norms = (normalizer_of(reference), normalizer_of(candidate))
        self.lpips, self.keep = lpips, keep
        self.shapes: dict | None = None  # raw and normalised latent shapes (C, h, w) of both, from the first batch
        self.skipped: dict[str, str | None] = {}
        self.drift: dict[str, AffineDrift | None] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}

    def _first_batch(self, raw: tuple[torch.Tensor, torch.Tensor], normal: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Fix the shapes, and what can be compared, from the first batch's latents."""
        self.shapes = {"raw": [list(t.shape[1:]) for t in raw], "normalised": [list(t.shape[1:]) for t in normal]}
        self.skipped = {"raw": shape_difference("raw latent", *self.shapes["raw"]),
                        "normalised": shape_difference("normalised latent", *self.shapes["normalised"])}
        self.skipped["cross"] = self.skipped["normalised"]  # a diffusion model hands over the normalised latent
        self.drift = {k: None if self.skipped[k] else AffineDrift(self.shapes[k][0][0]) for k in ("raw", "normalised")}

    @torch.no_grad()
    def measure(self, batch: dict) -> list[tuple]:
        """One batch: drift sums updated, images kept; returns (image id, file, {metric: value}) per image."""
        x = batch["pixel_values"]
        (ref, cand), (ref_norm, cand_norm) = self.vaes, self.norms
        raw = (encode_latent(ref, x).float(), encode_latent(cand, x).float())
        normal = (ref_norm.normalize(raw[0]), cand_norm.normalize(raw[1]))
        if self.shapes is None:
            self._first_batch(raw, normal)
        for key, pair in (("raw", raw), ("normalised", normal)):
            if self.drift[key] is not None:
                self.drift[key].add(*pair)
        own = (decode_latent(ref, raw[0]).float(), decode_latent(cand, raw[1]).float())
        metrics = {f"{who}_own/{k}": v for who, rec in zip(("reference", "candidate"), own)
                   for k, v in reconstruction_metrics(x, rec, self.lpips).items()}
        images = {"image": x, "reference_own": own[0], "candidate_own": own[1]}
        if self.skipped["cross"] is None:
            # The reference's latent as the diffusion model sees it, read back through the candidate's normaliser
            # into the candidate's decoder (and the other way): what swapping the VAE under a model does.
            crossed = {"reference_to_candidate": (decode_latent(cand, cand_norm.denormalize(normal[0])).float(), 0),
                       "candidate_to_reference": (decode_latent(ref, ref_norm.denormalize(normal[1])).float(), 1)}
            for name, (rec, source) in crossed.items():
                images[name] = rec
                metrics.update({f"{name}/{k}": v for k, v in reconstruction_metrics(x, rec, self.lpips).items()})
                # against the reconstruction (as an image: clamped) by the decoder the latent belongs to
                metrics.update({f"{name}_vs_own/{k}": v for k, v in
                                reconstruction_metrics(own[source].clamp(-1, 1), rec, self.lpips).items()})
        room = self.keep - sum(t.shape[0] for t in self.kept.get("image", []))
        if room > 0:
            for name, t in images.items():
                self.kept.setdefault(name, []).append(t[:room].float().cpu())
        keys = sorted(metrics)
        return [(image_id, name, {k: metrics[k][i].item() for k in keys})
                for i, (image_id, name) in enumerate(zip(batch["ids"], batch["names"]))]

    def kept_images(self) -> dict[str, torch.Tensor]:
        """The kept images by role (image, reference_own, candidate_own and the cross-decodes), each (N, 3, H, W)."""
        return {name: torch.cat(ts)[:self.keep] for name, ts in self.kept.items()}

    def result(self, items: list[tuple]) -> dict:
        """The comparison's summary (``report.json``'s ``comparison``) from :meth:`measure`'s items."""
        if not items:
            raise DataError("no decodable image to compare the VAEs on")
        values = {k: [item[2][k] for item in items] for k in items[0][2]}
        grouped: dict[str, dict] = {}
        for key, vals in values.items():
            group, metric = key.split("/")
            grouped.setdefault(group, {})[metric] = summarize(vals)
        drift = {k: {"skipped": self.skipped[k]} if self.drift[k] is None else self.drift[k].result()
                 for k in ("raw", "normalised")}
        cross = {"skipped": self.skipped["cross"]} if self.skipped["cross"] else {
            k: grouped[k] for k in ("reference_to_candidate", "reference_to_candidate_vs_own",
                                    "candidate_to_reference", "candidate_to_reference_vs_own")}
        return {"images": len(items), "latent_shapes": self.shapes,
                "normalisation": {"reference": self.norms[0].describe(), "candidate": self.norms[1].describe()},
                "latent_drift": drift, "cross_decoding": cross,
                "own_reconstruction": {"reference": grouped["reference_own"], "candidate": grouped["candidate_own"]}}


def compare_vaes(reference: nn.Module, candidate: nn.Module, accelerator, data: DataConfig, num_images: int,
                 batch_size: int, seed: int = 0, lpips=None, keep: int = 4) -> tuple[dict, list[str], dict]:
    """:class:`Comparison` over ``num_images`` images of ``data`` (one process): the summary, the undecodable
    files, and the kept images by role."""
    if accelerator.num_processes > 1:
        raise ConfigError("the VAE comparison runs in one process; run eval/compare.py with python, not "
                          "accelerate launch --num_processes > 1")
    comparison = Comparison(reference, candidate, lpips, keep)
    items, skipped = stream_images(accelerator, data, num_images, batch_size, seed, comparison.measure)
    if not items:
        raise DataError(f"no decodable image among the {num_images} picked of {describe(data)}")
    return comparison.result(items), skipped, comparison.kept_images()


# --- Tiling, seams and memory ---------------------------------------------------------------------------

@contextlib.contextmanager
def tiling(vae: nn.Module, tile: int | None = None) -> Iterator[dict]:
    """Within the block, ``vae`` encodes and decodes with diffusers' own tiling, with tiles of ``tile`` pixels
    (None: the class's defaults, what ``enable_tiling()`` gives) and the class's own overlap; yields the
    grid of the decoded output, ``{"tile_px", "stride_px", "blend_px"}``: tile k ≥ 1 starts at k · stride
    and is blended with its neighbour over its first ``blend_px`` pixels. Raises :class:`TilingUnsupported`."""
    saved = {name: getattr(vae, name) for name in _TILING_ATTRIBUTES if hasattr(vae, name)}
    try:
        yield _enable_tiling(vae, tile)
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


def _enable_tiling(vae: nn.Module, tile: int | None) -> dict:
    """Switch tiling on (see :func:`tiling`) and return the output grid."""
    f = downsampling(vae)
    if isinstance(vae, KL_CLASSES):
        vae.enable_tiling()
        if tile:
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // f
        size = vae.tile_sample_min_size
        size = size[0] if isinstance(size, (list, tuple)) else int(size)
        blend = int(size * vae.tile_overlap_factor)  # diffusers autoencoder_kl.py tiled_decode: row_limit
        return {"tile_px": size, "stride_px": size - blend, "blend_px": blend}
    if isinstance(vae, AutoencoderTiny):
        # diffusers 0.42.1 autoencoder_tiny.py: the tiled encode writes into 4 channels, spatial_scale_factor 8
        if vae.config.latent_channels != 4 or f != vae.spatial_scale_factor:
            raise TilingUnsupported(f"diffusers' AutoencoderTiny tiling assumes 4 latent channels and f8; this one "
                                    f"has {vae.config.latent_channels} channels, f{f}")
        vae.enable_tiling()
        if tile:
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // f
        latent = vae.tile_latent_min_size
        blend = int(latent * vae.tile_overlap_factor)
        if blend < 1:
            raise TilingUnsupported(f"AutoencoderTiny tiles of {latent * f} px blend over int({latent} × "
                                    f"{vae.tile_overlap_factor}) = 0 latent cells: diffusers' blend mask breaks")
        return {"tile_px": latent * f, "stride_px": (latent - blend) * f, "blend_px": blend * f}
    # AutoencoderDC, AutoencoderKLQwenImage: tile and stride in pixels, the stride a whole number of latent cells
    if tile:
        stride = max(f, int(tile * vae.tile_sample_stride_height / vae.tile_sample_min_height) // f * f)
        vae.enable_tiling(tile, tile, stride, stride)
    else:
        vae.enable_tiling()
    size, stride = vae.tile_sample_min_height, vae.tile_sample_stride_height
    return {"tile_px": size, "stride_px": stride, "blend_px": size - stride}


def tiles_per_side(vae: nn.Module, grid: dict, side: int) -> int:
    """How many tiles diffusers cuts a ``side``-pixel decode into (AutoencoderTiny tiles at any size)."""
    if side <= grid["tile_px"] and not isinstance(vae, AutoencoderTiny):
        return 1
    return len(range(0, side, grid["stride_px"]))


def band_mask(side: int, stride: int, blend: int) -> torch.Tensor:
    """(side,) bool: the pixels where tile k ≥ 1 is blended with its neighbour, [k·stride, k·stride + blend)."""
    offset = torch.arange(side)
    return (offset >= stride) & (offset % stride < blend) if stride > 0 else torch.zeros(side, dtype=torch.bool)


def seam_error(tiled: torch.Tensor, untiled: torch.Tensor, grid: dict) -> dict:
    """|tiled − untiled| of two decodes (B, 3, H, W) of the same latent, in [-1, 1] units: max and mean, where
    the largest is and whether it falls in a blend band (:func:`band_mask`), the mean inside the bands and
    outside, and the mean by position within the tile period (both axes folded, ``period_profile``)."""
    diff = (tiled.float() - untiled.float()).abs().cpu()
    peak = diff.amax((0, 1))  # (H, W)
    mean = diff.mean((0, 1)).double()  # (H, W)
    h, w = peak.shape
    row, col = divmod(int(peak.argmax()), w)
    stride, blend = grid["stride_px"], grid["blend_px"]
    rows, cols = band_mask(h, stride, blend), band_mask(w, stride, blend)
    band = rows[:, None] | cols[None, :]
    profile = (_fold(mean.mean(1), stride) + _fold(mean.mean(0), stride)) / 2
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "max_at": [row, col],
            "max_in_band": bool(band[row, col]),
            "band_mean_abs": mean[band].mean().item() if band.any() else None,
            "interior_mean_abs": mean[~band].mean().item() if (~band).any() else None,
            "period_profile": profile.tolist()}


def _fold(values: torch.Tensor, period: int) -> torch.Tensor:
    """The mean of ``values`` (N,) at each offset modulo ``period``."""
    offset = torch.arange(values.numel()) % period
    return torch.bincount(offset, values, period) / torch.bincount(offset, minlength=period).clamp_min(1)


def peak_memory(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int | None, float]:
    """``fn()``, the peak bytes it allocated above what was allocated before (:data:`MEMORY_MEASURES`; None on
    other devices) and its wall time in seconds (on the CPU, with the profiler's overhead)."""
    device = torch.device(device)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before, time.perf_counter() - start
    if device.type != "cpu":
        return fn(), None, time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    seconds = time.perf_counter() - start
    # Every allocation (+bytes) and free (−bytes) of the CPU allocator, inside ops or not, in time order.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = np.cumsum([nbytes for _, nbytes in events]) if events else np.zeros(1)
    return out, int(max(running.max(), 0)), seconds


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA's OutOfMemoryError, or the CPU allocator's)."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _attempt(fn: Callable[[], torch.Tensor], device, record: dict, key: str) -> torch.Tensor | None:
    """``fn()`` with its peak memory and time kept in ``record`` under ``key``; None, and the failure recorded,
    when it runs out of memory or the VAE cannot tile."""
    try:
        out, peak, seconds = peak_memory(fn, device)
    except TilingUnsupported as err:
        record[f"{key}_status"] = f"not supported: {err}"
        return None
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err) and not isinstance(err, MemoryError):
            raise
        record[f"{key}_status"] = f"out of memory: {str(err).splitlines()[0][:200]}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    record.setdefault(f"{key}_status", "ok")  # a failure on another image stays recorded
    record[f"{key}_peak_bytes"] = None if peak is None else max(record.get(f"{key}_peak_bytes") or 0, peak)
    record[f"{key}_seconds"] = max(record.get(f"{key}_seconds", 0.0), seconds)
    return out


def _tiled(fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], vae: nn.Module, tile: int | None,
           x: torch.Tensor) -> torch.Tensor:
    """``fn(vae, x)`` with tiling on (:func:`tiling`)."""
    with tiling(vae, tile):
        return fn(vae, x)


@torch.no_grad()
def at_resolution(vae: nn.Module, images: list[torch.Tensor], device, tile: int | None = None) -> dict:
    """Reconstruction of ``images`` (each (1, 3, R, R) in [-1, 1]) one at a time, untiled and with diffusers'
    tiling: peak memory and time of each encode and decode, PSNR of the untiled decode and of the tiled decode
    of the same (untiled) latent, the relative error of the tiled encode's latent, and the seam error of the
    tiled decode (:func:`seam_error`, over all images). A call that runs out of memory is recorded, not raised."""
    side = images[0].shape[-1]
    f = downsampling(vae)
    out = {"resolution": side, "images": len(images)}
    if side % f:
        return {**out, "skipped": f"{side} px is not a multiple of the VAE's downsampling {f}"}
    untiled, tiled = {}, {}
    try:
        with tiling(vae, tile) as grid:
            pass
        tiled["grid"] = {**grid, "tiles_per_side": tiles_per_side(vae, grid, side)}
    except TilingUnsupported as err:
        grid, tiled["encode_status"] = None, f"not supported: {err}"
    psnr_untiled, psnr_tiled, latent_error, pairs = [], [], [], []
    for x in images:
        x = x.to(device)
        z = _attempt(functools.partial(encode_latent, vae, x), device, untiled, "encode")
        z_tiled = None if grid is None else _attempt(functools.partial(_tiled, encode_latent, vae, tile, x), device,
                                                     tiled, "encode")
        if z is not None and z_tiled is not None:
            latent_error.append(((z_tiled.float() - z.float()).norm() / z.float().norm().clamp_min(1e-30)).item())
        z = z if z is not None else z_tiled  # the untiled latent, or where it ran out of memory the tiled one
        if z is None:
            continue
        rec = _attempt(functools.partial(decode_latent, vae, z), device, untiled, "decode")
        rec_tiled = None if grid is None else _attempt(functools.partial(_tiled, decode_latent, vae, tile, z), device,
                                                       tiled, "decode")
        if rec is not None:
            psnr_untiled.append(reconstruction_metrics(x, rec)["psnr"].item())
        if rec_tiled is not None:
            rec_tiled = rec_tiled[..., :side, :side]  # diffusers' DC tiling does not crop to the image
            psnr_tiled.append(reconstruction_metrics(x, rec_tiled)["psnr"].item())
        if rec is not None and rec_tiled is not None:
            pairs.append((rec_tiled.float().cpu(), rec.float().cpu()))
    untiled["psnr"] = summarize(psnr_untiled)["mean"] if psnr_untiled else None
    tiled["psnr"] = summarize(psnr_tiled)["mean"] if psnr_tiled else None
    tiled["encode_relative_error"] = max(latent_error) if latent_error else None
    seam = seam_error(torch.cat([t for t, _ in pairs]), torch.cat([u for _, u in pairs]), grid) if pairs else None
    return {**out, "latent_shape": None if z is None else list(z.shape[1:]), "untiled": untiled, "tiled": tiled,
            "seam": seam}


def resolution_images(data: DataConfig, resolution: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` images of ``data`` at ``resolution``² (each (1, 3, R, R)), the protocol of ``data`` scaled: the
    short side resized in proportion (bicubic, antialiased) when ``data`` resizes, then the centre crop."""
    resize = None if data.resize is None else round(data.resize * resolution / data.resolution)
    scaled = dataclasses.replace(data, resolution=resolution, resize=resize)
    return [x for batch in calibration_batches(scaled, count, 1, seed) for x in batch["pixel_values"].split(1)]


def resolution_sweep(vae: nn.Module, data: DataConfig, resolutions: list[int], count: int, device,
                     tile: int | None = None, seed: int = 0, say: Callable[[str], None] = print) -> list[dict]:
    """:func:`at_resolution` at each of ``resolutions`` on ``count`` images of ``data``."""
    found = []
    for resolution in resolutions:
        say(f"{type(vae).__name__}: {resolution}² untiled and tiled")
        found.append(at_resolution(vae, resolution_images(data, resolution, count, seed), device, tile))
    return found


@torch.inference_mode()
def fp16_audit(vae: nn.Module, x: torch.Tensor) -> dict:
    """Encode and decode ``x`` with every weight and activation in fp16, as
    :func:`first_stage.export.fp16_overflow_check` (the same hooks; the same result for the KL classes) through
    :func:`encode_latent` / :func:`decode_latent`: the modules whose output overflowed, in execution order, the
    largest finite |activation|, its headroom to fp16's 65504, and a verdict."""
    found = fp16_overflow_check(vae, x)
    headroom = FP16_MAX / found["peak"] if found["peak"] > 0 else None
    verdict = (f"overflows in fp16, first at {found['overflow'][0]}" if found["overflow"] else
               f"no overflow; largest activation {found['peak']:.4g} ({headroom:.3g}× below 65504)" if headroom else
               "no overflow")
    return {**found, "headroom": headroom, "verdict": verdict, "images": int(x.shape[0]),
            "resolution": int(x.shape[-1])}


# --- Report ---------------------------------------------------------------------------------------------

def compare_report(data: DataConfig, entries: list[dict], comparison: dict, images_asked: int,
                   images_available: int | None, device) -> dict:
    """``report.json``: :func:`first_stage.reports.report` of kind ``compare`` over the two
    :func:`autoencoder_entry` entries (reference first), with the comparison, the device and what its peak
    memory figures measure (:data:`MEMORY_MEASURES`)."""
    device = torch.device(device)
    rep = report("compare", data, entries, images_asked, images_available)
    rep["comparison"] = {**comparison, "device": str(device),
                         "memory_measure": MEMORY_MEASURES.get(device.type, f"not measured on {device.type}")}
    return rep


def readable_bytes(value: int | None) -> str:
    """Bytes in GiB, or MiB below 1 GiB."""
    if value is None:
        return "–"
    return f"{value / 2**30:.3g} GiB" if value >= 2**30 else f"{value / 2**20:.3g} MiB"


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e3) else f"{value:.4f}"
    return str(value)


def markdown(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows])


def drift_table(drift: dict) -> str:
    """The latent drift summary: raw and normalised, against identical latents."""
    rows = [("lowest R² of a channel", "r2_min", 1.0), ("slope, smallest", "slope_min", 1.0),
            ("slope, largest", "slope_max", 1.0), ("largest \\|offset\\|", "offset_max_abs", 0.0),
            ("cosine similarity", "cosine", 1.0), ("relative error ‖B − A‖ / ‖A‖", "relative_error", 0.0)]
    cols = [drift[k] for k in ("raw", "normalised")]
    body = [[label] + [c["overall"][key] if "overall" in c else "skipped" for c in cols] + [ideal]
            for label, key, ideal in rows]
    notes = [f"{k}: {drift[k]['skipped']}" for k in ("raw", "normalised") if "skipped" in drift[k]]
    if len(notes) == 2:
        return "\n".join(f"- skipped {n}" for n in notes)
    return markdown(["statistic", "raw latent", "normalised latent", "identical latents"], body) + (
        "\n\n" + "\n".join(f"- skipped {n}" for n in notes) if notes else "")


def channel_table(drift: dict, limit: int = 32) -> str:
    """Per channel of the raw latent (or the normalised one when raw is skipped): slope, offset, R², cosine,
    relative error; up to ``limit`` channels."""
    key = "raw" if "skipped" not in drift["raw"] else "normalised"
    d = drift[key]
    if "skipped" in d:
        return ""
    rows = [[c, d["slope"][c], d["offset"][c], d["r2"][c], d["cosine"][c], d["relative_error"][c]]
            for c in range(min(d["channels"], limit))]
    more = f"\n\n({d['channels'] - limit} more channels in report.json)" if d["channels"] > limit else ""
    return (f"Per channel, {key} latent (B_c ≈ slope · A_c + offset):\n\n"
            + markdown(["channel", "slope", "offset", "R²", "cosine", "relative error"], rows) + more)


def cross_table(comparison: dict) -> str:
    """PSNR / SSIM / LPIPS of the own reconstructions and the cross-decodes."""
    own, cross = comparison["own_reconstruction"], comparison["cross_decoding"]
    lines = [("reference latent → reference decoder", own["reference"], None),
             ("candidate latent → candidate decoder", own["candidate"], None)]
    if "skipped" not in cross:
        lines += [("reference latent → candidate decoder", cross["reference_to_candidate"],
                   cross["reference_to_candidate_vs_own"]),
                  ("candidate latent → reference decoder", cross["candidate_to_reference"],
                   cross["candidate_to_reference_vs_own"])]
    rows = [[label] + [_mean(vs_image, m) for m in ("psnr", "ssim", "lpips")]
            + [_mean(vs_own, m) for m in ("psnr", "ssim", "lpips")] for label, vs_image, vs_own in lines]
    table = markdown(["latent → decoder", "PSNR vs image ↑", "SSIM vs image ↑", "LPIPS vs image ↓",
                      "PSNR vs own decoder ↑", "SSIM vs own decoder ↑", "LPIPS vs own decoder ↓"], rows)
    return table + (f"\n\nCross-decoding skipped: {cross['skipped']}." if "skipped" in cross else "")


def _mean(entry: dict | None, metric: str) -> float | str | None:
    """The mean of a summarised metric; "exact" when every image was reconstructed exactly (PSNR = ∞)."""
    if entry is None or metric not in entry:
        return None
    return entry[metric]["mean"] if entry[metric]["mean"] is not None or not entry[metric]["exact"] else "exact"


def resolution_table(vaes: list[dict]) -> str:
    """Untiled and tiled reconstruction, seam error and peak memory per VAE and resolution."""
    rows = []
    for i, v in enumerate(vaes):
        for r in v["results"]["resolutions"]:
            if "skipped" in r:
                rows.append([f"{i + 1}", r["resolution"], r["skipped"]] + [None] * 8)
                continue
            u, t, s = r["untiled"], r["tiled"], r["seam"] or {}
            status = "; ".join(f"{who} {k.split('_')[0]}: {val}" for who, d in (("untiled", u), ("tiled", t))
                               for k, val in d.items() if k.endswith("_status") and val != "ok") or "ok"
            tiles = t.get("grid", {}).get("tiles_per_side")
            rows.append([f"{i + 1}", r["resolution"], status, u.get("psnr"), t.get("psnr"), tiles, s.get("max_abs"),
                         s.get("mean_abs"), _band(s), readable_bytes(u.get("decode_peak_bytes")),
                         readable_bytes(t.get("decode_peak_bytes"))])
    return markdown(["VAE", "side (px)", "status", "PSNR untiled", "PSNR tiled decode", "tiles per side",
                     "seam max", "seam mean", "band / interior mean", "peak decode, untiled", "peak decode, tiled"],
                    rows)


def _band(seam: dict) -> str | None:
    band, interior = seam.get("band_mean_abs"), seam.get("interior_mean_abs")
    if band is None or not interior:
        return None
    return f"{band / interior:.3g}×"


def fp16_table(vaes: list[dict]) -> str:
    rows = [[f"{i + 1}", v["class"], v["results"]["fp16"]["verdict"], v["results"]["fp16"]["peak"],
             ", ".join(v["results"]["fp16"]["overflow"][:3]) or "none"] for i, v in enumerate(vaes)]
    return markdown(["VAE", "class", "verdict", "largest finite activation", "first overflowing modules"], rows)


def compare_notes(rep: dict, plots: list[Path]) -> list[str]:
    """The sections of ``report.md`` after the list of VAEs: tables, pictures, what the memory figures measure."""
    comparison, vaes = rep["comparison"], rep["vaes"]
    names = [f"{i + 1} ({role}): {v['class']}, {v['normalisation']}" for i, (role, v) in
             enumerate(zip(("reference", "candidate"), vaes))]
    pictures = {p.stem: p.name for p in plots}
    lines = ["Normalisation (what a diffusion model reads; docs/compare.md gives each class's formula):", ""]
    lines += [f"- VAE {n}" for n in names] + ["", "## Latent drift on the same images", "",
                                              drift_table(comparison["latent_drift"]), "",
                                              channel_table(comparison["latent_drift"]), ""]
    if "drift_channels" in pictures:
        lines += [f"![drift]({pictures['drift_channels']})", ""]
    lines += ["## Cross-decoding", "", cross_table(comparison), ""]
    if "cross_decoding" in pictures:
        crossed = "" if "skipped" in comparison["cross_decoding"] else (
            "; reference latent → candidate decoder; candidate latent → reference decoder")
        lines += [f"Rows: image; reference's own reconstruction; candidate's own{crossed}.", "",
                  f"![cross]({pictures['cross_decoding']})", ""]
    lines += ["## Resolutions: untiled and tiled", "", resolution_table(vaes), "",
              f"Peak memory: {comparison['memory_measure']}. Seam error: |tiled − untiled| decode of the same latent "
              "in [-1, 1] units; 'band / interior' is the mean error in the tiles' blend bands over the mean "
              "elsewhere.", ""]
    lines += [f"![{stem}]({name})" for stem, name in pictures.items() if stem in ("resolutions", "seam_profile")]
    lines += ["", "## fp16", "", fp16_table(vaes), ""]
    return lines


def compare_plots(rep: dict, out: Path) -> list[Path]:
    """Per-channel slope, offset and R² (raw and normalised); seam error, peak memory and PSNR against
    resolution; the seam error by position within the tile period at the largest resolution."""
    paths = []
    drift = rep["comparison"]["latent_drift"]
    kinds = [k for k in ("raw", "normalised") if "skipped" not in drift[k]]
    if kinds:
        fig = Figure(figsize=(13, 3.2 * len(kinds)))
        axes = fig.subplots(len(kinds), 3, squeeze=False)
        for row, kind in zip(axes, kinds):
            d = drift[kind]
            for ax, key, ideal in zip(row, ("slope", "offset", "r2"), (1.0, 0.0, 1.0)):
                values = [np.nan if v is None else v for v in d[key]]
                ax.bar(np.arange(len(values)), values, color="C0")
                ax.axhline(ideal, color="k", ls="--", lw=0.8)
                ax.set_title(f"{kind} latent: {'R²' if key == 'r2' else key} per channel", fontsize=9)
                ax.set_xlabel("channel")
        fig.tight_layout()
        paths.append(out / "drift_channels.png")
        fig.savefig(paths[-1], dpi=100)
    sweeps = [[r for r in v["results"]["resolutions"] if "skipped" not in r] for v in rep["vaes"]]
    if any(sweeps):
        fig = Figure(figsize=(14, 3.8))
        axes = fig.subplots(1, 3)
        for i, (v, sweep) in enumerate(zip(rep["vaes"], sweeps)):
            label, sides = f"{i + 1}: {v['class']}", [r["resolution"] for r in sweep]
            seam = [r["seam"] or {} for r in sweep]
            axes[0].plot(sides, [s.get("max_abs", np.nan) for s in seam], "o-", color=f"C{i}", label=f"{label} max")
            axes[0].plot(sides, [s.get("mean_abs", np.nan) for s in seam], "s--", color=f"C{i}", label=f"{label} mean")
            for mode, style in (("untiled", "o-"), ("tiled", "s--")):
                peaks = [r[mode].get("decode_peak_bytes") for r in sweep]
                axes[1].plot(sides, [np.nan if p is None else p / 2**30 for p in peaks], style, color=f"C{i}",
                             label=f"{label} {mode}")
                psnr = [r[mode].get("psnr") for r in sweep]
                axes[2].plot(sides, [np.nan if p is None else p for p in psnr], style, color=f"C{i}",
                             label=f"{label} {mode}")
        titles = ("seam error |tiled − untiled| decode", f"peak decode memory (GiB, {rep['comparison']['device']})",
                  "PSNR (dB)")
        sides = sorted({r["resolution"] for sweep in sweeps for r in sweep})
        for ax, title in zip(axes, titles):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sides, [str(s) for s in sides])
            ax.minorticks_off()
            ax.set_xlabel("side (px)")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        axes[0].set_yscale("symlog", linthresh=1e-6)  # an exact tiled decode (0) stays on the plot
        axes[0].set_ylim(bottom=0)
        fig.tight_layout()
        paths.append(out / "resolutions.png")
        fig.savefig(paths[-1], dpi=100)
    profiles = [(i, v, [r for r in sweep if r["seam"] and r["tiled"]["grid"]["tiles_per_side"] > 1])
                for i, (v, sweep) in enumerate(zip(rep["vaes"], sweeps))]
    profiles = [(i, v, tiled[-1]) for i, v, tiled in profiles if tiled]
    if profiles:
        fig = Figure(figsize=(6.5, 3.8))
        ax = fig.subplots()
        for i, v, r in profiles:
            grid = r["tiled"]["grid"]
            ax.plot(r["seam"]["period_profile"], color=f"C{i}",
                    label=f"{i + 1}: {v['class']}, {r['resolution']} px, tile {grid['tile_px']} px")
            ax.axvspan(0, grid["blend_px"], color=f"C{i}", alpha=0.12)
        ax.set_xlabel("pixel offset within the tile period (shaded: blend band)")
        ax.set_ylabel("mean |tiled − untiled|")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "seam_profile.png")
        fig.savefig(paths[-1], dpi=100)
    return paths
