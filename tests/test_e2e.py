"""End-to-end tuning (REPA-E, first_stage.e2e), in process on tiny models: a 2-block transformer, a tiny
random DINOv2 built from Dinov2Config. The firewalls with known answers, the latent BatchNorm against
torch's, the watchdog, and refusals. Run-level tests (exact resume, two processes equal one) are in
tests/test_train.py (``-k e2e``)."""

import dataclasses

import pytest
import torch

from conftest import training_accelerator
from first_stage.config import ConfigError, load_config
from first_stage.e2e import E2ETransformer, LatentBatchNorm, ema_update, repa_loss
from first_stage.loss_term import StepDraw
from first_stage.trainer import (TrainingState, build_parts, e2e_start, forward_plan, micro_step,
                                 posterior_noise, train_step)

E2E_TINY = ["data.resolution=32", "train.batch_size=2", "loss.perceptual_weight=0", "e2e.enabled=true",
            "e2e.transformer=tiny", "e2e.encoder_depth=1", "e2e.projector_dim=16", "export.latent_norm=per_channel",
            "optimizer.betas=[0.9, 0.999]", "optimizer.grad_clip=1.0"]


@pytest.fixture
def e2e_parts(dinov2_folder):
    """Training parts of a tiny e2e config (with a discriminator) on a one-process CPU Accelerator."""
    config = load_config(None, [*E2E_TINY, f"e2e.model={dinov2_folder}", "discriminator.enabled=true",
                                "discriminator.start=0", "discriminator.channels=16", "discriminator.adaptive=false",
                                "discriminator.weight=0.1"])
    with training_accelerator(config) as accelerator:
        torch.manual_seed(0)
        yield config, build_parts(config, accelerator), accelerator


def forward(parts, config, accelerator, images, step=0):
    """One micro-batch's VAE forward with the step's draws, as train_step makes them."""
    shape = parts.latent_shape(images.shape[-1])
    noise = posterior_noise(config.train.seed, step, 0, accelerator, 2, images.shape[0], shape)
    plan = forward_plan(parts, StepDraw(config.train.seed, step, 0, images.shape[0], shape, accelerator.device))
    return parts.model(images, noise, plan), plan


def vae_loss(parts, out, plan, step=0):
    return parts.loss_fn(out, step, parts.raw_discriminator, parts.raw_model.last_layer(),
                         parts.raw_model.encoder_last_layer(), plan)[0]


def buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def vae_grads(parts):
    return {n: p.grad.clone() for n, p in parts.raw_model.vae.named_parameters() if p.grad is not None}


def test_e2e_latent_batchnorm_equals_torch_batchnorm():
    """In train mode the output and running statistics are BatchNorm2d(affine=False)'s, in eval mode its
    normalisation by the running statistics; a latent with a graph is refused in train mode."""
    torch.manual_seed(0)
    ours, theirs = LatentBatchNorm(4, eps=1e-4, momentum=0.1), torch.nn.BatchNorm2d(4, 1e-4, 0.1, affine=False)
    for _ in range(3):
        z = torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 3.0, 0.5, 10.0]).view(1, 4, 1, 1) + 2
        torch.testing.assert_close(ours(z), theirs(z), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-6, atol=1e-6)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(z), theirs(z), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="detached"):
        ours.train()(z.requires_grad_())


def test_e2e_firewalls_with_known_answers(e2e_parts, images):
    """The VAE's gradients are bit-identical with and without the transformer's loss in the graph; the align
    pass leaves every transformer parameter without a gradient and the BatchNorm's buffers unchanged, yet its
    gradient reaches the encoder; the transformer step changes the buffers and trains the transformer."""
    config, parts, accelerator = e2e_parts
    transformer = parts.raw_transformer
    out, plan = forward(parts, config, accelerator, images)
    e2e_start(parts, out.z, plan)
    assert transformer.bn.running_var.ne(1).all()  # measured from the batch (REPA-E's init_bn)
    transformer.bn.running_mean.add_(1.0)  # away from this batch's mean, so that a train-mode pass moves it
    started = buffers(transformer)
    loss = vae_loss(parts, out, plan)
    assert all(torch.equal(v, buffers(transformer)[k]) for k, v in started.items())  # the align pass moved none
    loss.backward()
    assert all(p.grad is None for p in transformer.parameters())
    alone = vae_grads(parts)
    parts.optimizer.zero_grad(set_to_none=True)

    out, plan = forward(parts, config, accelerator, images)
    loss = vae_loss(parts, out, plan)
    t_loss, logs = parts.e2e.transformer_loss(parts.transformer, out.z, plan.diffusion)
    (loss + t_loss).backward()
    both = vae_grads(parts)
    assert alone.keys() == both.keys() and all(torch.equal(alone[k], both[k]) for k in alone)
    assert all(p.grad is not None for p in transformer.parameters())
    moved = buffers(transformer)
    assert not torch.equal(moved["bn.running_mean"], started["bn.running_mean"])
    assert int(moved["bn.num_batches_tracked"]) == 1 and set(logs) == {"train/e2e/denoise", "train/e2e/proj"}

    # the alignment alone reaches the encoder (through the frozen transformer and its BatchNorm)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.transformer_optimizer.zero_grad(set_to_none=True)
    out, plan = forward(parts, config, accelerator, images)
    align, _ = parts.e2e.loss(out, type("Ctx", (), {"plan": plan})())
    align.backward()
    encoder = [p.grad for n, p in parts.raw_model.vae.named_parameters() if n.startswith("encoder.")]
    assert all(g is not None for g in encoder) and sum(g.abs().sum() for g in encoder) > 0
    assert all(p.grad is None for p in transformer.parameters())


