"""The training step: what ``train/train.py``, ``scripts/bench_train.py`` and every new loss share.

The library is handed an ``Accelerator`` and never constructs one (:func:`accelerator_options` says
how the entry points build theirs). The pieces, in the order a run uses them:

- :func:`build_parts` builds the typed :class:`TrainingParts` from the config: the autoencoder in
  its wrapper, EMA, loss, discriminator, optimisers and scalers, prepared by the Accelerator;
- :func:`train_step` runs one optimiser step: ``grad_accum`` micro-batches, each through
  :func:`micro_step` (the generator's backward with the discriminator frozen, then the
  discriminator's on detached images), then :func:`optimizer_step` at the end of the window
  (learning rate, clipping, both optimisers, the discriminator's scaler, EMA, skip bookkeeping);
- :func:`validate` reconstructs the fixed validation batch with the EMA weights;
- :func:`trainer_states` is what ``first_stage.checkpoint.save_checkpoint`` writes beside
  Accelerate's state, and :func:`restore` reads a checkpoint back (safely: nothing in a checkpoint
  folder can run code).

:class:`TrainingState` holds the run's counters (``training_state.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin
from diffusers.training_utils import EMAModel
from torch import nn

from .checkpoint import (AUTOENCODER_CONFIG, CONFIG_FILE, ENCODER_ORIGIN, LOSS_TERMS, TRAINER_STATES, TRAINING_STATE,
                         CheckpointError, build_autoencoder, check_architecture, check_checkpoint, encoder_origin,
                         read_state, recorded_origin, trainer_state_file)
from .config import Config, ConfigError, LossConfig, OptimizerConfig, TrainConfig, changed_since, to_yaml
from .export import check_exportable
from .discriminator import build_discriminator, discriminator_side, load_discriminator
from .e2e import E2E_MEASURE_TAG, TRANSFORMER_EMA_FILE, E2ETerm, LatentBatchNorm, ema_update
from .latent_stats import latent_batch_stats
from .loss_term import BuiltSizes, StepDraw
from .losses import LPIPS_MIN_SIDE, GeneratorLoss, discriminator_step_loss
from .model import (AutoencoderWrapper, ForwardPlan, downsampling_factor, has_batch_norm, is_tiny, posterior_sample,
                    set_trainable)
from .perceptual import LPIPSWeightsNotFound, load_lpips
from .performance import (adamw, compile_in_place, compiled_parts, prepare_autoencoder, set_memory_format, set_tf32,
                          to_memory_format)
from .reports import save_grid
from .teacher import Teacher, TeacherTerm, adopt_encoder, check_student, load_teacher
from .terms import build_terms, check_config, shapes_vary


def accelerator_options(cfg: TrainConfig) -> dict:
    """``Accelerator`` arguments the step relies on (the entry points add trackers and folders)."""
    return {
        "mixed_precision": cfg.mixed_precision,
        # sync_with_dataloader=False: accumulation windows run across epoch ends, so one optimiser
        # step is always exactly grad_accum batches and the data position is step * grad_accum.
        "gradient_accumulation_plugin": GradientAccumulationPlugin(num_steps=cfg.grad_accum,
                                                                   sync_with_dataloader=False),
        # The shuffle order of epoch e depends on (seed, e) only, so a resumed run sees the same order.
        "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    }


@dataclass
class TrainingState:
    """The run's counters, saved with every checkpoint as ``training_state.json``."""

    step: int = 0  # optimiser updates done (skipped ones included)
    skipped_steps: int = 0  # non-finite losses, empty batches or overflowing fp16 gradients
    consecutive_nonfinite: int = 0
    consecutive_empty: int = 0  # steps skipped in a row because some process got no decodable image
    consecutive_vanishing: int = 0  # optimiser steps in a row whose VAE gradient norm was at most vanishing_grad_norm
    consecutive_vanishing_transformer: int = 0  # the same of the e2e transformer's gradient norm
    last_finite_step: int = -1
    skipped_images: int = 0  # corrupt or undecodable
    upsized_images: int = 0  # smaller than the crop
    # The layout of the run that wrote the checkpoint: the results of CPU kernels depend on the
    # thread count, and the reduction order on the number of processes (see note_layout).
    threads: int = 0
    world_size: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


