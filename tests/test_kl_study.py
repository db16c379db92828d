"""scripts/kl_study.py: every variant's config loads and differs from the base recipe only in its
regulariser or discriminator; the e2e variant's two tunes start from the SD default's export and differ
only in section e2e; the held-out pictures are not training pictures; the hand-written interpretation
survives a regenerated report; and (slow) the study runs end to end at 2 steps, the e2e variant with
its start, its control and a random DINOv2 stand-in."""

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
    assert len(table) == 13 and not {"align", "e2e", "e2e-plain"} & set(table)
    with_model = kl_study.variants(base["train"]["max_steps"], vision_model="/models/dinov2")
    # the vision model goes to the alignment section's key; e2e tunes the start instead (e2e_variants)
    assert with_model["align"][0] == ["alignment.enabled=true", "alignment.model=/models/dinov2"]
    assert "e2e" not in with_model
    for name, (overrides, _) in table.items():
        config = to_dict(load_config(path, overrides + [f"train.run_name={name}"]))
        changed = {section for section in base if config[section] != base[section]}
        assert changed <= {"regularizer", "discriminator", "equivariance", "latent_noise", "train"}, name
        assert {k for k in base["train"] if config["train"][k] != base["train"][k]} <= {"run_name"}
    gan = load_config(path, table["kl1e-6-gan"][0]).discriminator
    assert gan.enabled and 0 < gan.start < base["train"]["max_steps"]  # it starts within the budget
    assert load_config(path, table["mmd"][0]).regularizer.kind == "mmd"


@pytest.mark.parametrize("recipe", ["cpu", "gpu"])
def test_e2e_variant_tunes_the_start_with_and_without_e2e(recipe):
    """Both tunes start from the SD default's export; the e2e tune differs from the control only in section e2e:
    a small transformer, REPA-E's align weight, the recipe's learning rate and EMA."""
    path = kl_study.CONFIGS[recipe]
    base = load_config(path)
    start = Path("/runs/kl1e-6/export")
    table = kl_study.e2e_variants(base, start, "/models/dinov2")
    assert list(table) == [kl_study.E2E_CONTROL, "e2e"]
    plain, e2e = (load_config(path, table[name][0] + [f"train.run_name={name}"]) for name in table)
    changed = {section for section, value in to_dict(plain).items() if value != to_dict(base)[section]}
    assert changed == {"model", "export", "train"} and plain.model.init_from == str(start)
    assert plain.export.latent_norm == "per_channel" and not plain.e2e.enabled
    assert {section for section, value in to_dict(e2e).items() if value != to_dict(plain)[section]} == {"e2e", "train"}
    assert to_dict(e2e)["train"] | {"run_name": "x"} == to_dict(plain)["train"] | {"run_name": "x"}
    cfg = e2e.e2e
    assert cfg.enabled and cfg.model == "/models/dinov2" and cfg.transformer == "tiny"
    assert 1 <= cfg.encoder_depth <= kl_study.DIT_SIZES["tiny"]["depth"] and cfg.projector_dim == 256
    # REPA-E's 1.5, stated against a per-pixel mean L1: the term scales it under the recipe's sum reduction itself
    assert base.loss.reduction == "sum" and cfg.align_weight == 1.5
    assert cfg.lr == base.optimizer.lr and cfg.ema_decay == base.train.ema_decay


def test_e2e_variant_brings_its_start_and_control():
    assert kl_study.with_e2e_parts(["mmd", "e2e"]) == ["mmd", "kl1e-6", "e2e-plain", "e2e"]
    assert kl_study.with_e2e_parts(["e2e", "kl0", "kl1e-6"]) == ["kl0", "kl1e-6", "e2e-plain", "e2e"]
    assert kl_study.with_e2e_parts(["mmd", "kl0"]) == ["mmd", "kl0"]


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
           "--variants", "mmd", "kl1e-6-gan", "eq-vae", "--out", str(out), "--work", str(work), "--commit", "test",
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


