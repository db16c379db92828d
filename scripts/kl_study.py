"""The KL study: how the KL weight and its variants shape latent scale, outliers and reconstruction.

    python scripts/kl_study.py [--gpu] [--preset P] [--steps N] [--resolution R] [--variants NAME ...]
        [--out docs/kl_study] [--work outputs/kl_study] [--lpips-weights FILE] [--vision-model FOLDER]
        [--set KEY=VALUE ...]

Trains every variant with train/train.py (a subprocess each) on one base recipe (configs/kl_study.yaml,
or configs/kl_study_gpu.yaml with --gpu) plus the variant's --set overrides: the same architecture,
data order, initial weights (train.seed) and step budget for all. Then evaluates every export with
eval/latent_stats.py and eval/reconstruction.py on held-out tiles: non-overlapping crops of bundled
scikit-image photographs that are not among the training pictures. Writes OUT.md (the report, which
keeps the hand-written interpretation between its markers), OUT/kl_study.json (every number) and the
figures into OUT/. Runs, held-out tiles and evaluation reports go to --work.

The ``e2e`` variant (REPA-E, first_stage/e2e.py) is a fine-tune, as in its paper: it starts from the
export of the SD-default variant (kl1e-6, trained first when not asked for) and tunes it for the same
steps twice, on the same data in the same order: ``e2e-plain`` (the control: the recipe alone) and
``e2e`` (the recipe plus end-to-end tuning against a small diffusion transformer). The three are probed
alike on the same held-out tiles. Its vision model is --vision-model, else a DINOv2 with random weights
(first_stage.alignment.save_standin_dinov2): then the REPA alignment is not REPA-E's signal, and the
run measures the mechanics, the cost and the effect of aligning to random features.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import PIL.Image
import skimage.data
import torch

from safetensors import safe_open
from safetensors.torch import load_file

from first_stage.alignment import save_standin_dinov2
from first_stage.config import Config, E2EConfig, load_config, to_dict
from first_stage.data import SAMPLE_IMAGES, describe, to_rgb
from first_stage.dit import DIT_NAMES, DIT_SIZES
from first_stage.evaluation import evaluation_data
from first_stage.lifecycle import run_main
from first_stage.terms import TERMS, study_variants
from first_stage.reports import (diffusability_plots, latent_plots, latent_rows, markdown_table, reconstruction_rows,
                                 write_json)

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"cpu": REPO / "configs" / "kl_study.yaml", "gpu": REPO / "configs" / "kl_study_gpu.yaml"}

# Held out: bundled photographs that load offline and are none of SAMPLE_IMAGES (the training split
# is 7 of those; the other 2, colorwheel and logo, are flat synthetic graphics). The motorcycle is
# the left view of skimage's stereo pair (RGB); the other three are grayscale, fed as RGB.
HELD_OUT = {
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
    "camera": skimage.data.camera,
    "coins": skimage.data.coins,
    "moon": skimage.data.moon,
}
assert not set(HELD_OUT) & set(SAMPLE_IMAGES), "a held-out picture is in the training data"

KL_WEIGHTS = ("0", "1e-8", "1e-6", "1e-4", "1e-2", "1")  # variants kl0 ... kl1, in the sum reduction
# At kl_weight 1 (sum reduction) a nat in one latent element costs as much as one unit of summed L1
# error, and an element of the tiny f2 latent serves only 3 pixel values: the only weight of the
# sweep at which the KL competes with the reconstruction (at kl_weight 1e-6 and 150 CPU steps the KL
# was ~6800 nats per image against an NLL of ~2100; at kl_weight 1 and 200 steps it fell to 0.03
# nats per element, one channel of 4 inactive). Free bits at that weight: 1 nat per element and
# channel (1.44 bits) stays free. That is below every channel's KL at kl_weight 1e-6 (1.5 to 9 nats
# at 150 steps), so the floor binds only where the weight bites.
FREE_BITS = 1.0
# MMD² of N(0, 4I) against N(0, I) in 4 channels is about 0.5: at weight 1 that costs C*h*w*0.5 =
# 2048 nats per 64² image, about the L1 NLL of an image early in training, so the scale is pinned
# near 1; unit-variance heavy tails (Laplace, MMD² ≈ 0.015) cost ~60, a few % of the NLL. Measured
# at 200 CPU steps: MMD² 0.045 (9 % of the NLL), std of latent samples 1.10 on the held-out tiles.
MMD_WEIGHT = 1.0
NOT_RUN_ALIGNMENT = ("needs a DINOv2 on disk (`--vision-model FOLDER`, e.g. `huggingface-cli download "
                     "facebook/dinov2-small` where there is network); none is available here")
# End-to-end tuning is a fine-tune (REPA-E tunes a trained VAE): it starts from the SD default, the base of
# every term variant, and the control tunes the same start for the same steps without it.
E2E_START, E2E_CONTROL = "kl1e-6", "e2e-plain"
TUNED = ("e2e",)  # term variants that tune E2E_START instead of training from scratch
# The vision model when --vision-model is not given: dinov2-small's shapes (so its cost), random weights.
STANDIN_DINOV2 = {"hidden": 384, "layers": 12, "heads": 6, "patch": 14}
# The projector's hidden width: REPA-E's 2048 serves SiT-XL's 1152-wide tokens; the transformers here are
# 64 (tiny) or 384 (small) wide.
E2E_PROJECTOR_DIM = 256
STANDIN_WARNING = ("**The vision model is a DINOv2 with random weights** (no real DINOv2 on this machine): the REPA "
                   "alignment is then NOT REPA-E's signal. This run measures the mechanics (the align pass's "
                   "gradient reaching the encoder, the transformer step, the exported BatchNorm normaliser), the "
                   "cost, and whatever aligning to random features does to the latents; it says nothing about "
                   "REPA-E's claims. Pass `--vision-model FOLDER` (a real DINOv2) for those.")
INTERPRETATION = ("<!-- kl_study: interpretation (hand-written; kept when the report is regenerated) -->",
                  "<!-- kl_study: end of interpretation -->")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU recipe: sd-f8c4 at 256², more steps")
    parser.add_argument("--preset", default=None, help="model.preset (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per variant (default: the recipe's)")
    parser.add_argument("--resolution", type=int, default=None, help="crop and tile side (default: the recipe's)")
    parser.add_argument("--variants", nargs="+", default=None, help="a subset of the variants (default: all)")
    parser.add_argument("--tiles-per-image", type=int, default=24, help="held-out tiles per held-out picture")
    parser.add_argument("--eval-data", default=None, help="evaluate on this data spec instead of the held-out tiles")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluation images (default: every tile; 1000)")
    parser.add_argument("--out", default="docs/kl_study", help="figures and JSON; the report is OUT.md")
    parser.add_argument("--work", default="outputs/kl_study", help="runs, held-out tiles, evaluation reports")
    parser.add_argument("--lpips-weights", default=None, help="vgg16-397923af.pth: LPIPS in training and evaluation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    parser.add_argument("--commit", default=None,
                        help="the code's provenance for the report (default: git's HEAD, and whether it is dirty)")
    parser.add_argument("--reuse", action="store_true", help="keep a variant's run when its config is unchanged")
    parser.add_argument("--no-probe", action="store_true", help="skip the diffusability probe")
    parser.add_argument("--vision-model", "--alignment-model", dest="vision_model", default=None,
                        help="a DINOv2 folder or cached Hugging Face id: adds the alignment variant and is the e2e "
                             "variant's vision model (without it: a random DINOv2 stand-in, labelled as such)")
    parser.add_argument("--e2e-transformer", choices=["tiny", "small"], default="tiny",
                        help="the e2e variant's diffusion transformer (first_stage.dit.DIT_SIZES)")
    parser.add_argument("--probe-steps", type=int, default=300, help="diffusability probe steps per variant")
    parser.add_argument("--probe-batch-size", type=int, default=16)
    parser.add_argument("--probe-seeds", type=int, default=1,
                        help="probes per variant, seeds s, s+1, ...: the figure is their mean, the spread beside it "
                             "(one seed resolves ratio gaps of about 0.03 only: docs/diffusability.md)")
    parser.add_argument("--probe-held-out", type=int, default=64, help="tiles the probe never trains on")
    parser.add_argument("--probe-samples", type=int, default=16, help="samples each probe draws, decodes and shows")
    parser.add_argument("--probe-tiles-per-image", type=int, default=10**9,
                        help="probe tiles per held-out picture (default: every non-overlapping tile)")
    return parser.parse_args()


def variants(steps: int, vision_model: str | None = None) -> dict[str, tuple[list[str], str]]:
    """Each from-scratch variant's --set overrides on the base recipe and why it is there, for ``steps``
    steps (the alignment variant only with a vision model on disk; the tuned ones: :func:`e2e_variants`)."""
    table = {f"kl{w}": ([f"regularizer.kl_weight={w}"], "KL weight sweep (sum reduction)") for w in KL_WEIGHTS}
    table["kl1e-6"] = (table["kl1e-6"][0], "the SD default")
    table["kl1-warmup"] = (["regularizer.kl_weight=1", "regularizer.schedule=linear",
                            f"regularizer.warmup_steps={max(steps // 2, 1)}"],
                           "linear warm-up over the first half: at weight 1 the KL competes with the reconstruction "
                           "from the start (at 1e-6 it is a few millionths of the loss: a warm-up changes nothing)")
    table["kl1-freebits"] = (["regularizer.kl_weight=1", f"regularizer.free_bits={FREE_BITS}"],
                             f"free bits at weight 1: {FREE_BITS:g} nat per element and channel stays free")
    table["mmd"] = (["regularizer.kind=mmd", f"regularizer.mmd_weight={MMD_WEIGHT}"],
                    "WAE-MMD to N(0, I) on the aggregate posterior instead of the KL (no charge for information)")
    table["kl1e-6-gan"] = (["regularizer.kl_weight=1e-6", "discriminator.enabled=true",
                            f"discriminator.start={steps // 3}"],
                           f"the SD default with the PatchGAN from step {steps // 3}, a third of the budget")
    # Every loss term's own variant (first_stage.terms), each on the SD default (docs/training.md); the
    # alignment variant needs a vision model on disk, given to its own section's key.
    sections = {t.study_variant[0]: t.section for t in TERMS.values() if t.study_variant}
    for name, (sets, why, needs_vision_model) in study_variants().items():
        if name in TUNED:
            continue
        if not needs_vision_model:
            table[name] = (sets, why)
        elif vision_model:
            table[name] = (sets + [f"{sections[name]}.model={vision_model}"], why)
    return table


def e2e_variants(base: Config, start: Path, vision_model: str, transformer: str = "tiny"
                 ) -> dict[str, tuple[list[str], str]]:
    """The two tunes of the e2e variant, each from the export ``start`` for the recipe's steps on the same data
    in the same order: the control (the recipe alone) and end-to-end tuning (REPA-E, first_stage.e2e) against a
    ``transformer`` DiT with ``vision_model``'s tokens. Both export per-channel statistics (e2e needs them)."""
    tune = [f"model.init_from={start}", "export.latent_norm=per_channel"]
    sets, why, _ = study_variants()["e2e"]
    depth = DIT_SIZES[transformer]["depth"]
    # REPA-E's align weight (1.5) sits beside a per-element mean L1; under a "sum" recipe the term multiplies it by
    # the 3·H·W elements the NLL sums over itself (first_stage.loss_term.mean_unit)
    pixels = 3 * base.data.resolution ** 2 if base.loss.reduction == "sum" else 1
    e2e = [*sets, f"e2e.model={vision_model}", f"e2e.transformer={transformer}",
           f"e2e.encoder_depth={max(1, depth // 3)}",  # REPA-E: block 4 of SiT-B's 12, 8 of SiT-XL's 28
           f"e2e.projector_dim={E2E_PROJECTOR_DIM}",
           f"e2e.lr={base.optimizer.lr:g}",  # REPA-E: one learning rate for the VAE and the transformer
           # the recipe's EMA decay, sized for its budget: REPA-E's 0.9999 over a few hundred steps would export
           # the first batch's BatchNorm statistics
           f"e2e.ema_decay={base.train.ema_decay:g}"]
    return {E2E_CONTROL: (tune, f"the control: {E2E_START}'s export tuned for the same steps without e2e"),
            "e2e": (tune + e2e, f"{why}; {E2E_START}'s export tuned end to end, a {DIT_NAMES[transformer]} "
                                f"transformer, align weight {E2EConfig.align_weight:g}"
                                + (f" × 3·{base.data.resolution}² (the term's own, under the sum reduction)"
                                   if pixels > 1 else ""))}


