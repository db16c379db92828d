"""Reconstruction quality of one or more VAEs: PSNR, SSIM, LPIPS per image and aggregated, rFID
when Inception weights are supplied, and the worst images beside their reconstructions.

    python eval/reconstruction.py --vae DIR [DIR ...] --data DATA_SPEC --num-images N --out OUT
    accelerate launch --num_processes 8 eval/reconstruction.py ...    # images split over processes

Reconstructions decode the posterior mean. --vae and DATA_SPEC as in eval/latent_stats.py.
LPIPS needs torchvision's VGG16 file (--lpips-weights, or the torch hub cache); --no-lpips skips it.
rFID needs torch-fidelity's Inception file (--inception-weights PATH, `pip install torch-fidelity`).
"""

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator

from first_stage.evaluation import add_source_arguments, build_fid, evaluate_each, evaluation_inputs, reconstruction
from first_stage.lifecycle import run_main
from first_stage.reports import markdown_table, reconstruction_rows, report, save_grid, write_json, write_markdown



def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", nargs="+", required=True)
    parser.add_argument("--data", default="source=sample,split=all", help="data settings, key=value,...")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="run the VAE in bf16 (metrics stay fp32)")
    add_source_arguments(parser, lpips=True)
    parser.add_argument("--inception-weights", default=None, help="torch-fidelity's weights-inception-2015-12-05 file")
    parser.add_argument("--worst", type=int, default=8, help="worst images (by PSNR) saved with their reconstructions")
    return parser.parse_args()


def measure(vae, index: int, data, args, accelerator, lpips, out: Path, images: int) -> dict:
    """The reconstruction results of one VAE, with its worst images saved beside the report (main process)."""
    fid = build_fid(args.inception_weights, accelerator.device)
    result, worst = reconstruction(vae, accelerator, data, images, args.batch_size, args.seed, lpips, fid, args.worst)
    if worst:
        grid = out / f"worst_vae{index}.png"
        save_grid(torch.stack([x for _, _, x, _ in worst]), torch.stack([r for _, _, _, r in worst]), grid)
        result["worst"] = {"file": grid.name, "psnr": [score for score, _, _, _ in worst],
                           "images": [name for _, name, _, _ in worst]}
    return result


def main():
    args = parse_args()
    accelerator = Accelerator()
    inputs = evaluation_inputs(args, accelerator, lpips=True)
    data, out, images, available, lpips = inputs.data, inputs.out, inputs.images, inputs.available, inputs.lpips
    entries = evaluate_each(args.vae, accelerator.device, lambda vae, index: measure(
        vae, index, data, args, accelerator, lpips, out, images), args.bf16, **inputs.load)
    if accelerator.is_main_process:
        rep = report("reconstruction", data, entries, args.num_images, available)
        write_json(rep, out / "report.json")
        table = markdown_table(reconstruction_rows(entries), [f"VAE {i + 1}" for i in range(len(entries))], "reference")
        notes = ["Mean ± std over images; PSNR over the images not reconstructed exactly. Images in [0, 1].",
                 "Published figures for comparison (other data and protocol): docs/evaluation.md.", ""]
        for i, entry in enumerate(entries):
            if "worst" in entry["results"]:
                worst = entry["results"]["worst"]
                names = ", ".join(f"`{name}` ({psnr:.2f} dB)" for name, psnr in zip(worst["images"], worst["psnr"]))
                notes += [f"Worst by PSNR, VAE {i + 1}, left to right: {names}. Inputs above, reconstructions below:",
                          "", f"![worst]({worst['file']})", ""]
        write_markdown(out / "report.md", "Reconstruction", rep, table, notes)
        accelerator.print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
