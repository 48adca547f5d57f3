"""Per-rank parameters, optimizer state and speed of the circular pipeline against data
parallelism (and, optionally, the earlier replicated pipeline) at the same process count.

    python bench/pipeline_memory.py --data PREFIX --tokenizer TOK.model \\
        [--sizes L6 L10] [--layouts PP=1 PP=2 PP=4 DP=2 DP=4] [--iters 6] \\
        [--replicated-src DIR]     # a source tree of the replicated design (git archive 13f86a5)

Each (size, layout) trains a few steps through the normal entry point (``torchrun -m
megatron_ztt.train``, fp32, ZeRO-1) and reads ``status.json``: parameters and optimizer-state
bytes per rank, median step time, tokens/s. The pipeline bubble of C virtual stages per rank
and m micro batches is stated as (P-1)/(C m + P-1) ~ (P-1)/(C m) (interleaved 1F1B; plain
1F1B, the replicated design: (P-1)/(m + P-1)). ``--cores`` threads are split over the
processes (one per process when there are more processes than cores). Writes a JSON report and
prints a Markdown table.
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

COMMON = ["model.hidden_size=256", "model.num_attention_heads=4", "model.num_query_groups=2",
          "model.seq_length=128", "model.num_cycles=3", "model.exit_loss_weights=[0.1,0.1,1.0]"]
SIZES = {
    "L6": ["model.num_layers=6", *COMMON],    # 4 middle layers: PP=1, 2, 4 all split them
    "L10": ["model.num_layers=10", *COMMON],  # 8 middle layers
}
LAYOUTS = {  # name -> (processes, overrides)
    "PP=1": (1, []),
    "PP=2": (2, ["parallel.pipeline=2"]),
    "PP=4": (4, ["parallel.pipeline=4"]),
    "DP=2": (2, []),
    "DP=4": (4, []),
    "replicated PP=2": (2, ["parallel.pipeline=2"]),
    "replicated PP=4": (4, ["parallel.pipeline=4"]),
}


def vocab_size(tokenizer: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer).vocab_size()


def run(size: str, layout: str, args, out_dir: Path) -> dict:
    nproc, overrides = LAYOUTS[layout]
    replicated = layout.startswith("replicated")
    if replicated and not args.replicated_src:
        raise SystemExit(f"{layout} needs --replicated-src")
    source = Path(args.replicated_src).resolve() if replicated else REPO
    run_dir = (out_dir / f"{size}_{layout.replace(' ', '_').replace('=', '')}").resolve()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "megatron_ztt.train",
               "--config", str(source / "launch" / "configs" / "tiny.yaml"),
               f"run.dir={run_dir}", f"data.blend=[{os.path.abspath(args.data)}]",
               f"data.tokenizer={os.path.abspath(args.tokenizer)}",
               f"model.vocab_size={vocab_size(args.tokenizer)}",
               f"train.train_iters={args.iters}", f"train.micro_batch_size={args.micro_batch}",
               f"train.global_batch_size={args.global_batch}", "parallel.zero_stage=1",
               "checkpoint.interval=1000000", "checkpoint.save_at_end=false",
               "eval.interval=1000000", f"logging.interval={args.iters}",
               *SIZES[size], *overrides]
    env = dict(os.environ, ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu", PYTHONPATH=str(source),
               OMP_NUM_THREADS=str(max(1, args.cores // nproc)))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=source)
    if completed.returncode != 0:
        raise RuntimeError(f"{size} {layout} failed:\n{completed.stderr[-3000:]}")
    status = json.loads((run_dir / "status.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    model = config["model"]
    step = status["train_step_seconds_median"]
    optimizer = status["optimizer_state_bytes_per_rank"]
    # fp32 ZeRO-1 without data parallelism keeps 12 bytes per parameter (master copy + 2 Adam
    # moments); the replicated design's status.json has no parameter count
    parameters = status.get("parameters_per_rank") or [b // 12 for b in optimizer]
    result = {
        "size": size, "layout": layout, "processes": nproc,
        "threads_per_process": int(env["OMP_NUM_THREADS"]),
        "step_seconds_median": step,
        "tokens_per_second": args.global_batch * model["seq_length"] / step,
        "parameters_per_rank": parameters,
        "optimizer_state_mib_per_rank": [round(b / 2**20, 2) for b in optimizer],
        "peak_rss_mib_per_rank": [round(b / 2**20) for b in status["peak_memory_bytes_per_rank"]],
    }
    pipeline = dict(overrides and [o.split("=") for o in overrides]).get("parallel.pipeline")
    if pipeline:
        p = int(pipeline)
        micro_batches = args.global_batch // args.micro_batch
        cycles = model["num_cycles"]
        result["micro_batches"] = micro_batches
        # interleaved 1F1B over C virtual stages per rank; the replicated design is plain
        # 1F1B over one stage per rank
        result["bubble"] = bubble_fraction(p, 1 if replicated else cycles, micro_batches)
        result["bubble_formula"] = ("(P-1)/(m+P-1)" if replicated else
                                    "(P-1)/(C m + P-1), i.e. about (P-1)/(C m)")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset prefix (PREFIX.bin/.idx)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    parser.add_argument("--layouts", nargs="*", default=["PP=1", "PP=2", "PP=4", "DP=2", "DP=4"])
    parser.add_argument("--replicated-src", default=None,
                        help="source tree of the replicated pipeline, for its layouts")
    parser.add_argument("--out", default="work/bench/pipeline_memory")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        for layout in args.layouts:
            results.append(run(size, layout, args, out_dir))
            print(json.dumps(results[-1]), flush=True)
            (out_dir / "report.json").write_text(json.dumps(
                {"settings": vars(args), "results": results}, indent=2))
    print("| size | layout | parameters per rank | optimizer state MiB per rank | step s | "
          "tokens/s | bubble |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        bubble = f"{r['bubble']:.3f} (m={r['micro_batches']})" if "bubble" in r else "-"
        print(f"| {r['size']} | {r['layout']} | "
              f"{', '.join(f'{p:,}' for p in r['parameters_per_rank'])} | "
              f"{', '.join(str(b) for b in r['optimizer_state_mib_per_rank'])} | "
              f"{r['step_seconds_median']:.3f} | {r['tokens_per_second']:.0f} | {bubble} |")


if __name__ == "__main__":
    main()
