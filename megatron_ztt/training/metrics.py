"""Training metrics: reduction over ranks, TensorBoard and W&B scalars, the console line, FLOPs."""

from __future__ import annotations

import datetime
import os
import secrets
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.cycle_engine import application_plan
from megatron_ztt.parallel import runtime


def reduce_means(values: Dict[str, float], keys: Iterable[str]) -> Dict[str, float]:
    """Mean of each metric over the ranks that report it (collective over the world).

    Every rank passes the same ``keys``; a rank without a value for a key (another pipeline
    stage's statistic, say) simply does not count for it.
    """
    keys = list(keys)
    sums = torch.zeros(len(keys), dtype=torch.float64, device=runtime.current_device())
    counts = torch.zeros_like(sums)
    for i, key in enumerate(keys):
        if key in values:
            sums[i] = float(values[key])
            counts[i] = 1
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return {key: (sums[i] / counts[i]).item() for i, key in enumerate(keys) if counts[i] > 0}


def metric_keys(config: ZTTConfig) -> list:
    """Megatron-style scalar names this model reports during training."""
    keys = ["lm loss"]
    keys += [f"lm loss cycle {c + 1}" for c, w in enumerate(config.exit_weights)
             if w > 0 or c + 1 == config.num_cycles]
    if config.zero_token:
        keys += [f"zero-attention/cycle {c + 1}" for c in range(config.num_cycles)]
        keys += [f"zero-attention/{app.name}" for app in application_plan(config)]
    if config.gate:
        keys += [f"gate/cycle {c + 1}" for c in range(config.num_cycles)]
    return keys


def model_flops_per_token(config: ZTTConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting every layer
    application and every extra exit head, with full (not causal-halved) attention."""
    d, ffn = config.hidden_size, config.ffn_size
    kv = 2 * config.query_groups * config.head_dim
    mlp_in = 2 * ffn if config.activation == "swiglu" else ffn
    layer_params = d * (d + kv) + d * d + d * mlp_in + ffn * d
    attention = 2 * 2 * seq_length * d  # QK^T and PV, multiply-add
    plan = application_plan(config)
    extra_exits = sum(1 for c, w in enumerate(config.exit_weights)
                      if w > 0 and c + 1 < config.num_cycles)
    tail = sum(1 for app in plan if app.after_cycles)
    applications = len(plan) + extra_exits * tail
    output = 2 * d * config.padded_vocab_size * (1 + extra_exits)
    forward = applications * (2 * layer_params + attention) + output
    return 3.0 * forward


class TensorBoardLogger:
    """Scalars on one rank (the first of the last pipeline stage, where the losses live)."""

    def __init__(self, log_dir: Optional[str], enabled: bool):
        self.writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger:
    """The same scalars in a Weights & Biases run, with the run config (one rank writes).

    The run's id is kept in ``RUN_DIR/wandb_run_id``: a resumed training (``resuming``)
    continues the same W&B run, a fresh start begins a new one. ``WANDB_MODE=offline`` (wandb's
    own variable) logs without a network; the files go under ``WANDB_DIR`` when that is set,
    else under the run directory.
    """

    ID_FILE = "wandb_run_id"

    def __init__(self, project: Optional[str], enabled: bool, run_dir: str = ".",
                 name: Optional[str] = None, entity: Optional[str] = None,
                 config: Optional[dict] = None, resuming: bool = False):
        self.run = None
        if not (enabled and project):
            return
        import wandb

        os.makedirs(run_dir, exist_ok=True)
        id_path = os.path.join(run_dir, self.ID_FILE)
        if resuming and os.path.exists(id_path):
            with open(id_path) as stream:
                run_id = stream.read().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
            with open(id_path, "w") as stream:
                stream.write(run_id + "\n")
        self.run = wandb.init(project=project, entity=entity, name=name, id=run_id,
                              resume="allow", config=config,
                              dir=os.environ.get("WANDB_DIR") or run_dir)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(values), step=step)

    def text(self, tag: str, text: str) -> None:
        if self.run is not None:
            self.run.summary[tag] = text

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class ScalarLoggers:
    """Every scalar sink of a run (TensorBoard, W&B), written together."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.scalars(values, step)

    def text(self, tag: str, text: str) -> None:
        for sink in self.sinks:
            sink.text(tag, text)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def console_line(iteration: int, total: int, values: Dict[str, float], seconds_left: float) -> str:
    eta = datetime.timedelta(seconds=int(max(0.0, seconds_left)))
    parts = [f"iteration {iteration:>6}/{total:>6}",
             f"loss {values.get('lm loss', float('nan')):.4f}",
             f"lr {values.get('learning-rate', 0.0):.2e}",
             f"grad-norm {values.get('grad-norm', float('nan')):.3f}",
             f"tokens/s {values.get('tokens-per-sec', 0.0):.0f}"]
    if "mfu" in values:
        parts.append(f"mfu {100 * values['mfu']:.1f}%")
    parts.append(f"ETA {eta}")
    return " | ".join(parts)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state held by this rank: moments plus fp32 master copies.

    Works for DeepSpeed's ZeRO optimizers (which wrap a torch optimizer over this rank's flat
    partition) and for plain torch optimizers.
    """
    seen, total = set(), 0

    def count(tensor):
        nonlocal total
        if torch.is_tensor(tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        for value in state.values():
            count(value)
    for partition in getattr(optimizer, "single_partition_of_fp32_groups", []) or []:
        count(partition)
    return total
