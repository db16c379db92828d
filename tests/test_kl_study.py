"""scripts/kl_study.py: every variant's config loads and differs from the base recipe only in its
regulariser or discriminator; the held-out pictures are not training pictures; the hand-written
interpretation survives a regenerated report; and (slow) the study runs end to end at 2 steps."""

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from first_stage.config import load_config, to_dict
from first_stage.data import SAMPLE_IMAGES, SAMPLE_SPLITS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "kl_study.py"
spec = importlib.util.spec_from_file_location("kl_study", SCRIPT)
kl_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kl_study)


@pytest.mark.parametrize("recipe", ["cpu", "gpu"])
def test_every_variant_loads_and_changes_only_its_regularizer(recipe):
    path = kl_study.CONFIGS[recipe]
    base = to_dict(load_config(path))
    table = kl_study.variants(base["train"]["max_steps"])
    assert len(table) == 13 and "align" not in table
    assert "align" in kl_study.variants(base["train"]["max_steps"], alignment_model="/models/dinov2")
    for name, (overrides, _) in table.items():
        config = to_dict(load_config(path, overrides + [f"train.run_name={name}"]))
        changed = {section for section in base if config[section] != base[section]}
        assert changed <= {"regularizer", "discriminator", "equivariance", "latent_noise", "train"}, name
        assert {k for k in base["train"] if config["train"][k] != base["train"][k]} <= {"run_name"}
    gan = load_config(path, table["kl1e-6-gan"][0]).discriminator
    assert gan.enabled and 0 < gan.start < base["train"]["max_steps"]  # it starts within the budget
    assert load_config(path, table["mmd"][0]).regularizer.kind == "mmd"


def test_held_out_pictures_are_not_training_pictures():
    train = SAMPLE_IMAGES[SAMPLE_SPLITS["train"]]
    assert not set(kl_study.HELD_OUT) & set(train)
    digest = lambda a: hashlib.sha256(a.tobytes()).hexdigest()  # noqa: E731
    train_digests = {digest(getattr(kl_study.skimage.data, n)()) for n in train}
    assert not {digest(load()) for load in kl_study.HELD_OUT.values()} & train_digests


def test_interpretation_survives_regeneration(tmp_path):
    report = tmp_path / "kl_study.md"
    assert "to be written" in kl_study.kept_interpretation(report)  # no report yet: the placeholder
    meta = {"device": "cpu", "date": "today", "commit": "abc", "command": "python scripts/kl_study.py", "steps": 2,
            "config": "configs/kl_study.yaml", "resolved_config": to_dict(load_config(kl_study.CONFIGS["cpu"])),
            "training_data": "photos", "held_out": ["camera"], "evaluation_data": "tiles", "evaluation_images": 0,
            "lpips": None}
    written = "The scale falls with the weight.\n\nSecond paragraph.\n"
    report.write_text(kl_study.markdown(meta, {}, [], [], "kl_study", written))
    assert kl_study.kept_interpretation(report) == written
    regenerated = kl_study.markdown(meta, {}, [], [], "kl_study", kl_study.kept_interpretation(report))
    assert written in regenerated and "## What the figures show" in regenerated


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
    out, work = tmp_path / "docs" / "kl_study", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--steps", "2", "--resolution", "32", "--tiles-per-image", "2",
           "--variants", "mmd", "kl1e-6-gan", "eq-vae", "--out", str(out), "--work", str(work),
           "--set", "export.single_file=false", "--set", "export.calibration_images=4", "--set", "train.log_every=1",
           "--probe-steps", "2", "--probe-batch-size", "2", "--probe-held-out", "2", "--probe-tiles-per-image", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)  # a loaded machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    study = json.loads((out / "kl_study.json").read_text())
    assert list(study["variants"]) == ["mmd", "kl1e-6-gan", "eq-vae"]
    assert study["meta"]["steps"] == 2 and study["meta"]["evaluation_images"] == 8
    for name, v in study["variants"].items():
        lat, rec = v["latent_stats"], v["reconstruction"]
        numbers = [rec["psnr"]["mean"], rec["ssim"]["mean"], v["mse"], v["kl_nats_per_image"],
                   lat["scale"]["std_of_samples"], lat["scale"]["implied_scaling_factor"], lat["tails"]["p_abs_gt_3"],
                   lat["tails"]["excess_kurtosis"], lat["peaks"]["median"], lat["spots"]["concentration_median"],
                   lat["posterior"]["fraction_at_clamp"], *lat["posterior"]["channel_kl"]]
        assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), name
        assert "lpips" not in rec
        posterior = lat["posterior"]  # the count agrees with the per-channel verdicts of the 4 channels
        assert len(posterior["channel_active"]) == 4 and posterior["active_units"] == sum(posterior["channel_active"])
    text = out.with_suffix(".md").read_text()
    assert "| statistic | mmd | kl1e-6-gan | eq-vae | reference |" in text
    assert "| align | `alignment.enabled=true` | VA-VAE alignment: **not run**, needs a DINOv2" in text
    assert "## What the figures show" in text and kl_study.INTERPRETATION[0] in text
    probed = [v["diffusability"] for v in study["variants"].values()]
    assert all(p["held_out_images"] == 2 and p["train_images"] == 6 and len(p["curve"]) == 3 for p in probed)
    assert study["meta"]["probe"]["steps"] == 2
    assert "probe: held-out / Gaussian reference, t-weighted, per channel" in text
    for figure in ("rate_distortion", "zhat_tails", "peak_positions", "logvar_histogram", "channel_std_kl",
                   "diffusability", "diffusability_loss"):
        assert (out / f"{figure}.png").is_file() and f"kl_study/{figure}.png" in text
    metrics = {name: [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
               for name in study["variants"]}
    assert {"train/loss/mmd", "train/loss/kl", "train/kl_nats_per_image"} <= set().union(*metrics["mmd"])
    assert "train/loss/disc" in set().union(*metrics["kl1e-6-gan"])  # the discriminator started within 2 steps
    assert "train/eq/transformed" in set().union(*metrics["eq-vae"])
    # Same initial weights, same first batch, same posterior noise: the same first reconstruction.
    first = [next(m["train/loss/pixel"] for m in metrics[name] if m["step"] == 1) for name in ("mmd", "kl1e-6-gan")]
    assert first[0] == first[1]


def test_provenance_is_repository_relative():
    meta = {"evaluation_data": f"source=imagefolder,path={REPO}/outputs/kl_study/held_out_64",
            "common_overrides": [f"train.output_dir={REPO}/outputs/kl_study/runs"], "elsewhere": "/data/imgs"}
    assert kl_study.repo_relative(meta) == {"evaluation_data": "source=imagefolder,path=outputs/kl_study/held_out_64",
                                            "common_overrides": ["train.output_dir=outputs/kl_study/runs"],
                                            "elsewhere": "/data/imgs"}