def test_e2e_step_trains_all_three_and_the_ema_follows_with_its_buffers(e2e_parts, images):
    """A train step moves the VAE, the discriminator and the transformer, logs both gradient norms, and the
    transformer's EMA takes (1 − decay) of the step (REPA-E's update_ema)."""
    config, parts, accelerator = e2e_parts
    batch = {"pixel_values": images, "skipped": 0, "upsized": 0}
    before = {k: v.clone() for k, v in parts.raw_transformer.state_dict().items()}
    vae_before = {k: v.clone() for k, v in parts.raw_model.vae.state_dict().items()}
    disc_before = {k: v.clone() for k, v in parts.raw_discriminator.state_dict().items()}
    state = TrainingState()
    logs = train_step(accelerator, parts, config, state, iter([batch]))
    assert logs["train/grad_norm"] > 0 and logs["train/e2e_grad_norm"] > 0 and "train/e2e/vae_align" in logs
    for module, old in ((parts.raw_transformer, before), (parts.raw_model.vae, vae_before),
                        (parts.raw_discriminator, disc_before)):
        assert any(not torch.equal(v, old[k]) for k, v in module.state_dict().items())
    decay = config.e2e.ema_decay
    model, ema = parts.raw_transformer.state_dict(), parts.transformer_ema.state_dict()
    for name, _ in parts.raw_transformer.named_parameters():  # the EMA started as the model's first state
        torch.testing.assert_close(ema[name], decay * before[name] + (1 - decay) * model[name], rtol=0, atol=1e-7)
    assert int(ema["bn.num_batches_tracked"]) == 1  # copied; the float buffers: test_e2e_ema_update_is_repae_update_ema


def test_e2e_ema_update_is_repae_update_ema():
    """ema ← d·ema + (1 − d)·model for parameters and float buffers, integer buffers copied; d = 0 copies."""
    a, b = LatentBatchNorm(2), LatentBatchNorm(2)
    a.running_mean.fill_(1.0)
    b.running_mean.fill_(3.0)
    b.num_batches_tracked.fill_(5)
    ema_update(a, b, 0.75)
    assert torch.equal(a.running_mean, torch.full((2,), 1.5)) and int(a.num_batches_tracked) == 5
    ema_update(a, b, 0.0)
    assert torch.equal(a.running_mean, b.running_mean)


def test_e2e_repa_loss_is_negative_cosine():
    x = torch.randn(2, 5, 7)
    assert repa_loss(x, 3 * x).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss(x, -x).item() == pytest.approx(1.0, abs=1e-6)


def test_e2e_watchdog_counts_the_transformers_vanishing_gradient(e2e_parts, images):
    """A step whose losses are multiplied by 0 counts towards both watchdogs; a step with gradients resets them."""
    config, parts, accelerator = e2e_parts
    state = TrainingState()
    batch = {"pixel_values": images, "skipped": 0, "upsized": 0}
    logs = train_step(accelerator, parts, config, state, iter([batch]), inject="zero")
    assert logs["train/e2e_grad_norm"] == 0 and state.consecutive_vanishing_transformer == 1
    logs = train_step(accelerator, parts, config, state, iter([batch]))
    assert logs["train/e2e_grad_norm"] > 0 and state.consecutive_vanishing_transformer == 0


