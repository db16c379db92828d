"""Checkpoints and every other source of VAE weights: the one module that knows their file names.

- Writing: :func:`save_checkpoint` (``accelerator.save_state`` into a hidden folder, renamed when
  complete). The Accelerator is handed in, never constructed here.
- Discovery and resume: :func:`checkpoint_dirs`, :func:`resolve_resume`.
- Reading: :func:`load_vae` takes any source — a training run folder (its newest checkpoint), a
  checkpoint folder, a diffusers ``AutoencoderKL`` or ``AutoencoderKLFlux2`` folder, a latent-diffusion
  single file (``.safetensors``/``.ckpt``, with its discriminator and log-variance when it holds them), or
  a FLUX.2 VAE in Black Forest Labs' layout (``ae.safetensors``) — and is what ``model.init_from``,
  ``scripts/export.py`` and the ``eval/`` scripts call.

A checkpoint folder ``checkpoint-<step>/`` holds Accelerate's files (prepared models as
``model.safetensors``, ``model_1.safetensors``; the optimiser, RNG states) and this package's:
the trainer's own state (:data:`TRAINER_STATES`: EMA, the discriminator's optimiser and scaler),
``config.yaml``, ``autoencoder_config.json`` and ``training_state.json``. Nothing in it is ever read
in a way that can run code (:func:`check_checkpoint` refuses a folder before anything is restored).
"""

from __future__ import annotations

import datetime
import functools
import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate.utils import load as accelerate_load
from accelerate.utils.constants import SAFE_MODEL_NAME
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file

from .config import Config, ConfigError, ModelConfig, exported_weights, load_config
from .convert import (autoencoder_from_bfl, autoencoder_from_ldm, check_batch_norm, is_bfl_layout, read_weights,
                      split_ldm_checkpoint, vavae_projection)
from .latent_norm import LatentNormalizer
from .model import (Autoencoder, autoencoder_from_config, class_of_config, encoder_fingerprint, has_batch_norm,
                    new_autoencoder, preset_class)


def accelerate_model_file(index: int) -> str:
    """The file ``accelerator.save_state`` writes the ``index``-th prepared model to."""
    return f"{SAFE_MODEL_NAME}{'' if index == 0 else f'_{index}'}.safetensors"


# The trainer's own state beside Accelerate's, by the attribute of TrainingParts that holds it. Written
# with torch.save and read only with torch.load(weights_only=True): Accelerate's
# register_for_checkpointing would read them back with weights_only=False, which runs any code a
# pickle in the folder carries.
TRAINER_STATES = {"ema": "ema.pt", "disc_optimizer": "disc_optimizer.pt", "disc_scaler": "disc_scaler.pt",
                  # end-to-end tuning (first_stage.e2e): the transformer, its EMA (BatchNorm buffers included: the
                  # export's normaliser), its optimiser and GradScaler
                  "raw_transformer": "e2e_transformer.pt", "transformer_ema": "e2e_ema.pt",
                  "transformer_optimizer": "e2e_optimizer.pt", "transformer_scaler": "e2e_scaler.pt"}


