"""Latent regularisers. Each is called as ``reg(posterior, step) -> (loss, logs)``; build one from
its config with :func:`build_regularizer`.

The KL term is that of the diagonal Gaussian posterior q(z|x) = N(mu, diag(exp(logvar))) against
N(0, I), per latent element: ``0.5 * (mu^2 + exp(logvar) - 1 - logvar)``.

Reductions (``loss.reduction``), matching the reconstruction term:
- ``"sum"`` (latent-diffusion): summed over latent C,h,w, averaged over the batch. The SD default
  ``kl_weight = 1e-6`` is in this reduction.
- ``"mean"``: averaged over every latent element. The reconstruction term is then averaged over
  every pixel element too, so the same trade-off needs
  ``kl_weight_mean = kl_weight_sum * (C*h*w) / (3*H*W)``, e.g. 1e-6 / 48 for an f8, 4-channel VAE;
  this ratio depends on the compression, not the resolution.

The MMD term (WAE, Tolstikhin et al. 2018) matches the *aggregate* posterior to N(0, I) instead of
each image's posterior, so it bounds the latents' scale and shape without charging for information.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .config import Config, ConfigError, RegularizerConfig
from .loss_term import LossContext, LossTerm, refuse_below


# WAE's inverse multiquadratic kernel scales: c = 2·C·s, where 2·C = E|x - y|² for x, y ~ N(0, I_C).
MMD_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, in nats."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_per_element(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """Closed-form KL(q || N(0, I)) per latent element, (B,C,h,w), in fp32 nats (diffusers has
    already clamped the log-variance to ``latent_stats.LOGVAR_CLAMP``)."""
    return gaussian_kl(posterior.mean.float(), posterior.logvar.float())


def sum_reduce(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over all but the batch dimension then mean over the batch, or mean over everything."""
    if reduction == "sum":
        return per_element.flatten(1).sum(1).mean()
    if reduction == "mean":
        return per_element.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def scheduled_weight(weight: float, cfg: RegularizerConfig, step: int) -> float:
    """``weight`` at optimiser step ``step``: ramped linearly over ``cfg.warmup_steps``, or constant."""
    if cfg.schedule == "linear" and cfg.warmup_steps > 0:
        return weight * min(1.0, step / cfg.warmup_steps)
    return weight


def kl_logs(kl: torch.Tensor, reduction: str) -> dict:
    """The KL figures every regulariser logs, from the per-element KL (B,C,h,w)."""
    return {"train/loss/kl": sum_reduce(kl, reduction).item(),
            "train/kl_nats_per_image": kl.flatten(1).sum(1).mean().item()}


def imq_kernel(x: torch.Tensor, y: torch.Tensor, scales: tuple[float, ...] = MMD_SCALES) -> torch.Tensor:
    """sum_s c/(c + |x_i - y_j|²) with c = 2·C·s, for x (n, C) and y (m, C): an (n, m) matrix."""
    distance = (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.T).clamp_min(0)  # (n, m) squared
    return sum(2 * x.shape[1] * s / (2 * x.shape[1] * s + distance) for s in scales)


def mmd_imq(x: torch.Tensor, y: torch.Tensor, scales: tuple[float, ...] = MMD_SCALES) -> torch.Tensor:
    """Unbiased MMD² (the U-statistic) between samples x (n, C) and y (m, C), kernel :func:`imq_kernel`::

        MMD² = sum_{i≠j} k(x_i, x_j) / (n(n-1)) + sum_{i≠j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / (nm)
    """
    n, m = x.shape[0], y.shape[0]
    kxx, kyy = imq_kernel(x, x, scales), imq_kernel(y, y, scales)
    within = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * imq_kernel(x, y, scales).mean()


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
        return scheduled_weight(self.cfg.kl_weight, self.cfg, step)

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
        return weight * penalised, {**kl_logs(kl, self.reduction), "train/kl_weight": weight}


