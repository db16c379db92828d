"""Latent statistics that show whether a VAE's latents keep outliers and bounded scale (REFERENCE §5,
formulas in docs/evaluation.md).

z is the posterior mean (B, C, h, w), ẑ = (z − m_c) / s_c its per-channel standardisation with the
channel mean m_c and std s_c over all images and positions. Statistics that need ẑ take a second
pass over the same latents (the posterior mean is deterministic), so everything is exact and
streams in constant memory: per-channel float64 sums, fixed-bin histograms, and one float per
image for the per-image figures (their quantiles are exact). :meth:`LatentStatistics.combine`
sums the accumulators over processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from .latent_norm import LatentNormalizer, worst_ratio
from .model import encode_latent
from .regularizers import gaussian_kl, kl_per_element

LOGVAR_CLAMP = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance here
TAIL_KS = (3, 4, 6)
GAUSSIAN_TAIL = {k: math.erfc(k / math.sqrt(2)) for k in TAIL_KS}  # P(|x| > k), x ~ N(0, 1)
# Normalised latents are flagged when their std is outside [1/1.5, 1.5] (the probe's as-deployed column, an e2e
# export's normaliser): a diffusion model trained on them sees a signal-to-noise ratio at every t that is ≥ 2.25×
# off the one its noise schedule was tuned for.
DEPLOYED_STD_TOLERANCE = 1.5
ZHAT_RANGE, ZHAT_BINS = 12.0, 240  # histogram of ẑ over [-12, 12]; beyond goes to the end bins
LOGVAR_BINS = 100  # histogram of the log-variance over the clamp range
ACTIVE_THRESHOLD = 0.01  # a channel is active when Var over images and positions of E[z_c] exceeds this


def posterior_moments(count: torch.Tensor, sum_mu: torch.Tensor, sum_mu2: torch.Tensor,
                      sum_var: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and std of the posterior means μ and of posterior samples μ + σ·ε (exact over ε: E[z²] =
    μ² + σ²), over all elements and per channel, from per-channel float64 sums (C,) of element
    counts, μ, μ² and σ²."""
    n = count.sum()
    mean, channel_mean = sum_mu.sum() / n, sum_mu / count
    return {
        "mean": mean,
        "std_of_means": (sum_mu2.sum() / n - mean**2).clamp_min(0).sqrt(),
        "std_of_samples": ((sum_mu2.sum() + sum_var.sum()) / n - mean**2).clamp_min(0).sqrt(),
        "channel_mean": channel_mean,
        "channel_std_of_means": (sum_mu2 / count - channel_mean**2).clamp_min(0).sqrt(),
        "channel_std_of_samples": ((sum_mu2 + sum_var) / count - channel_mean**2).clamp_min(0).sqrt(),
    }


@torch.inference_mode()
def latent_sums(vae: nn.Module, x: torch.Tensor, norm: LatentNormalizer) -> torch.Tensor:
    """Per-channel float64 sums over a batch's posteriors, per channel of ``norm.layout`` (the latent channels,
    or the patches of a FLUX.2-class VAE): (C', 4) = (Σμ, Σμ², Σσ², count)."""
    posterior = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    mu, var = norm.layout(posterior.mean.double()), norm.layout(posterior.var.double())  # (B, C', h', w')
    count = torch.full_like(mu[0, :, 0, 0], mu[:, 0].numel())
    return torch.stack([mu.sum((0, 2, 3)), mu.pow(2).sum((0, 2, 3)), var.sum((0, 2, 3)), count], 1).cpu()