def legacy_state_files(discriminator: bool) -> dict[str, str]:
    """Where checkpoints of first-stage 0.1 (before 2026-12) kept the same state: the objects were
    registered for checkpointing in this order and saved as ``custom_checkpoint_<i>.pkl``."""
    names = (["disc_optimizer", "disc_scaler"] if discriminator else []) + ["ema"]
    return {name: f"custom_checkpoint_{i}.pkl" for i, name in enumerate(names)}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely: corrupt, truncated, or a pickle that would run code."""


CHECKPOINT_PREFIX = "checkpoint-"
UNFINISHED_PREFIX = ".tmp-"  # a checkpoint being written; renamed to its final name when complete
AUTOENCODER_WEIGHTS = accelerate_model_file(0)  # the training wrapper: vae.* and logvar
DISCRIMINATOR_WEIGHTS = accelerate_model_file(1)
CONFIG_FILE = "config.yaml"  # the resolved training config
AUTOENCODER_CONFIG = "autoencoder_config.json"  # the autoencoder's diffusers config (its class in _class_name)
TRAINING_STATE = "training_state.json"  # the run's counters (first_stage.trainer.TrainingState)
# A run started from released weights: {"source", "fingerprint"} of its encoder (and FLUX.2-class BatchNorm) at
# the start (first_stage.model.encoder_fingerprint), and the normalisation the source states, so the export can
# tell whether the latents are still the source's (encoder_origin).
ENCODER_ORIGIN = "encoder_origin.json"
LOSS_TERMS = "loss_terms.json"  # what trained the weights, a model-card line per term (GeneratorLoss.card_lines)
STATUS_FILE = "status.json"  # <run>/status.json: how the run's last process ended (write_status)

# An export folder (first_stage.export): diffusers' config.json and weights, then this package's files.
EXPORT_WEIGHTS = "diffusion_pytorch_model.safetensors"
SINGLE_FILE_NAME = "vae_ldm.safetensors"  # the latent-diffusion key layout
BUNDLE_DIR = "finetune"  # discriminator, log-variance and a training config that continues from the export
EXPORT_REPORT = "export_report.json"


def is_checkpoint_name(path: Path) -> bool:
    """Whether ``path`` is named like a complete checkpoint folder, ``checkpoint-<step>``."""
    return path.name.startswith(CHECKPOINT_PREFIX) and path.name[len(CHECKPOINT_PREFIX):].isdigit()


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-<step>`` folder."""
    return int(path.name[len(CHECKPOINT_PREFIX):])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (unfinished ones are hidden)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_checkpoint_name(p)]
    return sorted(found, key=checkpoint_step)


def resolve_resume(resume: str, root: Path) -> Path:
    """``latest`` → the newest complete checkpoint under ``root``; otherwise the given folder."""
    if resume == "latest":
        found = checkpoint_dirs(root)
        if not found:
            raise FileNotFoundError(f"--resume latest: no {CHECKPOINT_PREFIX}<step> folder in {root.resolve()}")
        return found[-1]
    path = Path(resume)
    if not (path / TRAINING_STATE).is_file():
        raise FileNotFoundError(f"--resume {resume}: {path.resolve()} is not a complete checkpoint "
                                f"(no {TRAINING_STATE})")
    step = json.loads((path / TRAINING_STATE).read_text())["step"]
    newer = [p.name for p in checkpoint_dirs(root) if checkpoint_step(p) > step]
    if newer:
        # Rotation and "latest" go by step: the newer checkpoints of the abandoned run would win.
        raise CheckpointError(f"--resume {resume}: {root.resolve()} holds newer checkpoints {newer}; move them "
                              "elsewhere (or give the run another train.run_name) before going back to step "
                              f"{step}")
    return path


