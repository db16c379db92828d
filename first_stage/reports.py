"""Evaluation reports: ``report.json`` (versioned schema), ``report.md`` (VAEs side by side with a
reference column) and PNG plots (several VAEs overlaid)."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import matplotlib.ticker
# Figures are made without pyplot, so importing this module (the trainer, the export) leaves a
# notebook's plotting backend alone; savefig renders PNGs with Agg whatever the backend.
from matplotlib.figure import Figure
import numpy as np

import torch
from PIL import Image

from . import __version__
from .checkpoint import BUNDLE_DIR
from .config import Config, DataConfig
from .data import describe, preprocessing
from .e2e import TRANSFORMER_EMA_FILE, TRANSFORMER_FILE
from .latent_stats import DEPLOYED_STD_TOLERANCE, GAUSSIAN_TAIL, LOGVAR_CLAMP, modal_share_by_chance
from .model import Autoencoder, downsampling_factor

SCHEMA_VERSION = 2  # 2: preprocessing, images_asked, images_available, skipped_files

_NUMBER = {"type": ["number", "null"]}
_VAE_ENTRY = {
    "type": "object",
    "required": ["path", "scaling_factor", "shift_factor", "results"],
    "properties": {"path": {"type": "string"}, "scaling_factor": _NUMBER, "shift_factor": _NUMBER,
                   "results": {"type": "object"}},
}
_LATENT_RESULTS = {
    "type": "object",
    "required": ["images", "latent_shape", "scale", "tails", "peaks", "spots", "posterior", "spectrum",
                 "nonlocality", "zhat_histogram"],
    "properties": {
        "images": {"type": "integer", "minimum": 1},
        "scale": {"type": "object", "required": ["std_of_means", "std_of_samples", "implied_scaling_factor",
                                                 "carried", "implied", "carried_over_implied",
                                                 "channel_carried_over_implied", "channel_std"]},
        "tails": {"type": "object", "required": ["p_abs_gt_3", "p_abs_gt_4", "p_abs_gt_6", "gaussian",
                                                 "channel_excess_kurtosis"]},
        "peaks": {"type": "object", "required": ["median", "p99", "gaussian"]},
        "spots": {"type": "object", "required": ["concentration_median", "modal_peak_position",
                                                 "peak_position_counts"]},
        "posterior": {"type": "object", "required": ["fraction_at_clamp", "channel_kl", "active_units",
                                                     "logvar_histogram"]},
        "spectrum": {"type": "object", "required": ["high_band_share"]},
        "nonlocality": {"type": "object", "required": ["images", "margin_cells", "peak", "random"]},
    },
}
_RECONSTRUCTION_RESULTS = {
    "type": "object",
    "required": ["images", "psnr", "ssim"],
    "properties": {"images": {"type": "integer", "minimum": 1},
                   **{k: {"type": "object", "required": ["mean", "std", "images", "exact"]} for k in ("psnr", "ssim")}},
}
_DIFFUSABILITY_RESULTS = {
    "type": "object",
    "required": ["images", "train_images", "held_out_images", "latent_shape", "normalisation", "held_out_loss",
                 "curve", "samples", "gfid", "cost", "probe", "ranking", "deployed", "columns", "dct"],
    "properties": {
        "images": {"type": "integer", "minimum": 2},
        "probe": {"type": "object", "required": ["family", "preset", "name", "parameters", "seeds", "ema_decay"]},
        "held_out_loss": {"type": "object", "required": ["timesteps", "per_timestep", "mean", "gaussian_reference",
                                                         "gaussian_reference_mean", "weights", "ratio", "ratio_sd",
                                                         "best_ratio", "seeds"]},
        "ranking": {"type": "object", "required": ["normalise", "ratio", "ratio_sd"]},
        "deployed": {"type": "object", "required": ["std", "tolerance", "flag"]},
        "columns": {"type": "object", "minProperties": 1,
                    "additionalProperties": {"type": "object", "required": ["normalisation", "held_out_loss",
                                                                            "train_loss", "curve"]}},
        "dct": {"type": "object", "required": ["high_share", "white_noise"]},
        "curve": {"type": "array", "items": {"type": "object", "required": ["step", "mean", "per_timestep"]}},
        "samples": {"type": "object", "required": ["file", "count", "std", "p_abs_gt_4", "real_std",
                                                   "real_p_abs_gt_4"]},
        "cost": {"type": "object", "required": ["steps_per_s", "train_seconds", "encode_seconds", "wall_seconds"]},
    },
}
_COMPARE_RESULTS = {  # first_stage.compare: per VAE; what compares the two is the report's "comparison"
    "type": "object",
    "required": ["images", "resolutions", "fp16"],
    "properties": {"images": {"type": "integer", "minimum": 1}, "resolutions": {"type": "array"},
                   "fp16": {"type": "object", "required": ["overflow", "peak", "verdict"]}},
}
REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "kind", "package_version", "date", "data", "preprocessing", "num_images",
                 "images_asked", "images_available", "skipped_files", "vaes"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"enum": ["latent_stats", "reconstruction", "diffusability", "compare"]},
        "package_version": {"type": "string"},
        "date": {"type": "string"},
        "data": {"type": "string"},
        "preprocessing": {"type": "object", "required": ["resize_short_side", "crop", "resolution"]},
        "num_images": {"type": "integer", "minimum": 1},
        "images_asked": {"type": "integer", "minimum": 1},
        "images_available": {"type": ["integer", "null"]},
        "skipped_files": {"type": "object", "required": ["count", "files"],
                          "properties": {"count": {"type": "integer"}, "files": {"type": "array"}}},
        "vaes": {"type": "array", "minItems": 1, "items": _VAE_ENTRY},
    },
    "allOf": [
        {"if": {"properties": {"kind": {"const": "latent_stats"}}},
         "then": {"properties": {"vaes": {"items": {"properties": {"results": _LATENT_RESULTS}}}}}},
        {"if": {"properties": {"kind": {"const": "reconstruction"}}},
         "then": {"properties": {"vaes": {"items": {"properties": {"results": _RECONSTRUCTION_RESULTS}}}}}},
        {"if": {"properties": {"kind": {"const": "diffusability"}}},
         "then": {"properties": {"vaes": {"items": {"properties": {"results": _DIFFUSABILITY_RESULTS}}}}}},
        {"if": {"properties": {"kind": {"const": "compare"}}},
         "then": {"required": ["comparison"],
                  "properties": {"vaes": {"minItems": 2, "maxItems": 2,
                                          "items": {"properties": {"results": _COMPARE_RESULTS}}},
                                 "comparison": {"type": "object", "required": [
                                     "latent_drift", "cross_decoding", "own_reconstruction", "memory_measure"]}}}},
    ],
}


def report(kind: str, data: DataConfig, vaes: list[dict], images_asked: int, images_available: int | None) -> dict:
    """The report of ``vaes`` (:func:`first_stage.evaluation.evaluate_each` entries) measured on the
    same images of ``data``; the files they skipped (each entry's ``results["skipped_files"]``, the
    same for all) move to the top level."""
    skipped = [entry["results"].pop("skipped_files") for entry in vaes][0]
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "package_version": __version__,
            "date": datetime.date.today().isoformat(), "data": describe(data), "preprocessing": preprocessing(data),
            "num_images": vaes[0]["results"]["images"], "images_asked": images_asked,
            "images_available": images_available, "skipped_files": {"count": len(skipped), "files": sorted(skipped)},
            "vaes": vaes}


def finite_or_none(value):
    """``value`` with every NaN/Infinity (not JSON) replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(finite_or_none(obj), indent=1, allow_nan=False))


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.4f}"


