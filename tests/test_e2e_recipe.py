"""configs/e2e_sd_f8c4.yaml (REPA-E's end-to-end tuning of a released SD-class VAE against a DiT-B/2): its numbers
are REPA-E's where REPA-E states them, its KL weight is REPA-E's in this package's "mean" reduction, and at tiny
size (a saved tiny diffusers AutoencoderKL as model.init_from, a 2-block transformer, a tiny random DINOv2) it runs
its discriminator's pre-training step and then a whole end-to-end step in process."""

from pathlib import Path

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from conftest import training_accelerator
from first_stage.config import ModelConfig, load_config
from first_stage.model import new_autoencoder
from first_stage.regularizers import KLRegularizer
from first_stage.trainer import TrainingState, build_parts, train_step

RECIPE = Path(__file__).parents[1] / "configs" / "e2e_sd_f8c4.yaml"


def test_e2e_recipe_is_repae_where_repae_states_it():
    config = load_config(RECIPE)
    e, d, o, t = config.e2e, config.discriminator, config.optimizer, config.train
    assert e.enabled and e.model == "facebook/dinov2-base" and e.transformer == "base" and e.encoder_depth == 4
    assert (e.align_weight, e.proj_coeff, e.path, e.time_sampling) == (1.5, 0.5, "linear", "uniform")
    assert (e.lr, e.betas, e.weight_decay, e.grad_clip, e.ema_decay) == (1e-4, (0.9, 0.999), 0.0, 1.0, 0.9999)
    assert (e.bn_momentum, e.bn_eps) == (0.1, 1e-4)
    assert config.loss.pixel_loss == "l1" and config.loss.perceptual_weight == 1.0 and config.loss.reduction == "mean"
    assert not config.loss.learn_logvar and config.loss.logvar_init == 0
    assert d.enabled and d.start == 0 and not d.adaptive and d.weight == 0.1 and d.pretrain_steps > 0
    assert (d.n_layers, d.channels, d.norm, d.loss) == (3, 64, "batch", "hinge")
    assert (o.lr, o.disc_lr, o.betas, o.weight_decay, o.grad_clip, o.schedule) == (
        1e-4, None, (0.9, 0.999), 0.0, 1.0, "constant")
    assert t.batch_size * t.grad_accum * 8 == 256 and t.max_steps - d.pretrain_steps == 400_000
    assert t.mixed_precision == "bf16" and not t.ema and config.export.weights == "raw"
    assert config.export.latent_norm == "per_channel" and config.data.resolution == 256


def test_e2e_recipe_kl_weight_is_repae_kl_in_the_mean_reduction():
    """REPA-E adds 1e-6 × the KL summed over the latent's C·h·w and averaged over the batch to MEANS of L1 and
    LPIPS; the recipe's kl_weight times the "mean" reduction's KL is that term, on the 4×32×32 latent of 256²."""
    config = load_config(RECIPE)
    side = config.data.resolution // 8
    torch.manual_seed(0)
    posterior = DiagonalGaussianDistribution(torch.randn(3, 8, side, side))  # (B, 2·C, h, w): mean and logvar
    ours, _ = KLRegularizer(config.regularizer, config.loss.reduction)(posterior, step=0)
    repae = 1e-6 * posterior.kl().sum() / 3  # loss/losses.py: torch.sum(kl) / kl.shape[0], kl summed per image
    torch.testing.assert_close(ours, repae.float(), rtol=1e-6, atol=0)
    assert config.regularizer.kl_weight == pytest.approx(1e-6 * 4 * side * side)


def test_e2e_recipe_pretrains_the_discriminator_then_tunes_end_to_end(dinov2_folder, vgg_file, images, tmp_path):
    """The recipe at tiny size from a saved tiny AutoencoderKL: step 0 trains the discriminator alone (the VAE and
    the transformer do not move, the transformer's BatchNorm is not started); step 1 is the end-to-end step: the
    VAE, the transformer and the discriminator move, the BatchNorm starts from the batch and the EMA follows."""
    torch.manual_seed(0)
    new_autoencoder(ModelConfig(preset="tiny")).save_pretrained(tmp_path / "vae")
    config = load_config(RECIPE, [
        "model.preset=tiny", f"model.init_from={tmp_path / 'vae'}", "data.source=sample", "data.resolution=32",
        "train.batch_size=2", "e2e.transformer=tiny", "e2e.encoder_depth=1", "e2e.projector_dim=16",
        f"e2e.model={dinov2_folder}", "discriminator.channels=16", "discriminator.pretrain_steps=1",
        f"loss.lpips_weights={vgg_file}", "loss.lpips_download=false"])
    with training_accelerator(config) as accelerator:
        parts = build_parts(config, accelerator)
        batch = {"pixel_values": images, "skipped": 0, "upsized": 0}
        state = TrainingState()

        def snapshot(module):
            return {k: v.clone() for k, v in module.state_dict().items()}

        def moved(module, before):
            return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())

        vae, disc, transformer = (snapshot(m) for m in (parts.raw_model.vae, parts.raw_discriminator,
                                                          parts.raw_transformer))
        logs = train_step(accelerator, parts, config, state, iter([batch]))
        assert "train/e2e/vae_align" not in logs and "train/grad_norm" not in logs
        assert moved(parts.raw_discriminator, disc)
        assert not moved(parts.raw_model.vae, vae) and not moved(parts.raw_transformer, transformer)
        assert int(parts.raw_transformer.bn.num_batches_tracked) == 0

        vae, disc, transformer = (snapshot(m) for m in (parts.raw_model.vae, parts.raw_discriminator,
                                                          parts.raw_transformer))
        logs = train_step(accelerator, parts, config, state, iter([batch]))
        assert state.step == 2 and state.skipped_steps == 0
        assert {"train/e2e/vae_align", "train/e2e/denoise", "train/e2e/proj", "train/loss/g"} <= set(logs)
        assert logs["train/d_weight"] == 0.1 and logs["train/grad_norm"] > 0 and logs["train/e2e_grad_norm"] > 0
        for module, before in ((parts.raw_model.vae, vae), (parts.raw_discriminator, disc),
                               (parts.raw_transformer, transformer)):
            assert moved(module, before)
        assert int(parts.raw_transformer.bn.num_batches_tracked) == 1
        assert parts.transformer_ema.bn.running_var.ne(1).all()  # started from the batch, as the raw one
