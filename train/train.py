"""Train a KL autoencoder (diffusers' AutoencoderKL) under Hugging Face Accelerate.

    accelerate launch train/train.py [--config configs/X.yaml] [--set section.key=value ...] [--resume latest|PATH]

With no arguments it runs configs/quickstart.yaml. Everything lands in <output_dir>/<run_name>/.
Exit codes: 0 done; 1 error; 2 stopped after too many consecutive non-finite losses (a checkpoint is
saved); 143 / 130 stopped by SIGTERM / SIGINT after saving a checkpoint (resume with --resume latest).
`accelerate launch` turns them all into 1: <run>/status.json says how the run ended (docs/training.md).
"""

import argparse
import json
import math
import os
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from first_stage.checkpoint import CONFIG_FILE, TRAINING_STATE, resolve_resume, save_checkpoint
from first_stage.config import exported_weights, load_config, save_config
from first_stage.data import DataError, calibration_batches, check_decodable, describe, make_dataloader
from first_stage.export import ExportOptions, ExportSource, export_autoencoder
from first_stage.lifecycle import (EXIT_NONFINITE, EXIT_VANISHED, catch_stop_signals, claim_run, finish_run, run_main,
                                   stop_reason)
from first_stage.model import count_parameters
from first_stage.reports import drift_sentence, e2e_sentence
from first_stage.trainer import (StepMeter, TrainingState, accelerator_options, build_parts, e2e_measure, note_layout,
                                 restore, run_files, sum_over_processes, train_step, trainer_states, validate)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
# Test hook for the fault-handling path: optimiser steps whose loss is replaced by NaN, e.g. "3,4".
# Test hooks: the steps whose loss is made non-finite, or zero (no gradient: the watchdog's case).
INJECT = {int(s): kind for kind in ("nonfinite", "zero")
          for s in os.environ.get(f"FIRST_STAGE_INJECT_{kind.upper()}", "").split(",") if s}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML recipe (default: quickstart)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. regularizer.kl_weight=1e-6")
    parser.add_argument("--resume", default=None, metavar="latest|PATH", help="continue from a checkpoint")
    parser.add_argument("--print-run-dir", action="store_true", help="print the run folder and exit (job scripts)")
    return parser.parse_args()


def trackers(tracker: str) -> str | None:
    """The Accelerate tracker of ``train.tracker``: "auto" is TensorBoard when it is installed."""
    if tracker == "auto":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None  # metrics.jsonl is always written
        return "tensorboard"
    return None if tracker == "jsonl" else tracker


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


def log(accelerator, logs: dict, step: int, run_dir: Path) -> None:
    """Send to the Accelerate trackers and append to metrics.jsonl (main process)."""
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")