class MMDRegularizer:
    """``mmd_weight * MMD²`` between the batch's aggregate posterior and N(0, I) (WAE-MMD).

    Every latent position's C-vector of a posterior sample z = mean + std·ε (the kind of latent the
    decoder sees; ε is drawn here) is one sample of the aggregate posterior: B·h·w of them, of which
    at most ``mmd_samples`` are drawn at random and compared with as many N(0, I_C) draws by
    :func:`mmd_imq` (the inverse multiquadratic kernel over WAE's scales). MMD² counts as a
    per-latent-element figure: the penalty is ``mmd_weight * C*h*w * MMD²`` in the "sum" reduction
    and ``mmd_weight * MMD²`` in "mean". The KL is logged as by :class:`KLRegularizer`, not
    penalised; ``train/loss/mmd`` is MMD² itself.
    """

    def __init__(self, cfg: RegularizerConfig, reduction: str = "sum"):
        self.cfg = cfg
        self.reduction = reduction

    def weight(self, step: int) -> float:
        """The MMD weight at optimiser step ``step``."""
        return scheduled_weight(self.cfg.mmd_weight, self.cfg, step)

    def __call__(self, posterior: DiagonalGaussianDistribution, step: int) -> tuple[torch.Tensor, dict]:
        kl = kl_per_element(posterior)  # (B,C,h,w)
        channels = kl.shape[1]
        mean, std = (t.float().permute(0, 2, 3, 1).reshape(-1, channels) for t in (posterior.mean, posterior.std))
        keep = torch.randperm(mean.shape[0], device=mean.device)[:self.cfg.mmd_samples]
        z = mean[keep] + std[keep] * torch.randn_like(std[keep])  # (n, C) posterior samples
        mmd = mmd_imq(z, torch.randn_like(z))
        elements = kl[0].numel() if self.reduction == "sum" else 1
        weight = self.weight(step)
        logs = {**kl_logs(kl, self.reduction), "train/loss/mmd": mmd.item(), "train/mmd_weight": weight}
        return weight * elements * mmd, logs


# Regularisers by RegularizerConfig.kind.
REGULARIZERS = {"kl": KLRegularizer, "mmd": MMDRegularizer}


def build_regularizer(cfg: RegularizerConfig, reduction: str = "sum") -> KLRegularizer | MMDRegularizer:
    """The regulariser that ``cfg.kind`` names, in the loss's ``reduction``."""
    return REGULARIZERS[cfg.kind](cfg, reduction)


class RegularizerTerm(LossTerm):
    """The latent regulariser of ``regularizer.kind`` (KL or MMD), always on (a weight of 0 is
    still logged)."""

    name, section = "regularizer", "regularizer"

    def __init__(self, config: Config):
        super().__init__(config)
        self.regularizer = build_regularizer(config.regularizer, config.loss.reduction)

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return True

    @classmethod
    def check(cls, config: Config) -> None:
        r = config.regularizer
        refuse_below(config, 0, "regularizer.kl_weight", "regularizer.mmd_weight", "regularizer.free_bits",
                     "regularizer.warmup_steps")
        if r.kind == "mmd" and r.mmd_samples < 2:
            raise ConfigError(f"regularizer.mmd_samples must be at least 2 (a U-statistic), got {r.mmd_samples}")

    def loss(self, out, ctx: LossContext) -> tuple[torch.Tensor, dict]:
        return self.regularizer(out.posterior, ctx.step)

    def card_line(self) -> str:
        r = self.config.regularizer
        schedule = f", linear warm-up over {r.warmup_steps} steps" if r.schedule == "linear" and r.warmup_steps else ""
        if r.kind == "mmd":
            return f"MMD² to N(0, I) on the aggregate posterior (WAE), weight {r.mmd_weight:g}{schedule}"
        floor = f", free bits {r.free_bits:g} nat per element and channel" if r.free_bits > 0 else ""
        return f"KL to N(0, I), weight {r.kl_weight:g} ({self.config.loss.reduction} reduction){floor}{schedule}"
