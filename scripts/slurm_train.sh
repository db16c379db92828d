#!/bin/bash
# Train under SLURM on one or many nodes. Pre-emption and the approaching time limit stop the run
# with a checkpoint; at the time limit the job requeues itself, and every start resumes with
# --resume latest when the run has a checkpoint. docs/training.md, "Running under SLURM".
#
#   sbatch --nodes=2 --gpus-per-node=8 --time=24:00:00 scripts/slurm_train.sh --config configs/X.yaml [--set KEY=VALUE ...]
#
# Submit from the repository root with the environment that has the package installed activated
# (sbatch passes the environment on). GPUS_PER_NODE: processes per node (default: the GPUs SLURM
# gives the node, else 1); MAIN_PORT: the rendezvous port (default 29500 + job id % 1000).
#SBATCH --job-name=first-stage
#SBATCH --ntasks-per-node=1      # one accelerate launcher per node; it starts a process per GPU
#SBATCH --signal=B:USR1@300      # 5 minutes before the time limit, USR1 to this script
#SBATCH --requeue
#SBATCH --open-mode=append       # a requeued job appends to its log
#SBATCH --output=slurm-%x-%j.out
set -u
cd "${SLURM_SUBMIT_DIR:-.}"
RUN_DIR=$(python train/train.py --print-run-dir "$@") || exit 1
STARTED=$(mktemp) && trap 'rm -f "$STARTED"' EXIT

NODES=${SLURM_NNODES:-1}
PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MAIN_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
LAUNCH=(--num_machines "$NODES" --num_processes $((NODES * PER_NODE)) --main_process_ip "$MAIN"
        --main_process_port "$PORT" --dynamo_backend no --mixed_precision no)  # the recipe's train.mixed_precision decides
[ $((NODES * PER_NODE)) -gt 1 ] && LAUNCH=(--multi_gpu "${LAUNCH[@]}")
RESUME=()
compgen -G "$RUN_DIR/checkpoints/checkpoint-*" > /dev/null && RESUME=(--resume latest)

# On USR1 (time limit) or TERM (pre-emption, scancel) every process of the job step gets SIGTERM
# (scancel --signal: a plain signal; a SIGTERM to srun would start its own kill sequence); each
# trainer finishes its step, saves a checkpoint and writes status.json. With several processes the
# launcher (torchrun) forwards it too and SIGKILLs its workers 30 s later: step + checkpoint must fit.
TIME_LIMIT=0
stop() { echo "$(date -Is) $1: stopping $RUN_DIR with a checkpoint"; scancel --signal=TERM "$SLURM_JOB_ID"; }
trap 'TIME_LIMIT=1; stop USR1' USR1
trap 'stop TERM' TERM
echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NODES node(s) x $PER_NODE, run $RUN_DIR ${RESUME[*]}"
if [ $((NODES * PER_NODE)) -gt 1 ]; then
    srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' launch \
        "${LAUNCH[@]}" train/train.py "${RESUME[@]}" "$@" &
else  # one process: the trainer is the task itself (SLURM would kill it with a single-process launcher)
    srun python train/train.py "${RESUME[@]}" "$@" &
fi
SRUN_PID=$!
while kill -0 "$SRUN_PID" 2> /dev/null; do wait "$SRUN_PID"; done  # a trapped signal interrupts wait

# accelerate launch reports every failure as exit 1: status.json says how the run ended.
if [ ! "$RUN_DIR/status.json" -nt "$STARTED" ]; then
    echo "no status.json from this attempt: the trainers were killed outright (out of memory? SIGKILL?)"
    exit 1
fi
STATE=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["state"])' "$RUN_DIR/status.json")
echo "$(date -Is) run ended: $(cat "$RUN_DIR/status.json")"
case "$STATE" in
    finished) exit 0 ;;
    stopped) if [ "$TIME_LIMIT" = 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi; exit 0 ;;  # pre-emption: SLURM requeues
    *) exit 1 ;;  # nonfinite, vanished or failed: a person looks at it
esac
