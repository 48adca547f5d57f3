"""The pretraining loop.

    torchrun --nproc-per-node 2 -m megatron_ztt.train --config launch/configs/tiny.yaml train.lr=1e-3
    ztt train --config ...            # the same, for one process or under srun

One optimizer step per iteration over ``train.global_batch_size`` samples (micro batches x
gradient accumulation x data-parallel ranks). DeepSpeed owns the optimizer (ZeRO), gradient
accumulation, clipping and the LR schedule; megatron-core owns the tensor-parallel layers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_ztt.model.config import ConfigError
from megatron_ztt.parallel import runtime
from megatron_ztt.training import checkpoint as ckpt
from megatron_ztt.training.config import RunConfig, load_config
from megatron_ztt.training.metrics import (TensorBoardLogger, console_line, metric_keys,
                                           model_flops_per_token, optimizer_state_bytes,
                                           reduce_means)
from megatron_ztt.training.signals import StopRequest


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    iteration: int
    state: str  # "completed" | "interrupted"
    signal: Optional[str] = None
    losses: Dict[int, float] = field(default_factory=dict)  # iteration -> global-batch lm loss
    skipped_steps: int = 0
    optimizer_state_bytes: int = 0  # on this rank, after the first step
    last_checkpoint: Optional[str] = None
    validation: Dict[int, Dict[str, float]] = field(default_factory=dict)


def log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


# --------------------------------------------------------------------------- setup
def build_tokenizer_and_data(config: RunConfig):
    from megatron_ztt.data.datasets import build_datasets
    from megatron_ztt.data.tokenizer import ZTTTokenizer

    tokenizer = ZTTTokenizer(config.data.tokenizer)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) does not match the "
                          f"tokenizer's vocabulary ({tokenizer.vocab_size} in "
                          f"{config.data.tokenizer}); set model.vocab_size="
                          f"{tokenizer.vocab_size}")
    train = config.train
    evaluations = train.train_iters // config.eval.interval + 1
    num_samples = (train.train_iters * train.global_batch_size,
                   evaluations * config.eval.iters * train.global_batch_size,
                   config.eval.iters * train.global_batch_size)
    datasets = build_datasets(config.data, tokenizer, config.model.seq_length, train.seed,
                              num_samples)
    return tokenizer, datasets


def build_engine(config: RunConfig):
    """The model on this rank, wrapped in a DeepSpeed engine. Returns (engine, model)."""
    import deepspeed

    from megatron_ztt.parallel.mpu import MegatronMPU
    from megatron_ztt.training.optimizer import deepspeed_config, lr_multiplier, parameter_groups

    world = dist.get_world_size()
    if config.parallel.pipeline > 1:
        from megatron_ztt.parallel.pipeline import build_pipeline_model

        model = build_pipeline_model(config)
        mpu = None  # the pipeline module brings its own grid
    else:
        from megatron_ztt.model.ztt import ZTTModel

        model = ZTTModel(config.model)
        mpu = MegatronMPU
        if config.parallel.zero_stage == 3:
            # ZeRO-3 gathers a parameter only around its own module's forward: the output head
            # reads the embedding's weight and each layer its applications' zero keys.
            register = deepspeed.zero.register_external_parameter
            if config.model.tie_embeddings:
                register(model.output_head, model.embedding.weight)
            if model.zero_token_pool is not None:
                for app in model.plan:
                    register(model.layers[app.layer], model.zero_token_pool[app.name])
    if config.train.init_weights:
        load_initial_weights(model, config.train.init_weights)
    model.to(runtime.current_device())
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, config.train.weight_decay),
        config=deepspeed_config(config, world),
        mpu=mpu,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_multiplier(config)),
    )
    return engine, model


def load_initial_weights(model, path: str) -> None:
    """Full weights (a checkpoint of any layout, or a .pt state dict) into this rank's part."""
    from megatron_ztt.parallel.sharding import load_full_state_dict

    if os.path.isfile(path):
        full = torch.load(path, map_location="cpu", weights_only=True)
    else:
        _, full, _ = ckpt.load_full_model_state(path)
    if hasattr(model, "load_canonical_state_dict"):  # a pipeline stage
        model.load_canonical_state_dict(full)
    else:
        load_full_state_dict(model, full)
    log(f"initialised the weights from {path}")