def e2e_vision_model(given: str | None, work: Path) -> tuple[str, bool]:
    """The e2e variant's vision model and whether it is a random stand-in: ``given`` (a folder, made absolute,
    or a cached id), else a DINOv2 of :data:`STANDIN_DINOV2`'s shapes with random weights, saved under ``work``."""
    if given:
        return (str(Path(given).resolve()) if Path(given).expanduser().exists() else given), False
    folder = work / "dinov2_standin"
    if not (folder / "config.json").is_file():
        save_standin_dinov2(folder, **STANDIN_DINOV2)  # seeded: the same weights every time
    return str(folder), True


def with_e2e_parts(names: list[str]) -> list[str]:
    """``names`` with what the e2e variant needs: its start before it and its control beside it."""
    if not set(names) & {"e2e", E2E_CONTROL}:
        return names
    rest = [n for n in names if n not in (E2E_CONTROL, "e2e")]
    return rest + ([] if E2E_START in rest else [E2E_START]) + [E2E_CONTROL, "e2e"]


def common_overrides(args, work: Path) -> list[str]:
    """The overrides every variant shares: steps, sizes, LPIPS, where runs go, and --set."""
    sets = [f"train.output_dir={work / 'runs'}"] + ([f"train.max_steps={args.steps}"] if args.steps else [])
    if args.preset:
        sets.append(f"model.preset={args.preset}")
    if args.resolution:
        sets += [f"data.resolution={args.resolution}", f"val_data.resolution={args.resolution}"]
    if args.lpips_weights:
        sets += ["loss.perceptual_weight=1.0", f"loss.lpips_weights={Path(args.lpips_weights).resolve()}",
                 "loss.lpips_missing=error"]
    return sets + args.set