def markdown_table(rows: list[tuple[str, list, object]], names: list[str], reference: str) -> str:
    """``rows`` of (label, one value per VAE, reference value or None)."""
    lines = ["| statistic | " + " | ".join(names) + f" | {reference} |",
             "|---" * (len(names) + 2) + "|"]
    lines += [f"| {label} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(ref)} |"
              for label, values, ref in rows]
    return "\n".join(lines)


def latent_rows(vaes: list[dict]) -> list[tuple[str, list, object]]:
    r = [v["results"] for v in vaes]
    c, h, w = r[0]["latent_shape"]
    g = r[0]["tails"]["gaussian"]
    return [
        ("images", [x["images"] for x in r], None),
        ("std of posterior means", [x["scale"]["std_of_means"] for x in r], 1.0),
        ("std of posterior samples", [x["scale"]["std_of_samples"] for x in r], 1.0),
        ("implied scaling_factor (1/std)", [x["scale"]["implied_scaling_factor"] for x in r], None),
        ("carried scaling_factor", [v["scaling_factor"] for v in vaes], None),
        # The carried normaliser's scale over the one these images imply, per channel for a per-channel one.
        ("carried / implied, worst channel (1 = calibrated)", [x["scale"]["carried_over_implied"] for x in r], 1.0),
        ("channel std max/min", [x["scale"]["channel_std_ratio_max_min"] for x in r], 1.0),
        # What the diffusion model sees: the carried normalisation's output (the FLUX.2 class: its 2×2 patches).
        ("normalised latent: std of posterior means", [x["normalised"]["std_of_means"] for x in r], 1.0),
        ("normalised latent: std of posterior samples", [x["normalised"]["std_of_samples"] for x in r], 1.0),
        ("normalised latent: P(\\|z'\\| > 4) of means", [x["normalised"]["p_abs_gt_4"] for x in r], g["p_abs_gt_4"]),
        ("P(\\|ẑ\\| > 3)", [x["tails"]["p_abs_gt_3"] for x in r], g["p_abs_gt_3"]),
        ("P(\\|ẑ\\| > 4)", [x["tails"]["p_abs_gt_4"] for x in r], g["p_abs_gt_4"]),
        ("P(\\|ẑ\\| > 6)", [x["tails"]["p_abs_gt_6"] for x in r], g["p_abs_gt_6"]),
        ("excess kurtosis (all channels)", [x["tails"]["excess_kurtosis"] for x in r], 0.0),
        ("max excess kurtosis of a channel", [max(x["tails"]["channel_excess_kurtosis"]) for x in r], 0.0),
        ("peak max \\|ẑ\\| per image, median", [x["peaks"]["median"] for x in r], r[0]["peaks"]["gaussian"]["median"]),
        ("peak max \\|ẑ\\| per image, p99", [x["peaks"]["p99"] for x in r], r[0]["peaks"]["gaussian"]["p99"]),
        ("spot concentration, median", [x["spots"]["concentration_median"] for x in r], None),
        ("spot concentration, p99", [x["spots"]["concentration_p99"] for x in r], None),
        # Chance: uniformly random peaks over as many images (never below 1/images for few of them).
        ("share of images peaking at the modal position", [x["spots"]["modal_peak_share"] for x in r],
         modal_share_by_chance(int(np.sum(r[0]["spots"]["peak_position_counts"])), h * w)),
        (f"log-variance at the {LOGVAR_CLAMP[0]:g} clamp", [x["posterior"]["fraction_at_clamp"] for x in r], None),
        ("KL per latent element (nats)", [x["posterior"]["kl_per_element"] for x in r], None),
        (f"active channels (of {c})", [x["posterior"]["active_units"] for x in r], None),
        ("DCT energy in the upper half band", [x["spectrum"]["high_band_share"] for x in r],
         r[0]["spectrum"]["white_noise_high_band_share"]),
        ("pixel change outside the patch, peak perturbed", [x["nonlocality"]["peak_median"] for x in r], None),
        ("pixel change outside the patch, random position", [x["nonlocality"]["random_median"] for x in r], None),
    ]


