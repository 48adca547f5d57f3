"""Checkpoint size and the training stall per save, with checkpoint.async_save off and on;
with ``--save-memory``, the host memory a save takes on each rank under ZeRO-1 and ZeRO-3.

    python bench/checkpoint_save.py --data work/demo/data/sample --tokenizer work/demo/tokenizer.model \
        [--rounds 3] [--iters 8] [--interval 2] [--nproc 2] [--work work/bench_checkpoint]
    python bench/checkpoint_save.py --save-memory --data ... --tokenizer ... [--hidden 512]

Runs launch/configs/tiny.yaml (the demo's model, DP=2 ZeRO-1, fp32) under torchrun, rounds of
one synchronous and one asynchronous run interleaved; every run saves every ``--interval``
steps. Prints each mode's median stall per save (the time ``ckpt.save`` keeps training
waiting, from status.json) and the size of one checkpoint folder by kind of file.

``--save-memory`` trains the tiny config widened to ``--hidden`` for 2 steps and saves once
(synchronously), under ZeRO-1 and ZeRO-3 in turn (``--rounds`` rounds interleaved). Each rank
wraps the save: it resets the kernel's peak resident set size of the process (``VmHWM``,
``echo 5 > /proc/self/clear_refs``, Linux) right before and reads it right after, so the
number is the save's own peak over the resident memory before it (first trimmed to the live
memory with glibc's ``malloc_trim``) (host RSS; on CPU torch
keeps no allocator statistics, and a save copies to host memory on any device).
"""

from __future__ import annotations

import argparse
import ctypes
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


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (the memory bench needs Linux)")


def memory_worker(args) -> None:
    """One rank of a --save-memory run (under torchrun): train, measuring each save."""
    from megatron_ztt.config import load_config
    from megatron_ztt.training import checkpoint as ckpt
    from megatron_ztt.training.train import train

    measured = []
    original = ckpt.save

    libc = ctypes.CDLL("libc.so.6")

    def save_measured(*a, **kw):
        # memory freed by training but still resident would take the save's copies unseen:
        # hand it back to the system first (glibc), so that RSS is the live memory
        libc.malloc_trim(0)
        rss_before = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current RSS
        tag_dir = original(*a, **kw)
        measured.append({"rss_before_kib": rss_before, "peak_kib": _proc_status_kib("VmHWM")})
        return tag_dir

    ckpt.save = save_measured
    train(load_config(str(REPO / "launch/configs/tiny.yaml"), args.overrides))
    rank = int(os.environ["RANK"])
    Path(args.memory_out, f"rank{rank}.json").write_text(json.dumps(measured))


def memory_run(args, zero_stage: int, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    out = run_dir / "memory"
    out.mkdir(parents=True)
    env = dict(os.environ, ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    heads = max(4, args.hidden // 64)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
               f"--master-port={args.port}", __file__, "--memory-worker",
               "--memory-out", str(out), "--data", args.data, "--tokenizer", args.tokenizer,
               f"run.dir={run_dir}", f"data.blend=[{args.data}]",
               f"data.tokenizer={args.tokenizer}", f"model.hidden_size={args.hidden}",
               f"model.num_attention_heads={heads}", f"model.num_query_groups={heads // 2}",
               f"parallel.zero_stage={zero_stage}", "train.train_iters=2",
               "train.global_batch_size=8", "checkpoint.interval=2",
               "checkpoint.async_save=false", "eval.iters=0", "logging.tensorboard=false"]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    ranks = [json.loads((out / f"rank{r}.json").read_text())[-1] for r in range(args.nproc)]
    tag_dir = run_dir / "checkpoints" / "iter_0000002"
    return {"save_peak_over_rss_mib": [round((r["peak_kib"] - r["rss_before_kib"]) / 1024, 1)
                                       for r in ranks],
            "rss_before_mib": [round(r["rss_before_kib"] / 1024, 1) for r in ranks],
            "checkpoint_bytes": folder_sizes(tag_dir)}


def save_memory(args) -> None:
    work = Path(args.work)
    results = {1: [], 3: []}
    for _ in range(args.rounds):
        for stage in results:
            results[stage].append(memory_run(args, stage, work / f"memory_zero{stage}"))
    report = {}
    for stage, runs in results.items():
        sizes = runs[-1]["checkpoint_bytes"]
        state_mib = (sizes.get("ztt", 0) + sizes.get("optim", 0)) / 2**20
        peaks = [max(r["save_peak_over_rss_mib"][rank] for r in runs)
                 for rank in range(args.nproc)]
        report[f"zero{stage}"] = {
            "save_peak_over_rss_mib_per_rank (max over rounds)": peaks,
            "per_round": [r["save_peak_over_rss_mib"] for r in runs],
            "rss_before_save_mib_per_rank": runs[-1]["rss_before_mib"],
            "weights_and_optimizer_state_on_disk_mib": round(state_mib, 1)}
    print(json.dumps(report, indent=2))


def main() -> None:
    if "--memory-worker" in sys.argv:  # one rank of a --save-memory run
        worker = argparse.ArgumentParser()
        worker.add_argument("--memory-worker", action="store_true")
        worker.add_argument("--memory-out", required=True)
        worker.add_argument("--data")
        worker.add_argument("--tokenizer")
        worker.add_argument("overrides", nargs="*")
        memory_worker(worker.parse_args())
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--work", default=str(REPO / "work" / "bench_checkpoint"))
    parser.add_argument("--save-memory", action="store_true",
                        help="measure a save's peak host memory per rank, ZeRO-1 vs ZeRO-3")
    parser.add_argument("--hidden", type=int, default=512,
                        help="--save-memory: the model's hidden size")
    args = parser.parse_args()
    if args.save_memory:
        save_memory(args)
        return
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
