"""The circular pipeline: each pipeline rank holds its slice of the cycled block once.

With P pipeline ranks, the cycled layers (layers 2..L-1 for ``head_tail``, all L layers for
``basic``, and the L layers as one cycle for ``vanilla``) are split into P equal slices and
rank r holds slice r, once. A micro batch goes around the ring C times::

    cycle 1:  rank 0 [embedding, head, slice 0] -> rank 1 [slice 1] -> ... -> rank P-1 [slice P-1, gate]
                 +--------------------------------------------------------------------+
                 v
    cycle 2:  rank 0 [slice 0] -> rank 1 [slice 1] -> ... -> rank P-1 [slice P-1]
      ...
    cycle C:  rank 0 [slice 0] -> ... -> rank P-1 [slice P-1, tail, final norm, output] -> loss

Virtual stage ``v = c * P + r`` is cycle c's pass through rank r; rank r's C virtual stages
wrap the same :class:`CircularStage` (``torch.distributed.pipelining``: one ``PipelineStage``
per virtual stage, ``ScheduleInterleaved1F1B`` over them), so the shared weights exist once
and their gradient sums over the cycles in place: no copies, no tied-weight all-reduce.

* The first rank also holds the embedding and the head layer; the last the tail layer, the
  output head and the gates (a cycle's gate reads the end of the cycle, which is on the last
  rank). Each rank holds the zero keys of its own applications (``ZeroTokenPool``).
* Tied embeddings: the last rank holds its own copy of the word embedding for the output
  projection, drawn from the same stream (so equal at start); after each backward the two
  gradient contributions are summed over megatron-core's embedding group (first and last
  rank), so both copies take the same optimizer step and stay identical. The copy is marked
  ``ds_pipe_replicated`` so that DeepSpeed counts it once in the gradient norm.
* What travels between virtual stages is ``CircularStage.pack``: (hidden, [open cycle's input
  on the hops inside a cycle, when the gate at its end or an exit rule reads it], [exit record
  when evaluating with exits]); nothing else. Every cycle ends on the last rank, which holds
  the tail and the output head, so a weighted exit loss is computed there at the end of its
  cycle (``attach_exit_loss``, with the micro batch's targets from ``begin_step``) and rides
  back on the hidden that travels on (``AttachExitLoss``): its state never leaves the rank.
  At C=4, P=2 with a gate the hops carry 2, 1, 2, 1, 2, 1, 2 hidden-sized tensors (before,
  with every exit loss weighted, the kept exit states made it 2, 2, 3, 3, 4, 4, 5);
  ``bench/pipeline_hops.py`` counts the bytes.
* Evaluation with early exit (``start_evaluation``) applies the exit rule per token exactly as
  the training model: the decision is taken on the last rank at the end of each cycle, the
  exit record (exited, cycles used, the open cycle's zero-attention sum) travels with the
  state, and a token that left serves later tokens with its last computed cycle's key/values,
  kept per micro batch on the rank that holds the layer (every cycle of a layer runs there).
* Sequence parallelism (``parallel/sequence.py``): the stages send their [s/t, b, ...]
  sequence shards; an evaluation with an exit rule runs (and sends) the whole sequence.
* Parameter names are ``ZTTModel``'s (``layers.<l>.*``, ``embedding.*``, ``zero_token_pool.*``,
  ``gates.*``, ``output_head.*``), so checkpoints and ``load_trained`` need no renaming.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ztt.model.attention import ZeroTokenPool
from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.exit_losses import (ExitLossPositions, draw_exit_loss_seed,
                                            final_loss_and_term)
from megatron_ztt.model.cycle_engine import (Application, CycleEngine, CycleState, ExitPolicy,
                                             ExitRule, ZeroAttentionTally, application_plan,
                                             check_exit_signal, zero_attention_by_cycle)
from megatron_ztt.model.layers import (OutputHead, TokenEmbedding, all_reduce_tensor_parallel,
                                       build_transformer_layer, gather_logits, rotary_embedding)
from megatron_ztt.model.seeding import init_scope
from megatron_ztt.model.ztt import (GateLookup, build_gates, exit_rule_for, run_layer,
                                    run_layer_on_positions)
from megatron_ztt.parallel.sequence import set_sequence_parallel

# DeepSpeed skips parameters with this attribute set in its gradient norm (a replica counted
# on another stage); the name is DeepSpeed's ``PIPE_REPLICATED``.
PIPE_REPLICATED = "ds_pipe_replicated"


class AttachExitLoss(torch.autograd.Function):
    """``hidden`` unchanged, with ``loss`` attached to it for the backward: the gradient that
    comes back for ``hidden`` passes through, and ``loss`` gets ``scale`` (its weight in the
    objective), as if it had been added to the objective. An exit loss computed on the rank
    where its state is thus trains through the schedule's backward of the stage that sends
    ``hidden`` on, and the state itself never travels (megatron-core's MoE auxiliary losses
    ride on the activations in the same way)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return hidden

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


