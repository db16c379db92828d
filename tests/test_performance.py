"""The performance switches change speed and memory, not results or saved keys; the benchmark
scripts run end to end on the CPU (a couple of steps) and print what they promise."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from first_stage.config import OptimizerConfig, PerformanceConfig, load_config
from first_stage.performance import adamw, compile_in_place, compiled_parts, prepare_autoencoder, set_memory_format

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grads(vae, images) -> tuple[torch.Tensor, dict]:
    vae.zero_grad()
    posterior = vae.encode(images).latent_dist
    loss = vae.decode(posterior.mean).sample.pow(2).mean() + posterior.logvar.mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in vae.named_parameters()}


def test_gradient_checkpointing_and_channels_last_give_the_same_gradients(tiny_vae, images):
    loss, reference = grads(tiny_vae, images)
    prepare_autoencoder(tiny_vae, PerformanceConfig(gradient_checkpointing=True), torch.device("cpu"))
    set_memory_format([tiny_vae], PerformanceConfig(channels_last=True))
    assert tiny_vae.encoder.gradient_checkpointing
    assert tiny_vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    loss2, fast = grads(tiny_vae, images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(loss2, loss)
    for key in reference:
        torch.testing.assert_close(fast[key], reference[key], rtol=1e-4, atol=1e-6)


def test_compile_in_place_keeps_the_saved_keys(tiny_vae, tmp_path):
    keys = list(tiny_vae.state_dict())
    compile_in_place(compiled_parts(tiny_vae), PerformanceConfig(compile=True))  # lazy: nothing compiles yet
    assert list(tiny_vae.state_dict()) == keys
    assert all(part._compiled_call_impl is not None for part in compiled_parts(tiny_vae))
    tiny_vae.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert sorted(load_file(tmp_path / "diffusion_pytorch_model.safetensors")) == sorted(keys)


def test_xformers_off_cuda_is_a_clear_error(tiny_vae):
    with pytest.raises(ValueError, match="attention=sdpa"):
        prepare_autoencoder(tiny_vae, PerformanceConfig(attention="xformers"), torch.device("cpu"))


def test_fused_adamw_takes_the_same_step():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64))
    b = torch.nn.Parameter(a.detach().clone())
    cfg = OptimizerConfig()
    for param, fused in ((a, False), (b, True)):
        opt = adamw([param], cfg, 1e-2, fused)
        for _ in range(3):
            param.grad = torch.linspace(-1, 1, 64)
            opt.step()
    torch.testing.assert_close(a, b)


def test_unknown_performance_key_is_named():
    with pytest.raises(ValueError, match="performance.compiled"):
        load_config(None, ["performance.compiled=true"])


def test_largest_batch_search_finds_the_threshold():
    largest_batch = load_script("bench_train").largest_batch
    for limit in (1, 2, 3, 7, 8, 37, 100):
        tried = []
        assert largest_batch(lambda b: tried.append(b) or b <= limit, 1) == limit
        assert len(tried) <= 2 * limit.bit_length() + 2  # doubling then bisection, not a scan
    assert largest_batch(lambda b: False, 4) == 0


def run_script(*args) -> list[dict]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_bench_train_runs_and_reports(tmp_path):
    started = time.monotonic()
    rows = run_script("scripts/bench_train.py", "--preset", "tiny", "--resolution", "32", "--batch", "2",
                      "--steps", "1", "--warmup", "1", "--set", "discriminator.channels=16",
                      "--json", str(tmp_path / "bench.jsonl"))
    elapsed = time.monotonic() - started
    assert [r["step"] for r in rows] == ["first-stage", "naive"]
    ours, naive = rows
    assert ours["discriminator"] and ours["lpips"].startswith("random VGG16")  # the full loss, offline
    assert ours["batch"] == 2 and ours["processes"] == 1 and ours["resolution"] == 32  # what was asked
    # The naive step also computes the frozen discriminator's weight gradients: more FLOPs, not fewer.
    assert 0 < ours["gflop_per_image_counted"] < naive["gflop_per_image_counted"]
    # Measured, not made up: both timed steps ran inside the script's lifetime, and the rate counts
    # at least the 2 images of one step over that lifetime (a rate off by a unit factor fails).
    assert 0 < ours["seconds_per_step"] and 0 < naive["seconds_per_step"]
    assert ours["seconds_per_step"] + naive["seconds_per_step"] < elapsed
    assert ours["img_s_total"] > 2 / elapsed
    assert 0 < ours["mfu"] < 1 and ours["peak_mem_gib"] > 0
    assert len((tmp_path / "bench.jsonl").read_text().splitlines()) == 2


def check_encode_rows(rows: list[dict], vae: str, batch: int, resolution: int) -> None:
    """bench_encode.py's rows for one process: the four rates, measured (positive, finite), with what was asked,
    and the bottleneck the slower of data and encode. Nothing here depends on how fast the machine is."""
    assert [r["what"] for r in rows] == ["data", "encode", "decode", "encode_pipeline"]
    for r in rows:
        assert r["bench"] == "encode" and r["vae"] == vae and r["precision"] == "fp32"
        assert r["processes"] == 1 and r["batch"] == batch and r["resolution"] == resolution
        assert len(r["img_s_each_process"]) == 1 and r["img_s_total"] == r["img_s_per_process"]
        assert 0 < r["img_s_total"] and math.isfinite(r["img_s_total"])
    rate = {r["what"]: r["img_s_total"] for r in rows}
    assert {r["bottleneck"] for r in rows} == {min(("data", "encode"), key=rate.get)}  # the slower of the two


@pytest.mark.slow
def test_bench_encode_runs_on_a_saved_vae(tiny_vae, tmp_path):
    tiny_vae.save_pretrained(tmp_path / "vae")
    rows = run_script("scripts/bench_encode.py", "--vae", str(tmp_path / "vae"), "--resolution", "32",
                      "--batch", "2", "--images", "4", "--steps", "1", "--warmup", "1", "--precision", "fp32")
    check_encode_rows(rows, str(tmp_path / "vae"), batch=2, resolution=32)
    # A named architecture instead of a folder: the 84 M-parameter SD encoder, randomly initialised.
    rows = run_script("scripts/bench_encode.py", "--vae", "sd-f8c4", "--resolution", "64", "--batch", "2",
                      "--images", "8", "--steps", "1", "--warmup", "1", "--precision", "fp32")
    check_encode_rows(rows, "sd-f8c4", batch=2, resolution=64)


@pytest.mark.slow
def test_gpu_acceptance_script_runs_every_row_and_writes_the_table(tmp_path):
    """The GPU acceptance command, shrunk to the tiny preset on the CPU: every row runs, the JSON
    lines and the table are written, and a failing row stops it with the row's name."""
    env = {**os.environ, "ACCEPTANCE_SMOKE": "1", "PYTHON": sys.executable, "TORCH_HOME": str(tmp_path / "th")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh"), str(tmp_path / "out")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "acceptance.jsonl").read_text().splitlines()]
    terms = [f"first-stage + {t}" for t in ("alignment", "alignment_fixed_weight", "equivariance", "scale_eq",
                                            "latent_noise", "fp16_safe")]
    assert [r.get("step") for r in rows if r["bench"] == "train"] == [
        "first-stage", "naive", "first-stage", "first-stage", "first-stage preset flux2-tiny", "first-stage",
        "distill flux2-tiny:32-32", "distill taesd-tiny", "first-stage", *terms, "first-stage", "first-stage + e2e"]
    assert rows[2]["performance"]["channels_last"]
    flux2 = rows[4]
    assert flux2["preset"] == "flux2-tiny" and rows[3]["preset"] == "tiny" and flux2["flops_vs_plain"] > 0
    assert all(r["precision"] == "bf16" for r in rows if r.get("step") == "first-stage")
    students = [r for r in rows if str(r.get("step", "")).startswith("distill")]
    assert all(r["decode"]["flop_ratio"] < 1 and r["decode"]["teacher"]["class"] == "AutoencoderKLFlux2"
               for r in students)
    term_rows = [r for r in rows if r.get("step") in terms]
    assert all(r["cost_vs_plain"] > 0 and r["skipped_steps"] == 0 for r in term_rows)
    # noise is elementwise only: the same FLOP count as the plain step; the fp16-safe step adds the teacher's forward
    assert [r["flops_vs_plain"] == 1 for r in term_rows] == [False, False, False, False, True, False]
    assert "NOT the cost of a real DINOv2" in term_rows[0]["alignment_model"]
    # the e2e row (configs/e2e_sd_f8c4.yaml at tiny size): its parts, counted alone, add up to the counted step
    e2e = next(r for r in rows if r.get("step") == "first-stage + e2e")
    assert e2e["skipped_steps"] == 0 and e2e["flops_vs_plain"] > 1 and e2e["cost_vs_plain"] > 0
    assert e2e["transformer"] == "DiT-tiny" and "NOT the cost of a real DINOv2" in e2e["vision_model"]
    parts = e2e["e2e_parts"]["parts"]
    assert list(parts) == ["vae_step", "vision_model", "align_pass", "transformer_step"]
    assert all(p["gflop_per_image"] > 0 and p["seconds_per_image"] > 0 for p in parts.values())
    assert abs(e2e["e2e_parts"]["flops_parts_over_step"] - 1) < 1e-3
    assert e2e["gpu_hours_estimate"]["global_batch"] == 256 and e2e["gpu_hours_estimate"]["steps"] == 400_000
    assert [r["what"] for r in rows if r["bench"] == "encode"] == ["data", "encode", "decode", "encode_pipeline"]
    run = rows[-1]
    assert run["bench"] == "train.py" and run["step"] == 2 and run["reload_difference"] == 0
    table = (tmp_path / "out" / "acceptance.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "training run + export" in table
    env["ROW_TIMEOUT"] = "1"  # too short for any row: the run must stop and say which row
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh"), str(tmp_path / "fail")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 1 and "FAILED: train_bf16_eager" in proc.stderr