def save_checkpoint(accelerator, root: Path, step: int, files: dict[str, str], keep: int,
                    states: dict[str, object] | None = None) -> Path:
    """``accelerator.save_state`` into a hidden temporary folder, then rename it: a crash mid-save
    never leaves a folder that looks complete. ``files`` (name → text, e.g. the training state) and
    ``states`` (file name → an object whose ``state_dict()`` holds tensors and plain values) are
    written beside it. Keeps the newest ``keep`` checkpoints (all when ``keep`` ≤ 0)."""
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{UNFINISHED_PREFIX}{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process has written its files (RNG states) into tmp
        if accelerator.is_main_process:
            for name, text in files.items():
                (tmp / name).write_text(text)
            for name, obj in (states or {}).items():
                torch.save(obj.state_dict(), tmp / name)
    except Exception as err:  # OSError, torch.save's RuntimeError, safetensors' SafetensorError
        full = _disk_full(root, err)  # measured before the partial files are removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_failure(final, err, full)) from err
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _disk_full(root: Path, err: Exception) -> bool:
    """Whether a failed write to ``root`` ran out of space. torch.save says only "unexpected pos"
    on a full disk, so the free space decides where the error does not say."""
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
        return True
    if getattr(err, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):  # says what it is
        return False
    try:
        return shutil.disk_usage(root).free < 1 << 20
    except OSError:
        return False


def _save_failure(final: Path, err: Exception, full: bool) -> str:
    """Why checkpoint ``final`` could not be written, and which checkpoint is intact."""
    cause = "no space left on the device" if full else f"{type(err).__name__}: {str(err)[:300]}"
    intact = checkpoint_dirs(final.parent)
    last = (f"the newest intact checkpoint is {intact[-1]} (resume with --resume latest)" if intact
            else "the run has no complete checkpoint yet")
    return f"could not write checkpoint {final}: {cause}; its partial files were removed; {last}"


def read_state(file: Path):
    """What ``torch.save`` wrote to ``file``, read with ``weights_only=True`` (tensors, numbers,
    strings, containers and the numpy arrays of Accelerate's RNG states; never code)."""
    try:
        return accelerate_load(file, map_location="cpu")  # torch.load(weights_only=True) + numpy's safe globals
    except Exception as err:
        raise CheckpointError(f"{file}: refused, it is not a plain state file that loads with "
                              f"torch.load(weights_only=True) ({type(err).__name__}: {str(err)[:300]})") from None


def _recovery_hint(path: Path) -> str:
    """How to resume without a broken checkpoint ``path``."""
    if not is_checkpoint_name(path):
        return ""
    older = [p for p in checkpoint_dirs(path.parent) if checkpoint_step(p) < checkpoint_step(path)]
    if not older:
        return ""
    return (f" To resume from the previous checkpoint instead, move {path} out of {path.parent} "
            f"(e.g. to {path.parent.parent / ('broken-' + path.name)}); --resume latest then takes {older[-1].name}.")


def check_checkpoint(path: Path) -> None:
    """Read every file of checkpoint folder ``path`` the safe way before anything is restored from
    it: safetensors whole, JSON and YAML parsed, every pickle with ``weights_only=True``. Raises
    :class:`CheckpointError` naming the first file that fails, and how to go back one checkpoint."""
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                try:
                    load_file(str(file))
                except Exception as err:
                    raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt "
                                          f"({str(err)[:200]})") from None
            elif file.suffix == ".json":
                try:
                    json.loads(file.read_text())
                except (ValueError, UnicodeDecodeError) as err:
                    raise CheckpointError(f"{file}: not valid JSON ({err})") from None
            elif file.suffix in (".yaml", ".yml"):
                try:
                    yaml.safe_load(file.read_text())
                except (yaml.YAMLError, UnicodeDecodeError) as err:
                    raise CheckpointError(f"{file}: not valid YAML ({str(err)[:200]})") from None
            elif file.suffix in (".pkl", ".bin", ".pt", ".pth"):
                read_state(file)
        except CheckpointError as err:
            raise CheckpointError(f"{err}{_recovery_hint(path)}") from None


