"""The one boundary around DeepSpeed: a training engine for each kind of model.

The training loop (``train.py``), validation and checkpoints talk to a
:class:`TrainingEngine` only: one optimizer step, an evaluation loss at an exit threshold,
save, load and the canonical full state dict. :class:`DenseEngine` wraps the whole model
(``ZTTModel``) in DeepSpeed with ZeRO stage 0-3; :class:`CircularPipelineEngine` drives this
rank's stage of the circular pipeline with ``torch.distributed.pipelining`` and steps it with a
per-stage DeepSpeed engine (ZeRO 0-1). DeepSpeed's file names, private attributes and entry
points appear in this module only.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_ztt.checkpoint import (CheckpointError, SliceReader, load_initial_weights,
                                     model_file, optimizer_file)
from megatron_ztt.config import RunConfig
from megatron_ztt.model.cycle_engine import zero_attention_by_cycle
from megatron_ztt.parallel import runtime
from megatron_ztt.parallel.sequence import (DeferredReplicatedGradSum,
                                            all_reduce_replicated_grads, replicated_parameters)
from megatron_ztt.parallel.sharding import (load_full_state_dict, merge_shards, partition_spec,
                                            split_full)
from megatron_ztt.training.evaluate import evaluate
from megatron_ztt.training.metrics import optimizer_state_bytes


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepResult:
    """One step's readings as device scalars: nothing here has been read by the host yet
    (``train.py`` reads them when it logs)."""

    losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # this rank's share
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)  # zero attention, gates (local)
    skipped: bool = False  # the optimizer skipped the step (non-finite gradients)


Batch = Dict[str, torch.Tensor]


def _any_rank(flag: torch.Tensor) -> torch.Tensor:
    """Max of a device flag over all ranks, still on the device (a collective, no host read)."""
    flag = flag.detach().float().reshape(1).clone()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag[0]


def _not_finite(value: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(value.detach())).any().float()


def step_exit_loss_seed(config) -> Optional[int]:
    """The step's seed of the positions the exit losses read (``model.exit_loss_fraction`` <
    1; None otherwise), drawn on every rank alike from the default generator, which a
    checkpoint restores: layouts agree and a resumed run draws what the first run would."""
    if config.model.exit_loss_fraction >= 1.0:
        return None
    from megatron_ztt.model.exit_losses import draw_exit_loss_seed

    return draw_exit_loss_seed()


def loss_denominator(micro_batches, share: int) -> torch.Tensor:
    """The per-token loss's divisor for each micro batch: the counted tokens of the whole
    global batch (every micro batch of every data-parallel rank) / ``share``, where ``share``
    (data-parallel ranks x micro batches) undoes the mean DeepSpeed takes over data-parallel
    ranks and micro batches. With equal counts it is the micro batch's own count, so the
    objective is unchanged where every token counts. A device scalar (a collective over the
    data-parallel group, no host read)."""
    from megatron.core import parallel_state

    from megatron_ztt.model.layers import counted_tokens

    total = sum(counted_tokens(b["labels"], b.get("loss_mask")) for b in micro_batches)
    total = total.reshape(1).clone()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / share).clamp(min=1e-6)


def _nonfinite_stop(iteration: int, losses: Dict[str, torch.Tensor]) -> NonFiniteLossError:
    local = {k: float(v) for k, v in losses.items()}  # on the way out: reading is fine
    return NonFiniteLossError(
        f"iteration {iteration}: non-finite loss (rank {dist.get_rank()}'s losses: {local}); "
        f"stopping as train.nonfinite_loss=stop asks. The last checkpoint is unchanged.")


def _add(totals: Dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    value = value.detach().float()
    totals[key] = totals[key] + value if key in totals else value


class Fp32GradientSums:
    """Sum each bf16/fp16 parameter's gradient contributions in fp32 (Megatron-LM's
    ``main_grad``), for gradients that add up outside DeepSpeed.

    In the circular pipeline every cycle's pass of every micro batch is its own backward call
    into the same shared parameters: C x M contributions. A post-accumulate hook moves each
    one into an fp32 sum (and clears ``.grad``); :meth:`write_grads` rounds the sum to the
    parameter's dtype once, for DeepSpeed's reduction and step.
    """

    def __init__(self, parameters):
        self.parameters = [p for p in parameters if p.requires_grad
                           and p.dtype in (torch.bfloat16, torch.float16)]
        self.sums: Dict[int, torch.Tensor] = {}
        self.handles = [p.register_post_accumulate_grad_hook(self._move) for p in self.parameters]

    def _move(self, param: torch.Tensor) -> None:
        total = self.sums.get(id(param))
        if total is None:
            self.sums[id(param)] = param.grad.float()
        else:
            total.add_(param.grad)
        param.grad = None

    def write_grads(self) -> None:
        for param in self.parameters:
            total = self.sums.pop(id(param), None)
            if total is not None:
                param.grad = total.to(param.dtype)

    def remove(self) -> None:
        """Back to accumulating in the parameters' dtype (the benchmark's "before")."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.parameters = [], []


