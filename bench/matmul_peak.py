"""The device's measured dense matmul peak, the denominator of MFU.

    python bench/matmul_peak.py [--size 2048] [--threads 1] [--dtype fp32]

Runs on whatever device megatron_ztt's runtime picks (CUDA if visible, else CPU) and prints
the best FLOP/s over a few repeats as JSON. Put the number into
``logging.peak_flops_per_device`` of a run config.
"""

import argparse
import json
import time

import torch

from megatron_ztt.parallel import runtime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runtime.current_device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    a = torch.randn(args.size, args.size, device=device, dtype=dtype)
    b = torch.randn(args.size, args.size, device=device, dtype=dtype)
    flops = 2 * args.size ** 3
    best = 0.0
    for _ in range(args.repeats + 1):
        runtime.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        runtime.synchronize()
        best = max(best, 5 * flops / (time.perf_counter() - start))
    print(json.dumps({"device": str(device), "dtype": args.dtype, "size": args.size,
                      "threads": torch.get_num_threads(), "peak_flops": best}))


if __name__ == "__main__":
    main()
