"""Forward+backward step time, tokens/s and MFU: ZTT (L layers, C cycles: 2 + C(L-2) layer
applications) against a plain megatron-core transformer with as many layers as ZTT has layer
applications, the same width, in one process, timed in turn.

    python bench/model_step_time.py [--hidden 256 --seq 256 --batch 4 --steps 10]
    python bench/model_step_time.py --preset results --out docs/results/training_speed.json

The baseline is megatron-core's ``TransformerBlock`` (local layer spec, SDPA causal core
attention: megatron-core's own attention kernel needs CUDA) between the same embedding and
output layer. Also timed: head-tail cycling without zero tokens, ZTT with the forward
statistics (what a logging step collects), ZTT with per-cycle exit losses (what
``launch/configs/results`` trains), and this project's model in vanilla mode with the same
number of layers (the cost of the wrapper alone).

Each round times every model for ``--steps`` steps after ``--warmup``, and measures the matmul
peak (``bench/matmul_peak.py``) between models, so that load from other jobs hits all of them
alike; medians are reported. MFU = model FLOPs per step (``model_flops_per_token``, forward +
backward, full attention) / step time / the best measured peak. The step here is forward +
backward + zeroing the gradients: no optimizer, no data loading, one process.
Prints a JSON report; ``ratio`` = ZTT median step time / baseline's; ``exit_losses_ratio`` =
ZTT with exit losses / ZTT without (``exit_losses_cpu_ratio``: the same in the process's CPU
time per step, the reading to trust on a loaded machine; ``exit_losses_flop_ratio``: the same
in model FLOPs, the floor of that ratio at equal efficiency). ``--preset deep`` is the default width with 12
distinct layers, where the exit heads are a smaller share of the step.
``--exit-loss-fraction F`` (< 1) trains the exit-loss model with ``model.exit_loss_fraction=F``
and also times the same exit losses on every position (``exit_losses_all_positions_ratio``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from matmul_peak import measure_peak_flops
from megatron_ztt.parallel import runtime

PRESETS = {
    # the model of launch/configs/results/base.yaml, one data-parallel rank's micro batch
    "results": dict(hidden=128, heads=4, query_groups=2, seq=128, batch=8, vocab=2048,
                    layers=4, cycles=3, exit_loss_weights=[0.3, 0.3, 1.0]),
    # the default sizes, 12 distinct layers: exit heads cost less against a deeper model
    # (FLOP ratio with/without exit losses 1.20 here, 1.47 at "results")
    "deep": dict(hidden=256, heads=4, query_groups=2, seq=256, batch=2, vocab=8192,
                 layers=12, cycles=3, exit_loss_weights=[0.3, 0.3, 1.0]),
}


class PlainMegatronTransformer(torch.nn.Module):
    """megatron-core's ``TransformerBlock`` of ``config.num_layers`` layers (local spec, SDPA
    causal core attention) between this project's embedding and output layer; ``config`` is a
    ``cycle_mode="vanilla"`` ZTTConfig. forward(ids, labels) -> loss."""

    def __init__(self, config):
        from megatron.core.transformer.transformer_block import TransformerBlock

        from megatron_ztt.model.layers import (OutputHead, TokenEmbedding, layer_spec,
                                               transformer_config)

        super().__init__()
        self.config = config
        self.embedding = TokenEmbedding(config)
        self.block = TransformerBlock(transformer_config(config), layer_spec(config),
                                      post_layer_norm=False)
        self.output_head = OutputHead(config)

    def forward(self, ids, labels):
        from megatron_ztt.model.layers import rotary_embedding

        rope = rotary_embedding(self.config, ids.shape[1], ids.device)
        hidden = self.block(self.embedding(ids), attention_mask=None, rotary_pos_emb=rope)
        weight = self.embedding.weight if self.config.tie_embeddings else None
        return self.output_head.loss(hidden, labels, embedding_weight=weight)


def build_models(args):
    from megatron_ztt.model.config import ZTTConfig
    from megatron_ztt.model.ztt import ZTTModel

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads,
                  num_query_groups=args.query_groups, seq_length=args.seq,
                  make_vocab_size_divisible_by=64)
    L, C = args.layers, args.cycles
    configs = {
        f"ztt_L{L}_C{C}": ZTTConfig(num_layers=L, num_cycles=C, cycle_mode="head_tail",
                                    zero_token=True, gate=True, **common),
        f"head_tail_L{L}_C{C}": ZTTConfig(num_layers=L, num_cycles=C, cycle_mode="head_tail",
                                          zero_token=False, gate=False, **common),
    }
    applications = configs[f"ztt_L{L}_C{C}"].num_applications
    plain_config = ZTTConfig(num_layers=applications, num_cycles=1, cycle_mode="vanilla",
                             zero_token=False, gate=False, **common)
    configs[f"megatron_{applications}_layers"] = plain_config
    configs[f"ztt_vanilla_{applications}_layers"] = plain_config
    if args.exit_loss_weights:
        configs[f"ztt_L{L}_C{C}_exit_losses"] = ZTTConfig(
            num_layers=L, num_cycles=C, cycle_mode="head_tail", zero_token=True, gate=True,
            exit_loss_weights=args.exit_loss_weights,
            exit_loss_fraction=args.exit_loss_fraction, **common)

    ztt = ZTTModel(configs[f"ztt_L{L}_C{C}"])
    models = {
        f"megatron_{applications}_layers": (PlainMegatronTransformer(plain_config),
                                            lambda m, x, y: m(x, y)),
        f"ztt_L{L}_C{C}": (ztt, lambda m, x, y: m(x, y, collect_stats=False).loss),
        f"ztt_L{L}_C{C}_with_stats": (ztt, lambda m, x, y: m(x, y, collect_stats=True).loss),
        f"head_tail_L{L}_C{C}": (ZTTModel(configs[f"head_tail_L{L}_C{C}"]),
                                 lambda m, x, y: m(x, y, collect_stats=False).loss),
        f"ztt_vanilla_{applications}_layers": (ZTTModel(plain_config),
                                               lambda m, x, y: m(x, y, collect_stats=False).loss),
    }
    if args.exit_loss_weights:
        # train mode: the exit losses are a training objective
        models[f"ztt_L{L}_C{C}_exit_losses"] = (
            ZTTModel(configs[f"ztt_L{L}_C{C}_exit_losses"]),
            lambda m, x, y: m(x, y, collect_stats=False).loss)
    if args.exit_loss_weights and args.exit_loss_fraction < 1:
        # the same exit losses on every position, timed in the same rounds for comparison
        name = f"ztt_L{L}_C{C}_exit_losses_all_positions"
        configs[name] = ZTTConfig(num_layers=L, num_cycles=C, cycle_mode="head_tail",
                                  zero_token=True, gate=True,
                                  exit_loss_weights=args.exit_loss_weights, **common)
        models[name] = (ZTTModel(configs[name]), lambda m, x, y: m(x, y, collect_stats=False).loss)
    configs[f"ztt_L{L}_C{C}_with_stats"] = configs[f"ztt_L{L}_C{C}"]
    exit_name = f"ztt_L{L}_C{C}_exit_losses" if args.exit_loss_weights else None
    return models, configs, f"megatron_{applications}_layers", f"ztt_L{L}_C{C}", exit_name


def time_steps(model, step, ids, labels, steps, warmup):
    """-> (wall seconds, process CPU seconds) of each step after the warmup."""
    model.train()
    times, cpu_times = [], []
    for i in range(warmup + steps):
        runtime.synchronize()  # CUDA runs asynchronously (a no-op on the CPU)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step(model, ids, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        runtime.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def plot(report: dict, output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["median_step_seconds"])
    figure, axes = plt.subplots(figsize=(9, 4.5))
    axes.boxplot([[1000 * t for t in report["step_seconds"][n]] for n in names],
                 tick_labels=names, showfliers=True)
    for i, name in enumerate(names, start=1):
        axes.annotate(f"MFU {100 * report['mfu'][name]:.0f}%",
                      (i, 1000 * report["median_step_seconds"][name]),
                      textcoords="offset points", xytext=(18, 0), fontsize=8)
    axes.set_ylabel("forward + backward step time (ms)")
    axes.set_xlabel("model")
    settings = report["settings"]
    axes.set_title(f"batch {settings['batch']} x seq {settings['seq']}, hidden "
                   f"{settings['hidden']}, {settings['threads']} thread(s); "
                   f"{len(report['step_seconds'][names[0]])} steps each")
    axes.tick_params(axis="x", rotation=20)
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="model sizes of a results config (overrides the size options)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--query-groups", type=int, default=None)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4, help="ZTT's distinct layers L")
    parser.add_argument("--cycles", type=int, default=3, help="ZTT's cycles C")
    parser.add_argument("--exit-loss-weights", type=float, nargs="+", default=None,
                        help="also time ZTT trained with these per-cycle exit losses")
    parser.add_argument("--exit-loss-fraction", type=float, default=1.0,
                        help="the exit-loss model's model.exit_loss_fraction (share of "
                             "positions its intermediate exit losses read)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="models are timed in turn, this many rounds, to even out drift")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak")
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 round: smoke test")
    parser.add_argument("--out", help="also write the JSON report here")
    parser.add_argument("--plot", help="also write a PNG of the step-time distributions")
    args = parser.parse_args()
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    if args.quick:
        args.steps, args.warmup, args.rounds = 2, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron_ztt.training.metrics import model_flops_per_token

    runtime.init_distributed(seed=0)
    models, configs, base_name, ztt_name, exit_name = build_models(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    times = {name: [] for name in models}
    cpu_times = {name: [] for name in models}
    peaks = []
    for _ in range(args.rounds):
        for name, (model, step) in models.items():
            peaks.append(measure_peak_flops(args.peak_size, repeats=2))
            wall, cpu = time_steps(model, step, ids, labels, args.steps, args.warmup)
            times[name] += wall
            cpu_times[name] += cpu
    peaks.append(measure_peak_flops(args.peak_size, repeats=2))
    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
    tokens = args.batch * args.seq
    peak = max(peaks)
    flops = {name: model_flops_per_token(configs[name], args.seq) * tokens for name in models}
    base = medians[base_name]
    report = {
        "command": "python bench/model_step_time.py " + " ".join(
            a for a in __import__("sys").argv[1:]),
        "settings": vars(args) | {"threads": torch.get_num_threads()},
        "layer_applications": {name: configs[name].num_applications for name in models},
        "parameters": {name: sum(p.numel() for p in model.parameters())
                       for name, (model, _) in models.items()},
        "median_step_seconds": medians,
        # CPU time of the process per step: on a shared machine, less hit by the other jobs
        # than wall time (with --threads 1 the step's own work)
        "median_step_cpu_seconds": cpu_medians,
        "tokens_per_second": {name: tokens / m for name, m in medians.items()},
        "model_flops_per_step": flops,
        "matmul_peak_flops": {"best": peak, "median": statistics.median(peaks),
                              "worst": min(peaks), "measurements": len(peaks)},
        "mfu": {name: flops[name] / medians[name] / peak for name in models},
        "ratio_vs_megatron": {name: m / base for name, m in medians.items()},
        "ratio": medians[ztt_name] / base,
        # what the per-cycle exit losses cost: step time and model FLOPs against ZTT without
        "exit_losses_ratio": medians[exit_name] / medians[ztt_name] if exit_name else None,
        "exit_losses_flop_ratio": flops[exit_name] / flops[ztt_name] if exit_name else None,
        # exit_loss_fraction < 1: the exit losses on every position against ZTT without
        "exit_losses_all_positions_ratio": (
            medians[exit_name + "_all_positions"] / medians[ztt_name]
            if exit_name and exit_name + "_all_positions" in medians else None),
        "exit_losses_cpu_ratio": (cpu_medians[exit_name] / cpu_medians[ztt_name]
                                  if exit_name else None),
        "exit_losses_all_positions_cpu_ratio": (
            cpu_medians[exit_name + "_all_positions"] / cpu_medians[ztt_name]
            if exit_name and exit_name + "_all_positions" in medians else None),
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(report, args.plot)
    runtime.shutdown_distributed()


if __name__ == "__main__":
    main()