class TrainingEngine:
    """What the training loop, validation and checkpoints may ask of a model under DeepSpeed."""


    def __init__(self, config: RunConfig, module: torch.nn.Module, deepspeed_engine):
        self.config = config
        self.module = module
        self._ds = deepspeed_engine

    # ------------------------------------------------------------------ steps
    def train_step(self, batches: Iterator[Batch], iteration: int,
                   collect_stats: bool) -> StepResult:
        raise NotImplementedError

    def evaluate(self, batches: Iterator[Batch], iterations: int,
                 exit_threshold: Optional[float]) -> Dict[str, float]:
        """{"loss", "mean_cycles"} over ``iterations`` global batches (this rank's share)."""
        raise NotImplementedError

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    # ------------------------------------------------------------------ readings
    def learning_rate(self) -> float:
        return self._ds.get_lr()[0]

    def grad_norm(self) -> Optional[float]:
        norm = self._ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def skipped_steps(self) -> int:
        return self._ds.skipped_steps

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state (moments and any fp32 master copy) on this rank."""
        return optimizer_state_bytes(self._ds.optimizer)

    # ------------------------------------------------------------------ weights
    def local_state_dict(self, keep: bool = True) -> Dict[str, torch.Tensor]:
        """This rank's (tensor-parallel shard of its stage's) weights, canonical names
        (collective under ZeRO-3; ``keep=False``: take part, return nothing)."""
        raise NotImplementedError

    def local_partition_spec(self) -> Dict[str, tuple]:
        """Which of this rank's tensors are split over tensor-parallel ranks, and how."""
        return partition_spec(self.module)

    def canonical_names(self) -> Dict[str, str]:
        """This rank's module parameter name -> its name in the canonical state dict (the
        modules of every kind use ZTTModel's names)."""
        return {name: name for name, _ in self.module.named_parameters()}

    @staticmethod
    def load_weights_into(module: torch.nn.Module, full: Dict[str, torch.Tensor]) -> None:
        """Full weights into this rank's part of ``module``, before DeepSpeed copies them
        into its optimizer."""
        raise NotImplementedError

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The canonical full state dict, on every rank (collective over all ranks)."""
        return self.gather_to_full(self.local_state_dict())

    def gather_to_full(self, local: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Tensors shaped like this rank's parameters (weights, gradients), canonical names
        -> full tensors of the whole model, on every rank (collective over all ranks)."""
        from megatron.core import parallel_state

        size = parallel_state.get_tensor_model_parallel_world_size()
        spec = self.local_partition_spec()
        full = {}
        for name, tensor in local.items():
            if name in spec and size > 1:
                shards = [torch.empty_like(tensor) for _ in range(size)]
                dist.all_gather(shards, tensor.contiguous(),
                                group=parallel_state.get_tensor_model_parallel_group())
                tensor = merge_shards(shards, *spec[name])
            full[name] = tensor.detach().cpu().clone()
        stages = [None] * dist.get_world_size()
        dist.all_gather_object(stages, full)
        merged = {}
        for stage in stages:
            merged.update(stage)
        return merged

    # ------------------------------------------------------------------ checkpoints
    # Adam's moments, under DeepSpeed's per-parameter names for them
    MOMENTS = ("exp_avg", "exp_avg_sq")

    def checkpoint_files(self) -> Dict[str, dict]:
        """Collective. This rank's share of a checkpoint, copied to host memory: file name ->
        contents. Each stage and tensor-parallel slice is written by its data-parallel rank
        0: its weights to the model file, its fp32 master weights (where they are not the
        weights themselves), Adam moments and step to the optimizer file."""
        from megatron.core import parallel_state

        writer = parallel_state.get_data_parallel_rank() == 0
        weights = self.local_state_dict(keep=writer)  # collective under ZeRO-3
        optimizer = self.local_optimizer_state(keep=writer)  # collective over data-parallel ranks
        if not writer:
            return {}
        slice_ = (self.pipeline_rank, parallel_state.get_tensor_model_parallel_rank())
        return {model_file(*slice_): weights, optimizer_file(*slice_): optimizer}

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer holding the state (inside ZeRO's or the bf16 wrapper)."""
        optimizer = self._ds.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    def _link_optimizer_state(self) -> None:
        """DeepSpeed's per-parameter views of the optimizer state (ZeRO 1-2, bf16) are linked
        once, right after the first parameter group's first step, when the other groups have
        no state yet: their moments would be unreachable. Link again, now that all have."""
        optimizer = self._ds.optimizer
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()

    def _optimizer_step_count(self) -> float:
        steps = [float(st["step"]) for st in self._inner_optimizer().state.values() if "step" in st]
        return max(steps) if steps else 0.0

    def local_optimizer_state(self, keep: bool = True) -> dict:
        """Collective over the data-parallel group: this slice's fp32 master weights (only
        those not stored as the weights), Adam moments and step, canonical names, on CPU.

        DeepSpeed's per-parameter API assembles each from ZeRO's partitions (ZeRO 1-3 and
        the bf16 optimizer); without ZeRO the torch optimizer holds them per parameter.
        ``keep=False``: take part in the gathers, keep nothing (one tensor at a time)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._link_optimizer_state()
        names = self.canonical_names()
        inner = self._inner_optimizer()
        out = {"fp32": {}, **{key: {} for key in self.MOMENTS},
               "step": self._optimizer_step_count()}
        for module_name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            name = names[module_name]
            master = safe_get_full_fp32_param(param)
            if master is None:  # no ZeRO: the parameter is its own master
                state = inner.state.get(param, {})
                moments = {key: state.get(key) for key in self.MOMENTS}
            else:
                moments = {key: safe_get_full_optimizer_state(param, key) for key in self.MOMENTS}
                if param.dtype != torch.float32 and keep:
                    out["fp32"][name] = master.detach().cpu().clone()
            for key, value in moments.items():
                if value is not None and keep:
                    out[key][name] = value.detach().reshape(param.ds_shape if hasattr(
                        param, "ds_shape") else param.shape).cpu().clone()
        return out

    def zero_partitions(self) -> Optional[dict]:
        """How a ZeRO-3 checkpoint's slices are split into data-parallel partitions (for the
        metadata), or None where each slice is written whole."""
        return None

    def training_counters(self) -> dict:
        """The LR schedule and DeepSpeed's step counters, for the checkpoint's metadata."""
        return {"lr_scheduler": self._ds.lr_scheduler.state_dict(),
                "global_steps": self._ds.global_steps,
                "global_samples": self._ds.global_samples,
                "skipped_steps": self._ds.skipped_steps}

    def load(self, tag_dir: str, meta: dict) -> None:
        """Collective: weights, fp32 master weights, Adam moments and step, LR schedule from
        a checkpoint of any layout. Every rank reads the full tensors of its own parameters
        (memory-mapped, one at a time) and keeps its tensor-parallel part."""
        from megatron.core import parallel_state

        self._create_optimizer_state()
        reader = SliceReader(tag_dir, meta)
        names = self.canonical_names()
        spec = self.local_partition_spec()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()

        def mine(module_name, full):
            if full is None or module_name not in spec:
                return full
            return split_full(full, tp_rank, tp_size, *spec[module_name])

        inner = self._inner_optimizer()
        step = reader.step()
        try:
            for module_name, param in self.module.named_parameters():
                name = names[module_name]
                weight = mine(module_name, reader.full(name))
                self._set_working_copy(param, weight)
                if not param.requires_grad:
                    continue
                fp32 = mine(module_name, reader.full(name, "fp32"))
                self._set_master(param, weight if fp32 is None else fp32)
                for key in self.MOMENTS:
                    value = mine(module_name, reader.full(name, key))
                    if value is None:  # frozen when saved: moments start at zero
                        value = torch.zeros_like(weight, dtype=torch.float32)
                    self._set_moment(inner, param, value, key)
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"cannot resume from {tag_dir}: {error}") from error
        for state in inner.state.values():
            if "step" in state and step is not None:
                state["step"] = (torch.tensor(step, dtype=state["step"].dtype)
                                 if torch.is_tensor(state["step"]) else step)
        self._restore_counters(meta.get("engine_state"))

    def _create_optimizer_state(self) -> None:
        """A fresh engine has no Adam state (torch creates it in the first step, and ZeRO
        links its per-parameter views then): one step at learning rate 0 on zero gradients
        creates it and changes no weight. The LR schedule and counters it advances are
        restored afterwards."""
        groups = self._ds.optimizer.param_groups
        rates = [g["lr"] for g in groups]
        for group in groups:
            group["lr"] = 0.0
        self._zero_step()
        for group, rate in zip(groups, rates):
            group["lr"] = rate
        self._link_optimizer_state()

    def _zero_step(self) -> None:
        raise NotImplementedError

    def _restore_counters(self, counters: Optional[dict]) -> None:
        engine = self._ds
        if counters is None:
            return
        engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
        # the rates the next step uses: loading a scheduler's state does not set them
        for group, rate in zip(engine.lr_scheduler.optimizer.param_groups,
                               engine.lr_scheduler.get_last_lr()):
            group["lr"] = rate
        engine.global_steps = counters["global_steps"]
        engine.global_samples = counters["global_samples"]
        engine.skipped_steps = counters["skipped_steps"]
        engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()

    @torch.no_grad()
    def _set_working_copy(self, param, value: torch.Tensor) -> None:
        """The module's own copy of a weight (what forward reads)."""
        if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's partition of the flat weight
            from deepspeed import comm

            local = param.ds_tensor
            start = comm.get_rank(group=param.ds_process_group) * local.numel()
            flat = value.reshape(-1)[start:start + local.numel()]
            local.zero_()
            local.view(-1)[:flat.numel()].copy_(flat.to(local.dtype))
        else:
            param.copy_(value.to(param.dtype))

    def _set_master(self, param, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
            safe_set_full_fp32_param(param, value.to(torch.float32))
        # without ZeRO the working copy is the master

    @torch.no_grad()
    def _set_moment(self, inner, param, value: torch.Tensor, key: str) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
            safe_set_full_optimizer_state(param, value.to(torch.float32), key)
            return
        state = inner.state[param]
        if key not in state:  # not used by the zero step's forward: as torch would create it
            state.setdefault("step", torch.tensor(0.0))
            state[key] = torch.zeros_like(param)
        state[key].copy_(value.to(state[key].dtype))

    @property
    def pipeline_rank(self) -> int:
        return 0

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


class DenseEngine(TrainingEngine):
    """The whole model on every rank of a data-parallel group (TP inside), ZeRO 0-3."""

    def __init__(self, config, module, deepspeed_engine):
        super().__init__(config, module, deepspeed_engine)
        # sequence parallelism: the replicated parameters' gradients sum over the
        # tensor-parallel group in the step's last backward
        self._replicated_grads = None
        if config.parallel.sequence_parallel:
            self._replicated_grads = DeferredReplicatedGradSum(replicated_parameters(module))

    def _last_micro_batch(self, last: bool) -> None:
        if self._replicated_grads is not None:
            self._replicated_grads.last_micro_batch = last

    def train_step(self, batches, iteration, collect_stats):
        """One optimizer step over the global batch with no host read in the micro-batch
        loop: the objective is the per-token loss over the whole global batch (so all micro
        batches are read first, to count their tokens), the losses and the non-finite flag
        stay device tensors, and the flag is read once, before the optimizer step."""
        engine, config = self._ds, self.config
        accumulation = config.gradient_accumulation_steps(dist.get_world_size())
        from megatron.core import parallel_state

        micro_batches = [next(batches) for _ in range(accumulation)]
        denominator = loss_denominator(
            micro_batches, parallel_state.get_data_parallel_world_size() * accumulation)
        result = StepResult()
        skipped_before = engine.skipped_steps
        nonfinite = torch.zeros((), device=runtime.current_device())
        exit_loss_seed = step_exit_loss_seed(config)
        for micro, batch in enumerate(micro_batches):
            stats_now = collect_stats and micro == 0
            out = engine(batch["tokens"], batch["labels"], loss_mask=batch.get("loss_mask"),
                         collect_stats=stats_now, loss_denominator=denominator,
                         exit_loss_seed=exit_loss_seed)
            loss = out.loss
            nonfinite = torch.maximum(nonfinite, _not_finite(loss))
            _add(result.losses, "lm loss", out.lm_loss / accumulation)
            for cycle, value in out.exit_losses.items():
                _add(result.losses, f"lm loss cycle {cycle}", value / accumulation)
            if out.exit_objective is not None:
                _add(result.losses, "exit objective", out.exit_objective / accumulation)
            if micro == accumulation - 1:
                # the step's one host read: any rank's non-finite loss, before it steps
                nonfinite = _any_rank(nonfinite)
                stepping_nonfinite = bool(nonfinite.item())
                if stepping_nonfinite and config.train.nonfinite_loss == "stop":
                    raise _nonfinite_stop(iteration, result.losses)
                if stepping_nonfinite:
                    # every rank's gradients non-finite, so that ZeRO's overflow check skips
                    # the step on all of them
                    loss = loss * float("nan")
            self._last_micro_batch(micro == accumulation - 1)
            engine.backward(loss)
            engine.step()
            if stats_now:
                plan = self.module.plan
                for cycle, value in zero_attention_by_cycle(plan, out.zero_attention).items():
                    result.stats[f"zero-attention/cycle {cycle}"] = value.detach()
                for name, value in out.zero_attention.items():
                    result.stats[f"zero-attention/{name}"] = value.detach()
                for cycle, value in out.gate.items():
                    result.stats[f"gate/cycle {cycle}"] = value.detach()
        result.skipped = engine.skipped_steps > skipped_before
        if stepping_nonfinite and not result.skipped:
            raise NonFiniteLossError(f"iteration {iteration}: non-finite loss but the optimizer "
                                     f"did not skip the step")
        return result

    def evaluate(self, batches, iterations, exit_threshold):
        def forward(batch, threshold):
            return self._ds(batch["tokens"], batch["labels"], loss_mask=batch.get("loss_mask"),
                            exit_threshold=threshold, collect_stats=False)

        micro_batches = iterations * self.config.gradient_accumulation_steps(dist.get_world_size())
        return evaluate(forward, batches, micro_batches, exit_threshold)

    def _zero_step(self):
        """One optimizer step on zero gradients: every micro batch a forward of zero tokens
        whose loss is multiplied by 0 (ZeRO 2-3 take gradients only through backward)."""
        engine, train = self._ds, self.config.train
        tokens = torch.zeros(train.micro_batch_size, self.config.model.seq_length,
                             dtype=torch.long, device=runtime.current_device())
        steps = engine.gradient_accumulation_steps()
        for micro in range(steps):
            out = engine(tokens, tokens, collect_stats=False)
            self._last_micro_batch(micro == steps - 1)
            engine.backward(out.loss * 0.0)
            engine.step()

    def checkpoint_files(self):
        """Under ZeRO-3 every rank writes its own partitions (DeepSpeed's ``safe_get_local_*``
        API: no gather), so that a save holds no more than this rank's share; the readers
        join the partitions (``SliceReader``)."""
        if self.config.parallel.zero_stage != 3:
            return super().checkpoint_files()
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
        from megatron.core import parallel_state

        names = self.canonical_names()
        weights = {}
        optimizer = {"fp32": {}, **{key: {} for key in self.MOMENTS},
                     "step": self._optimizer_step_count()}
        for module_name, param in self.module.named_parameters():
            name = names[module_name]
            weights[name] = param.ds_tensor.detach().reshape(-1).cpu().clone()
            if not param.requires_grad:
                continue
            for key in self.MOMENTS:
                optimizer[key][name] = safe_get_local_optimizer_state(param, key).detach() \
                    .reshape(-1).cpu().clone()
            if param.dtype != torch.float32:
                optimizer["fp32"][name] = safe_get_local_fp32_param(param).detach() \
                    .reshape(-1).cpu().clone()
        slice_ = (0, parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_data_parallel_rank())
        return {model_file(*slice_): weights, optimizer_file(*slice_): optimizer}

    def zero_partitions(self):
        if self.config.parallel.zero_stage != 3:
            return None
        from megatron.core import parallel_state

        names = self.canonical_names()
        return {"data": parallel_state.get_data_parallel_world_size(),
                "shapes": {names[n]: list(p.ds_shape) for n, p in self.module.named_parameters()}}

    def local_state_dict(self, keep: bool = True):
        """Under ZeRO-3 each weight is gathered on its own (collective), so that no rank ever
        holds more than one whole weight besides what it returns; ``keep=False`` (a rank
        that only takes part in the gathers) returns nothing."""
        import deepspeed

        out = {}
        for name, param in self.module.named_parameters():
            gathered = (deepspeed.zero.GatheredParameters([param])
                        if hasattr(param, "ds_id") else contextlib.nullcontext())
            with gathered:
                if keep:
                    out[name] = param.detach().cpu().clone()
        return out

    @staticmethod
    def load_weights_into(module, full):
        load_full_state_dict(module, full)


class CircularPipelineEngine(TrainingEngine):
    """This rank's stage of the circular pipeline (``parallel/circular.py``): its slice of the
    cycled block once, C virtual stages over it, TP inside and ZeRO 0-1 over its data-parallel
    ranks.

    One step: ``torch.distributed.pipelining`` runs forward and backward of every micro batch
    over the ring (each micro batch's objective divided by the micro-batch count, the
    schedule's own scaling off); the tied embedding's two gradient contributions are summed;
    DeepSpeed averages the gradients over the data-parallel group (``allreduce_gradients``) and
    steps. Clipping uses the norm over all stages: DeepSpeed's ZeRO-1 norm is reduced over the
    tensor x pipeline group (``CircularPipelineMPU``); without ZeRO (stage 0) DeepSpeed's
    clipping is off and this engine clips by the same global norm itself.
    """

    def __init__(self, config, module, deepspeed_engine):
        super().__init__(config, module, deepspeed_engine)
        from megatron_ztt.parallel.circular import build_schedule

        self.micro_batches = config.gradient_accumulation_steps(dist.get_world_size())
        self._own_clipping = config.parallel.zero_stage == 0 and config.train.clip_grad > 0
        self._grad_norm: Optional[torch.Tensor] = None
        self._denominator: Optional[torch.Tensor] = None
        self._losses: Dict[str, torch.Tensor] = {}
        self._log = lambda message: print(message, flush=True) if dist.get_rank() == 0 else None
        self.schedule = build_schedule(module, self.micro_batches, config.train.micro_batch_size,
                                       self._micro_batch_loss, runtime.current_device(),
                                       self._log)
        self._eval_schedules = {}  # with exits or not -> the forward-only schedule
        # bf16: the shared block's C x M gradient contributions add up in fp32
        self.fp32_grad_sums = Fp32GradientSums(module.parameters())
        # sequence parallelism: the replicated parameters' gradients sum over the
        # tensor-parallel group once per step, after the ring
        self._replicated = []
        if config.parallel.sequence_parallel:
            self._replicated = replicated_parameters(module)

    def _collect_grads(self) -> None:
        """The step's gradients into ``.grad``: the fp32 sums rounded once, the replicated
        parameters' summed over the tensor-parallel group (sequence parallelism)."""
        self.fp32_grad_sums.write_grads()
        all_reduce_replicated_grads(self._replicated)

    # ------------------------------------------------------------------ the ring
    def _micro_batch_loss(self, outputs, target):
        """The schedule's loss_fn on the last stage. ``target`` is this micro batch's labels
        (and loss mask) as the schedule split them, so nothing is read by the host here."""
        from megatron_ztt.parallel.circular import micro_batch_losses

        labels = target[:, 0]
        loss_mask = target[:, 1] if target.shape[1] > 1 else None
        training = self.module.training
        objective, losses = micro_batch_losses(self.module, outputs, labels, loss_mask,
                                               training, self._denominator if training else None)
        share = 1.0 / self.micro_batches
        _add(self._losses, "lm loss", losses[self.config.model.num_cycles] * share)
        if training:
            for cycle, value in losses.items():
                _add(self._losses, f"lm loss cycle {cycle}", value * share)
        return objective * share

    def _run(self, schedule, batches, evaluation: bool) -> None:
        """One global batch through ``schedule``: the first rank feeds the tokens, the last
        the labels and loss masks as the schedule's target (split per micro batch with the
        tokens), and counts the global batch's tokens for the per-token loss."""
        from megatron.core import parallel_state

        module = self.module
        tokens, target = None, None
        if module.is_first or module.is_last:
            micro = [next(batches) for _ in range(self.micro_batches)]
            tokens = torch.cat([b["tokens"] for b in micro])
            labels = torch.cat([b["labels"] for b in micro])
            if all(b.get("loss_mask") is None for b in micro):
                target = labels[:, None]
            else:
                masks = torch.cat([b["loss_mask"] if b.get("loss_mask") is not None
                                   else torch.ones_like(b["labels"]) for b in micro])
                target = torch.stack([labels, masks.to(labels.dtype)], dim=1)
            if module.is_last and not evaluation:
                self._denominator = loss_denominator(
                    micro, parallel_state.get_data_parallel_world_size() * self.micro_batches)
                # the exit losses are computed where their states are, mid-ring: they read
                # each micro batch's targets (split as the schedule splits ``target``)
                module.begin_step([(t[:, 0], t[:, 1] if t.shape[1] > 1 else None)
                                   for t in target.tensor_split(self.micro_batches)],
                                  self._denominator, 1.0 / self.micro_batches)
        args = (tokens,) if module.is_first else ()
        run = schedule.eval if evaluation else schedule.step
        run(*args, target=target if module.is_last else None, return_outputs=False)

    def train_step(self, batches, iteration, collect_stats):
        """One step with no host read in the micro-batch loop (the losses accumulate as
        device tensors); the non-finite flag is read once, before the optimizer step."""
        engine, module, config = self._ds, self.module, self.config
        module.collect_stats = collect_stats
        module.tally.reset()
        module.exit_loss_seed = step_exit_loss_seed(config)
        self._losses = {}
        skipped_before = engine.skipped_steps
        self._run(self.schedule, batches, evaluation=False)
        self._collect_grads()
        module.collect_stats = False
        stats = module.read_statistics() if collect_stats else {}
        losses = self._losses
        local = torch.zeros((), device=runtime.current_device())
        for value in losses.values():
            local = torch.maximum(local, _not_finite(value))
        nonfinite = bool(_any_rank(local).item())  # the step's one host read
        if nonfinite and config.train.nonfinite_loss == "stop":
            raise _nonfinite_stop(iteration, losses)
        module.reduce_tied_embedding_grad()
        engine.allreduce_gradients()
        if self._own_clipping:
            self._clip_by_global_norm(config.train.clip_grad)
        engine.step()
        for param in module.parameters():
            param.grad = None
        skipped = engine.skipped_steps > skipped_before
        if nonfinite and not skipped:
            raise NonFiniteLossError(f"iteration {iteration}: non-finite loss but the optimizer "
                                     f"did not skip the step")
        return StepResult(dict(losses), stats, skipped)

    @torch.no_grad()
    def _clip_by_global_norm(self, max_norm: float) -> None:
        """Without ZeRO: clip every stage's (data-parallel averaged) gradients by the norm over
        all stages, each parameter counted once (tensor shards on every tensor rank,
        replicated parameters on tensor rank 0, the tied embedding's copy not at all)."""
        from megatron.core import parallel_state

        from megatron_ztt.parallel.circular import PIPE_REPLICATED

        tensor_rank = parallel_state.get_tensor_model_parallel_rank()
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        counted = [p.grad.float() for p in self.module.parameters()
                   if p.grad is not None and not getattr(p, PIPE_REPLICATED, False)
                   and (getattr(p, "tensor_model_parallel", False) or tensor_rank == 0)]
        total = torch.zeros(1, device=runtime.current_device())
        for grad in counted:
            total += grad.pow(2).sum()
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
        norm = total.sqrt()[0]
        self._grad_norm = norm  # read when logged
        # on the device, with no host read: scale by min(1, max_norm / norm)
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.dtype))

    def grad_norm(self):
        if not self._own_clipping:
            return super().grad_norm()
        return None if self._grad_norm is None else float(self._grad_norm)

    @torch.no_grad()
    def evaluate(self, batches, iterations, exit_threshold):
        """Validation over the ring; with ``exit_threshold`` each token stops as the training
        model's exit rule says (``model.exit_signal``, per token)."""
        from megatron.core import parallel_state

        from megatron_ztt.parallel.circular import evaluation_schedule

        exits = exit_threshold is not None
        if exits not in self._eval_schedules:  # forward only, the final exit's logits only
            self._eval_schedules[exits] = evaluation_schedule(
                self.module, self.micro_batches, self.config.train.micro_batch_size,
                self._micro_batch_loss, runtime.current_device(), exits)
        self.module.start_evaluation(exit_threshold)
        self._losses = {}
        total = 0.0
        try:
            for _ in range(iterations):
                self._run(self._eval_schedules[exits], batches, evaluation=True)
                total += float(self._losses.pop("lm loss", 0.0))
            used = self.module.cycles_used
            cycles = (sum(float(u.float().sum()) for u in used), sum(u.numel() for u in used))
        finally:
            self.module.start_evaluation(None)
        # the loss and the cycles live on the last stage: share them with the others
        last = self.module.is_last
        value = torch.tensor([total if last else 0.0, cycles[0] if last else 0.0,
                              cycles[1] if last else 0.0], device=runtime.current_device())
        dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
        mean_cycles = ((value[1] / value[2].clamp(min=1)).item() if exits
                       else float(self.config.model.num_cycles))
        return {"loss": value[0].item() / max(1, iterations), "mean_cycles": mean_cycles}

    @property
    def pipeline_rank(self) -> int:
        return self.module.rank

    def _zero_step(self):
        """One optimizer step on zero gradients, handed over as in a training step: a
        backward (of 0 x the parameters, through ZeRO's gradient hooks), the data-parallel
        reduction, the step."""
        trained = [p for p in self.module.parameters() if p.requires_grad]
        torch.stack([(p * 0.0).sum() for p in trained]).sum().backward()
        self._collect_grads()
        self._ds.allreduce_gradients()
        self._ds.step()
        for param in self.module.parameters():
            param.grad = None

    def local_state_dict(self, keep: bool = True):
        if not keep:
            return {}
        return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters()}

    @staticmethod
    def load_weights_into(module, full):
        missing = sorted(n for n, _ in module.named_parameters() if n not in full)
        if missing:
            raise CheckpointError(f"the initial weights have no {missing[:8]} for pipeline "
                                  f"rank {module.rank}")
        load_full_state_dict(module, full, strict=False)


