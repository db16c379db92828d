"""FLUX.2-class first stages (diffusers' AutoencoderKLFlux2): the export's diffusers folder and BFL's ae.safetensors
load back identical, the BFL layout is the one Black Forest Labs' code loads with strict=True, the BatchNorm holds
the calibration latents' statistics, bad files are refused by name, and Flux2Pipeline decodes with the export.
Tiny models on the CPU, nothing downloaded."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from bfl_reference import AutoEncoder, AutoEncoderParams
from diffusers import (AutoencoderKLFlux2, AutoencoderDC, FlowMatchEulerDiscreteScheduler, Flux2Pipeline,
                       Flux2Transformer2DModel)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import training_accelerator
from first_stage.checkpoint import EXPORT_WEIGHTS, load_vae
from first_stage.config import ModelConfig
from first_stage.convert import bfl_obstacles, bfl_params, to_bfl_state_dict
from first_stage.export import ExportOptions, ExportSource, export_autoencoder
from first_stage.latent_norm import LatentNormalizer
from first_stage.model import encoder_fingerprint, new_autoencoder

BN_KEYS = ("bn.running_mean", "bn.running_var")


def make_vae(seed: int = 0, **overrides) -> AutoencoderKLFlux2:
    """A random flux2-tiny whose norms, biases and BatchNorm statistics are not at their (symmetric) initial values."""
    torch.manual_seed(seed)
    vae = new_autoencoder(ModelConfig(preset="flux2-tiny", overrides=overrides)).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def make_images(n: int = 6, size: int = 32) -> torch.Tensor:
    """(n,3,size,size) smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear") * 2 - 1


def export(vae, out, images, options=ExportOptions(), **source):
    """Export ``vae`` calibrated on ``images`` in two batches (the export verifies itself on the first, one image:
    its fp16 check is slow on a CPU); ``source`` are further ExportSource fields."""
    return export_autoencoder(vae, out, [images[:1], images[1:]], ExportSource("test", "test", **source), options)


def stored_bn(file) -> dict[str, torch.Tensor]:
    """The BatchNorm statistics a weight file holds, read with safetensors directly."""
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in BN_KEYS}


@torch.no_grad()
def encode_decode(vae, x):
    """(posterior mean, decoded posterior mean) of images ``x``."""
    mean = vae.encode(x).latent_dist.mean
    return mean, vae.decode(mean).sample


@pytest.fixture(scope="module")
def images():
    return make_images()


@pytest.fixture(scope="module")
def vae():
    return make_vae()


@pytest.fixture(scope="module")
def exported(vae, images, tmp_path_factory):
    """(folder, report) of the fp32 export of ``vae`` (read only: tests must not change it)."""
    out = tmp_path_factory.mktemp("flux2") / "vae"
    return out, export(vae, out, images)


# 1. Round trip