def bubble_fraction(stages: int, virtual_stages_per_rank: int, micro_batches: int) -> float:
    """Idle share of a step of an interleaved pipeline: (P-1) / (V m + P-1), V virtual stages
    per rank (C for the circular pipeline; 1 is plain 1F1B)."""
    return (stages - 1) / (virtual_stages_per_rank * micro_batches + stages - 1)


def layer_slices(config: ZTTConfig, size: int) -> List[List[int]]:
    """0-based cycled layers held by each of ``size`` pipeline ranks (equal slices)."""
    config.check_parallel_layout(1, size)
    cycled = config.cycled_layers
    per = len(cycled) // size
    return [cycled[r * per:(r + 1) * per] for r in range(size)]


def virtual_applications(config: ZTTConfig, size: int) -> Dict[Tuple[int, int], List[Application]]:
    """(cycle, rank) -> the applications that virtual stage ``cycle * size + rank`` runs."""
    plan = application_plan(config)
    slices = layer_slices(config, size)
    owner = {layer: r for r, held in enumerate(slices) for layer in held}
    stages: Dict[Tuple[int, int], List[Application]] = {
        (c, r): [] for c in range(config.num_cycles) for r in range(size)}
    for app in plan:
        if app.cycle is None:  # head on the first virtual stage, tail on the last
            key = (config.num_cycles - 1, size - 1) if app.after_cycles else (0, 0)
        else:
            key = (app.cycle, owner[app.layer])
        stages[key].append(app)
    return stages


def describe_ring(config: ZTTConfig, size: int) -> List[str]:
    """One line per pipeline rank: what it holds and runs (printed at start)."""
    stages = virtual_applications(config, size)
    lines = []
    for r, held in enumerate(layer_slices(config, size)):
        extra = (["embedding", "head"] if r == 0 and config.cycle_mode == "head_tail" else
                 ["embedding"] if r == 0 else [])
        if r == size - 1:
            extra += (["tail"] if config.cycle_mode == "head_tail" else []) + ["output head"]
        runs = sum(len(stages[(c, r)]) for c in range(config.num_cycles))
        lines.append(f"pipeline rank {r}: layers {', '.join(str(l + 1) for l in held)}"
                     f"{' + ' + ', '.join(extra) if extra else ''}; virtual stages "
                     f"{', '.join(str(c * size + r) for c in range(config.num_cycles))}; "
                     f"{runs} layer applications per micro batch")
    return lines