def reduce_sum(accelerator, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the accelerator's processes, on the CPU (``t`` itself with one process or none)."""
    if accelerator is None or accelerator.num_processes == 1:
        return t
    return accelerator.reduce(t.to(accelerator.device), "sum").cpu()


def measure_latent_stats(vae: nn.Module, batches: Iterable[torch.Tensor], accelerator=None) -> dict:
    """Mean and std of posterior samples ``z = μ + σ·ε`` over all images, globally and per channel; for a
    FLUX.2-class VAE also ``batch_norm``: the mean and variance of the posterior means per patch channel,
    what its ``bn`` normalises (BFL's ``encode`` takes the mean).

    The moments of the samples are taken exactly over ε (E[z] = μ, E[z²] = μ² + σ²) instead of
    drawing ε, so the figure has no sampling noise and does not depend on how the images are split
    over batches or processes. ``scaling_factor = 1 / std`` is latent-diffusion's ``scale_by_std``
    (there from one batch of samples). The sums stream in float64; the ``accelerator`` (None for one
    process) sums them over processes, so every process must call this, even with no batch.

    The BatchNorm's variance is the biased (population) variance of the posterior means over every
    calibration image and position, Σ(μ − m)²/n: the figure that gives the calibration latents variance
    var/(var + eps) after the BatchNorm. torch's own running_var is an exponential average of unbiased
    per-batch variances; over n ≥ thousands of elements the two differ by a factor n/(n − 1).
    """
    carried = LatentNormalizer.of(vae)
    channels = vae.config.latent_channels
    sums, images = None, 0
    for x in batches:
        if x.shape[0] == 0:  # every image of the batch was undecodable
            continue
        batch_sums = latent_sums(vae, x, carried)
        sums = batch_sums if sums is None else sums + batch_sums
        images += x.shape[0]
    if sums is None:
        sums = torch.zeros(channels * math.prod(carried.patch_size), 4, dtype=torch.float64)
    packed = reduce_sum(accelerator, torch.cat([sums.flatten(), torch.tensor([float(images)], dtype=torch.float64)]))
    sums, images = packed[:-1].view_as(sums), int(packed[-1].item())
    if images == 0:
        raise ValueError("measure_latent_stats: no calibration image could be read")
    patch_sums = sums
    sums = sums.view(channels, -1, 4).sum(1)  # patch channel k = c·p + i (PATCH_ORDER) back to channel c
    sum_mu, sum_mu2, sum_var, count = sums.unbind(1)  # each (C,)
    moments = posterior_moments(count, sum_mu, sum_mu2, sum_var)
    std = moments["std_of_samples"].item()
    extra = {}
    if carried.kind == "batch_norm":
        patch = posterior_moments(patch_sums[:, 3], patch_sums[:, 0], patch_sums[:, 1], patch_sums[:, 2])
        extra["batch_norm"] = {"running_mean": patch["channel_mean"].tolist(),
                               "running_var": patch["channel_std_of_means"].pow(2).tolist(),
                               "variance": "biased (population) variance of the patchified posterior means",
                               "elements_per_channel": int(patch_sums[0, 3].item())}
    return {
        "num_images": images,
        "scaling_factor": 1.0 / std,
        "shift_factor": moments["mean"].item(),
        "mean": moments["mean"].item(),
        "std": std,
        "std_of_means": moments["std_of_means"].item(),  # what .mode() latents give
        "channel_mean": moments["channel_mean"].tolist(),
        "channel_std": moments["channel_std_of_samples"].tolist(),
        **extra,
    }


def carried_and_implied(carried: LatentNormalizer, moments: dict[str, torch.Tensor]) -> dict:
    """The normalisation a VAE carries against the one of the same kind its measured ``moments``
    (:func:`posterior_moments`, per channel of the normaliser's layout) imply — of posterior samples, or
    for ``batch_norm`` of the posterior means its BatchNorm sees: per channel, the carried scale over the
    implied one, and the channel farthest from 1 (1 = calibrated)."""
    if carried.kind == "batch_norm":
        implied = carried.with_statistics(moments["channel_mean"], moments["channel_std_of_means"].pow(2))
    else:
        implied = LatentNormalizer.measured(carried.kind, moments["mean"].item(), moments["std_of_samples"].item(),
                                            moments["channel_mean"].tolist(),
                                            moments["channel_std_of_samples"].tolist())
    ratios = carried.over(implied, len(moments["channel_mean"]))
    return {"carried": carried.describe(), "implied": implied.describe(),
            "channel_carried_over_implied": ratios.tolist(), "carried_over_implied": worst_ratio(ratios)}


def latent_batch_stats(posterior: DiagonalGaussianDistribution, prefix: str = "val/latent") -> dict:
    """Cheap statistics of a batch of posteriors: scale, peak, log-variance and KL per channel."""
    mean, logvar = posterior.mean.float(), posterior.logvar.float()  # (B,C,h,w)
    kl_channel = kl_per_element(posterior).mean(dim=(0, 2, 3))  # (C,) nats per element
    stats = {
        f"{prefix}/std": mean.std().item(),
        f"{prefix}/max_abs": mean.abs().max().item(),
        f"{prefix}/mean_logvar": logvar.mean().item(),
        f"{prefix}/logvar_at_clamp": (logvar <= LOGVAR_CLAMP[0]).float().mean().item(),
    }
    stats.update({f"{prefix}/kl_channel_{c}": v for c, v in enumerate(kl_channel.tolist())})
    return stats


def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix (n, n): coefficients = D @ x."""
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


def high_band_mask(h: int, w: int) -> torch.Tensor:
    """(h, w) True where either DCT frequency is in the upper half of its band."""
    return (torch.arange(h)[:, None] >= h / 2) | (torch.arange(w)[None, :] >= w / 2)


def gaussian_peak_reference(shape: tuple[int, int, int], draws: int = 1000, seed: int = 0) -> dict:
    """Median and p99 of max |x| over N(0, 1) tensors of ``shape`` (C, h, w)."""
    g = torch.Generator().manual_seed(seed)
    peaks = torch.stack([torch.randn(shape, generator=g).abs().max() for _ in range(draws)]).numpy()
    return {"median": float(np.median(peaks)), "p99": float(np.quantile(peaks, 0.99))}


def modal_share_by_chance(images: int, positions: int, seed: int = 0) -> float:
    """The modal-peak share expected if each of ``images`` images peaked at a uniformly random one
    of ``positions`` positions (Monte Carlo, seeded). The honest reference for few images: the
    share can never fall below 1/images, so 1/positions alone would make any small set look spotty."""
    if images == 0:
        return math.nan
    draws = int(max(100, min(2000, 2e7 // images)))
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(positions, (draws, images), generator=g) + torch.arange(draws)[:, None] * positions
    counts = torch.bincount(picks.flatten(), minlength=draws * positions).view(draws, positions)
    return (counts.max(1).values.double().mean() / images).item()


class LatentStatistics:
    """Streaming accumulator. Call :meth:`first_pass` on every batch, :meth:`finish_first_pass`,
    :meth:`second_pass` on the same batches, then :meth:`result`."""

    def __init__(self, channels: int, spatial: tuple[int, int], norm: LatentNormalizer | None = None):
        """``channels`` and the latent's (h, w): known before any image, so that a process that gets
        no image (fewer images than processes) still takes part in :meth:`combine`. ``norm``: the
        normalisation the VAE carries, whose output (what the diffusion model sees) is measured too."""
        self.channels = channels
        self.shape = (channels, *spatial)
        self.norm = norm or LatentNormalizer("global")  # the identity
        f64 = dict(dtype=torch.float64)
        # per channel of the normaliser's layout (the patches of the FLUX.2 class): elements, Σz, Σz², Σσ², and
        # the count of normalised posterior means beyond 4
        self.sums_norm = torch.zeros(5, channels * math.prod(self.norm.patch_size), **f64)
        self.layout_moments = None
        # first pass, per channel: elements, Σz, Σz², Σσ², ΣKL, count of log-variances at the clamp
        self.sums1 = torch.zeros(6, channels, **f64)
        self.logvar_hist = torch.zeros(LOGVAR_BINS, **f64)
        self.peak_positions = torch.zeros(spatial[0] * spatial[1], dtype=torch.float64)  # (h*w,) counts of energy peaks
        self.concentration: list[float] = []  # per image: largest position's share of latent energy
        # second pass, per channel: Σẑ⁴, counts |ẑ| > k for k in TAIL_KS, DCT energy total and high band
        self.sums2 = torch.zeros(3 + len(TAIL_KS), channels, **f64)
        self.zhat_hist = torch.zeros(channels, ZHAT_BINS, **f64)
        self.peak_zhat: list[float] = []  # per image: max |ẑ|
        self.moments = self.mean = self.std = None

    @torch.no_grad()
    def first_pass(self, z: torch.Tensor, logvar: torch.Tensor) -> None:
        """Posterior mean z and log-variance, each (B, C, h, w)."""
        z, logvar = z.double().cpu(), logvar.double().cpu()
        b, c, h, w = z.shape
        kl = gaussian_kl(z, logvar)
        at_clamp = (logvar <= LOGVAR_CLAMP[0] + 1e-4).double()
        self.sums1 += torch.stack([torch.full((c,), b * h * w, dtype=torch.float64), z.sum((0, 2, 3)),
                                   z.pow(2).sum((0, 2, 3)), logvar.exp().sum((0, 2, 3)), kl.sum((0, 2, 3)),
                                   at_clamp.sum((0, 2, 3))])
        self.logvar_hist += torch.histc(logvar.clamp(*LOGVAR_CLAMP), LOGVAR_BINS, *LOGVAR_CLAMP)
        energy = z.pow(2).sum(1).flatten(1)  # (B, h*w): ‖z[:, h, w]‖²
        self.concentration += (energy.max(1).values / energy.sum(1).clamp_min(1e-300)).tolist()
        if (c, h, w) != self.shape:
            raise ValueError(f"latents of shape {(c, h, w)}, expected {self.shape}")
        self.peak_positions += torch.bincount(energy.argmax(1), minlength=h * w).double()
        mu, var = self.norm.layout(z), self.norm.layout(logvar.exp())  # (B, C', h', w')
        self.sums_norm += torch.stack([torch.full_like(mu[0, :, 0, 0], mu[:, 0].numel()), mu.sum((0, 2, 3)),
                                       mu.pow(2).sum((0, 2, 3)), var.sum((0, 2, 3)),
                                       (self.norm.normalize(z).abs() > 4).double().sum((0, 2, 3))])

    def finish_first_pass(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Combine the first-pass sums over processes and fix the channel mean and std."""
        if reduce_sum is not None:
            self.sums1, self.sums_norm = reduce_sum(self.sums1), reduce_sum(self.sums_norm)
        self.moments = posterior_moments(*self.sums1[:4])
        self.layout_moments = posterior_moments(*self.sums_norm[:4])
        self.mean, self.std = self.moments["channel_mean"], self.moments["channel_std_of_means"]

    @torch.no_grad()
    def second_pass(self, z: torch.Tensor) -> None:
        """The same posterior means again, now standardised with the first pass's channel statistics."""
        z = z.double().cpu()
        zhat = (z - self.mean[None, :, None, None]) / self.std.clamp_min(1e-300)[None, :, None, None]
        b, c, h, w = z.shape
        dh, dw = dct_matrix(h), dct_matrix(w)
        coef = dh @ zhat @ dw.T  # (B, C, h, w) 2-D DCT per channel
        energy = coef.pow(2)
        high = energy * high_band_mask(h, w)
        tails = [(zhat.abs() > k).double().sum((0, 2, 3)) for k in TAIL_KS]
        self.sums2 += torch.stack([zhat.pow(4).sum((0, 2, 3)), energy.sum((0, 2, 3)), high.sum((0, 2, 3)), *tails])
        edges = torch.linspace(-ZHAT_RANGE, ZHAT_RANGE, ZHAT_BINS + 1, dtype=torch.float64)
        bins = torch.bucketize(zhat.clamp(-ZHAT_RANGE, ZHAT_RANGE).contiguous(), edges[1:-1].contiguous())
        bins = bins.transpose(0, 1).reshape(c, -1)  # (C, B*h*w) bin of each element
        self.zhat_hist += torch.zeros(c, ZHAT_BINS, dtype=torch.float64).scatter_add_(
            1, bins, torch.ones_like(bins, dtype=torch.float64))
        self.peak_zhat += zhat.abs().flatten(1).max(1).values.tolist()

    def combine(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                gather_list: Callable[[list], list]) -> None:
        """Sum the remaining accumulators and concatenate the per-image lists over processes."""
        self.logvar_hist = reduce_sum(self.logvar_hist)
        self.peak_positions = reduce_sum(self.peak_positions)
        self.sums2 = reduce_sum(self.sums2)
        self.zhat_hist = reduce_sum(self.zhat_hist)
        self.concentration = gather_list(self.concentration)
        self.peak_zhat = gather_list(self.peak_zhat)

    def result(self) -> dict:
        """Every figure as plain floats and lists (see docs/evaluation.md for the definitions)."""
        n, _, _, _, kl_sum, clamp_count = self.sums1
        c, h, w = self.shape
        quartic, dct_total, dct_high, *tails = self.sums2
        images = len(self.peak_zhat)
        std_samples = self.moments["std_of_samples"].item()
        positions = self.peak_positions.view(h, w)
        concentration, peaks = np.array(self.concentration), np.array(self.peak_zhat)
        channel_var = self.std**2
        return {
            "images": images,
            "latent_shape": [c, h, w],
            "scale": {
                "mean": self.moments["mean"].item(),
                "std_of_means": self.moments["std_of_means"].item(),
                "std_of_samples": std_samples,
                "implied_scaling_factor": 1.0 / std_samples,
                "channel_mean": self.mean.tolist(),
                "channel_std": self.std.tolist(),
                "channel_std_ratio_max_min": (self.std.max() / self.std.min().clamp_min(1e-300)).item(),
                "channel_mean_spread": self.mean.std(unbiased=False).item(),
            },
            "tails": {
                **{f"p_abs_gt_{k}": (t.sum() / n.sum()).item() for k, t in zip(TAIL_KS, tails)},
                **{f"channel_p_abs_gt_{k}": (t / n).tolist() for k, t in zip(TAIL_KS, tails)},
                "gaussian": {f"p_abs_gt_{k}": GAUSSIAN_TAIL[k] for k in TAIL_KS},
                "channel_excess_kurtosis": (quartic / n - 3).tolist(),
                "excess_kurtosis": (quartic.sum() / n.sum() - 3).item(),
            },
            "peaks": {
                "median": float(np.median(peaks)),
                "p99": float(np.quantile(peaks, 0.99)),
                "max": float(peaks.max()),
                "gaussian": gaussian_peak_reference((c, h, w)),
            },
            "spots": {
                "concentration_median": float(np.median(concentration)),
                "concentration_p99": float(np.quantile(concentration, 0.99)),
                "uniform_concentration": 1.0 / (h * w),
                "modal_peak_position": [int(i) for i in np.unravel_index(int(positions.argmax()), (h, w))],
                "modal_peak_share": (positions.max() / positions.sum()).item(),
                "modal_peak_share_chance": modal_share_by_chance(int(positions.sum()), h * w),
                "peak_position_counts": positions.tolist(),
            },
            "posterior": {
                "logvar_histogram": self.logvar_hist.tolist(),
                "logvar_range": list(LOGVAR_CLAMP),
                "fraction_at_clamp": (clamp_count.sum() / n.sum()).item(),
                "channel_fraction_at_clamp": (clamp_count / n).tolist(),
                "channel_kl": (kl_sum / n).tolist(),  # nats per latent element
                "kl_per_element": (kl_sum.sum() / n.sum()).item(),
                "active_units": int((channel_var > ACTIVE_THRESHOLD).sum()),
                "channel_active": (channel_var > ACTIVE_THRESHOLD).tolist(),
            },
            "spectrum": {
                "high_band_share": (dct_high.sum() / dct_total.sum()).item(),
                "channel_high_band_share": (dct_high / dct_total).tolist(),
                "white_noise_high_band_share": high_band_mask(h, w).double().mean().item(),
            },
            "zhat_histogram": {"range": ZHAT_RANGE, "bins": ZHAT_BINS, "counts": self.zhat_hist.tolist()},
            "normalised": self.normalised(),
        }

    def normalised(self) -> dict:
        """The latents the diffusion model sees: the carried normalisation's output (for the FLUX.2 class its
        patches, (4C, h/2, w/2)), per channel and over all, of posterior means and of samples (exact over ε)."""
        moments, (count, *_, beyond) = self.layout_moments, self.sums_norm
        shift, scale = self.norm.shift_and_scale(len(count))
        mean = (moments["channel_mean"] - shift) * scale
        std_means, std_samples = moments["channel_std_of_means"] * scale, moments["channel_std_of_samples"] * scale
        overall = mean.mean()  # every channel has as many elements
        side = [s // p for s, p in zip(self.shape[1:], self.norm.patch_size)]
        return {
            "normalisation": self.norm.describe(),
            "latent_shape": [len(count), *side],
            "mean": overall.item(),
            "std_of_means": ((std_means.pow(2) + mean.pow(2)).mean() - overall**2).clamp_min(0).sqrt().item(),
            "std_of_samples": ((std_samples.pow(2) + mean.pow(2)).mean() - overall**2).clamp_min(0).sqrt().item(),
            "channel_mean": mean.tolist(),
            "channel_std_of_means": std_means.tolist(),
            "channel_std_of_samples": std_samples.tolist(),
            "p_abs_gt_4": (beyond.sum() / count.sum()).item(),
            "gaussian_p_abs_gt_4": GAUSSIAN_TAIL[4],
        }


class AffineDrift:
    """Per channel, the least-squares fit b_c ≈ slope_c · a_c + offset_c of two latents of the same images, with
    R², cosine similarity and relative error ‖b − a‖ / ‖a‖; streamed over batches in float64 sums, so it is
    exact up to rounding however the images are batched."""

    def __init__(self, channels: int):
        self.count = 0  # elements per channel
        self.sums = torch.zeros(6, channels, dtype=torch.float64)  # Σa, Σb, Σa², Σb², Σab, Σ(b − a)²

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Two latents (B, C, h, w) of the same images."""
        a, b = (t.detach().double().transpose(0, 1).flatten(1).cpu() for t in (a, b))  # (C, B·h·w)
        d = b - a  # summed apart: Σ(b − a)² from the other sums cancels to noise when a ≈ b
        self.sums += torch.stack([a.sum(1), b.sum(1), (a * a).sum(1), (b * b).sum(1), (a * b).sum(1), (d * d).sum(1)])
        self.count += a.shape[1]

    def result(self) -> dict:
        sa, sb, saa, sbb, sab, sdd = self.sums
        n = self.count
        ma, mb = sa / n, sb / n
        var_a, var_b, cov = saa / n - ma * ma, sbb / n - mb * mb, sab / n - ma * mb
        slope = cov / var_a
        r2 = cov * cov / (var_a * var_b)  # r² of the simple regression
        out = {"channels": int(self.sums.shape[1]), "elements_per_channel": n,
               "slope": _defined(slope, var_a > 0), "offset": _defined(mb - slope * ma, var_a > 0),
               "r2": _defined(r2, (var_a > 0) & (var_b > 0)),
               "cosine": _defined(sab / (saa * sbb).sqrt(), (saa > 0) & (sbb > 0)),
               "relative_error": _defined((sdd / saa).sqrt(), saa > 0),
               "mean_reference": ma.tolist(), "mean_candidate": mb.tolist(),
               "std_reference": var_a.clamp_min(0).sqrt().tolist(), "std_candidate": var_b.clamp_min(0).sqrt().tolist()}
        defined = [v for v in out["r2"] if v is not None]
        out["overall"] = {"cosine": (sab.sum() / (saa.sum() * sbb.sum()).sqrt()).item(),
                          "relative_error": (sdd.sum() / saa.sum()).sqrt().item(),
                          "r2_min": min(defined) if defined else None,
                          "slope_min": _extreme(out["slope"], min), "slope_max": _extreme(out["slope"], max),
                          "offset_max_abs": _extreme([None if v is None else abs(v) for v in out["offset"]], max)}
        return out


def _defined(values: torch.Tensor, where: torch.Tensor) -> list[float | None]:
    """``values`` as floats, None where ``where`` is false (a constant channel has no slope, no R²)."""
    return [v if ok else None for v, ok in zip(values.tolist(), where.tolist())]


def _extreme(values: list[float | None], pick: Callable) -> float | None:
    defined = [v for v in values if v is not None]
    return pick(defined) if defined else None


@torch.no_grad()
def latent_drift(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> dict:
    """How far ``candidate``'s raw latents of images ``x`` moved from ``reference``'s (:class:`AffineDrift`: per
    channel slope, offset and R², cosine, relative error), both encoded as ``first_stage.model.encode_latent`` does."""
    a, b = encode_latent(reference, x), encode_latent(candidate, x)
    if a.shape != b.shape:
        raise ValueError(f"latents of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared")
    drift = AffineDrift(a.shape[1])
    drift.add(a, b)
    return {**drift.result(), "images": int(x.shape[0])}
