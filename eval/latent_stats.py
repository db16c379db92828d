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

from accelerate import Accelerator

from first_stage.evaluation import add_source_arguments, evaluate_each, evaluation_inputs, latent_statistics
from first_stage.lifecycle import run_main
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
    add_source_arguments(parser)
    parser.add_argument("--nonlocality-images", type=int, default=16, help="images for the perturbation test")
    parser.add_argument("--margin", type=int, default=1, help="latent cells around the perturbed position")
    return parser.parse_args()


def main():
    args = parse_args()
    accelerator = Accelerator()
    inputs = evaluation_inputs(args, accelerator)
    data, out, images, available = inputs.data, inputs.out, inputs.images, inputs.available
    measure = functools.partial(latent_statistics, accelerator=accelerator, data=data, num_images=images,
                                batch_size=args.batch_size, seed=args.seed,
                                nonlocality_images=args.nonlocality_images, margin=args.margin)
    entries = evaluate_each(args.vae, accelerator.device, lambda vae, index: measure(vae), args.bf16, **inputs.load)
    if accelerator.is_main_process:
        rep = report("latent_stats", data, entries, args.num_images, available)
        write_json(rep, out / "report.json")
        table = markdown_table(latent_rows(entries), [f"VAE {i + 1}" for i in range(len(entries))], "reference")
        notes = ["Reference: N(0,1) for the tails, kurtosis and peaks (same tensor shape); uniformly random peaks",
                 "over as many images for the modal peak share; white noise for the spectrum. Definitions:",
                 "docs/evaluation.md.", ""]
        notes += [f"VAE {i + 1} carries {e['results']['scale']['carried']}; its images imply "
                  f"{e['results']['scale']['implied']}." for i, e in enumerate(entries)] + [""]
        notes += [f"![{p.stem}]({p.name})" for p in latent_plots(entries, out)]
        write_markdown(out / "report.md", "Latent statistics", rep, table, notes)
        accelerator.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and plots")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