def weight_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of safetensors ``file``, read from its header (no tensor is loaded)."""
    with safe_open(str(file), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _differences(saved: dict, built: dict, limit: int = 5) -> list[str]:
    """Up to ``limit`` entries whose value differs between two dicts, with the count of the rest."""
    keys = [k for k in {**built, **saved} if saved.get(k, "absent") != built.get(k, "absent")]  # the model's order
    lines = [f"{k}: {saved.get(k, 'absent')} in the checkpoint, {built.get(k, 'absent')} in this config"
             for k in keys[:limit]]
    return lines + ([f"… and {len(keys) - limit} more"] if len(keys) > limit else [])


def check_architecture(path: Path, autoencoder_config: dict, models: list[torch.nn.Module]) -> None:
    """Refuse to resume from checkpoint ``path`` into models built from another architecture:
    ``autoencoder_config`` is the built autoencoder's config, ``models`` the modules in the order
    they were prepared (the weights of the ``i``-th are in :func:`accelerate_model_file` ``(i)``).
    Raises :class:`CheckpointError` naming the weights whose keys or shapes differ, the autoencoder
    settings that differ, and the run's saved config to resume with. Settings that leave every shape
    alone (e.g. ``scaling_factor``) do not refuse."""
    found = []
    for index, model in enumerate(models):
        file = path / accelerate_model_file(index)
        if file.is_file():
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            found += [f"{file.name}: {line}" for line in _differences(weight_shapes(file), shapes)]
    if not found:
        return
    if (path / AUTOENCODER_CONFIG).is_file():  # why the shapes differ, in the model's own terms
        ignored = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
        saved = json.loads((path / AUTOENCODER_CONFIG).read_text())
        kinds = [c.get("_class_name", "AutoencoderKL") for c in (saved, autoencoder_config)]
        found = [f"{AUTOENCODER_CONFIG}: {line}" for line in _differences(
            {k: v for k, v in saved.items() if k not in ignored},
            {k: v for k, v in autoencoder_config.items() if k not in ignored})] + found
        if kinds[0] != kinds[1]:  # the first thing to say
            found.insert(0, f"{AUTOENCODER_CONFIG}: the class, {kinds[0]} in the checkpoint, {kinds[1]} in this config")
    run_config = path / CONFIG_FILE  # the config the checkpoint was written under (the run's own copy is the same)
    # Alignment projections had a bias before they followed VA-VAE's bias-free linear_proj.
    bias = ("\nThe checkpoint's alignment projection has a bias: add --set alignment.projection_bias=true"
            if any(line.split(": ", 1)[-1].startswith("projection.bias: (") for line in found) else "")
    raise CheckpointError(
        f"{path} holds another architecture than this config builds:\n  " + "\n  ".join(found)
        + f"\nResume with the run's own config: --config {run_config} (or give this config another "
        "train.run_name to start a new run)" + bias)


def write_status(run_dir: Path, state: str, step: int | None, exit_code: int, reason: str) -> Path:
    """Write ``<run>/status.json`` atomically (a reader never sees half a file): ``state``
    (finished, stopped, nonfinite or failed), the step reached, the exit code, why, and the newest
    complete checkpoint, for schedulers that cannot see the exit code through ``accelerate launch``."""
    last = checkpoint_dirs(Path(run_dir) / "checkpoints")
    record = {"state": state, "step": step, "exit_code": exit_code, "reason": reason,
              "last_checkpoint": str(last[-1]) if last else None,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(run_dir) / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(Path(run_dir) / STATUS_FILE)
    return Path(run_dir) / STATUS_FILE


def is_run_or_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a training run folder (with checkpoints/) or one checkpoint folder."""
    path = Path(path)
    return (path / "checkpoints").is_dir() or (path / TRAINING_STATE).is_file()


def is_export(path: Path) -> bool:
    """Whether ``path`` is an export folder this package wrote (by the files it writes)."""
    path = Path(path)
    return all((path / name).is_file() for name in ("config.json", EXPORT_WEIGHTS, EXPORT_REPORT))


@dataclass
class LoadedVAE:
    """What :func:`load_vae` found: the autoencoder (eval mode, CPU, fp32) and what came with it.

    ``weights``, ``config`` and ``step`` are set for training checkpoints; ``discriminator`` (a state dict) and
    ``logvar`` for checkpoints and latent-diffusion files that hold them.
    """

    path: Path
    vae: Autoencoder
    weights: str = "as stored"  # of a checkpoint: "ema" or "raw"
    config: Config | None = None
    step: int | None = None
    discriminator: dict[str, torch.Tensor] | None = None
    logvar: float | None = None
    projection: dict[str, torch.Tensor] | None = None  # the alignment projection of a checkpoint
    loss_terms: list[str] | None = None  # of a checkpoint: what trained the weights (LOSS_TERMS)
    encoder_origin: dict | None = None  # of a checkpoint started from released weights (recorded_origin)

    # Of a checkpoint of end-to-end tuning (e2e.enabled): the transformer's state dict and its EMA's (whose BatchNorm
    # statistics are the export's normaliser), whatever ``weights`` says; read when first asked for (only the export
    # needs them: a DiT-B's two are about 1 GB), None for any other source.
    @functools.cached_property
    def transformer(self) -> dict[str, torch.Tensor] | None:
        return self._e2e_state("raw_transformer")

    @functools.cached_property
    def transformer_ema(self) -> dict[str, torch.Tensor] | None:
        return self._e2e_state("transformer_ema")

    def _e2e_state(self, name: str) -> dict[str, torch.Tensor] | None:
        if self.config is None or not self.config.e2e.enabled:
            return None
        return read_state(self.path / TRAINER_STATES[name])


