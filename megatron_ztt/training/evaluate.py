"""Validation during training, and ``ztt eval`` on a saved checkpoint.

    ztt eval --checkpoint runs/tiny/checkpoints --exit-threshold 0.3 0.5 [--iters 20]
             [--exit-signal zero_attention_relative] [--num-cycles 1 2 6]

prints one JSON object: loss, perplexity and mean cycles used at full depth and at each
exit threshold (compared with ``--exit-signal``, default the model config's), at the trained
depth and at each ``--num-cycles`` of the depth dial, on the validation split of the data the
checkpoint was trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, List, Optional

import torch

from megatron_ztt.parallel import runtime
from megatron_ztt.training.batches import build_tokenizer_and_data, validation_batches
from megatron_ztt.training.metrics import reduce_means


@torch.no_grad()
def evaluate(forward, batches, micro_batches: int,
             exit_threshold: Optional[float] = None) -> Dict[str, float]:
    """Mean LM loss and cycles per token over ``micro_batches`` batches (one process).

    ``forward(batch, exit_threshold)`` returns a ZTTOutput.
    """
    loss_sum, cycles_sum, tokens = 0.0, 0.0, 0
    for _ in range(micro_batches):
        batch = next(batches)
        out = forward(batch, exit_threshold)
        loss_sum += out.lm_loss.item()
        cycles_sum += out.cycles_used.float().sum().item()
        tokens += out.cycles_used.numel()
    return {"loss": loss_sum / max(1, micro_batches), "mean_cycles": cycles_sum / max(1, tokens)}


def validate(engine, valid_set, config) -> Dict[str, float]:
    """TensorBoard-ready validation metrics (collective over all ranks)."""
    thresholds = [config.model.exit_threshold] + list(config.eval.exit_thresholds)
    engine.eval()
    try:
        results = {threshold: engine.evaluate(validation_batches(valid_set, config),
                                              config.eval.iters, threshold)
                   for threshold in thresholds}
    finally:
        engine.train()
    metrics = {}
    for index, (threshold, values) in enumerate(results.items()):
        suffix = "" if index == 0 else f" exit {threshold:g}"
        metrics[f"lm loss validation{suffix}"] = values["loss"]
        metrics[f"lm loss validation ppl{suffix}"] = math.exp(min(values["loss"], 50.0))
        metrics[f"mean-cycles validation{suffix}"] = values["mean_cycles"]
    return reduce_means(metrics, list(metrics))


# --------------------------------------------------------------------------- ztt eval
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder (with 'latest') or one iteration's folder")
    from megatron_ztt.config import exit_signal_names, exit_threshold_arg, num_cycles_arg

    parser.add_argument("--exit-threshold", type=exit_threshold_arg(), nargs="*", default=[],
                        help="also evaluate with early exit at these thresholds (finite, >= 0)")
    parser.add_argument("--exit-signal", choices=exit_signal_names(), default=None,
                        help="what the thresholds are compared with (default: the run's "
                             "model.exit_signal); zero_attention*: exit when >= threshold, "
                             "hidden_change and random: when < threshold")
    parser.add_argument("--num-cycles", type=num_cycles_arg, nargs="*", default=[],
                        help="depth dial: also evaluate at these cycle counts (1 .. twice the "
                             "trained cycles; cycles beyond it reuse the last one's zero keys "
                             "and gate)")
    parser.add_argument("--iters", type=int, default=None,
                        help="global batches of the run (train.global_batch_size samples each, "
                             "as training validation counts eval.iters; default: the run's "
                             "eval.iters)")
    parser.add_argument("--split", choices=["valid", "test"], default="valid")
    parser.add_argument("--output", default=None,
                        help="also write the JSON report to this file (written whole or not "
                        "at all; unlike stdout, nothing a library prints can get into it)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides of the saved run config, e.g. data.blend=[PREFIX]")


def run(args: argparse.Namespace) -> int:
    from megatron_ztt.checkpoint import CheckpointError
    from megatron_ztt.data.datasets import DataError
    from megatron_ztt.data.tokenizer import TokenizerError
    from megatron_ztt.files import OutputPathError
    from megatron_ztt.model.config import ConfigError

    try:
        return _run(args)
    except (CheckpointError, ConfigError, DataError, TokenizerError, OutputPathError) as error:
        print(f"ztt eval: error: {error}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    from megatron_ztt.checkpoint import load_trained, resolve
    from megatron_ztt.config import validate as validate_config
    from megatron_ztt.files import check_output_path, run_files, write_text_atomic
    from megatron_ztt.model.config import ConfigError
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import load_full_state_dict

    from megatron_ztt.model.cycle_engine import check_exit_signal, check_num_cycles

    if args.iters is not None and args.iters < 1:
        raise ConfigError(f"--iters must be >= 1 (global batches to evaluate), got {args.iters}")
    trained = load_trained(args.checkpoint, args.overrides)
    config = trained.run_config
    if args.output:  # before the evaluation, never onto the checkpoint, its run or its data
        reads = run_files(resolve(args.checkpoint, note=False)[0])
        reads += [p + suffix for p in _prefixes(config) for suffix in (".bin", ".idx",
                                                                        ".tokenizer.json")]
        reads += [config.data.tokenizer] if config.data.tokenizer else []
        output = check_output_path(args.output, "--output", reads)
    if trained.tokenizer and not any(o.startswith("data.tokenizer=") for o in args.overrides):
        # the checkpoint's own copy: the same bytes as the run's, wherever those are now
        config.data.tokenizer = trained.tokenizer
    signal = args.exit_signal or config.model.exit_signal
    try:
        if args.exit_threshold:
            check_exit_signal(signal, config.model.zero_token)
    except ValueError as error:
        raise ConfigError(f"--exit-signal: {error}") from None
    try:
        for depth in args.num_cycles:
            check_num_cycles(depth, config.model.num_cycles)
    except ValueError as error:
        raise ConfigError(f"--num-cycles: {error}") from None
    if args.iters is not None:
        config.eval.iters = args.iters
    if config.eval.iters < 1:
        raise ConfigError(f"the run's eval.iters is {config.eval.iters}: pass --iters N "
                          f"(global batches to evaluate)")
    # one process evaluates the merged weights, whatever layout trained them: a global batch
    # of the run (what eval.iters counts, in training validation too) in micro batches of at
    # most 8 samples that divide it
    config.parallel.tensor = config.parallel.pipeline = 1
    global_batch = config.train.global_batch_size
    config.train.micro_batch_size = max(d for d in range(1, min(config.train.micro_batch_size,
                                                                8) + 1) if global_batch % d == 0)
    micro_batches = config.eval.iters * global_batch // config.train.micro_batch_size
    validate_config(config)
    runtime.init_distributed(seed=config.train.seed)
    try:
        model_config = trained.model_config
        model = ZTTModel(model_config).to(runtime.current_device()).eval()
        load_full_state_dict(model, trained.state)
        _, (_, valid_set, test_set) = build_tokenizer_and_data(config)
        dataset = valid_set if args.split == "valid" else test_set
        if dataset is None:
            print(f"error: the run's data has no {args.split} split (data.split "
                  f"{config.data.split!r}, data.valid_blend {config.data.valid_blend}, "
                  f"data.test_blend {config.data.test_blend}); pass e.g. "
                  f"data.{args.split}_blend=[PREFIX]", file=sys.stderr, flush=True)
            return 2

        thresholds: List[Optional[float]] = [None] + list(args.exit_threshold)
        depths: List[Optional[int]] = [None] + list(args.num_cycles)
        results = []
        for depth in depths:
            def forward(batch, threshold):
                return model(batch["tokens"], batch["labels"], loss_mask=batch.get("loss_mask"),
                             exit_threshold=threshold, exit_signal=signal, num_cycles=depth,
                             collect_stats=False)

            for threshold in thresholds:
                values = evaluate(forward, validation_batches(dataset, config),
                                  micro_batches, threshold)
                results.append({"num_cycles": depth or model_config.num_cycles,
                                "exit_threshold": threshold,
                                "exit_signal": signal if threshold is not None else None,
                                "loss": values["loss"],
                                "perplexity": math.exp(min(values["loss"], 50.0)),
                                "mean_cycles": values["mean_cycles"]})
        report = json.dumps({"checkpoint": trained.path, "iteration": trained.iteration,
                             "split": args.split,
                             "tokens": config.eval.iters * global_batch
                             * model_config.seq_length,
                             "num_cycles": model_config.num_cycles, "results": results},
                            indent=2)
        print(report)
        if args.output:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(output, report + "\n")
    finally:
        runtime.shutdown_distributed()
    return 0


def _prefixes(config) -> List[str]:
    """The .bin/.idx prefixes the run's data settings name."""
    from megatron_ztt.data.datasets import parse_blend

    prefixes = []
    for blend in (config.data.blend, config.data.valid_blend, config.data.test_blend):
        if blend:
            prefixes += parse_blend(blend)[0]
    return prefixes