@dataclass
class TrainingParts:
    """Everything a step touches. ``model`` and ``discriminator`` are as Accelerate prepared them
    (DDP-wrapped on several processes); ``raw_*`` are the modules themselves."""

    model: nn.Module
    raw_model: AutoencoderWrapper
    optimizer: torch.optim.Optimizer
    ema: EMAModel
    loss_fn: GeneratorLoss
    disc_lr: float
    discriminator: nn.Module | None = None
    raw_discriminator: nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    disc_scaler: torch.amp.GradScaler | None = None
    # A VAE started from released weights: what first_stage.checkpoint.encoder_origin says of it at the start
    encoder_origin: dict | None = None
    teacher: Teacher | None = None  # the frozen teacher of a distillation or fp16-safe run (config section teacher)
    # End-to-end tuning (config section e2e, first_stage.e2e): its loss term (the align pass, the transformer's
    # loss), the transformer (DDP-wrapped on several processes) and the module itself, its EMA, optimiser, scaler
    e2e: E2ETerm | None = None
    transformer: nn.Module | None = None
    raw_transformer: nn.Module | None = None
    transformer_ema: nn.Module | None = None
    transformer_optimizer: torch.optim.Optimizer | None = None
    transformer_scaler: torch.amp.GradScaler | None = None

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a ``resolution``² image."""
        config = self.raw_model.vae.config
        side = resolution // downsampling_factor(config)
        return config.latent_channels, side, side


@dataclass
class StepMeter:
    """Throughput since the last :meth:`reset`: images over all processes, and the time spent
    waiting for batches (decoding not hidden behind the step)."""

    images: int = 0
    data_wait: float = 0.0
    start: float = field(default_factory=time.time)

    def logs(self) -> dict:
        elapsed = time.time() - self.start
        return {"train/images_per_s": self.images / elapsed, "train/data_wait_fraction": self.data_wait / elapsed}

    def reset(self) -> None:
        self.images, self.data_wait, self.start = 0, 0.0, time.time()


# Test hooks (train/train.py's FIRST_STAGE_INJECT_* variables): what the generator loss of a step is multiplied by.
# (the VAE's generator and discriminator losses, the e2e transformer's loss)
INJECTED = {"nonfinite": (float("nan"), float("nan")), "zero": (0.0, 0.0), "nonfinite_transformer": (1.0, float("nan"))}


def lr_factor(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Linear warm-up, then constant or cosine decay to ``final_lr_ratio``; a pure function of the
    step, so restoring the step restores the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_perceptual(cfg: LossConfig, accelerator) -> nn.Module | None:
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


def compile_step(config: Config, vae, perceptual: nn.Module | None, discriminator: nn.Module | None) -> None:
    """``torch.compile`` the step's networks in place: encoder, decoder, LPIPS, discriminator (static
    shapes, or automatic dynamic ones where a term makes sizes vary)."""
    compile_in_place(compiled_parts(vae) + [perceptual, discriminator], config.performance,
                     static=not shapes_vary(config))


def check_sizes(config: Config, perceptual: bool, factor: int, terms: list | None = None) -> None:
    """Every term's size checks (of ``terms``, default the config's), before the first step: the images a
    term makes must be at least what LPIPS (when ``perceptual`` loaded), the discriminator and the latent
    grid (``factor``) take."""
    dcfg = config.discriminator
    lpips_on = perceptual and config.loss.perceptual_weight > 0
    sizes = BuiltSizes(factor=factor, lpips_side=LPIPS_MIN_SIDE if lpips_on else 1,
                       discriminator_side=discriminator_side(dcfg) if dcfg.enabled else 1)
    for term in build_terms(config) if terms is None else terms:
        term.check_sizes(sizes)


def build_loss(config: Config, vae, accelerator,
               teacher: Teacher | None = None) -> tuple[GeneratorLoss, nn.Module | None]:
    """The generator loss with the run's terms (``first_stage.terms``) built and their size checks
    passed, and the trained module a term adds to the forward pass (the alignment projection), or None.
    ``teacher``: the run's frozen teacher (:func:`first_stage.teacher.load_teacher`), for its term."""
    perceptual = build_perceptual(config.loss, accelerator)
    terms = build_terms(config)
    for term in terms:
        if isinstance(term, TeacherTerm):
            term.teacher = teacher
    check_sizes(config, perceptual is not None, downsampling_factor(vae.config), terms)
    heads = {term.name: head for term in terms if (head := term.build(vae, accelerator.device)) is not None}
    if len(heads) > 1:  # the wrapper's one slot, whose weights checkpoints and exports know as projection.*
        raise NotImplementedError(f"terms {sorted(heads)} each add a trained module; the training wrapper holds one")
    return GeneratorLoss(config.loss, terms, perceptual), next(iter(heads.values()), None)


