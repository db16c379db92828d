"""The registry of loss terms (DiT's ``DiT_models`` idiom): every additive term of the generator loss,
by name, in the order its contribution is added. The generator loss, ``trainer.build_parts``, the
config checks at load, the model card, ``scripts/bench_train.py --terms`` and ``scripts/kl_study.py``
read it; nothing else lists the terms. A term is a :class:`~first_stage.loss_term.LossTerm`.
"""

from __future__ import annotations

from .alignment import AlignmentTerm
from .config import Config, ConfigError
from .discriminator import GANTerm
from .e2e import E2ETerm
from .equivariance import EqVAETerm, LatentNoiseTerm, ScaleEquivarianceTerm
from .fp16_safe import Fp16SafeTerm
from .loss_term import LossTerm, refuse_below
from .losses import reconstruction_card_line
from .regularizers import RegularizerTerm
from .teacher import TeacherTerm

TERMS: dict[str, type[LossTerm]] = {
    "regularizer": RegularizerTerm,
    "alignment": AlignmentTerm,
    "eq_vae": EqVAETerm,
    "scale_equivariance": ScaleEquivarianceTerm,
    "latent_noise": LatentNoiseTerm,
    "teacher": TeacherTerm,
    "fp16_safe": Fp16SafeTerm,
    "e2e": E2ETerm,
    "gan": GANTerm,
}


def check_config(config: Config) -> None:
    """Range and cross-section checks of a loaded config, naming the key: the run's own sections,
    then every registered term's (what needs the built model is checked by ``build_parts``)."""
    refuse_below(config, 1, "train.batch_size", "train.grad_accum", "train.log_every", "train.image_every",
                 "train.checkpoint_every", "train.max_nonfinite", "data.resolution", "export.calibration_images",
                 "data.prefetch_factor")
    refuse_below(config, 0, "train.max_vanishing_steps", "train.vanishing_grad_norm")
    refuse_below(config, 0, "train.max_steps", "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.lr",
                 "loss.perceptual_weight", "data.num_workers")  # train.keep_checkpoints <= 0 keeps them all
    if not 0 <= config.train.ema_decay <= 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1], got {config.train.ema_decay}")
    if not 0 <= config.optimizer.final_lr_ratio <= 1:
        raise ConfigError(f"optimizer.final_lr_ratio must be in [0, 1], got {config.optimizer.final_lr_ratio}")
    if config.optimizer.grad_clip is not None and config.optimizer.grad_clip <= 0:
        raise ConfigError(f"optimizer.grad_clip must be > 0 (or null: no clipping), got {config.optimizer.grad_clip}")
    for term in TERMS.values():
        term.check(config)


def build_terms(config: Config) -> list[LossTerm]:
    """The terms a run of ``config`` trains with, in registry order (not yet built: see ``LossTerm.build``)."""
    return [term(config) for term in TERMS.values() if term.enabled(config)]


def shapes_vary(config: Config) -> bool:
    """Whether any term makes the networks see images of changing sizes."""
    return any(term.shapes_vary for term in TERMS.values() if term.enabled(config))


def bench_rows() -> dict[str, list[str]]:
    """Every term's ``bench_train --terms`` rows: row name → ``--set`` overrides on the recipe."""
    return {row: sets for term in TERMS.values() for row, sets in term.bench_rows.items()}


def study_variants() -> dict[str, tuple[list[str], str, bool]]:
    """The KL study's term variants: variant name → (``--set`` overrides, why, whether it needs a vision
    model on disk: ``LossTerm.needs_vision_model``)."""
    return {t.study_variant[0]: (*t.study_variant[1:], t.needs_vision_model) for t in TERMS.values() if t.study_variant}


def card_lines(config: Config) -> list[str]:
    """The model card's lines of a run of ``config`` when the run did not record them (an older
    checkpoint): the configured terms; whether LPIPS loaded is unknown."""
    return [reconstruction_card_line(config.loss, None)] + [t.card_line() for t in build_terms(config)]
