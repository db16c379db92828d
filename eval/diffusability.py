"""Diffusability of one or more VAEs: how well a small latent diffusion model learns their latents.

    python eval/diffusability.py --vae DIR [DIR ...] --data DATA_SPEC --num-images N --steps S --out OUT
    accelerate launch --num_processes 8 --mixed_precision bf16 eval/diffusability.py ...

For each VAE: encode the images once (posterior mean, or a seeded sample: --latents), normalise the
latents as a pipeline would (the VAE's exported scaling/shift factors, or per-channel statistics:
--normalise), cache them in OUT/latents/, hold out the last --held-out images of the pick, train the
same flow-matching probe (a diffusers UNet2DModel; same seed, data order and steps for every VAE) on
the rest, and report the held-out loss on a fixed timestep grid during and after training, samples
from fixed noise (decoded, with their latent statistics), gFID with --inception-weights, and the
cost. --vae and DATA_SPEC as in eval/latent_stats.py. Definitions and recipes: docs/diffusability.md.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import save_file

from first_stage.checkpoint import CheckpointError
from first_stage.config import ConfigError
from first_stage.data import DataError, calibration_batches, describe
from first_stage.diffusability import (PROBES, build_probe, gaussian_reference, held_out_loss, sample, seeded_normal,
                                       timestep_grid, train_probe)
from first_stage.evaluation import build_fid, evaluate_each, evaluation_data, images_to_measure
from first_stage.latent_stats import GAUSSIAN_TAIL
from first_stage.perceptual import LPIPSWeightsError
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
    parser.add_argument("--normalise", choices=["exported", "channel"], default="exported",
                        help="(z - shift_factor) * scaling_factor as pipelines do, or per-channel mean/std")
    parser.add_argument("--probe", choices=sorted(PROBES), default="tiny", help="probe size")
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
    parser.add_argument("--weights", choices=["ema", "raw"], default=None,
                        help="training checkpoints: EMA or raw weights (default: the run's export.weights)")
    parser.add_argument("--single-file-config", default=None, help="diffusers folder with the config of single files")
    parser.add_argument("--norm-num-groups", type=int, default=None)
    args = parser.parse_args()
    if args.samples < 1 or args.steps < 1 or args.held_out < 1:
        parser.error("--samples, --steps and --held-out must be at least 1")
    return args


@torch.no_grad()
def encode_all(vae, data, args, accelerator, held_from: int, fid) -> tuple[torch.Tensor, list[int], list[str]]:
    """Every process encodes its share of the pick; all get the latents (N, C, h, w) ordered by
    image id, the ids, and the skipped files. Images with id ≥ ``held_from`` (the held-out ones)
    also enter ``fid`` as real images, on the process that read them."""
    mine, skipped = [], []
    for batch in calibration_batches(data, args.num_images, args.encode_batch_size, seed=args.seed,
                                     rank=accelerator.process_index, world_size=accelerator.num_processes):
        skipped += batch["skipped_names"]
        if not batch["pixel_values"].shape[0]:
            continue
        x = batch["pixel_values"].to(vae.device)
        posterior = vae.encode(x.to(vae.dtype)).latent_dist
        z = posterior.mean.float().cpu()
        if args.latents == "sample":  # one sample per image, seeded by the image
            noise = torch.stack([seeded_normal(tuple(z.shape[1:]), args.seed, 4, i) for i in batch["ids"]])
            z = z + posterior.std.float().cpu() * noise
        mine += list(zip(batch["ids"], z))
        held = [k for k, i in enumerate(batch["ids"]) if i >= held_from]
        if fid is not None and held:
            fid.update((x[held].float() + 1) / 2, real=True)
    everything = sorted(gather_object(mine), key=lambda item: item[0])
    if not everything:
        raise DataError(f"no decodable image among the images picked of {describe(data)}")
    return torch.stack([z for _, z in everything]), [i for i, _ in everything], gather_object(skipped)


def normaliser(vae, train: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale), each (C, 1, 1): latents enter the probe as (z − shift) · scale."""
    c = train.shape[1]
    if kind == "exported":
        shift = torch.full((c, 1, 1), float(vae.config.shift_factor or 0.0))
        return shift, torch.full((c, 1, 1), float(vae.config.scaling_factor))
    mean = train.mean(dim=(0, 2, 3)).view(c, 1, 1)
    return mean, 1 / train.std(dim=(0, 2, 3)).clamp_min(1e-12).view(c, 1, 1)


