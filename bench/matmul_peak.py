"""The device's measured dense matmul peak, the denominator of MFU.

    python bench/matmul_peak.py [--size 2048] [--threads 1] [--dtype fp32]

Runs on whatever device megatron_ztt's runtime picks (CUDA if visible, else CPU) and prints
the best FLOP/s over a few repeats as JSON. Training measures the same at start when
``logging.peak_flops_per_device=auto`` on a CPU (``training.metrics.measure_matmul_peak``);
put the number into the config to fix it. ``bench/model_step_time.py`` uses the same function.
"""

import argparse
import json

import torch

from megatron_ztt.parallel import runtime
from megatron_ztt.training.metrics import measure_matmul_peak

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure_peak_flops(size: int = 2048, dtype: str = "fp32", repeats: int = 5) -> float:
    """Best FLOP/s of ``size`` x ``size`` matmuls over ``repeats`` timed rounds of 5."""
    return measure_matmul_peak(size, DTYPES[dtype], repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    best = measure_peak_flops(args.size, args.dtype, args.repeats)
    print(json.dumps({"device": str(runtime.current_device()), "dtype": args.dtype,
                      "size": args.size, "threads": torch.get_num_threads(),
                      "peak_flops": best}))


if __name__ == "__main__":
    main()
