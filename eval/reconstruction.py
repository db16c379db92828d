"""Reconstruction quality of one or more VAEs: PSNR, SSIM, LPIPS per image and aggregated, rFID
when Inception weights are supplied, and the worst images beside their reconstructions.

    python eval/reconstruction.py --vae DIR [DIR ...] --data DATA_SPEC --num-images N --out OUT
    accelerate launch --num_processes 8 eval/reconstruction.py ...    # images split over processes

Reconstructions decode the posterior mean. --vae and DATA_SPEC as in eval/latent_stats.py.
LPIPS needs torchvision's VGG16 file (--lpips-weights, or the torch hub cache); --no-lpips skips it.
rFID needs torch-fidelity's Inception file (--inception-weights PATH, `pip install torch-fidelity`).
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
from first_stage.evaluation import (WorstImages, build_fid, evaluate_each, evaluation_data, images_to_measure,
                                    reconstruction_metrics, summarize)
from first_stage.perceptual import VGG16_FILENAME, LPIPSWeightsError, load_lpips

LPIPS_OPTION = f"to this script: --lpips-weights /path/to/{VGG16_FILENAME} (or measure without LPIPS: --no-lpips)"
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
    parser.add_argument("--weights", choices=["ema", "raw"], default=None,
                        help="training checkpoints: EMA or raw weights (default: the run's export.weights)")
    parser.add_argument("--single-file-config", default=None)
    parser.add_argument("--norm-num-groups", type=int, default=None)
    parser.add_argument("--lpips-weights", default=None, help="torchvision's vgg16-397923af.pth")
    parser.add_argument("--no-lpips", action="store_true")
    parser.add_argument("--inception-weights", default=None, help="torch-fidelity's weights-inception-2015-12-05 file")
    parser.add_argument("--worst", type=int, default=8, help="worst images (by PSNR) saved with their reconstructions")
    return parser.parse_args()


@torch.no_grad()
def measure(vae, index: int, data, args, accelerator, lpips, out: Path, images: int) -> dict:
    per_image = {"file": [], "psnr": [], "ssim": [], "lpips": []}
    worst, skipped = WorstImages(args.worst), []
    fid = build_fid(args.inception_weights, accelerator.device)
    batches = calibration_batches(data, args.num_images, args.batch_size, seed=args.seed,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
    for batch in tqdm(batches, total=math.ceil(math.ceil(images / accelerator.num_processes) / args.batch_size),
                      disable=not accelerator.is_local_main_process):
        skipped += batch["skipped_names"]
        x = batch["pixel_values"].to(accelerator.device)
        if x.shape[0] == 0:
            continue
        z = vae.encode(x.to(vae.dtype)).latent_dist.mode()
        rec = vae.decode(z).sample.float()
        metrics = reconstruction_metrics(x, rec, lpips)
        per_image["file"] += batch["names"]
        for key, values in metrics.items():
            per_image[key] += values.tolist()
        worst.add(metrics["psnr"], x, rec, batch["names"])
        if fid is not None:
            fid.update((x.float() + 1) / 2, real=True)
            fid.update((rec.clamp(-1, 1) + 1) / 2, real=False)
    per_image = {k: gather_object(v) for k, v in per_image.items() if k != "lpips" or lpips is not None}
    worst_items, skipped = gather_object(worst.items()), gather_object(skipped)
    rfid = fid.compute().item() if fid is not None else None  # torchmetrics syncs its states across processes
    if not accelerator.is_main_process:
        return {}
    if not per_image["psnr"]:
        raise DataError(f"no decodable image among the {images} picked of {describe(data)}")
    result = {"images": len(per_image["psnr"]), **{k: summarize(v) for k, v in per_image.items() if k != "file"},
              "rfid": rfid, "per_image": per_image, "skipped_files": skipped}
    worst_items = sorted(worst_items, key=lambda item: item[0])[:args.worst]
    if worst_items:
        grid = out / f"worst_vae{index}.png"
        save_grid(torch.stack([x for _, _, x, _ in worst_items]), torch.stack([r for _, _, _, r in worst_items]), grid)
        result["worst"] = {"file": grid.name, "psnr": [s for s, _, _, _ in worst_items],
                           "images": [name for _, name, _, _ in worst_items]}
    return result


def main():
    args = parse_args()
    accelerator = Accelerator()
    data = evaluation_data(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lpips = None if args.no_lpips else load_lpips(args.lpips_weights, option=LPIPS_OPTION).to(accelerator.device)
    images, available = images_to_measure(data, args.num_images, accelerator.print)
    load = dict(weights=args.weights, single_file_config=args.single_file_config, norm_num_groups=args.norm_num_groups)
    entries = evaluate_each(args.vae, accelerator.device, functools.partial(
        measure, data=data, args=args, accelerator=accelerator, lpips=lpips, out=out, images=images), args.bf16, **load)
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
    try:
        main()
    except (CheckpointError, DataError, LPIPSWeightsError, FileNotFoundError) as err:  # they name the file or data
        sys.exit(f"error: {err}")
