"""Train a KL autoencoder (diffusers' AutoencoderKL) under Hugging Face Accelerate.

    accelerate launch train/train.py [--config configs/X.yaml] [--set section.key=value ...] [--resume latest|PATH]

With no arguments it runs configs/quickstart.yaml. Everything lands in <output_dir>/<run_name>/.
Exit codes: 0 done; 1 error; 2 stopped after too many consecutive non-finite losses (a checkpoint is
saved); 143 / 130 stopped by SIGTERM / SIGINT after saving a checkpoint (resume with --resume latest).
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from first_stage.config import config_hash, load_config, save_config, to_yaml
from first_stage.data import calibration_batches, describe, make_dataloader
from first_stage.discriminator import build_discriminator, load_discriminator
from first_stage.export import SINGLE_FILE_NAME, export_autoencoder
from first_stage.losses import GeneratorLoss, discriminator_step_loss
from first_stage.model import AutoencoderWrapper, build_autoencoder, count_parameters, set_trainable
from first_stage.perceptual import LPIPSWeightsNotFound, load_lpips
from first_stage.performance import (adamw, compile_in_place, compiled_parts, prepare_autoencoder, set_memory_format,
                                     set_tf32, to_memory_format)
from first_stage.regularizers import build_regularizer
from first_stage.training import (AUTOENCODER_CONFIG, CHECKPOINT_PREFIX, TrainingState, checkpoint_dirs, latent_batch_stats, lr_factor,
                                  resolve_resume, save_grid, set_lr)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
EXIT_NONFINITE = 2
STOP_SIGNALS = {signal.SIGTERM: 143, signal.SIGINT: 130}
# Test hook for the fault-handling path: optimiser steps whose loss is replaced by NaN, e.g. "3,4".
INJECT_NONFINITE = {int(s) for s in os.environ.get("FIRST_STAGE_INJECT_NONFINITE", "").split(",") if s}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML recipe (default: quickstart)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. loss.kl_weight=1e-6")
    parser.add_argument("--resume", default=None, metavar="latest|PATH", help="continue from a checkpoint")
    return parser.parse_args()


def build_perceptual(cfg, accelerator):
    """The frozen LPIPS network, or None when its weights are missing and the config says "warn"."""
    if cfg.perceptual_weight == 0:
        return None
    try:
        return load_lpips(cfg.lpips_weights, download=cfg.lpips_download).to(accelerator.device)
    except LPIPSWeightsNotFound as err:
        if cfg.lpips_missing == "error":
            raise
        accelerator.print(f"\n{'!' * 78}\nWARNING: training WITHOUT the LPIPS perceptual term "
                          f"(loss.lpips_missing=warn).\n{err}\n{'!' * 78}\n")
        return None


def infinite_batches(dataloader, accelerator, micro_batches_done: int, streaming: bool):
    """Yield batches forever, epoch after epoch, starting after ``micro_batches_done`` batches.

    A stream has no length: a resumed streaming run starts a new, reshuffled pass (epoch number =
    batches done) instead of continuing mid-epoch.
    """
    if streaming:
        epoch = micro_batches_done
        while True:
            dataloader.dataset.set_epoch(epoch)
            for batch in dataloader:
                yield {**batch, "pixel_values": batch["pixel_values"].to(accelerator.device)}
            epoch += 1
    epoch, skip = divmod(micro_batches_done, len(dataloader))
    while True:
        dataloader.set_epoch(epoch)
        dataloader.dataset.set_epoch(epoch)  # crops and flips are seeded by (seed, epoch, index)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in loader:
            yield batch
        epoch, skip = epoch + 1, 0


def posterior_noise(seed: int, step: int, micro: int, accelerator, batch: int, n: int, latent_shape) -> torch.Tensor:
    """N(0, I) noise for this process's ``n`` images of the step, (n, C, h, w).

    Each image's noise comes from its own generator, seeded by (seed, step, its place in the step's
    global batch in the order the data is sharded), so a run draws the same noise per image
    whatever its process count, accumulation or resume point.
    """
    first = (micro * accelerator.num_processes + accelerator.process_index) * batch
    draws = [torch.randn(latent_shape, generator=torch.Generator().manual_seed(hash((seed, step, first + i))))
             for i in range(n)]
    return torch.stack(draws).to(accelerator.device)


def sum_over_processes(accelerator, *values: float) -> list[float]:
    """Sum scalars over all processes (one collective); keeps the processes in lock-step."""
    if accelerator.num_processes == 1:
        return list(values)
    return accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum").tolist()


def save_checkpoint(accelerator, root: Path, state: TrainingState, files: dict[str, str], keep: int) -> Path:
    """``save_state`` into a hidden temporary folder, then rename it: a crash mid-save never leaves a
    folder that looks complete. ``files`` (name → text) are written beside the state. Keeps the
    newest ``keep`` checkpoints."""
    final = root / f"{CHECKPOINT_PREFIX}{state.step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its files (RNG states) into tmp
    if accelerator.is_main_process:
        for name, text in files.items():
            (tmp / name).write_text(text)
        (tmp / "training_state.json").write_text(json.dumps(state.state_dict(), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def setup_models(config, accelerator) -> SimpleNamespace:
    """The autoencoder (in its wrapper), EMA, loss, discriminator and optimisers, with the
    performance switches applied, prepared by ``accelerator`` and registered for checkpointing."""
    pcfg, tcfg, dcfg, ocfg = config.performance, config.train, config.discriminator, config.optimizer
    set_tf32(pcfg.tf32)
    vae = build_autoencoder(config.model)
    set_trainable(vae, config.model.trainable)
    prepare_autoencoder(vae, pcfg, accelerator.device)
    model = AutoencoderWrapper(vae, config.loss.logvar_init, config.loss.learn_logvar)
    ema = EMAModel(vae.parameters(), decay=tcfg.ema_decay, use_ema_warmup=tcfg.ema_warmup)
    perceptual = build_perceptual(config.loss, accelerator)
    loss_fn = GeneratorLoss(config.loss, build_regularizer(config.regularizer, config.loss.reduction),
                            config.discriminator, perceptual)
    discriminator = build_discriminator(dcfg) if dcfg.enabled else None
    if discriminator is not None and dcfg.init_from is not None:
        load_discriminator(discriminator, dcfg.init_from)
    if discriminator is not None and dcfg.norm == "batch" and accelerator.num_processes > 1:
        if accelerator.device.type == "cuda":
            discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        else:  # torch's SyncBatchNorm runs on GPUs only
            accelerator.print("note: BatchNorm statistics of the discriminator are per process (no SyncBatchNorm off GPU)")
    set_memory_format([model, perceptual, discriminator], pcfg)
    if pcfg.compile:
        compile_in_place(compiled_parts(vae) + [perceptual, discriminator], pcfg)

    # The discriminator keeps its own GradScaler: Accelerate's single scaler updates at every
    # optimiser step, which would unscale the second optimiser with a changed scale.
    disc_lr = ocfg.lr if ocfg.disc_lr is None else ocfg.disc_lr
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], ocfg, ocfg.lr, pcfg.fused_optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    disc_optimizer = disc_scaler = None
    if discriminator is not None:
        disc_optimizer = adamw(discriminator.parameters(), ocfg, disc_lr, pcfg.fused_optimizer)
        discriminator = accelerator.prepare_model(discriminator)
        disc_scaler = torch.amp.GradScaler(accelerator.device.type, enabled=tcfg.mixed_precision == "fp16")
        accelerator.register_for_checkpointing(disc_optimizer, disc_scaler)
    accelerator.register_for_checkpointing(ema)
    return SimpleNamespace(
        model=model, raw_model=accelerator.unwrap_model(model), optimizer=optimizer, ema=ema, loss_fn=loss_fn, disc_lr=disc_lr,
        discriminator=discriminator, disc_optimizer=disc_optimizer, disc_scaler=disc_scaler,
        raw_discriminator=accelerator.unwrap_model(discriminator) if discriminator is not None else None)


def train_step(accelerator, parts: SimpleNamespace, x: torch.Tensor, noise: torch.Tensor, step: int,
               config, inject_nonfinite: bool = False) -> tuple[bool, dict]:
    """One micro-batch's backward passes: the generator's with the discriminator frozen, then the
    discriminator's on detached images. Returns (the loss was finite on every process, logs); a
    non-finite loss backpropagates nothing anywhere."""
    dcfg = config.discriminator
    # The discriminator is frozen and called unwrapped here (it gets no gradient, so it must not
    # enter a DDP collective).
    if parts.raw_discriminator is not None:
        parts.raw_discriminator.requires_grad_(False)
    x = to_memory_format(x, config.performance)
    reconstruction, posterior, logvar = parts.model(x, noise)
    loss, logs = parts.loss_fn(x, reconstruction, posterior, logvar, step, parts.raw_discriminator,
                               parts.raw_model.last_layer())
    if inject_nonfinite:
        loss = loss * float("nan")
    finite = sum_over_processes(accelerator, float(not torch.isfinite(loss).item()))[0] == 0
    if finite:
        accelerator.backward(loss)
        if parts.discriminator is not None and step >= dcfg.start:
            parts.raw_discriminator.requires_grad_(True)
            d_loss, d_logs = discriminator_step_loss(parts.discriminator, x, reconstruction, dcfg.loss)
            parts.disc_scaler.scale(d_loss / config.train.grad_accum).backward()
            logs.update(d_logs)
    return finite, logs


def apply_updates(accelerator, model, optimizer, lr, discriminator, disc_optimizer, disc_scaler, disc_lr,
                  grad_clip) -> dict:
    """Step both optimisers at the end of an accumulation window (clipping first); returns logs."""
    logs = {}
    set_lr(optimizer, lr)
    if grad_clip:
        logs["train/grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), grad_clip).item()
    optimizer.step()
    if disc_optimizer is not None and any(p.grad is not None for p in discriminator.parameters()):
        set_lr(disc_optimizer, disc_lr)
        disc_scaler.unscale_(disc_optimizer)
        if grad_clip:
            logs["train/disc_grad_norm"] = torch.nn.utils.clip_grad_norm_(discriminator.parameters(), grad_clip).item()
        disc_scaler.step(disc_optimizer)
        disc_scaler.update()
    return logs


@torch.no_grad()
def validate(model, ema, val_images, step, run_dir, accelerator, use_ema: bool) -> dict:
    """Reconstruct the fixed validation batch with the EMA weights; save a grid; return statistics."""
    vae = accelerator.unwrap_model(model).vae
    if use_ema:
        ema.store(vae.parameters())
        ema.copy_to(vae.parameters())
    vae.eval()
    posterior = vae.encode(val_images).latent_dist
    reconstruction = vae.decode(posterior.mode()).sample.float()
    vae.train()
    if use_ema:
        ema.restore(vae.parameters())
    mse = (reconstruction.clamp(-1, 1) - val_images).pow(2).mean(dim=(1, 2, 3))
    stats = {"val/psnr": (10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean().item()}  # range [-1,1]: peak² = 4
    stats.update(latent_batch_stats(posterior))
    save_grid(val_images, reconstruction, run_dir / "samples" / f"step-{step:07d}.png")
    return stats


def log(accelerator, logs: dict, step: int, run_dir: Path) -> None:
    """Send to the Accelerate trackers and append to metrics.jsonl (main process)."""
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")


def main():
    args = parse_args()

    # Setup config, run directory and accelerator:
    config = load_config(args.config, args.set)
    tcfg = config.train
    run_dir = Path(tcfg.output_dir) / tcfg.run_name
    trackers = {"auto": "tensorboard", "jsonl": None}.get(tcfg.tracker, tcfg.tracker)
    if trackers == "tensorboard" and tcfg.tracker == "auto":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            trackers = None  # metrics.jsonl is always written
    accelerator = Accelerator(
        mixed_precision=tcfg.mixed_precision,
        # sync_with_dataloader=False: accumulation windows run across epoch ends, so one optimiser
        # step is always exactly grad_accum batches and the data position is step * grad_accum.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=tcfg.grad_accum, sync_with_dataloader=False),
        # The shuffle order of epoch e depends on (seed, e) only, so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=tcfg.seed),
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    set_seed(tcfg.seed)
    if accelerator.is_main_process:
        save_config(config, run_dir / "config.yaml")
    ckpt_root = run_dir / "checkpoints"

    # Setup data (a data error is reported here, before any step):
    # Map-style data is sharded by accelerator.prepare; a stream is sharded here and not prepared.
    dataloader = make_dataloader(config.data, tcfg.batch_size, seed=tcfg.seed,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
    val_cfg = config.val_data or config.data
    val_batch = next(iter(make_dataloader(val_cfg, min(4, tcfg.batch_size), seed=tcfg.seed, shuffle=False,
                                          drop_last=False)))
    val_images = val_batch["pixel_values"].to(accelerator.device)
    if val_images.shape[0] == 0:
        raise ValueError(f"no decodable validation image in {val_cfg}")

    # Setup model, losses, discriminator and optimisers:
    parts = setup_models(config, accelerator)
    model, raw_model, optimizer, ema = parts.model, parts.raw_model, parts.optimizer, parts.ema
    discriminator, raw_discriminator = parts.discriminator, parts.raw_discriminator
    disc_optimizer, disc_scaler = parts.disc_optimizer, parts.disc_scaler
    if not config.data.streaming:
        dataloader = accelerator.prepare(dataloader)
    checkpoint_files = {"config.yaml": to_yaml(config), AUTOENCODER_CONFIG: raw_model.vae.to_json_string()}
    ocfg, disc_lr = config.optimizer, parts.disc_lr

    # Setup resume:
    state = TrainingState()
    if args.resume:
        resume_dir = resolve_resume(args.resume, ckpt_root)
        accelerator.load_state(str(resume_dir))  # registered objects come back on the CPU
        state.load_state_dict(json.loads((resume_dir / "training_state.json").read_text()))
        accelerator.print(f"resumed from {resume_dir} at step {state.step}")
    ema.to(accelerator.device)
    if accelerator.is_main_process:
        accelerator.init_trackers(tcfg.run_name)
        accelerator.print(f"run {run_dir}: {count_parameters(raw_model.vae) / 1e6:.2f} M parameters, "
                          f"{accelerator.num_processes} process(es), {accelerator.device}, {tcfg.mixed_precision}")

    stop_signal = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    # Training loop:
    batches = infinite_batches(dataloader, accelerator, state.step * tcfg.grad_accum, config.data.streaming)
    progress = tqdm(total=tcfg.max_steps, initial=state.step, disable=not accelerator.is_local_main_process)
    micro_batches = state.step * tcfg.grad_accum
    down = 2 ** (len(raw_model.vae.config.block_out_channels) - 1)  # spatial downsampling factor
    latent_shape = (raw_model.vae.config.latent_channels, config.data.resolution // down, config.data.resolution // down)
    accumulated = [model] + ([discriminator] if discriminator is not None else [])
    window_finite, window_empty, window_logs, images_seen, tick, data_wait = True, False, {}, 0, time.time(), 0.0
    exit_code = 0
    while state.step < tcfg.max_steps:
        wait = time.time()
        batch = next(batches)
        data_wait += time.time() - wait  # decoding not hidden behind the step (workers, prefetch)
        micro = micro_batches % tcfg.grad_accum  # index of this batch in the accumulation window
        micro_batches += 1
        x = batch["pixel_values"]
        images_seen += x.shape[0] * accelerator.num_processes

        skipped, upsized, empty = sum_over_processes(accelerator, batch["skipped"], batch["upsized"], x.shape[0] == 0)
        state.skipped_images += int(skipped)
        state.upsized_images += int(upsized)
        # Every image of some process's batch was undecodable: skip the window on every process
        # (a partial window would step with gradients that were never synchronised).
        window_empty |= empty > 0

        with accelerator.accumulate(*accumulated):
            if not window_empty:
                noise = posterior_noise(tcfg.seed, state.step, micro, accelerator, tcfg.batch_size, x.shape[0], latent_shape)
                finite, logs = train_step(accelerator, parts, x, noise, state.step, config, state.step in INJECT_NONFINITE)
                window_finite &= finite
                window_logs.update(logs)
            if accelerator.sync_gradients and window_finite and not window_empty:
                factor = lr_factor(state.step, ocfg, tcfg.max_steps)
                window_logs.update(apply_updates(accelerator, model, optimizer, ocfg.lr * factor, discriminator,
                                                 disc_optimizer, disc_scaler, disc_lr * factor, ocfg.grad_clip))
            if accelerator.sync_gradients:
                optimizer.zero_grad(set_to_none=True)
                if disc_optimizer is not None:
                    disc_optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue

        # After each optimiser step: EMA, counters, logging, checkpoints, stopping.
        if window_finite and not window_empty and not accelerator.optimizer_step_was_skipped:
            if tcfg.ema:
                ema.step(raw_model.vae.parameters())
            state.consecutive_nonfinite, state.last_finite_step = 0, state.step
        else:
            reason = "non-finite loss" if not window_finite else "empty batch" if window_empty else "fp16 overflow"
            state.skipped_steps += 1
            state.consecutive_nonfinite += 0 if window_finite else 1
            accelerator.print(f"step {state.step}: skipped ({reason})")
        state.step += 1
        progress.update(1)
        window_finite, window_empty = True, False

        if state.step % tcfg.log_every == 0 or state.step == tcfg.max_steps:
            rate = images_seen / (time.time() - tick)
            window_logs.update({"train/images_per_s": rate, "train/data_wait_fraction": data_wait / (time.time() - tick),
                                "train/lr": optimizer.param_groups[0]["lr"],
                                "train/skipped_steps": state.skipped_steps, "data/skipped_images": state.skipped_images,
                                "data/upsized_images": state.upsized_images})
            log(accelerator, window_logs, state.step, run_dir)
            progress.set_postfix(loss=f"{window_logs.get('train/loss/total', math.nan):.4g}",
                                 rec=f"{window_logs.get('train/loss/pixel', math.nan):.4f}", img_s=f"{rate:.1f}")
            images_seen, tick, data_wait = 0, time.time(), 0.0
        window_logs = {}
        if state.step % tcfg.image_every == 0 or state.step == tcfg.max_steps:
            if accelerator.is_main_process:
                log(accelerator, validate(model, ema, val_images, state.step, run_dir, accelerator, tcfg.ema),
                    state.step, run_dir)

        too_many = state.consecutive_nonfinite >= tcfg.max_nonfinite
        stop = sum_over_processes(accelerator, float(bool(stop_signal)))[0] > 0
        if state.step % tcfg.checkpoint_every == 0 or too_many or stop or state.step == tcfg.max_steps:
            save_checkpoint(accelerator, ckpt_root, state, checkpoint_files, tcfg.keep_checkpoints)
        if too_many:
            accelerator.print(f"stopping: {state.consecutive_nonfinite} consecutive non-finite losses; "
                              f"the last finite step was {state.last_finite_step}. Checkpoint saved.")
            exit_code = EXIT_NONFINITE
            break
        if stop:
            exit_code = STOP_SIGNALS.get(stop_signal[0] if stop_signal else signal.SIGTERM, 143)
            accelerator.print(f"stopping on signal at step {state.step}; resume with --resume latest")
            break
    progress.close()

    # Export the EMA (or raw) weights with a measured latent scale, on every process's share of the
    # calibration images:
    accelerator.wait_for_everyone()
    if exit_code == 0:
        ecfg = config.export
        export_vae = raw_model.vae
        if tcfg.ema and ecfg.weights == "ema":
            ema.copy_to(export_vae.parameters())
        calibration = calibration_batches(config.data, ecfg.calibration_images, tcfg.batch_size, seed=tcfg.seed,
                                          rank=accelerator.process_index, world_size=accelerator.num_processes)
        report = export_autoencoder(
            export_vae, run_dir / "export", (b["pixel_values"] for b in calibration),
            calibration_source=describe(config.data), source=str(run_dir), dtype=ecfg.dtype,
            latent_norm=ecfg.latent_norm, weights=ecfg.weights if tcfg.ema else "raw",
            single_file=SINGLE_FILE_NAME if ecfg.single_file else None, config=config, step=state.step,
            config_hash=config_hash(config), discriminator=raw_discriminator, logvar=raw_model.logvar.item(),
            overwrite=True, gather=lambda t: accelerator.reduce(t, "sum"), is_main=accelerator.is_main_process)
        if report is not None:
            accelerator.print(f"exported {run_dir / 'export'}: scaling_factor {report['latent_stats']['scaling_factor']:.5f} "
                              f"from {report['latent_stats']['num_images']} images; {report['fp16']['verdict']}")
    # The other processes wait for the main one's export: a process that leaves early tears down
    # the process group under it (gloo aborts with "terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