@pytest.mark.slow
def test_study_e2e_variant_end_to_end(tmp_path):
    """The e2e variant at 2 steps with the random DINOv2 stand-in: the start, the control and the e2e tune are
    probed (2 seeds) on the same held-out tiles, the report says loudly that the vision model is random, the
    two tunes start alike and only the e2e one trains a transformer and exports its BatchNorm."""
    out, work = tmp_path / "docs" / "kl_study", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--steps", "2", "--resolution", "32", "--tiles-per-image", "2",
           "--variants", "e2e", "--out", str(out), "--work", str(work), "--commit", "test",
           "--set", "export.single_file=false", "--set", "export.calibration_images=4", "--set", "train.log_every=1",
           "--probe-steps", "2", "--probe-batch-size", "2", "--probe-held-out", "2", "--probe-tiles-per-image", "2",
           "--probe-seeds", "2", "--probe-samples", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)  # a loaded machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    study = json.loads((out / "kl_study.json").read_text())
    names = ["kl1e-6", "e2e-plain", "e2e"]
    assert list(study["variants"]) == names
    e2e = study["meta"]["e2e"]
    assert e2e["standin"] and e2e["start"] == "kl1e-6" and (work / "dinov2_standin" / "config.json").is_file()
    variants = study["variants"]
    start = f"model.init_from={work / 'runs' / 'kl1e-6' / 'export'}"
    assert variants["e2e-plain"]["overrides"][0] == start and variants["e2e"]["overrides"][0] == start
    held = [variants[n]["probe_held_out"] for n in names]
    assert len(held[0]) == 2 and held[0] == held[1] == held[2]  # the same held-out tiles for all three
    for name in names:
        ranking = variants[name]["diffusability"]["ranking"]
        assert math.isfinite(ranking["ratio"]) and math.isfinite(ranking["ratio_sd"]), name
        assert variants[name]["diffusability"]["probe"]["seeds"] == 2
        assert math.isfinite(variants[name]["reconstruction"]["psnr"]["mean"])
    assert variants["e2e"]["export_config"]["latents_std"] and variants["e2e-plain"]["export_config"]["latents_std"]
    log = variants["e2e"]["training_log"]
    assert {"train/e2e/vae_align", "train/e2e/denoise"} <= set(log["losses"])
    assert 0 < log["least_seconds_per_step"] <= log["seconds_per_step"]
    assert "train/e2e/vae_align" not in variants["e2e-plain"]["training_log"]["losses"]
    metrics = {n: [json.loads(line) for line in (work / "runs" / n / "metrics.jsonl").read_text().splitlines()]
               for n in ("e2e-plain", "e2e")}
    # Same start, same first batch, same posterior noise: the same first reconstruction with and without e2e.
    first = [next(m["train/loss/pixel"] for m in metrics[n] if m["step"] == 1) for n in ("e2e-plain", "e2e")]
    assert first[0] == first[1]
    text = out.with_suffix(".md").read_text()
    assert "## End-to-end (e2e) tuning" in text and kl_study.STANDIN_WARNING in text
    assert ("| statistic | before (kl1e-6) | after plain tuning (e2e-plain) | after e2e tuning (e2e) | reference |"
            in text)
    assert "probe: held-out tiles (the same in all three: yes)" in text


def test_provenance_is_repository_relative():
    meta = {"evaluation_data": f"source=imagefolder,path={REPO}/outputs/kl_study/held_out_64",
            "common_overrides": [f"train.output_dir={REPO}/outputs/kl_study/runs"], "elsewhere": "/data/imgs"}
    assert kl_study.repo_relative(meta) == {"evaluation_data": "source=imagefolder,path=outputs/kl_study/held_out_64",
                                            "common_overrides": ["train.output_dir=outputs/kl_study/runs"],
                                            "elsewhere": "/data/imgs"}
