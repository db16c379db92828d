"""Representation alignment: the tiny DINOv2 goes through the real loading path, the terms equal a
hand computation, and gradients reach the encoder and the projection but never the frozen model."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from first_stage.alignment import (PREPROCESSOR_FILE, AlignmentModelError, alignment_terms, check_alignment,
                                   load_foundation_model)
from first_stage.config import AlignmentConfig, Config, ConfigError, LossConfig
from first_stage.alignment import PROJECTION_FILE, AlignmentLoss, build_projection, save_standin_dinov2
from first_stage.config import ModelConfig, load_config
from first_stage.convert import to_ldm_state_dict
from first_stage.losses import GeneratorLoss
from first_stage.model import AutoencoderWrapper, new_autoencoder
from first_stage.terms import build_terms


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
    config = Config(loss=LossConfig(perceptual_weight=0),
                    alignment=AlignmentConfig(enabled=True, adaptive=adaptive, model=str(dinov2_folder)))
    terms = build_terms(config)
    projection = terms[1].build(tiny_vae, torch.device("cpu"))  # the alignment term, after the regulariser
    features = terms[1].alignment.features
    model = AutoencoderWrapper(tiny_vae, projection=projection)
    loss_fn = GeneratorLoss(config.loss, terms)
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
    align, _ = terms[1].alignment(out.inputs, model(images).projected)
    align.backward()
    assert tiny_vae.encoder.conv_in.weight.grad.abs().sum() > 0 and tiny_vae.decoder.conv_out.weight.grad is None


ROOT = Path(__file__).resolve().parents[1]


def vavae_forward_dinov2(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """VA-VAE's DINOv2 features (hustvl/LightningDiT vavae/ldm/models/foundation_models.py forward_dinov2),
    with transformers' Dinov2Model standing in for timm's: last_hidden_state is forward_features."""
    b, c, h, w = x.shape
    x = nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    return model(pixel_values=x).last_hidden_state[:, 1:].reshape(b, h // 16, w // 16, -1).permute(0, 3, 1, 2)


def vavae_loss(z: torch.Tensor, aux_feature: torch.Tensor, distmat_margin: float, cos_margin: float) -> torch.Tensor:
    """VA-VAE's vf_loss (vavae/ldm/modules/losses/contperceptual.py), distmat_weight = cos_weight = 1."""
    z_norm = F.normalize(z.flatten(2), dim=1)
    aux_feature_norm = F.normalize(aux_feature.flatten(2), dim=1)
    z_cos_sim = torch.einsum("bci,bcj->bij", z_norm, z_norm)
    aux_feature_cos_sim = torch.einsum("bci,bcj->bij", aux_feature_norm, aux_feature_norm)
    vf_loss_1 = F.relu(torch.abs(z_cos_sim - aux_feature_cos_sim) - distmat_margin).mean()
    vf_loss_2 = F.relu(1 - cos_margin - F.cosine_similarity(aux_feature, z)).mean()
    return vf_loss_1 + vf_loss_2


@pytest.fixture(scope="module")
def dinov2_patch14(tmp_path_factory):
    """A tiny random DINOv2 with the real patch size, so that 256² images give VA-VAE's 224² input."""
    return save_standin_dinov2(tmp_path_factory.mktemp("dinov2-14"), hidden=32, layers=1, heads=2)


