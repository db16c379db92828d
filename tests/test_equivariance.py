"""Equivariance and decoder noise: transforms on patterns with known answers, the EQ-VAE and
scale-equivariance terms zero on an autoencoder that is exactly equivariant by construction and not
on one that is not, and every random choice a function of (seed, step, image)."""

import dataclasses
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from first_stage.config import (Config, ConfigError, EquivarianceConfig, LatentNoiseConfig, LossConfig,
                                RegularizerConfig, load_config)
from first_stage.equivariance import (LatentTransform, add_decoder_noise, check_equivariance, decoder_noise, draw_step,
                                      resize, smallest_sides)
from first_stage.losses import GeneratorLoss
from first_stage.model import AutoencoderWrapper, ForwardPlan
from first_stage.terms import build_terms
from first_stage.trainer import check_sizes


class PointwiseVAE(nn.Module):
    """An f=1 autoencoder whose encoder and decoder act on each pixel alone: the encoder's mean is
    A·x + pattern and the decoder returns A⁻¹·(z - pattern), with ``pattern`` a fixed function of the
    position (sized to its input). Without a pattern it is exactly equivariant to every transform
    that acts alike on all channels; with one, it still reconstructs perfectly but is not."""

    def __init__(self, pattern: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.eye(3) + 0.3 * torch.randn(3, 3, generator=g))
        self.pattern = pattern
        self.config = types.SimpleNamespace(block_out_channels=(8,))  # one level: f = 1

    def _pattern(self, like: torch.Tensor) -> torch.Tensor:
        if not self.pattern:
            return torch.zeros_like(like)
        h, w = like.shape[-2:]
        rows = torch.linspace(-1, 1, h).view(h, 1)
        return (rows * torch.ones(1, w)).expand_as(like)  # a vertical ramp, whatever the size

    def encode(self, x):
        mean = torch.einsum("ij,bjhw->bihw", self.a, x) + self._pattern(x)
        moments = torch.cat([mean, torch.full_like(mean, -30.0)], 1)  # std ~ 3e-7: z ≈ mean
        return types.SimpleNamespace(latent_dist=DiagonalGaussianDistribution(moments))

    def decode(self, z):
        inverse = torch.linalg.inv(self.a)
        return types.SimpleNamespace(sample=torch.einsum("ij,bjhw->bihw", inverse, z - self._pattern(z)))


def smooth_images(n=2, side=16):
    g = torch.Generator().manual_seed(1)
    return nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=side, mode="bilinear") * 2 - 1


def rec_error(model, x, plan):
    out = model(x, torch.zeros(x.shape[0], 3, *x.shape[-2:]), plan)
    assert out.reconstruction.shape == out.target.shape
    return (out.reconstruction - out.target).abs().max().item(), out


def test_rotation_and_scale_on_a_pattern_with_a_known_answer():
    z = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    # EQ-VAE's torch.rot90(k, dims=[-1, -2]): 90° clockwise as displayed
    assert LatentTransform((1.0, 1.0), 1).latent(z).flatten().tolist() == [2.0, 0.0, 3.0, 1.0]
    assert LatentTransform((1.0, 1.0), 2).latent(z).flatten().tolist() == [3.0, 2.0, 1.0, 0.0]
    # Halving a 4x4 image of constant 2x2 blocks gives the blocks' values; anisotropic scales act per axis.
    blocks = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1).view(1, 1, 4, 4)
    halved = LatentTransform((0.5, 0.5)).latent(blocks)
    assert halved.shape == (1, 1, 2, 2)
    assert halved[0, 0, 0, 0] < halved[0, 0, 0, 1] < halved[0, 0, 1, 0] < halved[0, 0, 1, 1]
    assert LatentTransform((0.5, 1.0)).latent(blocks).shape == (1, 1, 2, 4)
    # The image of an f=4 latent goes to exactly 4x the transformed latent's size, then the same rotation.
    t = LatentTransform((0.5, 0.75), 1)
    assert t.latent(torch.zeros(1, 4, 8, 8)).shape[-2:] == (6, 4)
    assert t.image(torch.zeros(1, 3, 32, 32), 4).shape[-2:] == (24, 16)


@pytest.mark.parametrize("quarter_turns", [0, 1, 3])
def test_transformed_reconstruction_is_exact_for_an_equivariant_model_and_not_otherwise(quarter_turns):
    x = smooth_images()
    plan = ForwardPlan(transform=LatentTransform((0.5, 0.75), quarter_turns))
    error, out = rec_error(AutoencoderWrapper(PointwiseVAE(pattern=False)), x, plan)
    assert error < 1e-5 and out.target.shape[-2:] == ((12, 8) if quarter_turns % 2 else (8, 12))
    assert rec_error(AutoencoderWrapper(PointwiseVAE(pattern=True)), x, ForwardPlan())[0] < 1e-5  # plain: perfect
    assert rec_error(AutoencoderWrapper(PointwiseVAE(pattern=True)), x, plan)[0] > 0.05
    # A target under another rotation than the latent's would not match even the equivariant model.
    model = AutoencoderWrapper(PointwiseVAE(pattern=False))
    out = model(x, torch.zeros(2, 3, 16, 16), plan)
    wrong = LatentTransform((0.5, 0.75), quarter_turns + 2).image(x, 1)
    assert (out.reconstruction - wrong).abs().max() > 0.05


