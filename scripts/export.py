"""Export an autoencoder as a diffusers folder + latent-diffusion single file with a measured latent scale.

    python scripts/export.py RUN_DIR_OR_CHECKPOINT --out DIR [--weights ema|raw] [--dtype fp32|fp16|bf16]
        [--calibrate DATA_SPEC] [--num-images N] [--latent-norm global|per_channel]
        [--single-file PATH | --no-single-file] [--overwrite]

The source is a training run folder (its newest checkpoint), a checkpoint folder, a diffusers
AutoencoderKL folder, or a latent-diffusion weight file (.safetensors/.ckpt: the import of a released
VAE, with its discriminator when the file has one). A run tuned end to end (e2e.enabled) exports its EMA
transformer's BatchNorm statistics as the latent normalisation, and its transformer into the fine-tuning
bundle (docs/export.md). Calibration data defaults to the run's training
data; DATA_SPEC is "val" (the run's val_data) or comma-separated data settings, e.g.
"source=imagefolder,path=/data/coco/val2017,resolution=256" (unset ones come from the run's data).
Launch with `accelerate launch scripts/export.py ...` to split the calibration over processes.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from first_stage.checkpoint import SINGLE_FILE_NAME, LoadedVAE, encoder_origin, load_vae
from first_stage.convert import BFL_FILE_NAME
from first_stage.config import AlignmentConfig, Config, ConfigError, DataConfig, DiscriminatorConfig, ExportConfig
from first_stage.data import calibration_batches, describe
from first_stage.discriminator import build_discriminator, infer_discriminator_config
from first_stage.evaluation import data_from_spec
from first_stage.export import ExportError, ExportOptions, ExportSource, check_exportable, export_autoencoder
from first_stage.reports import drift_sentence, e2e_sentence, evaluation_summary
from first_stage.teacher import load_teacher
from first_stage.lifecycle import run_main
from first_stage.model import has_batch_norm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source",
                        help="run folder, checkpoint folder, diffusers folder or latent-diffusion weight file")
    parser.add_argument("--out", required=True, help="the diffusers folder to write")
    parser.add_argument("--weights", choices=["ema", "raw"], default=None,
                        help="checkpoints: EMA or raw weights (default: the run's export.weights; raw without EMA)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help=f"default: the run's export.dtype, else {ExportConfig.dtype}")
    parser.add_argument("--calibrate", default=None, metavar="DATA_SPEC",
                        help="calibration data (default: the run's data)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="calibration images (default: export.calibration_images)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="which images are picked for calibration")
    parser.add_argument("--latent-norm", choices=["global", "per_channel", "batch_norm"], default=None,
                        help="config fields for the scale (default: export.latent_norm, else global); an "
                             "AutoencoderKLFlux2 always exports its BatchNorm over patches (batch_norm)")
    parser.add_argument("--single-file", default=None, metavar="PATH",
                        help=f"single file: latent-diffusion layout (default: {SINGLE_FILE_NAME} inside --out, unless "
                             f"the run's export.single_file is false), BFL's layout for AutoencoderKLFlux2 "
                             f"(default {BFL_FILE_NAME})")
    parser.add_argument("--no-single-file", action="store_true")
    parser.add_argument("--norm-num-groups", type=int, default=None,
                        help="GroupNorm groups of a foreign weight file (not visible in its weights; default 32)")
    parser.add_argument("--eval-report", nargs="+", default=[], metavar="REPORT",
                        help="report.json files of eval/ for this VAE: their figures go into the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    return parser.parse_args()


def calibration_config(spec: str | None, config: Config | None) -> DataConfig:
    """The data to calibrate on: the run's data, its val_data ("val"), or key=value settings over the run's data."""
    if spec is None:
        if config is None:
            raise ConfigError("--calibrate is required when the source is not a training run (it has no data config)")
        return config.data
    if spec == "val":
        if config is None or config.val_data is None:
            raise ConfigError("--calibrate val: the source has no val_data")
        return config.val_data
    return data_from_spec(spec, config, "--calibrate")


def import_config(found: LoadedVAE, data: DataConfig) -> Config | None:
    """For a released VAE that comes with a discriminator or a VA-VAE alignment projection: a training
    config to fine-tune it with (on the calibration data; edit its data section), VA-VAE's alignment
    on where its projection came along."""
    if found.discriminator is None and found.projection is None:
        return None
    disc = DiscriminatorConfig() if found.discriminator is None else \
        DiscriminatorConfig(enabled=True, **infer_discriminator_config(found.discriminator))
    return Config(data=data, discriminator=disc, alignment=AlignmentConfig(enabled=found.projection is not None))


def import_origin(found: LoadedVAE) -> dict | None:
    """What the export keeps of the source's latent normalisation (first_stage.checkpoint.encoder_origin): a
    checkpoint's run decided it; an imported AutoencoderKL is re-calibrated (its scale measured on --calibrate's
    images), while a FLUX.2-class import keeps its BatchNorm, the released normalisation."""
    if found.config is not None:
        return found.encoder_origin
    origin = encoder_origin(found.path, found.vae)
    if not has_batch_norm(found.vae):
        origin = {**origin, "normalisation": None, "recalibrate": "an import is re-calibrated on the given images"}
    return origin


def main():
    args = parse_args()
    accelerator = Accelerator()
    try:
        found = load_vae(args.source, args.weights, norm_num_groups=args.norm_num_groups)
        data = calibration_config(args.calibrate, found.config)
        ecfg = found.config.export if found.config else ExportConfig()
        check_exportable(args.latent_norm or ecfg.latent_norm, found.vae, data.resolution, "the calibration resolution",
                         e2e=found.transformer_ema is not None)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError and ConfigError are ValueErrors
        sys.exit(f"export failed: {err}")
    config = found.config or import_config(found, data)
    teacher = None
    if config is not None and config.teacher.path is not None:  # a distillation student: compare decode costs
        try:
            teacher = load_teacher(config, accelerator.device)
        except (ValueError, FileNotFoundError) as err:
            accelerator.print(f"note: the run's teacher does not load ({err}); exporting without the decode-cost "
                              "comparison with it")
    discriminator = None
    if found.discriminator is not None:
        discriminator = build_discriminator(config.discriminator)
        discriminator.load_state_dict(found.discriminator)
    calibration = calibration_batches(data, args.num_images or ecfg.calibration_images, args.batch_size, seed=args.seed,
                                      rank=accelerator.process_index, world_size=accelerator.num_processes)
    source = ExportSource(source=str(found.path), calibration=describe(data),
                          weights=found.weights, step=found.step,
                          config=config, hash_config=found.config is not None, discriminator=discriminator,
                          logvar=found.logvar, projection=found.projection, loss_terms=found.loss_terms,
                          encoder_origin=import_origin(found), teacher=teacher,
                          transformer=found.transformer, transformer_ema=found.transformer_ema,
                          evaluation=evaluation_summary([json.loads(Path(p).read_text()) for p in args.eval_report]))
    given = {"dtype": args.dtype, "latent_norm": args.latent_norm, "single_file": args.single_file}
    options = ExportOptions.from_config(
        ecfg, **{k: v for k, v in given.items() if v is not None}, overwrite=args.overwrite,
        # a run's training resolution; a weight file's calibration resolution (it has none)
        sample_size=found.config.data.resolution if found.config else data.resolution if found.path.is_file() else None)
    if args.no_single_file:
        options = dataclasses.replace(options, single_file=None)
    try:
        report = export_autoencoder(found.vae.to(accelerator.device), args.out,
                                    (b["pixel_values"] for b in calibration), source, options, accelerator)
    except (ExportError, FileExistsError) as err:
        sys.exit(f"export failed: {err}")  # the launcher then stops the other processes
    if report is not None:
        stats, check = report["latent_stats"], report["verification"]
        print(f"exported {args.out} from {found.path}")
        if "batch_norm" in report:  # the FLUX.2 class: the normalisation is its BatchNorm's statistics
            print(f"  BatchNorm statistics {report['batch_norm']['origin']}")
            for note in report["batch_norm"]["pipelines"]:
                print(f"  caution: {note}")
        elif stats is None:  # an AutoencoderTiny student
            print(f"  latents: {report['latents']['origin']}")
        else:
            print(f"  latent normalisation {report['latents']['origin']}")
            measured = "measured latent scale (reported, not written)" if "e2e" in report else "latent scale"
            print(f"  {measured}: scaling_factor {stats['scaling_factor']:.5f}, shift_factor "
                  f"{stats['shift_factor']:.5f} (std {stats['std']:.5f}) from {stats['num_images']} images of "
                  f"{report['calibration']}")
            print(f"  config.json: {report['config_scale']}")
        for line in (e2e_sentence(report), drift_sentence(report)):
            if line:
                print(f"  {line}")
        print(f"  pipelines normalise {report['normalisation']}")
        upcast = "" if "batch_norm" in report else f" force_upcast={report['fp16']['force_upcast']}"
        print(f"  fp16: {report['fp16']['verdict']}{upcast}")
        if report.get("single_file_skipped"):
            print(f"  no single file: {'; '.join(report['single_file_skipped'])}")
        print(f"  verified: max abs difference after reload {check['diffusers']:.3g}"
              + (f", single file {check['single_file']:.3g}" if "single_file" in check else "")
              + f" (tolerance {check['tolerance']:g})")
        if report.get("single_file"):
            print(f"  single file: {report['single_file']}")
        if report.get("distillation"):
            d = report["distillation"]
            print(f"  decoder against the teacher's: {d['parameter_ratio']:.3f}x parameters, {d['flop_ratio']:.3f}x "
                  f"FLOPs, {d['speedup']:.2f}x faster ({d['student']['device']}, {d['student']['dtype']})")
        if report.get("bundle"):
            print(f"  fine-tuning bundle: {Path(args.out) / 'finetune'}: {', '.join(report['bundle'])}")
    # The others wait for the main process's writing: one that exits early tears the process group down under it.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