def write_held_out_tiles(folder: Path, size: int, per_image: int) -> list[str]:
    """Non-overlapping size² tiles of the held-out pictures, at most ``per_image`` of each spread
    evenly over its grid, as PNGs in ``folder``; returns one line per picture."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    lines = []
    for name, load in HELD_OUT.items():
        image = np.asarray(to_rgb(PIL.Image.fromarray(load())))  # (H, W, 3) uint8
        rows, cols = image.shape[0] // size, image.shape[1] // size
        picked = np.unique(np.linspace(0, rows * cols - 1, min(per_image, rows * cols)).round().astype(int))
        for index in picked:
            r, c = divmod(int(index), cols)
            tile = image[r * size:(r + 1) * size, c * size:(c + 1) * size]
            PIL.Image.fromarray(tile).save(folder / f"{name}_{r:02d}_{c:02d}.png")
        lines.append(f"{name} ({image.shape[1]}×{image.shape[0]}): {len(picked)} of its {rows * cols} "
                     f"non-overlapping {size}² tiles, spread evenly")
    return lines


def train(name: str, sets: list[str], config_path: Path, run: Path, reuse: bool) -> dict:
    """Run train/train.py for one variant (unless ``reuse`` finds the same finished run); returns
    its exit code and wall time."""
    expected = load_config(config_path, sets)
    if reuse and (run / "export" / "config.json").is_file() and load_config(run / "config.yaml") == expected:
        print(f"{name}: reusing {run}")
        return {"exit_code": 0, "train_seconds": None, "reused": True}
    cmd = [sys.executable, str(REPO / "train" / "train.py"), "--config", str(config_path)]
    cmd += [a for s in sets for a in ("--set", s)]
    run.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run.parent / f"{name}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    seconds = time.time() - start
    print(f"{name}: exit {code} after {seconds:.0f} s (log {run.parent / f'{name}.log'})")
    return {"exit_code": code, "train_seconds": seconds, "reused": False}


def evaluate(script: str, exports: list[Path], data_spec: str, images: int, out: Path, extra: list[str]) -> dict:
    """Run one eval/ entry point on every export; returns its report.json."""
    cmd = [sys.executable, str(REPO / "eval" / script), "--vae", *map(str, exports), "--data", data_spec,
           "--num-images", str(images), "--out", str(out), *extra]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads((out / "report.json").read_text())


def latent_entries(study: dict, names: list[str]) -> list[dict]:
    """The variants' latent statistics as report entries, labelled by variant (for the plots' legends)."""
    return [{"path": n, "scaling_factor": study[n]["scaling_factor"], "results": study[n]["latent_stats"]}
            for n in names]


def rate_and_distortion(latent: dict, recon: dict) -> tuple[float, float]:
    """KL in nats per image (held-out) and the mean squared error per image (pixels in [0, 1])."""
    c, h, w = latent["latent_shape"]
    mse = np.mean([10 ** (-p / 10) if p is not None else 0.0 for p in recon["per_image"]["psnr"]])
    return latent["posterior"]["kl_per_element"] * c * h * w, float(mse)


def rate_distortion_plot(points: dict[str, tuple[float, float]], path: Path) -> Path:
    """One labelled point per variant: (KL per image, MSE), log x axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (rate, mse) in points.items():
        ax.scatter(rate, mse, color="C0")
        ax.annotate(name, (rate, mse), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("KL per held-out image (nats), posterior against N(0, I)")
    ax.set_ylabel("reconstruction MSE per image (pixels in [0, 1])")
    ax.set_title("rate–distortion, one point per variant", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def diffusability_plot(points: dict[str, tuple[float, float, float]], path: Path) -> Path:
    """The probe's held-out loss over its Gaussian reference (lower: easier to learn) against the KL
    per image and against the reconstruction MSE, one labelled point per variant."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, (rate, mse, ratio) in points.items():
        for ax, x in zip(axes, (rate, mse)):
            ax.scatter(x, ratio, color="C1")
            ax.annotate(name, (x, ratio), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("KL per held-out image (nats)")
    axes[1].set_xlabel("reconstruction MSE per image (pixels in [0, 1])")
    for ax in axes:
        ax.set_ylabel("probe held-out flow loss / Gaussian reference")
    fig.suptitle("diffusability (lower: the probe learns the latents better), one point per variant", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def probe_ratio(variant: dict) -> float:
    """The probe's ranking figure: its held-out flow loss over the Gaussian reference per timestep, weighted as
    training samples the timesteps, on per-channel normalised latents (the mean over its seeds)."""
    return variant["diffusability"]["ranking"]["ratio"]


def extremes(label: str, values: dict[str, float], fmt: str = ".3g") -> str:
    """A line naming the variants with the largest and the smallest value."""
    hi, lo = max(values, key=values.get), min(values, key=values.get)
    if values[hi] == values[lo]:
        return f"- {label}: {values[hi]:{fmt}} in every variant."
    return f"- {label}: largest {hi} ({values[hi]:{fmt}}), smallest {lo} ({values[lo]:{fmt}})."


def summary(study: dict) -> list[str]:
    """Factual one-liners read off the numbers: extremes and the trend of the scale with kl_weight."""
    lat = {n: v["latent_stats"] for n, v in study.items() if "latent_stats" in v}
    if not lat:
        return ["- no variant was evaluated."]
    rec = {n: study[n]["reconstruction"] for n in lat}
    std = {n: r["scale"]["std_of_samples"] for n, r in lat.items()}
    lines = [extremes("std of latent samples", std),
             extremes("median per-image peak |ẑ|", {n: r["peaks"]["median"] for n, r in lat.items()}),
             extremes("P(|ẑ| > 4)", {n: r["tails"]["p_abs_gt_4"] for n, r in lat.items()}),
             extremes("log-variances at the −30 clamp",
                      {n: r["posterior"]["fraction_at_clamp"] for n, r in lat.items()}),
             extremes("active channels", {n: r["posterior"]["active_units"] for n, r in lat.items()}, "d"),
             extremes("KL per held-out image (nats)", {n: study[n]["kl_nats_per_image"] for n in lat}),
             extremes("PSNR (dB)", {n: r["psnr"]["mean"] for n, r in rec.items() if r["psnr"]["mean"] is not None},
                      ".2f")]
    probed = {n: probe_ratio(study[n]) for n in lat if "diffusability" in study[n]}
    if probed:
        lines.append(extremes("probe held-out flow loss / Gaussian reference (lower: easier)", probed))
    sweep = [f"kl{w}" for w in KL_WEIGHTS if f"kl{w}" in std]
    if len(sweep) > 2:
        steps = np.sign(np.diff([std[n] for n in sweep]))
        trend = ("decreases monotonically" if (steps < 0).all() else "increases monotonically" if (steps > 0).all()
                 else "is not monotonic")
        lines.append(f"- over the kl_weight sweep ({', '.join(sweep)}) the std of latent samples {trend}: "
                     + ", ".join(f"{std[n]:.3g}" for n in sweep) + ".")
    return lines


def kept_interpretation(report: Path) -> str:
    """The hand-written interpretation of an existing report (between the markers), or a placeholder."""
    text = report.read_text() if report.is_file() else ""
    found = re.search(re.escape(INTERPRETATION[0]) + r"\n(.*?)" + re.escape(INTERPRETATION[1]), text, re.S)
    return found.group(1) if found else "_Interpretation: to be written after the full run._\n"


def repo_relative(value):
    """``value`` (JSON-like) with every absolute path inside the repository written relative to it:
    the report's provenance must not name the machine it ran on."""
    return json.loads(json.dumps(value).replace(str(REPO) + os.sep, ""))


def probe_held_out(cache: Path) -> list[str]:
    """The file names of the images the probe held out (never trained on), from its latent cache."""
    tensors = load_file(cache)
    with safe_open(cache, "pt") as f:
        names = json.loads(f.metadata()["names"])
    by_id = dict(zip(tensors["ids"].tolist(), names))
    return sorted(Path(by_id[i]).name for i in tensors["held_out_ids"].tolist())


TUNE_LOGS = ("train/loss/nll", "train/e2e/vae_align", "train/e2e/denoise", "train/e2e/proj")


def training_log(metrics: Path, batch_size: int) -> dict:
    """A tune's logged losses, mean over the first and over the last tenth of its logged steps, and its
    median and least seconds per optimiser step between logs (from the logged images per second: on a
    shared machine the least is the closest to the step's own cost)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train/loss/nll" in r]
    k = max(1, len(rows) // 10)
    log = {key: {"first": float(np.mean([r[key] for r in rows[:k]])),
                 "last": float(np.mean([r[key] for r in rows[-k:]]))}
           for key in TUNE_LOGS if rows and all(key in r for r in rows)}
    speeds = [r["train/images_per_s"] for r in rows if r.get("train/images_per_s")]
    return {"losses": log, "logged_steps": len(rows),
            "seconds_per_step": float(batch_size / np.median(speeds)) if speeds else None,
            "least_seconds_per_step": float(batch_size / max(speeds)) if speeds else None}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()


def device() -> str:
    """What the variants trained on (train/train.py takes a GPU when there is one)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores), no GPU"


def markdown(meta: dict, study: dict, done: list[str], figures: list[Path], folder: str, interpretation: str) -> str:
    """The report: provenance, variants, one table, the figures, and the summary sections."""
    b = meta["resolved_config"]
    lines = ["# The KL study", "",
             "How the KL weight and its variants shape the latent scale, the outliers and the reconstruction. Every",
             "variant trains the same architecture on the same data in the same order from the same initial weights",
             "for the same number of steps; only the regulariser (or the discriminator) differs."
             + (f" The e2e variant's two tunes start from {E2E_START}'s export instead (see its section)."
                if meta.get("e2e") else ""), "",
             f"- device: {meta['device']}; date: {meta['date']}; commit: `{meta['commit']}`",
             f"- command: `{meta['command']}`",
             f"- step budget: {meta['steps']} optimiser steps of {b['train']['batch_size']} images per variant, "
             f"preset `{b['model']['preset']}`, seed {b['train']['seed']}, base recipe `{meta['config']}`",
             f"- training data: {meta['training_data']} (random crops, flips)",
             f"- evaluation: {meta['evaluation_images']} held-out images (`{meta['evaluation_data']}`), centre crops; "
             "none from a training picture:"]
    lines += [f"  - {line}" for line in meta["held_out"]]
    if meta.get("probe"):
        q = meta["probe"]
        lines += [f"- diffusability probe (`eval/diffusability.py`, `docs/diffusability.md`): the `{q['preset']}` "
                  f"UNet2DModel, flow matching, {q['steps']} steps of {q['batch_size']} latents, the same seed for "
                  f"every variant, on the latents of {q['images']} non-overlapping tiles of the same held-out pictures "
                  f"(`{q['data']}`), normalised per channel (the probe's ranking figure: scale-invariant), "
                  f"{q.get('seeds', 1)} seed(s); its held-out loss on {q['held_out']} tiles it never trained on, per "
                  "timestep over the Gaussian reference, weighted as training samples the timesteps"]
    if meta.get("e2e"):
        e = meta["e2e"]
        model = (f"a DINOv2 with **random weights** (dinov2-small's shapes, `{e['model']}`): not REPA-E's signal"
                 if e["standin"] else f"`{e['model']}`")
        lines.append(f"- e2e: {E2E_START}'s export tuned for the same steps without (`{E2E_CONTROL}`) and with "
                     f"end-to-end tuning (`e2e`, a {DIT_NAMES[e['transformer']]} transformer); vision model: {model}")
    lpips = (f"VGG16 weights `{meta['lpips']}`, in training (weight 1) and evaluation" if meta["lpips"] else
             "not measured and not trained: its VGG16 weights (`vgg16-397923af.pth`) are not available offline; "
             "pass `--lpips-weights FILE`")
    lines += ["- LPIPS: " + lpips, "", "## Variants", "",
              "| variant | overrides | why | training (s) |", "|---|---|---|---|"]
    for name, v in study.items():
        seconds = "reused" if v["reused"] else f"{v['train_seconds']:.0f}"
        status = "" if v["exit_code"] == 0 else f" **failed, exit {v['exit_code']}**"
        lines.append(f"| {name} | `{' '.join(v['overrides'])}` | {v['note']}{status} | {seconds} |")
    for name, why in meta.get("not_run", {}).items():
        lines.append(f"| {name} | `alignment.enabled=true` | VA-VAE alignment: **not run**, {why} | – |")
    lines += ["", "## Results", ""]
    if done:
        rows = reconstruction_rows([{"results": study[n]["reconstruction"]} for n in done])
        if not meta["lpips"]:
            rows.insert(3, ("LPIPS ↓", ["not measured"] * len(done), None))  # after images, PSNR and SSIM
        rows += [("reconstruction MSE per image", [study[n]["mse"] for n in done], None),
                 ("KL per held-out image (nats)", [study[n]["kl_nats_per_image"] for n in done], None),
                 ("KL per channel (nats per element)", [" / ".join(f"{k:.3g}" for k in study[n]["latent_stats"]
                                                                  ["posterior"]["channel_kl"]) for n in done], None)]
        if all("diffusability" in study[n] for n in done):
            probe = [study[n]["diffusability"] for n in done]
            rows += [("probe: held-out flow loss ↓", [x["held_out_loss"]["mean"] for x in probe], None),
                     ("probe: Gaussian reference",
                      [x["held_out_loss"]["gaussian_reference_mean"] for x in probe], None),
                     ("probe: held-out / Gaussian reference, t-weighted, per channel ↓",
                      [probe_ratio(study[n]) for n in done], 1.0),
                     ("probe: std of sampled latents", [x["samples"]["std"] for x in probe], None),
                     ("probe: std of real held-out latents", [x["samples"]["real_std"] for x in probe], None),
                     ("probe: P(\\|ẑ\\| > 4) of samples", [x["samples"]["p_abs_gt_4"] for x in probe], None),
                     ("probe: gFID", [x["gfid"] if x["gfid"] is not None else "not measured" for x in probe], None)]
        rows += [row for row in latent_rows(latent_entries(study, done)) if row[0] != "images"]
        lines += [markdown_table(rows, done, "reference"), "",
                  "Reference: N(0,1) for the tails, kurtosis and peaks (same tensor shape); uniformly random peaks",
                  "over as many images for the modal peak share; white noise for the spectrum. Reconstructions",
                  "decode the posterior mean; images in [0, 1].",
                  "Definitions: `docs/evaluation.md`. Every number: "
                  f"[{folder}/kl_study.json]({folder}/kl_study.json).", "", "## Figures", ""]
        lines += [f"![{p.stem}]({folder}/{p.name})" for p in figures]
    else:
        lines.append("No variant finished training.")
    if meta.get("e2e"):
        lines += ["", *e2e_section(meta, study, done)]
    lines += ["", "## What the figures show", "",
              "<!-- kl_study: summary (generated from the numbers on every run) -->", *summary(study), "",
              INTERPRETATION[0], interpretation.rstrip("\n"), INTERPRETATION[1], ""]
    return "\n".join(lines)



def _pm(mean: float | None, sd: float | None, fmt: str = ".4f") -> str:
    return "–" if mean is None else f"{mean:{fmt}}" + (f" ± {sd:{fmt}}" if sd else "")


def _first_last(log: dict | None, key: str) -> str:
    entry = (log or {}).get("losses", {}).get(key)
    return "–" if entry is None else f"{entry['first']:.4g} → {entry['last']:.4g}"


def exported_normaliser(export: dict) -> str:
    """The normalisation an export carries, in a few words (its config.json)."""
    if export.get("latents_std") is not None:
        return "per channel, std " + " / ".join(f"{x:.3g}" for x in export["latents_std"])
    return f"global, scaling_factor {export.get('scaling_factor', float('nan')):.4g}"


def e2e_section(meta: dict, study: dict, done: list[str]) -> list[str]:
    """The e2e variant's comparison: the start, the control and the e2e tune side by side on the same held-out
    images and probe (the warning first when its vision model is a random stand-in)."""
    e, names = meta["e2e"], [E2E_START, E2E_CONTROL, "e2e"]
    lines = ["## End-to-end (e2e) tuning", ""]
    if e["standin"]:
        lines += [STANDIN_WARNING, ""]
    missing = [n for n in names if n not in done]
    if missing:
        return lines + [f"Not compared: {', '.join(missing)} did not finish."]
    lines += [f"`{E2E_START}`'s export (the SD default, trained from scratch above) tuned for {meta['steps']} more "
              "steps twice, on the same data in the same order with the same seed: the control (the recipe alone) "
              f"and end-to-end tuning ({DIT_NAMES[e['transformer']]} transformer). All three are evaluated on the same "
              "held-out images and probed with the same settings and seeds on the same held-out tiles.", ""]
    lat = [study[n]["latent_stats"] for n in names]
    rec = [study[n]["reconstruction"] for n in names]
    logs = [study[n].get("training_log") for n in names]
    rows = []
    if all("diffusability" in study[n] for n in names):
        probe = [study[n]["diffusability"] for n in names]
        held = [study[n]["probe_held_out"] for n in names]
        same = all(h == held[0] for h in held)
        rows += [(f"probe: held-out / Gaussian reference, t-weighted, per channel ↓ (mean ± sd over "
                  f"{probe[0]['probe']['seeds']} seeds)", [_pm(x["ranking"]["ratio"], x["ranking"]["ratio_sd"])
                                                          for x in probe], 1.0),
                 ("probe: held-out flow loss ↓", [x["held_out_loss"]["mean"] for x in probe], None),
                 ("probe: held-out tiles (the same in all three: " + ("yes" if same else "**NO**") + ")",
                  [len(h) for h in held], None),
                 ("probe: DCT energy in the upper half band", [x["dct"]["high_share"] for x in probe],
                  probe[0]["dct"]["white_noise"])]
    rows += [("PSNR (dB) ↑", [_pm(r["psnr"]["mean"], r["psnr"]["std"], ".2f") for r in rec], None),
             ("SSIM ↑", [_pm(r["ssim"]["mean"], r["ssim"]["std"], ".3f") for r in rec], None),
             ("std of posterior samples", [x["scale"]["std_of_samples"] for x in lat], None),
             ("channel std", [" / ".join(f"{c:.3g}" for c in x["scale"]["channel_std"]) for x in lat], None),
             ("exported normaliser", [exported_normaliser(study[n].get("export_config", {})) for n in names], None),
             ("KL per held-out image (nats)", [study[n]["kl_nats_per_image"] for n in names], None),
             ("P(\\|ẑ\\| > 4)", [x["tails"]["p_abs_gt_4"] for x in lat], None),
             ("tune: NLL per image, first → last tenth of the logged steps", [_first_last(g, "train/loss/nll")
                                                                             for g in logs], None),
             ("tune: REPA alignment (−cos), first → last tenth", [_first_last(g, "train/e2e/vae_align")
                                                                 for g in logs], None),
             ("tune: transformer's flow-matching loss, first → last tenth", [_first_last(g, "train/e2e/denoise")
                                                                            for g in logs], None),
             ("tune: s per optimiser step, median (least)",
              ["–" if g is None else f"{g['seconds_per_step']:.3g} ({g['least_seconds_per_step']:.3g})" for g in logs],
              None)]
    labels = [f"before ({E2E_START})", f"after plain tuning ({E2E_CONTROL})", "after e2e tuning (e2e)"]
    return lines + [markdown_table(rows, labels, "reference"), "",
                    "The ratio's spread is over the probe's seeds only (one training run per column): a difference "
                    "inside it, or under about 0.03 with one seed, is noise (docs/diffusability.md)."]


def main():
    args = parse_args()
    # The code the study runs: the commit at its start (later commits during a long run do not count).
    commit = args.commit
    if commit is None:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        commit = git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")
    config_path = CONFIGS["gpu" if args.gpu else "cpu"]
    out, work = Path(args.out), Path(args.work).resolve()
    sets = common_overrides(args, work)
    base = load_config(config_path, sets)
    table = variants(base.train.max_steps, args.vision_model)
    names = with_e2e_parts(args.variants or [*table, "e2e"])
    unknown = sorted(set(names) - set(table) - {E2E_CONTROL, "e2e"})
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {[*table, E2E_CONTROL, 'e2e']}")
    vision = None
    if "e2e" in names:  # the tunes start from the start's export, trained (or reused) first
        model, standin = e2e_vision_model(args.vision_model, work)
        table.update(e2e_variants(base, work / "runs" / E2E_START / "export", model, args.e2e_transformer))
        vision = {"model": model, "standin": standin, "standin_shapes": STANDIN_DINOV2 if standin else None}

    # Setup held-out data:
    if args.eval_data:
        eval_spec, images = args.eval_data, args.eval_images or 1000
        held_out = [describe(evaluation_data(eval_spec))]
    else:
        folder = work / f"held_out_{base.data.resolution}"
        held_out = write_held_out_tiles(folder, base.data.resolution, args.tiles_per_image)
        eval_spec = f"source=imagefolder,path={folder},split=train,resolution={base.data.resolution}"
        images = args.eval_images or len(list(folder.glob("*.png")))

    # Train each variant:
    study = {}
    for name in names:
        overrides, note = table[name]
        run_sets = sets + overrides + [f"train.run_name={name}"]
        study[name] = {"overrides": overrides, "note": note}
        if name in (E2E_CONTROL, "e2e") and study[E2E_START]["exit_code"] != 0:
            study[name].update(exit_code=1, train_seconds=0.0, reused=False)  # no start to tune
            continue
        # a tune is reused only when its start was: a retrained start is another starting point
        reuse = args.reuse and (name not in (E2E_CONTROL, "e2e") or study[E2E_START]["reused"])
        study[name].update(train(name, run_sets, config_path, work / "runs" / name, reuse))
    done = [n for n in names if study[n]["exit_code"] == 0]

    # Evaluate every finished export on the held-out images:
    evaluated = 0
    if done:
        exports = [work / "runs" / n / "export" for n in done]
        latents = evaluate("latent_stats.py", exports, eval_spec, images, work / "eval" / "latents", [])
        lpips = ["--lpips-weights", args.lpips_weights] if args.lpips_weights else ["--no-lpips"]
        recons = evaluate("reconstruction.py", exports, eval_spec, images, work / "eval" / "reconstruction", lpips)
        evaluated = latents["num_images"]
        for name, lat, rec in zip(done, latents["vaes"], recons["vaes"]):
            rate, mse = rate_and_distortion(lat["results"], rec["results"])
            export = json.loads((work / "runs" / name / "export" / "config.json").read_text())
            study[name].update(latent_stats=lat["results"], reconstruction=rec["results"],
                               kl_nats_per_image=rate, mse=mse, scaling_factor=lat["scaling_factor"],
                               export_config={k: export.get(k) for k in ("scaling_factor", "shift_factor",
                                                                         "latents_mean", "latents_std")})

    # The diffusability probe on every non-overlapping tile of the held-out pictures:
    probe = None
    if done and not args.no_probe:
        tiles = work / f"probe_tiles_{base.data.resolution}"
        write_held_out_tiles(tiles, base.data.resolution, args.probe_tiles_per_image)
        spec = f"source=imagefolder,path={tiles},split=train,resolution={base.data.resolution}"
        count = len(list(tiles.glob("*.png")))
        extra = ["--held-out", str(args.probe_held_out), "--steps", str(args.probe_steps), "--batch-size",
                 str(args.probe_batch_size), "--eval-every", str(max(1, args.probe_steps // 6)),
                 "--normalise", "channel", "--seeds", str(args.probe_seeds), "--samples", str(args.probe_samples)]
        probed = evaluate("diffusability.py", exports, spec, count, work / "eval" / "diffusability", extra)
        for index, (name, entry) in enumerate(zip(done, probed["vaes"]), 1):
            study[name]["diffusability"] = entry["results"]
            study[name]["probe_held_out"] = probe_held_out(work / "eval" / "diffusability" / "latents"
                                                           / f"vae{index}.safetensors")
        probe = {"preset": entry["results"]["probe"]["preset"], "steps": args.probe_steps,
                 "batch_size": args.probe_batch_size, "images": probed["num_images"], "data": spec,
                 "held_out": args.probe_held_out, "seeds": args.probe_seeds}

    # Figures, JSON and the report (keeping its hand-written interpretation):
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if done:
        points = {n: (study[n]["kl_nats_per_image"], study[n]["mse"]) for n in done}
        figures = [rate_distortion_plot(points, out / "rate_distortion.png"),
                   *latent_plots(latent_entries(study, done), out)]
        if probe is not None:
            figures.append(diffusability_plot({n: (*points[n], probe_ratio(study[n])) for n in done},
                                              out / "diffusability.png"))
            figures += diffusability_plots([{"path": n, "results": study[n]["diffusability"]} for n in done], out)
    if vision is not None:  # what the tunes logged: the alignment and the transformer's losses, the cost
        for name in (E2E_CONTROL, "e2e"):
            if name in done:
                study[name]["training_log"] = training_log(work / "runs" / name / "metrics.jsonl",
                                                           base.train.batch_size)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    meta = {"device": device(), "date": datetime.date.today().isoformat(), "commit": commit, "command": command,
            "steps": base.train.max_steps, "config": str(config_path.relative_to(REPO)), "common_overrides": sets,
            "resolved_config": to_dict(base), "training_data": describe(base.data), "held_out": held_out,
            "evaluation_data": eval_spec, "evaluation_images": evaluated, "lpips": args.lpips_weights, "probe": probe,
            "not_run": {} if args.vision_model else {"align": NOT_RUN_ALIGNMENT},
            "e2e": None if vision is None else {**vision, "start": E2E_START, "control": E2E_CONTROL,
                                                "transformer": args.e2e_transformer}}
    meta, study = repo_relative(meta), repo_relative(study)
    write_json({"meta": meta, "variants": study}, out / "kl_study.json")
    report = out.with_suffix(".md")
    report.write_text(markdown(meta, study, done, figures, out.name, kept_interpretation(report)))
    print(f"wrote {report}, {out / 'kl_study.json'} and {len(figures)} figures in {out}")
    failed = [n for n in names if n not in done]
    if failed:
        sys.exit(f"training failed for {failed}: see {work / 'runs'}/<variant>.log")


if __name__ == "__main__":
    run_main(main)