class CircularStage(torch.nn.Module):
    """What pipeline rank ``rank`` of ``size`` holds: its slice of the cycled block once, its
    applications' zero keys, and the embedding/head (first) or tail/output/gates (last)."""

    def __init__(self, config: ZTTConfig, rank: int, size: int):
        super().__init__()
        config.check_parallel_layout(parallel_state.get_tensor_model_parallel_world_size(), size)
        self.config = config
        self.rank, self.size = rank, size
        self.is_first, self.is_last = rank == 0, rank == size - 1
        self.plan = application_plan(config)
        self.stage_apps = {c: virtual_applications(config, size)[(c, rank)]
                           for c in range(config.num_cycles)}
        local_apps = [a for c in range(config.num_cycles) for a in self.stage_apps[c]]
        held = sorted({a.layer for a in local_apps})
        if self.is_first or (self.is_last and config.tie_embeddings):
            with init_scope("embedding"):
                self.embedding = TokenEmbedding(config)
            if not self.is_first:  # the last rank's copy for the tied output projection
                setattr(self.embedding.weight, PIPE_REPLICATED, True)
        else:
            self.embedding = None
        # a ModuleDict keyed by the layer number names parameters like ZTTModel's ModuleList
        self.layers = torch.nn.ModuleDict()
        for i in held:
            with init_scope(f"layer{i}"):
                self.layers[str(i)] = build_transformer_layer(config, i)
        self.zero_token_pool = (ZeroTokenPool(local_apps, config.query_groups, config.head_dim,
                                              config.init_std) if config.zero_token else None)
        gate_cycles = sorted({a.cycle for a in local_apps if a.ends_cycle})
        self.gates = build_gates(config, gate_cycles) if config.gate and gate_cycles else None
        if self.is_last:
            with init_scope("output_head"):
                self.output_head = OutputHead(config)
        else:
            self.output_head = None
        self.engine = CycleEngine(
            self.plan, num_cycles=config.num_cycles, num_heads=config.num_attention_heads,
            gates=(GateLookup(self.gates if self.gates is not None else torch.nn.ModuleDict())
                   if config.gate else None),
            exit_loss_weights=config.exit_weights, reduce_heads=all_reduce_tensor_parallel)
        if self.is_last:  # the cycles end here: exit_signal=kl reads the output layer
            self.engine.readout = lambda states: gather_logits(
                self.logits_shard(states[:, None]), config.vocab_size)[0]
        self.tally = ZeroAttentionTally(config.num_attention_heads)
        self.collect_stats = False
        self.exit_loss_seed: Optional[int] = None  # the step's (engines.step_exit_loss_seed)
        self.sequence_parallel = False
        # training, last rank: the step's targets per micro batch (begin_step) and each micro
        # batch's exit losses, computed here at the end of their cycles (detached values)
        self._targets: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        self._denominator: Optional[torch.Tensor] = None
        self._share = 1.0
        self._exit_loss_values: Dict[int, Dict[int, torch.Tensor]] = {}
        self._final_micro_batch = 0
        self.start_evaluation(None)

    def use_sequence_parallel(self, on: bool = True) -> None:
        """Sequence parallelism (``ZTTModel.use_sequence_parallel``): what travels between
        stages is this rank's [s/t, b, ...] shard, except in an evaluation with an exit rule,
        which runs on the whole sequence."""
        self.sequence_parallel = on
        self.start_evaluation(None)

    def splits_sequence(self, exits: bool) -> bool:
        """Whether passes with (``exits``) or without an exit rule split the sequence."""
        return self.sequence_parallel and not exits

    def start_evaluation(self, exit_threshold: Optional[float], exit_mode: str = "token",
                         exit_signal: Optional[str] = None) -> None:
        """Evaluate the next micro batches with this exit rule (None: full depth). The
        cycles each token used are collected in ``cycles_used`` (last rank, [b, s] each)."""
        signal = exit_signal or self.config.exit_signal
        if exit_threshold is not None:
            check_exit_signal(signal, self.config.zero_token)
        self.exit_settings = (None if exit_threshold is None else
                              dict(threshold=exit_threshold, mode=exit_mode, signal=signal))
        set_sequence_parallel(self, self.splits_sequence(exit_threshold is not None))
        self.cycles_used: List[torch.Tensor] = []
        self._micro_batch_of = {c: 0 for c in range(self.config.num_cycles)}
        self._exit_loss_values = {}
        self._kv_stores: Dict[int, Dict[int, tuple]] = {}
        self._exit_rules: Dict[tuple, ExitRule] = {}

    def begin_step(self, targets: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                   denominator: Optional[torch.Tensor], share: float) -> None:
        """Last rank, before a training step: each micro batch's (labels, loss mask) in the
        schedule's order, the per-token loss's ``denominator`` and each micro batch's
        ``share`` of the objective, which the exit losses computed at the ends of their
        cycles read (every virtual stage sees the micro batches in order)."""
        self._targets = list(targets)
        self._denominator, self._share = denominator, share
        self._micro_batch_of = {c: 0 for c in range(self.config.num_cycles)}
        self._exit_loss_values = {}

    def pop_exit_losses(self) -> Dict[int, torch.Tensor]:
        """Cycle (1-based) -> the detached exit losses of the micro batch whose last virtual
        stage ran last, computed where its states were (``attach_exit_loss``)."""
        return self._exit_loss_values.pop(self._final_micro_batch, {})

    def _exit_policy(self, hidden: torch.Tensor) -> ExitPolicy:
        """The evaluation's exit policy for a micro batch of ``hidden``'s shape (the rule is
        built once per evaluation and shape)."""
        if self.exit_settings is None or self.training:
            return self.engine.policy(None)
        length, batch = hidden.shape[:2]
        key = (length, batch, hidden.device)
        if key not in self._exit_rules:
            settings = self.exit_settings
            self._exit_rules[key] = exit_rule_for(self.config, settings["threshold"],
                                                  settings["mode"], settings["signal"], *key)
        return self.engine.policy(self._exit_rules[key])

    # ------------------------------------------------------------------ what travels
    def carries_cycle_input(self, app: Application, exits: bool) -> bool:
        """Whether the state arriving at ``app`` holds the open cycle's input (the gate's, and
        with an exit rule the one the tokens that left keep)."""
        return (self.config.gate or exits) and app.cycle is not None and not app.starts_cycle

    def pack(self, state: CycleState, next_app: Application) -> Tuple[torch.Tensor, ...]:
        """The tensors a virtual stage sends on: (hidden, [cycle input], [exit record]); the
        exit losses were computed where their states were (``attach_exit_loss``). The exit
        record ([..., 3] float32: exited, cycles used, the open cycle's zero-attention sum)
        travels when an exit rule is on; from it the next rank rebuilds the cycle's active
        set, so that every rank computes only the tokens still cycling. The pipeline's
        buffers have one shape, so the block travels scattered."""
        exits = state.exited is not None
        if state.active is not None:  # mid-cycle: the block back into every token's tensor
            self.engine.scatter(state)
        carried = [state.hidden]
        if self.carries_cycle_input(next_app, exits):
            carried.append(state.cycle_input)
        if exits:
            zero_sum = (state.zero_sum if state.zero_sum is not None
                        else torch.zeros_like(state.exited, dtype=torch.float32))
            carried.append(torch.stack([state.exited.float(), state.cycles_used.float(),
                                        zero_sum.float()], dim=-1))
        return tuple(carried)

    def unpack(self, app: Application, tensors: Sequence[torch.Tensor],
               policy: ExitPolicy) -> CycleState:
        tensors = list(tensors)
        exits = policy.rule is not None
        engine = self.engine
        state = CycleState(hidden=tensors.pop(0), num_cycles=engine.num_cycles,
                           overwrite_exited=policy.compute_exited)
        if self.carries_cycle_input(app, exits):
            state.cycle_input = tensors.pop(0)
        if exits:
            record = tensors.pop(0)
            state.exited = record[..., 0] > 0.5
            state.cycles_used = record[..., 1].round().long()
            # a cycle's first application starts a new sum
            state.zero_sum = None if app.starts_cycle else record[..., 2]
        else:
            state.cycles_used = torch.full(state.hidden.shape[:-1], engine.num_cycles,
                                           dtype=torch.long, device=state.hidden.device)
        if app.cycle is not None and not app.starts_cycle:  # mid-cycle: gather the block again
            if state.cycle_input is None:
                state.cycle_input = state.hidden
            state.active = policy.begin_cycle(app.cycle, state.exited)
            state.block_input = state.cycle_input
            active = state.active
            if active is not None and not active.empty:
                state.block_input = active.gather(state.cycle_input)
                state.hidden = active.gather(state.hidden)
                if state.zero_sum is not None:
                    state.zero_sum = active.gather(state.zero_sum)
        return state

    # ------------------------------------------------------------------ one virtual stage
    def run_virtual_stage(self, cycle: int, inputs: Tuple[torch.Tensor, ...]):
        """Cycle ``cycle``'s pass through this rank: carried tensors in, carried tensors out
        (the first virtual stage takes token ids; the last returns the hidden state after
        the tail: ``micro_batch_losses`` runs the output head on it with the loss, so no
        stage holds whole logits). In training, the last rank's pass through a cycle with a
        weighted exit loss computes that loss here (``attach_exit_loss``)."""
        config, engine = self.config, self.engine
        apps = self.stage_apps[cycle]
        first_virtual = self.is_first and cycle == 0
        last_virtual = self.is_last and cycle == config.num_cycles - 1
        hidden = self.embedding(inputs[0]) if first_virtual else inputs[0]
        policy = self._exit_policy(hidden)
        if first_virtual:
            state = engine.begin(hidden, policy)
        else:
            state = self.unpack(apps[0], inputs, policy)
        # the attention sees the whole sequence, gathered under sequence parallelism
        length = hidden.shape[0] * (parallel_state.get_tensor_model_parallel_world_size()
                                    if self.splits_sequence(policy.rule is not None) else 1)
        rope = rotary_embedding(config, length, hidden.device)
        tally = self.tally if self.collect_stats else None
        # each virtual stage sees the micro batches in order
        micro_batch = self._micro_batch_of[cycle]
        self._micro_batch_of[cycle] += 1
        kv_store = self._kv_stores.setdefault(micro_batch, {}) if policy.rule is not None else {}

        def run(app, hidden, run_state, record):
            key = self.zero_token_pool[app.name] if self.zero_token_pool is not None else None
            return run_layer(config, self.layers[str(app.layer)], app, hidden, run_state,
                             record, rope, key, kv_store, self.training)

        state = engine.run(apps, state, run, policy, tally=tally)
        if policy.rule is not None and cycle == config.num_cycles - 1:
            self._kv_stores.pop(micro_batch, None)  # the micro batch's last pass through here
        if not last_virtual:  # virtual stages run contiguous pieces of the plan
            if self.training and self.is_last and cycle in engine.exit_cycles:
                # the cycle ended here: its exit loss is computed on this rank
                state.hidden = self.attach_exit_loss(cycle, micro_batch, state, run, rope)
            return self.pack(state, self.plan[apps[-1].index + 1])
        self._final_micro_batch = micro_batch
        if policy.rule is not None:
            self.cycles_used.append(state.cycles_used.transpose(0, 1))
        return state.hidden

    def attach_exit_loss(self, cycle: int, micro_batch: int, state: CycleState, run,
                         rope: torch.Tensor) -> torch.Tensor:
        """Last rank, training, at the end of ``cycle`` (< C-1) whose exit loss is weighted:
        the tail, output head and LM loss of the state after the cycle, for this micro batch's
        targets (``begin_step``), at ``model.exit_loss_fraction``'s positions as
        ``ZTTModel``; the loss is attached to the hidden that travels on
        (:class:`AttachExitLoss`, weighted as in the objective) and its value kept for
        ``micro_batch_losses``. Returns that hidden."""
        if micro_batch >= len(self._targets):
            raise RuntimeError("circular pipeline: the exit losses need the step's targets; "
                               "call CircularStage.begin_step before the training schedule")
        config, hidden = self.config, state.hidden
        labels, loss_mask = self._targets[micro_batch]
        tail = self.plan[-1] if self.plan[-1].after_cycles else None
        chosen = self.exit_loss_positions(hidden)
        if chosen is None:
            after_tail = hidden if tail is None else run(tail, hidden, state, False)[0]
            loss = self.loss_of(after_tail, labels, loss_mask, self._denominator)
        else:  # the tail on the chosen positions only
            if tail is None:
                block = chosen.gather(hidden)
            else:
                key = (self.zero_token_pool[tail.name] if self.zero_token_pool is not None
                       else None)
                block = run_layer_on_positions(config, self.layers[str(tail.layer)], hidden,
                                               chosen, rope, key, True)
            loss = chosen.loss(self.loss_of, block, labels, loss_mask, self._denominator)
        self._exit_loss_values.setdefault(micro_batch, {})[cycle + 1] = loss.detach()
        weight = self.engine.exit_loss_weights[cycle] * self._share
        return AttachExitLoss.apply(hidden, loss, weight)

    def exit_loss_positions(self, hidden: torch.Tensor) -> Optional[ExitLossPositions]:
        """The positions the exit losses read this step (``ZTTModel.exit_loss_positions``);
        hidden [s, b, d]."""
        if self.config.exit_loss_fraction >= 1.0 or not self.engine.exit_cycles:
            return None
        seed = draw_exit_loss_seed() if self.exit_loss_seed is None else self.exit_loss_seed
        self.exit_loss_seed = seed  # the loss of this micro batch reads the same positions
        return ExitLossPositions(seed, self.config.exit_loss_fraction, hidden.shape[0],
                                 hidden.shape[1], hidden.device)

    def logits_shard(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last rank: this tensor-parallel rank's logits of hidden states after the tail."""
        weight = self.embedding.weight if self.config.tie_embeddings else None
        return self.output_head(hidden, embedding_weight=weight)

    def loss_of(self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask,
                denominator: Optional[torch.Tensor] = None, objective_weights=None):
        """Last rank: LM loss of hidden states after the tail (``ZTTModel.loss_of``)."""
        weight = self.embedding.weight if self.config.tie_embeddings else None
        return self.output_head.loss(hidden, labels, loss_mask, embedding_weight=weight,
                                     denominator=denominator,
                                     objective_weights=objective_weights)

    # ------------------------------------------------------------------ losses, statistics
    def read_statistics(self) -> Dict[str, torch.Tensor]:
        """Zero attention and gate means since the last read, as device scalars read when
        logged (collective over the tensor-parallel group)."""
        per_application = self.tally.zero_attention(all_reduce_tensor_parallel)
        stats = {f"zero-attention/{name}": v for name, v in per_application.items()}
        # a cycle split over ranks is averaged per rank here and over ranks by the caller's
        # reduction; every rank holds the same number of a cycle's layers
        for cycle, value in zero_attention_by_cycle(self.plan, per_application).items():
            stats[f"zero-attention/cycle {cycle}"] = value
        for cycle, value in self.tally.gate_means().items():
            stats[f"gate/cycle {cycle}"] = value
        self.tally.reset()
        return stats

    # ------------------------------------------------------------------ tied embedding
    def reduce_tied_embedding_grad(self) -> None:
        """Sum the two contributions to the tied word embedding's gradient (first rank: input
        embedding; last rank: output projection) so both copies take the same step."""
        if (not self.config.tie_embeddings or self.embedding is None
                or not self.embedding.weight.requires_grad):  # frozen (train.trainable=new)
            return
        weight = self.embedding.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


class VirtualStage(torch.nn.Module):
    """One cycle's view of a :class:`CircularStage`: the same module, the cycle's applications."""

    def __init__(self, owner: CircularStage, cycle: int):
        super().__init__()
        self.owner = owner
        self.cycle = cycle

    def forward(self, *inputs):
        return self.owner.run_virtual_stage(self.cycle, inputs)


def carried_shapes(module: CircularStage, micro_batch: int, training: bool, exits: bool = False):
    """(inputs, outputs) of each of this rank's virtual stages as meta tensors, so that the
    stages need no shape inference (which would run the model on uninitialised buffers).
    ``exits``: evaluation with an exit rule (the exit record travels too)."""
    config = module.config
    dtype = next(module.parameters()).dtype
    length = config.seq_length
    if module.splits_sequence(exits):
        length //= parallel_state.get_tensor_model_parallel_world_size()

    def hidden(requires_grad):
        return torch.empty(length, micro_batch, config.hidden_size, dtype=dtype,
                           device="meta", requires_grad=requires_grad)

    def arriving(app: Application):  # what pack() sends to the stage starting with ``app``
        carried = [hidden(training) for _ in range(1 + int(module.carries_cycle_input(app, exits)))]
        if exits:
            carried.append(torch.empty(length, micro_batch, 3, dtype=torch.float32,
                                       device="meta"))
        return tuple(carried)

    shapes = []
    for cycle in range(config.num_cycles):
        apps = module.stage_apps[cycle]
        if module.is_first and cycle == 0:
            inputs = (torch.empty(micro_batch, config.seq_length, dtype=torch.long,
                                  device="meta"),)
        else:
            inputs = arriving(apps[0])
        if module.is_last and cycle == config.num_cycles - 1:  # the state after the tail
            outputs = (hidden(training),)
        else:
            outputs = arriving(module.plan[apps[-1].index + 1])
        shapes.append((inputs, outputs))
    return shapes


def pipeline_stages(module: CircularStage, micro_batch: int, device, training: bool = True,
                    exits: bool = False):
    """This rank's C virtual stages (``PipelineStage`` over the same module)."""
    from torch.distributed.pipelining import PipelineStage

    cycles, size, rank = module.config.num_cycles, module.size, module.rank
    group = parallel_state.get_pipeline_model_parallel_group()
    shapes = carried_shapes(module, micro_batch, training, exits)
    return [PipelineStage(VirtualStage(module, c), c * size + rank, cycles * size, device,
                          input_args=shapes[c][0], output_args=shapes[c][1], group=group)
            for c in range(cycles)]


def build_schedule(module: CircularStage, micro_batches: int, micro_batch: int,
                   loss_fn: Callable, device, log: Callable[[str], None] = print):
    """The training schedule over this rank's C virtual stages."""
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B, ScheduleLoopedBFS)

    cycles, size = module.config.num_cycles, module.size
    stages = pipeline_stages(module, micro_batch, device)
    # each micro batch's loss is already divided by the micro-batch count
    if cycles == 1:  # one stage per rank; 1F1B needs at least as many micro batches as stages
        single = Schedule1F1B if micro_batches >= size else ScheduleGPipe
        return single(stages[0], micro_batches, loss_fn=loss_fn, scale_grads=False)
    rounds = max(1, micro_batches // size)
    if micro_batches % rounds == 0:
        return ScheduleInterleaved1F1B(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)
    log(f"circular pipeline: {micro_batches} micro batches are not a multiple of "
        f"{rounds} rounds of {size}, which interleaved 1F1B needs; using looped BFS (all "
        f"forwards, then all backwards: more activation memory)")
    return ScheduleLoopedBFS(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)


def evaluation_schedule(module: CircularStage, micro_batches: int, micro_batch: int,
                        loss_fn: Callable, device, exits: bool = False):
    """Forward only over this rank's virtual stages, the final exit's logits only; with
    ``exits`` the stages carry the exit record (``start_evaluation`` sets the rule)."""
    from torch.distributed.pipelining import ScheduleLoopedBFS

    stages = pipeline_stages(module, micro_batch, device, training=False, exits=exits)
    return ScheduleLoopedBFS(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)


def micro_batch_losses(module: CircularStage, outputs, labels, loss_mask, training: bool,
                       denominator: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """Last virtual stage: (objective, cycle -> LM loss) of one micro batch; ``denominator``
    as in ``ZTTModel.forward``'s ``loss_denominator``. In training the exit losses were
    computed at the ends of their cycles (``CircularStage.attach_exit_loss``), which also
    hands their gradients to the backward: here their detached values complete the
    objective's value, so the objective reads as ``ZTTModel``'s while only the final loss
    is differentiated through it."""
    final = outputs[0] if isinstance(outputs, tuple) else outputs
    if not training:
        lm_loss = module.loss_of(final, labels, loss_mask, denominator)
        return lm_loss, {module.config.num_cycles: lm_loss}
    weights = module.engine.exit_loss_weights
    lm_loss, final_term = final_loss_and_term(module.loss_of, final, labels, loss_mask,
                                              denominator, module.exit_loss_positions(final),
                                              weights)
    exits = module.pop_exit_losses()
    losses = {**exits, module.config.num_cycles: lm_loss}
    return module.engine.objective(exits) + final_term, dict(sorted(losses.items()))
