"""Export: the diffusers folder and the latent-diffusion single file load back identical, the measured
scale is right and lands where pipelines read it, bad exports are refused. Everything offline."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cpu_env, launch_command
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from first_stage.checkpoint import (AUTOENCODER_CONFIG, AUTOENCODER_WEIGHTS, CONFIG_FILE, EXPORT_REPORT, EXPORT_WEIGHTS,
                                    SINGLE_FILE_NAME, TRAINING_STATE, load_vae)
from first_stage.config import Config, DiscriminatorConfig, ModelConfig, config_hash, load_config, to_yaml
from first_stage.convert import infer_autoencoder_config, to_ldm_state_dict
from first_stage.discriminator import build_discriminator, discriminator_state, load_discriminator
from first_stage.export import (SINGLE_FILE_OWN_LOADER, ExportError, ExportOptions, ExportSource, attention_in_levels,
                                export_autoencoder, fp16_overflow_check, output_difference)
from first_stage.latent_norm import LatentNormalizer
from first_stage.latent_stats import measure_latent_stats
from first_stage.model import autoencoder_kwargs


def levels(*channels, attention=()):
    return {
        "block_out_channels": channels,
        "down_block_types": tuple("AttnDownEncoderBlock2D" if i in attention else "DownEncoderBlock2D"
                                  for i in range(len(channels))),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if len(channels) - 1 - i in attention else "UpDecoderBlock2D"
                                for i in range(len(channels))),
    }


ARCHITECTURES = {
    "tiny-2-level": {**levels(32, 64), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8},
    "sd-4-level-small": {**levels(16, 32, 32, 32), "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 8},
    # VA-VAE's f16c32 layout (the f16c32 preset), narrow: five levels, attention at the lowest resolution.
    "f16-attention-at-lowest": {**levels(16, 16, 32, 32, 32, attention=(4,)), "layers_per_block": 1,
                                "latent_channels": 8, "norm_num_groups": 8},
    "c16-no-quant-conv": {**levels(16, 32, 32), "layers_per_block": 1, "latent_channels": 16, "norm_num_groups": 8,
                          "use_quant_conv": False, "use_post_quant_conv": False},
}


def make_vae(config: dict, seed: int = 0) -> AutoencoderKL:
    """A random AutoencoderKL whose norms and biases are not at their (symmetric) initial values."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def export(vae, out, images, options=ExportOptions(), **source):
    """Export ``vae`` calibrated on ``images`` (in two batches); ``source`` are ExportSource fields."""
    source = {"source": "test", "calibration": "test images", **source}
    return export_autoencoder(vae, out, [images[:1], images[1:]], ExportSource(**source), options)


def test_export_loads_identical_with_measured_scale(tiny_vae, images, tmp_path):
    report = export(tiny_vae, tmp_path / "vae", images)
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert output_difference(tiny_vae, loaded, images) == 0
    assert loaded.config.scaling_factor == report["latent_stats"]["scaling_factor"] != 0.18215
    assert loaded.config.shift_factor == report["latent_stats"]["shift_factor"]
    # An independent one-shot computation over the same images' posteriors.
    with torch.no_grad():
        posterior = tiny_vae.encode(images).latent_dist
    mu, var = posterior.mean.double(), posterior.var.double()
    std = ((mu.pow(2) + var).mean() - mu.mean() ** 2).sqrt()
    # (rel 1e-6: a batch of 2 and two batches of 1 go through slightly different float32 kernels)
    assert loaded.config.scaling_factor == pytest.approx(1 / std.item(), rel=1e-6)
    assert loaded.config.shift_factor == pytest.approx(mu.mean().item(), rel=1e-6)
    channel_std = ((mu.pow(2) + var).mean((0, 2, 3)) - mu.mean((0, 2, 3)) ** 2).sqrt()
    assert report["latent_stats"]["channel_std"] == pytest.approx(channel_std.tolist(), rel=1e-6)
    # ... and it is the std of actual posterior samples (Monte Carlo, 200 draws per image).
    torch.manual_seed(0)
    samples = torch.stack([posterior.sample() for _ in range(200)]).double()
    assert 1 / samples.std(unbiased=False).item() == pytest.approx(loaded.config.scaling_factor, rel=1e-3)
    files = {p.name for p in (tmp_path / "vae").iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "vae_ldm.safetensors", "README.md",
            "export_report.json"} <= files
    card = (tmp_path / "vae" / "README.md").read_text()
    assert f"{report['latent_stats']['scaling_factor']:.5f}" in card and "from_pretrained" in card


