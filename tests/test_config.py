import dataclasses
import re

import pytest

from first_stage.config import Config, ConfigError, load_config, save_config


def test_yaml_round_trip(tmp_path):
    config = load_config(None, ["optimizer.betas=[0.5, 0.99]", "model.overrides={latent_channels: 8}",
                                "val_data.split=validation", "regularizer.kl_weight=1e-4"])
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config(path) == config
    assert isinstance(load_config(path).optimizer.betas, tuple)


def test_defaults_and_frozen():
    config = load_config()
    assert config == Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.seed = 1


def test_file_and_set_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("regularizer:\n  kl_weight: 1e-6\ntrain:\n  max_steps: 10\n")
    config = load_config(path, ["train.max_steps=20", "train.mixed_precision=bf16", "loss.lpips_weights=null"])
    assert config.regularizer.kl_weight == 1e-6  # YAML 1.1 reads "1e-6" as a string; accepted as float
    assert config.train.max_steps == 20
    assert config.train.mixed_precision == "bf16"


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.max_step" in str(err.value) and str(path) in str(err.value)
    assert "did you mean 'train.max_steps'" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'regularizer.kl_weight'"):
        load_config(None, ["loss.kl_weight=1e-6"])
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config(None, ["bogus.x=1"])


@pytest.mark.parametrize("assignment, message", [
    ("train.max_steps=ten", "'train.max_steps' must be int, got str 'ten'"),
    ("train.max_steps=1.5", "'train.max_steps' must be int"),
    ("train.ema=3", "'train.ema' must be bool"),
    ("train.mixed_precision=fp8", "'train.mixed_precision' must be one of"),
    ("optimizer.betas=[0.5]", "'optimizer.betas' must be a list of 2 values"),
    ("regularizer.kl_weight=abc", "'regularizer.kl_weight' must be float"),
    ("data=3", "'data' must be a mapping"),
])
def test_wrong_type_names_key(assignment, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        load_config(None, [assignment])
    assert "--set" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path
    configs = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    for path in configs:
        load_config(path)


def test_mixed_precision_no_as_yaml_writes_it(tmp_path):
    """README lists `mixed_precision: no`; YAML 1.1 reads the bare word as false."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["train.mixed_precision=yes"])


@pytest.mark.parametrize("wrong, suggested", [("loss.klweight", "regularizer.kl_weight"),
                                              ("loss.kl_weight", "regularizer.kl_weight"),
                                              ("data.resolutoin", "data.resolution"),
                                              ("val_data.resolutoin", "val_data.resolution")])
def test_unknown_key_suggests_the_closest_key_of_any_section(wrong, suggested):
    with pytest.raises(ConfigError, match=re.escape(f"did you mean '{suggested}'")):
        load_config(None, [f"{wrong}=1"])


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: 10\n  batch_size: [4\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+, column \d+: not valid YAML"):
        load_config(path)


def test_variable_length_lists_are_checked_per_item():
    assert load_config(None, ["equivariance.scale_factors=[2, 4, 8]"]).equivariance.scale_factors == (2, 4, 8)
    with pytest.raises(ConfigError, match=r"equivariance.scale_factors\[1\]"):
        load_config(None, ["equivariance.scale_factors=[2, x]"])


def test_every_override_example_in_train_help_is_accepted(capsys, monkeypatch):
    """``train.py --help`` shows how to override: its example must be a key the config takes
    (it once showed loss.kl_weight, a key test_unknown_key_names_key_file_and_closest refuses)."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "train" / "train.py"
    spec = importlib.util.spec_from_file_location("train_script", script)
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    with pytest.raises(SystemExit):
        train_script.parse_args()
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    examples = re.findall(r"e\.g\. ([\w.]+=[^\s)]+)", help_text)
    assert examples == ["regularizer.kl_weight=1e-6"]
    for example in examples:
        load_config(train_script.DEFAULT_CONFIG, [example])
