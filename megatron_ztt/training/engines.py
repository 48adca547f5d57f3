"""The one boundary around DeepSpeed: a training engine for each kind of model.

The training loop (``train.py``), validation and checkpoints talk to a
:class:`TrainingEngine` only: one optimizer step, an evaluation loss at an exit threshold,
save, load and the canonical full state dict. :class:`DenseEngine` wraps the whole model
(``ZTTModel``) in DeepSpeed with ZeRO stage 0-3; :class:`PipelineEngine` wraps this rank's
pipeline stage in DeepSpeed's pipeline engine. DeepSpeed's file names, private attributes
and entry points appear in this module (and in the pipeline stage module it drives) only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_ztt.checkpoint import ENGINE_DIR, CheckpointError, load_weights, model_file
from megatron_ztt.config import RunConfig
from megatron_ztt.model.cycle_engine import zero_attention_by_cycle
from megatron_ztt.parallel import runtime
from megatron_ztt.parallel.sharding import load_full_state_dict, merge_shards, partition_spec
from megatron_ztt.training.metrics import optimizer_state_bytes


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepResult:
    losses: Dict[str, float] = field(default_factory=dict)  # this rank's, local
    stats: Dict[str, float] = field(default_factory=dict)  # zero attention, gates (local)
    skipped: bool = False  # the optimizer skipped the step (non-finite gradients)


Batch = Dict[str, torch.Tensor]


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=runtime.current_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() > 0


class TrainingEngine:
    """What the training loop, validation and checkpoints may ask of a model under DeepSpeed."""

    evaluates_exits = True  # whether evaluate() honours an exit threshold

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
    def local_state_dict(self) -> Dict[str, torch.Tensor]:
        """This rank's (tensor-parallel shard of its stage's) weights, canonical names."""
        raise NotImplementedError

    def local_partition_spec(self) -> Dict[str, tuple]:
        raise NotImplementedError

    def canonical_names(self) -> Dict[str, str]:
        """This rank's module parameter name -> its name in the canonical state dict."""
        raise NotImplementedError

    @staticmethod
    def load_weights_into(module: torch.nn.Module, full: Dict[str, torch.Tensor]) -> None:
        """Full weights into this rank's part of ``module``, before DeepSpeed copies them
        into its optimizer."""
        raise NotImplementedError

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The canonical full state dict, on every rank (collective over all ranks)."""
        from megatron.core import parallel_state

        size = parallel_state.get_tensor_model_parallel_world_size()
        local, spec = self.local_state_dict(), self.local_partition_spec()
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
    def save(self, tag_dir: str) -> None:
        """Collective. The engine's own files go to ``tag_dir/engine``; each stage and
        tensor-parallel rank's weights to its model file (data-parallel rank 0 writes)."""
        from megatron.core import parallel_state

        from megatron_ztt.files import save_torch_atomic

        self._ds.save_checkpoint(tag_dir, tag=ENGINE_DIR, client_state={}, save_latest=False)
        weights = self.local_state_dict()  # collective under ZeRO-3
        if parallel_state.get_data_parallel_rank() == 0:
            path = os.path.join(tag_dir, model_file(self.pipeline_rank,
                                                    parallel_state.get_tensor_model_parallel_rank()))
            save_torch_atomic({k: v.detach().cpu().clone() for k, v in weights.items()}, path)

    def load(self, tag_dir: str) -> None:
        """Collective: weights, optimizer and LR schedule from a checkpoint of this layout."""
        try:
            path, _ = self._ds.load_checkpoint(tag_dir, tag=ENGINE_DIR, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        except (RuntimeError, OSError, EOFError, KeyError) as error:
            raise CheckpointError(f"cannot resume from {tag_dir}: {error}") from error
        if path is None:
            raise CheckpointError(f"DeepSpeed found no engine state in {tag_dir}/{ENGINE_DIR}")

    @property
    def pipeline_rank(self) -> int:
        return 0

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


class DenseEngine(TrainingEngine):
    """The whole model on every rank of a data-parallel group (TP inside), ZeRO 0-3."""

    def train_step(self, batches, iteration, collect_stats):
        engine, config = self._ds, self.config
        accumulation = config.gradient_accumulation_steps(dist.get_world_size())
        result = StepResult()
        skipped_before = engine.skipped_steps
        nonfinite = False
        for micro in range(accumulation):
            batch = next(batches)
            out = engine(batch["tokens"], batch["labels"], loss_mask=batch.get("loss_mask"),
                         collect_stats=collect_stats and micro == 0)
            loss = out.loss
            if _any_rank(not torch.isfinite(loss.detach()).all().item()):
                nonfinite = True
                if config.train.nonfinite_loss == "stop":
                    raise NonFiniteLossError(
                        f"iteration {iteration}: non-finite loss in micro batch {micro} (rank "
                        f"{dist.get_rank()}'s loss: {loss.item()}); stopping as "
                        f"train.nonfinite_loss=stop asks. The last checkpoint is unchanged.")
                # every rank's gradients non-finite, so that ZeRO's overflow check skips the
                # step on all of them
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            result.losses["lm loss"] = result.losses.get("lm loss", 0.0) + out.lm_loss.item() / accumulation
            for cycle, value in out.exit_losses.items():
                key = f"lm loss cycle {cycle}"
                result.losses[key] = result.losses.get(key, 0.0) + value.item() / accumulation
            if collect_stats and micro == 0:
                plan = self.module.plan
                for cycle, value in zero_attention_by_cycle(plan, out.zero_attention).items():
                    result.stats[f"zero-attention/cycle {cycle}"] = value.item()
                for name, value in out.zero_attention.items():
                    result.stats[f"zero-attention/{name}"] = value.item()
                for cycle, value in out.gate.items():
                    result.stats[f"gate/cycle {cycle}"] = value.item()
        result.skipped = engine.skipped_steps > skipped_before
        if nonfinite and not result.skipped:
            raise NonFiniteLossError(f"iteration {iteration}: non-finite loss but the optimizer "
                                     f"did not skip the step")
        return result

    @torch.no_grad()
    def evaluate(self, batches, iterations, exit_threshold):
        micro_batches = iterations * self.config.gradient_accumulation_steps(dist.get_world_size())
        loss_sum, cycles_sum, tokens = 0.0, 0.0, 0
        for _ in range(micro_batches):
            batch = next(batches)
            out = self._ds(batch["tokens"], batch["labels"], loss_mask=batch.get("loss_mask"),
                           exit_threshold=exit_threshold, collect_stats=False)
            loss_sum += out.lm_loss.item()
            cycles_sum += out.cycles_used.float().sum().item()
            tokens += out.cycles_used.numel()
        return {"loss": loss_sum / max(1, micro_batches),
                "mean_cycles": cycles_sum / max(1, tokens)}

    def _zero3_gathered(self):
        import deepspeed

        if self.config.parallel.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.module.parameters()))
        import contextlib

        return contextlib.nullcontext()

    def local_state_dict(self):
        with self._zero3_gathered():
            return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters()}

    def local_partition_spec(self):
        return partition_spec(self.module)

    def canonical_names(self):
        return {name: name for name, _ in self.module.named_parameters()}

    @staticmethod
    def load_weights_into(module, full):
        load_full_state_dict(module, full)


