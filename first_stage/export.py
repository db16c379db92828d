"""Export a trained autoencoder: a diffusers folder and a latent-diffusion single file, with a measured
latent scale, a fine-tuning bundle and a model card, verified by loading them back.

The one entry point is :func:`export_autoencoder`; ``scripts/export.py`` and the end of
``train/train.py`` both call it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .config import Config, to_yaml
from .convert import to_ldm_state_dict
from .latent_stats import posterior_moments
from .model import count_parameters

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP16_MAX = torch.finfo(torch.float16).max  # 65504
# Max abs difference allowed between the in-memory model and the files read back (same dtype).
RELOAD_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SINGLE_FILE_NAME = "vae_ldm.safetensors"
BUNDLE_DIR = "finetune"
REPORT_NAME = "export_report.json"


class ExportError(RuntimeError):
    """An export that would be wrong: non-finite weights, or files that do not load back identical."""


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


@torch.inference_mode()
def latent_sums(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Per-channel float64 sums over a batch's posteriors: (C, 4) = (Σμ, Σμ², Σσ², count)."""
    posterior = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    mu, var = posterior.mean.double(), posterior.var.double()  # (B, C, h, w)
    count = torch.full_like(mu[0, :, 0, 0], mu[:, 0].numel())
    return torch.stack([mu.sum((0, 2, 3)), mu.pow(2).sum((0, 2, 3)), var.sum((0, 2, 3)), count], 1).cpu()


def measure_latent_stats(vae: AutoencoderKL, batches: Iterable[torch.Tensor],
                         gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Mean and std of posterior samples ``z = μ + σ·ε`` over all images, globally and per channel.

    The moments of the samples are taken exactly over ε (E[z] = μ, E[z²] = μ² + σ²) instead of
    drawing ε, so the figure has no sampling noise and does not depend on how the images are split
    over batches or processes. ``scaling_factor = 1 / std`` is latent-diffusion's ``scale_by_std``
    (there from one batch of samples). The sums stream in float64; ``gather`` (e.g. a sum over
    processes) combines them, so every process must call this, even with no batch.
    """
    sums, images = None, 0
    for x in batches:
        if x.shape[0] == 0:  # every image of the batch was undecodable
            continue
        batch_sums = latent_sums(vae, x)
        sums = batch_sums if sums is None else sums + batch_sums
        images += x.shape[0]
    if sums is None:
        sums = torch.zeros(vae.config.latent_channels, 4, dtype=torch.float64)
    if gather is not None:
        packed = gather(torch.cat([sums.flatten(), torch.tensor([float(images)], dtype=torch.float64)]).to(vae.device))
        sums, images = packed[:-1].cpu().view_as(sums), int(packed[-1].item())
    if images == 0:
        raise ValueError("measure_latent_stats: no calibration image could be read")
    sum_mu, sum_mu2, sum_var, count = sums.unbind(1)  # each (C,)
    moments = posterior_moments(count, sum_mu, sum_mu2, sum_var)
    std = moments["std_of_samples"].item()
    return {
        "num_images": images,
        "scaling_factor": 1.0 / std,
        "shift_factor": moments["mean"].item(),
        "mean": moments["mean"].item(),
        "std": std,
        "std_of_means": moments["std_of_means"].item(),  # what .mode() latents give
        "channel_mean": moments["channel_mean"].tolist(),
        "channel_std": moments["channel_std_of_samples"].tolist(),
    }


def scale_fields(stats: dict, latent_norm: str) -> dict:
    """The ``AutoencoderKL`` config fields that carry the measured scale.

    ``global``: ``scaling_factor = 1/std`` and ``shift_factor = mean``; SD 1.x/2.x pipelines read
    the first (latents · s), SD3/FLUX pipelines both ((latents − shift) · s).
    ``per_channel``: ``latents_mean``/``latents_std`` per channel with ``scaling_factor = 1``, for
    pipelines that read them (SDXL's: (latents − mean_c) · s / std_c); SD 1.x pipelines ignore them.
    """
    if latent_norm == "global":
        return {"scaling_factor": stats["scaling_factor"], "shift_factor": stats["shift_factor"],
                "latents_mean": None, "latents_std": None}
    if latent_norm == "per_channel":
        return {"scaling_factor": 1.0, "shift_factor": None,
                "latents_mean": stats["channel_mean"], "latents_std": stats["channel_std"]}
    raise ValueError(f"latent_norm must be 'global' or 'per_channel', got {latent_norm!r}")


def cast(vae: AutoencoderKL, dtype: torch.dtype) -> AutoencoderKL:
    """A copy of ``vae`` in ``dtype``, in eval mode. Uses ``nn.Module.to``: diffusers' ``ModelMixin.to``
    (0.42) warns about fp32-only modules on every dtype cast, though AutoencoderKL has none."""
    return nn.Module.to(copy.deepcopy(vae), dtype=dtype).eval()


def _record_nonfinite(found: dict, name: str, module: nn.Module, args, output) -> None:
    """Forward hook: note the peak |activation| and whether the output of ``name`` overflowed."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    for out in outputs:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            finite = torch.isfinite(out)
            if not finite.all() and name not in found["overflow"]:
                found["overflow"].append(name)
            if finite.any():
                found["peak"] = max(found["peak"], out[finite].abs().max().item())


@torch.inference_mode()
def fp16_overflow_check(vae: AutoencoderKL, x: torch.Tensor) -> dict:
    """Encode (mode) and decode ``x`` with every weight and activation in fp16.

    Returns ``{"overflow": [modules whose output became inf/NaN, in execution order], "peak":
    largest finite |activation|}``; the first name is where the overflow starts (the SDXL VAE's
    fp16 NaNs, for instance, start in its decoder's up blocks at large resolutions).
    """
    half = cast(vae, torch.float16)
    found = {"overflow": [], "peak": 0.0}
    handles = [m.register_forward_hook(functools.partial(_record_nonfinite, found, name))
               for name, m in half.named_modules() if name]
    try:
        z = half.encode(x.to(half.device, torch.float16)).latent_dist.mode()
        half.decode(z)
    finally:
        for handle in handles:
            handle.remove()
    return found


@torch.inference_mode()
def output_difference(a: AutoencoderKL, b: AutoencoderKL, x: torch.Tensor) -> float:
    """Max abs difference of latents (posterior mode) and of reconstructions of two models on ``x``."""
    x_a, x_b = x.to(a.device, a.dtype), x.to(b.device, b.dtype)
    z_a, z_b = a.encode(x_a).latent_dist.mode(), b.encode(x_b).latent_dist.mode()
    rec_a, rec_b = a.decode(z_a).sample, b.decode(z_a.to(b.device, b.dtype)).sample
    return max((z_a.float() - z_b.float().to(z_a.device)).abs().max().item(),
               (rec_a.float() - rec_b.float().to(rec_a.device)).abs().max().item())


def _keep_first(batches: Iterable[torch.Tensor], store: list, count: int = 4):
    """Pass ``batches`` through, keeping the first ``count`` images of the first non-empty one in ``store``."""
    for x in batches:
        if not store and x.shape[0] > 0:
            store.append(x[:count])
        yield x


def _save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=metadata)


def bundle_config(config: Config, out_dir: Path, logvar: float | None, has_discriminator: bool) -> Config:
    """The training config that continues from this export: the model and (when exported) the
    discriminator start from its files, the log-variance from its value."""
    out_dir = out_dir.resolve()
    disc = config.discriminator
    if has_discriminator:
        disc = dataclasses.replace(disc, init_from=str(out_dir / BUNDLE_DIR / "discriminator.safetensors"))
    loss = config.loss if logvar is None else dataclasses.replace(config.loss, logvar_init=float(logvar))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=str(out_dir)),
                               loss=loss, discriminator=disc)