def reconstruction_rows(vaes: list[dict]) -> list[tuple[str, list, object]]:
    """The rows of :func:`markdown_table` for reconstruction results: mean ± std over images."""
    r = [v["results"] for v in vaes]
    rows = [("images", [x["images"] for x in r], None)]
    for key, label in (("psnr", "PSNR (dB) ↑"), ("ssim", "SSIM ↑"), ("lpips", "LPIPS ↓")):
        if key in r[0]:
            rows.append((label, [f"{x[key]['mean']:.3f} ± {x[key]['std']:.3f}" if x[key]["mean"] is not None
                                 else "exact" for x in r], None))
    rows.append(("exact reconstructions (PSNR = ∞)", [x["psnr"]["exact"] for x in r], None))
    rows.append(("rFID ↓", [x["rfid"] for x in r], None))
    return rows


def repa_note(repa: dict | None) -> str:
    """The probe row's note of the REPA term a DiT probe trained with, or nothing."""
    return "" if not repa else f", REPA {repa['weight']:g} × at block {repa['depth']} to `{repa['model']}`"


def diffusability_rows(vaes: list[dict]) -> list[tuple[str, list, object]]:
    """The rows of :func:`markdown_table` for diffusability results (reference: independent
    Gaussian latents of the same per-channel variance, for the loss; the real latents, for samples)."""
    r = [v["results"] for v in vaes]
    loss = [x["held_out_loss"] for x in r]
    rows = [("probe", [f"{x['probe']['name']}, {x['probe']['seeds']} seed(s)" + repa_note(x['probe'].get('repa'))
                       + (f", class-conditional ({x['probe']['classes']} classes)" if x['probe'].get('classes') else "")
                       for x in r], None),
            ("latents trained on / held out", [f"{x['train_images']} / {x['held_out_images']}"
                                               + (" (grouped)" if x.get("split", {}).get("grouped") else "")
                                               for x in r], None)]
    for kind in r[0]["columns"]:  # the first is the ranking figure
        c = [x["columns"][kind] for x in r]
        rows += [(f"**{kind}**: loss / Gaussian reference, t-weighted, final ↓",
                  [_spread_cell(h["held_out_loss"]["ratio"], h["held_out_loss"]["ratio_sd"]) for h in c], 1.0),
                 (f"{kind}: best during training (mean ± sd)",
                  [_spread_cell(h["held_out_loss"]["best_ratio"], h["held_out_loss"]["best_ratio_sd"]) for h in c],
                  None),
                 (f"{kind}: per-seed final ratios", [", ".join(f"{s['ratio']:.4g}" for s in h["held_out_loss"]["seeds"])
                                                     for h in c], None),
                 (f"{kind}: unweighted mean of per-t ratios", [h["held_out_loss"]["ratio_unweighted"] for h in c], 1.0),
                 (f"{kind}: training loss / its Gaussian optimum", [h["train_loss"]["ratio"] for h in c], 1.0),
                 (f"{kind}: std of the normalised latents", [h["normalisation"]["std"] for h in c], 1.0)]
    rows += [("std of the deployed latents (flag: outside the tolerance)",
              [f"{x['deployed']['std']:.4g}" + (f" ⚠ outside [1/{x['deployed']['tolerance']:g}, "
                                                f"{x['deployed']['tolerance']:g}]" if x["deployed"]["flag"] else "")
               for x in r], 1.0),
             ("DCT high-band energy share (reference: white noise)", [x["dct"]["high_share"] for x in r],
              r[0]["dct"]["white_noise"]),
             ("held-out flow loss, mean over t ↓", [h["mean"] for h in loss], None),
             ("Gaussian reference (same channel variances)", [h["gaussian_reference_mean"] for h in loss], None),
             ("loss / Gaussian reference, ratio of means (old headline)",
              [h["mean"] / h["gaussian_reference_mean"] for h in loss], 1.0)]
    rows += [(f"held-out flow loss at t = {t:.3g}", [h["per_timestep"][k] for h in loss], None)
             for k, t in enumerate(loss[0]["timesteps"])]
    rows += [("std of sampled latents (real: held-out)", [x["samples"]["std"] for x in r], None),
             ("std of real held-out latents", [x["samples"]["real_std"] for x in r], None),
             ("P(\\|ẑ\\| > 4), samples", [x["samples"]["p_abs_gt_4"] for x in r], GAUSSIAN_TAIL[4]),
             ("P(\\|ẑ\\| > 4), real held-out", [x["samples"]["real_p_abs_gt_4"] for x in r], GAUSSIAN_TAIL[4]),
             ("gFID ↓", [x["gfid"] if x["gfid"] is not None else "not measured" for x in r], None),
             ("probe steps/s", [x["cost"]["steps_per_s"] for x in r], None),
             ("wall time (s)", [x["cost"]["wall_seconds"] for x in r], None)]
    return rows


