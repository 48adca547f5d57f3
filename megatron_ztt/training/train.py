"""The pretraining loop.

    torchrun --nproc-per-node 2 -m megatron_ztt.train --config launch/configs/tiny.yaml train.lr=1e-3
    ztt train --config ...            # the same, for one process or under srun

One optimizer step per iteration over ``train.global_batch_size`` samples (micro batches x
gradient accumulation x data-parallel ranks). DeepSpeed owns the optimizer (ZeRO), gradient
accumulation, clipping and the LR schedule; megatron-core owns the tensor-parallel layers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.distributed as dist

from megatron_ztt.checkpoint import (CheckpointError, complete_tags, load_run_config,
                                     read_latest, repair_latest, resolve)
from megatron_ztt.config import RunConfig
from megatron_ztt.files import write_text_atomic
from megatron_ztt.model.config import ConfigError
from megatron_ztt.parallel import runtime
from megatron_ztt.training import checkpoint as ckpt
from megatron_ztt.training.engines import NonFiniteLossError, build_engine
from megatron_ztt.training.resume_checks import check_start
from megatron_ztt.training.metrics import (ScalarLoggers, TensorBoardLogger, WandbLogger,
                                           console_line, metric_keys, model_flops_per_token,
                                           peak_flops_per_device, reduce_means,
                                           reduce_means_of_steps)
from megatron_ztt.training.batches import TrainingBatches, build_tokenizer_and_data
from megatron_ztt.training.signals import StopRequest


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
    checkpoint_stalls: List[float] = field(default_factory=list)  # seconds per save


def log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


# --------------------------------------------------------------------------- setup
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
        if not complete_tags(root):
            if read_latest(root) is not None:  # `latest` names a missing or partial save
                resolve(root)  # raises, saying so
            log(f"no checkpoint in {root} yet: starting from scratch")
            return None
        point = resolve(root)  # the newest complete checkpoint
        if dist.get_rank() == 0:
            repair_latest(root)
        return point
    point = resolve(load)
    _refuse_to_save_over_newer(config, *point)
    return point


def _refuse_to_save_over_newer(config: RunConfig, root: str, tag: str) -> None:
    """Resuming from an older checkpoint of this run's own folder would save over newer ones."""
    if os.path.abspath(root) != os.path.abspath(config.checkpoint_dir):
        return
    tags = complete_tags(root)
    newer = tags[tags.index(tag) + 1:] if tag in tags else []
    if newer:
        raise CheckpointError(
            f"train.load={os.path.join(root, tag)}: {root} also holds newer checkpoints "
            f"({', '.join(newer)}) that this run would save over; move them out of {root} "
            f"and use train.load=auto, or set run.dir to a new folder")


# --------------------------------------------------------------------------- steps
# --------------------------------------------------------------------------- the loop
def train(config: RunConfig) -> TrainResult:
    """Run (or resume) the training that ``config`` describes, on every rank."""
    # the layout must fit the processes launched: fail before starting them talking
    config.gradient_accumulation_steps(runtime.read_launch_env().world_size)
    # from the start, so that a signal during start-up also ends in a clean stop
    stop = StopRequest().install()
    try:
        return Trainer(config, stop).run()
    finally:
        stop.uninstall()