def test_export_loads_back_identical(vae, images, exported):
    """The diffusers folder and ae.safetensors both load back with the same encode, decode and BatchNorm."""
    out, report = exported
    mean, decoded = encode_decode(vae, images)
    measured = stored_bn(out / EXPORT_WEIGHTS)
    assert torch.equal(measured["bn.running_mean"], torch.tensor(report["batch_norm"]["running_mean"]))
    for loaded in (AutoencoderKLFlux2.from_pretrained(out).eval(), load_vae(out / "ae.safetensors").vae,
                   load_vae(out).vae, load_vae(out / "ae.safetensors", single_file_config=out).vae):
        assert type(loaded) is AutoencoderKLFlux2
        loaded_mean, loaded_decoded = encode_decode(loaded, images)
        assert torch.equal(loaded_mean, mean) and torch.equal(loaded_decoded, decoded)
        for key in BN_KEYS:
            assert torch.equal(loaded.state_dict()[key], measured[key])
        assert loaded.config.batch_norm_eps == 1e-4 and tuple(loaded.config.patch_size) == (2, 2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_both_files_hold_the_same_float32_batch_norm(vae, images, exported, tmp_path, dtype):
    """Both files hold the same float32 bn statistics, also when the weights are stored in bf16."""
    out = exported[0] if dtype == "fp32" else tmp_path / "vae"
    if dtype != "fp32":  # bf16 convolutions are slow on a CPU: two small images
        export(vae, out, make_images(2, size=16), ExportOptions(dtype=dtype))
    folder, single = stored_bn(out / EXPORT_WEIGHTS), stored_bn(out / "ae.safetensors")
    for key in BN_KEYS:
        assert folder[key].dtype == single[key].dtype == torch.float32
        assert torch.equal(folder[key], single[key])
    weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert load_file(out / "ae.safetensors")["encoder.conv_in.weight"].dtype == weight_dtype
    assert load_file(out / EXPORT_WEIGHTS)["encoder.conv_in.weight"].dtype == weight_dtype


# 2. BFL's layout


def _conv(name: str, cout: int, cin: int, k: int) -> dict[str, tuple]:
    return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def _norm(name: str, c: int) -> dict[str, tuple]:
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def _resnet(name: str, cin: int, cout: int) -> dict[str, tuple]:
    """BFL's ResnetBlock: norm1, conv1, norm2, conv2, and nin_shortcut when the width changes."""
    keys = {**_norm(f"{name}.norm1", cin), **_conv(f"{name}.conv1", cout, cin, 3), **_norm(f"{name}.norm2", cout),
            **_conv(f"{name}.conv2", cout, cout, 3)}
    return keys | (_conv(f"{name}.nin_shortcut", cout, cin, 1) if cin != cout else {})


def _attn(name: str, c: int) -> dict[str, tuple]:
    """BFL's AttnBlock: GroupNorm and q, k, v, proj_out as 1x1 convolutions."""
    return {**_norm(f"{name}.norm", c), **{k: v for p in ("q", "k", "v", "proj_out")
                                          for k, v in _conv(f"{name}.{p}", c, c, 1).items()}}


# flux2-tiny in BFL's layout: AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=8), every key
# of AutoEncoder(params).state_dict() with its shape, read off black-forest-labs/flux2 src/flux2/autoencoder.py.
BFL_TINY_KEYS = {
    # Encoder: conv_in, one block per level, downsample between levels, mid, norm_out, conv_out, quant_conv.
    **_conv("encoder.conv_in", 32, 3, 3),
    **_resnet("encoder.down.0.block.0", 32, 32),
    **_conv("encoder.down.0.downsample.conv", 32, 32, 3),
    **_resnet("encoder.down.1.block.0", 32, 64),
    **_resnet("encoder.mid.block_1", 64, 64),
    **_attn("encoder.mid.attn_1", 64),
    **_resnet("encoder.mid.block_2", 64, 64),
    **_norm("encoder.norm_out", 64),
    **_conv("encoder.conv_out", 16, 64, 3),
    **_conv("encoder.quant_conv", 16, 16, 1),
    # Decoder: post_quant_conv, conv_in, mid, num_res_blocks + 1 blocks per level (up.1 runs first), upsample.
    **_conv("decoder.post_quant_conv", 8, 8, 1),
    **_conv("decoder.conv_in", 64, 8, 3),
    **_resnet("decoder.mid.block_1", 64, 64),
    **_attn("decoder.mid.attn_1", 64),
    **_resnet("decoder.mid.block_2", 64, 64),
    **_resnet("decoder.up.1.block.0", 64, 64),
    **_resnet("decoder.up.1.block.1", 64, 64),
    **_conv("decoder.up.1.upsample.conv", 64, 64, 3),
    **_resnet("decoder.up.0.block.0", 64, 32),
    **_resnet("decoder.up.0.block.1", 32, 32),
    **_norm("decoder.norm_out", 32),
    **_conv("decoder.conv_out", 3, 32, 3),
    # The BatchNorm over 2x2 patches of the 8 latent channels (affine=False: no weight, no bias).
    "bn.running_mean": (32,), "bn.running_var": (32,), "bn.num_batches_tracked": (),
}


def test_single_file_has_exactly_bfl_keys(exported):
    """ae.safetensors holds exactly the keys and shapes of BFL's AutoEncoder for flux2-tiny."""
    with safe_open(str(exported[0] / "ae.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        params = json.loads(f.metadata()["bfl_autoencoder_params"])
    assert sorted(stored) == sorted(BFL_TINY_KEYS)
    assert stored == BFL_TINY_KEYS
    assert params == {
        "in_channels": 3, "ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8}


def test_bfl_reference_code_loads_strict_and_matches(exported, images):
    """BFL's AutoEncoder (tests/bfl_reference.py) loads ae.safetensors strictly and encodes/decodes as we do."""
    out, _ = exported
    ours = AutoencoderKLFlux2.from_pretrained(out).eval()
    bfl = AutoEncoder(AutoEncoderParams(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=8)).eval()
    assert set(bfl.state_dict()) == set(BFL_TINY_KEYS)
    bfl.load_state_dict(load_file(out / "ae.safetensors"), strict=True)
    norm = LatentNormalizer.of(ours)
    with torch.no_grad():
        z = norm.normalize(ours.encode(images).latent_dist.mean)  # (B, 32, 8, 8)
        torch.testing.assert_close(bfl.encode(images), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bfl.decode(z), ours.decode(norm.denormalize(z)).sample, rtol=1e-5, atol=1e-5)


def test_bfl_file_without_metadata_loads_identical(vae, images, exported, tmp_path):
    """A BFL file as Black Forest Labs write it (no metadata) loads with BFL's eps and patches and the same outputs."""
    path = tmp_path / "ae.safetensors"
    save_file(load_file(exported[0] / "ae.safetensors"), path)
    loaded = load_vae(path).vae
    assert type(loaded) is AutoencoderKLFlux2
    assert loaded.config.batch_norm_eps == 1e-4 and tuple(loaded.config.patch_size) == (2, 2)
    assert loaded.config.norm_num_groups == 32 and loaded.config.decoder_block_out_channels is None
    mean, decoded = encode_decode(vae, images)
    loaded_mean, loaded_decoded = encode_decode(loaded, images)
    assert torch.equal(loaded_mean, mean) and torch.equal(loaded_decoded, decoded)
    for key, value in stored_bn(exported[0] / EXPORT_WEIGHTS).items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_flux2_preset_is_bfl_autoencoder():
    """The full flux2 preset is BFL's default AutoEncoderParams: the same keys and shapes (built on the meta device)."""
    with torch.device("meta"):
        vae = new_autoencoder(ModelConfig(preset="flux2"))
        reference = AutoEncoder(AutoEncoderParams())
    assert bfl_obstacles(vae.config) == []
    assert {"resolution": 256, **bfl_params(vae.config)} == asdict(AutoEncoderParams())
    assert ({k: v.shape for k, v in to_bfl_state_dict(vae).items()}
            == {k: v.shape for k, v in reference.state_dict().items()})


# 3. The BatchNorm statistics


def test_batch_norm_is_the_calibration_latents_statistics(vae, images, exported):
    """bn.running_mean/var are numpy's mean and biased variance of the patchified posterior means."""
    out, _ = exported
    with torch.no_grad():
        mu = vae.encode(images).latent_dist.mean.double().numpy()
    # patch channel k = c*4 + 2*pi + pj holds latent channel c at rows pi::2, columns pj::2
    patches = [mu[:, c, pi::2, pj::2] for c in range(mu.shape[1]) for pi in (0, 1) for pj in (0, 1)]
    stored = stored_bn(out / "ae.safetensors")
    np.testing.assert_allclose(stored["bn.running_mean"].numpy(), [p.mean() for p in patches], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stored["bn.running_var"].numpy(), [np.var(p) for p in patches], rtol=1e-5)


def test_pipeline_normalisation_gives_unit_latents(images, exported):
    """Flux2Pipeline's encode normalisation maps the calibration latents to mean 0, variance var/(var+eps) ≈ 1."""
    vae = AutoencoderKLFlux2.from_pretrained(exported[0]).eval()
    with torch.no_grad():
        z = Flux2Pipeline._patchify_latents(vae.encode(images).latent_dist.mode())
    mean, var = vae.bn.running_mean.view(1, -1, 1, 1), vae.bn.running_var.view(1, -1, 1, 1)
    z = ((z - mean) / torch.sqrt(var + vae.config.batch_norm_eps)).double()  # as _encode_vae_image does
    var = vae.bn.running_var.double()
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros_like(var), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.var((0, 2, 3), unbiased=False), var / (var + 1e-4), rtol=1e-4, atol=0)
    torch.testing.assert_close(z.var((0, 2, 3), unbiased=False), torch.ones_like(var), rtol=0, atol=2e-3)


# 4. Bad input


@pytest.mark.parametrize("metadata", ["bfl", "ours"])
@pytest.mark.parametrize("change", ["missing", "misshapen", "negative"])
def test_bfl_file_without_batch_norm_is_refused(exported, tmp_path, change, metadata):
    """A BFL file whose bn.running_var is missing, misshapen or negative: a ValueError naming the file and the key."""
    state = load_file(exported[0] / "ae.safetensors")
    with safe_open(str(exported[0] / "ae.safetensors"), "pt") as f:
        kept = f.metadata() if metadata == "ours" else None  # BFL's own files carry no autoencoder_config
    if change == "missing":
        del state["bn.running_var"]
    elif change == "misshapen":
        state["bn.running_var"] = torch.ones(5)
    else:
        state["bn.running_var"] = -state["bn.running_var"]
    path = tmp_path / "ae.safetensors"
    save_file(state, path, kept)
    with pytest.raises(ValueError, match="bn.running_var") as err:
        load_vae(path)
    assert str(path.resolve()) in str(err.value)


@pytest.mark.parametrize("dropped", [BN_KEYS, ("bn.running_var",)])
def test_diffusers_folder_without_batch_norm_is_refused(vae, tmp_path, dropped):
    """An AutoencoderKLFlux2 folder whose weights lack bn statistics: a ValueError naming the file and the key."""
    vae.save_pretrained(tmp_path / "vae")
    file = tmp_path / "vae" / EXPORT_WEIGHTS
    save_file({k: v for k, v in load_file(file).items() if k not in dropped}, file, {"format": "pt"})
    with pytest.raises(ValueError, match=dropped[0]) as err:
        load_vae(tmp_path / "vae")
    assert str(file.resolve()) in str(err.value)


def test_diffusers_folder_of_another_class_is_refused(tmp_path):
    """A diffusers folder of another class: a ValueError naming its config.json and the class."""
    AutoencoderDC(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,), encoder_layers_per_block=(1,),
                  decoder_layers_per_block=(1,), encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                  latent_channels=4, encoder_qkv_multiscales=((),), decoder_qkv_multiscales=((),),
                  decoder_norm_types="rms_norm", decoder_act_fns="silu").save_pretrained(tmp_path / "dc")
    with pytest.raises(ValueError, match="AutoencoderDC") as err:
        load_vae(tmp_path / "dc")
    assert str((tmp_path / "dc" / "config.json").resolve()) in str(err.value)


def test_odd_latent_side_is_refused(vae, tmp_path):
    """A latent whose sides are not multiples of the patch size: normalise and export say so."""
    with pytest.raises(ValueError, match="multiples of 2"):
        LatentNormalizer.of(vae).normalize(torch.zeros(1, 8, 5, 6))
    with pytest.raises(ValueError, match="multiples of 2"):
        export(vae, tmp_path / "vae", make_images(size=30))  # f2: 15x15 latents
    assert not (tmp_path / "vae").exists()


# 5. Where the BatchNorm comes from


def test_from_scratch_batch_norm_is_measured(vae, exported):
    """A VAE not started from released weights gets its BatchNorm measured at export."""
    out, report = exported
    assert not report["batch_norm"]["kept"]
    assert report["batch_norm"]["origin"].startswith("measured at export")
    assert report["batch_norm"]["origin"] in (out / "README.md").read_text()
    assert not torch.equal(stored_bn(out / EXPORT_WEIGHTS)["bn.running_var"], vae.bn.running_var)


def test_released_batch_norm_is_kept_bit_for_bit(vae, images, tmp_path):
    """With the released encoder's fingerprint, both files hold the VAE's own bn buffers, not re-measured."""
    origin = {"source": "released", "fingerprint": encoder_fingerprint(vae)}
    report = export(vae, tmp_path / "vae", images, encoder_origin=origin)
    assert report["batch_norm"]["kept"]
    assert report["batch_norm"]["origin"].startswith("kept from released")
    for file in (tmp_path / "vae" / EXPORT_WEIGHTS, tmp_path / "vae" / "ae.safetensors"):
        stored = stored_bn(file)
        assert torch.equal(stored["bn.running_mean"], vae.bn.running_mean)
        assert torch.equal(stored["bn.running_var"], vae.bn.running_var)


def test_moved_encoder_batch_norm_is_re_measured(vae, images, exported, tmp_path):
    """With another encoder's fingerprint the BatchNorm is re-measured, and report and card say the latents differ."""
    origin = {"source": "released", "fingerprint": encoder_fingerprint(make_vae(seed=1))}
    report = export(vae, tmp_path / "vae", images, encoder_origin=origin)
    sentence = report["batch_norm"]["origin"]
    assert not report["batch_norm"]["kept"]
    assert "re-measured" in sentence and "NOT" in sentence and "released" in sentence
    assert sentence in (tmp_path / "vae" / "README.md").read_text()
    measured = stored_bn(exported[0] / EXPORT_WEIGHTS)  # the same encoder and images, measured from scratch
    for key, value in stored_bn(tmp_path / "vae" / "ae.safetensors").items():
        assert torch.equal(value, measured[key])


# 6. What BFL's layout cannot hold


def test_narrower_decoder_skips_the_bfl_file(images, tmp_path):
    """A decoder narrower than the encoder: a diffusers folder that loads back, no ae.safetensors, the reason said."""
    vae = make_vae(decoder_block_out_channels=(32, 32))
    with pytest.warns(UserWarning, match="no single file: BFL"):
        report = export(vae, tmp_path / "vae", images)
    assert not (tmp_path / "vae" / "ae.safetensors").exists()
    assert "single_file" not in report
    assert any("the encoder's widths in the decoder" in reason for reason in report["single_file_skipped"])
    mean, decoded = encode_decode(vae, images)
    for loaded in (AutoencoderKLFlux2.from_pretrained(tmp_path / "vae").eval(), load_vae(tmp_path / "vae").vae):
        assert list(loaded.config.decoder_block_out_channels) == [32, 32]
        loaded_mean, loaded_decoded = encode_decode(loaded, images)
        assert torch.equal(loaded_mean, mean) and torch.equal(loaded_decoded, decoded)


# 7. Flux2Pipeline


def tiny_pipeline(vae: AutoencoderKLFlux2) -> Flux2Pipeline:
    """A Flux2Pipeline around ``vae`` with a random two-block transformer and no text encoder (prompt_embeds given)."""
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        in_channels=4 * vae.config.latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
    return Flux2Pipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, transformer.eval())


def test_flux2_pipeline_decodes_with_the_export(exported):
    """Flux2Pipeline denormalises and decodes as vae.decode(LatentNormalizer.denormalize(latents)) does."""
    vae = AutoencoderKLFlux2.from_pretrained(exported[0]).eval()
    pipe = tiny_pipeline(vae)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))  # (B, 4C, h/2, w/2) patches
    call = {"prompt_embeds": torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1)), "height": 16,
            "width": 16, "num_inference_steps": 2, "latents": noise}
    with torch.no_grad():
        image = pipe(**call, output_type="pt").images  # (1, 3, 16, 16) in [0, 1]
        packed = pipe(**call, output_type="latent").images  # (B, h/2 · w/2, 4C)
        patches = Flux2Pipeline._unpack_latents_with_ids(packed, Flux2Pipeline._prepare_latent_ids(noise))
        ours = vae.decode(LatentNormalizer.of(vae).denormalize(patches)).sample
    assert image.shape == (1, 3, 16, 16)
    assert not torch.equal(patches, noise)  # the transformer ran
    torch.testing.assert_close(image, (ours / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_batch_norm_origin_of_each_init_from(tmp_path, vae):
    """A released file or folder is its own origin; a run hands on the origin it recorded, or none when it was
    trained from scratch (its BatchNorm never measured), so a run started from it measures instead of keeping."""
    from first_stage.checkpoint import ENCODER_ORIGIN, TRAINING_STATE, encoder_origin
    assert encoder_origin(None, vae) is None
    released = {"source": "ae.safetensors", "fingerprint": encoder_fingerprint(vae)}
    assert encoder_origin("ae.safetensors", vae) == released
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINING_STATE).write_text("{}")
    assert encoder_origin(tmp_path / "run", vae) is None and encoder_origin(checkpoint, vae) is None
    recorded = {"source": "released/ae.safetensors", "fingerprint": "0" * 64}
    (checkpoint / ENCODER_ORIGIN).write_text(json.dumps(recorded))
    assert encoder_origin(tmp_path / "run", vae) == recorded  # the export then compares it with its own encoder


def test_what_the_export_would_refuse_is_refused_before_training(vae):
    """check_exportable (build_parts, scripts/export.py): a latent the 2×2 patches do not divide, named by its
    key, and a normalisation the class does not carry."""
    from first_stage.config import ConfigError
    from first_stage.export import check_exportable
    assert check_exportable("global", vae, 32, "data.resolution") == "batch_norm"
    with pytest.raises(ConfigError, match=r"data.resolution 34: .* 17×17 latent .* multiple of 4"):
        check_exportable("global", vae, 34, "data.resolution")
    with pytest.raises(ValueError, match="per_channel is for AutoencoderKL"):
        check_exportable("per_channel", vae, 32, "data.resolution")
    with pytest.raises(ValueError, match="only an AutoencoderKLFlux2"):
        check_exportable("batch_norm", new_autoencoder(ModelConfig()), 32, "data.resolution")


def test_casts_keep_the_batch_norm_float32_and_a_bf16_evaluation_reads_the_files_values(vae, exported):
    """model.cast (exports, evaluation in bf16) leaves the BatchNorm statistics float32: the normaliser read from a
    bf16 model is the one in the files."""
    from first_stage.evaluation import evaluation_autoencoder
    out, _ = exported
    bf16 = evaluation_autoencoder(out, "cpu", bf16=True)
    assert bf16.encoder.conv_in.weight.dtype == torch.bfloat16 and bf16.bn.running_var.dtype == torch.float32
    assert LatentNormalizer.of(bf16) == LatentNormalizer.of(load_vae(out).vae)


def test_a_flux2_preset_refuses_an_init_from_of_another_class(tmp_path):
    """configs/flux2_finetune.yaml pointed at an SD VAE by mistake: refused, naming both."""
    from first_stage.checkpoint import build_autoencoder
    from first_stage.config import ConfigError
    new_autoencoder(ModelConfig()).save_pretrained(tmp_path / "sd")
    with pytest.raises(ConfigError, match="model.preset flux2 is an AutoencoderKLFlux2, but .* holds a AutoencoderKL"):
        build_autoencoder(ModelConfig(preset="flux2", init_from=str(tmp_path / "sd")))


def test_an_explicit_single_file_path_is_kept(vae, images, tmp_path):
    """Only the default name becomes ae.safetensors; a path the user gives is written as given (BFL's layout)."""
    target = tmp_path / "elsewhere" / "vae_ldm.safetensors"
    report = export(vae, tmp_path / "out", images, ExportOptions(single_file=target))
    assert report["single_file"] == str(target) and target.is_file()
    assert not (tmp_path / "out" / "ae.safetensors").exists()
    assert "encoder.quant_conv.weight" in load_file(target)


def test_the_from_scratch_recipe_trains_a_step_with_alignment(dinov2_folder):
    """configs/flux2_f8c32_align.yaml at the flux2-tiny size: alignment (a random DINOv2), KL and the GAN train
    one step of the FLUX.2 class through build_parts and train_step."""
    from pathlib import Path


    from first_stage.config import load_config
    from first_stage.trainer import TrainingState, build_parts, train_step
    recipe = Path(__file__).parents[1] / "configs" / "flux2_f8c32_align.yaml"
    config = load_config(recipe, ["model.preset=flux2-tiny", f"alignment.model={dinov2_folder}", "data.source=sample",
                                  "data.resolution=32", "train.batch_size=2", "train.mixed_precision=no",
                                  "loss.perceptual_weight=0", "discriminator.start=0", "discriminator.channels=16"])
    assert config.alignment.enabled and config.discriminator.enabled
    with training_accelerator(config) as accelerator:
        parts = build_parts(config, accelerator)
        assert type(parts.raw_model.vae).__name__ == "AutoencoderKLFlux2" and parts.raw_model.projection is not None
        bn = {k: v.clone() for k, v in parts.raw_model.vae.bn.state_dict().items()}
        batches = iter([{"pixel_values": make_images(2), "skipped": 0, "upsized": 0}])
        logs = train_step(accelerator, parts, config, TrainingState(), batches)
        assert logs["train/loss/align_cos"] > 0 and "train/loss/kl" in logs
        assert all(torch.equal(v, parts.raw_model.vae.bn.state_dict()[k]) for k, v in bn.items())  # never trained