def test_the_recipe_equals_vavae_on_the_same_tensors(dinov2_patch14, tmp_path):
    """configs/vavae_f16c32.yaml's input, projection and loss against VA-VAE's code on the same
    image and latent: a VA-VAE linear_proj.weight loads into the projection, everything bit for bit
    but the loss (float order, 1e-6)."""
    cfg = load_config(ROOT / "configs" / "vavae_f16c32.yaml", [f"alignment.model={dinov2_patch14}"]).alignment
    features = load_foundation_model(cfg.model, cfg.grid)
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1, torch.randn(2, 32, 16, 16, generator=g)  # f16c32 at 256²
    theirs = vavae_forward_dinov2(features.model, x)
    ours = features(x, (16, 16), cfg.normalize, cfg.interpolation, cfg.antialias)
    assert theirs.shape == (2, 32, 16, 16) and torch.equal(ours, theirs)
    linear_proj = nn.Conv2d(32, features.dim, kernel_size=1, bias=False)  # autoencoder.py, reverse_proj: true
    save_file(linear_proj.state_dict(), tmp_path / "linear_proj.safetensors")
    projection = build_projection(32, features.dim, str(tmp_path / "linear_proj.safetensors"), cfg.projection_bias)
    with torch.no_grad():
        assert torch.equal(projection(z), linear_proj(z))
        ours_loss, _ = AlignmentLoss(cfg, features)(x, projection(z))
        theirs_loss = vavae_loss(linear_proj(z), theirs, cfg.distance_margin, cfg.cos_margin)
    assert (cfg.cos_weight, cfg.distance_weight) == (1.0, 1.0)
    torch.testing.assert_close(ours_loss, theirs_loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("option", [{"normalize": True}, {"interpolation": "bicubic"}, {"antialias": True}])
def test_each_departure_from_vavae_changes_the_features(dinov2_patch14, option):
    features = load_foundation_model(str(dinov2_patch14))
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    faithful = AlignmentConfig()
    changed = AlignmentConfig(**option)
    assert not torch.allclose(features(x, (16, 16), faithful.normalize, faithful.interpolation, faithful.antialias),
                              features(x, (16, 16), changed.normalize, changed.interpolation, changed.antialias))


def test_projection_bias_is_an_option_and_a_file_that_disagrees_names_it(tmp_path, tiny_vae, dinov2_folder):
    assert build_projection(4, 8).bias is None and build_projection(4, 8, bias=True).bias is not None
    save_file(build_projection(4, 8, bias=True).state_dict(), tmp_path / "old.safetensors")  # before VA-VAE's layout
    with pytest.raises(ConfigError, match=r"^alignment.projection_init: .*old.safetensors has a bias.*"
                                          r"set alignment.projection_bias: true to load it$"):
        build_projection(4, 8, str(tmp_path / "old.safetensors"))
    loaded = build_projection(4, 8, str(tmp_path / "old.safetensors"), bias=True)
    assert torch.equal(loaded.bias, load_file(tmp_path / "old.safetensors")["bias"])
    save_file({"weight": torch.randn(8, 4, 1, 1)}, tmp_path / "vavae.safetensors")
    with pytest.raises(ConfigError, match="has no bias.*set alignment.projection_bias: false"):
        build_projection(4, 8, str(tmp_path / "vavae.safetensors"), bias=True)
    # the alignment term builds what the option says
    save_file(build_projection(4, 32, bias=True).state_dict(), tmp_path / "old32.safetensors")
    config = Config(alignment=AlignmentConfig(enabled=True, model=str(dinov2_folder), projection_bias=True,
                                              projection_init=str(tmp_path / "old32.safetensors")))
    term = next(t for t in build_terms(config) if t.name == "alignment")
    assert term.build(tiny_vae, torch.device("cpu")).bias is not None


@pytest.mark.slow
def test_a_lightningdit_vavae_checkpoint_exports_its_projection_for_fine_tuning(tmp_path, images):
    """A checkpoint in LightningDiT's VA-VAE layout (latent-diffusion keys, linear_proj.weight of
    reverse_proj, the frozen DINOv2's own weights) exports with its projection in the bundle, and the
    bundle's config loads it into a bias-free projection with alignment on."""
    torch.manual_seed(0)
    vae = new_autoencoder(ModelConfig(preset="tiny"))
    linear_proj = torch.randn(32, vae.config.latent_channels, 1, 1)  # (DINOv2 width, latent channels, 1, 1)
    state = to_ldm_state_dict(vae) | {"linear_proj.weight": linear_proj,
                                      "foundation_model.model.cls_token": torch.zeros(1, 1, 32)}
    torch.save({"state_dict": state}, tmp_path / "vavae.ckpt")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), str(tmp_path / "vavae.ckpt"),
                           "--out", str(tmp_path / "out"), "--norm-num-groups", "8",
                           "--calibrate", "source=sample,split=validation,resolution=32", "--num-images", "2"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = tmp_path / "out" / "finetune"
    assert load_file(bundle / PROJECTION_FILE).keys() == {"weight"}
    assert torch.equal(load_file(bundle / PROJECTION_FILE)["weight"], linear_proj)
    acfg = load_config(bundle / "config.yaml").alignment
    assert acfg.enabled and not acfg.projection_bias and Path(acfg.projection_init) == (bundle / PROJECTION_FILE)
    projection = build_projection(vae.config.latent_channels, 32, acfg.projection_init, acfg.projection_bias)
    assert torch.equal(projection.weight, linear_proj)
