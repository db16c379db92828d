"""Diffusability of one or more VAEs: how well a small latent diffusion model learns their latents.

    python eval/diffusability.py --vae DIR [DIR ...] --data DATA_SPEC --num-images N --steps S --out OUT
    accelerate launch --num_processes 8 --mixed_precision bf16 eval/diffusability.py ...

For each VAE: encode the images once (posterior mean, or a seeded sample: --latents; read back from
OUT/latents/ when that cache was written for the same VAE files, data and settings), hold out
--held-out images of the pick (whole groups of them with --group-pattern), and for each --normalise
(per-channel statistics first: the scale-invariant ranking figure; then the VAE's exported
normalisation, as a pipeline reads it) train --seeds probes (--probe-family unet: a diffusers
UNet2DModel; dit: a DiT; same seeds, data order and steps for every VAE) on the rest. Reports the
held-out loss of the probes' EMA weights on a fixed timestep grid during and after training, its
ratio to the Gaussian optimum weighted as training samples t (mean and spread over seeds, final and
best), the training loss, the latents' DCT high-band share, samples from fixed noise (decoded, with
their latent statistics), gFID with --inception-weights, and the cost. --vae and DATA_SPEC as in
eval/latent_stats.py. Definitions and recipes: docs/diffusability.md.
"""

import argparse
from pathlib import Path

from accelerate import Accelerator

from first_stage.diffusability import (DEPLOYED_STD_TOLERANCE, DIT_PROBES, FAMILIES, NORMALISATIONS, PROBES, probe_vae,
                                      settings_from)