def build_parts(config: Config, accelerator) -> TrainingParts:
    """The autoencoder (in its wrapper), EMA, loss, discriminator and optimisers, with the
    performance switches applied, prepared by ``accelerator``."""
    pcfg, tcfg, dcfg, ocfg = config.performance, config.train, config.discriminator, config.optimizer
    check_config(config)  # done at load too; a config built in code is checked here
    set_tf32(pcfg.tf32)
    vae = build_autoencoder(config.model)
    teacher = load_teacher(config, accelerator.device)
    if teacher is not None:
        check_student(vae, teacher)
        if config.model.init_from is None and not is_tiny(vae):
            adopt_encoder(vae, teacher)  # a fresh student's latents are its teacher's
    # not after training (an AutoencoderTiny decodes its teacher's normalised latents: the teacher's are checked)
    check_exportable(config.export.latent_norm, teacher.vae if is_tiny(vae) else vae, config.data.resolution,
                     "data.resolution", e2e=config.e2e.enabled)
    # a student that took its teacher's encoder has the teacher's origin (its export keeps the normalisation)
    origin = None if is_tiny(vae) else encoder_origin(config.model.init_from or config.teacher.path, vae)
    set_trainable(vae, config.model.trainable)
    prepare_autoencoder(vae, pcfg, accelerator.device)
    loss_fn, projection = build_loss(config, vae, accelerator, teacher)
    perceptual = loss_fn.perceptual
    model = AutoencoderWrapper(vae, config.loss.logvar_init, config.loss.learn_logvar, projection, teacher)
    ema = EMAModel(vae.parameters(), decay=tcfg.ema_decay, use_ema_warmup=tcfg.ema_warmup)
    discriminator = build_discriminator(dcfg) if dcfg.enabled else None
    if discriminator is not None and dcfg.init_from is not None:
        load_discriminator(discriminator, dcfg.init_from)
    if discriminator is not None and dcfg.norm == "batch" and accelerator.num_processes > 1:
        if accelerator.device.type == "cuda":
            discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        else:  # torch's SyncBatchNorm runs on GPUs only
            accelerator.print("note: BatchNorm statistics of the discriminator are per process "
                              "(no SyncBatchNorm off GPU)")
    set_memory_format([model, perceptual, discriminator], pcfg)
    if pcfg.compile:
        compile_step(config, vae, perceptual, discriminator)

    # The discriminator keeps its own GradScaler: Accelerate's single scaler updates at every
    # optimiser step, which would unscale the second optimiser with a changed scale.
    disc_lr = ocfg.lr if ocfg.disc_lr is None else ocfg.disc_lr
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], ocfg, ocfg.lr, pcfg.fused_optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = TrainingParts(model=model, raw_model=accelerator.unwrap_model(model), optimizer=optimizer, ema=ema,
                          loss_fn=loss_fn, disc_lr=disc_lr, encoder_origin=origin, teacher=teacher)
    if discriminator is not None:
        parts.disc_optimizer = adamw(discriminator.parameters(), ocfg, disc_lr, pcfg.fused_optimizer)
        parts.discriminator = accelerator.prepare_model(discriminator)
        parts.raw_discriminator = accelerator.unwrap_model(parts.discriminator)
        parts.disc_scaler = torch.amp.GradScaler(accelerator.device.type, enabled=tcfg.mixed_precision == "fp16")
    e2e = next((term for term in loss_fn.terms if isinstance(term, E2ETerm)), None)
    if e2e is not None:
        attach_transformer(parts, e2e, config, accelerator)
    return parts