def test_scale_does_not_depend_on_batching_or_processes(tiny_vae, images):
    one = measure_latent_stats(tiny_vae, [images])
    split = measure_latent_stats(tiny_vae, [images[:1], torch.empty(0, 3, 32, 32), images[1:]])
    # Two "processes" with one image each, their sums combined as accelerator.reduce(t, "sum") does.
    other = []
    first = SimpleNamespace(num_processes=2, device="cpu", reduce=lambda t, op: other.append(t.clone()) or t)
    measure_latent_stats(tiny_vae, [images[1:]], first)
    second = SimpleNamespace(num_processes=2, device="cpu", reduce=lambda t, op: t + other[0])
    combined = measure_latent_stats(tiny_vae, [images[:1]], second)
    assert one["num_images"] == split["num_images"] == combined["num_images"] == 2
    for key in ("scaling_factor", "shift_factor", "std_of_means"):
        assert split[key] == pytest.approx(one[key], rel=1e-6)  # float32 kernels differ with the batch size
        assert combined[key] == pytest.approx(split[key], rel=1e-12)


def test_safetensors_metadata_and_per_channel_fields(tiny_vae, images, tmp_path):
    report = export(tiny_vae, tmp_path / "vae", images, ExportOptions(latent_norm="per_channel"), step=7,
                    config=Config())
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["latents_mean"] == pytest.approx(report["latent_stats"]["channel_mean"])
    assert config["latents_std"] == pytest.approx(report["latent_stats"]["channel_std"])
    assert config["scaling_factor"] == 1.0 and config["shift_factor"] is None
    assert LatentNormalizer.from_vae_config(config).latents_std == tuple(report["latent_stats"]["channel_std"])
    card = (tmp_path / "vae" / "README.md").read_text()
    assert "How pipelines read it: per channel: z' = (z − latents_mean_c) · 1 / latents_std_c" in card
    assert report["normalisation"] == LatentNormalizer.from_vae_config(config).describe()
    for name in (EXPORT_WEIGHTS, SINGLE_FILE_NAME):
        with safe_open(str(tmp_path / "vae" / name), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt" and meta["step"] == "7" and meta["config_hash"] == config_hash(Config())
        assert meta["producer"].startswith("first-stage ")
        assert json.loads(meta["autoencoder_config"])["latents_std"] == config["latents_std"]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_single_file_round_trip(name, tmp_path, images):
    assert_round_trip(make_vae(ARCHITECTURES[name]), tmp_path, images)


@pytest.mark.parametrize("recipe", ["vavae_f16c32.yaml", "eqvae_finetune.yaml"])
def test_recipe_architectures_export_and_load(recipe, tmp_path, images):
    """The recipes' architectures at 1/16 of their widths: VA-VAE's f16c32 preset, and the SD kl-f8
    layout that the EQ-VAE recipe fine-tunes (its init_from)."""
    model = load_config(Path(__file__).parents[1] / "configs" / recipe).model
    kwargs = autoencoder_kwargs(model if model.init_from is None else ModelConfig(preset="sd-f8c4"))
    narrow = {**kwargs, "block_out_channels": tuple(c // 16 for c in kwargs["block_out_channels"]),
              "norm_num_groups": 8}
    assert attention_in_levels(AutoencoderKL(**narrow).config) == (recipe == "vavae_f16c32.yaml")
    assert_round_trip(make_vae(narrow), tmp_path, images)
    if recipe == "vavae_f16c32.yaml":
        # latent-diffusion's layout for attn_resolutions at the lowest level, written out: its Encoder's
        # down[4] and its Decoder's up[4] (the lowest resolution; up[4] upsamples, up[0] does not).
        keys = set(load_file(tmp_path / "vae" / "vae_ldm.safetensors"))
        assert {"encoder.down.4.attn.1.q.weight", "encoder.down.4.attn.1.proj_out.weight",
                "decoder.up.4.attn.2.norm.weight", "decoder.up.4.upsample.conv.weight"} <= keys
        assert not any(k.startswith(("encoder.down.3.attn", "decoder.up.3.attn", "decoder.up.0.upsample",
                                     "encoder.down.4.downsample")) for k in keys)


def assert_round_trip(vae, tmp_path, images):
    """The export loads back identical through diffusers' folder and through its single file
    (diffusers' single-file loader, or this package's where diffusers cannot read it), and our
    import of the bare single file infers the architecture."""
    report = export(vae, tmp_path / "vae", images)
    assert output_difference(vae, AutoencoderKL.from_pretrained(tmp_path / "vae"), images) == 0
    single = tmp_path / "vae" / "vae_ldm.safetensors"
    assert not any(k.startswith(("encoder.down_blocks", "decoder.up_blocks")) for k in load_file(single))
    if attention_in_levels(vae.config):
        # diffusers' from_single_file drops attention inside levels: the report and model card say
        # which loader reads the file, and the export was verified with it.
        assert report["single_file_loader"] == SINGLE_FILE_OWN_LOADER and report["verification"]["single_file"] == 0
        assert "load_vae(" in (tmp_path / "vae" / "README.md").read_text()
        assert any(".attn.0.q.weight" in k for k in load_file(single))
    else:
        # diffusers' own single-file loader, given the folder's config
        from_single = AutoencoderKL.from_single_file(str(single), config=str(tmp_path / "vae"))
        assert output_difference(vae, from_single, images) == 0
    # our import: with the config in the metadata, and from bare weights (architecture inferred)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(single), bare)
    for path, overrides in ((single, None), (bare, {"norm_num_groups": vae.config.norm_num_groups})):
        imported = load_vae(path, overrides=overrides).vae.state_dict()
        assert imported.keys() == vae.state_dict().keys()
        assert all(torch.equal(imported[k], v) for k, v in vae.state_dict().items())


def test_import_covers_attention_levels_and_prefixes(tmp_path, images):
    """Levels with attention (AttnDown/UpBlocks) map to latent-diffusion's down.i.attn.j; whole-model
    checkpoints keep the VAE under first_stage_model. (diffusers' from_single_file cannot read
    attention levels; our import can)."""
    vae = make_vae({**levels(16, 32, attention=(1,)), "layers_per_block": 1, "latent_channels": 4,
                    "norm_num_groups": 8, "mid_block_add_attention": False})
    ldm = to_ldm_state_dict(vae)
    assert "encoder.down.1.attn.0.q.weight" in ldm and ldm["encoder.down.1.attn.0.q.weight"].ndim == 4
    assert infer_autoencoder_config(ldm, 8)["up_block_types"] == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in ldm.items()} | {"model.x": torch.zeros(1)}},
               path)
    imported = load_vae(path, norm_num_groups=8).vae
    assert all(torch.equal(imported.state_dict()[k], v) for k, v in vae.state_dict().items())
    assert output_difference(vae, imported, images) < 1e-5


