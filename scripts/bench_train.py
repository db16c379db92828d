"""Training-step throughput against the device's peak and against a naive loop.

    python scripts/bench_train.py --config configs/sd_kl_f8.yaml --resolution 256 --batch 8 --precision bf16 --compile
    python scripts/bench_train.py --preset tiny --resolution 64 --batch 4            # CPU-sized
    accelerate launch --num_processes 8 scripts/bench_train.py ...                  # per-process and total rates

Times the library's training step, the one train/train.py runs (``first_stage.trainer.train_step``:
micro-batches, the skip on a non-finite loss, the learning-rate schedule, both optimisers, EMA, with
the config's ``performance`` switches) on one fixed batch, then, in the same process and on the same
images, a naive reference step: eager fp32 diffusers AutoencoderKL with the same loss terms (L1 +
LPIPS + KL + hinge GAN with the adaptive weight, then the discriminator step) and none of the
optimisations. Prints one JSON line a result and a table. FLOPs are counted with
``torch.utils.flop_counter`` on one eager step of each; MFU = FLOPs of our step x images/s / the
device's peak (with gradient checkpointing the count includes the recomputed forward). The naive
step counts more FLOPs: its generator backward also computes the discriminator's weight gradients.
Without LPIPS weights on disk the VGG16 trunk gets random weights: the same cost, so the timing holds
(the output says so). ``--loss full`` (default)
switches the discriminator on from step 0, so every term is in the step. With ``train.grad_accum`` > 1
each timed step is a whole accumulation window, and the figures are per micro-batch of ``--batch`` images.
``--terms`` and ``--presets`` add rows in the same run, each against the plain step: one X-regulariser
added, or another model preset (e.g. ``--presets flux2``: the FLUX.2 class against the recipe's sd-f8c4),
with their counted FLOPs and time over the plain step's. ``--students`` adds distillation rows: the recipe's
model, freshly initialised and saved, is the frozen teacher (first_stage.teacher) of each student, a preset with
optional decoder widths (``flux2:96-192-384-384``: FLUX.2's small decoder; ``taesd``: an AutoencoderTiny with the
teacher's latent channels); each row also has the student's decode cost against the teacher's
(``first_stage.teacher.distillation_report``). A term whose rows need a teacher (``teacher.path=@teacher``, e.g.
the fp16-safe fine-tune) gets the same stand-in.

``--e2e`` adds the end-to-end step (section ``e2e``, REPA-E: first_stage/e2e.py) of the same recipe against its
plain VAE step (``e2e.enabled`` off), in the same run, and breaks it into its parts, each counted and timed alone
as the step runs it: the VAE step (the plain step), the vision model's forward, the align pass (forward through
the frozen transformer to ``e2e.encoder_depth`` and the backward to the latent) and the transformer step (forward
and backward on the detached latent); the optimiser steps, EMA and clipping are the step's time the parts leave.
The vision model is ``--vision-model``, else ``e2e.model`` when it loads, else a random DINOv2 of its size
(``--vision-standin``) written to a temporary folder: the FLOPs are the real model's, the weights random. The row
also estimates the GPU-hours of the recipe's run from the counted FLOPs (``--estimate-gpus``, ``--estimate-mfu``).
With ``--loss full`` the discriminator's pre-training (``discriminator.pretrain_steps``) is off, so every timed
step is a whole step.
"""

import argparse
import dataclasses
import functools
import itertools
import json
import os
import resource
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from first_stage.checkpoint import build_autoencoder
from first_stage.alignment import DINOV2_SIZES, AlignmentModelError, load_foundation_model, save_standin_dinov2
from first_stage.config import load_config, with_overrides
from first_stage.data import make_dataloader
from first_stage.dit import DIT_NAMES, DIT_SIZES
from first_stage.discriminator import build_discriminator, discriminator_loss
from first_stage.loss_term import StepDraw, adaptive_weight
from first_stage.model import PRESETS, has_batch_norm, new_autoencoder, preset_class
from first_stage.teacher import TEACHER_STANDIN, distillation_report, student_spec
from first_stage.lifecycle import run_main
from first_stage.perceptual import LPIPS, LPIPSWeightsNotFound, VGG16_FILENAME, resolve_vgg16_weights
from first_stage.performance import count_flops, seconds_per_call, synchronize
from first_stage.terms import bench_rows
from first_stage.trainer import (TrainingState, accelerator_options, build_parts, compile_step, forward_plan,
                                 posterior_noise, train_step)