def attach_transformer(parts: TrainingParts, e2e: E2ETerm, config: Config, accelerator) -> None:
    """End-to-end tuning's transformer in ``parts``: DDP-wrapped on several processes (its own module, not one
    of Accelerate's: it has its own optimiser and GradScaler, like the discriminator, and its checkpoint files
    are named, not numbered), its AdamW (section e2e's settings, constant learning rate) and fp16 GradScaler."""
    vae = parts.raw_model.vae
    if has_batch_norm(vae) and config.e2e.bn_eps != vae.config.batch_norm_eps:
        raise ConfigError(f"e2e.bn_eps: the transformer's BatchNorm becomes the VAE's bn, whose eps is "
                          f"{vae.config.batch_norm_eps:g}; set e2e.bn_eps={vae.config.batch_norm_eps:g}")
    if e2e.ema_missing:
        accelerator.print(f"note: e2e.init_from: no {TRANSFORMER_EMA_FILE} beside {config.e2e.init_from}; the "
                          "transformer's EMA (the exported normaliser's source) starts as a copy of the transformer")
    raw = e2e.transformer
    transformer = raw
    if accelerator.num_processes > 1:
        device = accelerator.device
        transformer = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)
    parts.e2e, parts.transformer, parts.raw_transformer, parts.transformer_ema = e2e, transformer, raw, e2e.ema
    parts.transformer_optimizer = adamw(raw.parameters(), config.e2e, config.e2e.lr, config.performance.fused_optimizer)
    parts.transformer_scaler = torch.amp.GradScaler(accelerator.device.type,
                                                    enabled=config.train.mixed_precision == "fp16")


def note_layout(accelerator, state: TrainingState) -> None:
    """Record this run's CPU thread count and process count in ``state``, warning when a resumed
    checkpoint was written under others: the run then continues equal to float rounding, not bit
    for bit (``accelerate launch`` sets one OMP thread per process; plain ``python`` uses every core)."""
    now = {"threads": torch.get_num_threads(), "world_size": accelerator.num_processes}
    before = {"threads": state.threads, "world_size": state.world_size}
    changed = {k: (before[k], now[k]) for k in now if before[k] and before[k] != now[k]}
    if changed:
        accelerator.print("warning: the checkpoint was written with " + ", ".join(
            f"{k} {a} (now {b})" for k, (a, b) in changed.items()) + "; the resumed run equals an uninterrupted one "
            "to float rounding, not bit for bit. Launch as before (e.g. the same OMP_NUM_THREADS) for an exact resume.")
    state.threads, state.world_size = now["threads"], now["world_size"]


def run_files(config: Config, parts: TrainingParts) -> dict[str, str]:
    """The text files every checkpoint of the run holds beside its state: the resolved config, the
    autoencoder's config, and what trains the weights (the model card's lines, LPIPS skipped or not);
    for a VAE started from released weights, that source and the fingerprint of its encoder at the start."""
    files = {CONFIG_FILE: to_yaml(config), AUTOENCODER_CONFIG: parts.raw_model.vae.to_json_string(),
             LOSS_TERMS: json.dumps(parts.loss_fn.card_lines(), indent=1, ensure_ascii=False)}
    if parts.encoder_origin is not None:
        files[ENCODER_ORIGIN] = json.dumps(parts.encoder_origin, indent=1)
    return files


def trainer_states(parts: TrainingParts) -> dict[str, object]:
    """The state a checkpoint holds beside Accelerate's (file name → object with ``state_dict``):
    ``first_stage.checkpoint.save_checkpoint`` writes it, :func:`restore` reads it back."""
    return {file: getattr(parts, name) for name, file in TRAINER_STATES.items() if getattr(parts, name) is not None}


