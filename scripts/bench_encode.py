"""Encode and decode throughput of a VAE, with the data pipeline measured on its own.

    python scripts/bench_encode.py --vae outputs/quickstart/export --resolution 256 --batch 32 --precision bf16
    python scripts/bench_encode.py --vae DIR --data source=imagefolder,path=/data/coco/val2017,resize=256 --workers 8
    accelerate launch --num_processes 8 scripts/bench_encode.py --vae DIR ...     # per-process and total rates

Four figures, each in images/s:
- ``data``: the loader alone (file read, JPEG decode, resize, crop, collate) with ``--workers``;
- ``encode`` / ``decode``: the model alone on one batch already on the device, under
  ``torch.inference_mode``, weights cast to ``--precision``;
- ``encode_pipeline``: loader → device → encode, what latent caching and evaluation get.
The smaller of ``data`` and ``encode`` is the bottleneck. Without ``--data`` the bundled sample
photos are written as JPEG files (quality 95) to a temporary folder, so decoding is real JPEG work.
``--vae`` takes anything eval/ takes (diffusers folder, single file, checkpoint, run folder), or a
preset name (``tiny``, ``sd-f8c4``, ``f8c16``) for random weights of that architecture.
"""

import argparse
import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path

import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from first_stage.checkpoint import load_vae
from first_stage.config import ModelConfig, PerformanceConfig
from first_stage.data import load_image_dataset, make_dataloader
from first_stage.evaluation import data_from_spec
from first_stage.lifecycle import run_main
from first_stage.model import DTYPES, PRESETS, cast, new_autoencoder
from first_stage.performance import (compile_in_place, compiled_parts, seconds_per_call, set_memory_format, synchronize,
                                     to_memory_format)

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, help="a VAE to load, or a preset name for random weights")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="images per process")
    parser.add_argument("--precision", choices=list(DTYPES), default="bf16")
    parser.add_argument("--data", default=None, help="data settings key=value,... (default: sample photos as JPEG)")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers")
    parser.add_argument("--images", type=int, default=64, help="images through the loader for the data rates")
    parser.add_argument("--steps", type=int, default=5, help="timed model batches")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", default=None, help="also append the JSON lines to this file")
    return parser.parse_args()


def sample_jpegs(folder: Path) -> str:
    """The bundled sample photos as JPEG files in ``folder``; returns a data spec for them."""
    for i, row in enumerate(load_image_dataset(data_from_spec("source=sample,split=all"))):
        image = PIL.Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        image.save(folder / f"{i:03d}.jpg", quality=95)
    return f"source=imagefolder,path={folder}"


def bench_vae(name: str, device, dtype):
    """A preset with random weights, or any VAE the evaluation loaders take."""
    if name in PRESETS:
        torch.manual_seed(0)
        return cast(new_autoencoder(ModelConfig(preset=name)), dtype, device)
    return cast(load_vae(name).vae, dtype, device)


def loader_images(loader, images: int, step=None) -> tuple[int, float]:
    """Pull ``images`` images (epoch after epoch) through ``loader``, calling ``step(batch)`` on each
    batch; returns (images seen, seconds)."""
    seen, epoch, start = 0, 0, time.perf_counter()
    while seen < images:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            if step is not None:
                step(batch["pixel_values"])
            seen += batch["pixel_values"].shape[0]
            if seen >= images:
                break
        epoch += 1
    return seen, time.perf_counter() - start


@torch.inference_mode()
def main():
    args = parse_args()
    accelerator = Accelerator()
    device = accelerator.device
    dtype = DTYPES[args.precision]
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.data or sample_jpegs(Path(tmp))
        data = dataclasses.replace(data_from_spec(spec), resolution=args.resolution, num_workers=args.workers,
                                   pin_memory=device.type == "cuda", random_crop=False, hflip=False)
        loader = make_dataloader(data, args.batch, seed=accelerator.process_index, drop_last=False)

        pcfg = PerformanceConfig(compile=args.compile, channels_last=args.channels_last)
        vae = bench_vae(args.vae, device, dtype)
        set_memory_format([vae], pcfg)
        if args.compile:
            compile_in_place(compiled_parts(vae), pcfg)
        x = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device, dtype=dtype) * 2 - 1
        x = to_memory_format(x, pcfg)
        z = vae.encode(x).latent_dist.mode()

        def encode(images):
            images = images.to(device, dtype, non_blocking=True)
            return vae.encode(to_memory_format(images, pcfg)).latent_dist.mode()

        seen, data_seconds = loader_images(loader, args.images)
        rates = {
            "data": seen / data_seconds,
            "encode": args.batch / seconds_per_call(lambda: encode(x), args.steps, args.warmup, device),
            "decode": args.batch / seconds_per_call(lambda: vae.decode(z).sample, args.steps, args.warmup, device),
        }
        seen, seconds = loader_images(loader, args.images, encode)
        synchronize(device)
        rates["encode_pipeline"] = seen / seconds

    everyone = gather_object([rates])
    if accelerator.is_main_process:
        common = {"bench": "encode", "vae": args.vae, "device": torch.cuda.get_device_name(device)
                  if device.type == "cuda" else "cpu", "processes": accelerator.num_processes, "batch": args.batch,
                  "resolution": args.resolution, "precision": args.precision, "workers": args.workers,
                  "compile": args.compile, "channels_last": args.channels_last, "data": spec if args.data else
                  "sample photos as JPEG (quality 95)"}
        rows = []
        for what in rates:
            each = [r[what] for r in everyone]
            rows.append({**common, "what": what, "img_s_per_process": each[0], "img_s_total": sum(each),
                         "img_s_each_process": each})
        bottleneck = min(("data", "encode"), key=lambda k: rates[k])
        for row in rows:
            row["bottleneck"] = bottleneck
        lines = [json.dumps(r) for r in rows]
        print("\n".join(lines))
        if args.json:
            with open(args.json, "a") as f:
                f.write("\n".join(lines) + "\n")
        print(f"{'what':<16} {'img/s total':>12} {'img/s per process':>18}   (bottleneck: {bottleneck})")
        for row in rows:
            print(f"{row['what']:<16} {row['img_s_total']:>12.2f} {row['img_s_per_process']:>18.2f}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_main(main)
