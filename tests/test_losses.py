import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from first_stage.config import Config, DiscriminatorConfig, LossConfig, RegularizerConfig
from first_stage.discriminator import PatchDiscriminator, build_discriminator
from first_stage.loss_term import adaptive_weight
from first_stage.losses import GeneratorLoss, discriminator_step_loss
from first_stage.model import AutoencoderWrapper
from first_stage.regularizers import KLRegularizer, kl_per_element
from first_stage.terms import build_terms


def posterior_of(mean, logvar):
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 2, 2, 2, generator=g) * 0.5
    std = (0.5 * logvar).exp()
    z = mean + std * torch.randn(200_000, 2, 2, 2, generator=g)
    log_q = -0.5 * (((z - mean) / std) ** 2 + logvar + torch.log(torch.tensor(2 * torch.pi)))
    log_p = -0.5 * (z**2 + torch.log(torch.tensor(2 * torch.pi)))
    monte_carlo = (log_q - log_p).mean(0)
    closed = kl_per_element(posterior_of(mean, logvar))[0]
    torch.testing.assert_close(closed, monte_carlo, atol=0.03, rtol=0.03)


def test_kl_nonnegative_and_zero_at_prior():
    g = torch.Generator().manual_seed(1)
    kl = kl_per_element(posterior_of(torch.randn(4, 4, 8, 8, generator=g), 3 * torch.randn(4, 4, 8, 8, generator=g)))
    assert (kl >= 0).all()
    zero = kl_per_element(posterior_of(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)))
    assert torch.equal(zero, torch.zeros_like(zero))


def test_kl_reductions_and_their_conversion():
    g = torch.Generator().manual_seed(2)
    post = posterior_of(torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g))
    summed, _ = KLRegularizer(RegularizerConfig(kl_weight=1.0), "sum")(post, 0)
    mean, _ = KLRegularizer(RegularizerConfig(kl_weight=1.0), "mean")(post, 0)
    expected = 0.5 * (post.mean**2 + post.logvar.exp() - 1 - post.logvar).sum((1, 2, 3)).mean()
    torch.testing.assert_close(summed, expected)
    torch.testing.assert_close(mean, expected / (4 * 8 * 8))  # divide by latent elements per image


def test_kl_linear_schedule():
    reg = KLRegularizer(RegularizerConfig(kl_weight=1e-4, schedule="linear", warmup_steps=100))
    assert reg.weight(0) == 0.0
    assert reg.weight(50) == pytest.approx(5e-5)
    assert reg.weight(100) == reg.weight(1000) == pytest.approx(1e-4)
    assert KLRegularizer(RegularizerConfig(kl_weight=1e-4)).weight(0) == 1e-4


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_free_bits_floor(reduction):
    # Channel 0 carries little information (below the floor), channel 1 a lot.
    mean = torch.zeros(2, 2, 4, 4)
    mean[:, 1] = 3.0
    mean.requires_grad_(True)
    logvar = torch.zeros(2, 2, 4, 4)
    mean.data[:, 0] = 0.1  # KL = 0.005 nats per element
    reg = KLRegularizer(RegularizerConfig(kl_weight=1.0, free_bits=0.5), reduction)
    loss, logs = reg(posterior_of(mean, logvar), 0)
    loss.backward()
    assert torch.all(mean.grad[:, 0] == 0)  # below the floor: no gradient
    assert torch.all(mean.grad[:, 1] != 0)
    # the floored channel counts as exactly free_bits nats per element
    per_image = (0.5 + 4.5) * 16
    assert loss.item() == pytest.approx(per_image if reduction == "sum" else per_image / 32)
    # logs report the true KL, not the floored one
    assert logs["train/loss/kl"] < loss.item()
    inactive = KLRegularizer(RegularizerConfig(kl_weight=1.0, free_bits=0.001), reduction)
    no_floor, _ = inactive(posterior_of(mean, logvar), 0)
    raw, _ = KLRegularizer(RegularizerConfig(kl_weight=1.0), reduction)(posterior_of(mean, logvar), 0)
    torch.testing.assert_close(no_floor, raw)  # an inactive floor changes nothing


