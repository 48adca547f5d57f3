"""Evaluation speed of the training model with per-token early exit against full depth.

    OMP_NUM_THREADS=1 python bench/eval_exit_throughput.py [--hidden 256 --seq 256 --batch 8]
        [--json docs/results/exit_compute_eval.json]
    OMP_NUM_THREADS=1 python bench/eval_exit_throughput.py --pipeline 2 [--micro-batches 4]

``--pipeline 2``: the same runs through the circular pipeline at PP=2 (two gloo processes on
this machine, ``evaluation_schedule`` as validation runs it, the same weights and threshold),
reporting each rank's compute time: the time spent inside its virtual stages (the layer
applications, the gate, the exit decisions), which leaves out the waits for the other rank.

``ZTTModel.forward(ids, labels, exit_threshold=t)`` in eval mode without statistics, as
``ztt eval`` and validation run it. A token that leaves after cycle c is not computed in the
later cycles (the engine gathers the tokens still cycling); the row "compute everything"
is the engine's ``compute_exited`` reference (every token computed, the ones that left
overwritten), which must give the same logits.

The model has random weights of std ``--init-std`` (default 0.1) and zero keys of std
``--zero-key-std`` (default 3) instead of a fresh model's 0.02, so that the zero attention
varies from token to token as in a trained model (in a fresh model it mostly falls with the
position, as 1 / number of keys). The threshold is
the ``--quantile`` of the measured cycle-1 exit signal over all tokens (median: about half
of the tokens leave after cycle 1). Reported: tokens/s from the median wall time and from
the median CPU time of this process (a shared machine disturbs the latter less), the mean
cycles used and the largest logit difference against the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("ZTT_DEVICE", "cpu")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    parser.add_argument("--layers", type=int, default=4, help="distinct ZTT layers L")
    parser.add_argument("--cycles", type=int, default=3, help="ZTT cycles C")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--init-std", type=float, default=0.1, help="std of the random weights")
    parser.add_argument("--zero-key-std", type=float, default=3.0)
    parser.add_argument("--quantile", type=float, default=0.5,
                        help="threshold = this quantile of the cycle-1 exit signal")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--pipeline", type=int, default=1, choices=(1, 2),
                        help="2: through the circular pipeline, per-rank compute time")
    parser.add_argument("--micro-batches", type=int, default=4, help="with --pipeline 2")
    return parser.parse_args(argv)


def cycle_one_signals(model, ids, labels):
    """Every token's cycle-1 exit signal (a threshold that never fires)."""
    seen = []
    original = model.engine.exit_signal
    model.engine.exit_signal = lambda *args: seen.append(original(*args)) or seen[-1]
    try:
        model(ids, labels, exit_threshold=math.inf, collect_stats=False)
    finally:
        del model.engine.exit_signal
    return seen[0].flatten()