def layout_of(config: RunConfig) -> Dict[str, int]:
    world = dist.get_world_size()
    return {"tensor": config.parallel.tensor, "pipeline": config.parallel.pipeline,
            "data": config.data_parallel_size(world), "zero_stage": config.parallel.zero_stage}


def resume_point(config: RunConfig):
    """(root, tag) to load, or None for a fresh start."""
    load = config.train.load
    if load is None:
        return None
    if load == "auto":
        root = config.checkpoint_dir
        if not ckpt.complete_tags(root):
            if ckpt.read_latest(root) is not None:  # `latest` names a missing or partial save
                ckpt.resolve(root)  # raises, saying so
            log(f"no checkpoint in {root} yet: starting from scratch")
            return None
        point = ckpt.resolve(root)  # the newest complete checkpoint
        if dist.get_rank() == 0:
            ckpt.repair_latest(root)
        return point
    point = ckpt.resolve(load)
    _refuse_to_save_over_newer(config, *point)
    return point


def _refuse_to_save_over_newer(config: RunConfig, root: str, tag: str) -> None:
    """Resuming from an older checkpoint of this run's own folder would save over newer ones."""
    if os.path.abspath(root) != os.path.abspath(config.checkpoint_dir):
        return
    tags = ckpt.complete_tags(root)
    newer = tags[tags.index(tag) + 1:] if tag in tags else []
    if newer:
        raise ckpt.CheckpointError(
            f"train.load={os.path.join(root, tag)}: {root} also holds newer checkpoints "
            f"({', '.join(newer)}) that this run would save over; move them out of {root} "
            f"and use train.load=auto, or set run.dir to a new folder")


# --------------------------------------------------------------------------- steps
class TrainingBatches:
    """Micro batches for this data-parallel rank, from a given number of consumed samples."""

    def __init__(self, dataset, config: RunConfig, consumed_samples: int):
        from megatron.core import parallel_state

        from megatron_ztt.data.loader import build_loader

        self.loader = build_loader(dataset, config.train.micro_batch_size,
                                   parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(),
                                   consumed_samples, config.data.num_workers)
        self.iterator = iter(self.loader)
        self.device = runtime.current_device()

    def __next__(self) -> Dict[str, torch.Tensor]:
        batch = next(self.iterator)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def __iter__(self):
        return self


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=runtime.current_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() > 0


def train_step(engine, batches, config: RunConfig, accumulation: int, iteration: int,
               collect_stats: bool):
    """One optimizer step. Returns (local loss values, local statistics, step was skipped)."""
    from megatron_ztt.model.plan import application_plan

    totals: Dict[str, float] = {}
    stats: Dict[str, float] = {}
    skipped_before = engine.skipped_steps
    nonfinite = False
    for micro in range(accumulation):
        batch = next(batches)
        out = engine(batch["tokens"], batch["labels"], loss_mask=batch.get("loss_mask"),
                     collect_stats=collect_stats and micro == 0)
        loss = out.loss
        bad = _any_rank(not torch.isfinite(loss.detach()).all().item())
        if bad:
            nonfinite = True
            if config.train.nonfinite_loss == "stop":
                raise NonFiniteLossError(
                    f"iteration {iteration}: non-finite loss in micro batch {micro} (rank "
                    f"{dist.get_rank()}'s loss: {loss.item()}); stopping as "
                    f"train.nonfinite_loss=stop asks. The last checkpoint is unchanged.")
            # Make sure every rank's gradients are non-finite, so that the ZeRO optimizer's
            # overflow check skips this whole step on all of them.
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        totals["lm loss"] = totals.get("lm loss", 0.0) + out.lm_loss.item() / accumulation
        for cycle, value in out.exit_losses.items():
            key = f"lm loss cycle {cycle}"
            totals[key] = totals.get(key, 0.0) + value.item() / accumulation
        if collect_stats and micro == 0:
            for cycle, value in out.zero_attention_by_cycle(application_plan(config.model)).items():
                stats[f"zero-attention/cycle {cycle}"] = value.item()
            for name, value in out.zero_attention.items():
                stats[f"zero-attention/{name}"] = value.item()
            for cycle, value in out.gate.items():
                stats[f"gate/cycle {cycle}"] = value.item()
    skipped = engine.skipped_steps > skipped_before
    if nonfinite and not skipped:
        raise NonFiniteLossError(f"iteration {iteration}: non-finite loss but the optimizer "
                                 f"did not skip the step")
    return totals, stats, skipped