def _spread_cell(mean: float, sd: float) -> str:
    """``mean ± sd`` for a table cell."""
    return f"{mean:.4g} ± {sd:.2g}"


def _subplots(*grid: int, figsize: tuple[float, float], squeeze: bool = True):
    """A figure and its axes (as ``pyplot.subplots`` makes them) outside pyplot's figure manager."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, squeeze=squeeze)


def diffusability_plots(vaes: list[dict], out: Path) -> list[Path]:
    """The held-out loss during training (mean over t) and at the end per timestep, against each
    VAE's Gaussian reference (dashed); the held-out ratio to it weighted over t (solid) and the training
    loss's ratio to its optimum (dotted), seed means, during training; several VAEs overlaid."""
    names, results = _label(vaes), [v["results"] for v in vaes]
    fig, axes = _subplots(1, 3, figsize=(16, 4))
    for i, (name, x) in enumerate(zip(names, results)):
        colour = f"C{i}"
        steps = [c["step"] for c in x["curve"]]
        axes[0].plot(steps, [c["mean"] for c in x["curve"]], color=colour, marker=".", label=name)
        axes[0].axhline(x["held_out_loss"]["gaussian_reference_mean"], color=colour, ls="--", lw=0.8)
        loss = x["held_out_loss"]
        axes[1].plot(loss["timesteps"], loss["per_timestep"], color=colour, marker=".", label=name)
        axes[1].plot(loss["timesteps"], loss["gaussian_reference"], color=colour, ls="--", lw=0.8)
        axes[2].plot(steps, [c["ratio"] for c in x["curve"]], color=colour, marker=".", label=name)
        trained = [(c["step"], c["train_loss"] / x["train_loss"]["gaussian_reference"]) for c in x["curve"]
                   if c["train_loss"] is not None]
        if trained:
            axes[2].plot(*zip(*trained), color=colour, ls=":", lw=1)
    axes[0].set_xlabel("probe step")
    axes[0].set_ylabel("held-out flow loss, mean over t")
    axes[1].set_xlabel("t (0: data, 1: noise)")
    axes[1].set_ylabel("held-out flow loss at the end")
    axes[2].set_xlabel("probe step")
    axes[2].set_ylabel("loss / Gaussian optimum")
    axes[2].axhline(1.0, color="grey", ls="--", lw=0.8)
    axes[0].legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_title("dashed: Gaussian latents of the same channel variances", fontsize=8)
    axes[2].set_title("solid: held-out, t-weighted; dotted: training loss (ranking normalisation)", fontsize=8)
    fig.tight_layout()
    path = out / "diffusability_loss.png"
    fig.savefig(path, dpi=100)
    return [path]


def _label(vaes: list[dict]) -> list[str]:
    return [f"{i + 1}: {Path(v['path']).name}" for i, v in enumerate(vaes)]


def zhat_survival(counts: np.ndarray, value_range: float) -> tuple[np.ndarray, np.ndarray]:
    """(k, P(|ẑ| > k)) at the non-negative bin edges of a histogram of ẑ over ±``value_range``
    (symmetric bins; values beyond the range sit in the end bins)."""
    bins = len(counts)
    edges = np.linspace(-value_range, value_range, bins + 1)
    half = bins // 2
    k = edges[half:-1]
    tail = np.array([counts[j:].sum() + counts[:bins - j].sum() for j in range(half, bins)])
    return k, tail / max(counts.sum(), 1)