def test_scale_equivariance_term_is_zero_only_for_the_equivariant_model():
    x = smooth_images()
    config = Config(loss=LossConfig(perceptual_weight=0), regularizer=RegularizerConfig(kl_weight=0.0),
                    equivariance=EquivarianceConfig(enabled=True, scale_weight=1.0))
    loss = GeneratorLoss(config.loss, build_terms(config))
    plan = ForwardPlan(scale_factors=(2, 4))
    terms = {}
    for pattern in (False, True):
        out = AutoencoderWrapper(PointwiseVAE(pattern))(x, torch.zeros(2, 3, 16, 16), plan)
        assert [t.shape[-1] for t, _ in out.scaled] == [8, 4]
        terms[pattern] = loss(out, 0)[1]["train/loss/scale_eq"]
    assert terms[False] < 1e-4 and terms[True] > 1.0


def test_lowres_prior_preservation_reconstructs_the_half_size_image():
    x = smooth_images()
    plan = ForwardPlan(lowres=LatentTransform((0.5, 0.5)))
    out = AutoencoderWrapper(PointwiseVAE(pattern=False))(x, torch.zeros(2, 3, 16, 16), plan)
    assert out.inputs.shape[-1] == out.target.shape[-1] == out.reconstruction.shape[-1] == 8
    assert (out.reconstruction - out.target).abs().max() < 1e-5


def test_transforms_are_a_function_of_seed_and_step():
    cfg = EquivarianceConfig(enabled=True, probability=0.5, lowres_probability=0.5, anisotropic=True)
    draws = [draw_step(cfg, 0, step) for step in range(200)]
    assert draws == [draw_step(cfg, 0, step) for step in range(200)]  # what a resumed run draws
    assert draws != [draw_step(cfg, 1, step) for step in range(200)]
    transforms = [t for t, _ in draws if t is not None]
    assert 70 < len(transforms) < 130 and 20 < sum(low is not None for _, low in draws) < 80
    assert {t.quarter_turns for t in transforms} == {1, 2, 3}  # EQ-VAE: a transformed latent is always rotated
    scales = {s for t in transforms for s in t.scale}
    assert scales <= {n / 32 for n in range(8, 32)} and len(scales) > 15  # EQ-VAE's 8/32 ... 31/32
    assert any(t.scale[0] != t.scale[1] for t in transforms)
    iso = EquivarianceConfig(enabled=True, probability=1.0, anisotropic=False, rotations=False)
    assert all(t.scale[0] == t.scale[1] and t.quarter_turns == 0
               for t, _ in (draw_step(iso, 0, s) for s in range(20)))
    assert draw_step(EquivarianceConfig(), 0, 0) == (None, None)  # disabled


def test_decoder_noise_is_per_image_whatever_the_split():
    cfg = LatentNoiseConfig(enabled=True, tau=0.5, probability=0.5)
    eps, levels = decoder_noise(cfg, 0, 7, 0, 4, (4, 8, 6), "cpu")
    assert eps.shape == (4, 4, 8, 8) and levels.shape == (4,)
    halves = [decoder_noise(cfg, 0, 7, first, 2, (4, 8, 6), "cpu") for first in (0, 2)]
    assert torch.equal(eps, torch.cat([h[0] for h in halves]))
    assert torch.equal(levels, torch.cat([h[1] for h in halves]))
    many = torch.cat([decoder_noise(cfg, 0, s, 0, 4, (1, 1, 1), "cpu")[1] for s in range(100)])
    assert 0.35 < (many == 0).float().mean() < 0.65 and many.max() <= 0.5


