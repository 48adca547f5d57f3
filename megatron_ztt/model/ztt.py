"""The Zero Token Transformer language model (one pipeline stage, tensor parallel inside).

    x = head(embed(tokens))
    for c in 1..C:                        # every cycle reuses the middle layers' weights
        y = middle_c(x)                   # with cycle c's zero tokens
        x = x + g_c * (y - x)             # per-token gate (gate=true)
        tokens whose exit signal crossed exit_threshold stop here
    logits = output(norm(tail(x)))

The loop itself is ``cycle_engine.CycleEngine``, shared with the pipeline stages and the
Hugging Face export; this file only says how one layer application runs on megatron-core's
tensor-parallel layers. Parallelism is applied from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.utils.checkpoint import checkpoint

from megatron_ztt.model.attention import ZeroTokenContext, ZeroTokenPool
from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.cycle_engine import (Application, CycleEngine, CycleGate, CycleState,
                                             ExitHead, ExitRule, ZeroAttentionTally,
                                             application_plan, check_exit_signal,
                                             check_num_cycles, exit_head_features,
                                             token_positions, zero_attention_by_cycle)
from megatron_ztt.model.exit_losses import (ExitLossPositions, draw_exit_loss_seed,
                                            final_loss_and_term)
from megatron_ztt.model.seeding import init_scope
from megatron_ztt.model.layers import (OutputHead, TokenEmbedding, all_reduce_tensor_parallel,
                                       build_transformer_layer, counted_tokens, gather_logits,
                                       rng_tracker_checkpoint_contexts,
                                       rotary_embedding, tensor_parallel_size)
from megatron_ztt.parallel.sequence import all_gather_sequence, set_sequence_parallel


@dataclass
class ZTTOutput:
    """What a forward pass returns. Cycles are numbered from 1."""

    loss: Optional[torch.Tensor] = None  # the training objective: sum_c w_c * exit loss c
    lm_loss: Optional[torch.Tensor] = None  # LM loss of the final exit
    exit_losses: Dict[int, torch.Tensor] = field(default_factory=dict)  # cycle -> LM loss
    logits: Optional[torch.Tensor] = None  # [b, s, vocab], gathered over tensor parallel
    # application name -> mean zero attention (over heads and tokens)
    zero_attention: Dict[str, torch.Tensor] = field(default_factory=dict)
    gate: Dict[int, torch.Tensor] = field(default_factory=dict)  # cycle -> mean gate value
    cycles_used: Optional[torch.Tensor] = None  # [b, s] cycles each token ran
    exit_objective: Optional[torch.Tensor] = None  # model.exit_objective's loss (unweighted)

    def zero_attention_by_cycle(self, plan: List[Application]) -> Dict[int, torch.Tensor]:
        """Mean zero attention of each cycle's middle block."""
        return zero_attention_by_cycle(plan, self.zero_attention)


def build_gates(config: ZTTConfig, cycles) -> torch.nn.ModuleDict:
    """The gates of ``cycles`` (0-based), keyed by the cycle number as a string."""
    return torch.nn.ModuleDict({str(c): CycleGate(config.hidden_size, config.gate_bias_init,
                                                  config.norm_epsilon) for c in cycles})


class GateLookup:
    """cycle (int) -> gate, over a ModuleDict keyed by strings (the engine's view)."""

    def __init__(self, gates: torch.nn.ModuleDict):
        self.gates = gates

    def __getitem__(self, cycle: int) -> CycleGate:
        return self.gates[str(cycle)]


def run_layer(config: ZTTConfig, layer, app: Application, hidden: torch.Tensor,
              state: CycleState, record: bool, rope: torch.Tensor, zero_key,
              kv_store: Dict[int, tuple], training: bool):
    """One megatron-core layer application with its zero key -> (hidden, zero attention
    summed over this rank's heads per token [s, b], or None)."""
    context = ZeroTokenContext(key=zero_key, record=record and zero_key is not None)
    if state.exited is not None and app.cycle is not None:
        # tokens that left keep serving as keys/values: their last computed cycle's
        context.kv_store, context.kv_layer = kv_store, app.layer
        context.active = state.active
        context.exited = (state.exited.transpose(0, 1)
                          if state.active is None and state.overwrite_exited else None)
    if state.active is not None:  # ``hidden`` is the block of tokens still cycling
        every_token = rope.expand(-1, state.exited.shape[1], -1, -1)  # [s, b, 1, d]
        rope = state.active.memo("rope", lambda: state.active.gather(every_token))

    def run(h):
        return layer(h, attention_mask=None, rotary_pos_emb=rope, attention_bias=context)[0]

    if config.activation_checkpointing and training:
        hidden = checkpoint(run, hidden, use_reentrant=False,
                            context_fn=rng_tracker_checkpoint_contexts)
    else:
        hidden = run(hidden)
    zero = context.zero_attention_sum
    return hidden, None if zero is None else zero.transpose(0, 1)


