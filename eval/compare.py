"""The compatibility report of a candidate VAE against a reference: latent drift on the same images, cross-decoding,
reconstruction at several resolutions untiled and tiled (seam error, peak memory), and the fp16 audit of each.

    python eval/compare.py --reference A --vae B --data DATA_SPEC --num-images N --out OUT

A and B: any diffusers image autoencoder the package reads (AutoencoderKL, AutoencoderKLFlux2, AutoencoderTiny,
AutoencoderDC, AutoencoderKLQwenImage on single frames), each with its own latent normalisation; for the KL
classes also training checkpoints, run folders and single files, as eval/latent_stats.py takes them.
DATA_SPEC as in eval/latent_stats.py (default: the bundled sample photos at 256²); the resolution sweep takes
--resolution-images of its images at each --resolutions side, resized in proportion.

One process: the comparison does not split images over processes (`accelerate launch` with several refuses).
Writes OUT/report.json (kind "compare"), OUT/report.md and PNG plots. What each figure means: docs/compare.md.
LPIPS needs torchvision's VGG16 file (--lpips-weights, or the torch hub cache); --no-lpips skips it.
"""

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator

from first_stage.compare import (autoencoder_entry, compare_notes, compare_plots, compare_report, compare_vaes,
                                 fp16_audit, load_image_autoencoder, resolution_sweep)
from first_stage.evaluation import add_source_arguments, evaluation_inputs
from first_stage.lifecycle import run_main
from first_stage.model import cast
from first_stage.reports import save_rows, write_json, write_markdown

ROLES = ("reference", "candidate")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the VAE a model was trained on (A)")
    parser.add_argument("--vae", required=True, help="the candidate VAE (B)")
    parser.add_argument("--data", default="source=sample,split=all", help="data settings, key=value,...")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="which images are picked")
    parser.add_argument("--bf16", action="store_true", help="run the VAEs in bf16 (statistics stay float64)")
    parser.add_argument("--resolutions", type=int, nargs="*", default=[256, 512, 1024, 2048],
                        help="sides of the resolution sweep (none: no sweep)")
    parser.add_argument("--resolution-images", type=int, default=2, help="images per resolution, one at a time")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="tile side in pixels for every VAE (default: each class's enable_tiling() default)")
    parser.add_argument("--keep", type=int, default=4, help="images shown with their cross-decodes")
    parser.add_argument("--fp16-images", type=int, default=2, help="images of the fp16 audit, at the data's resolution")
    add_source_arguments(parser, lpips=True)
    return parser.parse_args()


def main():
    args = parse_args()
    accelerator = Accelerator()
    inputs = evaluation_inputs(args, accelerator, lpips=True)
    data, out, images, available, lpips = inputs.data, inputs.out, inputs.images, inputs.available, inputs.lpips
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    paths = (args.reference, args.vae)
    vaes = [cast(load_image_autoencoder(path, **inputs.load), dtype, accelerator.device) for path in paths]

    # Setup: the same images through both VAEs
    comparison, skipped, kept = compare_vaes(*vaes, accelerator, data, images, args.batch_size, args.seed, lpips,
                                             max(args.keep, args.fp16_images, 1))
    results = [{"images": comparison["images"], "skipped_files": skipped} for _ in vaes]

    # Setup: each VAE alone: the resolution sweep and the fp16 audit
    for vae, result in zip(vaes, results):
        result["resolutions"] = resolution_sweep(vae, data, args.resolutions, args.resolution_images,
                                                 accelerator.device, args.tile_size, args.seed, accelerator.print)
        result["fp16"] = fp16_audit(vae, kept["image"][:args.fp16_images])

    entries = [autoencoder_entry(path, vae, result) for path, vae, result in zip(paths, vaes, results)]
    rep = compare_report(data, entries, comparison, args.num_images, available, accelerator.device)
    write_json(rep, out / "report.json")
    plots = compare_plots(rep, out)
    if args.keep:
        roles = [k for k in ("image", "reference_own", "candidate_own", "reference_to_candidate",
                             "candidate_to_reference") if k in kept]
        save_rows([kept[k][:args.keep] for k in roles], out / "cross_decoding.png")
        plots.append(out / "cross_decoding.png")
    title = f"VAE compatibility: {Path(args.vae).name} against {Path(args.reference).name}"
    write_markdown(out / "report.md", title, rep, "VAE 1 is the reference (A), VAE 2 the candidate (B).",
                   compare_notes(rep, plots))
    accelerator.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and plots")
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