def restore(accelerator, parts: TrainingParts, path: Path, config: Config | None = None) -> TrainingState:
    """Resume from checkpoint folder ``path``: every file is checked first (nothing restored from a
    folder with a corrupt file, a pickle that would run code, or weights of another architecture),
    then Accelerate's state (models, optimiser, RNG) and the trainer's own. Returns the run's counters.
    With the run's ``config``, a checkpoint saved before a key that changes its objective existed is
    resumed with a warning that gives the ``--set`` to keep what it trained with."""
    check_checkpoint(path)
    models = [parts.raw_model] + ([parts.raw_discriminator] if parts.raw_discriminator is not None else [])
    check_architecture(path, json.loads(parts.raw_model.vae.to_json_string()), models)
    saved = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    trained = (saved.get("model") or {}).get("trainable", "all")
    if config is not None and trained != config.model.trainable:  # the optimiser holds the other parameter set
        raise CheckpointError(f"{path} was trained with model.trainable={trained}, this config says "
                              f"{config.model.trainable}: its optimiser state is for the other set of parameters. "
                              f"Resume with --set model.trainable={trained}, or start a new run (another "
                              "train.run_name) with model.init_from set to this run")
    keep = changed_since(saved, config) if config else []
    if keep:
        accelerator.print(f"warning: {path} was trained before " + ", ".join(k.split("=")[0] for k in keep)
                          + " existed; this config switches what it trained with. To keep it, resume with "
                          + " ".join(f"--set {k}" for k in keep))
    legacy = sorted(path.glob("custom_checkpoint_*.pkl"))  # first-stage 0.1: Accelerate would unpickle them
    with tempfile.TemporaryDirectory() as view:
        if legacy:  # Accelerate refuses a folder with more custom_checkpoint files than registered objects
            for file in path.iterdir():
                if file not in legacy:
                    (Path(view) / file.name).symlink_to(file.resolve())
        accelerator.load_state(view if legacy else str(path))  # comes back on the CPU
    discriminator = parts.discriminator is not None
    for name in TRAINER_STATES:
        if getattr(parts, name) is not None:
            file = trainer_state_file(path, name, discriminator)
            if not file.is_file():
                raise CheckpointError(f"{file} not found: the checkpoint was written by a run without it (e.g. "
                                      "without e2e.enabled); resume with the run's own config, or start a new run "
                                      "with model.init_from set to this run")
            try:
                getattr(parts, name).load_state_dict(read_state(file))
            except (RuntimeError, ValueError, KeyError) as err:
                raise CheckpointError(f"{file} does not fit this config's {name}: {str(err)[:300]}. Resume with "
                                      f"the run's own config: --config {path / CONFIG_FILE}") from None
    # the released VAE the run started from, as the run recorded it then (init_from may have changed since)
    parts.encoder_origin = recorded_origin(path)
    state = TrainingState()
    state.load_state_dict(json.loads((path / TRAINING_STATE).read_text()))
    return state


def sum_over_processes(accelerator, *values: float) -> list[float]:
    """Sum scalars over all processes (one collective); keeps the processes in lock-step."""
    if accelerator.num_processes == 1:
        return list(values)
    return accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum").tolist()


def first_image(micro: int, accelerator, batch: int) -> int:
    """The place of this process's first image of micro-batch ``micro`` in the step's global batch."""
    return (micro * accelerator.num_processes + accelerator.process_index) * batch


def forward_plan(parts: TrainingParts, draw: StepDraw) -> ForwardPlan:
    """What this micro-batch's forward pass does besides encode, sample, decode: each term's part
    (EQ-VAE's transform, the same on every process and micro-batch of the step; the
    scale-equivariance decodes; the decoder noise of this process's images, per image)."""
    plan = ForwardPlan()
    for term in parts.loss_fn.terms:
        term.plan(plan, draw)
    return plan


def posterior_noise(seed: int, step: int, micro: int, accelerator, batch: int, n: int, latent_shape) -> torch.Tensor:
    """N(0, I) noise for this process's ``n`` images of the step, (n, C, h, w).

    Each image's noise comes from its own generator, seeded by (seed, step, its place in the step's
    global batch in the order the data is sharded), so a run draws the same noise per image
    whatever its process count, accumulation or resume point.
    """
    first = first_image(micro, accelerator, batch)
    draws = [torch.randn(latent_shape, generator=torch.Generator().manual_seed(hash((seed, step, first + i))))
             for i in range(n)]
    return torch.stack(draws).to(accelerator.device)