def model_card(vae: AutoencoderKL, report: dict, config: Config | None, evaluation: dict | None) -> str:
    """``README.md`` of the export folder."""
    c, stats, scale = vae.config, report["latent_stats"], report["config_scale"]
    down = 2 ** (len(c.block_out_channels) - 1)
    lines = [
        f"# {report['name']}: a KL autoencoder for latent diffusion",
        "",
        f"Exported by first-stage {__version__} on {report['date']} from `{report['source']}`"
        + (f" (step {report['step']})." if report["step"] is not None else "."),
        "",
        "## Architecture",
        "",
        "| downsampling | latent channels | block_out_channels | layers_per_block | quant convs | mid attention | GroupNorm groups | parameters |",
        "|---|---|---|---|---|---|---|---|",
        f"| f{down} | {c.latent_channels} | {list(c.block_out_channels)} | {c.layers_per_block} | "
        f"{'yes' if c.use_quant_conv else 'no'} | {'yes' if c.mid_block_add_attention else 'no'} | "
        f"{c.norm_num_groups} | {report['parameters']:,} |",
        "",
        f"Weights: {report['weights']}, stored as {report['dtype']}.",
        "",
    ]
    if config is not None:
        d, r = config.data, config.regularizer
        penalty = f"KL weight {r.kl_weight:g}, free bits {r.free_bits:g}" if r.kind == "kl" else f"MMD weight {r.mmd_weight:g}"
        lines += [
            "## Training",
            "",
            f"- data: `{d.source}` {d.path or ''} (split `{d.split}`), {d.resolution}² crops",
            f"- steps: {report['step']}, batch {config.train.batch_size} × accumulation {config.train.grad_accum} per process, "
            f"mixed precision `{config.train.mixed_precision}`",
            f"- loss: {config.loss.pixel_loss} + {config.loss.perceptual_weight} × LPIPS, {penalty} "
            f"({config.loss.reduction} reduction, {r.schedule} schedule), "
            + (f"PatchGAN from step {config.discriminator.start}" if config.discriminator.enabled else "no discriminator"),
            f"- config hash `{report['config_hash']}` (the full config is `{BUNDLE_DIR}/config.yaml`)",
            "",
        ]
    lines += [
        "## Latent scale (measured, not assumed)",
        "",
        f"Measured on {stats['num_images']} images of {report['calibration']}: the moments of posterior",
        "samples z = μ + σ·ε (exact over ε), in float64.",
        "",
        "| scaling_factor = 1/std | shift_factor = mean | std | std of posterior means |",
        "|---|---|---|---|",
        f"| {stats['scaling_factor']:.5f} | {stats['shift_factor']:.5f} | {stats['std']:.5f} | {stats['std_of_means']:.5f} |",
        "",
        "Per channel: mean " + ", ".join(f"{v:.3f}" for v in stats["channel_mean"])
        + "; std " + ", ".join(f"{v:.3f}" for v in stats["channel_std"]) + ".",
        "",
        f"Written into `config.json` (`latent_norm: {report['latent_norm']}`): "
        + ", ".join(f"`{k}` = {json.dumps(v if not isinstance(v, float) else round(v, 6))}" for k, v in scale.items()) + ".",
        "SD 1.x/2.x pipelines decode `latents / scaling_factor`; SD3/FLUX pipelines `latents / scaling_factor + shift_factor`;",
        "the SDXL pipeline, when `latents_mean`/`latents_std` are set, `latents * latents_std / scaling_factor + latents_mean`.",
        "",
        "## fp16",
        "",
        f"Calibration batch in fp16: {report['fp16']['verdict']} `force_upcast` = {str(vae.config.force_upcast).lower()}.",
        "",
        "## Verification",
        "",
        f"Read back from disk and compared with the model in memory on {report['verification']['images']} calibration images "
        f"(latents and reconstructions, max abs difference): diffusers folder {report['verification']['diffusers']:.3g}"
        + (f", single file {report['verification']['single_file']:.3g}" if "single_file" in report["verification"] else "")
        + f" (tolerance {report['verification']['tolerance']:g}).",
        "",
        "## Evaluation",
        "",
    ]
    if evaluation:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                     for k, v in evaluation.items()]
    else:
        lines += ["Not evaluated at export time."]
    single = report.get("single_file")
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from diffusers import AutoencoderKL, StableDiffusionPipeline",
        "vae = AutoencoderKL.from_pretrained(\"path/to/this/folder\")",
        "pipe = StableDiffusionPipeline.from_pretrained(..., vae=vae)  # or: pipe.vae = vae",
    ]
    if single:
        lines += [f"# the latent-diffusion single file ({Path(single).name}); config= avoids guessing the architecture",
                  f"vae = AutoencoderKL.from_single_file(\"{Path(single).name}\", config=\"path/to/this/folder\")"]
    lines += ["```", ""]
    if report.get("bundle"):
        lines += [
            "## Fine-tuning",
            "",
            f"`{BUNDLE_DIR}/` holds the discriminator weights (when one was trained), the loss's log-variance and the",
            "resolved training config pointing at this folder:",
            "",
            "```bash",
            f"accelerate launch train/train.py --config {BUNDLE_DIR}/config.yaml --set train.run_name=finetune --set train.max_steps=...",
            "```",
            "",
        ]
    return "\n".join(lines)


