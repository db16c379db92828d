"""The reference autoencoder loss of latent-diffusion (``contperceptual.LPIPSWithDiscriminator``),
split into a generator loss and a discriminator loss. Everything here is computed in fp32.

Generator (per image, in the ``"sum"`` reduction; see ``regularizers`` for ``"mean"``)::

    rec   = |x - x̂| (or (x - x̂)^2)  +  perceptual_weight * LPIPS(x, x̂)   # LPIPS broadcast per pixel
    nll   = sum_{C,H,W} rec / exp(s) + s                                   # s: scalar log-variance
    total = nll + kl_weight * KL + d_weight * g_loss                       # g_loss once the GAN is on
    d_weight = disc_weight * clamp(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, 1e4)

with W the decoder's last convolution weight (the adaptive weight of taming-transformers). Under
equivariance the pair (x, x̂) is the transformed target and the decoding of the transformed latent;
the optional terms (alignment, scale equivariance) are in ``first_stage.alignment`` and
``first_stage.equivariance``, their formulas in docs/training.md.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DiscriminatorConfig, EquivarianceConfig, LossConfig
from .discriminator import discriminator_loss, generator_adversarial_loss
from .model import AutoencoderOutput
from .regularizers import KLRegularizer, MMDRegularizer, sum_reduce


LPIPS_MIN_SIDE = 16  # VGG16's four 2x max-pools before relu5_3


def pixel_loss(x: torch.Tensor, reconstruction: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element pixel loss (B,3,H,W) in fp32."""
    diff = x.float() - reconstruction.float()
    if kind == "l1":
        return diff.abs()
    if kind == "l2":
        return diff.pow(2)
    raise ValueError(f"loss.pixel_loss must be 'l1' or 'l2', got {kind!r}")


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Balance the GAN term against the NLL by their gradient norms at ``last_layer``, in fp32."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0].float()
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].float()
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class GeneratorLoss(nn.Module):
    """The autoencoder's loss: NLL (pixel + LPIPS, with log-variance), latent regulariser, and the
    optional terms: alignment, scale equivariance, GAN.

    ``perceptual`` is a frozen LPIPS module, or None to train without the perceptual term;
    ``alignment`` an :class:`~first_stage.alignment.AlignmentLoss`, or None.
    """

    def __init__(
        self,
        cfg: LossConfig,
        regularizer: KLRegularizer | MMDRegularizer,
        disc_cfg: DiscriminatorConfig,
        perceptual: nn.Module | None = None,
        alignment: nn.Module | None = None,
        equivariance: EquivarianceConfig | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.regularizer = regularizer
        self.disc_cfg = disc_cfg
        self.perceptual = perceptual
        self.alignment = alignment
        self.equivariance = equivariance

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial term reaches the generator at ``step``."""
        return self.disc_cfg.enabled and step >= self.disc_cfg.start + self.disc_cfg.warmup_steps

    def reconstruction_loss(self, x: torch.Tensor, reconstruction: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pixel + perceptual_weight · LPIPS per element (B,3,H,W), the pixel term alone (B,3,H,W),
        LPIPS per image or None)."""
        pixel = pixel_loss(x, reconstruction, self.cfg.pixel_loss)  # (B,3,H,W)
        if self.perceptual is None or self.cfg.perceptual_weight == 0:
            return pixel, pixel, None
        if min(x.shape[-2:]) < LPIPS_MIN_SIDE:
            raise ValueError(f"LPIPS needs images of at least {LPIPS_MIN_SIDE} pixels a side, got {tuple(x.shape[-2:])} "
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
    ) -> tuple[torch.Tensor, dict]:
        """The total generator loss of one forward pass and its logs. ``discriminator`` must be
        frozen by the caller; ``last_layer`` is needed once the GAN is on, ``encoder_last_layer``
        for the adaptive alignment weight."""
        x, reconstruction = out.target, out.reconstruction
        rec, pixel, p = self.reconstruction_loss(x, reconstruction)
        logs = {"train/loss/pixel": pixel.mean().item()}
        if p is not None:
            logs["train/loss/lpips"] = p.mean().item()
        logvar = out.logvar.float()
        nll = sum_reduce(rec / logvar.exp() + logvar, self.cfg.reduction)
        reg, reg_logs = self.regularizer(out.posterior, step)
        total = nll + reg
        logs.update(reg_logs)
        logs.update({"train/loss/nll": nll.item(), "train/logvar": logvar.item()})

        if self.alignment is not None:
            align, align_logs = self.alignment(out.inputs, out.projected)
            acfg = self.alignment.cfg
            weight = acfg.weight
            if acfg.adaptive:
                if encoder_last_layer is None:
                    raise ValueError("the adaptive alignment weight needs the encoder's last layer")
                weight = weight * adaptive_weight(nll, align, encoder_last_layer, acfg.adaptive_weight_max)
            total = total + weight * align
            logs.update({**align_logs, "train/align_weight": float(weight)})
        if out.scaled:
            scale_terms = [sum_reduce(self.reconstruction_loss(xs, rs)[0], self.cfg.reduction) for xs, rs in out.scaled]
            scale_loss = sum(scale_terms)
            total = total + self.equivariance.scale_weight * scale_loss
            logs["train/loss/scale_eq"] = scale_loss.item()

        if self.gan_active(step):
            if discriminator is None or last_layer is None:
                raise ValueError("the GAN term is active: pass the discriminator and the decoder's last layer")
            g_loss = generator_adversarial_loss(discriminator(reconstruction), self.disc_cfg.loss)
            d_weight = self.disc_cfg.weight * adaptive_weight(nll, g_loss, last_layer, self.disc_cfg.adaptive_weight_max)
            total = total + d_weight * g_loss
            logs.update({"train/loss/g": g_loss.item(), "train/d_weight": d_weight.item()})
        logs["train/loss/total"] = total.item()
        return total, logs


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