def micro_step(accelerator, parts: TrainingParts, x: torch.Tensor, noise: torch.Tensor, step: int,
               config: Config, inject: str | None = None, plan: ForwardPlan | None = None) -> tuple[bool, dict]:
    """One micro-batch's backward passes: the generator's with the discriminator frozen, then the
    discriminator's on detached images (under equivariance: the transformed target and its
    reconstruction, as in EQ-VAE). Returns (the loss was finite on every process, logs); a
    non-finite loss backpropagates nothing anywhere."""
    dcfg = config.discriminator
    x = to_memory_format(x, config.performance)
    if step < dcfg.pretrain_steps:  # the discriminator's pre-training: the VAE only reconstructs, without a graph
        with torch.no_grad():
            out = parts.model(x, noise, plan)
        parts.raw_discriminator.requires_grad_(True)
        d_loss, logs = discriminator_step_loss(parts.discriminator, out.target, out.reconstruction, dcfg.loss)
        if inject is not None:
            d_loss = d_loss * INJECTED[inject][0]
        finite = sum_over_processes(accelerator, float(not torch.isfinite(d_loss).item()))[0] == 0
        if finite:
            parts.disc_scaler.scale(d_loss / config.train.grad_accum).backward()
        return finite, logs
    # The discriminator is frozen and called unwrapped here (it gets no gradient, so it must not
    # enter a DDP collective).
    if parts.raw_discriminator is not None:
        parts.raw_discriminator.requires_grad_(False)
    out = parts.model(x, noise, plan)
    if parts.e2e is not None:
        e2e_start(parts, out.z, plan)
    loss, logs = parts.loss_fn(out, step, parts.raw_discriminator, parts.raw_model.last_layer(),
                               parts.raw_model.encoder_last_layer(), plan)
    if inject is not None:
        loss = loss * INJECTED[inject][0]
    finite = sum_over_processes(accelerator, float(not torch.isfinite(loss).item()))[0] == 0
    if finite:
        accelerator.backward(loss)
        if parts.discriminator is not None and step >= dcfg.start:
            parts.raw_discriminator.requires_grad_(True)
            d_loss, d_logs = discriminator_step_loss(parts.discriminator, out.target, out.reconstruction, dcfg.loss)
            parts.disc_scaler.scale(d_loss / config.train.grad_accum).backward()
            logs.update(d_logs)
    if finite and parts.e2e is not None:  # the transformer's step on the detached latent: never reaches the VAE
        transformer_loss, t_logs = parts.e2e.transformer_loss(parts.transformer, out.z, plan.diffusion)
        if inject is not None:
            transformer_loss = transformer_loss * INJECTED[inject][1]
        logs.update(t_logs)
        finite = sum_over_processes(accelerator, float(not torch.isfinite(transformer_loss).item()))[0] == 0
        if finite:
            parts.transformer_scaler.scale(transformer_loss / config.train.grad_accum).backward()
    return finite, logs


def e2e_start(parts: TrainingParts, z: torch.Tensor, plan: ForwardPlan) -> None:
    """Before the align pass of the run's first step: the transformer's BatchNorm (and its EMA's) starts from
    the measured statistics of this micro-batch's latents over every process (REPA-E's ``init_bn``)."""
    if int(parts.raw_transformer.bn.num_batches_tracked) == 0 and not parts.e2e.measured:  # a skipped step undoes
        parts.e2e.start_statistics(LatentBatchNorm.sums(parts.e2e.layout.layout(z.detach().float())))


@torch.no_grad()
def e2e_measure(accelerator, parts: TrainingParts, batches, seed: int) -> int:
    """Before the first step of a new run (``e2e.bn_init_images``): the transformer's BatchNorm, and its EMA's,
    start from the per-channel mean and variance of posterior samples of ``batches`` (this process's share of
    the images, :func:`first_stage.data.calibration_batches`), summed over every process: REPA-E measures its
    dataset before training (``init_bn``). Each image's sample is seeded by (seed, its id). Returns the
    images measured over all processes."""
    vae = parts.raw_model.vae
    sums = torch.zeros(1 + 2 * parts.e2e.channels, dtype=torch.float64, device=accelerator.device)
    images = 0
    for batch in batches:
        x = batch["pixel_values"].to(accelerator.device)
        if x.shape[0] == 0:
            continue
        with accelerator.autocast():
            posterior = vae.encode(x).latent_dist
        noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(
            hash((seed, E2E_MEASURE_TAG, i)))) for i in batch["ids"]]).to(accelerator.device)
        sums += LatentBatchNorm.sums(parts.e2e.layout.layout(posterior_sample(posterior, noise).float()))
        images += x.shape[0]
    parts.e2e.start_statistics(sums)
    parts.e2e.measured = True
    return int(sum_over_processes(accelerator, images)[0])