def trainer_state_file(path: Path, name: str, discriminator: bool) -> Path:
    """The file of checkpoint ``path`` holding trainer state ``name`` (a key of :data:`TRAINER_STATES`),
    also in a checkpoint of first-stage 0.1."""
    file = path / TRAINER_STATES[name]
    legacy = path / legacy_state_files(discriminator).get(name, TRAINER_STATES[name])
    return legacy if not file.is_file() and legacy.is_file() else file


def _read_ema(path: Path, vae: Autoencoder, discriminator: bool) -> None:
    """Copy the EMA weights of checkpoint ``path`` into ``vae``, through diffusers' ``EMAModel`` (the
    class training saved them from)."""
    file = trainer_state_file(path, "ema", discriminator)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no EMA state {file.name}")
    state = read_state(file)
    params = list(vae.parameters())
    if "shadow_params" not in state or len(state["shadow_params"]) != len(params):
        raise ValueError(f"{file}: not an EMA state of this model (expected {len(params)} shadow_params)")
    shadow = EMAModel(params)
    shadow.load_state_dict(state)
    shadow.copy_to(params)


def read_checkpoint(path: Path, weights: str | None = "ema") -> LoadedVAE:
    """A training checkpoint (or a run folder: its newest checkpoint). The autoencoder holds the EMA
    weights (``weights="ema"``, when the run kept them) or the raw ones; ``None`` takes what the
    run's ``export.weights`` says (raw when it kept no EMA). Tensors come from safetensors or
    ``torch.load(weights_only=True)``. A checkpoint of end-to-end tuning also gives its transformer and the
    transformer's EMA (:data:`TRAINER_STATES`), as state dicts read when first asked for."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = resolve_resume("latest", path / "checkpoints")
    if not (path / TRAINING_STATE).is_file():
        raise FileNotFoundError(f"{path.resolve()} is neither a run folder (with checkpoints/) nor a complete "
                                f"checkpoint (with {TRAINING_STATE})")
    config = load_config(path / CONFIG_FILE)
    if weights is None:
        weights = exported_weights(config)
    arch = path / AUTOENCODER_CONFIG
    if arch.is_file():
        vae = autoencoder_from_config(json.loads(arch.read_text()), str(arch))
    elif config.model.init_from is None:
        vae = new_autoencoder(config.model)
    else:
        raise FileNotFoundError(f"{arch} is missing and the run started from {config.model.init_from}: "
                                "cannot tell the architecture")
    state = load_file(str(path / AUTOENCODER_WEIGHTS))  # the training wrapper: vae.* and logvar
    vae.load_state_dict({k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")})
    if weights == "ema":
        if not config.train.ema:
            raise ValueError(f"{path}: the run kept no EMA weights (train.ema: false); export --weights raw")
        _read_ema(path, vae, config.discriminator.enabled)
    elif weights != "raw":
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    disc_file = path / DISCRIMINATOR_WEIGHTS
    for name in ("raw_transformer", "transformer_ema") if config.e2e.enabled else ():  # read when asked for
        file = path / TRAINER_STATES[name]
        if not file.is_file():
            raise FileNotFoundError(f"{file.resolve()} not found: a checkpoint of a run with e2e.enabled keeps its "
                                    "transformer there (the EMA's BatchNorm statistics are the exported normaliser)")
    return LoadedVAE(
        path=path, vae=vae.eval(), weights=weights, config=config,
        step=int(json.loads((path / TRAINING_STATE).read_text())["step"]),
        discriminator=load_file(str(disc_file)) if config.discriminator.enabled and disc_file.is_file() else None,
        logvar=float(state["logvar"]) if "logvar" in state else None,
        projection={k[len("projection."):]: v for k, v in state.items() if k.startswith("projection.")} or None,
        loss_terms=json.loads((path / LOSS_TERMS).read_text()) if (path / LOSS_TERMS).is_file() else None,
        encoder_origin=recorded_origin(path),
    )


class UnreadableWeightsError(CheckpointError):
    """A VAE's weight file that cannot be read (truncated or corrupt); the message names the file."""