# Dense peak TFLOP/s by device name and compute precision (vendor datasheets, no sparsity).
GPU_PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51},
    "H100": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
    "H200": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
    "A100": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
    "L40S": {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6},
}
# Each loss term alone, added to the recipe (--terms): the rows the terms declare (first_stage.terms).
TERMS = bench_rows()
# The random DINOv2 of --alignment-standin: the real sizes, and a toy one for the CPU smoke run.
STANDINS = {**DINOV2_SIZES, "test": (64, 2, 2)}
# CPU peak assumption: two 256-bit FMA pipes per core = 32 fp32 FLOP per cycle.
CPU_FLOP_PER_CYCLE = 32
# The GPU-hour estimate of an --e2e row: an H100 SXM's dense bf16 peak (GPU_PEAK_TFLOPS' datasheet figure).
ESTIMATE_PEAK = ("H100 SXM datasheet, dense bf16", GPU_PEAK_TFLOPS["H100"]["bf16"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML recipe (default: the package defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--preset", default=None, help=f"model.preset ({', '.join(PRESETS)})")
    parser.add_argument("--resolution", type=int, default=None, help="crop side (default: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="images per process (default: the config's)")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default=None, help="train.mixed_precision")
    parser.add_argument("--compile", action="store_true", help="performance.compile=true")
    parser.add_argument("--loss", choices=["full", "config"], default="full",
                        help="full: LPIPS and the discriminator on from step 0; config: as the recipe says")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference step")
    parser.add_argument("--find-max-batch", action="store_true", help="CUDA: the largest batch that fits")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--json", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--terms", default="", help="comma list of X-regularisers to cost one by one against the "
                        f"plain step, in the same run: {','.join(TERMS)}")
    parser.add_argument("--presets", default="", help="comma list of model presets to cost against the plain step, in "
                        "the same run (e.g. flux2 against the recipe's sd-f8c4)")
    parser.add_argument("--students", default="", help="comma list of distillation students of the recipe's model, "
                        "each a preset with optional decoder widths: flux2:96-192-384-384,taesd")
    parser.add_argument("--flop-steps", type=int, default=1,
                        help="steps whose counted FLOPs are averaged (the equivariance transform differs per step)")
    parser.add_argument("--alignment-standin", choices=sorted(STANDINS), default="large",
                        help="the random DINOv2 used when alignment.model is not on disk (same cost)")
    parser.add_argument("--e2e", action="store_true", help="also the end-to-end step (section e2e, REPA-E) against "
                        "the plain step of the same recipe, with the counted FLOPs and time of each of its parts")
    parser.add_argument("--vision-model", default=None,
                        help="--e2e: the vision model (a local folder; default: e2e.model when it loads)")
    parser.add_argument("--vision-standin", choices=sorted(STANDINS), default=None,
                        help="--e2e: the random DINOv2 used when no vision model loads (default: the size e2e.model "
                        "names; same cost)")
    parser.add_argument("--transformer", choices=sorted(DIT_SIZES), default=None,
                        help="--e2e: e2e.transformer, the diffusion transformer's size (default: the recipe's)")
    parser.add_argument("--estimate-gpus", type=int, default=8, help="--e2e: the GPUs of the estimated run: global "
                        "batch = the recipe's train.batch_size x grad_accum x this")
    parser.add_argument("--estimate-mfu", type=float, default=0.3,
                        help="--e2e: the model FLOP utilisation assumed for the GPU-hour estimate")
    return parser.parse_args()


def bench_config(args, vgg_file: Path):
    """The recipe with the command line's settings; LPIPS from ``vgg_file`` when none is on disk."""
    overrides = list(args.set)
    for key, value in (("model.preset", args.preset), ("data.resolution", args.resolution),
                       ("train.batch_size", args.batch), ("train.mixed_precision", args.precision)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.compile:
        overrides.append("performance.compile=true")
    if args.loss == "full":
        overrides += ["loss.perceptual_weight=1.0", "discriminator.enabled=true", "discriminator.start=0",
                      "discriminator.warmup_steps=0", "discriminator.pretrain_steps=0"]
    config = load_config(args.config, overrides)
    if config.loss.perceptual_weight == 0:
        return config, "off"
    try:
        resolve_vgg16_weights(config.loss.lpips_weights, download=config.loss.lpips_download)
        lpips = "trained weights"
    except LPIPSWeightsNotFound:
        trunk = {k: v for k, v in LPIPS().state_dict().items() if k.startswith("features.")}
        torch.save(trunk, vgg_file)
        config = load_config(args.config, overrides + [f"loss.lpips_weights={vgg_file}", "loss.lpips_download=false"])
        lpips = "random VGG16 trunk (no weights on disk; same cost)"
    return config, lpips


def model_or_standin(name: str, size: str | None, folder: Path) -> tuple[str, str]:
    """The vision model ``name`` when it loads, else a random DINOv2 of ``size`` saved to ``folder`` (the
    model's own error when there is no size): (the model to use, what the rows say about it)."""
    try:
        load_foundation_model(name)
        return name, name
    except AlignmentModelError:
        if size is None:
            raise
    save_standin_dinov2(folder, *STANDINS[size])
    cost = ("the FLOPs equal the real model's, the weights are random" if size in DINOV2_SIZES
            else "a toy size, NOT the cost of a real DINOv2")
    return str(folder), f"random DINOv2-{size} ({name} not on disk; {cost})"


def alignment_model(config, size: str, folder: Path) -> tuple[list[str], str]:
    """``alignment.model`` as given when it loads, else a random DINOv2 of ``size`` saved to ``folder``:
    (the override to use, what the rows say about it)."""
    model, note = model_or_standin(config.alignment.model, size, folder)
    return ([] if model == config.alignment.model else [f"alignment.model={model}"]), note


def student_overrides(spec: str, teacher_channels: int) -> list[str]:
    """The overrides of a ``--students`` entry (``first_stage.teacher.student_spec``): the student trains onto the
    stand-in teacher; a KL-class student takes its encoder and trains its decoder."""
    preset, overrides = student_spec(spec, teacher_channels)
    tiny = preset_class(preset) == "AutoencoderTiny"  # trains its encoder onto the teacher's latents too
    return [f"model.preset={preset}", f"teacher.path='{TEACHER_STANDIN}'", f"model.overrides={json.dumps(overrides)}",
            f"model.trainable={'all' if tiny else 'decoder'}", f"teacher.latent_weight={1 if tiny else 0}"]


def with_teacher(config, overrides: list[str], folder: Path) -> list[str]:
    """``overrides`` with the stand-in teacher (the recipe's model, fresh, saved to ``folder`` once) in place of
    :data:`TEACHER_STANDIN`."""
    if not any(TEACHER_STANDIN in o for o in overrides):
        return overrides
    if not folder.exists():
        torch.manual_seed(config.train.seed)
        new_autoencoder(config.model).save_pretrained(folder)
    return [o.replace(TEACHER_STANDIN, str(folder)) for o in overrides]


def vision_model(config, given: str | None, standin: str | None, folder: Path) -> tuple[str, str]:
    """The e2e vision model: ``given``, else ``e2e.model`` when it loads, else a random DINOv2 of ``standin`` (or of
    the size ``e2e.model`` names) saved to ``folder``: (what ``e2e.model`` is set to, what the rows say about it)."""
    if given is not None:
        load_foundation_model(given)  # refused here, naming it, rather than at the step's build
        return given, given
    name = config.e2e.model
    size = standin or next((s for s in DINOV2_SIZES if s in name.lower()), None)
    try:
        return model_or_standin(name, size, folder)
    except AlignmentModelError:
        raise SystemExit(f"--e2e: e2e.model {name!r} is not on disk and names no DINOv2 size "
                         f"({', '.join(DINOV2_SIZES)}); pass --vision-model or --vision-standin") from None


def e2e_overrides(config, vision: str, transformer: str | None) -> list[str]:
    """The overrides that turn the recipe's end-to-end tuning on with ``vision`` as its vision model: the
    transformer of ``--transformer``, and for an AutoencoderKL the per-channel export the e2e step requires."""
    overrides = ["e2e.enabled=true", f"e2e.model={vision}"]
    if transformer is not None:
        overrides.append(f"e2e.transformer={transformer}")
    if not has_batch_norm(new_autoencoder(config.model)) and config.export.latent_norm != "per_channel":
        overrides.append("export.latent_norm=per_channel")
    return overrides


def align_pass(e2e, z: torch.Tensor, images: torch.Tensor, plan) -> None:
    """The align pass alone (``E2ETerm.loss``: the frozen transformer to ``e2e.encoder_depth``, the projector, REPA's
    loss) and its backward to a copy of the latent ``z``: where the VAE step's own backward takes over."""
    latent = z.clone().requires_grad_()
    loss, _ = e2e.loss(SimpleNamespace(z=latent, inputs=images, target=images), SimpleNamespace(plan=plan))
    loss.backward()


def transformer_step(parts, z: torch.Tensor, plan) -> None:
    """The transformer step alone: its loss on the detached latent ``z``, forward and backward (its gradients are
    then cleared; the optimiser does not step)."""
    loss, _ = parts.e2e.transformer_loss(parts.transformer, z, plan.diffusion)
    parts.transformer_scaler.scale(loss).backward()
    parts.transformer_optimizer.zero_grad(set_to_none=True)


def e2e_part_steps(accelerator, parts, config, images: torch.Tensor) -> dict:
    """The e2e step's parts beyond the VAE step, each a call that runs it alone as ``trainer.micro_step`` does, on
    one micro-batch of ``images`` and its posterior sample: the vision model's forward (no graph),
    :func:`align_pass` and :func:`transformer_step`."""
    e2e, tcfg = parts.e2e, config.train
    shape = parts.latent_shape(images.shape[-1])
    plan = forward_plan(parts, StepDraw(tcfg.seed, 0, 0, images.shape[0], shape, images.device))
    noise = posterior_noise(tcfg.seed, 0, 0, accelerator, images.shape[0], images.shape[0], shape)
    with torch.no_grad():
        z = parts.model(images, noise, plan).z.detach()  # (B, C, h, w), what both passes start from
    plan.diffusion.tokens = e2e.vision_tokens(images)
    return {"vision_model": functools.partial(e2e.vision_tokens, images),
            "align_pass": functools.partial(align_pass, e2e, z, images, plan),
            "transformer_step": functools.partial(transformer_step, parts, z, plan)}


def e2e_breakdown(accelerator, parts, config, images: torch.Tensor, plain: dict, e2e: dict, args) -> dict:
    """Counted FLOPs and time per image of each part of the e2e step: the VAE step (the ``plain`` measurement),
    the vision model, the align pass and the transformer step (:func:`e2e_part_steps`), against the whole ``e2e``
    step's; the parts' FLOPs must add up to the step's (``flops_parts_over_step``), their times leave the optimiser
    steps, clipping, EMA and BatchNorm to ``unattributed``."""
    n = images.shape[0]
    rows = {"vae_step": {"gflop_per_image": plain["flops"] / n / 1e9, "seconds_per_image": plain["seconds"] / n}}
    for name, step in e2e_part_steps(accelerator, parts, config, images).items():
        flops = count_flops(step)
        seconds = seconds_per_call(step, args.steps, max(args.warmup, 1), images.device)
        rows[name] = {"gflop_per_image": flops / n / 1e9, "seconds_per_image": seconds / n}
    total_flops, total_seconds = e2e["flops"] / n / 1e9, e2e["seconds"] / n
    for row in rows.values():
        row["flops_share"] = row["gflop_per_image"] / total_flops
    parts_flops = sum(r["gflop_per_image"] for r in rows.values())
    parts_seconds = sum(r["seconds_per_image"] for r in rows.values())
    return {"parts": rows, "gflop_per_image": total_flops, "seconds_per_image": total_seconds,
            "flops_parts_over_step": parts_flops / total_flops,
            "unattributed_seconds_per_image": total_seconds - parts_seconds}


def gpu_hours_estimate(recipe, gflop_per_image: float, plain_gflop_per_image: float, args) -> dict:
    """GPU-hours of ``recipe``'s run from counted FLOPs per image: global batch (train.batch_size x grad_accum x
    ``--estimate-gpus``) x its VAE steps (max_steps less the discriminator's pre-training, whose steps are left
    out) x FLOPs per image / (an H100 SXM's dense bf16 peak x ``--estimate-mfu``)."""
    tcfg = recipe.train
    batch = tcfg.batch_size * tcfg.grad_accum * args.estimate_gpus
    steps = tcfg.max_steps - recipe.discriminator.pretrain_steps
    source, peak = ESTIMATE_PEAK
    hours_per_gflop = 1e9 * batch * steps / (peak * 1e12 * args.estimate_mfu) / 3600
    return {"gpus": args.estimate_gpus, "global_batch": batch, "steps": steps, "resolution": recipe.data.resolution,
            "peak_tflops": peak, "peak_source": source, "mfu_assumed": args.estimate_mfu,
            "pflop_per_step": gflop_per_image * batch / 1e6, "gpu_hours": gflop_per_image * hours_per_gflop,
            "wall_hours": gflop_per_image * hours_per_gflop / args.estimate_gpus,
            "plain_step_gpu_hours": plain_gflop_per_image * hours_per_gflop}


def print_e2e_parts(row: dict) -> None:
    """The parts of an --e2e row, a line each."""
    print(f"e2e step ({row['transformer']}, align at block {row['encoder_depth']}; vision model: "
          f"{row['vision_model']}):")
    print("part | gflop_per_image | flops_share | seconds_per_image")
    for name, part in row["e2e_parts"]["parts"].items():
        print(f"{name} | {part['gflop_per_image']:.4g} | {part['flops_share']:.3f} | {part['seconds_per_image']:.4g}")
    whole = row["e2e_parts"]
    print(f"whole e2e step | {whole['gflop_per_image']:.4g} | {whole['flops_parts_over_step']:.4f} (parts/step) | "
          f"{whole['seconds_per_image']:.4g} ({whole['unattributed_seconds_per_image']:.3g} s unattributed)")
    estimate = row["gpu_hours_estimate"]
    print(f"estimate: {estimate['gpu_hours']:.4g} GPU-hours ({estimate['wall_hours']:.3g} h on {estimate['gpus']}) for "
          f"{estimate['steps']} steps of {estimate['global_batch']} images at {estimate['resolution']}², "
          f"{estimate['peak_source']} {estimate['peak_tflops']} TFLOP/s x MFU {estimate['mfu_assumed']:g} "
          f"(the plain VAE step: {estimate['plain_step_gpu_hours']:.4g})")


def fixed_batch(config, batch: int, device) -> torch.Tensor:
    """``batch`` decoded images of the recipe's data (repeated when there are fewer), (B,3,R,R)."""
    loader = make_dataloader(config.data, 1, seed=config.train.seed, shuffle=False, drop_last=False)
    images = []
    while len(images) < batch:
        if not any(len(b["pixel_values"]) for b in loader):
            raise ValueError(f"no decodable image in {config.data}")
        for b in loader:
            images.extend(b["pixel_values"])
            if len(images) == batch:
                break
    return torch.stack(images).to(device)


def real_step(accelerator, parts, config, state: TrainingState, images: torch.Tensor) -> None:
    """One optimiser step of the library's trainer on ``images`` (every micro-batch of the window)."""
    batch = {"pixel_values": images, "skipped": 0, "upsized": 0}
    train_step(accelerator, parts, config, state, itertools.repeat(batch))


class NaiveStep:
    """The reference: eager fp32 AutoencoderKL, the same loss terms written plainly, plain AdamW."""

    def __init__(self, config, lpips, device):
        torch.manual_seed(config.train.seed)
        self.cfg = config
        self.vae = build_autoencoder(config.model).to(device).train()
        self.lpips = lpips
        self.disc = build_discriminator(config.discriminator).to(device) if config.discriminator.enabled else None
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=config.optimizer.lr, betas=config.optimizer.betas)
        if self.disc is not None:
            self.dopt = torch.optim.AdamW(self.disc.parameters(), lr=config.optimizer.lr, betas=config.optimizer.betas)

    def __call__(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        rec = (x - reconstruction).abs()
        if self.lpips is not None:
            rec = rec + cfg.loss.perceptual_weight * self.lpips(x, reconstruction)
        nll = rec.sum() / x.shape[0]
        loss = nll + cfg.regularizer.kl_weight * posterior.kl().mean()
        if self.disc is not None:
            g_loss = -self.disc(reconstruction).mean()
            last_layer = self.vae.decoder.conv_out.weight
            weight = adaptive_weight(nll, g_loss, last_layer, cfg.discriminator.adaptive_weight_max)
            loss = loss + cfg.discriminator.weight * weight * g_loss
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.disc is not None:
            self.dopt.zero_grad()
            discriminator_loss(self.disc(x), self.disc(reconstruction.detach()), "hinge").backward()
            self.dopt.step()


def real_steps(accelerator, parts, config, state: TrainingState, images: torch.Tensor, count: int) -> None:
    """``count`` consecutive real steps on ``images``."""
    for _ in range(count):
        real_step(accelerator, parts, config, state, images)


def peak_tflops(device, precision: str, tf32: bool, given: float | None) -> tuple[float, str]:
    """The device's dense peak for the step's compute precision, and where the figure comes from."""
    if given is not None:
        return given, "--peak-tflops"
    kind = precision if precision in ("bf16", "fp16") else "tf32" if tf32 else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in GPU_PEAK_TFLOPS.items():
            if key in name:
                return table[kind], f"{key} datasheet, dense {kind}"
        return float("nan"), f"unknown GPU {name!r}: pass --peak-tflops"
    mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    cores = len(os.sched_getaffinity(0))
    return cores * mhz * 1e6 * CPU_FLOP_PER_CYCLE / 1e12, (
        f"assumed: {cores} cores x {mhz:.0f} MHz x {CPU_FLOP_PER_CYCLE} fp32 FLOP/cycle")


def peak_memory_gib(device) -> tuple[float, str]:
    """Peak memory of this process: CUDA allocations, or on the CPU the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (whole process)"


def largest_batch(fits, start: int, limit: int = 4096) -> int:
    """The largest batch size for which ``fits(batch)`` holds: doubling from ``start``, then bisection.
    0 when even ``start`` does not fit."""
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None and good < limit:
        if fits(good * 2):
            good *= 2
        else:
            bad = good * 2
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def batch_fits(accelerator, parts, config, batch: int, images: torch.Tensor) -> bool:
    """Whether two real steps at ``batch`` run without a CUDA out-of-memory error."""
    x = images[:1].expand(batch, -1, -1, -1).contiguous()
    try:
        for _ in range(2):
            real_step(accelerator, parts, config, TrainingState(), x)
        synchronize(images.device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.disc_optimizer is not None:
            parts.disc_optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def measure(accelerator, config, images: torch.Tensor, args) -> dict:
    """The library's step for ``config`` on ``images``: FLOPs counted on eager modules (the mean over
    ``--flop-steps`` steps), then compiled when asked, warmed up and timed, per micro-batch."""
    pcfg, tcfg = config.performance, config.train
    eager = dataclasses.replace(config, performance=dataclasses.replace(pcfg, compile=False))
    torch.manual_seed(tcfg.seed)
    parts = build_parts(eager, accelerator)
    state = TrainingState()  # the step advances, so the lr schedule (and any per-step draw) runs as in training
    flops = count_flops(real_steps, accelerator, parts, config, state, images, args.flop_steps)
    flops = flops / args.flop_steps / tcfg.grad_accum
    if pcfg.compile:
        compile_step(config, parts.raw_model.vae, parts.loss_fn.perceptual, parts.raw_discriminator)
    counters = torch._dynamo.utils.counters["stats"]
    for _ in range(args.warmup):
        real_step(accelerator, parts, config, state, images)
    graphs_before = counters["unique_graphs"]
    if images.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(images.device)
    seconds = seconds_per_call(real_step, args.steps, 0, images.device, accelerator, parts, config, state,
                               images) / tcfg.grad_accum
    memory, memory_kind = peak_memory_gib(images.device)
    return {"parts": parts, "flops": flops, "seconds": seconds, "memory": memory, "memory_kind": memory_kind,
            "recompiles": counters["unique_graphs"] - graphs_before, "skipped_steps": state.skipped_steps}


def with_rates(row: dict, seconds: float, batch: int, flops_per_image: float, peak: float) -> dict:
    """``row`` with the rates of a step of ``batch`` images taking ``seconds`` on each process: steps/s,
    images/s per process, over all processes and each, GFLOP per image, MFU against ``peak`` TFLOP/s."""
    per_process = batch / seconds
    rates = gather_object([per_process])
    return {**row, "steps_s": 1 / seconds, "img_s_per_process": per_process, "img_s_total": sum(rates),
            "img_s_each_process": rates, "gflop_per_image": flops_per_image / 1e9,
            "mfu": per_process * flops_per_image / (peak * 1e12)}


def print_table(rows: list[dict]) -> None:
    columns = ["step", "processes", "batch", "resolution", "precision", "img_s_total", "img_s_per_process",
               "steps_s", "peak_mem_gib", "gflop_per_image", "mfu", "speedup", "cost_vs_plain", "flops_vs_plain"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns))


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config, lpips_note = bench_config(args, Path(tmp) / VGG16_FILENAME)
        accelerator = Accelerator(**accelerator_options(config.train))
        device = accelerator.device
        tcfg, pcfg = config.train, config.performance
        terms = [t for t in args.terms.split(",") if t]
        unknown = [t for t in terms if t not in TERMS]
        if unknown:
            raise SystemExit(f"--terms: unknown {unknown}; choose from {list(TERMS)}")
        e2e = args.e2e or "e2e" in terms  # --terms e2e is the --e2e row: its vision model and its parts
        terms = [t for t in terms if t != "e2e"]
        if config.e2e.enabled and not e2e:
            raise SystemExit("the recipe turns e2e.enabled on: pass --e2e (its step is timed against the plain step)")
        config = with_overrides(config, ["e2e.enabled=false"]) if config.e2e.enabled else config  # the plain step
        presets = [p for p in args.presets.split(",") if p]
        unknown = [p for p in presets if p not in PRESETS]
        if unknown:
            raise SystemExit(f"--presets: unknown {unknown}; choose from {sorted(PRESETS)}")
        # the rows after the plain step: (step name, overrides, the key naming what differs)
        variants = [(f"first-stage + {t}", TERMS[t], "term_overrides") for t in terms]
        variants += [(f"first-stage preset {p}", [f"model.preset={p}"], "preset_overrides") for p in presets]
        channels = new_autoencoder(config.model).config.latent_channels
        variants += [(f"distill {s}", student_overrides(s, channels), "student_overrides")
                     for s in args.students.split(",") if s]
        vision_note = None
        if e2e:
            vision, vision_note = vision_model(config, args.vision_model, args.vision_standin, Path(tmp) / "vision")
            variants.append(("first-stage + e2e", e2e_overrides(config, vision, args.transformer), "e2e_overrides"))
        align_note = None
        if config.alignment.enabled or any("alignment.enabled=true" in TERMS[t] for t in terms):
            align_override, align_note = alignment_model(config, args.alignment_standin, Path(tmp) / "dinov2")
            config = with_overrides(config, align_override)
        images = fixed_batch(config, tcfg.batch_size, device)
        measured = measure(accelerator, config, images, args)
        parts, real_flops, seconds, memory = (measured[k] for k in ("parts", "flops", "seconds", "memory"))
        recompiles, memory_kind = measured["recompiles"], measured["memory_kind"]

        results = []
        peak, peak_source = peak_tflops(device, tcfg.mixed_precision, pcfg.tf32, args.peak_tflops)
        common = {"bench": "train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "processes": accelerator.num_processes, "batch": images.shape[0], "resolution": images.shape[-1],
                  "preset": config.model.preset, "loss": args.loss, "lpips": lpips_note,
                  "discriminator": config.discriminator.enabled, "peak_tflops": peak, "peak_source": peak_source,
                  "memory_kind": memory_kind, "alignment_model": align_note}
        real = {**common, "step": "first-stage", "precision": tcfg.mixed_precision,
                "performance": {k: getattr(pcfg, k) for k in pcfg.__dataclass_fields__},
                "seconds_per_step": seconds, "recompiles_while_timed": recompiles if pcfg.compile else None,
                "grad_accum": tcfg.grad_accum, "skipped_steps": measured["skipped_steps"],
                "gflop_per_image_counted": real_flops / images.shape[0] / 1e9, "peak_mem_gib": memory}

        naive_seconds = naive_flops = None
        if not args.no_naive:
            naive = NaiveStep(config, parts.loss_fn.perceptual, device)
            naive_flops = count_flops(naive, images)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            naive_seconds = seconds_per_call(naive, args.steps, args.warmup, device, images)
            # The CPU figure is the process's peak resident set, which our step already set.
            naive_memory = peak_memory_gib(device)[0] if device.type == "cuda" else None
        model_flops = real_flops / images.shape[0]
        rows = [(real, seconds)]
        if not args.no_naive:
            rows.append(({**common, "step": "naive", "precision": "no", "seconds_per_step": naive_seconds,
                          "gflop_per_image_counted": naive_flops / images.shape[0] / 1e9,
                          "peak_mem_gib": naive_memory}, naive_seconds))
        for row, secs in rows:
            results.append(with_rates(row, secs, images.shape[0], model_flops, peak))
        if naive_seconds is not None:
            results[0]["speedup"] = naive_seconds / seconds

        # Each X-regulariser alone against the plain step, same process, same images. The plain step
        # is timed again after them: the first timing of a process runs on a colder machine, so the
        # reference is the mean of both (both are reported).
        plain_seconds = seconds
        if variants:
            del parts
            again = measure(accelerator, config, images, args)
            parts = again["parts"]
            results[0]["seconds_per_step_again"] = again["seconds"]
            plain_seconds = (seconds + again["seconds"]) / 2
        for step, overrides, key in variants:
            overrides = with_teacher(config, overrides, Path(tmp) / "teacher")
            variant_config = with_overrides(config, overrides)
            del parts
            m = measure(accelerator, variant_config, images, args)
            parts = m["parts"]
            variant_flops = m["flops"] / images.shape[0]
            row = {**common, "step": step, "preset": variant_config.model.preset, "precision": tcfg.mixed_precision,
                   key: overrides, "seconds_per_step": m["seconds"], "skipped_steps": m["skipped_steps"],
                   "peak_mem_gib": m["memory"], "gflop_per_image_counted": variant_flops / 1e9,
                   "cost_vs_plain": m["seconds"] / plain_seconds, "flops_vs_plain": m["flops"] / real_flops}
            if key == "student_overrides":  # what the trained decoder costs at inference against the teacher's
                row["decode"] = distillation_report(parts.raw_model.vae.eval(), parts.teacher, images[:1])
            if key == "e2e_overrides":  # the step's parts, and what the recipe's whole run costs
                plain = {"flops": real_flops, "seconds": plain_seconds}
                row.update(transformer=DIT_NAMES[variant_config.e2e.transformer],
                           encoder_depth=variant_config.e2e.encoder_depth, vision_model=vision_note,
                           e2e_parts=e2e_breakdown(accelerator, parts, variant_config, images, plain, m, args))
                recipe = load_config(args.config, args.set)
                row["gpu_hours_estimate"] = {
                    **gpu_hours_estimate(recipe, row["e2e_parts"]["gflop_per_image"], model_flops / 1e9, args),
                    "counted_at_resolution": images.shape[-1]}
            results.append(with_rates(row, m["seconds"], images.shape[0], variant_flops, peak))

        if args.find_max_batch:
            if device.type != "cuda":
                raise SystemExit("--find-max-batch needs a CUDA device (CPU memory is not the limit worth finding)")
            results[0]["max_batch"] = largest_batch(
                lambda b: batch_fits(accelerator, parts, config, b, images), images.shape[0])

        if accelerator.is_main_process:
            lines = [json.dumps(r) for r in results]
            print("\n".join(lines))
            if args.json:
                with open(args.json, "a") as f:
                    f.write("\n".join(lines) + "\n")
            print_table(results)
            for row in results:
                if "e2e_parts" in row:
                    print_e2e_parts(row)
        accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_main(main)
