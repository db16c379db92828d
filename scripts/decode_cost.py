"""What a distilled decoder saves: decoder parameters, counted FLOPs and decode time of each student against its
teacher, on the same latents (``first_stage.teacher.distillation_report``). Weights are random (cost does not
depend on their values) unless ``--teacher`` names a VAE on disk.

    python scripts/decode_cost.py --teacher flux2 --students flux2:96-192-384-384,taesd --resolution 256
    python scripts/decode_cost.py --teacher /path/to/FLUX.2-dev/vae --device cuda --dtype bf16 --resolution 1024

A student is a preset with optional decoder widths (``flux2:96-192-384-384``: FLUX.2's small decoder); an
AutoencoderTiny preset gets the teacher's latent channels.
"""

import argparse
import json
from pathlib import Path

import torch

from first_stage.checkpoint import load_vae
from first_stage.config import ModelConfig
from first_stage.lifecycle import run_main
from first_stage.model import DTYPES, PRESETS, cast, new_autoencoder
from first_stage.teacher import Teacher, distillation_report, student_spec


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="flux2", help="a preset (random weights) or any VAE load_vae reads")
    parser.add_argument("--students", default="flux2:96-192-384-384,taesd")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--json", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = args.teacher
    if not Path(source).exists() and source not in PRESETS:
        raise SystemExit(f"--teacher {source}: neither a preset ({', '.join(PRESETS)}) nor a VAE at "
                         f"{Path(source).resolve()}")
    vae = load_vae(source).vae if Path(source).exists() else new_autoencoder(ModelConfig(preset=source))
    teacher = Teacher(cast(vae, DTYPES[args.dtype], args.device), source)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lines = []
    for spec in args.students.split(","):
        preset, overrides = student_spec(spec, teacher.vae.config.latent_channels)
        student = new_autoencoder(ModelConfig(preset=preset, overrides=overrides))
        student = cast(student, DTYPES[args.dtype], args.device)
        report = distillation_report(student, teacher, x.to(args.device, DTYPES[args.dtype]), args.repeats)
        lines.append(json.dumps({"bench": "decode_cost", "student_spec": spec, "resolution": args.resolution,
                                 **report}))
        s, t = report["student"], report["teacher"]
        print(f"{spec}: {s['decoder_parameters']:,} decoder parameters ({report['parameter_ratio']:.3f}x), "
              f"{s['gflops_per_image']:.1f} GFLOP ({report['flop_ratio']:.3f}x), {s['ms_per_image']:.0f} ms "
              f"({report['speedup']:.2f}x faster) against the teacher's {t['decoder_parameters']:,}, "
              f"{t['gflops_per_image']:.1f} GFLOP, {t['ms_per_image']:.0f} ms; {s['device']} {s['dtype']}")
    if args.json:
        with open(args.json, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    run_main(main)