def export_autoencoder(
    vae: AutoencoderKL,
    out_dir: str | Path,
    calibration: Iterable[torch.Tensor],
    *,
    calibration_source: str,
    source: str,
    dtype: str = "fp32",
    latent_norm: str = "global",
    weights: str = "ema",
    single_file: str | Path | None = SINGLE_FILE_NAME,
    config: Config | None = None,
    step: int | None = None,
    config_hash: str | None = None,
    discriminator: nn.Module | None = None,
    logvar: float | None = None,
    evaluation: dict | None = None,
    overwrite: bool = False,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    is_main: bool = True,
) -> dict | None:
    """Measure the latent scale, write and verify the export; returns the report (None off the main process).

    Every process calls this with its own share of the calibration batches; only the main process
    writes. ``single_file`` is a path (relative paths land inside ``out_dir``) or None. Everything
    is written into a temporary folder beside ``out_dir``, read back and compared, and only then
    renamed to ``out_dir``: a failed export leaves nothing under the final name.
    """
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    single_path = None if single_file is None else Path(single_file)
    outside = single_path is not None and str(single_path) != single_path.name  # not a bare name
    for target in [out_dir] + ([single_path] if outside else []):
        if target.exists() and not overwrite:
            raise FileExistsError(f"export: {target.resolve()} exists; pass --overwrite to replace it")
    bad = nonfinite_tensors(vae.state_dict())
    if discriminator is not None:
        bad += [f"discriminator.{k}" for k in nonfinite_tensors(discriminator.state_dict())]
    if bad:
        raise ExportError(f"refusing to export non-finite weights: {len(bad)} tensor(s) hold NaN/Inf: {bad[:10]}")

    # Latent scale, from every process's share of the calibration images.
    vae = vae.eval()
    check_images: list[torch.Tensor] = []  # the first few calibration images, for the checks below
    stats = measure_latent_stats(vae, _keep_first(calibration, check_images), gather)
    if not is_main:
        return None
    if not check_images:
        raise ValueError("export: the main process got no calibration image to verify the export with")
    x = check_images[0]

    # The model as exported: cast, with the measured scale in its config.
    exported = cast(vae, DTYPES[dtype])
    bad = nonfinite_tensors(exported.state_dict())
    if bad:
        raise ExportError(f"weights out of {dtype}'s range become infinite: {bad[:10]}; export in fp32 or bf16")
    scale = scale_fields(stats, latent_norm)
    fp16 = fp16_overflow_check(vae, x)
    if fp16["overflow"]:
        verdict = (f"activations overflow (first in `{fp16['overflow'][0]}`, {len(fp16['overflow'])} modules): "
                   "pipelines must run this VAE in fp32 or bf16.")
    else:
        verdict = f"no overflow (peak |activation| {fp16['peak']:.4g}, fp16 max {FP16_MAX:.0f}) at {x.shape[-1]}²."
    force_upcast = bool(fp16["overflow"]) if dtype == "fp16" else bool(vae.config.force_upcast)
    exported.register_to_config(**scale, force_upcast=force_upcast)
    name = out_dir.resolve().name
    report = {
        "name": name, "date": datetime.date.today().isoformat(), "source": source, "step": step,
        "weights": weights, "dtype": dtype, "latent_norm": latent_norm, "parameters": count_parameters(vae),
        "config_hash": config_hash, "calibration": calibration_source, "latent_stats": stats,
        "config_scale": scale,
        "fp16": {"overflow_modules": fp16["overflow"], "peak_activation": fp16["peak"], "verdict": verdict,
                 "force_upcast": force_upcast, "resolution": x.shape[-1]},
    }
    metadata = {"format": "pt", "producer": f"first-stage {__version__}", "step": str(step),
                "config_hash": str(config_hash), "autoencoder_config": exported.to_json_string()}

    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        exported.save_config(tmp)
        _save(exported.state_dict(), tmp / WEIGHTS_NAME, metadata)
        if single_path is not None:
            tmp_single = tmp / single_path.name
            _save(to_ldm_state_dict(exported), tmp_single, metadata)
            report["single_file"] = str(single_path if outside else out_dir / single_path)
        if config is not None:
            (tmp / BUNDLE_DIR).mkdir()
            if discriminator is not None:
                _save(discriminator.state_dict(), tmp / BUNDLE_DIR / "discriminator.safetensors", metadata)
            if logvar is not None:
                _save({"logvar": torch.tensor(float(logvar))}, tmp / BUNDLE_DIR / "loss.safetensors", metadata)
            bundle = bundle_config(config, out_dir, logvar, discriminator is not None)
            (tmp / BUNDLE_DIR / "config.yaml").write_text(to_yaml(bundle))
            report["bundle"] = sorted(p.name for p in (tmp / BUNDLE_DIR).iterdir())

        # Verification: read the files back the way users do and compare with the model in memory.
        tolerance = RELOAD_TOLERANCE[dtype]
        reloaded = AutoencoderKL.from_pretrained(tmp, torch_dtype=DTYPES[dtype]).to(vae.device)
        verification = {"images": x.shape[0], "tolerance": tolerance,
                        "diffusers": output_difference(exported, reloaded, x),
                        "cast_from_fp32": output_difference(vae, exported, x)}
        for key in scale:
            if reloaded.config[key] != exported.config[key]:
                raise ExportError(f"config.json holds {key}={reloaded.config[key]!r}, expected {exported.config[key]!r}")
        if single_path is not None:
            from_single = cast(AutoencoderKL.from_single_file(str(tmp_single), config=str(tmp)), DTYPES[dtype])
            verification["single_file"] = output_difference(exported, from_single.to(vae.device), x)
        report["verification"] = verification
        failed = {k: v for k, v in verification.items() if k in ("diffusers", "single_file") and not v <= tolerance}
        if failed:
            raise ExportError(f"export does not load back identical: max abs differences {failed} exceed {tolerance}")
        (tmp / "README.md").write_text(model_card(exported, report, config, evaluation))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1))

        if outside:
            single_path.parent.mkdir(parents=True, exist_ok=True)
            tmp_single.replace(single_path)
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
