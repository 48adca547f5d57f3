"""The device's measured dense matmul peak, the denominator of MFU.

    python bench/matmul_peak.py [--size 2048] [--threads 1] [--dtype fp32]

Runs on whatever device megatron_ztt's runtime picks (CUDA if visible, else CPU) and prints
the best FLOP/s over a few repeats as JSON. Put the number into
``logging.peak_flops_per_device`` of a run config. ``bench/model_step_time.py`` imports
:func:`measure_peak_flops` to compute MFU against the same measurement.
"""

import argparse
import json
import time

import torch

from megatron_ztt.parallel import runtime


def measure_peak_flops(size: int = 2048, dtype: str = "fp32", repeats: int = 5) -> float:
    """Best FLOP/s of ``size`` x ``size`` matmuls over ``repeats`` timed rounds of 5."""
    device = runtime.current_device()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    flops = 2 * size ** 3
    best = 0.0
    for _ in range(repeats + 1):  # the first round warms up
        runtime.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        runtime.synchronize()
        best = max(best, 5 * flops / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
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
