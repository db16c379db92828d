import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderTiny

from first_stage.checkpoint import build_autoencoder
from first_stage.config import ConfigError, ModelConfig
from first_stage.model import (PRESETS, AutoencoderWrapper, autoencoder_kwargs, count_parameters, preset_class,
                               set_trainable)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build(preset):
    vae = build_autoencoder(ModelConfig(preset=preset))
    expected = AutoencoderKLFlux2 if preset.startswith("flux2") else AutoencoderTiny if preset.startswith(
        "taesd") else AutoencoderKL
    assert type(vae) is expected and type(vae).__name__ == preset_class(preset)
    if preset == "taesd":  # diffusers' AutoencoderTiny defaults: TAESD's architecture
        ignore = "_use_default_values"
        assert {k: v for k, v in vae.config.items() if k != ignore} == {
            k: v for k, v in AutoencoderTiny().config.items() if k != ignore}
        assert count_parameters(vae) == count_parameters(AutoencoderTiny())
    if preset == "flux2":  # diffusers' AutoencoderKLFlux2 defaults: FLUX.2's VAE
        ignore = "_use_default_values"
        assert {k: v for k, v in vae.config.items() if k != ignore} == {
            k: v for k, v in AutoencoderKLFlux2().config.items() if k != ignore}
        assert count_parameters(vae) == 84_046_115
    if preset == "flux2-tiny":  # BFL's code hard-codes 32 GroupNorm groups
        assert vae.config.norm_num_groups == 32 and count_parameters(vae) < 1_000_000
    if preset == "tiny":
        assert count_parameters(vae) < 1_000_000
    if preset == "sd-f8c4":
        assert count_parameters(vae) == 83_653_863  # the SD 1.x kl-f8 autoencoder
    if preset == "f8c16":
        assert vae.config.latent_channels == 16


def test_encode_decode_shapes(tiny_vae, images):
    posterior = tiny_vae.encode(images).latent_dist
    assert posterior.mean.shape == (2, 4, 16, 16)  # tiny is f2
    assert tiny_vae.decode(posterior.mode()).sample.shape == images.shape


def test_sd_layout_downsamples_by_8():
    narrow = {"block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8}
    vae = build_autoencoder(ModelConfig(preset="sd-f8c4", overrides=narrow))
    assert vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, 4, 4)


def test_overrides_are_checked():
    vae = build_autoencoder(ModelConfig(preset="tiny", overrides={"latent_channels": 8, "use_quant_conv": False}))
    assert vae.config.latent_channels == 8 and vae.quant_conv is None
    with pytest.raises(ConfigError, match="latent_chanels"):
        build_autoencoder(ModelConfig(preset="tiny", overrides={"latent_chanels": 8}))
    with pytest.raises(ConfigError, match="unknown preset"):
        build_autoencoder(ModelConfig(preset="huge"))


def test_init_from_diffusers_folder(tiny_vae, tmp_path, images):
    tiny_vae.save_pretrained(tmp_path / "vae")
    loaded = build_autoencoder(ModelConfig(init_from=str(tmp_path / "vae")))
    with torch.no_grad():
        assert torch.equal(loaded.encode(images).latent_dist.mean, tiny_vae.encode(images).latent_dist.mean)
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_autoencoder(ModelConfig(init_from=str(tmp_path / "missing")))


def test_decoder_only_leaves_encoder_unchanged(tiny_vae, images):
    set_trainable(tiny_vae, "decoder")
    model = AutoencoderWrapper(tiny_vae)
    encoder_before = {k: v.clone() for k, v in tiny_vae.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in tiny_vae.decoder.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    reconstruction = model(images).reconstruction
    (reconstruction - images).abs().mean().backward()
    optimizer.step()
    for k, v in tiny_vae.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    assert any(not torch.equal(v, decoder_before[k]) for k, v in tiny_vae.decoder.state_dict().items())


def test_wrapper_forward_uses_every_trainable_parameter(tiny_vae, images):
    model = AutoencoderWrapper(tiny_vae, learn_logvar=True)
    reconstruction, posterior, logvar = model(images)[:3]
    loss = (reconstruction - images).abs().mean() / logvar.exp() + logvar + posterior.kl().mean()
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_f16c32_preset_is_vavae_layout():
    kwargs = autoencoder_kwargs(ModelConfig(preset="f16c32"))
    assert kwargs["block_out_channels"] == (128, 128, 256, 256, 512) and kwargs["latent_channels"] == 32
    assert kwargs["down_block_types"] == ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",)
    assert kwargs["up_block_types"] == ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4
    narrow = AutoencoderKL(**{**kwargs, "block_out_channels": (8, 8, 16, 16, 32), "norm_num_groups": 8})
    assert narrow.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 32, 4, 4)  # f16
