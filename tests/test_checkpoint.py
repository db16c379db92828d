import json

import pytest

from first_stage.checkpoint import TRAINING_STATE, checkpoint_dirs, resolve_resume
from first_stage.config import OptimizerConfig
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
    with pytest.raises(ValueError, match=r"newer checkpoints \['checkpoint-6'\]"):
        resolve_resume(str(old), tmp_path)