def layer_keys_values(layer, hidden: torch.Tensor, rope: torch.Tensor):
    """The keys/values a megatron-core layer's attention computes from ``hidden`` [s, b, d]
    (input norm, query-key-value projection, rotary on the keys), in the core attention's
    layout [b, groups, s, d]: what a layer run on a few positions reads of every position."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    attention = layer.self_attention
    _, key, value = attention.get_query_key_value_tensors(layer.input_layernorm(hidden))
    key = apply_rotary_pos_emb(key, rope, config=attention.config,
                               cp_group=attention.pg_collection.cp)
    return key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)


def run_layer_on_positions(config: ZTTConfig, layer, hidden: torch.Tensor, chosen,
                           rope: torch.Tensor, zero_key, training: bool) -> torch.Tensor:
    """The layer's output at ``chosen``'s positions only (``exit_losses.ExitLossPositions``),
    [k, b, d] from hidden [s, b, d]: the queries, attention output and MLP of the chosen
    positions, the keys/values of every position (which the chosen queries read, causally).
    The exit losses' tail at ``model.exit_loss_fraction`` < 1."""
    block = chosen.block
    every_token = rope.expand(-1, hidden.shape[1], -1, -1)  # [s, b, 1, d]
    block_rope = block.memo("rope", lambda: block.gather(every_token))

    def run(h):
        context = ZeroTokenContext(key=zero_key, kv_store={0: layer_keys_values(layer, h, rope)},
                                   kv_layer=0, active=block)
        return layer(block.gather(h), attention_mask=None, rotary_pos_emb=block_rope,
                     attention_bias=context)[0]

    if config.activation_checkpointing and training:
        return checkpoint(run, hidden, use_reentrant=False,
                          context_fn=rng_tracker_checkpoint_contexts)
    return run(hidden)


def exit_rule_for(config: ZTTConfig, threshold: Optional[float], mode: str, signal: str,
                  length: int, batch: int, device) -> Optional[ExitRule]:
    """The exit rule of a [s, b] forward (the training model and the pipeline stages)."""
    if threshold is None:
        return None
    return ExitRule(threshold, mode, token_axis=0, signal=signal, seed=config.exit_seed,
                    positions=token_positions(length, batch, device, token_axis=0))


