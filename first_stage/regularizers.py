"""Latent regularisers. Each is called as ``reg(posterior, step) -> (loss, logs)``.

The KL term is that of the diagonal Gaussian posterior q(z|x) = N(mu, diag(exp(logvar))) against
N(0, I), per latent element: ``0.5 * (mu^2 + exp(logvar) - 1 - logvar)``.

Reductions (``loss.reduction``), matching the reconstruction term:
- ``"sum"`` (latent-diffusion): summed over latent C,h,w, averaged over the batch. The SD default
  ``kl_weight = 1e-6`` is in this reduction.
- ``"mean"``: averaged over every latent element. The reconstruction term is then averaged over
  every pixel element too, so the same trade-off needs
  ``kl_weight_mean = kl_weight_sum * (C*h*w) / (3*H*W)``, e.g. 1e-6 / 48 for an f8, 4-channel VAE;
  this ratio depends on the compression, not the resolution.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .config import RegularizerConfig


def kl_per_element(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """Closed-form KL(q || N(0, I)) per latent element, (B,C,h,w), in fp32 nats."""
    mean, logvar = posterior.mean.float(), posterior.logvar.float()  # logvar already clamped to [-30, 20]
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def sum_reduce(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over all but the batch dimension then mean over the batch, or mean over everything."""
    if reduction == "sum":
        return per_element.flatten(1).sum(1).mean()
    if reduction == "mean":
        return per_element.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


class KLRegularizer:
    """``kl_weight * KL`` with an optional linear warm-up and a per-channel free-bits floor.

    Free bits: the KL of channel c, in nats per latent element averaged over the batch and the
    positions, is replaced by ``max(KL_c, free_bits)``: a channel below the floor gets no gradient
    from the KL term, so it may carry that much information for free.
    """

    def __init__(self, cfg: RegularizerConfig, reduction: str = "sum"):
        self.cfg = cfg
        self.reduction = reduction

    def weight(self, step: int) -> float:
        """The KL weight at optimiser step ``step``."""
        if self.cfg.schedule == "linear" and self.cfg.warmup_steps > 0:
            return self.cfg.kl_weight * min(1.0, step / self.cfg.warmup_steps)
        return self.cfg.kl_weight

    def __call__(self, posterior: DiagonalGaussianDistribution, step: int) -> tuple[torch.Tensor, dict]:
        kl = kl_per_element(posterior)  # (B,C,h,w)
        per_channel = kl.mean(dim=(0, 2, 3))  # (C,) nats per element
        raw = sum_reduce(kl, self.reduction)
        if self.cfg.free_bits > 0:
            floored = per_channel.clamp(min=self.cfg.free_bits)  # (C,); no gradient below the floor
            # Without an active floor both forms equal ``raw``: sum_c KL_c * h*w, or mean_c KL_c.
            penalised = floored.sum() * kl[0, 0].numel() if self.reduction == "sum" else floored.mean()
        else:
            penalised = raw
        weight = self.weight(step)
        logs = {
            "train/loss/kl": raw.item(),
            "train/kl_weight": weight,
            "train/kl_nats_per_image": kl.flatten(1).sum(1).mean().item(),
        }
        return weight * penalised, logs