def test_decoder_noise_scale_and_what_it_leaves_alone():
    z = torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1, 1)
    eps = torch.randn(3, 4, 6, 6)
    levels = torch.tensor([0.0, 0.5, 0.5])
    noisy = add_decoder_noise(z, eps, levels, None)
    assert torch.equal(noisy[0], z[0])  # level 0: clean
    for i in (1, 2):  # σ = level · the image's own std
        torch.testing.assert_close(noisy[i] - z[i], 0.5 * z[i].std() * eps[i, :, :5, :5])
    fixed = add_decoder_noise(z, eps, levels, reference_std=2.0)
    torch.testing.assert_close(fixed[2] - z[2], 1.0 * eps[2, :, :5, :5])
    # In the wrapper it reaches the decoder's input only: the posterior (and so the KL) is unchanged.
    x = smooth_images(3)
    model = AutoencoderWrapper(PointwiseVAE(pattern=False))
    clean = model(x, torch.zeros(3, 3, 16, 16))
    out = model(x, torch.zeros(3, 3, 16, 16), ForwardPlan(decoder_noise=torch.randn(3, 3, 16, 16), noise_levels=levels))
    assert torch.equal(out.posterior.mean, clean.posterior.mean) and torch.equal(out.z, clean.z)
    assert torch.equal(out.reconstruction[0], clean.reconstruction[0])
    assert not torch.equal(out.reconstruction[1], clean.reconstruction[1])


def test_out_of_range_settings_and_too_small_images_are_refused_by_key():
    with pytest.raises(ConfigError, match="equivariance.probability"):
        check_equivariance(EquivarianceConfig(probability=1.5))
    with pytest.raises(ConfigError, match="min_scale < max_scale"):
        check_equivariance(EquivarianceConfig(min_scale=0.8, max_scale=0.5))
    config = load_config(None, ["data.resolution=32", "equivariance.enabled=true"])
    with pytest.raises(ConfigError,
                       match=r"equivariance.min_scale: at data.resolution=32 it makes 8-pixel images.*LPIPS 16"):
        check_sizes(config, perceptual=True, factor=2)
    check_sizes(config, perceptual=False, factor=2)  # without LPIPS 8 pixels are enough
    with pytest.raises(ConfigError, match="equivariance.scale_factors"):
        check_sizes(load_config(None, ["data.resolution=64", "equivariance.enabled=true",
                                       "equivariance.probability=0", "equivariance.scale_weight=1",
                                       "equivariance.scale_factors=[8]"]), perceptual=True, factor=2)
    # Low-resolution steps (EQ-VAE: a scale from the n/32 grid, here at least 8/32 of 32 latent cells), and the
    # scale term on them, are checked too.
    with pytest.raises(ConfigError, match="lowres_probability: at data.resolution=32 it makes 8-pixel images"):
        check_sizes(load_config(None, ["data.resolution=32", "equivariance.enabled=true", "equivariance.probability=0",
                                       "equivariance.lowres_probability=0.25"]), perceptual=True, factor=2)
    scale_on_lowres = ["data.resolution=64", "equivariance.enabled=true", "equivariance.probability=0",
                       "equivariance.scale_weight=1", "equivariance.scale_factors=[4]"]
    check_sizes(load_config(None, scale_on_lowres), perceptual=True, factor=2)  # 16 px: enough for LPIPS
    with pytest.raises(ConfigError, match="scale_factors: at data.resolution=64 it makes 4-pixel images"):
        check_sizes(load_config(None, scale_on_lowres + ["equivariance.lowres_probability=0.5"]),
                    perceptual=True, factor=2)
    for key, value in (("latent_noise.tau", -1), ("latent_noise.probability", 2), ("latent_noise.reference_std", 0)):
        with pytest.raises(ConfigError, match=key):
            check_sizes(load_config(None, ["latent_noise.enabled=true", f"{key}={value}"]), False, 2)


def test_transforms_run_in_bf16():
    """The antialiased resize has no bf16 CPU kernel: it runs in fp32 and returns the input's dtype."""
    z = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    out = LatentTransform((0.5, 0.75), 1, antialias=True).latent(z)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 6, 4)


RECIPE = Path(__file__).resolve().parents[1] / "configs" / "eqvae_finetune.yaml"
GRID = {n / 32 for n in range(8, 32)}  # EQ-VAE: random.choice([s / 32 for s in range(8, 32)])


def eqvae_scale(t: torch.Tensor, scale) -> torch.Tensor:
    """EQ-VAE's scaling of latents and images (zelaki/eqvae train_eqvae/ldm/models/autoencoder.py)."""
    return torch.nn.functional.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False)


def eqvae_rotate(t: torch.Tensor, angle: int) -> torch.Tensor:
    """EQ-VAE's rotation (the same file): angle 1, 2, 3 → π/2, π, 3π/2."""
    return torch.rot90(t, k=angle, dims=[-1, -2])


