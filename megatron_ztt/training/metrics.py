"""Training metrics: reduction over ranks, TensorBoard and W&B scalars, the console line, FLOPs."""

from __future__ import annotations

import datetime
import os
import secrets
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.cycle_engine import application_plan
from megatron_ztt.parallel import runtime


def reduce_means(values: Dict[str, object], keys: Iterable[str]) -> Dict[str, float]:
    """Mean of each metric over the ranks that report it (collective over the world).

    Every rank passes the same ``keys``; a rank without a value for a key (another pipeline
    stage's statistic, say) simply does not count for it. Values are floats or device scalars.
    """
    return reduce_means_of_steps([values], keys)[0]


def reduce_means_of_steps(steps: List[Dict[str, object]], keys: Iterable[str]
                          ) -> List[Dict[str, float]]:
    """``reduce_means`` of several steps' values at once: one collective and one host read
    for all of them (the training loop reduces a logging interval's steps together)."""
    keys = list(keys)
    device = runtime.current_device()
    table = torch.zeros(2, len(steps), len(keys), dtype=torch.float64, device=device)
    for s, values in enumerate(steps):
        for i, key in enumerate(keys):
            if key in values:
                value = values[key]
                table[0, s, i] = (value.detach().to(device, torch.float64)
                                  if torch.is_tensor(value) else float(value))
                table[1, s, i] = 1
    if dist.is_initialized():
        dist.all_reduce(table)
    sums, counts = table.tolist()
    return [{key: sums[s][i] / counts[s][i] for i, key in enumerate(keys) if counts[s][i] > 0}
            for s in range(len(steps))]


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
    # exit_loss_fraction f < 1: an extra exit's tail and output layer run on a share f of the
    # positions, plus the tail's keys/values of every position (model/exit_losses.py)
    fraction = config.exit_loss_fraction
    keys_values = 2 * d * kv if fraction < 1 else 0
    application = 2 * layer_params + attention
    output = 2 * d * config.padded_vocab_size * (1 + extra_exits * fraction)
    forward = (len(plan) * application + extra_exits * tail * (fraction * application + keys_values)
               + output)
    return 3.0 * forward


def measure_matmul_peak(size: int = 2048, dtype: torch.dtype = torch.float32,
                        repeats: int = 5, budget_seconds: Optional[float] = None) -> float:
    """Best FLOP/s of ``size`` x ``size`` matmuls on this rank's device over ``repeats``
    timed rounds of 5 (after one warm-up round), or as many rounds as fit ``budget_seconds``."""
    import time

    device = runtime.current_device()
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 5 * 2 * size ** 3
    best, rounds, began = 0.0, 0, time.perf_counter()
    while rounds <= repeats:
        runtime.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        runtime.synchronize()
        if rounds > 0:  # the first round warms up
            best = max(best, flops / (time.perf_counter() - start))
        rounds += 1
        if budget_seconds is not None and time.perf_counter() - began > budget_seconds and best:
            break
    return best


# CPU: the measured matmul peak at start, within this budget (rounds of 5 matmuls of this size)
CPU_PEAK_SECONDS, CPU_PEAK_SIZE = 0.5, 512


def peak_flops_per_device(configured, dtype: torch.dtype) -> tuple:
    """(FLOP/s, where it comes from) for MFU: ``configured`` (``logging.peak_flops_per_device``)
    when it is a number; for ``auto`` the CUDA device's dense bf16 peak from
    ``runtime.KNOWN_BF16_PEAK_FLOPS``, else (a CPU, or an accelerator the table does not know)
    the matmul peak measured now in ``dtype`` (a second at most on a CPU), averaged over ranks
    so that all agree (collective when ``auto`` is measured)."""
    if configured != "auto":
        return float(configured), "logging.peak_flops_per_device"
    name = runtime.device_name()
    if runtime.use_cuda():
        known = runtime.known_peak_flops(name)
        if known is not None:
            return known, f"auto: {name}, dense bf16 from the table of known accelerators"
        measured = measure_matmul_peak(8192, torch.bfloat16, repeats=3)
        how = f"auto: {name} is not in the table; measured bf16 matmul peak (8192^3)"
    else:
        measured = measure_matmul_peak(CPU_PEAK_SIZE, dtype, budget_seconds=CPU_PEAK_SECONDS)
        how = (f"auto: {name}, measured {str(dtype).replace('torch.', '')} matmul peak "
               f"({CPU_PEAK_SIZE}^3, {torch.get_num_threads()} threads)")
    if dist.is_initialized():
        value = torch.tensor([measured], dtype=torch.float64, device=runtime.current_device())
        dist.all_reduce(value)
        measured = value.item() / dist.get_world_size()
        how += ", mean over ranks"
    return measured, how


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