@pytest.mark.slow
def test_ldm_checkpoint_with_discriminator_imports_for_fine_tuning(tmp_path, images):
    """A latent-diffusion autoencoder checkpoint (kl-f8's model.ckpt layout: loss.discriminator.*,
    loss.logvar) exports with its discriminator, and training can load that back."""
    vae = make_vae(ARCHITECTURES["tiny-2-level"])
    disc = build_discriminator(DiscriminatorConfig(channels=16, n_layers=2))
    state = to_ldm_state_dict(vae) | {f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()}
    state["loss.logvar"] = torch.tensor(0.25)
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    script = Path(__file__).resolve().parents[1] / "scripts" / "export.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "model.ckpt"), "--out", str(tmp_path / "out"),
                           "--norm-num-groups", "8", "--calibrate", "source=sample,split=validation,resolution=32",
                           "--num-images", "2"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scaling_factor" in proc.stdout
    out = tmp_path / "out"
    assert output_difference(vae, AutoencoderKL.from_pretrained(out), images) == 0
    fresh = build_discriminator(DiscriminatorConfig(channels=16, n_layers=2))
    load_discriminator(fresh, out / "finetune" / "discriminator.safetensors")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in disc.state_dict().items())
    assert load_file(out / "finetune" / "loss.safetensors")["logvar"].item() == 0.25
    # straight from the latent-diffusion checkpoint too; a mismatch names the settings to use
    assert discriminator_state(tmp_path / "model.ckpt").keys() == disc.state_dict().keys()
    with pytest.raises(ValueError, match="'n_layers': 2, 'channels': 16"):
        load_discriminator(build_discriminator(DiscriminatorConfig()), tmp_path / "model.ckpt")