def latent_plots(vaes: list[dict], out: Path) -> list[Path]:
    """Tail (survival) curves P(|ẑ| > k) against the Gaussian's, all channels and per channel;
    energy-peak maps; log-variance histograms; per-channel std and KL bars. Several VAEs overlaid."""
    names, results = _label(vaes), [v["results"] for v in vaes]
    paths = []
    channels = min(max(x["latent_shape"][0] for x in results), 16)
    cols = min(channels + 1, 4)
    rows = math.ceil((channels + 1) / cols)
    fig, axes = _subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    grid = np.linspace(0, 12, 400)
    gaussian = np.array([math.erfc(k / math.sqrt(2)) for k in grid])
    for panel, ax in enumerate(list(axes.flat)[:channels + 1]):
        for name, x in zip(names, results):
            hist = np.array(x["zhat_histogram"]["counts"])
            if panel > len(hist):
                continue
            counts = hist.sum(0) if panel == 0 else hist[panel - 1]
            k, survival = zhat_survival(counts, x["zhat_histogram"]["range"])
            ax.step(k, np.where(survival > 0, survival, np.nan), where="post", label=name)
        ax.plot(grid, gaussian, "k--", lw=0.8, label="N(0,1)")
        ax.set_yscale("log")
        ax.set_ylim(1e-8, 1)
        ax.set_xlim(0, 12)
        ax.set_title("all channels: P(|ẑ| > k)" if panel == 0 else f"channel {panel - 1}", fontsize=9)
        ax.set_xlabel("k", fontsize=8)
    for ax in list(axes.flat)[channels + 1:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "zhat_tails.png")
    fig.savefig(paths[-1], dpi=100)

    # Energy peaks: the share of images whose peak falls on each latent cell, the modal cell
    # circled, against the modal share chance alone would give.
    cols = min(len(results), 4)
    rows = math.ceil(len(results) / cols)
    fig, axes = _subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    for ax, name, x in zip(axes.flat, names, results):
        counts = np.array(x["spots"]["peak_position_counts"], dtype=float)
        share = counts / max(counts.sum(), 1)
        image = ax.imshow(np.where(share > 0, share, np.nan), cmap="viridis", interpolation="nearest",
                          vmin=0, vmax=max(share.max(), 1e-12))
        row, col = x["spots"]["modal_peak_position"]
        ax.plot(col, row, "o", ms=14, mfc="none", mec="red", mew=1.5)
        chance = modal_share_by_chance(int(counts.sum()), counts.size)
        ax.set_title(f"{name}\nshare of {int(counts.sum())} images peaking per cell\n"
                     f"modal {share.max():.3g} at (row {row}, col {col}); chance {chance:.3g}", fontsize=8)
        ax.set_xlabel("latent column")
        ax.set_ylabel("latent row")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_facecolor("0.9")  # cells no image peaked at
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    paths.append(out / "peak_positions.png")
    fig.savefig(paths[-1], dpi=100)

    fig, ax = _subplots(figsize=(6, 3.5))
    for name, x in zip(names, results):
        counts = np.array(x["posterior"]["logvar_histogram"])
        edges = np.linspace(*x["posterior"]["logvar_range"], len(counts) + 1)
        ax.stairs(counts / max(counts.sum(), 1), edges, label=name)
    ax.axvline(LOGVAR_CLAMP[0], color="k", ls=":", lw=0.8)
    ax.set_xlabel("posterior log-variance")
    ax.set_ylabel("share of latent elements")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "logvar_histogram.png")
    fig.savefig(paths[-1], dpi=100)

    fig, axes = _subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(results)
    for i, (name, x) in enumerate(zip(names, results)):
        for ax, values in zip(axes, (x["scale"]["channel_std"], x["posterior"]["channel_kl"])):
            ax.bar(np.arange(len(values)) + (i - (len(results) - 1) / 2) * width, values, width, label=name)
    axes[0].set_title("std of z per channel")
    axes[1].set_title("KL per latent element, per channel (nats)")
    for ax in axes:
        ax.set_xlabel("channel")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "channel_std_kl.png")
    fig.savefig(paths[-1], dpi=100)
    return paths


def write_markdown(path: Path, title: str, rep: dict, table: str, notes: list[str]) -> None:
    lines = [f"# {title}", "", f"{rep['num_images']} images of {rep['data']}; first-stage {rep['package_version']}, "
             f"{rep['date']}.", ""]
    available, skipped = rep["images_available"], rep["skipped_files"]
    if available is not None and available < rep["images_asked"]:
        lines += [f"Asked for {rep['images_asked']} images; the data holds {available}.", ""]
    if skipped["count"]:
        shown = ", ".join(f"`{name}`" for name in skipped["files"][:20])
        more = f" and {skipped['count'] - 20} more (report.json lists them all)" if skipped["count"] > 20 else ""
        lines += [f"Skipped {skipped['count']} undecodable file(s): {shown}{more}.", ""]
    lines += [f"{i + 1}. `{v['path']}`" for i, v in enumerate(rep["vaes"])] + ["", table, ""] + notes
    path.write_text("\n".join(lines) + "\n")


def evaluation_summary(reports: list[dict]) -> dict | None:
    """Headline figures of evaluation reports (their first VAE) for a model card, or None."""
    out = {}
    for rep in reports:
        r, where = rep["vaes"][0]["results"], f"{rep['num_images']} images of {rep['data']}"
        if rep["kind"] == "reconstruction":
            for key, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS")):
                if key in r and r[key]["mean"] is not None:
                    out[f"{label}, {where}"] = r[key]["mean"]
            if r.get("rfid") is not None:
                out[f"rFID, {where}"] = r["rfid"]
        elif rep["kind"] == "latent_stats":
            out[f"std of latent samples, {where}"] = r["scale"]["std_of_samples"]
            out[f"P(abs(ẑ) > 4) (Gaussian {GAUSSIAN_TAIL[4]:.2g}), {where}"] = r["tails"]["p_abs_gt_4"]
            gaussian_peak = r["peaks"]["gaussian"]["median"]
            out[f"median per-image peak abs(ẑ) (Gaussian {gaussian_peak:.2f}), {where}"] = r["peaks"]["median"]
            out[f"log-variances at the {LOGVAR_CLAMP[0]:g} clamp, {where}"] = r["posterior"]["fraction_at_clamp"]
    return out or None


def save_grid(images: torch.Tensor, reconstructions: torch.Tensor, path: Path) -> np.ndarray:
    """Write a PNG with inputs on the top row and reconstructions below; returns it as (H,W,3) uint8."""
    return save_rows([images, reconstructions], path)


