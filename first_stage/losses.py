"""The reference autoencoder loss of latent-diffusion (``contperceptual.LPIPSWithDiscriminator``),
split into a generator loss and a discriminator loss. Everything here is computed in fp32.

Generator (per image, in the ``"sum"`` reduction; see ``regularizers`` for ``"mean"``)::

    rec   = |x - x̂| (or (x - x̂)^2)  +  perceptual_weight * LPIPS(x, x̂)   # LPIPS broadcast per pixel
    nll   = sum_{C,H,W} rec / exp(s) + s                                   # s: scalar log-variance
    total = nll + kl_weight * KL + d_weight * g_loss                       # g_loss once the GAN is on
    d_weight = disc_weight * clamp(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, 1e4)

with W the decoder's last convolution weight (the adaptive weight of taming-transformers). Under
equivariance the pair (x, x̂) is the transformed target and the decoding of the transformed latent.
Every term after the NLL is a unit of ``first_stage.terms.TERMS`` (the KL/MMD regulariser, the
X-regularisers, the GAN); their formulas are in their modules and docs/training.md.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LossConfig
from .discriminator import discriminator_loss
from .loss_term import LossContext, LossTerm
from .model import AutoencoderOutput, ForwardPlan
from .regularizers import sum_reduce


LPIPS_MIN_SIDE = 16  # VGG16's four 2x max-pools before relu5_3


def pixel_loss(x: torch.Tensor, reconstruction: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element pixel loss (B,3,H,W) in fp32."""
    diff = x.float() - reconstruction.float()
    if kind == "l1":
        return diff.abs()
    if kind == "l2":
        return diff.pow(2)
    raise ValueError(f"loss.pixel_loss must be 'l1' or 'l2', got {kind!r}")


class GeneratorLoss(nn.Module):
    """The autoencoder's loss: the NLL (pixel + LPIPS, with log-variance), then each of ``terms``
    (``first_stage.terms.build_terms``: the latent regulariser, the X-regularisers, the GAN) in
    registry order.

    ``perceptual`` is a frozen LPIPS module, or None to train without the perceptual term (the
    model card then says so).
    """

    def __init__(self, cfg: LossConfig, terms: list[LossTerm], perceptual: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.terms = nn.ModuleList(terms)
        self.perceptual = perceptual

    def reconstruction_loss(self, x: torch.Tensor, reconstruction: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pixel + perceptual_weight · LPIPS per element (B,3,H,W), the pixel term alone (B,3,H,W),
        LPIPS per image or None)."""
        pixel = pixel_loss(x, reconstruction, self.cfg.pixel_loss)  # (B,3,H,W)
        if self.perceptual is None or self.cfg.perceptual_weight == 0:
            return pixel, pixel, None
        if min(x.shape[-2:]) < LPIPS_MIN_SIDE:
            raise ValueError(f"LPIPS needs images of at least {LPIPS_MIN_SIDE} pixels a side, "
                             f"got {tuple(x.shape[-2:])} "
                             "(raise data.resolution or equivariance.min_scale, or lower equivariance.scale_factors)")
        p = self.perceptual(x, reconstruction)  # (B,1,1,1), broadcast onto every pixel
        return pixel + self.cfg.perceptual_weight * p, pixel, p

    def forward(
        self,
        out: AutoencoderOutput,
        step: int,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
        encoder_last_layer: torch.Tensor | None = None,
        plan: ForwardPlan | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The total generator loss of one forward pass (made under ``plan``) and its logs.
        ``discriminator`` must be frozen by the caller; ``last_layer`` is needed once the GAN is on,
        ``encoder_last_layer`` for the adaptive alignment weight."""
        rec, pixel, p = self.reconstruction_loss(out.target, out.reconstruction)
        logs = {"train/loss/pixel": pixel.mean().item()}
        if p is not None:
            logs["train/loss/lpips"] = p.mean().item()
        logvar = out.logvar.float()
        nll = sum_reduce(rec / logvar.exp() + logvar, self.cfg.reduction)
        logs.update({"train/loss/nll": nll.item(), "train/logvar": logvar.item()})
        ctx = LossContext(step, nll, self, plan or ForwardPlan(), discriminator, last_layer, encoder_last_layer)
        total = nll
        for term in self.terms:
            value, term_logs = term.loss(out, ctx)
            if value is not None:
                total = total + value
            logs.update(term_logs)
        logs["train/loss/total"] = total.item()
        return total, logs

    def card_lines(self) -> list[str]:
        """What trained the weights, a line per term with its weight, for the model card."""
        return [reconstruction_card_line(self.cfg, self.perceptual is not None)] + [t.card_line() for t in self.terms]


def reconstruction_card_line(cfg: LossConfig, perceptual: bool | None) -> str:
    """The model card's line for the NLL; ``perceptual``: whether LPIPS loaded (None: not recorded)."""
    if cfg.perceptual_weight == 0:
        base = f"{cfg.pixel_loss} (no LPIPS: loss.perceptual_weight is 0)"
    elif perceptual is False:
        base = (f"{cfg.pixel_loss} only: the {cfg.perceptual_weight:g} × LPIPS term was SKIPPED (no VGG16 weights; "
                "loss.lpips_missing: warn)")
    else:
        base = f"{cfg.pixel_loss} + {cfg.perceptual_weight:g} × LPIPS"
        if perceptual is None and cfg.lpips_missing == "warn":
            base += " as configured (loss.lpips_missing: warn; whether the weights were found is not recorded)"
    logvar = "learned" if cfg.learn_logvar else "fixed"
    return f"reconstruction: {base}, {cfg.reduction} reduction, log-variance {logvar} (initial {cfg.logvar_init:g})"


def discriminator_step_loss(
    discriminator: nn.Module, x: torch.Tensor, reconstruction: torch.Tensor, kind: str
) -> tuple[torch.Tensor, dict]:
    """The discriminator's loss on real images and reconstructions, both detached from the autoencoder."""
    logits_real = discriminator(x.detach())
    logits_fake = discriminator(reconstruction.detach())
    loss = discriminator_loss(logits_real, logits_fake, kind)
    logs = {
        "train/loss/disc": loss.item(),
        "train/logits_real": logits_real.float().mean().item(),
        "train/logits_fake": logits_fake.float().mean().item(),
    }
    return loss, logs