def host_syncs(call) -> int:
    """Reads of a device value on the host during ``call()`` (aten._local_scalar_dense)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            count[0] += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    with Count():
        call()
    return count[0]


def main(argv=None):
    args = parse_args(argv)
    from megatron_ztt.model.config import ZTTConfig
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel import runtime

    runtime.init_distributed(seed=1234)
    config = ZTTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                       num_cycles=args.cycles, seq_length=args.seq, cycle_mode="head_tail",
                       zero_token=True, gate=True, make_vocab_size_divisible_by=64,
                       init_std=args.init_std)
    model = ZTTModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key in model.zero_token_pool.keys.values():
            key.copy_(torch.randn(key.shape, generator=generator) * args.zero_key_std)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
    ids, labels = tokens[:, :-1], tokens[:, 1:]

    with torch.no_grad():
        signals = cycle_one_signals(model, ids, labels)
        threshold = float(torch.quantile(signals.float(), args.quantile))

    runs = {  # name -> (exit threshold, compute the tokens that left too)
        "full depth": (None, False),
        "exit check, never exits (threshold 1.01)": (1.01, False),
        f"per token, threshold q{args.quantile:g} = {threshold:.4f}": (threshold, False),
        f"per token, threshold q{args.quantile:g}, compute everything (reference)":
            (threshold, True),
    }
    if args.pipeline == 2:
        from megatron_ztt.parallel.sharding import gather_full_state_dict

        state = gather_full_state_dict(model)
        runtime.shutdown_distributed()
        return pipeline_main(args, config, state, ids, runs, threshold)

    def forward(options):
        threshold, compute_exited = options
        model.engine.compute_exited = compute_exited
        try:
            return model(ids, labels, exit_threshold=threshold, collect_stats=False,
                         return_logits=True)
        finally:
            model.engine.compute_exited = False

    times = {name: [] for name in runs}
    outputs, syncs = {}, {}
    with torch.no_grad():
        for name, options in runs.items():  # warm-up, and the outputs compared
            outputs[name] = forward(options)
            syncs[name] = host_syncs(lambda: forward(options))
        for _ in range(args.repeats):
            for name, options in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                forward(options)
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))

    names = list(runs)
    skipped, reference = outputs[names[2]], outputs[names[3]]
    same_exits = bool(torch.equal(skipped.cycles_used, reference.cycles_used))
    logit_diff = float((skipped.logits - reference.logits).abs().max())
    count = ids.numel()
    base_wall = statistics.median(w for w, _ in times[names[0]])
    base_cpu = statistics.median(c for _, c in times[names[0]])
    print(f"d={args.hidden} heads={args.heads} L={args.layers} C={args.cycles} vocab={args.vocab} "
          f"batch {args.batch} x seq {args.seq}, weights std {args.init_std}, zero keys std "
          f"{args.zero_key_std}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'run':62s} {'tok/s':>8s} {'vs full':>7s} {'tok/s CPU':>9s} {'vs full':>7s} "
          f"{'cycles':>6s} {'left c1':>7s} {'syncs':>5s}")
    results = []
    for name in names:
        wall = statistics.median(w for w, _ in times[name])
        cpu = statistics.median(c for _, c in times[name])
        used = outputs[name].cycles_used.float()
        row = dict(run=name, tokens_per_s=round(count / wall, 1),
                   speed_vs_full=round(base_wall / wall, 3),
                   tokens_per_cpu_s=round(count / cpu, 1),
                   cpu_speed_vs_full=round(base_cpu / cpu, 3),
                   mean_cycles=round(float(used.mean()), 3),
                   left_after_cycle_1=round(float((used == 1).float().mean()), 3),
                   host_syncs_per_forward=syncs[name])
        results.append(row)
        print(f"{name:62s} {row['tokens_per_s']:8.0f} {row['speed_vs_full']:6.2f}x "
              f"{row['tokens_per_cpu_s']:9.0f} {row['cpu_speed_vs_full']:6.2f}x "
              f"{row['mean_cycles']:6.2f} {row['left_after_cycle_1']:7.2f} {syncs[name]:5d}")
    print(f"skipped vs reference: same exits {same_exits}, max |logit diff| {logit_diff:.2e}")
    report = dict(args={k: str(v) for k, v in vars(args).items()}, threshold=threshold,
                  load_average=os.getloadavg()[0],
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                  same_exits_as_reference=same_exits, max_logit_diff_vs_reference=logit_diff,
                  results=results)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    runtime.shutdown_distributed()
    return report


# --------------------------------------------------------------------------- --pipeline 2
def _ring_worker(rank, port, config, state, ids, runs, repeats, micro_batches, queue):
    """Rank ``rank`` of the PP=2 ring: the runs interleaved ``repeats`` times; per run the
    seconds spent inside this rank's virtual stages (and the cycles used, last rank)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ZTT_DEVICE="cpu",
                      DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from megatron_ztt.parallel import runtime
    from megatron_ztt.parallel.circular import CircularStage, evaluation_schedule
    from megatron_ztt.parallel.sharding import load_full_state_dict

    runtime.init_distributed(runtime.ParallelLayout(1, 2), seed=1234)
    try:
        module = CircularStage(config, rank, 2).eval()
        load_full_state_dict(module, state, strict=False)
        spent = [0.0]
        stage = module.run_virtual_stage

        def timed_stage(cycle, inputs):
            start = time.perf_counter()
            try:
                return stage(cycle, inputs)
            finally:
                spent[0] += time.perf_counter() - start

        module.run_virtual_stage = timed_stage
        micro_batch = ids.shape[0] // micro_batches
        schedules = {exits: evaluation_schedule(module, micro_batches, micro_batch,
                                                lambda output, target: output[0].sum() * 0,
                                                runtime.current_device(), exits)
                     for exits in (False, True)}
        times = {name: [] for name in runs}
        cycles = {}
        with torch.no_grad():
            for repeat in range(repeats + 1):  # the first round warms up
                for name, (threshold, compute_exited) in runs.items():
                    module.start_evaluation(threshold)
                    module.engine.compute_exited = compute_exited
                    spent[0], wall = 0.0, time.perf_counter()
                    schedules[threshold is not None].eval(
                        *((ids,) if rank == 0 else ()), target=torch.arange(micro_batches),
                        return_outputs=False)
                    if repeat:
                        times[name].append((spent[0], time.perf_counter() - wall))
                    if module.is_last and threshold is not None:
                        cycles[name] = torch.cat(module.cycles_used).float()
        queue.put((rank, times, cycles))
    finally:
        runtime.shutdown_distributed()