def save_rows(rows: list[torch.Tensor], path: Path) -> np.ndarray:
    """Write a PNG of image rows, each (B, 3, H, W) in [-1, 1] with the same B; returns it as (H, W, 3) uint8."""
    rows = [torch.cat(list(t.float().clamp(-1, 1)), dim=2) for t in rows]  # (3, H, B*W) each
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


def _training_lines(report: dict, config: Config | None) -> list[str]:
    """The model card's training section (none for weights no run of this package trained)."""
    if config is None:
        return []
    d, t = config.data, config.train
    terms = report.get("loss_terms")
    trained = [f"  - {line}" for line in terms] if terms else ["  - not recorded (weights not trained by this run)"]
    return [
        "## Training",
        "",
        f"- data: `{d.source}` {d.path or ''} (split `{d.split}`), {d.resolution}² crops",
        f"- steps: {report['step']}, batch {t.batch_size} × accumulation {t.grad_accum} per process, "
        f"mixed precision `{t.mixed_precision}`",
        "- loss, every term that trained these weights:",
        *trained,
        f"- config hash `{report['config_hash']}` (the full config is `{BUNDLE_DIR}/config.yaml`)",
        "",
    ]


def _distillation_lines(report: dict) -> list[str]:
    """The model card's comparison of a distillation student's decoder with its teacher's."""
    d = report.get("distillation")
    if d is None:
        return []
    s, t = d["student"], d["teacher"]
    return [
        "## Decoder against its teacher",
        "",
        f"Teacher: `{d['teacher_source']}` ({t['class']}). One decode of a {t['latent']} latent on {s['device']} "
        f"in {s['dtype']} (`first_stage.teacher.decode_cost`, median of {s['repeats']}):",
        "",
        "| | decoder parameters | GFLOPs per image | ms per image |",
        "|---|---|---|---|",
        f"| this decoder ({s['class']}) | {s['decoder_parameters']:,} | {s['gflops_per_image']:.4g} | "
        f"{s['ms_per_image']:.4g} |",
        f"| teacher ({t['class']}) | {t['decoder_parameters']:,} | {t['gflops_per_image']:.4g} | "
        f"{t['ms_per_image']:.4g} |",
        f"| ratio | {d['parameter_ratio']:.3f} | {d['flop_ratio']:.3f} | speed-up {d['speedup']:.2f}× |",
        "",
    ]


def drift_sentence(report: dict) -> str:
    """The model card's (and the export's printed) sentence on how far a moved encoder's latents moved, or ""."""
    drift = report.get("latents", {}).get("drift")
    if drift is None:
        return ""
    if "not_measured" in drift:
        return f"How far the latents moved from {drift['from']} was not measured: {drift['not_measured']}."
    o = drift["overall"]
    return (f"The latents moved from those of {drift['from']} (raw latents of {drift['images']} calibration images, "
            f"per channel least squares): cosine {o['cosine']:.6f}, relative error {o['relative_error']:.4g}, "
            f"R² ≥ {o['r2_min']:.6f}, slopes {o['slope_min']:.4f} … {o['slope_max']:.4f}, offsets up to "
            f"{o['offset_max_abs']:.3g}; eval/compare.py measures it on more images and resolutions.")


def _spread(after: dict) -> str:
    """"mean a … b, std c … d" of per-channel ``channel_mean`` and ``channel_std``."""
    mean, std = after["channel_mean"], after["channel_std"]
    return f"mean {min(mean):.3g} … {max(mean):.3g}, std {min(std):.4g} … {max(std):.4g}"


def e2e_sentence(report: dict) -> str:
    """The model card's (and the export's printed) sentence on an end-to-end tuned VAE's normaliser: its source,
    and how far it is from what the transformer trained on (REPA-E's has no eps); "" for other exports."""
    e = report.get("e2e")
    if e is None:
        return ""
    stds = e["calibration_after"]["channel_std"]
    off = [v for v in stds if not 1 / DEPLOYED_STD_TOLERANCE <= v <= DEPLOYED_STD_TOLERANCE]
    caution = (f" CAUTION: the calibration images' latents come out of this normaliser with a per-channel std of "
               f"{min(stds):.3g} … {max(stds):.3g}, not about 1 (the EMA lags the latents' scale: a longer run, or a "
               f"lower e2e.ema_decay for a short one)" if off else "")
    return (f"End-to-end tuning (REPA-E): the normaliser is the transformer's EMA (decay {e['ema_decay']:g}) BatchNorm "
            f"after {e['transformer_steps']} transformer steps, at step {e['step']} (the statistics it started from, "
            f"measured before the first step, weigh {100 * e['start_share']:.3g}% in it); pipelines apply "
            f"{e['exported']}, the transformer trained on {e['transformer_normalised']}; {e['eps_note']}.{caution}")


def adaptation_sentence(report: dict) -> str:
    """The model card's line for an end-to-end tuned VAE that started from another VAE: its diffusion models
    need adapting; "" otherwise."""
    drift = report.get("latents", {}).get("drift")
    if "e2e" not in report or drift is None:
        return ""
    return (f"A diffusion model trained on the latents of {drift['from']} will need adapting to this VAE: end-to-end "
            "tuning moved the latents and their normalisation (REPA-E retrains its DiT on the tuned VAE's latents).")