NEW_PARAMETERS = ("zero_token_pool.", "gates.")  # what ZTT adds to a plain transformer


def freeze_all_but_new(model: torch.nn.Module) -> None:
    """train.trainable=new: only the zero keys and gates train. Frozen parameters stay out of
    the optimizer (``parameter_groups``), so DeepSpeed never changes them."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(NEW_PARAMETERS))


def build_model(config: RunConfig) -> torch.nn.Module:
    """This rank's module, before DeepSpeed wraps it: the whole ``ZTTModel`` (tensor parallel
    inside) or, with ``parallel.pipeline > 1``, this pipeline rank's ``CircularStage``. Also
    what ``ztt plan`` builds on the meta device for every rank."""
    if config.parallel.pipeline > 1:
        from megatron.core import parallel_state

        from megatron_ztt.parallel.circular import CircularStage

        stage = CircularStage(config.model, parallel_state.get_pipeline_model_parallel_rank(),
                              config.parallel.pipeline)
        stage.use_sequence_parallel(config.parallel.sequence_parallel)
        return stage
    from megatron_ztt.model.ztt import ZTTModel

    model = ZTTModel(config.model)
    model.use_sequence_parallel(config.parallel.sequence_parallel)
    return model


def build_engine(config: RunConfig) -> TrainingEngine:
    """The model on this rank, wrapped in the DeepSpeed engine its layout needs."""
    import deepspeed

    from megatron_ztt.parallel.mpu import MegatronMPU
    from megatron_ztt.training.optimizer import deepspeed_config, lr_multiplier, parameter_groups

    world = dist.get_world_size()
    model = build_model(config)
    if config.parallel.pipeline > 1:
        from megatron_ztt.parallel.circular import describe_ring
        from megatron_ztt.parallel.mpu import CircularPipelineMPU

        mpu, kind = CircularPipelineMPU, CircularPipelineEngine
        if dist.get_rank() == 0:
            for line in describe_ring(config.model, config.parallel.pipeline):
                print(line, flush=True)
    else:
        mpu, kind = MegatronMPU, DenseEngine
        if config.parallel.zero_stage == 3:
            # ZeRO-3 gathers a parameter only around its own module's forward: the output head
            # reads the embedding's weight and each layer its applications' zero keys.
            register = deepspeed.zero.register_external_parameter
            if config.model.tie_embeddings:
                register(model.output_head, model.embedding.weight)
            if model.zero_token_pool is not None:
                for app in model.plan:
                    register(model.layers[app.layer], model.zero_token_pool[app.name])
    if config.train.init_from:
        kind.load_weights_into(model, load_initial_weights(config.train.init_from, config.model))
        if dist.get_rank() == 0:
            print(f"initialised the weights from {config.train.init_from}", flush=True)
    if config.train.trainable == "new":
        freeze_all_but_new(model)
        if dist.get_rank() == 0:
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            print(f"train.trainable=new: {trained:,} of {total:,} parameters on rank 0 train "
                  f"(zero keys and gates); the rest are frozen", flush=True)
    model.to(runtime.current_device())
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, config.train.weight_decay),
        config=deepspeed_config(config, world),
        mpu=mpu,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_multiplier(config)),
    )
    return kind(config, model, ds_engine)