def pipeline_main(args, config, state, ids, runs, threshold):
    import torch.multiprocessing as mp

    from megatron_ztt.parallel.runtime import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_ring_worker, args=(r, port, config, state, ids, runs,
                                                         args.repeats, args.micro_batches, queue))
             for r in range(2)]
    for proc in procs:
        proc.start()
    per_rank = {}
    for _ in procs:
        rank, times, cycles = queue.get(timeout=1800)
        per_rank[rank] = (times, cycles)
    for proc in procs:
        proc.join()
    names = list(runs)
    print(f"circular pipeline PP=2, {args.micro_batches} micro batches; d={args.hidden} "
          f"heads={args.heads} L={args.layers} C={args.cycles} vocab={args.vocab} batch "
          f"{args.batch} x seq {args.seq}, threshold {threshold:.4f}, median of {args.repeats}, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"{'run':62s} {'rank 0 ms':>9s} {'vs full':>7s} {'rank 1 ms':>9s} {'vs full':>7s} "
          f"{'wall ms':>8s} {'vs full':>7s} {'cycles':>6s}")
    results = []
    cycles = per_rank[1][1]

    def median_ms(rank, name, which):
        return 1e3 * statistics.median(t[which] for t in per_rank[rank][0][name])

    for name in names:
        row = dict(run=name)
        for rank in (0, 1):
            ms = median_ms(rank, name, 0)
            row[f"rank{rank}_compute_ms"] = round(ms, 1)
            row[f"rank{rank}_speed_vs_full"] = round(median_ms(rank, names[0], 0) / ms, 3)
        wall = median_ms(1, name, 1)
        row["wall_ms"] = round(wall, 1)
        row["wall_speed_vs_full"] = round(median_ms(1, names[0], 1) / wall, 3)
        row["mean_cycles"] = round(float(cycles[name].mean()), 3) if name in cycles else 3.0
        results.append(row)
        print(f"{name:62s} {row['rank0_compute_ms']:9.1f} {row['rank0_speed_vs_full']:6.2f}x "
              f"{row['rank1_compute_ms']:9.1f} {row['rank1_speed_vs_full']:6.2f}x "
              f"{wall:8.1f} {row['wall_speed_vs_full']:6.2f}x {row['mean_cycles']:6.2f}")
    report = dict(args={k: str(v) for k, v in vars(args).items()}, threshold=threshold,
                  load_average=os.getloadavg()[0], results=results)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
