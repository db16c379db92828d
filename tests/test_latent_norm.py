"""The one latent normaliser: both kinds invert, read a config as diffusers pipelines do, are what the
export writes and reads back, and are what latent statistics compare as "carried / implied"."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import StableDiffusion3Img2ImgPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline)

from first_stage.export import ExportOptions, ExportSource, export_autoencoder
from first_stage.latent_norm import LatentNormalizer, worst_ratio
from first_stage.latent_stats import carried_and_implied, posterior_moments

GLOBAL = LatentNormalizer("global", 0.7, 0.3)
PER_CHANNEL = LatentNormalizer("per_channel", 0.9, latents_mean=(0.1, -2.0, 0.0, 5.0),
                               latents_std=(1.0, 0.01, 3.0, 40.0))


@pytest.mark.parametrize("norm", [GLOBAL, PER_CHANNEL], ids=["global", "per_channel"])
def test_normalize_and_denormalize_invert_each_other(norm):
    z = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 7 + 1
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z)
    assert norm.normalize(z).shape == z.shape
    # the fields written into config.json read back as the same normaliser
    assert LatentNormalizer.from_vae_config(json.loads(json.dumps(norm.config_entries()))) == norm


def spread_vae(vae: AutoencoderKL, factors: list[float]) -> AutoencoderKL:
    """``vae`` with latent channel c of its posterior mean scaled by ``factors[c]`` (quant_conv's mean
    rows) and a posterior std of e⁻¹⁰ (its log-variance rows), so samples spread as the means do."""
    c = len(factors)
    with torch.no_grad():
        scale = torch.tensor(factors)
        vae.quant_conv.weight[:c] *= scale.view(-1, 1, 1, 1)
        vae.quant_conv.bias[:c] *= scale
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -20.0
    return vae


def pipeline_stub(vae: AutoencoderKL) -> SimpleNamespace:
    """What a diffusers img2img pipeline's ``prepare_latents`` uses of ``self``: its VAE (and a scheduler
    that adds no noise)."""
    return SimpleNamespace(vae=vae, scheduler=SimpleNamespace(scale_noise=lambda x, t, noise: x))


@pytest.mark.parametrize("latent_norm", ["global", "per_channel"])
def test_from_vae_config_equals_what_diffusers_pipelines_compute(tiny_vae, images, tmp_path, latent_norm):
    """The SDXL img2img pipeline reads latents_mean/latents_std, the SD3 one shift_factor/scaling_factor:
    each pipeline's own prepare_latents on an export's config gives what normalize gives."""
    export_autoencoder(spread_vae(tiny_vae, [1.0, 10.0, 0.1, 3.0]), tmp_path / "vae", [images],
                       ExportSource("test", "test"), ExportOptions(latent_norm=latent_norm, single_file=None))
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    norm = LatentNormalizer.from_vae_config(vae.config)
    assert norm.kind == latent_norm
    pipeline = StableDiffusionXLImg2ImgPipeline if latent_norm == "per_channel" else StableDiffusion3Img2ImgPipeline
    extra = {"add_noise": False} if latent_norm == "per_channel" else {}
    with torch.no_grad():
        ours = norm.normalize(vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(3)))
        theirs = pipeline.prepare_latents(pipeline_stub(vae), images, None, 2, 1, torch.float32, "cpu",
                                          torch.Generator().manual_seed(3), **extra)
    torch.testing.assert_close(ours, theirs)
    # normalised as the pipeline would, the calibration images' latents have unit scale per channel
    # for per_channel (the export measured it on these images), and overall for global
    std = ours.std(dim=(0, 2, 3)) if latent_norm == "per_channel" else ours.std().view(1)
    assert std.tolist() == pytest.approx([1.0] * std.numel(), rel=0.25)


def test_sd1_config_without_shift_reads_as_a_zero_shift():
    norm = LatentNormalizer.from_vae_config({"scaling_factor": 0.18215, "shift_factor": None})
    assert norm == LatentNormalizer("global", 0.18215, 0.0)
    assert "0.18215" in norm.describe() and "SD3/FLUX" in norm.describe()


def test_measured_maps_the_moments_to_zero_mean_and_unit_std():
    z = torch.randn(64, 4, 8, 8, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1, 1) + 2
    args = (z.mean().item(), z.std(unbiased=False).item(), z.mean((0, 2, 3)).tolist(),
            z.std((0, 2, 3), unbiased=False).tolist())
    per_channel = LatentNormalizer.measured("per_channel", *args).normalize(z)
    assert per_channel.std((0, 2, 3), unbiased=False).tolist() == pytest.approx([1.0] * 4)
    assert per_channel.mean((0, 2, 3)).abs().max() < 1e-12
    whole = LatentNormalizer.measured("global", *args).normalize(z)
    assert whole.std(unbiased=False).item() == pytest.approx(1.0) and abs(whole.mean().item()) < 1e-12
    assert "per channel" in LatentNormalizer.measured("per_channel", *args).describe()


def test_inconsistent_normalisers_are_refused():
    with pytest.raises(ValueError, match="one of"):
        LatentNormalizer("batchnorm")
    with pytest.raises(ValueError, match="per_channel"):
        LatentNormalizer("global", latents_mean=(0.0,), latents_std=(1.0,))
    with pytest.raises(ValueError, match="channels"):
        LatentNormalizer("per_channel", latents_mean=(0.0,), latents_std=(1.0, 2.0))


def test_carried_over_implied_is_per_channel_for_a_per_channel_normaliser():
    """Latent statistics compare the carried normaliser with the one the measured moments imply: for a
    per-channel one each channel's std, not 1/std (the reading of scaling_factor alone)."""
    count = torch.full((4,), 100.0, dtype=torch.float64)
    mean, std = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 4.0, 8.0],
                                                                                       dtype=torch.float64)
    moments = posterior_moments(count, mean * count, (mean**2 + std**2) * count, torch.zeros(4, dtype=torch.float64))
    calibrated = LatentNormalizer("per_channel", 1.0, latents_mean=tuple(mean.tolist()),
                                  latents_std=tuple(std.tolist()))
    found = carried_and_implied(calibrated, moments)
    assert found["channel_carried_over_implied"] == pytest.approx([1.0] * 4) and found["carried_over_implied"] == 1.0
    off = LatentNormalizer("per_channel", 1.0, latents_mean=tuple(mean.tolist()), latents_std=(1.0, 2.0, 2.0, 8.0))
    found = carried_and_implied(off, moments)  # channel 2 carries half its std: it is scaled twice too much
    assert found["channel_carried_over_implied"] == pytest.approx([1.0, 1.0, 2.0, 1.0])
    assert found["carried_over_implied"] == pytest.approx(2.0)
    assert worst_ratio(torch.tensor([0.25, 1.0, 2.0])) == 0.25  # farthest from 1 on a log scale