def check_weights_readable(file: Path) -> None:
    """Raise :class:`UnreadableWeightsError` naming safetensors ``file`` when its header does not read or
    does not cover the file (a truncated copy or download), before a loader fails on it less clearly."""
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as err:  # safetensors' SafetensorError, OSError
        raise UnreadableWeightsError(f"{Path(file).resolve()}: not a readable safetensors file, truncated or "
                                     f"corrupt ({str(err)[:200]})") from None


def load_vae(source: str | Path, weights: str | None = "ema", single_file_config: str | Path | None = None,
             overrides: dict | None = None, norm_num_groups: int | None = None) -> LoadedVAE:
    """Any source of VAE weights (see the module docstring), in eval mode on the CPU.

    ``weights`` picks EMA or raw weights of a training checkpoint (None: as the run's export
    section says). A single file written by this
    package carries its architecture in its metadata; for any other it is read off the weight
    shapes, except what weights do not show (GroupNorm groups: 32 as in latent-diffusion, unless
    ``norm_num_groups`` or ``overrides`` say otherwise), or taken from ``single_file_config`` (a
    diffusers folder, as ``from_single_file(config=)`` takes it).
    """
    path = Path(source)
    if norm_num_groups is not None:
        overrides = {**(overrides or {}), "norm_num_groups": norm_num_groups}
    if is_run_or_checkpoint(path):
        return read_checkpoint(path, weights)
    if path.is_file():
        if path.suffix == ".safetensors":
            check_weights_readable(path)
        if single_file_config is not None:
            return LoadedVAE(path, _single_file_with_config(path, Path(single_file_config)).eval())
        state, metadata = read_weights(path)
        vae_state, discriminator, logvar = split_ldm_checkpoint(state)
        if is_bfl_layout(vae_state):  # FLUX.2's ae.safetensors
            vae = autoencoder_from_bfl(vae_state, str(path.resolve()), metadata, overrides).eval()
        else:
            vae = autoencoder_from_ldm(vae_state, metadata, overrides, str(path.resolve())).eval()
        return LoadedVAE(path, vae, discriminator=discriminator or None,
                         logvar=None if logvar is None else float(logvar),
                         projection=vavae_projection(state, vae.config.latent_channels))  # a VA-VAE's linear_proj
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no VAE at {path.resolve()}: expected a training run (checkpoints/), a checkpoint "
            f"({TRAINING_STATE}), a diffusers AutoencoderKL or AutoencoderKLFlux2 folder "
            f"({path.resolve() / 'config.json'}) or a latent-diffusion or BFL weight file")
    config = json.loads((path / "config.json").read_text())
    cls = class_of_config(config, str(path.resolve() / "config.json"))
    files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))  # the diffusers weights, sharded or not
    for file in files:
        check_weights_readable(file)
    if cls.__name__ == "AutoencoderKLFlux2":
        # from_pretrained only warns when the BatchNorm statistics are missing, and goes on with mean 0, var 1
        if not files:
            raise ValueError(f"{path.resolve()}: no diffusion_pytorch_model*.safetensors; an AutoencoderKLFlux2 "
                             "folder is read from safetensors weights only (its BatchNorm statistics are checked)")
        stored = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                stored.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("bn.")})
        where = str(files[0].resolve()) if len(files) == 1 else f"{path.resolve()} (its weight shards)"
        patches = config.get("patch_size", [2, 2])
        check_batch_norm(stored, config.get("latent_channels", 32) * patches[0] * patches[1], where)
    return LoadedVAE(path, cls.from_pretrained(path).eval())