class ZTTModel(torch.nn.Module):
    """The whole ZTT on this tensor-parallel rank."""

    def __init__(self, config: ZTTConfig):
        super().__init__()
        config.check_parallel_layout(tensor_parallel_size())
        self.config = config
        self.plan = application_plan(config)
        with init_scope("embedding"):
            self.embedding = TokenEmbedding(config)
        self.layers = torch.nn.ModuleList()
        for i in range(config.num_layers):
            with init_scope(f"layer{i}"):
                self.layers.append(build_transformer_layer(config, i))
        self.zero_token_pool = (ZeroTokenPool(self.plan, config.query_groups, config.head_dim,
                                              config.init_std) if config.zero_token else None)
        self.gates = build_gates(config, range(config.num_cycles)) if config.gate else None
        with init_scope("output_head"):
            self.output_head = OutputHead(config)
        self.engine = CycleEngine(
            self.plan, num_cycles=config.num_cycles, num_heads=config.num_attention_heads,
            gates=GateLookup(self.gates) if self.gates is not None else None,
            exit_loss_weights=config.exit_weights, reduce_heads=all_reduce_tensor_parallel)
        self.engine.readout = self.next_token_logits
        self.exit_head = (ExitHead(config.num_cycles - 1) if config.exit_objective != "none"
                          else None)
        self.engine.exit_head = self.exit_head
        self.sequence_parallel = False
        self._sharded = False

    def next_token_logits(self, states: torch.Tensor) -> torch.Tensor:
        """states [n, d] -> full next-token logits [n, vocab_size] (exit_signal=kl)."""
        return gather_logits(self.logits_shard(states[:, None]), self.config.vocab_size)[0]

    def exit_objective_loss(self, features: Dict[int, torch.Tensor], states, labels,
                            loss_mask, denominator, chosen) -> torch.Tensor:
        """model.exit_objective=next_cycle_gain: binary cross entropy of the exit head's
        prediction after cycle c against the target "the loss after cycle c+1 is lower than
        after cycle c by more than the margin", per token (the exit losses' positions), summed
        over the tokens and averaged over the cycles, with the exit losses' denominator.
        ``states``: every cycle's state after the tail, [s or k, b, d]. The targets are
        computed without gradient and the features carry none: only the exit head learns."""
        config = self.config
        labels_t = labels.t()
        mask_t = torch.ones_like(labels_t, dtype=torch.float32) if loss_mask is None else \
            loss_mask.t().float()
        if chosen is not None:
            labels_t = chosen.gather(labels_t)
            mask_t = chosen.gather_mask(mask_t, batch_first=False)
            features = {c: chosen.gather(f) for c, f in features.items()}
        with torch.no_grad():
            token_losses = []
            for hidden in states:
                logits = gather_logits(self.logits_shard(hidden), config.vocab_size)  # [b, n, V]
                token_losses.append(torch.nn.functional.cross_entropy(
                    logits.float().transpose(1, 2), labels_t.t(), reduction="none").t())
        total = torch.zeros((), device=labels.device)
        for cycle in range(config.num_cycles - 1):
            target = (token_losses[cycle] - token_losses[cycle + 1]
                      > config.exit_objective_margin).float()
            logit = self.exit_head(cycle, features[cycle])
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, target,
                                                                       reduction="none")
            total = total + (bce * mask_t).sum()
        if denominator is None:
            denominator = counted_tokens(labels, loss_mask)
        if chosen is not None:
            denominator = denominator * (chosen.count / chosen.length)
        return total / denominator / (config.num_cycles - 1)

    def exit_loss_positions(self, seed: Optional[int], input_ids: torch.Tensor):
        """The positions the intermediate exit losses read (None: every position)."""
        fraction = self.config.exit_loss_fraction
        if fraction >= 1.0 or not self.engine.exit_cycles:
            return None
        seed = draw_exit_loss_seed() if seed is None else seed
        return ExitLossPositions(seed, fraction, input_ids.shape[1], input_ids.shape[0],
                                 input_ids.device)

    def use_sequence_parallel(self, on: bool = True) -> None:
        """Sequence parallelism (``parallel/sequence.py``) from now on: the hidden states
        between the tensor-parallel regions are this rank's [s/t, b, d]. A pass with an exit
        rule runs on the whole sequence on every rank (the decision and the gathered block of
        cycling tokens are per token over the sequence, identical on every rank), and so does
        one whose length the tensor-parallel size does not divide."""
        self.sequence_parallel = on

    def _shard_sequence(self, on: bool) -> None:
        if on != self._sharded:
            set_sequence_parallel(self, on)
            self._sharded = on

    def run_application(self, app: Application, hidden: torch.Tensor, state: CycleState,
                        record: bool, rope: torch.Tensor, kv_store: Dict[int, tuple]):
        key = self.zero_token_pool[app.name] if self.zero_token_pool is not None else None
        return run_layer(self.config, self.layers[app.layer], app, hidden, state, record, rope,
                         key, kv_store, self.training)

    def logits_shard(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight if self.config.tie_embeddings else None
        return self.output_head(hidden, embedding_weight=weight)

    def loss_of(self, hidden: torch.Tensor, labels: torch.Tensor,
                loss_mask: Optional[torch.Tensor],
                denominator: Optional[torch.Tensor] = None, objective_weights=None):
        """LM loss of hidden states (the output layer and cross entropy fused, chunked;
        ``OutputHead.loss``)."""
        weight = self.embedding.weight if self.config.tie_embeddings else None
        return self.output_head.loss(hidden, labels, loss_mask, embedding_weight=weight,
                                     denominator=denominator,
                                     objective_weights=objective_weights)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                exit_threshold: Optional[float] = None, exit_mode: str = "token",
                exit_signal: Optional[str] = None, num_cycles: Optional[int] = None,
                loss_mask: Optional[torch.Tensor] = None, return_logits: Optional[bool] = None,
                collect_stats: bool = True,
                loss_denominator: Optional[torch.Tensor] = None,
                exit_loss_seed: Optional[int] = None) -> ZTTOutput:
        """input_ids/labels/loss_mask: [batch, seq].

        ``exit_threshold`` stops each token after the first cycle whose exit signal
        (``exit_signal``, default ``config.exit_signal``; see ``cycle_engine.EXIT_SIGNALS``)
        reaches it (``exit_mode="token"``, causal) or each row on the mean over its tokens
        (``"sequence"``); ``None`` runs every cycle. ``num_cycles`` is the depth dial: run
        that many cycles (1 .. 2C) instead of the trained C; cycles beyond C reuse cycle C's
        zero keys and gate. Logits are returned by default only when no labels are given. The
        losses after earlier cycles (``exit_loss_weights``) are computed in training mode
        without an exit threshold at the trained depth only. ``loss_denominator``: every
        loss is its summed token losses divided by this (the training engines' per-token loss
        over the global batch) instead of this batch's mean. ``exit_loss_seed``: the step's
        seed of the positions the exit losses read at ``exit_loss_fraction`` < 1 (the
        engines draw it once per step; None: drawn here).
        """
        config = self.config
        signal = exit_signal or config.exit_signal
        if exit_threshold is not None:
            check_exit_signal(signal, self.zero_token_pool is not None)
        if num_cycles is not None:
            num_cycles = check_num_cycles(num_cycles, config.num_cycles)
        plan = self.plan if num_cycles is None else application_plan(config, num_cycles)
        if return_logits is None:
            return_logits = labels is None
        rope = rotary_embedding(config, input_ids.shape[1], input_ids.device)
        tally = ZeroAttentionTally(config.num_attention_heads) if collect_stats else None
        policy = self.engine.policy(exit_rule_for(config, exit_threshold, exit_mode, signal,
                                                  input_ids.shape[1], input_ids.shape[0],
                                                  input_ids.device))
        kv_store: Dict[int, tuple] = {}
        # (a length the tensor-parallel size does not divide, say a prompt, runs unsplit)
        sharded = (self.sequence_parallel and policy.rule is None
                   and input_ids.shape[1] % tensor_parallel_size() == 0)
        self._shard_sequence(sharded)

        def run(app, hidden, state, record):
            return self.run_application(app, hidden, state, record, rope, kv_store)

        keep_exit_states = labels is not None and self.training and policy.rule is None
        chosen = self.exit_loss_positions(exit_loss_seed, input_ids) if keep_exit_states else None

        def exit_tail(app, hidden):
            key = self.zero_token_pool[app.name] if self.zero_token_pool is not None else None
            return run_layer_on_positions(config, self.layers[app.layer], hidden, chosen, rope,
                                          key, self.training)

        features: Dict[int, torch.Tensor] = {}  # the exit head's inputs after each cycle
        trains_exit_head = keep_exit_states and self.exit_head is not None
        if trains_exit_head and num_cycles in (None, config.num_cycles):  # the trained depth
            positions = token_positions(input_ids.shape[1], input_ids.shape[0],
                                        input_ids.device, token_axis=0)
            policy.record_zero_attention = True
            policy.observe = lambda cycle, st: features.__setitem__(cycle, exit_head_features(
                self.engine.zero_attention_mean(st.zero_sum), positions, st.cycle_input,
                st.hidden))
        state = self.engine.begin(self.embedding(input_ids), policy, num_cycles)
        state = self.engine.run(plan, state, run, policy, tally=tally,
                                keep_exit_states=keep_exit_states,
                                exit_tail=exit_tail if chosen is not None else None)
        cycles_used = state.cycles_used
        if sharded:
            cycles_used = all_gather_sequence(cycles_used)
        out = ZTTOutput(cycles_used=cycles_used.transpose(0, 1))
        if return_logits:
            out.logits = gather_logits(self.logits_shard(state.hidden), config.vocab_size)
        if labels is not None:
            weights = self.engine.exit_loss_weights
            out.lm_loss, final_term = final_loss_and_term(
                self.loss_of, state.hidden, labels, loss_mask, loss_denominator, chosen,
                weights)
            kept = [self.loss_of(s, labels, loss_mask, loss_denominator) if chosen is None
                    else chosen.loss(self.loss_of, s, labels, loss_mask, loss_denominator)
                    for s in state.exit_states]
            out.exit_losses = self.engine.exit_losses(out.lm_loss, kept)
            out.loss = self.engine.objective(
                {c: v for c, v in out.exit_losses.items() if c < len(weights)}) + final_term
            if features:
                final = state.hidden if chosen is None else chosen.gather(state.hidden)
                out.exit_objective = self.exit_objective_loss(
                    features, [*state.exit_states, final], labels, loss_mask,
                    loss_denominator, chosen)
                out.loss = out.loss + config.exit_objective_weight * out.exit_objective
        if tally is not None:
            out.zero_attention = tally.zero_attention(all_reduce_tensor_parallel)
            out.gate = tally.gate_means()
        return out
