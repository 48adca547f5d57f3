"""Bytes per hop of the circular pipeline: what each virtual stage sends to the next
(``parallel/circular.carried_shapes``, the shapes the stages are built with), for a config.

    python bench/pipeline_hops.py --config launch/configs/ztt_7b.yaml parallel.pipeline=2 \\
        model.num_cycles=4 "model.exit_loss_weights=[0.1,0.2,0.3,1.0]"

The stages are built at a small width (hidden 64, 4 heads, vocab 256, sequence 16) with the
config's layers, cycles, gate and exit-loss weights, which decide what travels; the bytes
are then counted at the config's sequence length, micro batch, hidden size and precision
(sequence parallelism: each rank's shard). One process, no training; prints a Markdown table.
It reads only ``carried_shapes``, so a copy of it in an older tree measures that tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's package

SMALL = dict(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
             vocab_size=256, make_vocab_size_divisible_by=8, seq_length=16)


def ring_hops(ranks, micro_batch: int, training: bool, exits: bool = False):
    """Hop v: what virtual stage v (cycle v // P on rank v % P) sends to v + 1."""
    from megatron_ztt.parallel.circular import carried_shapes

    size, cycles = len(ranks), ranks[0].config.num_cycles
    shapes = [carried_shapes(module, micro_batch, training, exits) for module in ranks]
    return [shapes[v % size][v // size][1] for v in range(cycles * size - 1)]


def hops(config, training: bool = True, exits: bool = False):
    """[(hidden-sized tensors, bytes)] per hop at ``config``'s sizes."""
    from megatron_ztt.parallel.circular import CircularStage

    model, size = config.model, config.parallel.pipeline
    small = dataclasses.replace(model, **SMALL)
    ranks = [CircularStage(small, rank, size) for rank in range(size)]
    micro_batch = config.train.micro_batch_size
    value_bytes = {"bf16": 2, "fp16": 2}.get(config.train.precision, 4)
    shard = config.parallel.tensor if config.parallel.sequence_parallel and not exits else 1
    tokens = model.seq_length // shard * micro_batch
    rows = []
    for hop in ring_hops(ranks, micro_batch, training, exits):
        hidden = [t for t in hop if t.shape[-1] == small.hidden_size]
        other = [t for t in hop if t.shape[-1] != small.hidden_size]  # the exit record
        total = len(hidden) * tokens * model.hidden_size * value_bytes
        total += sum(tokens * t.shape[-1] * t.element_size() for t in other)
        rows.append((len(hidden), total))
    return rows


def main() -> None:
    from megatron_ztt.config import load_config
    from megatron_ztt.parallel import runtime

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides, check=False)  # no data needed
    runtime.init_distributed(seed=1)
    torch.manual_seed(0)
    m, p = config.model, config.parallel
    print(f"{args.config} {' '.join(args.overrides)}: C={m.num_cycles} P={p.pipeline} "
          f"hidden {m.hidden_size}, sequence {m.seq_length}, micro batch "
          f"{config.train.micro_batch_size}, {config.train.precision}, gate {m.gate}, "
          f"exit-loss weights {m.exit_weights}")
    print("| hop | " + " | ".join(f"{v}->{v + 1}" for v in range(m.num_cycles * p.pipeline - 1))
          + " | sum |")
    print("|---" * (m.num_cycles * p.pipeline + 1) + "|")
    for name, training, exits in (("training", True, False),
                                  ("validation with exits", False, True)):
        rows = hops(config, training, exits)
        print(f"| {name}: hidden-sized tensors | " + " | ".join(str(n) for n, _ in rows)
              + f" | {sum(n for n, _ in rows)} |")
        print(f"| {name}: MiB | " + " | ".join(f"{b / 2 ** 20:.1f}" for _, b in rows)
              + f" | {sum(b for _, b in rows) / 2 ** 20:.1f} |")


if __name__ == "__main__":
    main()
