"""Latent statistics of one or more VAEs: scale, tails, peaks, spots, posterior, spectrum, non-locality.

    python eval/latent_stats.py --vae DIR [DIR ...] --data DATA_SPEC --num-images N --out OUT
    accelerate launch --num_processes 8 eval/latent_stats.py ...      # images split over processes

--vae takes diffusers folders, single files (our exports carry their config; others take
--single-file-config DIR), training checkpoints or run folders. DATA_SPEC is comma-separated data
settings, e.g. "source=imagefolder,path=/data/coco/val2017,resolution=256" (default: the bundled
sample photos). Writes OUT/report.json, OUT/report.md and PNG plots. Definitions: docs/evaluation.md.
"""

import argparse
import functools
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from first_stage.checkpoint import CheckpointError
from first_stage.data import DataError, calibration_batches, describe
from first_stage.evaluation import evaluate_each, evaluation_data, images_to_measure, nonlocality
from first_stage.latent_stats import LatentStatistics
from first_stage.model import downsampling_factor
from first_stage.perceptual import LPIPSWeightsError
from first_stage.reports import latent_plots, latent_rows, markdown_table, report, write_json, write_markdown


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", nargs="+", required=True, help="VAEs to compare (same images for all)")
    parser.add_argument("--data", default="source=sample,split=all", help="data settings, key=value,...")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="which images are picked, and the random positions")
    parser.add_argument("--bf16", action="store_true", help="run the VAE in bf16 (statistics stay float64)")
    parser.add_argument("--weights", choices=["ema", "raw"], default=None,
                        help="training checkpoints: EMA or raw weights (default: the run's export.weights)")
    parser.add_argument("--single-file-config", default=None, help="diffusers folder with the config of single files")
    parser.add_argument("--norm-num-groups", type=int, default=None)
    parser.add_argument("--nonlocality-images", type=int, default=16, help="images for the perturbation test")
    parser.add_argument("--margin", type=int, default=1, help="latent cells around the perturbed position")
    return parser.parse_args()


def encode(vae, x):
    """(posterior mean, log-variance) of a batch, float32."""
    posterior = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.logvar.float()


@torch.no_grad()
def measure(vae, index: int, data, args, accelerator, images: int) -> dict:
    """Both passes over the same ``images`` images, then the combined statistics (main process)."""
    batches = lambda: calibration_batches(data, args.num_images, args.batch_size, seed=args.seed,  # noqa: E731
                                          rank=accelerator.process_index, world_size=accelerator.num_processes)
    reduce_sum = lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu()  # noqa: E731
    side = data.resolution // downsampling_factor(vae.config)
    stats = LatentStatistics(vae.config.latent_channels, (side, side))
    bar = dict(total=2 * math.ceil(images / accelerator.num_processes), unit="img",
               disable=not accelerator.is_local_main_process)
    skipped, perturbed = [], []  # perturbed: (image id, file, peak share, random share)
    with tqdm(**bar) as progress:
        for batch in batches():
            if batch["pixel_values"].shape[0]:  # every image of a batch may be undecodable
                stats.first_pass(*encode(vae, batch["pixel_values"]))
            skipped += batch["skipped_names"]
            progress.update(batch["pixel_values"].shape[0] + batch["skipped"])
        stats.finish_first_pass(reduce_sum)
        for batch in batches():
            progress.update(batch["pixel_values"].shape[0] + batch["skipped"])
            if not batch["pixel_values"].shape[0]:
                continue
            z, _ = encode(vae, batch["pixel_values"])
            stats.second_pass(z)
            # The first --nonlocality-images images of the pick, each with its random position
            # seeded by the image: the same test whatever the number of processes.
            chosen = [i for i, image_id in enumerate(batch["ids"]) if image_id < args.nonlocality_images]
            if chosen:
                found = nonlocality(vae, z[chosen], stats.std.float(),
                                    [hash((args.seed, batch["ids"][i])) for i in chosen], args.margin)
                perturbed += [(batch["ids"][i], batch["names"][i], p, r)
                              for i, p, r in zip(chosen, found["peak"], found["random"])]
    stats.combine(reduce_sum, gather_object)
    skipped, perturbed = gather_object(skipped), sorted(gather_object(perturbed))
    if not accelerator.is_main_process:
        return {}
    if not stats.peak_zhat:
        raise DataError(f"no decodable image among the {images} picked of {describe(data)}")
    result = stats.result()
    result["scale"]["carried_over_implied"] = vae.config.scaling_factor / result["scale"]["implied_scaling_factor"]
    peak, random = [p for _, _, p, _ in perturbed], [r for _, _, _, r in perturbed]
    result["nonlocality"] = {"images": len(perturbed), "margin_cells": args.margin, "files": [f for _, f, _, _ in perturbed],
                             "peak": peak, "random": random,
                             "peak_median": float(torch.tensor(peak).median()) if peak else None,
                             "random_median": float(torch.tensor(random).median()) if random else None}
    result["skipped_files"] = skipped
    return result


def main():
    args = parse_args()
    accelerator = Accelerator()
    data = evaluation_data(args.data)
    out = Path(args.out)
    images, available = images_to_measure(data, args.num_images, accelerator.print)
    load = dict(weights=args.weights, single_file_config=args.single_file_config, norm_num_groups=args.norm_num_groups)
    entries = evaluate_each(args.vae, accelerator.device, functools.partial(measure, data=data, args=args,
                            accelerator=accelerator, images=images), args.bf16, **load)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        rep = report("latent_stats", data, entries, args.num_images, available)
        write_json(rep, out / "report.json")
        table = markdown_table(latent_rows(entries), [f"VAE {i + 1}" for i in range(len(entries))], "reference")
        notes = ["Reference: N(0,1) for the tails, kurtosis and peaks (same tensor shape); uniformly random peaks",
                 "over as many images for the modal peak share; white noise for the spectrum. Definitions:",
                 "docs/evaluation.md.", ""]
        notes += [f"![{p.stem}]({p.name})" for p in latent_plots(entries, out)]
        write_markdown(out / "report.md", "Latent statistics", rep, table, notes)
        accelerator.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and plots")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError, LPIPSWeightsError, FileNotFoundError) as err:  # they name the file or data
        sys.exit(f"error: {err}")