from first_stage.evaluation import add_source_arguments, evaluate_each, evaluation_inputs
from first_stage.lifecycle import run_main
from first_stage.reports import (diffusability_plots, diffusability_rows, markdown_table, report, save_rows,
                                 write_json, write_markdown)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", nargs="+", required=True, help="VAEs to compare (same images, same probe)")
    parser.add_argument("--data", default="source=sample,split=all", help="data settings, key=value,...")
    parser.add_argument("--num-images", type=int, default=1000, help="images encoded (held-out ones included)")
    parser.add_argument("--held-out", type=int, default=128, help="images the probe never trains on")
    parser.add_argument("--out", required=True)
    parser.add_argument("--latents", choices=["mean", "sample"], default="mean",
                        help="posterior mean, or one sample per image (seeded by the image)")
    parser.add_argument("--normalise", nargs="+", choices=NORMALISATIONS, default=list(NORMALISATIONS),
                        help="normalisations probed, the first ranks: channel (per-channel mean/std of the latents: "
                             "scale-invariant) and/or exported (as pipelines read the VAE's config)")
    parser.add_argument("--probe-family", choices=FAMILIES, default="unet",
                        help="unet: diffusers UNet2DModel; dit: a DiT (adaLN-zero, patch 1 or 2)")
    parser.add_argument("--probe", choices=sorted(set(PROBES) | set(DIT_PROBES)), default="tiny",
                        help="probe size (dit: small = DiT-S, base = DiT-B)")
    parser.add_argument("--seeds", type=int, default=3, help="probes trained per normalisation (seed, seed + 1, ...)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the probe's weights, evaluated")
    parser.add_argument("--group-pattern", default=None,
                        help="regex: images whose file names give the same match (group 1 if any) are held out "
                             "together, e.g. '^(.+)_\\d+_\\d+\\.png$' for tiles of one photograph")
    parser.add_argument("--repa-model", default=None,
                        help="DiT probe only: train it with REPA against this vision model's patch tokens (a local "
                             "folder or a cached Hugging Face id, e.g. facebook/dinov2-base; never downloaded)")
    parser.add_argument("--repa-weight", type=float, default=0.5, help="the REPA term's weight (REPA's proj_coeff)")
    parser.add_argument("--repa-depth", type=int, default=None,
                        help="the block whose tokens REPA aligns (default: a third of the blocks, 4 of DiT-B's 12)")
    parser.add_argument("--steps", type=int, default=2000, help="probe optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64, help="probe global batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="probe AdamW learning rate (after a linear warm-up)")
    parser.add_argument("--warmup", type=int, default=100, help="probe warm-up steps")
    parser.add_argument("--eval-every", type=int, default=None, help="held-out loss every N steps (default: steps/10)")
    parser.add_argument("--timesteps", type=int, default=8, help="points of the held-out timestep grid")
    parser.add_argument("--samples", type=int, default=16, help="samples drawn from fixed noise, decoded and shown")
    parser.add_argument("--sample-steps", type=int, default=50, help="Euler steps per sample")
    parser.add_argument("--inception-weights", default=None, help="torch-fidelity's Inception file: gFID")
    parser.add_argument("--fid-samples", type=int, default=None, help="samples for gFID (default: --held-out)")
    parser.add_argument("--encode-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="images picked, probe init, data order, noise")
    parser.add_argument("--bf16", action="store_true", help="run the VAE in bf16")
    add_source_arguments(parser)
    args = parser.parse_args()
    for flag in ("--samples", "--steps", "--held-out", "--timesteps", "--sample-steps", "--seeds"):
        if getattr(args, flag[2:].replace("-", "_")) < 1:  # 0 timesteps give NaN figures, 0 steps the noise itself
            parser.error(f"{flag} must be at least 1")
    return args


def measure(vae, index: int, data, args, accelerator, out: Path, images: int) -> dict:
    """The probe's results for one VAE (:func:`first_stage.diffusability.probe_vae`), its latents cached
    and its samples saved beside the report (main process)."""
    result, shown = probe_vae(vae, accelerator, data, images, settings_from(args), args.inception_weights,
                              out / "latents" / f"vae{index}.safetensors", str(args.vae[index - 1]))
    if accelerator.is_main_process:
        grid_file = out / f"samples_vae{index}.png"
        half = len(shown) // 2
        save_rows([shown[:half], shown[half:2 * half]] if half and len(shown) % 2 == 0 else [shown], grid_file)
        result["samples"]["file"] = grid_file.name
    return result


def main():
    args = parse_args()
    accelerator = Accelerator()
    inputs = evaluation_inputs(args, accelerator)
    data, out, images, available = inputs.data, inputs.out, inputs.images, inputs.available
    entries = evaluate_each(args.vae, accelerator.device, lambda vae, index: measure(
        vae, index, data, args, accelerator, out, images), args.bf16, **inputs.load)
    if accelerator.is_main_process:
        rep = report("diffusability", data, entries, args.num_images, available)
        write_json(rep, out / "report.json")
        table = markdown_table(diffusability_rows(entries), [f"VAE {i + 1}" for i in range(len(entries))], "reference")
        r = entries[0]["results"]
        q = r["probe"]
        notes = [f"Probe: {q['name']} ({q['family']}, preset `{q['preset']}`, {q['parameters'] / 1e6:.2f} M "
                 f"parameters), flow matching with logit-normal t, {args.steps} steps of {args.batch_size} latents, "
                 f"lr {args.lr}, EMA {args.ema_decay} evaluated, {args.seeds} seed(s) from {args.seed} per "
                 f"normalisation; the same for every VAE. Latents: posterior {args.latents}. Ranking figure: the "
                 f"held-out loss / Gaussian reference per timestep, weighted by the logit-normal training density, "
                 f"on `{args.normalise[0]}`-normalised latents (mean ± sd over seeds). Held-out loss on "
                 f"{r['held_out_images']} images the probe never trained on"
                 f"{' (grouped by ' + repr(args.group_pattern) + ')' if args.group_pattern else ''}, at "
                 f"{args.timesteps} fixed timesteps with fixed noise. Gaussian reference: the optimal loss for "
                 "independent Gaussian latents of the same channel variances (below it = structure the probe uses). "
                 f"Deployed latents are flagged when their std is outside [1/{DEPLOYED_STD_TOLERANCE}, "
                 f"{DEPLOYED_STD_TOLERANCE}]. gFID: {r['gfid_note']}. Definitions: docs/diffusability.md.", ""]
        notes += [f"Normalisation, VAE {i + 1}, `{kind}`: {column['normalisation']['pipeline']}."
                  for i, e in enumerate(entries) for kind, column in e["results"]["columns"].items()] + [""]
        notes += [f"![{p.stem}]({p.name})" for p in diffusability_plots(entries, out)] + [""]
        notes += [f"Samples, VAE {i + 1} (Euler, {args.sample_steps} steps, fixed noise): "
                  f"![samples]({e['results']['samples']['file']})" for i, e in enumerate(entries)]
        write_markdown(out / "report.md", "Diffusability", rep, table, notes)
        accelerator.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and plots")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
