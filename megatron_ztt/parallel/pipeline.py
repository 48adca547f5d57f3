"""Pipeline parallelism over the unrolled sequence of layer applications.

The model becomes DeepSpeed's ``PipelineModule`` with one unit per layer application
(embedding, head, C x middle layers, tail, final norm, output), partitioned over stages so
that each stage runs about the same number of applications. megatron-core's tensor-parallel
layers run inside every stage.

* Every distinct layer is a ``TiedLayerSpec`` keyed ``layer<l>`` whose **every** parameter is
  tied: a stage that runs cycle c's copy of middle layer l holds a replica, and DeepSpeed
  all-reduces the replicas' gradients over exactly the stages that hold one (tied weights
  whose names are not all listed drift apart silently).
* The zero-token pool entries and the gates of a stage's applications live on that stage
  only (``zero_token_pool.keys.<application>``, ``gates.<cycle>``).
* Between stages travels ``(hidden, [cycle input], *exit states)``: the cycle's input while a
  cycle is open (the gate needs it), and the states after earlier cycles whose exit losses
  are weighted, so that the tail and output on the last stage train those exits too.
* Checkpoints store each stage's weights under the single-stage model's names
  (``ztt_stage<pp>_tp<tp>.pt``), so that the export reads every layout alike.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state, tensor_parallel

from megatron_ztt.model.attention import ZeroTokenContext, ZeroTokenPool
from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.layers import (CycleGate, TokenEmbedding, build_norm,
                                       build_transformer_layer, language_model_loss,
                                       rotary_embedding, transformer_config)
from megatron_ztt.model.plan import Application, application_plan, tail_applications
from megatron_ztt.model.ztt import all_reduce_tensor_parallel
from megatron_ztt.parallel.sharding import partition_spec, split_full


# ------------------------------------------------------------------------ pipeline units
class EmbeddingPipe(torch.nn.Module):
    def __init__(self, config: ZTTConfig):
        super().__init__()
        self.embedding = TokenEmbedding(config)

    def forward(self, inputs):
        tokens = inputs[0] if isinstance(inputs, tuple) else inputs
        return (self.embedding(tokens),)


class TransformerLayerPipe(torch.nn.Module):
    """One distinct layer; run by :class:`ApplicationStep` once per application."""

    def __init__(self, config: ZTTConfig, layer_index: int):
        super().__init__()
        self.layer = build_transformer_layer(config, layer_index)


class FinalNormPipe(torch.nn.Module):
    def __init__(self, config: ZTTConfig):
        super().__init__()
        self.final_norm = build_norm(config)

    def forward(self, states):
        return tuple(self.final_norm(state) for state in states)


class OutputLayerPipe(torch.nn.Module):
    """Untied output projection: normed states -> vocab-parallel logits."""

    def __init__(self, config: ZTTConfig):
        super().__init__()
        megatron_config = transformer_config(config)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, config.padded_vocab_size, config=megatron_config,
            init_method=megatron_config.init_method, bias=False, gather_output=False)

    def forward(self, states):
        return tuple(self.output_layer(state)[0] for state in states)


def tied_output_projection(embedding: EmbeddingPipe, states):
    """Output projection with the word embedding (tied embeddings, last stage's replica)."""
    weight = embedding.embedding.weight
    return tuple(
        tensor_parallel.linear_with_grad_accumulation_and_async_allreduce(
            input=tensor_parallel.copy_to_tensor_model_parallel_region(state), weight=weight,
            bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
            sequence_parallel=False)
        for state in states)


def _exit_cycles(config: ZTTConfig) -> List[int]:
    """0-based cycles whose state travels on for a weighted exit loss (the last one is the
    model's own output)."""
    return [c for c, w in enumerate(config.exit_weights) if w > 0 and c < config.num_cycles - 1]


class ApplicationStep:
    """``forward_fn`` of one layer application: (its tied layer, carried state) -> state.

    Reads this application's zero key and (at the end of a cycle) the cycle's gate from the
    stage that runs it, and records statistics there when asked.
    """

    def __init__(self, config: ZTTConfig, app: Application):
        self.config = config
        self.app = app
        self.stage: "ZTTPipelineModule" = None  # bound once the stage is built
        self.is_tail = app in tail_applications(application_plan(config))

    def __call__(self, unit: TransformerLayerPipe, inputs):
        app, stage = self.app, self.stage
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        carries_cycle_input = app.cycle is not None and not app.starts_cycle
        hidden = inputs[0]
        cycle_input = inputs[1] if carries_cycle_input else hidden
        exits = list(inputs[2 if carries_cycle_input else 1:])
        rope = rotary_embedding(self.config, hidden.shape[0], hidden.device)

        key = stage.zero_token_pool[app.name] if stage.zero_token_pool is not None else None
        context = ZeroTokenContext(key=key, record=stage.collect_stats and key is not None)
        hidden = unit.layer(hidden, attention_mask=None, rotary_pos_emb=rope,
                            attention_bias=context)[0]
        stage.record_zero_attention(app.name, context)
        if self.is_tail:  # the exits go through the tail too
            exits = [unit.layer(state, attention_mask=None, rotary_pos_emb=rope,
                                attention_bias=ZeroTokenContext(key=key))[0] for state in exits]
        if app.cycle is None:
            return (hidden, *exits)
        if not app.ends_cycle:
            return (hidden, cycle_input, *exits)
        if stage.gates is not None:
            hidden, gate = stage.gates[str(app.cycle)](cycle_input, hidden)
            stage.record_gate(app.cycle + 1, gate)
        if app.cycle in _exit_cycles(self.config):
            exits.append(hidden)
        return (hidden, *exits)


# ------------------------------------------------------------------------ the module
_CANONICAL_NAMES = [
    (re.compile(r"^tied_modules\.word_embeddings\.embedding\."), "embedding."),
    (re.compile(r"^\d+\.embedding\."), "embedding."),
    (re.compile(r"^tied_modules\.layer(\d+)\.layer\."), r"layers.\1."),
    (re.compile(r"^\d+\.final_norm\."), "output_head.final_norm."),
    (re.compile(r"^\d+\.output_layer\."), "output_head.output_layer."),
    (re.compile(r"^(zero_token_pool|gates)\."), r"\1."),
]


def canonical_name(stage_name: str) -> str:
    """A stage's parameter name -> the single-stage ZTTModel's name."""
    for pattern, replacement in _CANONICAL_NAMES:
        if pattern.match(stage_name):
            return pattern.sub(replacement, stage_name, count=1)
    raise KeyError(f"no canonical name for pipeline parameter {stage_name}")


def layer_specs(config: ZTTConfig) -> list:
    plan = application_plan(config)
    specs = []
    if config.tie_embeddings:
        specs.append(TiedLayerSpec("word_embeddings", EmbeddingPipe, config,
                                   tied_weight_attr=["embedding.word_embeddings.weight"]))
    else:
        specs.append(LayerSpec(EmbeddingPipe, config))
    # every parameter of a shared layer is tied, or the replicas drift apart
    layer_params = [f"layer.{name}" for name in _layer_parameter_names(config)]
    for app in plan:
        specs.append(TiedLayerSpec(f"layer{app.layer}", TransformerLayerPipe, config, app.layer,
                                   forward_fn=ApplicationStep(config, app),
                                   tied_weight_attr=layer_params))
    specs.append(LayerSpec(FinalNormPipe, config))
    if config.tie_embeddings:
        specs.append(TiedLayerSpec("word_embeddings", EmbeddingPipe, config,
                                   forward_fn=tied_output_projection,
                                   tied_weight_attr=["embedding.word_embeddings.weight"]))
    else:
        specs.append(LayerSpec(OutputLayerPipe, config))
    return specs


def _layer_parameter_names(config: ZTTConfig) -> List[str]:
    with torch.random.fork_rng():  # a throw-away layer must not shift the weights' RNG stream
        return [name for name, _ in build_transformer_layer(config, 0).named_parameters()]


class ZTTPipelineModule(PipelineModule):
    """This rank's pipeline stage of the ZTT."""

    def __init__(self, config: ZTTConfig, topology, partition: str = "applications"):
        method = "type:TransformerLayerPipe" if partition == "applications" else "uniform"
        super().__init__(layers=layer_specs(config), topology=topology, loss_fn=None,
                         partition_method=method, activation_checkpoint_interval=0)
        self.config = config
        self.loss_fn = self.language_model_loss
        self.plan = application_plan(config)
        self.local_applications = [a for a in self.plan
                                   if self._local_start <= a.index + 1 < self._local_stop]
        self.zero_token_pool = (
            ZeroTokenPool(self.local_applications, config.query_groups, config.head_dim,
                          config.init_std) if config.zero_token else None)
        local_cycles = sorted({a.cycle for a in self.local_applications if a.ends_cycle})
        self.gates = (torch.nn.ModuleDict({str(c): CycleGate(config) for c in local_cycles})
                      if config.gate and local_cycles else None)
        for func in self.forward_funcs:
            if isinstance(func, functools.partial) and isinstance(func.func, ApplicationStep):
                func.func.stage = self
        self.collect_stats = False
        self.reset_statistics()

    # ------------------------------------------------------------------ description
    def describe_partition(self) -> List[str]:
        """One line per stage: which units it runs (collective-free: from the specs)."""
        names = ["embedding"] + [a.name for a in self.plan] + ["final norm", "output"]
        lines = []
        for stage in range(self.num_stages):
            start, stop = self.parts[stage], self.parts[stage + 1]
            runs = names[start:stop]
            apps = sum(1 for n in runs if n in {a.name for a in self.plan})
            lines.append(f"pipeline stage {stage}: {apps} applications: {', '.join(runs)}")
        return lines

    # ------------------------------------------------------------------ loss and statistics
    def language_model_loss(self, outputs, labels):
        """Last stage: the weighted exit losses (training) or the final LM loss (eval)."""
        labels, loss_mask = labels
        final_logits, *exit_logits = outputs
        lm_loss = language_model_loss(final_logits, labels, loss_mask)
        self._add_loss("lm loss", lm_loss)
        weights = self.config.exit_weights
        total = weights[-1] * lm_loss if weights[-1] > 0 else 0.0
        for cycle, logits in zip(_exit_cycles(self.config), exit_logits):
            loss = language_model_loss(logits, labels, loss_mask)
            self._add_loss(f"lm loss cycle {cycle + 1}", loss)
            total = total + weights[cycle] * loss
        self._add_loss(f"lm loss cycle {self.config.num_cycles}", lm_loss)
        return total if self.training else lm_loss

    def reset_statistics(self) -> None:
        self._losses: Dict[str, List[float]] = {}
        self._zero_attention: Dict[str, Tuple[torch.Tensor, int]] = {}
        self._gates: Dict[int, List[float]] = {}

    def _add_loss(self, name: str, value: torch.Tensor) -> None:
        self._losses.setdefault(name, []).append(value.detach().float().item())

    def record_zero_attention(self, name: str, context: ZeroTokenContext) -> None:
        if context.zero_attention_sum is None:
            return
        total, rows = self._zero_attention.get(name, (0.0, 0))
        self._zero_attention[name] = (total + context.zero_attention_sum.mean(dim=1).sum(),
                                      rows + context.zero_attention_sum.shape[0])

    def record_gate(self, cycle: int, gate: torch.Tensor) -> None:
        if self.collect_stats:
            self._gates.setdefault(cycle, []).append(gate.detach().float().mean().item())

    def read_statistics(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """(losses, zero-attention and gate statistics) of the micro batches since the last
        reset; collective over the tensor-parallel group (every rank of the stage calls it)."""
        losses = {k: sum(v) / len(v) for k, v in self._losses.items()}
        stats = {}
        names = sorted(self._zero_attention)
        if names:
            sums = all_reduce_tensor_parallel(torch.stack(
                [torch.as_tensor(self._zero_attention[n][0]).float() for n in names]))
            for i, name in enumerate(names):
                rows = self._zero_attention[name][1]
                stats[f"zero-attention/{name}"] = (sums[i] / (rows * self.config.num_attention_heads)).item()
        per_cycle: Dict[int, List[float]] = {}
        for app in self.local_applications:
            key = f"zero-attention/{app.name}"
            if app.cycle is not None and key in stats:
                per_cycle.setdefault(app.cycle + 1, []).append(stats[key])
        for cycle, values in per_cycle.items():
            # a cycle split over stages is averaged per stage here and over stages by the
            # caller's reduction; with equal layers per stage that is the same mean
            stats[f"zero-attention/cycle {cycle}"] = sum(values) / len(values)
        for cycle, values in self._gates.items():
            stats[f"gate/cycle {cycle}"] = sum(values) / len(values)
        self.reset_statistics()
        return losses, stats

    # ------------------------------------------------------------------ weights
    def canonical_state_dict(self) -> Dict[str, torch.Tensor]:
        """This stage and tensor-parallel rank's weights, under ZTTModel's names."""
        state = {}
        for name, param in self.named_parameters():
            state[canonical_name(name)] = param.detach()
        return state

    def canonical_partition_spec(self) -> Dict[str, Tuple[int, int]]:
        return {canonical_name(n): v for n, v in partition_spec(self).items()}

    @torch.no_grad()
    def load_canonical_state_dict(self, full: Dict[str, torch.Tensor]) -> None:
        """Copy full (unsharded, all-stage) weights into this stage's shards."""
        spec = partition_spec(self)
        rank = parallel_state.get_tensor_model_parallel_rank()
        size = parallel_state.get_tensor_model_parallel_world_size()
        for name, param in self.named_parameters():
            canonical = canonical_name(name)
            if canonical not in full:
                raise KeyError(f"weights have no {canonical} (pipeline parameter {name})")
            tensor = full[canonical]
            if name in spec:
                tensor = split_full(tensor, rank, size, *spec[name])
            param.copy_(tensor.to(param.dtype))

    # DeepSpeed's pipeline engine saves and loads the module through these two hooks; we
    # write one file per stage and tensor-parallel rank under the single-stage names.
    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        if self._grid.data_parallel_id != 0:
            return
        from megatron_ztt.training.checkpoint import stage_file

        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, stage_file(self.stage_id, self._grid.get_slice_parallel_rank()))
        checkpoint_engine.save({k: v.clone() for k, v in self.canonical_state_dict().items()}, path)

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
        from megatron_ztt.training.checkpoint import CheckpointError, stage_file

        path = os.path.join(load_dir, stage_file(self.stage_id,
                                                 self._grid.get_slice_parallel_rank()))
        if not os.path.isfile(path):
            raise CheckpointError(f"pipeline checkpoint file {path} is missing")
        state = checkpoint_engine.load(path, map_location="cpu")
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(state[canonical_name(name)])


# ------------------------------------------------------------------------ training helpers
def build_pipeline_model(config) -> ZTTPipelineModule:
    """The stage of this rank for the run config ``config`` (a RunConfig)."""
    world = dist.get_world_size()
    topology = PipeModelDataParallelTopology(num_pp=config.parallel.pipeline,
                                             num_mp=config.parallel.tensor,
                                             num_dp=config.data_parallel_size(world))
    module = ZTTPipelineModule(config.model, topology, config.parallel.pipeline_partition)
    if dist.get_rank() == 0:
        for line in module.describe_partition():
            print(line, flush=True)
    return module


def _micro_batches(batches):
    for batch in batches:
        yield (batch["tokens"],), (batch["labels"], batch["loss_mask"])


def pipeline_train_step(engine, batches, config, iteration: int, collect_stats: bool):
    """One optimizer step through DeepSpeed's pipeline schedule."""
    from megatron_ztt.training.train import NonFiniteLossError

    module: ZTTPipelineModule = engine.module
    module.collect_stats = collect_stats
    module.reset_statistics()
    skipped_before = engine.skipped_steps
    loss = engine.train_batch(data_iter=_micro_batches(batches))
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
    return losses, stats, skipped


def pipeline_validation_loss(engine, batches, iterations: int) -> float:
    total = 0.0
    data = _micro_batches(batches)
    for _ in range(iterations):
        total += engine.eval_batch(data_iter=data).item()
    engine.module.reset_statistics()
    return total / max(1, iterations)
