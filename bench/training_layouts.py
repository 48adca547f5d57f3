"""Training throughput and memory per rank for parallel layouts on CPU.

    python bench/training_layouts.py --data PREFIX --tokenizer TOK.model [--iters 20]

Trains each (model size, layout) for a few steps through the normal entry point
(``torchrun -m megatron_ztt.train``) and reads the run's ``status.json``: median step time,
tokens/s, peak resident memory per rank and optimizer-state bytes per rank. Layouts: DP=1,
DP=2, TP=2, TP=2 with sequence parallelism, PP=2 (the circular pipeline, plus the bubble
implied by its micro-batch and cycle counts), PP=2 x TP=2 with and without sequence
parallelism, and ZeRO stages 0/1/2 at DP=2. Writes a JSON report (and prints a Markdown table).

    python bench/training_layouts.py --activations [--sizes tiny mid]

measures instead the activation memory per rank of one micro batch at TP=2 with and without
``parallel.sequence_parallel`` (two processes, gloo): the peak of live tensor bytes of a
forward + backward of the training model after the weights and gradients exist
(``plan_activation_check.LiveTensorBytes``), beside what ``ztt plan`` predicts.

The data can be the demo's (``work/demo/data/sample`` after ``make demo``) or any prefix
with a matching tokenizer; the model's vocabulary is set from the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_ztt.parallel.circular import bubble_fraction
from megatron_ztt.parallel.runtime import free_port

REPO = Path(__file__).resolve().parent.parent

SIZES = {
    # the demo's model
    "tiny": ["model.hidden_size=128", "model.num_layers=4", "model.num_attention_heads=4",
             "model.num_query_groups=2", "model.seq_length=128", "model.num_cycles=3"],
    # 6x wider per layer, 2x longer sequences
    "mid": ["model.hidden_size=384", "model.num_layers=6", "model.num_attention_heads=6",
            "model.num_query_groups=2", "model.seq_length=256", "model.num_cycles=3",
            "model.exit_loss_weights=[0.1,0.1,1.0]"],
}
LAYOUTS = {
    "DP=1": (1, []),
    "DP=2 ZeRO-1": (2, ["parallel.zero_stage=1"]),
    "TP=2": (2, ["parallel.tensor=2"]),
    "TP=2 SP": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "PP=2": (2, ["parallel.pipeline=2"]),
    "DP=2 ZeRO-0": (2, ["parallel.zero_stage=0", "train.nonfinite_loss=stop"]),
    "DP=2 ZeRO-2": (2, ["parallel.zero_stage=2"]),
    "PP=2 TP=2": (4, ["parallel.pipeline=2", "parallel.tensor=2"]),
    "PP=2 TP=2 SP": (4, ["parallel.pipeline=2", "parallel.tensor=2",
                         "parallel.sequence_parallel=true"]),
}


def vocab_size(tokenizer: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer).vocab_size()


def run(size, layout, args, out_dir: Path) -> dict:
    nproc, overrides = LAYOUTS[layout]
    run_dir = out_dir / f"{size}_{layout.replace(' ', '_').replace('=', '')}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "megatron_ztt.train",
               "--config", str(REPO / "launch" / "configs" / "tiny.yaml"),
               f"run.dir={run_dir}", f"data.blend=[{args.data}]",
               f"data.tokenizer={args.tokenizer}", f"model.vocab_size={vocab_size(args.tokenizer)}",
               f"train.train_iters={args.iters}", "train.micro_batch_size=4",
               f"train.global_batch_size={args.global_batch}", "checkpoint.interval=1000000",
               "checkpoint.save_at_end=false", "eval.interval=1000000", "logging.interval=5",
               *SIZES[size], *overrides]
    env = dict(os.environ, ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS=str(max(1, args.cores // nproc)))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{size} {layout} failed:\n{completed.stderr[-3000:]}")
    status = json.loads((run_dir / "status.json").read_text())
    with open(run_dir / "config.json") as f:
        config = json.load(f)
    seq = config["model"]["seq_length"]
    step = status["train_step_seconds_median"]
    result = {
        "size": size, "layout": layout, "processes": nproc,
        "threads_per_process": int(env["OMP_NUM_THREADS"]),
        "step_seconds_median": step,
        "tokens_per_second": args.global_batch * seq / step,
        "peak_rss_mib_per_rank": [round(b / 2**20) for b in status["peak_memory_bytes_per_rank"]],
        "optimizer_state_mib_per_rank": [round(b / 2**20, 2)
                                         for b in status["optimizer_state_bytes_per_rank"]],
    }
    if layout.startswith("PP=2"):
        # interleaved 1F1B over C virtual stages per rank: (P-1)/(C m + P-1)
        micro_batches = args.global_batch // 4
        cycles = config["model"]["num_cycles"]
        result["pipeline_micro_batches"] = micro_batches
        result["pipeline_bubble_fraction"] = bubble_fraction(2, cycles, micro_batches)
    return result


def _activation_rank(rank, port, overrides, queue):
    """One TP=2 rank: (measured activation peak, planned activation bytes)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ZTT_DEVICE="cpu",
                      DS_ACCELERATOR="cpu")
    import torch

    from plan_activation_check import CONFIG, measure
    from megatron_ztt.parallel import runtime
    from megatron_ztt.training.plan import load_plan_config, plan_layout

    torch.set_num_threads(1)
    config = load_plan_config(str(CONFIG), overrides)
    planned = plan_layout(config, 1, 2).per_rank[0].activation_bytes
    runtime.init_distributed(runtime.ParallelLayout(2, 1), seed=config.train.seed)
    try:
        queue.put((rank, measure(config), planned))
    finally:
        runtime.shutdown_distributed()


