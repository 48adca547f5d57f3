#!/usr/bin/env bash
# A GPU check in one call (docs/GPU.md):
#
#   bash bench/gpu_check.sh [--out DIR]          # on a node with one CUDA device: < 8 minutes
#   bash bench/gpu_check.sh --cpu [--out DIR]    # the same code on the CPU, at tiny sizes
#   bash bench/gpu_check.sh --wheels DIR         # in a GPU image without internet: first installs
#                    the wheel folder of bench/gpu_wheels.sh into work/gpu_check/wheels_site
#                    (pip --no-index --no-deps --target), runs with the image's python3 and torch
#
# Parts, each under a hard time limit (timeout; --cpu doubles them):
#   install          (--wheels) the folder's wheels, then the versions the check runs with
#   device           the device is there (CUDA), its name
#   tests            the tests marked `cuda` (pytest -m cuda): CPU vs device parity of the model
#                    and its gradients in fp32, bf16 DeepSpeed steps with falling loss, export
#                    parity and generation on the device (ZTT_CHECK_DEVICE=cuda|cpu)
#   throughput_125m  bf16 ZTT vs megatron-core, launch/configs/ztt_125m.yaml's sizes
#   throughput_1b    the same at launch/configs/ztt_1b.yaml's sizes
# then a table and DIR/gpu_check.json. Exit status 0 only if every part passed.
# Environment: PYTHON (default .venv/bin/python, else python3; with --wheels python3).
set -u -o pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=cuda
OUT=""
WHEELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --out) [ $# -ge 2 ] || { echo "error: --out needs a directory" >&2; exit 2; }
               OUT=$2; shift ;;
        --wheels) [ $# -ge 2 ] || { echo "error: --wheels needs the folder of bench/gpu_wheels.sh" >&2; exit 2; }
                  WHEELS=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] && WHEELS=$(cd "$WHEELS" && pwd)
    if [ ! -f "$WHEELS/target.json" ] || ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        echo "error: --wheels $WHEELS: not a folder made by bench/gpu_wheels.sh (no target.json or no wheels)" >&2
        exit 2
    fi
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
if [ -z "${PYTHON:-}" ]; then
    if [ -z "$WHEELS" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -n "$WHEELS" ]; then
    # The folder's Python must be this one (its compiled wheels are for one version).
    WANTED=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['python_version'])" "$WHEELS/target.json") || exit 2
    HAVE=$("$PYTHON" -c "import sys; print('%d.%d' % sys.version_info[:2])") || exit 2
    if [ "$WANTED" != "$HAVE" ]; then
        echo "error: --wheels $WHEELS holds wheels for Python $WANTED, but $PYTHON is Python $HAVE: rebuild it with bench/gpu_wheels.sh --python-version $HAVE" >&2
        exit 2
    fi
fi
OUT=${OUT:-work/gpu_check/$(date +%Y%m%d-%H%M%S)-$MODE}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/parts.tsv" "$OUT/tests.xml" "$OUT/device.txt" "$OUT/gpu_check.json" "$OUT/versions.json" \
      "$OUT"/throughput_*.json

# --wheels: installed afresh at every start, at one path per checkout (not a new temporary one),
# so that DeepSpeed's ops compiled on first use (torch's cache of them is keyed by the paths of
# DeepSpeed's sources) are compiled once, not at every run. One check at a time per checkout.
SITE=$REPO/work/gpu_check/wheels_site
if [ -n "$WHEELS" ]; then
    export PATH="$SITE/bin:$PATH"  # ninja (DeepSpeed's op builds), deepspeed, ztt
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for variable in RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT; do unset "$variable"; done

if [ "$MODE" = cpu ] && [ -z "${TORCH_EXTENSIONS_DIR:-}" ]; then
    # On the CPU DeepSpeed compiles its shared-memory communication op on first use, into
    # torch's extensions cache. Checkouts whose Python lives at different paths rebuild each
    # other's copy there; one cache per checkout builds it once.
    export TORCH_EXTENSIONS_DIR="$REPO/work/torch_extensions"
    # another Python (the image's) with its own torch: its own cache
    [ -n "$WHEELS" ] && export TORCH_EXTENSIONS_DIR="$REPO/work/gpu_check/torch_extensions_wheels"
fi

# Time limits in seconds; their sum is the 8 minutes the whole check may take on a GPU node.
# (The tests' DeepSpeed run may first compile DeepSpeed's fused Adam for CUDA: 1-2 minutes.)
SCALE=1; [ "$MODE" = cpu ] && SCALE=2
LIMIT_INSTALL=$((30 * SCALE)) LIMIT_DEVICE=$((30 * SCALE)) LIMIT_TESTS=$((210 * SCALE))
LIMIT_125M=$((70 * SCALE)) LIMIT_1B=$((140 * SCALE))

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

if [ -n "$WHEELS" ]; then
    rm -rf "$SITE"
    run_part install "$LIMIT_INSTALL" "$PYTHON" -m pip install --no-index --no-deps --quiet \
        --no-compile --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl
    # DeepSpeed's ops compiled on first use are rebuilt (ninja) when their sources look newer
    # than the objects: a fixed old time on the C++/CUDA sources keeps a cached build valid.
    find "$SITE" -type f \( -name '*.c' -o -name '*.cc' -o -name '*.cpp' -o -name '*.cu' \
        -o -name '*.h' -o -name '*.hpp' -o -name '*.cuh' \) -exec touch -d @946684800 {} +
fi
"$PYTHON" bench/gpu_check.py versions --out "$OUT/versions.json" ${WHEELS:+--wheels-site "$SITE"}

# The device: on CUDA, fail here (fast, clearly) if none is visible.
[ "$FAILED" -eq 0 ] && run_part device "$LIMIT_DEVICE" env ZTT_DEVICE="$MODE" "$PYTHON" -c "
from megatron_ztt.parallel import runtime
name = runtime.device_name(runtime.current_device())
open('$OUT/device.txt', 'w').write(name + '\n')
print(name)"

if [ "$FAILED" -ne 0 ]; then
    echo "[gpu_check] no device or no install: the other parts are not run"
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

"$PYTHON" bench/gpu_check.py report "$OUT" --mode "$MODE" ${WHEELS:+--wheels}
REPORT=$?
echo "[gpu_check] results: $OUT/gpu_check.json"
[ "$FAILED" -eq 0 ] && [ "$REPORT" -eq 0 ]
