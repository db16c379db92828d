#!/usr/bin/env bash
# Every row of the GPU table in docs/benchmarks.md, on one GPU, in one command (budget: 8 minutes).
#
#   scripts/gpu_acceptance.sh [OUT_DIR]            # default OUT_DIR: reports/gpu_acceptance
#   ACCEPTANCE_SMOKE=1 scripts/gpu_acceptance.sh   # the same commands, tiny, on the CPU, without the
#                                                  # compiled row and the batch search (tests run this)
#
# Rows: full-loss training of the SD kl-f8 VAE at 256² in bf16 (eager with channels_last off and on,
# compiled), the FLUX.2 class (AutoencoderKLFlux2) against that step in the same run, decoder distillation
# from a FLUX.2-class teacher (its small decoder, a TAESD) with decode costs, the largest batch at 256²
# and 512² with and without gradient checkpointing, encode and
# decode in bf16, the cost of each X-regulariser and of the fp16-safe fine-tune on the f16c32 step, the
# end-to-end step of configs/e2e_sd_f8c4.yaml (REPA-E: a DiT-B/2 and DINOv2-B beside the SD VAE) against its
# plain VAE step with each part's counted FLOPs and time, and a 50-step bf16 training run
# that exports and verifies. Each command has its
# own time limit (ROW_TIMEOUT seconds, default 150) and the whole run stops at the first failure with
# the command's name: it fails loudly, it does not hang. Writes OUT_DIR/acceptance.jsonl (the
# benchmarks' JSON lines), OUT_DIR/acceptance.md (the table) and one log per row.
# Without LPIPS weights on the machine the VGG16 trunk is random (same cost; the rows say so).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-reports/gpu_acceptance}"
mkdir -p "$OUT"
JSONL="$OUT/acceptance.jsonl"
: > "$JSONL"
ROW_TIMEOUT="${ROW_TIMEOUT:-150}"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1

if [[ "${ACCEPTANCE_SMOKE:-0}" == 1 ]]; then
  TRAIN=(--preset tiny --set discriminator.channels=16 --steps 1 --warmup 1)
  RES=32; RES_LARGE=64; ENCODE=(--vae tiny --resolution 32 --batch 2 --images 4 --steps 1 --warmup 1)
  RUN=(--set model.preset=tiny --set data.resolution=32 --set train.batch_size=2 --set train.max_steps=2
       --set discriminator.start=1 --set discriminator.channels=16 --set train.mixed_precision=bf16)
  TERMS=(--preset tiny --set discriminator.channels=16 --resolution 96 --batch 2 --steps 1 --warmup 0 --precision bf16
         --alignment-standin test --set alignment.grid=model)
  FLUX2=flux2-tiny
  STUDENTS=flux2-tiny:32-32,taesd-tiny
  E2E=(--preset tiny --set discriminator.channels=16 --resolution 32 --batch 2 --steps 1 --warmup 1
       --transformer tiny --set e2e.encoder_depth=1 --set e2e.projector_dim=16 --vision-standin test)
  MAX_BATCH=()   # the search needs CUDA memory to run out of
  COMPILE=0      # compiling takes minutes on a CPU; tests/test_performance.py checks compile_in_place
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  TRAIN=(--config configs/sd_kl_f8.yaml --batch 16 --steps 10 --warmup 3 --set performance.tf32=true
         --set performance.fused_optimizer=true)
  RES=256; RES_LARGE=512; ENCODE=(--vae sd-f8c4 --resolution 256 --batch 64 --images 512 --steps 10 --warmup 3 --workers 8)
  RUN=(--config configs/sd_kl_f8.yaml --set data.source=sample --set data.split=all --set data.resolution=256
       --set train.batch_size=8 --set train.max_steps=50 --set discriminator.start=25 --set train.mixed_precision=bf16
       --set performance.tf32=true --set performance.fused_optimizer=true --set train.log_every=10
       --set export.calibration_images=9)
  TERMS=(--preset f16c32 --resolution 256 --batch 16 --steps 5 --warmup 2 --flop-steps 2 --precision bf16
         --set performance.tf32=true)
  MAX_BATCH=(--find-max-batch --no-naive --steps 2 --warmup 1)
  FLUX2=flux2
  STUDENTS=flux2:96-192-384-384,taesd   # FLUX.2's small decoder; a TAESD with 32 latent channels
  E2E=(--resolution 256 --batch 16 --steps 10 --warmup 3 --set performance.tf32=true
       --set performance.fused_optimizer=true)   # the recipe's DiT-B/2, DINOv2-B (a random one when none is cached)
  COMPILE=1
