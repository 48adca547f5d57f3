"""Checkpoint size and the training stall per save, with checkpoint.async_save off and on.

    python bench/checkpoint_save.py --data work/demo/data/sample --tokenizer work/demo/tokenizer.model \
        [--rounds 3] [--iters 8] [--interval 2] [--nproc 2] [--work work/bench_checkpoint]

Runs launch/configs/tiny.yaml (the demo's model, DP=2 ZeRO-1, fp32) under torchrun, rounds of
one synchronous and one asynchronous run interleaved; every run saves every ``--interval``
steps. Prints each mode's median stall per save (the time ``ckpt.save`` keeps training
waiting, from status.json) and the size of one checkpoint folder by kind of file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args, run_dir: Path, async_save: bool) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
               f"--master-port={args.port}",
               "-m", "megatron_ztt.train", "--config", str(REPO / "launch/configs/tiny.yaml"),
               f"run.dir={run_dir}", f"data.blend=[{args.data}]",
               f"data.tokenizer={args.tokenizer}", f"train.train_iters={args.iters}",
               f"checkpoint.interval={args.interval}", f"checkpoint.keep_last={args.iters}",
               f"checkpoint.async_save={str(async_save).lower()}", "eval.iters=0",
               "logging.tensorboard=false"]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "status.json").read_text())


def folder_sizes(tag_dir: Path) -> dict:
    sizes = {}
    for path in tag_dir.rglob("*"):
        if path.is_file():
            kind = path.name.split("_")[0] if path.suffix == ".pt" else path.name
            sizes[kind] = sizes.get(kind, 0) + path.stat().st_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--work", default=str(REPO / "work" / "bench_checkpoint"))
    args = parser.parse_args()
    work = Path(args.work)
    stalls = {False: [], True: []}
    for _ in range(args.rounds):
        for async_save in (False, True):
            status = run(args, work / f"async_{async_save}", async_save)
            stalls[async_save] += status["checkpoint_stall_seconds"]
    tag_dir = work / "async_False" / "checkpoints" / f"iter_{args.iters:07d}"
    sizes = folder_sizes(tag_dir)
    off, on = statistics.median(stalls[False]), statistics.median(stalls[True])
    print(json.dumps({"stall_seconds_median": {"sync": off, "async": on},
                      "saves_per_mode": len(stalls[False]),
                      "stall_ratio_async_over_sync": round(on / off, 3),
                      "checkpoint_bytes": sum(sizes.values()), "bytes_by_file": sizes},
                     indent=2))


if __name__ == "__main__":
    main()