class PipelineEngine(TrainingEngine):
    """This rank's pipeline stage under DeepSpeed's pipeline engine (TP inside, ZeRO 0-2)."""

    evaluates_exits = False  # the stages pass no exit decisions yet: full depth only

    @staticmethod
    def _micro_batches(batches):
        for batch in batches:
            yield (batch["tokens"],), (batch["labels"], batch["loss_mask"])

    def train_step(self, batches, iteration, collect_stats):
        engine, module, config = self._ds, self.module, self.config
        module.collect_stats = collect_stats
        module.reset_statistics()
        skipped_before = engine.skipped_steps
        loss = engine.train_batch(data_iter=self._micro_batches(batches))
        losses, stats = module.read_statistics()
        module.collect_stats = False
        skipped = engine.skipped_steps > skipped_before
        if not torch.isfinite(loss).all():
            if config.train.nonfinite_loss == "stop":
                raise NonFiniteLossError(f"iteration {iteration}: non-finite loss ({loss.item()}); "
                                         f"stopping as train.nonfinite_loss=stop asks")
            if not skipped:
                raise NonFiniteLossError(f"iteration {iteration}: non-finite loss but the "
                                         f"optimizer did not skip the step")
        return StepResult(losses, stats, skipped)

    @torch.no_grad()
    def evaluate(self, batches, iterations, exit_threshold):
        if exit_threshold is not None:
            raise ValueError("pipeline validation runs at full depth only")
        data = self._micro_batches(batches)
        total = sum(self._ds.eval_batch(data_iter=data).item() for _ in range(iterations))
        self.module.reset_statistics()
        return {"loss": total / max(1, iterations),
                "mean_cycles": float(self.config.model.num_cycles)}

    @property
    def pipeline_rank(self) -> int:
        return self.module.stage_id

    def load(self, tag_dir):
        from megatron.core import parallel_state

        from megatron_ztt.checkpoint import read_model_file

        super().load(tag_dir)
        tensor_rank = parallel_state.get_tensor_model_parallel_rank()
        self.module.load_local_state_dict(
            read_model_file(os.path.join(tag_dir, model_file(self.pipeline_rank, tensor_rank))))

    def local_state_dict(self):
        return self.module.canonical_state_dict()

    def local_partition_spec(self):
        return self.module.canonical_partition_spec()

    def canonical_names(self):
        from megatron_ztt.parallel.pipeline import canonical_name

        return {name: canonical_name(name) for name, _ in self.module.named_parameters()}

    @staticmethod
    def load_weights_into(module, full):
        module.load_canonical_state_dict(full)


def build_engine(config: RunConfig) -> TrainingEngine:
    """The model on this rank, wrapped in the DeepSpeed engine its layout needs."""
    import deepspeed

    from megatron_ztt.parallel.mpu import MegatronMPU
    from megatron_ztt.training.optimizer import deepspeed_config, lr_multiplier, parameter_groups

    world = dist.get_world_size()
    if config.parallel.pipeline > 1:
        from megatron_ztt.parallel.pipeline import build_pipeline_model

        model, mpu, kind = build_pipeline_model(config), None, PipelineEngine
    else:
        from megatron_ztt.model.ztt import ZTTModel

        model, mpu, kind = ZTTModel(config.model), MegatronMPU, DenseEngine
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
        kind.load_weights_into(model, load_weights(config.train.init_weights))
        if dist.get_rank() == 0:
            print(f"initialised the weights from {config.train.init_weights}", flush=True)
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