fi

row() {  # row NAME COMMAND...: run one benchmark with a time limit; its JSON lines go to $JSONL
  local name="$1"; shift
  echo "== $name: $*"
  local start=$SECONDS
  if ! timeout --kill-after=10 "$ROW_TIMEOUT" "$@" --json "$JSONL" > "$OUT/$name.log" 2>&1; then
    echo "FAILED: $name (exit status, or killed after ${ROW_TIMEOUT}s); last lines of $OUT/$name.log:" >&2
    tail -n 30 "$OUT/$name.log" >&2
    exit 1
  fi
  echo "   done in $((SECONDS - start)) s"
}

# LPIPS: the real VGG16 file when the torch hub cache has it, else a random trunk written once.
VGG="$OUT/vgg16-397923af.pth"
"$PY" - "$VGG" <<'EOF'
import sys, torch
from first_stage.perceptual import LPIPS, LPIPSWeightsNotFound, resolve_vgg16_weights
try:
    print("LPIPS weights:", resolve_vgg16_weights(download=False))
    open(sys.argv[1] + ".real", "w").write(str(resolve_vgg16_weights(download=False)))
except LPIPSWeightsNotFound:
    torch.save({k: v for k, v in LPIPS().state_dict().items() if k.startswith("features.")}, sys.argv[1])
    print("LPIPS: random VGG16 trunk (no weights on this machine; same cost)")
EOF
[[ -f "$VGG.real" ]] && VGG="$(cat "$VGG.real")"
LPIPS=(--set "loss.lpips_weights=$VGG" --set loss.lpips_download=false)