def test_nonfinite_weights_are_refused_by_name(tiny_vae, images, tmp_path):
    with torch.no_grad():
        tiny_vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ExportError, match="decoder.conv_out.weight"):
        export(tiny_vae, tmp_path / "vae", images)
    assert not (tmp_path / "vae").exists() and not list(tmp_path.iterdir())


def test_existing_export_is_not_overwritten(tiny_vae, images, tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(tiny_vae, tmp_path / "vae", images)
    # --overwrite replaces an earlier export, and nothing else: not any folder, not a training run
    with pytest.raises(FileExistsError, match="not an export of first-stage"):
        export(tiny_vae, tmp_path / "vae", images, ExportOptions(overwrite=True))
    assert (tmp_path / "vae" / "keep.txt").read_text() == "mine"
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not an export of first-stage"):
        export(tiny_vae, run, images, ExportOptions(overwrite=True))
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    first = export(tiny_vae, tmp_path / "exported", images)
    again = export(tiny_vae, tmp_path / "exported", images, ExportOptions(overwrite=True, latent_norm="per_channel"))
    assert first["latent_norm"] == "global" and again["latent_norm"] == "per_channel"
    # a single file outside the folder replaces only a single file this package wrote
    (tmp_path / "mine.safetensors").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not a single file written by first-stage"):
        export(tiny_vae, tmp_path / "other", images,
               ExportOptions(single_file=tmp_path / "mine.safetensors", overwrite=True))
    assert (tmp_path / "mine.safetensors").read_bytes() == b"not ours"


def test_fp16_overflow_is_detected_and_sets_force_upcast(tiny_vae, images, tmp_path):
    report = export(tiny_vae, tmp_path / "ok", images, ExportOptions(dtype="fp16"))
    assert report["fp16"]["overflow_modules"] == [] and report["fp16"]["force_upcast"] is False
    assert AutoencoderKL.from_pretrained(tmp_path / "ok").config.force_upcast is False
    with torch.no_grad():  # activations past fp16's 65504 in the decoder, still finite in fp32
        tiny_vae.decoder.conv_in.weight.mul_(1e5)
    found = fp16_overflow_check(tiny_vae, images)
    assert found["overflow"][0] == "decoder.conv_in"
    report = export(tiny_vae, tmp_path / "upcast", images, ExportOptions(dtype="fp16"))
    assert report["fp16"]["force_upcast"] is True and "overflow" in report["fp16"]["verdict"]
    loaded = AutoencoderKL.from_pretrained(tmp_path / "upcast")
    assert loaded.config.force_upcast is True
    stored = load_file(tmp_path / "upcast" / EXPORT_WEIGHTS)
    assert {v.dtype for v in stored.values()} == {torch.float16}
    assert "decoder.conv_in" in (tmp_path / "upcast" / "README.md").read_text()


def test_bundle_config_points_at_the_export(tiny_vae, images, tmp_path):
    disc = build_discriminator(DiscriminatorConfig(channels=16))
    report = export(tiny_vae, tmp_path / "vae", images, config=Config(discriminator=DiscriminatorConfig(channels=16)),
                    discriminator=disc, logvar=-0.5)
    assert report["bundle"] == ["config.yaml", "discriminator.safetensors", "loss.safetensors"]
    config = load_config(tmp_path / "vae" / "finetune" / "config.yaml")
    assert config.model.init_from == str((tmp_path / "vae").resolve())
    assert config.loss.logvar_init == -0.5
    load_discriminator(build_discriminator(config.discriminator), config.discriminator.init_from)


@pytest.mark.slow
def test_cli_calibration_split_over_two_processes_matches_one(tiny_vae, images, tmp_path):
    export(tiny_vae, tmp_path / "source", images)
    script = Path(__file__).resolve().parents[1] / "scripts" / "export.py"
    common = [str(script), str(tmp_path / "source"), "--calibrate", "source=sample,split=all,resolution=32",
              "--num-images", "9", "--batch-size", "2"]
    stats = {}
    for name, cmd in (("one", [sys.executable, *common]), ("two", [*launch_command(2), *common])):
        proc = subprocess.run([*cmd, "--out", str(tmp_path / name)], capture_output=True, text=True, env=cpu_env(),
                              timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stats[name] = json.loads((tmp_path / name / "export_report.json").read_text())["latent_stats"]
    assert stats["one"]["num_images"] == stats["two"]["num_images"] == 9
    for key in ("scaling_factor", "shift_factor"):
        assert stats["two"][key] == pytest.approx(stats["one"][key], rel=1e-6)


def test_sample_size_is_the_training_resolution_so_tiles_are_too(images, tmp_path):
    """diffusers sizes enable_tiling()'s tiles from config.json's sample_size (its default, 32, cuts
    an f8 latent into 4-latent tiles). An export carries the training resolution: at that size a
    tiled decode is the untiled one, and at twice that size it is closer to it than with 32-pixel
    tiles. (A random model has no smooth decoder, so the seams are large either way; with trained
    weights they are small.)"""
    torch.manual_seed(0)
    vae = AutoencoderKL(**autoencoder_kwargs(ModelConfig(preset="tiny"))).eval()
    x = torch.nn.functional.interpolate(images, size=128, mode="bilinear")
    errors = {}
    for size in (32, 64):
        export(vae, tmp_path / f"s{size}", images, ExportOptions(sample_size=size))
        loaded = AutoencoderKL.from_pretrained(tmp_path / f"s{size}")
        assert loaded.config.sample_size == size and loaded.tile_sample_min_size == size
        with torch.no_grad():
            for side in (64, 128):
                z = loaded.encode(x[..., :side, :side]).latent_dist.mode()
                untiled = loaded.decode(z).sample
                loaded.enable_tiling()
                errors[size, side] = (loaded.decode(z).sample - untiled).abs().mean().item()
                loaded.disable_tiling()
    assert errors[64, 64] == 0 and errors[32, 64] > 0  # the training resolution is one tile
    assert errors[64, 128] < errors[32, 128]


def fake_checkpoint(vae, path: Path, config: Config, step: int = 3) -> Path:
    """A checkpoint folder as training writes it, without training: what scripts/export.py reads."""
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_text(to_yaml(config))
    (path / AUTOENCODER_CONFIG).write_text(vae.to_json_string())
    save_file({**{f"vae.{k}": v.contiguous() for k, v in vae.state_dict().items()}, "logvar": torch.tensor(0.0)},
              path / AUTOENCODER_WEIGHTS)
    (path / TRAINING_STATE).write_text(json.dumps({"step": step}))
    return path


@pytest.mark.slow
def test_cli_defaults_come_from_the_run(tiny_vae, tmp_path):
    """Without --weights, --dtype or --single-file, scripts/export.py follows the run's config: a run
    without EMA exports its raw weights, in the run's export dtype, without a single file when the run
    said so; a missing source fails with the script's own message."""
    config = load_config(None, ["train.ema=false", "export.dtype=bf16", "export.single_file=false",
                                "data.resolution=32", "data.split=all"])
    source = fake_checkpoint(tiny_vae, tmp_path / "checkpoint-3", config)
    script = str(Path(__file__).resolve().parents[1] / "scripts" / "export.py")
    proc = subprocess.run([sys.executable, script, str(source), "--out", str(tmp_path / "out"), "--num-images", "2"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / EXPORT_REPORT).read_text())
    assert report["weights"] == "raw" and report["dtype"] == "bf16" and report["step"] == 3
    assert not (tmp_path / "out" / SINGLE_FILE_NAME).exists()
    assert AutoencoderKL.from_pretrained(tmp_path / "out").config.sample_size == 32
    proc = subprocess.run([sys.executable, script, str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 1 and "export failed: no VAE at" in proc.stderr and "Traceback" not in proc.stderr


def test_a_decoder_only_fine_tune_keeps_the_normalisation_its_source_states(tiny_vae, images, tmp_path):
    """The export of an AutoencoderKL whose encoder is bit for bit that of the released VAE it started from
    keeps the normalisation that VAE states (sd-vae-ft-MSE keeps SD's 0.18215: the UNet was trained on it);
    one whose encoder moved is measured and says its latents are not the source's; a latent-diffusion file
    states no normalisation, so it is measured while the latents are said to be the source's."""
    from first_stage.checkpoint import encoder_origin
    from first_stage.model import encoder_fingerprint
    tiny_vae.register_to_config(scaling_factor=0.18215, shift_factor=None)
    tiny_vae.save_pretrained(tmp_path / "released")
    origin = encoder_origin(tmp_path / "released", tiny_vae)
    assert origin == {"source": str(tmp_path / "released"), "fingerprint": encoder_fingerprint(tiny_vae),
                      "normalisation": LatentNormalizer("global", 0.18215).config_entries()}
    save_file(to_ldm_state_dict(tiny_vae), tmp_path / "ldm.safetensors")
    assert encoder_origin(tmp_path / "ldm.safetensors", tiny_vae)["normalisation"] is None
    with torch.no_grad():
        tiny_vae.decoder.conv_out.bias.add_(0.1)  # a decoder-only fine-tune
    kept = export(tiny_vae, tmp_path / "kept", images, encoder_origin=origin)
    assert AutoencoderKL.from_pretrained(tmp_path / "kept").config.scaling_factor == 0.18215
    assert kept["latents"] == {"normalisation_kept": True, "origin": kept["latents"]["origin"]}
    assert kept["latents"]["origin"].startswith(f"kept from {tmp_path / 'released'}")
    assert "the latents are those of" in (tmp_path / "kept" / "README.md").read_text()
    other_kind = export(tiny_vae, tmp_path / "pc", images, ExportOptions(latent_norm="per_channel"),
                        encoder_origin=origin)
    assert not other_kind["latents"]["normalisation_kept"]  # another kind was asked for: measured
    with torch.no_grad():
        tiny_vae.encoder.conv_in.bias.add_(0.1)  # the encoder moved
    moved = export(tiny_vae, tmp_path / "moved", images, encoder_origin=origin)
    assert AutoencoderKL.from_pretrained(tmp_path / "moved").config.scaling_factor == pytest.approx(
        moved["latent_stats"]["scaling_factor"])
    assert "NOT those of" in moved["latents"]["origin"]
    # how far: the released VAE loaded again, its raw latents against these (the conv_in bias moved them a little)
    drift = moved["latents"]["drift"]
    assert drift["from"] == str(tmp_path / "released") and 0.9 < drift["overall"]["cosine"] < 1
    assert "The latents moved from those of" in (tmp_path / "moved" / "README.md").read_text()
    assert "drift" not in kept["latents"]
