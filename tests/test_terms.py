"""The loss-term registry: every term is a unit that the loss, the checks at load, the model card,
bench_train and the KL study read, and a new term needs its class and one registry line."""

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import first_stage.terms as terms_module
from first_stage.config import Config, ConfigError, load_config
from first_stage.export import ExportOptions, ExportSource, export_autoencoder
from first_stage.loss_term import LossTerm
from first_stage.losses import GeneratorLoss
from first_stage.model import AutoencoderWrapper
from first_stage.terms import TERMS, bench_rows, build_terms, study_variants
from first_stage.trainer import TrainingState, accelerator_options, build_parts, train_step

TINY = ["data.resolution=32", "train.batch_size=2", "loss.perceptual_weight=0"]


def test_every_term_names_a_config_section_and_its_rows_switch_it_on():
    sections = {f.name for f in dataclasses.fields(Config)}
    for name, term in TERMS.items():
        assert term.section in sections, name
    for row, sets in bench_rows().items():
        enabled = [name for name, term in TERMS.items() if term.enabled(load_config(None, sets))]
        assert len(enabled) > 1, (row, enabled)  # the regulariser, and the term the row is about
    for variant, (sets, _, _) in study_variants().items():
        assert sum(term.enabled(load_config(None, sets)) for term in TERMS.values()) > 1, variant
    # the plain default trains with the regulariser alone
    assert [type(t).__name__ for t in build_terms(Config())] == ["RegularizerTerm"]


@pytest.mark.parametrize("override, key", [
    ("equivariance.probability=2", "equivariance.probability"),
    ("equivariance.min_scale=0", "min_scale"),
    ("alignment.cos_margin=3", "alignment.cos_margin"),
    ("latent_noise.tau=-1", "latent_noise.tau"),
    ("regularizer.mmd_samples=1", "regularizer.mmd_samples"),
    ("regularizer.kl_weight=-1", "regularizer.kl_weight"),
    ("discriminator.n_layers=0", "discriminator.n_layers"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.ema_decay=1.5", "train.ema_decay"),
    ("optimizer.grad_clip=0", "optimizer.grad_clip"),
    ("model.trainable=decoder", "alignment.enabled needs model.trainable"),
])
def test_out_of_range_values_are_refused_at_load_naming_the_key(override, key):
    section = override.split(".")[0]
    switch = [f"{section}.enabled=true"] if section in ("equivariance", "alignment", "latent_noise") else []
    if override.startswith("regularizer.mmd"):
        switch = ["regularizer.kind=mmd"]
    if override.startswith("model.trainable"):
        switch = ["alignment.enabled=true"]
    with pytest.raises(ConfigError, match=key):
        load_config(None, switch + [override])


def test_a_discriminator_larger_than_the_images_is_refused_at_load():
    with pytest.raises(ConfigError, match="discriminator.n_layers: a 3-layer PatchGAN takes images of at least 24"):
        load_config(None, ["data.resolution=16", "discriminator.enabled=true"])


def test_model_card_lines_state_every_term_with_its_weight():
    config = load_config(None, ["equivariance.enabled=true", "equivariance.scale_weight=0.5",
                                "latent_noise.enabled=true", "discriminator.enabled=true", "discriminator.start=7"])
    lines = [t.card_line() for t in build_terms(config)]
    assert lines[0].startswith("KL to N(0, I), weight 1e-06")
    assert any(line.startswith("equivariance (EQ-VAE): 0.5 of the steps") for line in lines)
    assert any("scale equivariance (arXiv 2502.14831), weight 0.5" in line for line in lines)
    assert any(line.startswith("decoder noise (RAE)") for line in lines)
    assert lines[-1].startswith("PatchGAN (3 layers, batch norm, hinge loss) from step 7")


class ToyTerm(LossTerm):
    """A new term as a user would add it: penalise the latent's energy."""

    name, section = "toy", "latent_noise"  # rides on an existing section's switch for the test

    def loss(self, out, ctx):
        value = out.z.float().pow(2).mean()
        return 0.5 * value, {"train/loss/toy": value.item()}

    def card_line(self):
        return "toy: 0.5 × mean z²"


@pytest.fixture
def toy_registry(monkeypatch):
    """TERMS with ToyTerm added: the one line a new term needs."""
    monkeypatch.setattr(terms_module, "TERMS", {**TERMS, "toy": ToyTerm})
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_a_new_term_is_one_class_and_one_registry_line(toy_registry, tiny_vae, images):
    # The loss adds it and logs it.
    config = load_config(None, TINY + ["latent_noise.enabled=true", "latent_noise.tau=0"])
    loss_fn = GeneratorLoss(config.loss, build_terms(config))
    out = AutoencoderWrapper(tiny_vae)(images, torch.zeros(2, 4, 16, 16))
    total, logs = loss_fn(out, 0)
    expected = logs["train/loss/nll"] + logs["train/loss/kl"] * 1e-6 + 0.5 * logs["train/loss/toy"]
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert "toy: 0.5 × mean z²" in loss_fn.card_lines()
    # The trainer runs it without a change: build_parts and train_step read the registry.
    accelerator = Accelerator(cpu=True, **accelerator_options(config.train))
    parts = build_parts(config, accelerator)
    batches = iter([{"pixel_values": images, "skipped": 0, "upsized": 0}])
    step_logs = train_step(accelerator, parts, config, TrainingState(), batches)
    assert step_logs["train/loss/toy"] > 0


def test_the_model_card_states_every_term_that_trained_the_export(tiny_vae, images, tmp_path):
    config = load_config(None, TINY + ["loss.perceptual_weight=1", "loss.lpips_missing=warn",
                                       "equivariance.enabled=true", "alignment.enabled=true"])
    # As the run records them: LPIPS was skipped for want of weights (the loss had no perceptual net).
    loss_fn = GeneratorLoss(config.loss, build_terms(config), perceptual=None)
    source = ExportSource(source="test", calibration="test images", config=config, loss_terms=loss_fn.card_lines())
    export_autoencoder(tiny_vae, tmp_path / "run", [images], source, ExportOptions(single_file=None))
    card = (tmp_path / "run" / "README.md").read_text()
    assert "the 1 × LPIPS term was SKIPPED (no VGG16 weights" in card and "+ 1 × LPIPS" not in card
    assert "  - equivariance (EQ-VAE): 0.5 of the steps" in card
    assert "  - alignment to `facebook/dinov2-large` patch features (VA-VAE), weight 0.1" in card
    # An older checkpoint recorded nothing: the configured terms, and LPIPS marked as not recorded.
    export_autoencoder(tiny_vae, tmp_path / "old", [images], dataclasses.replace(source, loss_terms=None),
                       ExportOptions(single_file=None))
    card = (tmp_path / "old" / "README.md").read_text()
    assert "+ 1 × LPIPS as configured (loss.lpips_missing: warn; whether the weights were found is not" in card
    assert "  - equivariance (EQ-VAE)" in card