BATCH_NORM = LatentNormalizer("batch_norm", running_mean=tuple(float(v) for v in torch.linspace(-1, 1, 8)),
                              running_var=tuple(float(v) for v in torch.linspace(0.5, 4, 8)), eps=1e-4,
                              patch_size=(2, 2))


def test_batch_norm_is_the_flux2_pipelines_normalisation_and_inverts():
    """The batch_norm kind is Flux2Pipeline's _patchify_latents then (z − mean)/sqrt(var + eps): the patches
    the transformer reads; denormalize takes them back to the latent the decoder reads."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    z = torch.randn(3, 2, 6, 4, dtype=torch.float64) * 3 + 1
    patches = Flux2Pipeline._patchify_latents(z)  # (3, 8, 3, 2)
    mean = torch.tensor(BATCH_NORM.running_mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.sqrt(torch.tensor(BATCH_NORM.running_var, dtype=torch.float64).view(1, -1, 1, 1) + 1e-4)
    torch.testing.assert_close(BATCH_NORM.normalize(z), (patches - mean) / std)
    torch.testing.assert_close(BATCH_NORM.denormalize(BATCH_NORM.normalize(z)), z)
    torch.testing.assert_close(BATCH_NORM.unlayout(patches), Flux2Pipeline._unpatchify_latents(patches))
    assert BATCH_NORM.config_entries() == {"batch_norm_eps": 1e-4, "patch_size": [2, 2]}
    assert "(c pi pj)" in BATCH_NORM.describe() and "0.0001" in BATCH_NORM.describe()
    with pytest.raises(ValueError, match="multiples of 2"):
        BATCH_NORM.normalize(z[..., :5, :])
    with pytest.raises(ValueError, match="patch_size are set for 'batch_norm'"):
        LatentNormalizer("global", patch_size=(2, 2))


def test_latent_statistics_measure_what_the_diffusion_model_sees():
    """LatentStatistics' "normalised" figures are those of the normaliser's output (the patches, for the
    FLUX.2 class), and carried / implied compares the carried BatchNorm with the one the latents imply."""
    from first_stage.latent_stats import LatentStatistics
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1) + 0.5
    logvar = torch.full_like(z, -2.0)
    for norm in (GLOBAL, BATCH_NORM):
        stats = LatentStatistics(2, (4, 4), norm)
        stats.first_pass(z, logvar)
        stats.finish_first_pass()
        found = stats.normalised()
        direct = norm.normalize(z)  # (B, C', h', w')
        assert found["latent_shape"] == list(direct.shape[1:])
        assert found["channel_mean"] == pytest.approx(direct.mean((0, 2, 3)).tolist())
        assert found["channel_std_of_means"] == pytest.approx(direct.std((0, 2, 3), unbiased=False).tolist())
        assert found["std_of_means"] == pytest.approx(direct.std(unbiased=False).item())
        scale = norm.channel_scale(direct.shape[1])  # samples add σ² = e⁻² times the scale² to each variance
        assert found["channel_std_of_samples"] == pytest.approx(
            (direct.var((0, 2, 3), unbiased=False) + math.exp(-2) * scale**2).sqrt().tolist())
        assert found["p_abs_gt_4"] == pytest.approx((direct.abs() > 4).double().mean().item())
    patches = BATCH_NORM.layout(z)
    calibrated = BATCH_NORM.with_statistics(patches.mean((0, 2, 3)), patches.var((0, 2, 3), unbiased=False))
    stats = LatentStatistics(2, (4, 4), calibrated)
    stats.first_pass(z, logvar)
    stats.finish_first_pass()
    assert carried_and_implied(calibrated, stats.layout_moments)["carried_over_implied"] == pytest.approx(1.0)
    assert stats.normalised()["channel_std_of_means"] == pytest.approx([1.0] * 8, abs=1e-3)  # var/(var+eps)
    assert carried_and_implied(BATCH_NORM, stats.layout_moments)["carried_over_implied"] != pytest.approx(1.0)