def optimizer_step(accelerator, parts: TrainingParts, config: Config, state: TrainingState,
                   finite: bool, empty: bool) -> tuple[dict, bool]:
    """The end of an accumulation window, on every process alike: when every micro-batch was finite
    and none was empty, the learning rate of the step, clipping, the optimisers (the VAE's; the
    discriminator's and the e2e transformer's through their own scalers) and the EMAs; otherwise, or
    when a gradient norm is not finite, no change but the skip count. Then the gradients are cleared
    and the step counted. Returns (logs, whether train_step must put the buffers of the step's
    forward passes back: a non-finite loss or gradient, or an empty batch). During the
    discriminator's pre-training (``discriminator.pretrain_steps``) only the discriminator steps, at
    its constant learning rate; the schedule of both counts from its end."""
    ocfg, tcfg = config.optimizer, config.train
    pretrain = config.discriminator.pretrain_steps
    vae_trains = state.step >= pretrain
    logs, transformer_stepped = {}, False
    if finite and not empty:
        factor = lr_factor(state.step - pretrain, ocfg, tcfg.max_steps - pretrain) if vae_trains else 1.0
        if vae_trains:
            set_lr(parts.optimizer, ocfg.lr * factor)
            # the norm before clipping, unscaled (no clipping: a max norm of infinity multiplies by exactly 1)
            norm = accelerator.clip_grad_norm_(parts.model.parameters(), ocfg.grad_clip or math.inf).item()
            logs["train/grad_norm"] = norm
            norms = [norm]
            if parts.transformer_optimizer is not None:
                norms.append(transformer_grad_norm(parts, config.e2e.grad_clip))
                logs["train/e2e_grad_norm"] = norms[-1]
            # a finite loss with an infinite gradient (fp16's GradScalers skip theirs themselves)
            finite = tcfg.mixed_precision == "fp16" or all(map(math.isfinite, norms))
        if finite and vae_trains:
            state.consecutive_vanishing = state.consecutive_vanishing + 1 if norms[0] <= tcfg.vanishing_grad_norm else 0
            parts.optimizer.step()
            # under fp16 the VAE's overflow skips the transformer too (and its EMA): the step is one
            if parts.transformer_optimizer is not None and not accelerator.optimizer_step_was_skipped:
                vanished = norms[1] <= tcfg.vanishing_grad_norm
                state.consecutive_vanishing_transformer = state.consecutive_vanishing_transformer + 1 if vanished else 0
                transformer_stepped = step_scaled(parts.transformer_scaler, parts.transformer_optimizer)
        disc_grads = parts.disc_optimizer is not None and any(p.grad is not None
                                                               for p in parts.discriminator.parameters())
        if finite and disc_grads:
            set_lr(parts.disc_optimizer, parts.disc_lr * factor)
            parts.disc_scaler.unscale_(parts.disc_optimizer)
            if ocfg.grad_clip:
                logs["train/disc_grad_norm"] = torch.nn.utils.clip_grad_norm_(parts.discriminator.parameters(),
                                                                              ocfg.grad_clip).item()
            parts.disc_scaler.step(parts.disc_optimizer)
            parts.disc_scaler.update()
    for optimizer in (parts.optimizer, parts.disc_optimizer, parts.transformer_optimizer):
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)

    if finite and not empty and not (vae_trains and accelerator.optimizer_step_was_skipped):
        if tcfg.ema and vae_trains:
            parts.ema.step(parts.raw_model.vae.parameters())
        if transformer_stepped:
            ema_update(parts.transformer_ema, parts.raw_transformer, config.e2e.ema_decay)
        state.consecutive_nonfinite, state.consecutive_empty, state.last_finite_step = 0, 0, state.step
    else:
        reason = ("empty batch" if empty else "non-finite loss or gradient" if not finite else "fp16 overflow")
        state.skipped_steps += 1
        state.consecutive_nonfinite += 0 if finite else 1
        state.consecutive_empty = state.consecutive_empty + 1 if empty else 0
        accelerator.print(f"step {state.step}: skipped ({reason})")
    state.step += 1
    return logs, not finite or empty


def step_scaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step(optimizer)`` and ``update()``; whether the optimiser stepped (an fp16 scaler skips a step whose
    gradients overflowed, and lowers its scale)."""
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return scale is None or scaler.get_scale() >= scale


def transformer_grad_norm(parts: TrainingParts, clip: float | None) -> float:
    """The e2e transformer's gradient norm, unscaled, before clipping at ``clip`` (None: no clipping)."""
    parts.transformer_scaler.unscale_(parts.transformer_optimizer)
    return torch.nn.utils.clip_grad_norm_(parts.raw_transformer.parameters(), clip or math.inf).item()