def _verification_lines(report: dict) -> list[str]:
    verification = report["verification"]
    return [
        "## Verification",
        "",
        f"Read back from disk and compared with the model in memory on {verification['images']} calibration images "
        f"(latents and reconstructions, max abs difference): diffusers folder {verification['diffusers']:.3g}"
        + (f", single file {verification['single_file']:.3g}" if "single_file" in verification else "")
        + f" (tolerance {verification['tolerance']:g}).",
        "",
    ]


def _bundle_lines(report: dict) -> list[str]:
    if not report.get("bundle"):
        return []
    transformer = ([f"the end-to-end transformer (`{TRANSFORMER_FILE}`: its latent BatchNorm, DiT and REPA projector; "
                    f"`{TRANSFORMER_EMA_FILE}`: its EMA, whose BatchNorm is this export's normalisation),"]
                   if TRANSFORMER_FILE in report["bundle"] else [])
    return [
        "## Fine-tuning",
        "",
        f"`{BUNDLE_DIR}/` holds the discriminator weights (when one was trained), the loss's log-variance,",
        *transformer,
        "and the resolved training config pointing at this folder:",
        "",
        "```bash",
        f"accelerate launch train/train.py --config {BUNDLE_DIR}/config.yaml --set train.run_name=finetune "
        "--set train.max_steps=...",
        "```",
        "",
    ]


def _header_lines(report: dict, title: str) -> list[str]:
    """The model card's title and where the weights came from."""
    return [
        f"# {report['name']}: {title}",
        "",
        f"Exported by first-stage {__version__} on {report['date']} from `{report['source']}`"
        + (f" (step {report['step']})." if report["step"] is not None else "."),
        "",
    ]


def tiny_card(vae: Autoencoder, report: dict, config: Config | None) -> str:
    """``README.md`` of an AutoencoderTiny student's export: no posterior, its teacher's normalised latents."""
    c = vae.config
    lines = [
        *_header_lines(report, "a tiny autoencoder (TAESD-style) distilled for latent diffusion"),
        "## Architecture",
        "",
        "| downsampling | latent channels | encoder widths × blocks | decoder widths × blocks | parameters |",
        "|---|---|---|---|---|",
        f"| f{downsampling_factor(c)} | {c.latent_channels} | {list(c.encoder_block_out_channels)} × "
        f"{list(c.num_encoder_blocks)} | {list(c.decoder_block_out_channels)} × {list(c.num_decoder_blocks)} | "
        f"{report['parameters']:,} |",
        "",
        f"Class: diffusers `AutoencoderTiny`. Weights: {report['weights']}, stored as {report['dtype']}.",
        "",
        *_training_lines(report, config),
        "## Latents",
        "",
        f"This encoder produces, and this decoder reads, {report['latents']['origin']}. Its decoder clamps its input "
        f"softly to ±{c.latent_magnitude} (tanh(z/{c.latent_magnitude})·{c.latent_magnitude}).",
        "",
        *_distillation_lines(report),
        "## fp16",
        "",
        f"Calibration batch in fp16: {report['fp16']['verdict']}",
        "",
        *_verification_lines(report),
        "## How to load",
        "",
        "```python",
        "from diffusers import AutoencoderTiny",
        "vae = AutoencoderTiny.from_pretrained(\"path/to/this/folder\")",
        "pipe.vae = vae  # pipelines divide by scaling_factor 1: the decoder gets the diffusion model's latents",
        "```",
        "",
        *_bundle_lines(report),
    ]
    return "\n".join(lines)


