#!/usr/bin/env bash
# A GPU check in one call (docs/GPU.md):
#
#   bash bench/gpu_check.sh [--out DIR]          # on a node with one CUDA device: < 8 minutes
#   bash bench/gpu_check.sh --cpu [--out DIR]    # the same code on the CPU, at tiny sizes
#
# Parts, each under a hard time limit (timeout; --cpu doubles them):
#   device           the device is there (CUDA), its name
#   tests            the tests marked `cuda` (pytest -m cuda): CPU vs device parity of the model
#                    and its gradients in fp32, bf16 DeepSpeed steps with falling loss, export
#                    parity and generation on the device (ZTT_CHECK_DEVICE=cuda|cpu)
#   throughput_125m  bf16 ZTT vs megatron-core, launch/configs/ztt_125m.yaml's sizes
#   throughput_1b    the same at launch/configs/ztt_1b.yaml's sizes
# then a table and DIR/gpu_check.json. Exit status 0 only if every part passed.
# Environment: PYTHON (default .venv/bin/python, else python3).
set -u -o pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=cuda
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --out) [ $# -ge 2 ] || { echo "error: --out needs a directory" >&2; exit 2; }
               OUT=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-work/gpu_check/$(date +%Y%m%d-%H%M%S)-$MODE}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/parts.tsv" "$OUT/tests.xml" "$OUT/device.txt" "$OUT/gpu_check.json" \
      "$OUT"/throughput_*.json

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for variable in RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT; do unset "$variable"; done

if [ "$MODE" = cpu ] && [ -z "${TORCH_EXTENSIONS_DIR:-}" ]; then
    # On the CPU DeepSpeed compiles its shared-memory communication op on first use, into
    # torch's extensions cache. Checkouts whose Python lives at different paths rebuild each
    # other's copy there; one cache per checkout builds it once.
    export TORCH_EXTENSIONS_DIR="$REPO/work/torch_extensions"
fi

# Time limits in seconds; their sum is the 8 minutes the whole check may take on a GPU node.
# (The tests' DeepSpeed run may first compile DeepSpeed's fused Adam for CUDA: 1-2 minutes.)
SCALE=1; [ "$MODE" = cpu ] && SCALE=2
LIMIT_DEVICE=$((30 * SCALE)) LIMIT_TESTS=$((210 * SCALE))
LIMIT_125M=$((80 * SCALE)) LIMIT_1B=$((160 * SCALE))

FAILED=0
run_part() {  # run_part NAME LIMIT COMMAND...: output to the console and OUT/NAME.log
    local name=$1 limit=$2 start rc seconds
    shift 2
    echo "[gpu_check] $name (limit ${limit} s): $*"
    start=$(date +%s.%N)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >> "$OUT/parts.tsv"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "[gpu_check] $name: over its time limit of ${limit} s"
    fi
    echo "[gpu_check] $name: exit $rc after ${seconds} s (log: $OUT/$name.log)"
    [ "$rc" -eq 0 ] || FAILED=1
}

# The device: on CUDA, fail here (fast, clearly) if none is visible.
run_part device "$LIMIT_DEVICE" env ZTT_DEVICE="$MODE" "$PYTHON" -c "
from megatron_ztt.parallel import runtime
name = runtime.device_name(runtime.current_device())
open('$OUT/device.txt', 'w').write(name + '\n')
print(name)"

if [ "$FAILED" -ne 0 ]; then
    echo "[gpu_check] no device: the other parts are not run"
else
# The test process keeps the CPU as its reference (ZTT_DEVICE=cpu); the checked device comes
# from ZTT_CHECK_DEVICE (tests/check_device.py). Only the files that use the marker are
# collected (importing the whole suite costs seconds).
CUDA_TEST_FILES=$(grep -l "pytest.mark.cuda" tests/test_*.py)
run_part tests "$LIMIT_TESTS" env ZTT_CHECK_DEVICE="$MODE" ZTT_DEVICE=cpu DS_ACCELERATOR=cpu \
    "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rs --durations=5 $CUDA_TEST_FILES \
    --junitxml="$OUT/tests.xml" -o junit_family=xunit2

CPU_FLAG=""; [ "$MODE" = cpu ] && CPU_FLAG=--cpu
run_part throughput_125m "$LIMIT_125M" env ZTT_DEVICE="$MODE" DS_ACCELERATOR="$MODE" \
    "$PYTHON" bench/gpu_check.py throughput --size 125m $CPU_FLAG --out "$OUT/throughput_125m.json"
run_part throughput_1b "$LIMIT_1B" env ZTT_DEVICE="$MODE" DS_ACCELERATOR="$MODE" \
    "$PYTHON" bench/gpu_check.py throughput --size 1b $CPU_FLAG --out "$OUT/throughput_1b.json"
fi

"$PYTHON" bench/gpu_check.py report "$OUT" --mode "$MODE"
REPORT=$?
echo "[gpu_check] results: $OUT/gpu_check.json"
[ "$FAILED" -eq 0 ] && [ "$REPORT" -eq 0 ]
