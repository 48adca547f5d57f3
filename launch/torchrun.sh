#!/usr/bin/env bash
# ZTT pretraining on one machine: torchrun starts one process per GPU (NPROC_PER_NODE on CPU).
# The single-machine counterpart of launch/slurm/train.sbatch; see docs/SLURM.md.
#
#   launch/torchrun.sh CONFIG [key=value ...]
#   NPROC_PER_NODE=2 launch/torchrun.sh launch/configs/tiny.yaml data.blend=[...] data.tokenizer=...
#   launch/torchrun.sh --dry-run CONFIG [key=value ...]      # print the command only
#
# Like the SLURM job, it appends train.load=auto: running the same command again resumes from
# the run's latest checkpoint. SIGUSR1 or SIGTERM to this script (or Ctrl-C) makes training
# save a checkpoint and stop: the script passes the signal to torchrun, torchrun to its workers.
# Exit code 0 when training completed or was interrupted and saved (<run.dir>/status.json).
#
#   NPROC_PER_NODE    processes (default: the visible GPUs, else 1)
#   MASTER_PORT       rendezvous port (default: a free one, torchrun --standalone)
#   LOG_DIR           console log, LOG_DIR/torchrun-DATE-TIME.log (default logs)
#   PYTHON            interpreter with the project installed (default: python)
#   SHUTDOWN_TIMEOUT  seconds the workers get to checkpoint after a signal (default 600)
set -euo pipefail

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
[ $# -ge 1 ] || die "usage: [VARIABLE=value ...] launch/torchrun.sh [--dry-run] CONFIG [key=value ...]"
CONFIG=$1
shift
[ -f "$CONFIG" ] || die "config file not found: $CONFIG"
for override in "$@"; do
    [[ "$override" == ?*=* ]] || die "overrides must look like section.key=value, got '$override'"
done

ZTT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PLAN="$ZTT_ROOT/launch/slurm/launch_plan.py"
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || die "python interpreter not found: $PYTHON (set PYTHON)"
export PYTHONPATH="$ZTT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
[[ "$NPROC_PER_NODE" =~ ^[0-9]+$ ]] && (( NPROC_PER_NODE >= 1 )) ||
    die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}
[[ "$SHUTDOWN_TIMEOUT" =~ ^[0-9]+$ ]] || die "SHUTDOWN_TIMEOUT must be a number of seconds"

if [ -n "${MASTER_PORT:-}" ]; then
    [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && (( MASTER_PORT >= 1 && MASTER_PORT <= 65535 )) ||
        die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
    rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$MASTER_PORT" --rdzv-id=local)
else
    rendezvous=(--standalone)
fi
cmd=("$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nnodes=1
     --nproc-per-node="$NPROC_PER_NODE" --max-restarts=0
     --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="$SHUTDOWN_TIMEOUT"
     -m megatron_ztt.train --config "$CONFIG" "$@" train.load=auto)

if (( DRY_RUN )); then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
# config, layout, data and checkpoints are checked now, once (a refusal is one line, not one
# traceback per rank); status.json is found through run.dir
RUN_DIR=$("$PYTHON" "$PLAN" run-dir --world-size "$NPROC_PER_NODE" "$CONFIG" "$@" train.load=auto)
LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
log="$LOG_DIR/torchrun-$(date +%Y%m%d-%H%M%S).log"
echo "torchrun.sh: logging to $log"
exec > >(tee -i -a "$log") 2>&1
printf '%q ' "${cmd[@]}"
echo
rm -f "$RUN_DIR/status.json"  # written afresh by this run
# torchrun gets a session of its own, so that Ctrl-C reaches only this script, which turns it
# into SIGTERM (the training saves on SIGTERM and SIGUSR1, not on SIGINT). SIGUSR1 and SIGTERM
# sent to this script go to torchrun as they are; torchrun passes them to its workers.
setsid "${cmd[@]}" &
pid=$!
trap 'kill -s USR1 "$pid" 2>/dev/null || true' USR1
trap 'kill -s TERM "$pid" 2>/dev/null || true' TERM INT
while :; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break
done
# After passing on a signal torchrun exits 1 even though training saved and stopped cleanly;
# status.json says how training ended.
state=$("$PYTHON" "$PLAN" status "$RUN_DIR")
echo "torchrun.sh: torchrun exited with code $rc, training state $state ($RUN_DIR/status.json)"
case "$state" in
    completed|interrupted) exit 0 ;;
    *) exit $(( rc == 0 ? 1 : rc )) ;;
esac
