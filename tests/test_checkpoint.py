import json

import pytest
import torch

from safetensors.torch import save_file

from first_stage.checkpoint import (AUTOENCODER_CONFIG, CONFIG_FILE, TRAINING_STATE, CheckpointError,
                                    accelerate_model_file, check_architecture, checkpoint_dirs, resolve_resume)
from first_stage.config import ModelConfig, OptimizerConfig
from first_stage.model import AutoencoderWrapper, new_autoencoder
from first_stage.trainer import lr_factor


def test_lr_schedule():
    cfg = OptimizerConfig(warmup_steps=10, schedule="cosine", final_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.55)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(50, OptimizerConfig(), 100) == 1.0


def make_checkpoint(root, step):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / TRAINING_STATE).write_text(json.dumps({"step": step}))
    return path


def test_checkpoint_discovery_ignores_unfinished(tmp_path):
    for step in (2, 10, 4):
        make_checkpoint(tmp_path, step)
    (tmp_path / ".tmp-checkpoint-12").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-10"


def test_resume_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> folder"):
        resolve_resume("latest", tmp_path)
    old = make_checkpoint(tmp_path, 2)
    (tmp_path / "broken").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "broken"), tmp_path)
    make_checkpoint(tmp_path, 6)
    with pytest.raises(CheckpointError, match=r"newer checkpoints \['checkpoint-6'\]"):  # one error line
        resolve_resume(str(old), tmp_path)


def test_resume_into_another_architecture_names_what_differs(tmp_path, tiny_vae):
    """A checkpoint of the tiny preset, resumed into 8 latent channels: refused with the setting, the
    weights and shapes that differ, and the config the checkpoint was written under."""
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / AUTOENCODER_CONFIG).write_text(tiny_vae.to_json_string())
    save_file(tiny_vae.state_dict(), ckpt / accelerate_model_file(0))
    same = new_autoencoder(ModelConfig(preset="tiny"))
    check_architecture(ckpt, json.loads(same.to_json_string()), [same])  # same shapes: no error
    wider = new_autoencoder(ModelConfig(preset="tiny", overrides={"latent_channels": 8}))
    with pytest.raises(CheckpointError) as refused:
        check_architecture(ckpt, json.loads(wider.to_json_string()), [wider])
    message = str(refused.value)
    assert "latent_channels: 4 in the checkpoint, 8 in this config" in message
    assert "model.safetensors: encoder.conv_out.weight: (8, 64, 3, 3) in the checkpoint, (16, 64, 3, 3)" in message
    assert f"--config {ckpt / CONFIG_FILE}" in message


def test_resume_of_a_projection_with_a_bias_says_which_key_to_set(tmp_path, tiny_vae):
    """Alignment runs saved before the projection followed VA-VAE's (bias-free) are told the key to set."""
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    old = AutoencoderWrapper(tiny_vae, projection=torch.nn.Conv2d(4, 8, 1, bias=True))
    save_file(old.state_dict(), ckpt / accelerate_model_file(0))
    new = AutoencoderWrapper(tiny_vae, projection=torch.nn.Conv2d(4, 8, 1, bias=False))
    with pytest.raises(CheckpointError, match=r"projection\.bias: \(8,\) in the checkpoint, absent(.|\n)*"
                                              r"add --set alignment.projection_bias=true"):
        check_architecture(ckpt, json.loads(tiny_vae.to_json_string()), [new])
