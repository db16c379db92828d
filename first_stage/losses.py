"""The reference autoencoder loss of latent-diffusion (``contperceptual.LPIPSWithDiscriminator``),
split into a generator loss and a discriminator loss. Everything here is computed in fp32.

Generator (per image, in the ``"sum"`` reduction; see ``regularizers`` for ``"mean"``)::

    rec   = |x - x̂| (or (x - x̂)^2)  +  perceptual_weight * LPIPS(x, x̂)   # LPIPS broadcast per pixel
    nll   = sum_{C,H,W} rec / exp(s) + s                                   # s: scalar log-variance
    total = nll + kl_weight * KL + d_weight * g_loss                       # g_loss once the GAN is on
    d_weight = disc_weight * clamp(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, 1e4)

with W the decoder's last convolution weight (the adaptive weight of taming-transformers).
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from .config import DiscriminatorConfig, LossConfig
from .discriminator import discriminator_loss, generator_adversarial_loss
from .regularizers import KLRegularizer, MMDRegularizer, sum_reduce


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
    """The autoencoder's loss: NLL (pixel + LPIPS, with log-variance), latent regulariser, GAN term.

    ``perceptual`` is a frozen LPIPS module, or None to train without the perceptual term.
    """

    def __init__(
        self,
        cfg: LossConfig,
        regularizer: KLRegularizer | MMDRegularizer,
        disc_cfg: DiscriminatorConfig,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.regularizer = regularizer
        self.disc_cfg = disc_cfg
        self.perceptual = perceptual

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial term reaches the generator at ``step``."""
        return self.disc_cfg.enabled and step >= self.disc_cfg.start + self.disc_cfg.warmup_steps

    def forward(
        self,
        x: torch.Tensor,
        reconstruction: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        logvar: torch.Tensor,
        step: int,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The total generator loss and its logs. ``discriminator`` must be frozen by the caller."""
        rec = pixel_loss(x, reconstruction, self.cfg.pixel_loss)  # (B,3,H,W)
        logs = {"train/loss/pixel": rec.mean().item()}
        if self.perceptual is not None and self.cfg.perceptual_weight > 0:
            p = self.perceptual(x, reconstruction)  # (B,1,1,1), broadcast onto every pixel
            rec = rec + self.cfg.perceptual_weight * p
            logs["train/loss/lpips"] = p.mean().item()
        logvar = logvar.float()
        nll = sum_reduce(rec / logvar.exp() + logvar, self.cfg.reduction)
        reg, reg_logs = self.regularizer(posterior, step)
        total = nll + reg
        logs.update(reg_logs)
        logs.update({"train/loss/nll": nll.item(), "train/logvar": logvar.item()})

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