def _single_file_with_config(path: Path, config_dir: Path) -> Autoencoder:
    """A single file whose architecture a diffusers folder's config.json gives (``from_single_file(config=)``;
    diffusers' from_single_file refuses AutoencoderKLFlux2, so this package's import reads a BFL file)."""
    config = json.loads((config_dir / "config.json").read_text())
    if class_of_config(config, str(config_dir / "config.json")).__name__ == "AutoencoderKLFlux2":
        state, _ = read_weights(path)
        return autoencoder_from_bfl(split_ldm_checkpoint(state)[0], str(path.resolve()),
                                    {"autoencoder_config": json.dumps(config)})
    return AutoencoderKL.from_single_file(str(path), config=str(config_dir))


def encoder_origin(init_from: str | Path | None, vae: Autoencoder) -> dict | None:
    """Of a ``vae`` loaded from ``init_from``: the released VAE whose encoder (and FLUX.2-class BatchNorm) it
    started from, ``{"source", "fingerprint"}`` (:data:`ENCODER_ORIGIN`), for the export to keep or re-measure
    the latent normalisation by; for an ``AutoencoderKL`` also ``"normalisation"``, the config fields of the
    normalisation the source states (a diffusers folder's config.json, the metadata of a file this package
    wrote), or None (a latent-diffusion file states none). A released file or folder or an export is its own
    origin; a run or checkpoint hands on the origin it recorded, or None when it had none (trained from
    scratch: nothing released to keep). None for a fresh model."""
    if init_from is None:
        return None
    path = Path(init_from)
    if is_run_or_checkpoint(path):
        return recorded_origin(resolve_resume("latest", path / "checkpoints") if (path / "checkpoints").is_dir()
                               else path)
    origin = {"source": str(init_from), "fingerprint": encoder_fingerprint(vae)}
    if not has_batch_norm(vae):
        origin["normalisation"] = stated_normalisation(path)
    return origin


def recorded_origin(checkpoint: Path) -> dict | None:
    """The origin a checkpoint folder recorded (:data:`ENCODER_ORIGIN`), None when its run started from nothing
    released."""
    file = Path(checkpoint) / ENCODER_ORIGIN
    return json.loads(file.read_text()) if file.is_file() else None


def stated_normalisation(path: Path) -> dict | None:
    """The latent normalisation fields (scaling_factor, shift_factor, latents_mean, latents_std) a released
    ``AutoencoderKL`` states: in its folder's config.json, or in the metadata of a single file this package
    wrote; None when it states none (a latent-diffusion file: its scale was a constant of the code)."""
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
    elif path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("autoencoder_config", "{}"))
    else:
        return None
    if "scaling_factor" not in config:
        return None
    return LatentNormalizer.from_vae_config(config).config_entries()


def build_autoencoder(cfg: ModelConfig) -> Autoencoder:
    """The autoencoder a training config asks for: loaded from ``cfg.init_from`` (any source
    :func:`load_vae` takes; the EMA weights of a run) or freshly initialised from the preset."""
    if cfg.init_from is None:
        return new_autoencoder(cfg)
    vae = load_vae(cfg.init_from, overrides=cfg.overrides).vae.train()
    wanted = preset_class(cfg.preset)
    if wanted != type(vae).__name__ and "AutoencoderTiny" in (wanted, type(vae).__name__) or (
            wanted == "AutoencoderKLFlux2" and not has_batch_norm(vae)):
        raise ConfigError(f"model.preset {cfg.preset} is an {wanted}, but model.init_from {cfg.init_from} "
                          f"holds a {type(vae).__name__}")
    return vae
