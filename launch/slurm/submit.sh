#!/usr/bin/env bash
# Submit launch/slurm/train.sbatch with the job's shape as variables; see docs/SLURM.md.
#
#   NODES=4 GPUS_PER_NODE=8 TIME_LIMIT=24:00:00 ACCOUNT=myproj PARTITION=gpu \
#       launch/slurm/submit.sh CONFIG [key=value ...]
#   NODES=4 GPUS_PER_NODE=8 launch/slurm/submit.sh --dry-run CONFIG [key=value ...]
#
# --dry-run prints the sbatch command and the commands every node would run; it needs no SLURM.
#
#   NODES           nodes (default 1)
#   GPUS_PER_NODE   GPUs per node (default 8; 0 on CPU-only nodes)
#   PROCS_PER_NODE  training processes per node (default GPUS_PER_NODE; set it when GPUS_PER_NODE=0)
#   CPUS_PER_TASK   CPU cores per process (default: the cluster's default)
#   TIME_LIMIT      sbatch --time (default 04:00:00)
#   SIGNAL_SECONDS  SIGUSR1 this many seconds before the time limit (default 300)
#   ACCOUNT, PARTITION, QOS   passed to sbatch when set
#   JOB_NAME        (default ztt)        LOG_DIR  job logs, LOG_DIR/JOB_NAME-JOBID.out (default logs)
#   LAUNCHER        srun (default) or torchrun
#   MASTER_PORT     rendezvous port (default 20000 + job id % 20000)
#   NODELIST        host names for --dry-run (default node[001-NODES])
#   PYTHON          interpreter with the project installed (default: python)
#   SBATCH_EXTRA    more sbatch options, split on spaces (e.g. "--exclusive --mail-type=END")
set -euo pipefail

die() { echo "submit.sh: error: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
[ $# -ge 1 ] || die "usage: [VARIABLE=value ...] submit.sh [--dry-run] CONFIG [key=value ...]"
CONFIG=$1
shift
[ -f "$CONFIG" ] || die "config file not found: $CONFIG"

ZTT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export ZTT_ROOT
export PYTHON=${PYTHON:-python}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}
TIME_LIMIT=${TIME_LIMIT:-04:00:00}
SIGNAL_SECONDS=${SIGNAL_SECONDS:-300}
JOB_NAME=${JOB_NAME:-ztt}
LOG_DIR=${LOG_DIR:-logs}
export LAUNCHER=${LAUNCHER:-srun}

is_int "$NODES" && (( NODES >= 1 )) || die "NODES must be a positive integer, got '$NODES'"
is_int "$GPUS_PER_NODE" || die "GPUS_PER_NODE must be a non-negative integer, got '$GPUS_PER_NODE'"
is_int "$PROCS_PER_NODE" && (( PROCS_PER_NODE >= 1 )) ||
    die "PROCS_PER_NODE must be a positive integer, got '$PROCS_PER_NODE' (set it when GPUS_PER_NODE=0)"
is_int "$SIGNAL_SECONDS" && (( SIGNAL_SECONDS >= 1 )) ||
    die "SIGNAL_SECONDS must be a positive integer, got '$SIGNAL_SECONDS'"
[ -z "${CPUS_PER_TASK:-}" ] || { is_int "$CPUS_PER_TASK" && (( CPUS_PER_TASK >= 1 )); } ||
    die "CPUS_PER_TASK must be a positive integer, got '$CPUS_PER_TASK'"
[ -z "${MASTER_PORT:-}" ] || { is_int "$MASTER_PORT" && (( MASTER_PORT >= 1 && MASTER_PORT <= 65535 )); } ||
    die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
case "$LAUNCHER" in srun|torchrun) ;; *) die "LAUNCHER must be srun or torchrun, got '$LAUNCHER'" ;; esac

args=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$PROCS_PER_NODE"
      --time="$TIME_LIMIT" --signal="USR1@$SIGNAL_SECONDS" --requeue --open-mode=append
      --output="$LOG_DIR/%x-%j.out")
(( GPUS_PER_NODE == 0 )) || args+=(--gpus-per-node="$GPUS_PER_NODE")
[ -z "${CPUS_PER_TASK:-}" ] || args+=(--cpus-per-task="$CPUS_PER_TASK")
[ -z "${ACCOUNT:-}" ] || args+=(--account="$ACCOUNT")
[ -z "${PARTITION:-}" ] || args+=(--partition="$PARTITION")
[ -z "${QOS:-}" ] || args+=(--qos="$QOS")
# shellcheck disable=SC2206 # split on purpose
[ -z "${SBATCH_EXTRA:-}" ] || args+=($SBATCH_EXTRA)
submit=(sbatch "${args[@]}" "$ZTT_ROOT/launch/slurm/train.sbatch" "$CONFIG" "$@")

if (( DRY_RUN )); then
    echo "# submit (from $(pwd)):"
    printf '%q ' "${submit[@]}"
    echo
    plan=("$PYTHON" "$ZTT_ROOT/launch/slurm/launch_plan.py" dry-run --nodes "$NODES"
          --procs-per-node "$PROCS_PER_NODE")
    [ -z "${NODELIST:-}" ] || plan+=(--nodelist "$NODELIST")
    [ -z "${CPUS_PER_TASK:-}" ] || plan+=(--cpus-per-task "$CPUS_PER_TASK")
    [ -z "${MASTER_PORT:-}" ] || plan+=(--master-port "$MASTER_PORT")
    exec "${plan[@]}" "$CONFIG" "$@" train.load=auto
fi

command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
# Check the configuration now rather than after the job waited in the queue.
PYTHONPATH="$ZTT_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$ZTT_ROOT/launch/slurm/launch_plan.py" \
    run-dir "$CONFIG" "$@" train.load=auto >/dev/null
mkdir -p "$LOG_DIR"
exec "${submit[@]}"
