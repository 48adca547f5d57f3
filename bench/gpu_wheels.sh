#!/usr/bin/env bash
# The wheel folder for a GPU node without internet (docs/GPU.md). Run where PyPI is reachable:
#
#   bash bench/gpu_wheels.sh [--python-version 3.12] [--out DIR]      # default work/gpu_wheels
#   bash bench/gpu_wheels.sh --image-freeze image.txt                 # your image's exact list
#
# It holds every wheel the project needs that the GPU image lacks (bench/gpu_image.txt, or the
# output of `python3 -m pip list --format=freeze` in your image), resolved against what the
# image has, for CPython 3.12 (or --python-version) on manylinux x86-64, DeepSpeed built here
# without compiled ops, and the project's own wheel; it prints its contents and total size
# (at most --max-mib, 48 MiB). Then, on the node: bash bench/gpu_check.sh --wheels DIR
# Options: --image FILE, --glibc 2.28, --max-mib N (0: no limit); bench/gpu_wheels.py --help.
# Environment: PYTHON (default .venv/bin/python, else python3), which needs pip.
set -u -o pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" "$REPO/bench/gpu_wheels.py" "$@"