def train_step(accelerator, parts: TrainingParts, config: Config, state: TrainingState, batches: Iterator[dict],
               meter: StepMeter | None = None, inject: str | None = None) -> dict:
    """One optimiser step: ``train.grad_accum`` micro-batches from ``batches`` (dicts with
    ``pixel_values``, ``skipped``, ``upsized``), then :func:`optimizer_step`. Updates ``state``
    (step, image counts) and ``meter``; returns the step's logs: each loss is the mean over the
    window's micro-batches and over processes, so 1×4, 2×2 and accumulated 2×2 layouts log alike.

    A window in which every image of some process's batch was undecodable is skipped on every
    process: a partial window would step with gradients that were never synchronised.
    """
    tcfg = config.train
    accumulated = [m for m in (parts.model, parts.discriminator, parts.transformer) if m is not None]
    finite, empty, sums, micro_batches, step_logs = True, False, {}, 0, {}
    # Forward passes in train mode update buffers (the discriminator's BatchNorm statistics): a
    # skipped step puts them back, so that it changes nothing at all.
    buffers = [(b, b.clone()) for module in (parts.raw_model, parts.raw_discriminator, parts.raw_transformer)
               if module is not None
               for b in module.buffers()]
    for micro in range(tcfg.grad_accum):
        wait = time.time()
        batch = next(batches)
        x = batch["pixel_values"]
        if meter is not None:
            meter.data_wait += time.time() - wait
            meter.images += x.shape[0] * accelerator.num_processes
        skipped, upsized, no_image = sum_over_processes(accelerator, batch["skipped"], batch["upsized"],
                                                        x.shape[0] == 0)
        state.skipped_images += int(skipped)
        state.upsized_images += int(upsized)
        empty |= no_image > 0
        with accelerator.accumulate(*accumulated):
            if not empty:
                latent_shape = parts.latent_shape(x.shape[-1])
                noise = posterior_noise(tcfg.seed, state.step, micro, accelerator, tcfg.batch_size, x.shape[0],
                                        latent_shape)
                draw = StepDraw(tcfg.seed, state.step, first_image(micro, accelerator, tcfg.batch_size), x.shape[0],
                                latent_shape, accelerator.device)
                plan = forward_plan(parts, draw)
                micro_finite, micro_logs = micro_step(accelerator, parts, x, noise, state.step, config,
                                                      inject, plan)
                finite &= micro_finite
                micro_batches += 1
                for key, value in micro_logs.items():
                    sums[key] = sums.get(key, 0.0) + value
            if accelerator.sync_gradients:
                step_logs, undo = optimizer_step(accelerator, parts, config, state, finite, empty)
                if undo:
                    with torch.no_grad():
                        for buffer, saved in buffers:
                            buffer.copy_(saved)
    if not accelerator.sync_gradients:
        raise RuntimeError(f"train_step: {tcfg.grad_accum} micro-batches did not end an accumulation window; "
                           "build the Accelerator with trainer.accelerator_options(config.train)")
    # Every process ran the same micro-batches (an empty one stops the window everywhere), so the
    # keys agree and one collective averages them.
    keys = sorted(sums)
    totals = sum_over_processes(accelerator, *(sums[k] / micro_batches for k in keys)) if keys else []
    return {**{k: t / accelerator.num_processes for k, t in zip(keys, totals)}, **step_logs}


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> float:
    """Mean PSNR in dB of reconstructions (clamped to [-1, 1]) of images in [-1, 1] (peak-to-peak 2: peak² = 4)."""
    mse = (reconstruction.clamp(-1, 1) - images).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean().item()


@torch.no_grad()
def validate(parts: TrainingParts, val_images: torch.Tensor, use_ema: bool, grid_path: Path) -> dict:
    """Reconstruct the fixed validation batch with the EMA weights; save a grid; return statistics."""
    vae = parts.raw_model.vae
    if use_ema:
        parts.ema.store(vae.parameters())
        parts.ema.copy_to(vae.parameters())
    vae.eval()
    reconstruction, posterior = parts.raw_model.reconstruct(val_images)
    reconstruction = reconstruction.float()
    # an AutoencoderTiny student ships its own encoder too: its round trip beside the teacher's latents decoded
    own = vae.decode(vae.encode(val_images).latents).sample.float() if parts.raw_model.teacher is not None else None
    vae.train()
    if use_ema:
        parts.ema.restore(vae.parameters())
    stats = {"val/psnr": psnr(reconstruction, val_images)}
    if own is not None:
        stats["val/psnr_own_encoder"] = psnr(own, val_images)
    stats.update(latent_batch_stats(posterior))
    save_grid(val_images, reconstruction, grid_path)
    return stats