def tail(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    """P(|ẑ| > 4) of latents (N, C, h, w) standardised by per-channel ``mean`` and ``std`` (C,)."""
    return ((x - mean.view(1, -1, 1, 1)).abs() > 4 * std.view(1, -1, 1, 1)).double().mean().item()


@torch.no_grad()
def draw_samples(probe, vae, shape, shift, scale, count: int, args, accelerator, fid) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``count`` latents from fixed noise (sample k from (seed, k)), split over processes;
    decode them; feed the decoded ones to ``fid`` as generated images. Returns, on every process,
    all sampled latents (count, C, h, w) and the first ``--samples`` decoded images."""
    mine = list(range(accelerator.process_index, count, accelerator.num_processes))
    drawn, shown = [], []
    for start in range(0, len(mine), args.batch_size):
        ks = mine[start:start + args.batch_size]
        noise = torch.stack([seeded_normal(shape, args.seed, 3, k) for k in ks]).to(accelerator.device)
        x = sample(probe, noise, args.sample_steps)
        images = vae.decode((x.cpu() / scale + shift).to(vae.device, vae.dtype)).sample.float()
        if fid is not None:
            fid.update((images.clamp(-1, 1) + 1) / 2, real=False)
        drawn += list(zip(ks, x.cpu()))
        shown += [(k, image.cpu()) for k, image in zip(ks, images) if k < args.samples]
    drawn, shown = (sorted(gather_object(items), key=lambda item: item[0]) for items in (drawn, shown))
    return torch.stack([x for _, x in drawn]), torch.stack([image for _, image in shown])


def measure(vae, index: int, data, args, accelerator, out: Path, images: int) -> dict:
    """Encode, split, normalise and cache; train the probe; evaluate and sample; the results on the main process."""
    wall = time.time()
    held_from = images - args.held_out  # ids are places in the random draw: the held-out ones are random
    if held_from < 1:
        raise DataError(f"{images} images of {describe(data)}: too few to hold out {args.held_out} and train on "
                        "the rest; lower --held-out or raise --num-images")
    fid = build_fid(args.inception_weights, accelerator.device)
    latents, ids, skipped = encode_all(vae, data, args, accelerator, held_from, fid)
    encode_seconds = time.time() - wall
    split = sum(i < held_from for i in ids)
    if split == 0 or split == len(ids):
        raise DataError(f"{describe(data)}: no decodable image left to {'train on' if split == 0 else 'hold out'}")
    shift, scale = normaliser(vae, latents[:split], args.normalise)
    normalised = (latents - shift) * scale
    train, held = normalised[:split], normalised[split:]
    train_ids, held_ids = ids[:split], ids[split:]
    if accelerator.is_main_process:
        (out / "latents").mkdir(parents=True, exist_ok=True)
        save_file({"train": train.contiguous(), "held_out": held.contiguous(), "train_ids": torch.tensor(train_ids),
                   "held_out_ids": torch.tensor(held_ids)}, out / "latents" / f"vae{index}.safetensors",
                  metadata={"vae": str(args.vae[index - 1]), "latents": args.latents, "normalise": args.normalise})

    # The probe: the same initial weights for every VAE and on every process.
    torch.manual_seed(args.seed)
    model = build_probe(tuple(train.shape[1:]), args.probe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    grid, curve = timestep_grid(args.timesteps), []
    evaluate = lambda step: curve.append((step, held_out_loss(model, held, held_ids, grid, args.seed,  # noqa: E731
                                                              args.batch_size, accelerator)))
    cost = train_probe(accelerator, model, optimizer, train, args.steps, args.batch_size, args.seed, evaluate,
                       args.eval_every or max(1, args.steps // 10), args.warmup)
    probe = accelerator.unwrap_model(model)
    accelerator.free_memory()  # the Accelerator lets go of this VAE's probe and optimiser

    # Samples from fixed noise, decoded with the VAE (and gFID: a collective, on every process).
    shape = tuple(train.shape[1:])
    count = max(args.samples, (args.fid_samples or len(held_ids)) if fid is not None else 0)
    drawn, shown = draw_samples(probe, vae, shape, shift, scale, count, args, accelerator, fid)
    gfid = fid.compute().item() if fid is not None else None
    if not accelerator.is_main_process:
        return {}
    grid_file = out / f"samples_vae{index}.png"
    half = len(shown) // 2
    save_rows([shown[:half], shown[half:2 * half]] if half and len(shown) % 2 == 0 else [shown], grid_file)
    gfid_note = (f"{count} samples against the {len(held_ids)} held-out images" if fid is not None
                 else "not measured: no --inception-weights")
    mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3))
    reference = gaussian_reference(train.var(dim=(0, 2, 3)), grid)
    final = curve[-1][1]
    return {
        "images": len(ids), "train_images": len(train_ids), "held_out_images": len(held_ids),
        "latent_shape": list(shape), "latents": args.latents,
        "normalisation": {"kind": args.normalise, "shift": shift.flatten().tolist(), "scale": scale.flatten().tolist(),
                          "std": train.std().item(), "channel_std": std.tolist()},
        "probe": {"preset": args.probe, "parameters": sum(p.numel() for p in probe.parameters()),
                  "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
        "held_out_loss": {"timesteps": grid.tolist(), "per_timestep": final.tolist(), "mean": final.mean().item(),
                          "gaussian_reference": reference.tolist(), "gaussian_reference_mean": reference.mean().item()},
        "curve": [{"step": step, "mean": loss.mean().item(), "per_timestep": loss.tolist()} for step, loss in curve],
        "samples": {"file": grid_file.name, "count": count, "std": drawn.std().item(),
                    "p_abs_gt_4": tail(drawn, mean, std), "real_std": held.std().item(),
                    "real_p_abs_gt_4": tail(held, mean, std), "gaussian_p_abs_gt_4": GAUSSIAN_TAIL[4]},
        "gfid": gfid, "gfid_note": gfid_note,
        "cost": {**cost, "encode_seconds": encode_seconds, "wall_seconds": time.time() - wall},
        "skipped_files": skipped,
    }


def main():
    args = parse_args()
    accelerator = Accelerator()
    data = evaluation_data(args.data)
    out = Path(args.out)
    images, available = images_to_measure(data, args.num_images, accelerator.print)
    load = dict(weights=args.weights, single_file_config=args.single_file_config, norm_num_groups=args.norm_num_groups)
    entries = evaluate_each(args.vae, accelerator.device, functools.partial(
        measure, data=data, args=args, accelerator=accelerator, out=out, images=images), args.bf16, **load)
    if accelerator.is_main_process:
        rep = report("diffusability", data, entries, args.num_images, available)
        write_json(rep, out / "report.json")
        table = markdown_table(diffusability_rows(entries), [f"VAE {i + 1}" for i in range(len(entries))], "reference")
        r = entries[0]["results"]
        notes = [f"Probe: diffusers UNet2DModel `{args.probe}` ({r['probe']['parameters'] / 1e6:.2f} M parameters), "
                 f"flow matching with logit-normal t, {args.steps} steps of {args.batch_size} latents, lr {args.lr}, "
                 f"seed {args.seed}; the same for every VAE. Latents: posterior {args.latents}, normalised by "
                 f"{args.normalise}. Held-out loss on {r['held_out_images']} images the probe never trained on, at "
                 f"{args.timesteps} fixed timesteps with fixed noise. Gaussian reference: the optimal loss for "
                 "independent Gaussian latents of the same channel variances (below it = structure the probe uses). "
                 f"gFID: {r['gfid_note']}. Definitions: docs/diffusability.md.", ""]
        notes += [f"![{p.stem}]({p.name})" for p in diffusability_plots(entries, out)] + [""]
        notes += [f"Samples, VAE {i + 1} (Euler, {args.sample_steps} steps, fixed noise): "
                  f"![samples]({e['results']['samples']['file']})" for i, e in enumerate(entries)]
        write_markdown(out / "report.md", "Diffusability", rep, table, notes)
        accelerator.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and plots")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ConfigError, DataError, LPIPSWeightsError, FileNotFoundError) as err:  # named causes
        sys.exit(f"error: {err}")