def train(args: argparse.Namespace, config, accelerator, run_dir: Path) -> int:
    """The run, ending with its status.json; returns the exit code."""
    tcfg = config.train
    set_seed(tcfg.seed)
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
        raise DataError(f"no decodable validation image in {describe(val_cfg)}")
    check_decodable(dataloader.dataset)

    # Setup model, losses, discriminator and optimisers:
    parts = build_parts(config, accelerator)
    if not config.data.streaming:
        dataloader = accelerator.prepare(dataloader)

    # Setup resume:
    state = TrainingState()
    if args.resume:
        resume_dir = resolve_resume(args.resume, ckpt_root)
        state = restore(accelerator, parts, resume_dir, config)
        accelerator.print(f"resumed from {resume_dir} at step {state.step}")
    note_layout(accelerator, state)
    parts.ema.to(accelerator.device)
    if parts.e2e is not None and state.step == 0 and config.e2e.bn_init_images and \
            int(parts.raw_transformer.bn.num_batches_tracked) == 0:  # a new transformer (not e2e.init_from)
        measured = e2e_measure(accelerator, parts, calibration_batches(
            config.data, config.e2e.bn_init_images, tcfg.batch_size, seed=tcfg.seed, rank=accelerator.process_index,
            world_size=accelerator.num_processes), tcfg.seed)
        accelerator.print(f"e2e: the transformer's latent BatchNorm starts from the latents of {measured} images")
    if accelerator.is_main_process:  # after a resume was accepted: a refused one keeps the run's config
        save_config(config, run_dir / CONFIG_FILE)
        accelerator.init_trackers(tcfg.run_name)
        accelerator.print(f"run {run_dir}: {count_parameters(parts.raw_model.vae) / 1e6:.2f} M parameters, "
                          f"{accelerator.num_processes} process(es), {accelerator.device}, {tcfg.mixed_precision}")
    stop_signal = catch_stop_signals()

    # Training loop: one optimiser step per iteration, then logging, validation, checkpoints, stopping.
    batches = infinite_batches(dataloader, accelerator, state.step * tcfg.grad_accum, config.data.streaming)
    progress = tqdm(total=tcfg.max_steps, initial=state.step, disable=not accelerator.is_local_main_process)
    meter = StepMeter()
    checkpoint_files = run_files(config, parts)
    exit_code, reason = 0, f"reached train.max_steps={tcfg.max_steps}"
    while state.step < tcfg.max_steps:
        logs = train_step(accelerator, parts, config, state, batches, meter, INJECT.get(state.step))
        progress.update(1)
        last = state.step == tcfg.max_steps
        if state.step % tcfg.log_every == 0 or last:
            logs.update({**meter.logs(), "train/lr": parts.optimizer.param_groups[0]["lr"],
                         "train/skipped_steps": state.skipped_steps, "data/skipped_images": state.skipped_images,
                         "data/upsized_images": state.upsized_images})
            log(accelerator, logs, state.step, run_dir)
            progress.set_postfix(loss=f"{logs.get('train/loss/total', math.nan):.4g}",
                                 rec=f"{logs.get('train/loss/pixel', math.nan):.4f}",
                                 img_s=f"{logs['train/images_per_s']:.1f}")
            meter.reset()
        if (state.step % tcfg.image_every == 0 or last) and accelerator.is_main_process:
            grid = run_dir / "samples" / f"step-{state.step:07d}.png"
            log(accelerator, validate(parts, val_images, tcfg.ema, grid), state.step, run_dir)

        too_many = max(state.consecutive_nonfinite, state.consecutive_empty) >= tcfg.max_nonfinite
        vanished_parts = [(name, count, key) for name, count, key in (
            ("VAE's", state.consecutive_vanishing, "train/grad_norm"),
            ("e2e transformer's", state.consecutive_vanishing_transformer, "train/e2e_grad_norm"))
            if 0 < tcfg.max_vanishing_steps <= count]
        vanished = bool(vanished_parts)
        stop = sum_over_processes(accelerator, float(bool(stop_signal)))[0] > 0
        if state.step % tcfg.checkpoint_every == 0 or too_many or vanished or stop or last:
            files = {**checkpoint_files, TRAINING_STATE: json.dumps(state.state_dict(), indent=1)}
            save_checkpoint(accelerator, ckpt_root, state.step, files, tcfg.keep_checkpoints, trainer_states(parts))
        if too_many:
            what = ("non-finite losses" if state.consecutive_nonfinite >= tcfg.max_nonfinite else
                    f"steps without a decodable image on some process (data: {describe(config.data)})")
            reason = f"{tcfg.max_nonfinite} consecutive {what}; the last finite step was {state.last_finite_step}"
            accelerator.print(f"stopping: {reason}. Checkpoint saved.")
            exit_code = EXIT_NONFINITE
            break
        if vanished:
            reason = " and ".join(
                f"the {name} gradient norm was at most train.vanishing_grad_norm={tcfg.vanishing_grad_norm:g} for "
                f"{count} consecutive steps (the last {logs.get(key)})" for name, count, key in vanished_parts
            ) + ": training had stopped moving the weights"
            accelerator.print(f"stopping: {reason}. Checkpoint saved.")
            exit_code = EXIT_VANISHED
            break
        if stop:
            exit_code, reason = stop_reason(stop_signal)
            accelerator.print(f"stopping on signal at step {state.step}; resume with --resume latest")
            break
    progress.close()

    # Export the EMA (or raw) weights with a measured latent scale, on every process's share of the
    # calibration images:
    accelerator.wait_for_everyone()
    if exit_code == 0:
        ecfg, vae = config.export, parts.raw_model.vae
        weights = exported_weights(config)
        if weights == "ema":
            parts.ema.copy_to(vae.parameters())
        calibration = calibration_batches(config.data, ecfg.calibration_images, tcfg.batch_size, seed=tcfg.seed,
                                          rank=accelerator.process_index, world_size=accelerator.num_processes)
        # the discriminator, log-variance, projection, e2e transformer (its EMA's BatchNorm: the normaliser), ...
        source = ExportSource.of_training(parts, config, state.step, str(run_dir), weights)
        report = export_autoencoder(vae, run_dir / "export", (b["pixel_values"] for b in calibration), source,
                                    ExportOptions.from_config(ecfg, overwrite=True, sample_size=config.data.resolution),
                                    accelerator)
        if report is not None:
            scale = (f"BatchNorm statistics {report['batch_norm']['origin']}" if "batch_norm" in report
                     else f"{report['normalisation']}, {report['latents']['origin']}")
            accelerator.print(f"exported {run_dir / 'export'}: {scale}; {report['fp16']['verdict']}")
            for line in (e2e_sentence(report), drift_sentence(report)):
                if line:
                    accelerator.print(f"  {line}")
            for note in report.get("batch_norm", {}).get("pipelines", []):
                accelerator.print(f"  caution: {note}")
    finish_run(accelerator, run_dir, exit_code, state.step, reason)  # several processes leave here
    return exit_code


def main() -> int:
    args = parse_args()
    config = load_config(args.config, args.set)
    run_dir = Path(config.train.output_dir) / config.train.run_name
    if args.print_run_dir:
        print(run_dir)
        return 0

    # Setup the accelerator, and claim the run folder: a second trainer of the same run refuses here.
    accelerator = Accelerator(**accelerator_options(config.train), log_with=trackers(config.train.tracker),
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(run_dir / "logs")))
    with claim_run(accelerator, run_dir):  # an error inside marks the run failed in its status.json
        return train(args, config, accelerator, run_dir)


if __name__ == "__main__":
    run_main(main)