def test_the_recipe_transforms_equal_eqvae_on_the_same_tensors():
    """configs/eqvae_finetune.yaml against EQ-VAE's own formulas on an SD-VAE-shaped latent (f8, 256²):
    the transformed latent and target, and the low-resolution branch, bit for bit."""
    cfg = load_config(RECIPE).equivariance
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(2, 4, 32, 32, generator=g), torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    transformed, lowres_scales = 0, set()
    for step in range(400):
        transform, lowres = draw_step(cfg, 0, step)
        if transform is not None:
            transformed += 1
            s, angle = transform.scale[0], transform.quarter_turns
            assert transform.scale == (s, s) and s in GRID and angle in (1, 2, 3)  # anisotropic: False
            assert torch.equal(transform.latent(z), eqvae_rotate(eqvae_scale(z, s), angle))  # forward()
            assert torch.equal(transform.image(x, 8), eqvae_rotate(eqvae_scale(x, s), angle))  # the target
        elif lowres is not None:  # prior preservation: the image itself scaled by s from the same grid
            s = lowres.scale[0]
            assert lowres.scale == (s, s) and s in GRID and lowres.quarter_turns == 0
            assert torch.equal(lowres.image(x, 8), eqvae_scale(x, s))
            lowres_scales.add(s)
    # p_prior 0.5, then p_prior_s 0.25 of the others
    assert 160 < transformed < 240 and 25 < sum(draw_step(cfg, 0, s)[1] is not None for s in range(400)) < 75
    assert len(lowres_scales) > 10


def test_scale_term_uses_the_same_operator_as_eqvae_by_default():
    """2502.14831 says "bilinear"; its exact operator is unverified: the package uses EQ-VAE's."""
    x = smooth_images()
    out = AutoencoderWrapper(PointwiseVAE(pattern=False))(x, torch.zeros(2, 3, 16, 16), ForwardPlan(scale_factors=(2,)))
    assert torch.equal(out.scaled[0][0], eqvae_scale(x, 0.5))
    assert torch.equal(resize(x, (12, 12)), F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False))


def test_each_departure_from_eqvae_changes_the_result():
    base = EquivarianceConfig(enabled=True, probability=0.5, lowres_probability=0.5)
    z = smooth_images(1, 32)
    plain, smoothed = LatentTransform((0.25, 0.25)), LatentTransform((0.25, 0.25), antialias=True)
    assert not torch.allclose(plain.latent(z), smoothed.latent(z), atol=1e-3)
    assert not torch.allclose(resize(z, (8, 8)), resize(z, (8, 8), antialias=True), atol=1e-3)
    draws = [draw_step(base, 0, step) for step in range(200)]
    antialiased = [draw_step(dataclasses.replace(base, antialias=True), 0, step) for step in range(200)]
    assert all(not t.antialias for d in draws for t in d if t is not None)
    assert all(t.antialias for d in antialiased for t in d if t is not None)
    anisotropic = [draw_step(dataclasses.replace(base, anisotropic=True), 0, step)[0] for step in range(200)]
    assert all(t.scale[0] == t.scale[1] for t, _ in draws if t is not None)
    assert any(t.scale[0] != t.scale[1] for t in anisotropic if t is not None)
    half = [draw_step(dataclasses.replace(base, lowres_half=True), 0, step)[1] for step in range(200)]
    assert {low.scale for _, low in draws if low is not None} != {(0.5, 0.5)}
    assert {low.scale for low in half if low is not None} == {(0.5, 0.5)}


def test_smallest_sides_follow_the_draws():
    """What the image-size checks read: the smallest image each part of the config makes."""
    recipe = load_config(RECIPE).equivariance
    assert smallest_sides(recipe, 256, 8) == [("equivariance.min_scale", 64), ("equivariance.lowres_probability", 64)]
    half = dataclasses.replace(recipe, lowres_half=True, scale_weight=1.0, scale_factors=(2, 4))
    assert smallest_sides(half, 256, 8) == [("equivariance.min_scale", 64), ("equivariance.lowres_probability", 128),
                                            ("equivariance.scale_factors", 32)]
    scale_only = EquivarianceConfig(enabled=True, probability=0, scale_weight=1.0, scale_factors=(4,))
    assert smallest_sides(scale_only, 64, 2) == [("equivariance.scale_factors", 16)]
    assert smallest_sides(dataclasses.replace(scale_only, lowres_probability=0.5), 64, 2) == [
        ("equivariance.lowres_probability", 16), ("equivariance.scale_factors", 4)]
    assert smallest_sides(EquivarianceConfig(), 256, 8) == []
    # every side is a whole number of latent cells, and what the draws make is never smaller
    cfg = dataclasses.replace(recipe, min_scale=0.3)
    sides = dict(smallest_sides(cfg, 200, 8))
    assert all(side % 8 == 0 for side in sides.values())
    x = torch.zeros(1, 3, 200, 200)
    for step in range(100):
        transform, lowres = draw_step(cfg, 0, step)
        if transform is not None:
            assert min(transform.image(x, 8).shape[-2:]) >= sides["equivariance.min_scale"]
        if lowres is not None:
            assert min(lowres.image(x, 8).shape[-2:]) >= sides["equivariance.lowres_probability"]
