"""How exactly the circular pipeline sums the shared block's gradient in bf16.

    python bench/grad_accum_precision.py --data PREFIX --tokenizer TOK.model [--cycles 4]

Circular pipeline, PP=2, C cycles, M micro batches, bf16: every cycle's pass of every micro
batch adds one contribution into the same shared parameters (C x M of them). For the first
step this records every contribution as it arrives (a tensor hook) and sums them in fp64, the
reference, and compares the gradient DeepSpeed then receives: with the fp32 sums
(``engines.Fp32GradientSums``, "after") and with plain accumulation in the parameters' bf16
("before", the hooks removed). Error: ||g - reference|| / ||reference|| over the shared
block's parameters. Prints JSON. ``tests/test_grad_accum_precision.py`` asserts the after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def overrides(data, tokenizer, run_dir, cycles, micro_batches):
    return [f"run.dir={run_dir}", f"data.blend=[{data}]", f"data.tokenizer={tokenizer}",
            "data.split=90,5,5", "model.vocab_size=512", "model.hidden_size=64",
            "model.num_layers=4", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.seq_length=32", f"model.num_cycles={cycles}",
            "model.make_vocab_size_divisible_by=64", "parallel.pipeline=2",
            "train.precision=bf16", "train.micro_batch_size=1",
            f"train.global_batch_size={micro_batches}", "train.train_iters=2", "train.lr=0",
            "train.min_lr=0", "train.warmup_iters=0", "train.clip_grad=0",
            "checkpoint.interval=1000", "eval.interval=1000", "eval.iters=0"]


def measure(rank, data, tokenizer, run_dir, cycles, micro_batches):
    """(collective, PP=2 ranks) {"before", "after"} relative errors of the shared block's
    gradient, summed over both pipeline ranks' slices."""
    from megatron_ztt.config import load_config
    from megatron_ztt.training.batches import TrainingBatches, build_tokenizer_and_data
    from megatron_ztt.training.engines import build_engine

    config = load_config(None, overrides(data, tokenizer, run_dir, cycles, micro_batches))
    _, (train_set, _, _) = build_tokenizer_and_data(config)
    engine = build_engine(config)
    shared = {f"layers.{i}." for i in config.model.cycled_layers}
    params = {n: p for n, p in engine.module.named_parameters()
              if any(n.startswith(prefix) for prefix in shared)}
    reference, seen = {}, {}
    for name, param in params.items():
        reference[name] = torch.zeros_like(param, dtype=torch.float64)
        def record(grad, name=name):  # returns None: the gradient itself is unchanged
            reference[name].add_(grad.double())

        param.register_hook(record)
    ds, original_step = engine._ds, engine._ds.allreduce_gradients

    def step(*args, **kwargs):
        seen.update({n: p.grad.double().clone() if p.grad is not None
                     else torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()})
        return original_step(*args, **kwargs)

    ds.allreduce_gradients = step  # the gradients as DeepSpeed receives them
    engine.train()
    errors = {}
    for name in ("after", "before"):
        if name == "before":
            engine.fp32_grad_sums.remove()
        for total in reference.values():
            total.zero_()
        engine.train_step(TrainingBatches(train_set, config, 0), 1, False)  # lr=0: same weights
        squared = torch.zeros(2, dtype=torch.float64)
        for n in params:
            squared[0] += (seen[n] - reference[n]).pow(2).sum()
            squared[1] += reference[n].pow(2).sum()
        torch.distributed.all_reduce(squared)
        errors[name] = (squared[0] / squared[1]).sqrt().item()
    return {"cycles": cycles, "micro_batches": micro_batches, "pipeline": 2,
            "contributions_per_parameter": cycles * micro_batches,
            "relative_error": errors}


def main():
    from distributed import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--run-dir", default="runs/grad_accum_precision")
    args = parser.parse_args()
    result = run_distributed(measure, world_size=2, pipeline_parallel=2, args=(
        args.data, args.tokenizer, args.run_dir, args.cycles, args.micro_batches))[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