BENCH=("$PY" scripts/bench_train.py "${TRAIN[@]}" "${LPIPS[@]}" --resolution "$RES" --precision bf16)
row train_bf16_eager "${BENCH[@]}"
row train_bf16_eager_channels_last "${BENCH[@]}" --no-naive --set performance.channels_last=true
if [[ $COMPILE == 1 ]]; then row train_bf16_compiled "${BENCH[@]}" --no-naive --compile; fi
# The FLUX.2 class (32 latent channels, BatchNorm over patches) against the sd-f8c4 step: counted FLOPs and time.
row train_flux2 "${BENCH[@]}" --no-naive --presets "$FLUX2"
# Distillation from a FLUX.2-class teacher: the step of each student and its decode cost against the teacher's.
row train_distill "${BENCH[@]}" --no-naive --preset "$FLUX2" --students "$STUDENTS"
if [[ ${#MAX_BATCH[@]} -gt 0 ]]; then
  for res in "$RES" "$RES_LARGE"; do
    SEARCH=("$PY" scripts/bench_train.py "${TRAIN[@]}" "${LPIPS[@]}" --resolution "$res" --precision bf16 --batch 8
            "${MAX_BATCH[@]}")
    row "max_batch_${res}" "${SEARCH[@]}"
    row "max_batch_${res}_checkpointing" "${SEARCH[@]}" --set performance.gradient_checkpointing=true
  done
fi
row encode_bf16 "$PY" scripts/bench_encode.py "${ENCODE[@]}" --precision bf16
# What each X-regulariser adds to the VA-VAE-shaped f16c32 step (DINOv2-L stand-in when none is cached).
# Then the fp16-safe fine-tune's step (the activation penalty's hooks and the teacher's forward) on the same step.
# Eight step builds (DINOv2-L loaded for three): twice the per-row limit.
ROW_TIMEOUT=$((2 * ROW_TIMEOUT)) row train_terms "$PY" scripts/bench_train.py "${TERMS[@]}" "${LPIPS[@]}" --no-naive \
  --terms alignment,alignment_fixed_weight,equivariance,scale_eq,latent_noise,fp16_safe
# End-to-end tuning (configs/e2e_sd_f8c4.yaml, a fresh VAE of its preset) against its plain VAE step: counted FLOPs,
# time and peak memory, and each part (VAE step, vision model, align pass, transformer step) counted and timed alone.
row train_e2e "$PY" scripts/bench_train.py --config configs/e2e_sd_f8c4.yaml --set model.init_from=null \
  --set data.source=sample --set data.split=all --set data.num_workers=0 "${E2E[@]}" "${LPIPS[@]}" --precision bf16 \
  --no-naive --e2e

# 50 bf16 steps of the real entry point, then its export (reloaded and compared before it is named).
RUN_DIR="$OUT/runs"
echo "== train_50_steps_export"
if ! timeout --kill-after=10 "$((2 * ROW_TIMEOUT))" "$PY" train/train.py "${RUN[@]}" "${LPIPS[@]}" \
    --set "train.output_dir=$RUN_DIR" --set train.run_name=acceptance > "$OUT/train_50_steps_export.log" 2>&1; then
  echo "FAILED: train_50_steps_export; last lines of $OUT/train_50_steps_export.log:" >&2
  tail -n 30 "$OUT/train_50_steps_export.log" >&2
  exit 1
fi

"$PY" - "$JSONL" "$RUN_DIR/acceptance" "$OUT/acceptance.md" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]
run = Path(sys.argv[2])
report = json.loads((run / "export" / "export_report.json").read_text())
steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
last = [m for m in steps if "train/images_per_s" in m][-1]
rows.append({"bench": "train.py", "what": "training run + export", "step": last["step"],
             "img_s_total": last["train/images_per_s"], "skipped_steps": last["train/skipped_steps"],
             "scaling_factor": report["latent_stats"]["scaling_factor"],
             "reload_difference": report["verification"]["diffusers"],
             "single_file_difference": report["verification"].get("single_file")})
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(rows[-1]) + "\n")
def fmt(v):
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
lines = ["| row | device | batch | res | precision | switches | img/s | vs naive | MFU | peak GiB | max batch | time vs plain |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    if r["bench"] == "train":
        perf = r.get("performance") or {}
        switches = ", ".join(k for k in ("compile", "channels_last", "gradient_checkpointing") if perf.get(k)) or "eager"
        lines.append(f"| {r['step']} | {r['device']} | {r['batch']} | {r['resolution']} | {r['precision']} | {switches} | "
                     f"{fmt(r['img_s_total'])} | {fmt(r.get('speedup'))} | {fmt(r.get('mfu'))} | {fmt(r.get('peak_mem_gib'))} | "
                     f"{fmt(r.get('max_batch'))} | {fmt(r.get('cost_vs_plain'))} |")
    elif r["bench"] == "encode":
        lines.append(f"| {r['what']} | {r['device']} | {r['batch']} | {r['resolution']} | {r['precision']} | "
                     f"bottleneck: {r['bottleneck']} | {fmt(r['img_s_total'])} | | | | | |")
    else:
        lines.append(f"| {r['what']} ({r['step']} steps, {r['skipped_steps']} skipped) | | | | bf16 | "
                     f"scaling_factor {fmt(r['scaling_factor'])}, reload diff {fmt(r['reload_difference'])} | "
                     f"{fmt(r['img_s_total'])} | | | | | |")
Path(sys.argv[3]).write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "wrote $JSONL and $OUT/acceptance.md in $SECONDS s"
