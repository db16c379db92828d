"""What a loss term is: the unit every additive term of the generator loss is written as.

A term declares, in one class, everything the rest of the package needs to know of it:

- ``section``: its config section, and ``enabled(config)``: whether a run trains with it;
- ``check(config)``: range and cross-section checks, run when the config is loaded (before a run
  folder is made or data is read); ``check_sizes(config, sizes)``: the checks that need the built
  model (its downsampling factor, whether LPIPS loaded), run by ``build_parts``;
- ``build(vae, device)``: a trained module the forward pass needs (it lives in the DDP wrapper,
  e.g. the alignment projection), or None; ``shapes_vary``: whether it makes the networks see
  images of changing sizes (``torch.compile`` then uses dynamic shapes);
- ``plan(plan, step)``: what the forward pass must do for it (fills the step's ``ForwardPlan``);
- ``loss(out, ctx)``: its weighted contribution to the generator loss (or None) and its logs;
- ``card_line()``: the line of the export's model card that says it trained the weights;
- ``bench_rows`` and ``study_variant``: its rows in ``scripts/bench_train.py --terms`` and its
  variant in ``scripts/kl_study.py``, as ``--set`` overrides on a recipe.

The registry is ``first_stage.terms.TERMS``; adding a term is one module holding its class and one
line there (docs/architecture.md shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # the model imports the terms' modules: no import cycle at run time
    from .config import Config
    from .model import AutoencoderOutput, ForwardPlan


@dataclass(frozen=True)
class StepDraw:
    """Where a forward pass sits in the run, for terms whose randomness is a function of it: the
    optimiser step, the place of this process's first image in the step's global batch, and the
    images and latent shape (C, h, w) of this micro-batch."""

    seed: int
    step: int
    first: int
    n: int
    latent_shape: tuple[int, int, int]
    device: torch.device


@dataclass(frozen=True)
class BuiltSizes:
    """What the size checks need from the built model: pixels per latent cell, and whether LPIPS
    and the discriminator consume the images (the smallest sides they take)."""

    factor: int
    lpips_side: int  # 1 when LPIPS is off or was skipped
    discriminator_side: int  # 1 when there is no discriminator

    def refuse_smaller(self, key: str, side: int, needed: int, resolution: int) -> None:
        """Raise a ConfigError naming ``key`` when the ``side``-pixel images it makes are smaller than
        ``needed``, the smallest side their consumers take."""
        if side >= needed:
            return
        from .config import ConfigError

        takes = ", ".join([f"LPIPS {self.lpips_side}"] * (self.lpips_side > 1)
                          + [f"the discriminator {self.discriminator_side}"] * (self.discriminator_side > 1)
                          + [f"the latent grid {self.factor}"])
        raise ConfigError(f"{key}: at data.resolution={resolution} it makes {side}-pixel images; the smallest sides "
                          f"taken are: {takes} (raise data.resolution or change {key})")


@dataclass
class LossContext:
    """What a term's loss may read besides the forward pass: the step, the NLL it may be balanced
    against, the frozen discriminator, the layers adaptive weights are measured at, and the base
    loss (its reconstruction term, for terms that reconstruct other pairs)."""

    step: int
    nll: torch.Tensor
    base: nn.Module  # first_stage.losses.GeneratorLoss
    plan: ForwardPlan | None = None  # what the forward pass did
    discriminator: nn.Module | None = None
    last_layer: torch.Tensor | None = None  # the decoder's conv_out weight
    encoder_last_layer: torch.Tensor | None = None  # the encoder's conv_out weight


def refuse_below(config: Config, minimum: float, *keys: str) -> None:
    """Raise a ConfigError naming the first of the dotted ``keys`` of ``config`` whose value is below
    ``minimum`` (None values pass: they mean "off")."""
    from .config import ConfigError

    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and value < minimum:
            raise ConfigError(f"{key} must be >= {minimum:g}, got {value}")


def mean_unit(config: Config, target: torch.Tensor) -> float:
    """What a weight stated against a per-element *mean* NLL (REPA-E's fixed weights) is multiplied by under
    ``loss.reduction``: 1 for "mean"; for "sum", whose NLL is summed over an image's elements, their number
    (3·H·W of ``target``, (B, 3, H, W)), so that the term keeps the same balance against the NLL."""
    return 1.0 if config.loss.reduction == "mean" else float(target[0].numel())


def adaptive_weight(nll: torch.Tensor, term: torch.Tensor, layer: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Balance ``term`` against the NLL by their gradient norms at ``layer`` (taming-transformers'
    adaptive weight), in fp32: clamp(|grad nll| / (|grad term| + 1e-4), 0, max_weight), detached."""
    nll_grad = torch.autograd.grad(nll, layer, retain_graph=True)[0].float()
    term_grad = torch.autograd.grad(term, layer, retain_graph=True)[0].float()
    weight = nll_grad.norm() / (term_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class LossTerm(nn.Module):
    """One additive term of the generator loss (see the module docstring). Subclasses set ``name``
    and ``section`` and override what they use; every hook has a do-nothing default."""

    name: ClassVar[str]
    section: ClassVar[str]
    shapes_vary: ClassVar[bool] = False
    bench_rows: ClassVar[dict[str, list[str]]] = {}
    study_variant: ClassVar[tuple[str, list[str], str] | None] = None  # (name, overrides, why)
    needs_vision_model: ClassVar[bool] = False  # a frozen vision model on disk (alignment.model)

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    @classmethod
    def enabled(cls, config: Config) -> bool:
        """Whether a run of ``config`` trains with this term."""
        return bool(getattr(getattr(config, cls.section), "enabled", True))

    @classmethod
    def check(cls, config: Config) -> None:
        """Refuse values out of range, naming the key (called at load, for every registered term)."""

    def check_sizes(self, sizes: BuiltSizes) -> None:
        """Refuse image sizes the term would make too small for their consumers (needs the model)."""

    def build(self, vae, device: torch.device) -> nn.Module | None:
        """A trained module the forward pass needs, or None. It is placed in the DDP wrapper's one slot for
        it, ``AutoencoderWrapper.projection`` (checkpoints and exports know its weights as ``projection.*``)."""
        return None

    def plan(self, plan: ForwardPlan, draw: StepDraw) -> None:
        """Fill in what this step's forward pass must do for the term."""

    def loss(self, out: AutoencoderOutput, ctx: LossContext) -> tuple[torch.Tensor | None, dict]:
        """(weighted contribution to the generator loss, or None; logs)."""
        return None, {}

    def card_line(self) -> str:
        """The model card's line saying how the term trained the weights."""
        raise NotImplementedError