@pytest.mark.parametrize("fault", ["nonfinite", "nonfinite_transformer", "nan_gradient"])
def test_e2e_a_skipped_step_changes_nothing(e2e_parts, images, fault):
    """A non-finite VAE loss, a non-finite transformer loss alone, or a finite loss whose transformer gradient is
    NaN: the step is skipped, and every weight and buffer (the transformer's BatchNorm, the discriminator's) is put
    back as it was; the next step measures the BatchNorm afresh and trains."""
    config, parts, accelerator = e2e_parts
    state = TrainingState()
    batch = {"pixel_values": images, "skipped": 0, "upsized": 0}
    modules = (parts.raw_transformer, parts.raw_discriminator, parts.raw_model)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    hook = None
    if fault == "nan_gradient":
        hook = parts.raw_transformer.dit.out.bias.register_hook(lambda g: g * float("nan"))
    train_step(accelerator, parts, config, state, iter([batch]), inject=None if hook else fault)
    assert state.skipped_steps == 1 and state.consecutive_nonfinite == 1
    for module, old in zip(modules, before):
        assert all(torch.equal(v, old[k]) for k, v in module.state_dict().items()), type(module).__name__
    if hook is not None:
        hook.remove()
    logs = train_step(accelerator, parts, config, state, iter([batch]))
    assert state.skipped_steps == 1 and logs["train/e2e_grad_norm"] > 0
    assert int(parts.raw_transformer.bn.num_batches_tracked) == 1


def test_e2e_batchnorm_starts_from_measured_images(e2e_parts):
    """e2e_measure (before the first step of a new run): the BatchNorm's and its EMA's running statistics are the
    mean and unbiased variance of the seeded posterior samples of the images; the first step keeps them."""
    from first_stage.data import calibration_batches
    from first_stage.e2e import E2E_MEASURE_TAG
    from first_stage.trainer import e2e_measure

    config, parts, accelerator = e2e_parts
    data = dataclasses.replace(config.data, split="all")
    assert e2e_measure(accelerator, parts, calibration_batches(data, 6, 4), seed=0) == 6
    z = []
    for batch in calibration_batches(data, 6, 4):
        posterior = parts.raw_model.vae.encode(batch["pixel_values"]).latent_dist
        for k, i in enumerate(batch["ids"]):
            noise = torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(
                hash((0, E2E_MEASURE_TAG, i))))
            z.append((posterior.mean[k] + posterior.std[k] * noise).double())
    z = torch.stack(z)
    bn, ema = parts.raw_transformer.bn, parts.transformer_ema.bn
    torch.testing.assert_close(bn.running_mean.double(), z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), z.transpose(0, 1).flatten(1).var(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(ema.running_var, bn.running_var) and int(bn.num_batches_tracked) == 0
    measured = bn.running_var.clone()
    images = next(iter(calibration_batches(data, 2, 2)))["pixel_values"]
    out, plan = forward(parts, config, accelerator, images)
    e2e_start(parts, out.z, plan)
    assert torch.equal(bn.running_var, measured)


@pytest.mark.parametrize("overrides, key", [
    (["e2e.encoder_depth=3"], "e2e.encoder_depth"),
    (["e2e.align_weight=-1"], "e2e.align_weight"),
    (["e2e.ema_decay=1.5"], "e2e.ema_decay"),
    (["model.trainable=decoder"], "model.trainable"),
    (["teacher.path=/nowhere"], "teacher.path"),
])
def test_e2e_bad_settings_are_refused_at_load_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [*E2E_TINY, *overrides])


def test_e2e_global_normalisation_is_refused_for_a_kl_vae(dinov2_folder, accelerator):
    config = load_config(None, [*E2E_TINY, f"e2e.model={dinov2_folder}", "export.latent_norm=global"])
    with pytest.raises(ConfigError, match=r"export\.latent_norm.*per_channel"):
        build_parts(config, accelerator)


def test_e2e_micro_step_runs_before_the_discriminator_pretraining_ends_without_the_transformer(dinov2_folder,
                                                                                                images):
    """During discriminator.pretrain_steps only the discriminator trains: the transformer sees nothing."""
    config = load_config(None, [*E2E_TINY, f"e2e.model={dinov2_folder}", "discriminator.enabled=true",
                                "discriminator.start=0", "discriminator.channels=16", "discriminator.pretrain_steps=1"])
    with training_accelerator(config) as accelerator:
        parts = build_parts(config, accelerator)
        before = {k: v.clone() for k, v in parts.raw_transformer.state_dict().items()}
        out_shape = parts.latent_shape(32)
        noise = posterior_noise(0, 0, 0, accelerator, 2, 2, out_shape)
        plan = forward_plan(parts, StepDraw(0, 0, 0, 2, out_shape, accelerator.device))
        finite, logs = micro_step(accelerator, parts, images, noise, 0, config, None, plan)
        assert finite and "train/e2e/denoise" not in logs
        assert all(torch.equal(v, before[k]) for k, v in parts.raw_transformer.state_dict().items())