def model_card(vae: Autoencoder, report: dict, config: Config | None, evaluation: dict | None) -> str:
    """``README.md`` of the export folder."""
    if report["latent_stats"] is None:
        return tiny_card(vae, report, config)
    c, stats, scale = vae.config, report["latent_stats"], report["config_scale"]
    down = downsampling_factor(c)
    lines = [
        *_header_lines(report, "a KL autoencoder for latent diffusion"),
        "## Architecture",
        "",
        "| downsampling | latent channels | block_out_channels | layers_per_block | quant convs | mid attention "
        "| GroupNorm groups | parameters |",
        "|---|---|---|---|---|---|---|---|",
        f"| f{down} | {c.latent_channels} | {list(c.block_out_channels)} | {c.layers_per_block} | "
        f"{'yes' if c.use_quant_conv else 'no'} | {'yes' if c.mid_block_add_attention else 'no'} | "
        f"{c.norm_num_groups} | {report['parameters']:,} |",
        "",
        f"Class: diffusers `{type(vae).__name__}`"
        + (f", decoder widths {list(c.decoder_block_out_channels)}" if c.get("decoder_block_out_channels") else "")
        + f". Weights: {report['weights']}, stored as {report['dtype']}.",
        "",
    ]
    lines += _training_lines(report, config)
    e2e = report.get("e2e")
    lines += [
        "## Raw latents (before the BatchNorm; for comparison only, not written into the export)" if "batch_norm" in
        report else "## Raw latents (measured for comparison; the normalisation is the e2e transformer's, below)" if
        e2e else "## Latent scale (measured, not assumed)",
        "",
        f"Measured on {stats['num_images']} images of {report['calibration']}: the moments of posterior",
        "samples z = μ + σ·ε (exact over ε), in float64.",
        "",
    ]
    if "batch_norm" in report:
        lines += ["| mean | std of samples | std of posterior means |", "|---|---|---|",
                  f"| {stats['mean']:.5f} | {stats['std']:.5f} | {stats['std_of_means']:.5f} |"]
    else:
        lines += ["| scaling_factor = 1/std | shift_factor = mean | std | std of posterior means |",
                  "|---|---|---|---|",
                  f"| {stats['scaling_factor']:.5f} | {stats['shift_factor']:.5f} | {stats['std']:.5f} "
                  f"| {stats['std_of_means']:.5f} |"]
    lines += [
        "",
        "Per channel: mean " + ", ".join(f"{v:.3f}" for v in stats["channel_mean"])
        + "; std " + ", ".join(f"{v:.3f}" for v in stats["channel_std"]) + ".",
        "",
    ]
    bn = report.get("batch_norm")
    after = bn["calibration_after"] if bn else None
    if bn is None:
        lines += [
            f"The normalisation: {report['latents']['origin']}." if "latents" in report else "",
            *[line for line in (e2e_sentence(report), drift_sentence(report), adaptation_sentence(report)) if line],
            *([f"On the {stats['num_images']} calibration images, the latents after this normalisation (what a "
               f"diffusion model reads), per channel: {_spread(e2e['calibration_after'])} (0 and 1 where the "
               "BatchNorm's statistics are these images')."] if e2e else []),
            "",
            f"Written into `config.json` (`latent_norm: {report['latent_norm']}`): "
            + ", ".join(f"`{k}` = {json.dumps(v if not isinstance(v, float) else round(v, 6))}"
                        for k, v in scale.items()) + ".",
            f"How pipelines read it: {report['normalisation']}; they decode the inverse.",
        ]
    else:
        lines += [
            "## Latent normalisation: the BatchNorm over patches",
            "",
            f"The statistics in `bn.running_mean` / `bn.running_var`: {bn['origin']}. "
            + " ".join(line for line in (e2e_sentence(report), drift_sentence(report), adaptation_sentence(report))
                       if line),
            f"Variance: {bn['variance']}; stored as {bn['stored']}; `batch_norm_eps` = {bn['eps']:g}, "
            f"patches {bn['patch_size'][0]}×{bn['patch_size'][1]}, patch channels in order {bn['patch_order']}.",
            f"How pipelines read it: {report['normalisation']}; they decode the inverse.",
            "",
            f"On the {stats['num_images']} calibration images, the posterior means after this BatchNorm (what the "
            f"transformer reads), per patch channel: mean {min(after['channel_mean']):.3g} … "
            f"{max(after['channel_mean']):.3g}, std {min(after['channel_std']):.4g} … {max(after['channel_std']):.4g} "
            "(0 and 1 where the statistics are these images').",
            "",
            *[f"- Caution: {note}." for note in bn["pipelines"]],
        ]
    upcast = (f" `force_upcast` = {str(vae.config.force_upcast).lower()}." if "force_upcast" in vae.config
              else " (AutoencoderKLFlux2 has no `force_upcast`: run it in bf16 or fp32 where this says it overflows.)")
    lines += [
        "",
        "## fp16",
        "",
        f"Calibration batch in fp16: {report['fp16']['verdict']}{upcast}",
        "",
        *_distillation_lines(report),
        *_verification_lines(report),
        "## Evaluation",
        "",
    ]
    if evaluation:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation.items()]
    else:
        lines += ["Not evaluated at export time."]
    single = report.get("single_file")
    lines += ["", "## How to load", "", "```python"]
    if bn is not None:
        lines += ["from diffusers import AutoencoderKLFlux2, Flux2Pipeline",
                  "vae = AutoencoderKLFlux2.from_pretrained(\"path/to/this/folder\")",
                  "pipe = Flux2Pipeline.from_pretrained(..., vae=vae)  # normalises with vae.bn's running statistics"]
    elif report["latent_norm"] == "per_channel":  # SD 1.x pipelines ignore latents_mean / latents_std
        lines += ["from diffusers import AutoencoderKL, StableDiffusionXLPipeline",
                  "vae = AutoencoderKL.from_pretrained(\"path/to/this/folder\")",
                  "pipe = StableDiffusionXLPipeline.from_pretrained(..., vae=vae)  # reads latents_mean / latents_std"]
    else:
        lines += ["from diffusers import AutoencoderKL, StableDiffusionPipeline",
                  "vae = AutoencoderKL.from_pretrained(\"path/to/this/folder\")",
                  "pipe = StableDiffusionPipeline.from_pretrained(..., vae=vae)  # or: pipe.vae = vae"]
    if single and bn is not None:
        lines += [f"# {Path(single).name}: Black Forest Labs' layout (black-forest-labs/flux2, autoencoder.py)",
                  f"# {report['single_file_loader'].split(';')[0]}"]
    elif report.get("single_file_skipped"):
        lines += [f"# no BFL single file: {'; '.join(report['single_file_skipped'])}"]
    elif single and report.get("single_file_loader", "").startswith("first_stage"):
        lines += [f"# the latent-diffusion single file ({Path(single).name}) has attention inside levels, which",
                  "# diffusers' from_single_file cannot read; this package's import can:",
                  "from first_stage.checkpoint import load_vae",
                  f"vae = load_vae(\"{Path(single).name}\").vae"]
    elif single:
        lines += [f"# the latent-diffusion single file ({Path(single).name}); config= avoids guessing the architecture",
                  f"vae = AutoencoderKL.from_single_file(\"{Path(single).name}\", config=\"path/to/this/folder\")"]
    lines += ["```", ""] + _bundle_lines(report)
    return "\n".join(lines)