class Trainer:
    """The loop as named steps: start, step, log, validate, checkpoint, finish."""

    def __init__(self, config: RunConfig, stop: StopRequest):
        self.config = config
        self.stop = stop

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        config = self.config
        runtime.init_distributed(runtime.ParallelLayout(config.parallel.tensor,
                                                        config.parallel.pipeline),
                                 seed=config.train.seed)
        point = resume_point(config)
        check_start(config, point)  # before any data or weights are read
        self.world = dist.get_world_size()
        _, (train_set, self.valid_set, _) = build_tokenizer_and_data(config)
        self.engine = build_engine(config)
        self.layout = layout_of(config)
        self.state = ckpt.TrainingState()
        if point is not None:
            self.state, rank_state = ckpt.load(self.engine, *point, layout=self.layout)
            if rank_state is not None:
                runtime.set_rng_state(rank_state["rng"])
            log(f"resumed from checkpoint iteration {self.state.iteration} "
                f"({os.path.join(*point)})")
        else:
            log(f"starting from scratch: {self.engine.parameter_count:,} parameters on rank 0; "
                f"layout {self.layout}")
        self.batches = TrainingBatches(train_set, config, self.state.consumed_train_samples)
        self.validating = config.eval.iters > 0 and self.valid_set is not None
        if config.eval.iters > 0 and self.valid_set is None:
            log("the data has no validation split (data.split gives it no share): no validation")
        # every metric is reduced over all ranks first, so rank 0 can write them all
        rank0 = dist.get_rank() == 0
        self.tb = ScalarLoggers(  # TensorBoard and W&B get the same scalars
            TensorBoardLogger(config.tensorboard_dir, config.logging.tensorboard and rank0),
            WandbLogger(config.logging.wandb_project, rank0, config.run.dir,
                        config.logging.wandb_run_name or config.run.name,
                        config.logging.wandb_entity, config.to_dict(),
                        resuming=point is not None))
        if dist.get_rank() == 0:
            os.makedirs(config.run.dir, exist_ok=True)
            write_text_atomic(os.path.join(config.run.dir, "config.json"),
                              json.dumps(config.to_dict(), indent=2))
        self.keys = metric_keys(config.model)
        self.tokens_per_step = config.train.global_batch_size * config.model.seq_length
        self.flops_per_step = (model_flops_per_token(config.model, config.model.seq_length)
                               * self.tokens_per_step)
        self.peak_flops, peak_source = peak_flops_per_device(
            config.logging.peak_flops_per_device, next(self.engine.module.parameters()).dtype)
        log(f"MFU peak: {self.peak_flops:.3e} FLOP/s per device ({peak_source})")
        self.tb.text("mfu-peak", f"{self.peak_flops:.3e} FLOP/s per device ({peak_source})")
        self.result = TrainResult(iteration=self.state.iteration, state="completed")
        self.window: Dict[str, List[float]] = {}
        self.pending: List[tuple] = []  # (iteration, device losses, skipped) not yet read
        self.window_time, self.window_steps = 0.0, 0
        self.run_start = time.perf_counter()
        self.steps_done = 0
        self.step_times: List[float] = []

    # ------------------------------------------------------------------ one iteration
    def step(self, iteration: int, collect: bool) -> Dict[str, float]:
        """One optimizer step; returns this rank's statistics (reduced when logged)."""
        config, engine, state = self.config, self.engine, self.state
        start = time.perf_counter()
        self.learning_rate = engine.learning_rate()  # the rate this step uses
        engine.train()
        result = engine.train_step(self.batches, iteration, collect)
        runtime.synchronize()
        elapsed = time.perf_counter() - start
        self.step_times.append(elapsed)
        state.iteration = iteration
        state.consumed_train_samples += config.train.global_batch_size
        self.steps_done += 1
        if self.steps_done == 1:
            self.result.optimizer_state_bytes = engine.optimizer_state_bytes()
            log(f"optimizer state on rank 0: {self.result.optimizer_state_bytes / 2**20:.2f} MiB")
        if result.skipped:
            state.skipped_steps += 1
            log(f"iteration {iteration}: non-finite loss, optimizer step skipped "
                f"({state.skipped_steps} skipped so far)")
        # the losses stay on the device until the next log (``read_losses``)
        self.pending.append((iteration, result.losses, result.skipped))
        self.window_time += elapsed
        self.window_steps += 1
        return result.stats

    def read_losses(self) -> None:
        """The losses of the steps since the last read, reduced over the ranks in one
        collective and one host read (collective: every rank calls it at the same steps)."""
        if not self.pending:
            return
        keys = self.keys
        reduced = reduce_means_of_steps([losses for _, losses, _ in self.pending],
                                        keys[:1] + [k for k in keys if k.startswith("lm loss ")])
        for (iteration, _, skipped), values in zip(self.pending, reduced):
            self.result.losses[iteration] = values.get("lm loss", float("nan"))
            if not skipped:
                for key, value in values.items():
                    self.window.setdefault(key, []).append(value)
        self.pending = []

    def log(self, iteration: int, stats: Dict[str, float]) -> None:
        config = self.config
        self.read_losses()
        stats = reduce_means(stats, [k for k in self.keys if "/" in k])
        values = {k: sum(v) / len(v) for k, v in self.window.items()}
        values.update(stats)
        step_time = self.window_time / self.window_steps
        values["learning-rate"] = self.learning_rate
        grad_norm = self.engine.grad_norm()
        if grad_norm is not None and math.isfinite(grad_norm):
            values["grad-norm"] = grad_norm
        values["tokens-per-sec"] = self.tokens_per_step / step_time
        values["mfu"] = self.flops_per_step / step_time / (self.peak_flops * self.world)
        values["mfu-peak-flops-per-device"] = self.peak_flops
        values["skipped-steps"] = self.state.skipped_steps
        seconds_left = (config.train.train_iters - iteration) * step_time
        log(console_line(iteration, config.train.train_iters, values, seconds_left))
        self.tb.scalars(values, iteration)
        self.window, self.window_time, self.window_steps = {}, 0.0, 0

    def validate(self, iteration: int) -> None:
        from megatron_ztt.training.evaluate import validate

        metrics = validate(self.engine, self.valid_set, self.config)
        self.result.validation[iteration] = metrics
        log(f"validation at iteration {iteration}: " + " | ".join(
            f"{k} {v:.4f}" for k, v in metrics.items()))
        self.tb.scalars(metrics, iteration)

    def checkpoint(self) -> None:
        start = time.perf_counter()
        tag_dir = ckpt.save(self.engine, self.config, self.state, self.layout,
                            extra_rank_state={"rng": runtime.rng_state()})
        stall = time.perf_counter() - start  # the time training waits for this save
        self.result.checkpoint_stalls.append(stall)
        how = "writing in the background" if self.config.checkpoint.async_save else "saved"
        log(f"{how} checkpoint iteration {self.state.iteration} to {tag_dir} "
            f"(training stalled {stall:.3f} s)")
        self.result.last_checkpoint = tag_dir

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        self.start()
        config, state = self.config, self.state
        try:
            while state.iteration < config.train.train_iters:
                iteration = state.iteration + 1
                collect = iteration % config.logging.interval == 0
                stats = self.step(iteration, collect)
                if collect:
                    self.log(iteration, stats)
                if iteration % config.eval.interval == 0 and self.validating:
                    self.validate(iteration)
                signal_name = self.stop.agreed()
                if iteration % config.checkpoint.interval == 0 or signal_name:
                    self.checkpoint()
                if signal_name:
                    self.result.state, self.result.signal = "interrupted", signal_name
                    log(f"received {signal_name}: checkpoint saved at iteration {iteration}, "
                        f"exiting")
                    break
            else:
                saved_already = state.iteration % config.checkpoint.interval == 0
                if config.checkpoint.save_at_end and self.steps_done and not saved_already:
                    self.checkpoint()
            ckpt.wait_for_pending_save()  # an asynchronous write ends before the run does
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                ckpt.wait_for_pending_save()
            raise
        finally:
            self.tb.close()
        self.finish()
        return self.result

    def finish(self) -> None:
        """status.json: how the run ended, its speed and per-rank memory (rank 0 writes)."""
        result, state = self.result, self.state
        self.read_losses()
        result.iteration = state.iteration
        result.skipped_steps = state.skipped_steps
        per_rank = [None] * self.world
        dist.all_gather_object(per_rank, {"peak_memory_bytes": runtime.peak_memory_bytes(),
                                          "optimizer_state_bytes": result.optimizer_state_bytes,
                                          "parameters": self.engine.parameter_count})
        if dist.get_rank() != 0:
            return
        status = {"state": result.state, "iteration": state.iteration,
                  "skipped_steps": state.skipped_steps,
                  "seconds": round(time.perf_counter() - self.run_start, 1),
                  "train_step_seconds_median": _median(self.step_times),
                  "peak_memory_bytes_per_rank": [r["peak_memory_bytes"] for r in per_rank],
                  "optimizer_state_bytes_per_rank": [r["optimizer_state_bytes"]
                                                     for r in per_rank],
                  "checkpoint_stall_seconds": [round(s, 4) for s in result.checkpoint_stalls],
                  "parameters_per_rank": [r["parameters"] for r in per_rank]}
        if result.signal:
            status["signal"] = result.signal
        write_text_atomic(os.path.join(self.config.run.dir, "status.json"), json.dumps(status))


def _median(values: List[float]) -> Optional[float]:
    return round(sorted(values)[len(values) // 2], 4) if values else None


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")


def run(args: argparse.Namespace) -> int:
    from megatron_ztt.data.datasets import DataError
    from megatron_ztt.data.tokenizer import TokenizerError

    try:
        config = load_run_config(args.config, args.overrides)
        train(config)
    except (ConfigError, CheckpointError, DataError, TokenizerError) as error:
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