def make_loss(disc_cfg, perceptual=None, **loss_kwargs):
    config = Config(loss=LossConfig(**loss_kwargs), discriminator=disc_cfg)
    return GeneratorLoss(config.loss, build_terms(config), perceptual)


def test_nll_matches_reference_sum_reduction(tiny_vae, images):
    model = AutoencoderWrapper(tiny_vae, logvar_init=0.5)
    out = model(images)
    reconstruction, posterior, logvar = out.reconstruction, out.posterior, out.logvar
    loss_fn = make_loss(DiscriminatorConfig())
    total, logs = loss_fn(out, step=0)
    expected_nll = ((images - reconstruction).abs() / logvar.exp() + logvar).sum((1, 2, 3)).mean()
    assert logs["train/loss/nll"] == pytest.approx(expected_nll.item(), rel=1e-5)
    kl = posterior.kl().mean()
    torch.testing.assert_close(total, expected_nll + 1e-6 * kl)


def test_learned_logvar_is_optimised(tiny_vae, images):
    model = AutoencoderWrapper(tiny_vae, learn_logvar=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    loss, _ = make_loss(DiscriminatorConfig())(model(images), step=0)
    loss.backward()
    optimizer.step()
    assert model.logvar.item() != 0.0


def gan_setup(tiny_vae, images, step, **disc_kwargs):
    disc_cfg = DiscriminatorConfig(enabled=True, start=10, **disc_kwargs)
    model = AutoencoderWrapper(tiny_vae)
    discriminator = build_discriminator(disc_cfg)
    return model, discriminator, make_loss(disc_cfg), disc_cfg


def test_generator_step_leaves_no_grad_on_discriminator(tiny_vae, images):
    model, discriminator, loss_fn, _ = gan_setup(tiny_vae, images, step=20)
    discriminator.requires_grad_(False)
    torch.manual_seed(0)
    out = model(images)
    loss, logs = loss_fn(out, 20, discriminator, model.last_layer())
    # The adaptive weight written out: 0.5 · |grad nll| / (|grad g| + 1e-4) at the decoder's last conv.
    w = model.last_layer()
    nll = (images - out.reconstruction).abs().sum((1, 2, 3)).mean()  # logvar 0
    g_loss = -discriminator(out.reconstruction).mean()  # hinge generator loss
    nll_grad, g_grad = (torch.autograd.grad(t, w, retain_graph=True)[0] for t in (nll, g_loss))
    assert logs["train/d_weight"] == pytest.approx(0.5 * (nll_grad.norm() / (g_grad.norm() + 1e-4)).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in discriminator.parameters())
    assert model.vae.decoder.conv_out.weight.grad is not None


def test_discriminator_step_leaves_no_grad_on_autoencoder(tiny_vae, images):
    model, discriminator, _, disc_cfg = gan_setup(tiny_vae, images, step=20)
    reconstruction = model(images).reconstruction
    loss, logs = discriminator_step_loss(discriminator, images, reconstruction, disc_cfg.loss)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in discriminator.parameters())
    assert set(logs) == {"train/loss/disc", "train/logits_real", "train/logits_fake"}


def test_gan_term_zero_before_start(tiny_vae, images):
    model, discriminator, loss_fn, _ = gan_setup(tiny_vae, images, step=5, warmup_steps=5)
    out = model(images)
    for step in (0, 9, 14):  # before start, and during the warm-up after it
        loss, logs = loss_fn(out, step, discriminator, model.last_layer())
        assert "train/loss/g" not in logs
    assert "train/loss/g" in loss_fn(out, 15, discriminator, model.last_layer())[1]


def test_adaptive_weight_finite_and_clamped():
    w = torch.randn(4, 4, requires_grad=True)
    nll = (w * 1e6).sum()
    g_loss = (w * 0.0).sum()  # zero GAN gradient would divide by zero without the epsilon and clamp
    weight = adaptive_weight(nll, g_loss, w, max_weight=1e4)
    assert torch.isfinite(weight) and weight.item() == 1e4
    assert not weight.requires_grad


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_discriminator_patch_output(norm):
    d = PatchDiscriminator(norm=norm, channels=32)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