# --------------------------------------------------------------------------- the loop
def train(config: RunConfig) -> TrainResult:
    """Run (or resume) the training that ``config`` describes, on every rank."""
    # the layout must fit the processes launched: fail before starting them talking
    config.gradient_accumulation_steps(runtime.read_launch_env().world_size)
    # from the start, so that a signal during start-up also ends in a clean stop
    stop = StopRequest().install()
    try:
        return _train(config, stop)
    finally:
        stop.uninstall()


def _train(config: RunConfig, stop: StopRequest) -> TrainResult:
    from megatron_ztt.training.evaluate import validate

    runtime.init_distributed(runtime.ParallelLayout(config.parallel.tensor,
                                                    config.parallel.pipeline),
                             seed=config.train.seed)
    world = dist.get_world_size()
    accumulation = config.gradient_accumulation_steps(world)
    pipelined = config.parallel.pipeline > 1
    _, (train_set, valid_set, _) = build_tokenizer_and_data(config)
    engine, model = build_engine(config)
    layout = layout_of(config)

    state = ckpt.TrainingState()
    point = resume_point(config)
    if point is not None:
        state, rank_state = ckpt.load(engine, *point, layout=layout)
        if rank_state is not None:
            runtime.set_rng_state(rank_state["rng"])
        log(f"resumed from checkpoint iteration {state.iteration} ({os.path.join(*point)})")
    else:
        log(f"starting from scratch: {sum(p.numel() for p in model.parameters()):,} parameters "
            f"on rank 0; layout {layout}")

    batches = TrainingBatches(train_set, config, state.consumed_train_samples)
    validating = config.eval.iters > 0 and valid_set is not None
    if config.eval.iters > 0 and valid_set is None:
        log("the data has no validation split (data.split gives it no share): no validation")
    # every metric is reduced over all ranks first, so rank 0 can write them all
    tb = TensorBoardLogger(config.tensorboard_dir,
                           config.logging.tensorboard and dist.get_rank() == 0)
    if dist.get_rank() == 0:
        os.makedirs(config.run.dir, exist_ok=True)
        with open(os.path.join(config.run.dir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    keys = metric_keys(config.model)
    tokens_per_step = config.train.global_batch_size * config.model.seq_length
    flops_per_step = model_flops_per_token(config.model, config.model.seq_length) * tokens_per_step
    result = TrainResult(iteration=state.iteration, state="completed")
    window: Dict[str, List[float]] = {}
    window_time, window_steps, run_start = 0.0, 0, time.perf_counter()
    steps_done = 0
    step_times: List[float] = []

    try:
        while state.iteration < config.train.train_iters:
            iteration = state.iteration + 1
            collect = iteration % config.logging.interval == 0
            start = time.perf_counter()
            learning_rate = engine.get_lr()[0]  # the rate this step uses
            engine.train()
            if pipelined:
                from megatron_ztt.parallel.pipeline import pipeline_train_step

                totals, stats, skipped = pipeline_train_step(engine, batches, config, iteration,
                                                             collect)
            else:
                totals, stats, skipped = train_step(engine, batches, config, accumulation,
                                                    iteration, collect)
            runtime.synchronize()
            elapsed = time.perf_counter() - start
            step_times.append(elapsed)
            state.iteration = iteration
            state.consumed_train_samples += config.train.global_batch_size
            steps_done += 1
            if steps_done == 1:
                result.optimizer_state_bytes = optimizer_state_bytes(engine.optimizer)
                log(f"optimizer state on rank 0: "
                    f"{result.optimizer_state_bytes / 2**20:.2f} MiB")
            if skipped:
                state.skipped_steps += 1
                log(f"iteration {iteration}: non-finite loss, optimizer step skipped "
                    f"({state.skipped_steps} skipped so far)")
            reduced = reduce_means(totals, keys[:1] + [k for k in keys if k.startswith("lm loss ")])
            result.losses[iteration] = reduced.get("lm loss", float("nan"))
            if not skipped:
                for key, value in reduced.items():
                    window.setdefault(key, []).append(value)
            window_time += elapsed
            window_steps += 1

            if collect:
                stats = reduce_means(stats, [k for k in keys if "/" in k])
                values = {k: sum(v) / len(v) for k, v in window.items()}
                values.update(stats)
                step_time = window_time / window_steps
                values["learning-rate"] = learning_rate
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None and math.isfinite(float(grad_norm)):
                    values["grad-norm"] = float(grad_norm)
                values["tokens-per-sec"] = tokens_per_step / step_time
                values["mfu"] = flops_per_step / step_time / (
                    config.logging.peak_flops_per_device * world)
                values["skipped-steps"] = state.skipped_steps
                seconds_left = (config.train.train_iters - iteration) * step_time
                log(console_line(iteration, config.train.train_iters, values, seconds_left))
                tb.scalars(values, iteration)
                window, window_time, window_steps = {}, 0.0, 0

            if iteration % config.eval.interval == 0 and validating:
                metrics = validate(engine, valid_set, config, pipelined)
                result.validation[iteration] = metrics
                log(f"validation at iteration {iteration}: " + " | ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items()))
                tb.scalars(metrics, iteration)

            signal_name = stop.agreed()
            if iteration % config.checkpoint.interval == 0 or signal_name:
                result.last_checkpoint = _save(engine, model, config, state, layout)
            if signal_name:
                result.state, result.signal = "interrupted", signal_name
                log(f"received {signal_name}: checkpoint saved at iteration {iteration}, "
                    f"exiting")
                break
        else:
            saved_already = state.iteration % config.checkpoint.interval == 0
            if config.checkpoint.save_at_end and steps_done and not saved_already:
                result.last_checkpoint = _save(engine, model, config, state, layout)
    finally:
        tb.close()

    result.iteration = state.iteration
    result.skipped_steps = state.skipped_steps
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"peak_memory_bytes": runtime.peak_memory_bytes(),
                                      "optimizer_state_bytes": result.optimizer_state_bytes})
    if dist.get_rank() == 0:
        status = {"state": result.state, "iteration": state.iteration,
                  "skipped_steps": state.skipped_steps,
                  "seconds": round(time.perf_counter() - run_start, 1),
                  "train_step_seconds_median": _median(step_times),
                  "peak_memory_bytes_per_rank": [r["peak_memory_bytes"] for r in per_rank],
                  "optimizer_state_bytes_per_rank": [r["optimizer_state_bytes"]
                                                     for r in per_rank]}
        if result.signal:
            status["signal"] = result.signal
        with open(os.path.join(config.run.dir, "status.json"), "w") as f:
            json.dump(status, f)
    return result


def _median(values: List[float]) -> Optional[float]:
    return round(sorted(values)[len(values) // 2], 4) if values else None


def _save(engine, model, config, state, layout) -> str:
    tag_dir = ckpt.save(engine, model, config, state, layout,
                        extra_rank_state={"rng": runtime.rng_state()})
    log(f"saved checkpoint iteration {state.iteration} to {tag_dir}")
    return tag_dir


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")


def run(args: argparse.Namespace) -> int:
    from megatron_ztt.data.datasets import DataError
    from megatron_ztt.data.tokenizer import TokenizerError

    try:
        config = load_config(args.config, args.overrides)
        train(config)
    except (ConfigError, ckpt.CheckpointError, DataError, TokenizerError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 3
    finally:
        runtime.shutdown_distributed()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ztt.train",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
