"""Representation alignment: the tiny DINOv2 goes through the real loading path, the terms equal a
hand computation, and gradients reach the encoder and the projection but never the frozen model."""

import math
import shutil

import pytest
import torch

from first_stage.alignment import (PREPROCESSOR_FILE, AlignmentLoss, AlignmentModelError, alignment_terms,
                                   build_projection, check_alignment, load_foundation_model)
from first_stage.config import AlignmentConfig, ConfigError, DiscriminatorConfig, LossConfig, RegularizerConfig
from first_stage.losses import GeneratorLoss
from first_stage.model import AutoencoderWrapper
from first_stage.regularizers import KLRegularizer


def test_terms_match_a_hand_computation_margins_included():
    # Two positions (1x2 grid), D=2. Latents (1,0) and (0,1); features (1,0) and (1,1)/√2 (scale is irrelevant).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # (B,D,h,w): position i holds column i
    f = torch.tensor([[3.0, 0.0], [2.0, 2.0]]).T.reshape(1, 2, 1, 2)
    c = 1 / math.sqrt(2)  # cos at position 1; cos at position 0 is 1
    # cosine term: mean_i relu(1 - m - cos_i)
    for m, want in ((0.0, (0 + (1 - c)) / 2), (0.2, (0 + (0.8 - c)) / 2), (0.5, 0.0)):
        cos, _ = alignment_terms(z, f, m, 0.0)
        assert cos.item() == pytest.approx(want, abs=1e-6)
    # distance term: latent Gram [[1,0],[0,1]], feature Gram [[1,c],[c,1]]; |diff| is c off the diagonal
    for m, want in ((0.0, 2 * c / 4), (0.25, 2 * (c - 0.25) / 4), (0.8, 0.0)):
        _, dist = alignment_terms(z, f, 0.0, m)
        assert dist.item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("key, value", [("cos_margin", 3.0), ("distance_margin", -0.1), ("weight", -1.0)])
def test_out_of_range_settings_are_refused_by_key(key, value):
    with pytest.raises(ConfigError, match=f"alignment.{key}"):
        check_alignment(AlignmentConfig(**{key: value}))


def test_tiny_dinov2_loads_through_the_real_path(dinov2_folder):
    model = load_foundation_model(str(dinov2_folder))
    assert (model.dim, model.patch, model.prefix) == (32, 4, 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    features = model(x, (16, 16))  # "latent" grid: the image resized to 64², 16x16 patches
    assert features.shape == (2, 32, 16, 16) and features.dtype == torch.float32
    by_model = load_foundation_model(str(dinov2_folder), grid="model")(x, (16, 16))  # 32² input, 8x8 resized up
    assert by_model.shape == (2, 32, 16, 16) and not torch.allclose(by_model, features)
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # the processor file's
    # Under the run's bf16 the model computes in bf16 (on the CPU too); the features come out in fp32.
    bf16 = load_foundation_model(str(dinov2_folder), autocast=torch.bfloat16)(x, (16, 16))
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, features)
    torch.testing.assert_close(bf16, features, atol=0.1, rtol=0.1)


def test_a_missing_model_is_named_with_how_to_supply_it(tmp_path, monkeypatch, dinov2_folder):
    with pytest.raises(AlignmentModelError, match=r"no folder at .*missing.*huggingface-cli download"):
        load_foundation_model(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(AlignmentModelError, match=r"facebook/dinov2-large.*empty-cache.*huggingface-cli download "
                                                  r"facebook/dinov2-large"):
        load_foundation_model("facebook/dinov2-large")
    shutil.copytree(dinov2_folder, tmp_path / "no-processor")
    (tmp_path / "no-processor" / PREPROCESSOR_FILE).unlink()
    with pytest.raises(AlignmentModelError, match=f"no-processor.*{PREPROCESSOR_FILE}"):
        load_foundation_model(str(tmp_path / "no-processor"))


@pytest.mark.parametrize("adaptive", [False, True])
def test_gradients_reach_encoder_and_projection_never_the_frozen_model(tiny_vae, images, dinov2_folder, adaptive):
    features = load_foundation_model(str(dinov2_folder))
    cfg = AlignmentConfig(enabled=True, adaptive=adaptive)
    projection = build_projection(tiny_vae.config.latent_channels, features.dim)
    model = AutoencoderWrapper(tiny_vae, projection=projection)
    loss_cfg = LossConfig(perceptual_weight=0)
    loss_fn = GeneratorLoss(loss_cfg, KLRegularizer(RegularizerConfig(), "sum"), DiscriminatorConfig(), None,
                            AlignmentLoss(cfg, features))
    out = model(images)
    assert out.projected.shape == (2, 32, 16, 16)
    total, logs = loss_fn(out, 0, encoder_last_layer=model.encoder_last_layer())
    assert {"train/loss/align_cos", "train/loss/align_distance", "train/align_weight"} <= set(logs)
    if not adaptive:
        assert logs["train/align_weight"] == 0.1
    assert math.isfinite(logs["train/align_weight"]) and logs["train/align_weight"] > 0
    total.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert tiny_vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in features.parameters())
    # The alignment term alone reaches the encoder (not only through the NLL).
    tiny_vae.zero_grad()
    projection.zero_grad()
    align, _ = loss_fn.alignment(out.inputs, model(images).projected)
    align.backward()
    assert tiny_vae.encoder.conv_in.weight.grad.abs().sum() > 0 and tiny_vae.decoder.conv_out.weight.grad is None