def activations(args) -> None:
    """Activation memory per rank at TP=2, sequence parallelism off and on."""
    import torch.multiprocessing as mp

    from plan_activation_check import COMMON, SIZES as CHECK_SIZES

    rows = []
    for size in args.sizes:
        for sequence_parallel in (False, True):
            overrides = COMMON + CHECK_SIZES[size] + [
                "parallel.tensor=2", f"parallel.sequence_parallel={str(sequence_parallel).lower()}"]
            ctx = mp.get_context("spawn")
            queue, port = ctx.Queue(), free_port()
            procs = [ctx.Process(target=_activation_rank, args=(r, port, overrides, queue))
                     for r in range(2)]
            for p in procs:
                p.start()
            got = sorted(queue.get(timeout=1800) for _ in procs)
            for p in procs:
                p.join()
            rows.append({"size": size, "sequence_parallel": sequence_parallel,
                         "overrides": overrides,
                         "measured_bytes_per_rank": [m for _, m, _ in got],
                         "planned_bytes": got[0][2]})
            print(json.dumps(rows[-1]), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "activations.json").write_text(json.dumps({"results": rows}, indent=2))
    print("| size | sequence parallel | measured activation MiB per rank | planned MiB |")
    print("|---|---|---|---|")
    for r in rows:
        measured = ", ".join(f"{b / 2**20:.1f}" for b in r["measured_bytes_per_rank"])
        print(f"| {r['size']} | {'on' if r['sequence_parallel'] else 'off'} | {measured} | "
              f"{r['planned_bytes'] / 2**20:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset prefix (PREFIX.bin/.idx)")
    parser.add_argument("--tokenizer")
    parser.add_argument("--activations", action="store_true",
                        help="measure activation memory per rank at TP=2 with and without "
                             "sequence parallelism instead (no data needed)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--out", default="work/bench/training_layouts")
    args = parser.parse_args()
    if args.activations:
        if args.sizes == list(SIZES):
            args.sizes = ["tiny", "mid"]
        return activations(args)
    if not (args.data and args.tokenizer):
        parser.error("--data and --tokenizer are required (except with --activations)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [run(size, layout, args, out_dir) for size in args.sizes for layout in args.layouts]
    report = {"settings": vars(args), "results": results}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print("| size | layout | step s | tokens/s | peak RSS MiB/rank | optimizer state MiB/rank |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']} | {r['layout']} | {r['step_seconds_median']:.3f} | "
              f"{r['tokens_per_second']:.0f} | {r['peak_rss_mib_per_rank']} | "
              f"{r['optimizer_state_mib_per_rank']} |")
    for r in results:
        if "pipeline_bubble_fraction" in r:
            print(f"{r['size']} PP=2: {r['pipeline_micro_batches']} micro batches per step, "
                  f"bubble (p-1)/(C m+p-1) = {r['pipeline_bubble_fraction']:.3f}")


if __name__ == "__main__":
    main()
