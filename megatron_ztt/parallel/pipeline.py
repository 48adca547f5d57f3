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
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state, tensor_parallel

from megatron_ztt.model.attention import ZeroTokenPool
from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.cycle_engine import (Application, CycleEngine, ZeroAttentionTally,
                                             application_plan, zero_attention_by_cycle)
from megatron_ztt.model.layers import (TokenEmbedding, all_reduce_tensor_parallel, build_norm,
                                       build_transformer_layer, language_model_loss,
                                       rotary_embedding, transformer_config)
from megatron_ztt.model.seeding import init_scope
from megatron_ztt.model.ztt import GateLookup, build_gates, run_layer
from megatron_ztt.parallel.sharding import partition_spec, split_full


# ------------------------------------------------------------------------ pipeline units
class EmbeddingPipe(torch.nn.Module):
    def __init__(self, config: ZTTConfig):
        super().__init__()
        with init_scope("embedding"):
            self.embedding = TokenEmbedding(config)

    def forward(self, inputs):
        tokens = inputs[0] if isinstance(inputs, tuple) else inputs
        return (self.embedding(tokens),)


class TransformerLayerPipe(torch.nn.Module):
    """One distinct layer; run by :class:`ApplicationStep` once per application."""

    def __init__(self, config: ZTTConfig, layer_index: int):
        super().__init__()
        with init_scope(f"layer{layer_index}"):
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
        with init_scope("output_head"):  # the same stream as ZTTModel's output head
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


class ApplicationStep:
    """``forward_fn`` of one layer application: (its tied layer, carried tensors) -> tensors.

    The cycle engine decides what is carried (hidden, the open cycle's input when a gate
    reads it, the states kept for exit losses); this only runs the layer with the stage's
    zero key for the application.
    """

    def __init__(self, config: ZTTConfig, app: Application, next_app: Optional[Application]):
        self.config = config
        self.app = app
        self.next_app = next_app
        self.stage: "ZTTPipelineModule" = None  # bound once the stage is built

    def __call__(self, unit: TransformerLayerPipe, inputs):
        stage, engine = self.stage, self.stage.engine
        state = engine.unpack(self.app, inputs if isinstance(inputs, tuple) else (inputs,))
        rope = rotary_embedding(self.config, state.hidden.shape[0], state.hidden.device)
        key = stage.zero_token_pool[self.app.name] if stage.zero_token_pool is not None else None

        def run(app, hidden, run_state, record):
            return run_layer(self.config, unit.layer, app, hidden, run_state, record, rope, key,
                             {}, stage.training)

        # the exit states always travel (eval too), so that every batch sends the same tensors
        state = engine.step(self.app, state, run, keep_exit_states=True,
                            tally=stage.tally if stage.collect_stats else None)
        return engine.pack(state, self.next_app)


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
    for app, next_app in zip(plan, plan[1:] + [None]):
        specs.append(TiedLayerSpec(f"layer{app.layer}", TransformerLayerPipe, config, app.layer,
                                   forward_fn=ApplicationStep(config, app, next_app),
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
        self.gates = build_gates(config, local_cycles) if config.gate and local_cycles else None
        self.engine = CycleEngine(
            self.plan, num_cycles=config.num_cycles, num_heads=config.num_attention_heads,
            gates=GateLookup(self.gates) if config.gate else None,
            exit_loss_weights=config.exit_weights, reduce_heads=all_reduce_tensor_parallel)
        self.tally = ZeroAttentionTally(config.num_attention_heads)
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
        losses = self.engine.exit_losses(
            lm_loss, [language_model_loss(logits, labels, loss_mask) for logits in exit_logits])
        self._add_loss("lm loss", lm_loss)
        for cycle, loss in losses.items():
            self._add_loss(f"lm loss cycle {cycle}", loss)
        return self.engine.objective(losses) if self.training else lm_loss

    def reset_statistics(self) -> None:
        self._losses: Dict[str, List[float]] = {}
        self.tally.reset()

    def _add_loss(self, name: str, value: torch.Tensor) -> None:
        self._losses.setdefault(name, []).append(value.detach().float().item())

    def read_statistics(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """(losses, zero-attention and gate statistics) of the micro batches since the last
        reset; collective over the tensor-parallel group (every rank of the stage calls it)."""
        losses = {k: sum(v) / len(v) for k, v in self._losses.items()}
        per_application = self.tally.zero_attention(all_reduce_tensor_parallel)
        stats = {f"zero-attention/{name}": v.item() for name, v in per_application.items()}
        # a cycle split over stages is averaged per stage here and over stages by the
        # caller's reduction; with equal layers per stage that is the same mean
        for cycle, value in zero_attention_by_cycle(self.plan, per_application).items():
            stats[f"zero-attention/cycle {cycle}"] = value.item()
        for cycle, value in self.tally.gate_means().items():
            stats[f"gate/cycle {cycle}"] = value.item()
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

    # DeepSpeed's pipeline engine saves and loads the module through these two hooks. The
    # training engine boundary writes and reads each stage's weights itself (the same
    # per-stage files for every layout), so DeepSpeed's own copy is not needed.
    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        pass

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
        pass

    @torch.no_grad()
    def load_local_state_dict(self, local: Dict[str, torch.Tensor]) -> None:
        """This stage and tensor-parallel rank's weights, as :meth:`canonical_state_dict` gave."""
        for name, param in self.named_parameters():
            param.copy_(local[canonical_name(name)])


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