def test_e2e_draws_are_a_function_of_the_image_not_the_layout(e2e_parts):
    """t and noise of an image depend on (seed, step, its place in the global batch) only: four images drawn at
    once equal two micro-batches (or two processes) of two."""
    config, parts, accelerator = e2e_parts
    shape, device = parts.latent_shape(32), accelerator.device
    whole = parts.e2e.draw(StepDraw(0, 3, 0, 4, shape, device))
    halves = [parts.e2e.draw(StepDraw(0, 3, first, 2, shape, device)) for first in (0, 2)]
    assert torch.equal(whole.t, torch.cat([h.t for h in halves]))
    assert torch.equal(whole.noise, torch.cat([h.noise for h in halves]))
    assert not torch.equal(whole.t, parts.e2e.draw(StepDraw(0, 4, 0, 4, shape, device)).t)
    assert ((whole.t >= 0) & (whole.t <= 1)).all()


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_e2e_interpolant_velocity_is_the_time_derivative(path):
    """REPA-E's paths: the target d_alpha·x + d_sigma·ε is d/dt of alpha·x + sigma·ε (finite difference)."""
    from first_stage.e2e import interpolant

    t = torch.tensor([0.2, 0.7]).view(-1, 1, 1, 1).double()
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)
    a2, s2, _, _ = interpolant(t + 1e-6, path)
    torch.testing.assert_close((a2 - alpha) / 1e-6, d_alpha, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((s2 - sigma) / 1e-6, d_sigma, rtol=1e-4, atol=1e-5)


def test_e2e_resume_into_another_transformer_is_refused_naming_the_file(e2e_parts, images, tmp_path):
    """A checkpoint whose transformer has other shapes is refused, naming its file and the config to resume with;
    a checkpoint of a run without e2e is refused, naming the missing file."""
    import json

    from first_stage.checkpoint import TRAINING_STATE, CheckpointError, save_checkpoint
    from first_stage.trainer import restore, run_files, trainer_states

    config, parts, accelerator = e2e_parts
    state = TrainingState()
    train_step(accelerator, parts, config, state, iter([{"pixel_values": images, "skipped": 0, "upsized": 0}]))
    files = {**run_files(config, parts), TRAINING_STATE: json.dumps(state.state_dict())}
    ckpt = save_checkpoint(accelerator, tmp_path / "ckpts", state.step, files, 0, trainer_states(parts))
    assert restore(accelerator, parts, ckpt).step == 1
    kept = parts.raw_transformer
    parts.raw_transformer = E2ETransformer(parts.e2e.channels, parts.e2e.side,
                                           dataclasses.replace(config.e2e, projector_dim=8), parts.e2e.vision.dim)
    with pytest.raises(CheckpointError, match=r"e2e_transformer\.pt does not fit this config's raw_transformer"):
        restore(accelerator, parts, ckpt)
    parts.raw_transformer = kept
    (ckpt / "e2e_ema.pt").unlink()
    with pytest.raises(CheckpointError, match=r"e2e_ema\.pt not found"):
        restore(accelerator, parts, ckpt)


def test_e2e_fixed_weights_keep_their_balance_under_the_sum_reduction(dinov2_folder, images):
    """REPA-E's align weight (1.5) and fixed GAN weight (0.1) are stated against a per-element mean NLL: under
    loss.reduction "sum", whose NLL sums an image's 3·H·W elements, the terms are 3·H·W times larger, so the
    balance is the same."""
    from first_stage.loss_term import LossContext

    terms = {}
    for reduction in ("mean", "sum"):
        config = load_config(None, [*E2E_TINY, f"e2e.model={dinov2_folder}", f"loss.reduction={reduction}",
                                    "discriminator.enabled=true", "discriminator.start=0", "discriminator.channels=16",
                                    "discriminator.adaptive=false", "discriminator.weight=0.1"])
        with training_accelerator(config) as accelerator:
            torch.manual_seed(0)
            parts = build_parts(config, accelerator)
            out, plan = forward(parts, config, accelerator, images)
            e2e_start(parts, out.z, plan)
            gan = next(t for t in parts.loss_fn.terms if t.name == "gan")
            ctx = LossContext(step=0, nll=torch.zeros(()), base=parts.loss_fn, plan=plan,
                              discriminator=parts.raw_discriminator, last_layer=parts.raw_model.last_layer())
            terms[reduction] = (parts.e2e.loss(out, ctx)[0].item(), gan.loss(out, ctx)[0].item())
    elements = 3 * 32 * 32
    for mean, summed in zip(terms["mean"], terms["sum"]):
        assert summed == pytest.approx(elements * mean, rel=1e-5)
