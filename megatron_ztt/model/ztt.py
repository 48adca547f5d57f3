"""The Zero Token Transformer language model.

    x = embed(tokens); x = head(x)
    for c in 1..C:                        # every cycle reuses the middle layers' weights
        y = middle_c(x)                   # with cycle c's zero tokens
        x = x + g_c * (y - x)             # per-token gate (gate=true)
        stop here if the zero attention says the cycle did little (exit_threshold)
    logits = output(norm(tail(x)))

Parallelism is applied from outside: the layers are megatron-core's tensor-parallel ones, the
pipeline stages (``megatron_ztt.parallel.pipeline``) are built from the same blocks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.utils.checkpoint import checkpoint

from megatron_ztt.model.attention import ZeroTokenContext, ZeroTokenPool
from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.layers import (CycleGate, OutputHead, TokenEmbedding,
                                       build_transformer_layer, gather_logits,
                                       language_model_loss, rotary_embedding)
from megatron_ztt.model.plan import Application, application_plan, tail_applications


@dataclass
class ZTTOutput:
    """What a forward pass returns. Cycles are numbered from 1."""

    loss: Optional[torch.Tensor] = None  # the training objective: sum_c w_c * exit loss c
    lm_loss: Optional[torch.Tensor] = None  # LM loss of the final exit
    exit_losses: Dict[int, torch.Tensor] = field(default_factory=dict)  # cycle -> LM loss
    logits: Optional[torch.Tensor] = None  # [b, s, vocab], gathered over tensor parallel
    # application name -> mean zero attention (over heads, tokens and the rows that ran it)
    zero_attention: Dict[str, torch.Tensor] = field(default_factory=dict)
    gate: Dict[int, torch.Tensor] = field(default_factory=dict)  # cycle -> mean gate value
    cycles_used: Optional[torch.Tensor] = None  # [b] cycles each sequence ran

    def zero_attention_by_cycle(self, plan: List[Application]) -> Dict[int, torch.Tensor]:
        """Mean zero attention of each cycle's middle block."""
        per_cycle = defaultdict(list)
        for app in plan:
            if app.cycle is not None and app.name in self.zero_attention:
                per_cycle[app.cycle + 1].append(self.zero_attention[app.name])
        return {c: torch.stack(v).mean() for c, v in sorted(per_cycle.items())}


class _ZeroAttentionTally:
    """Sums of zero attention per application, reduced over tensor-parallel ranks once."""

    def __init__(self, num_heads: int):
        self.num_heads = num_heads
        self.sums: Dict[str, torch.Tensor] = {}
        self.rows: Dict[str, int] = {}

    def add(self, name: str, context: ZeroTokenContext) -> None:
        if context.zero_attention_sum is None:
            return
        # [rows, s] summed over this rank's heads -> sum over rows of the token mean
        total = context.zero_attention_sum.mean(dim=1).sum()
        self.sums[name] = self.sums.get(name, 0) + total
        self.rows[name] = self.rows.get(name, 0) + context.zero_attention_sum.shape[0]

    def means(self) -> Dict[str, torch.Tensor]:
        if not self.sums:
            return {}
        names = list(self.sums)
        totals = all_reduce_tensor_parallel(torch.stack([self.sums[n] for n in names]))
        return {n: totals[i] / (self.rows[n] * self.num_heads) for i, n in enumerate(names)}


def all_reduce_tensor_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel group (statistics only: no gradient flows through it)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, group=parallel_state.get_tensor_model_parallel_group())
    return tensor


class ZTTModel(torch.nn.Module):
    """The ZTT language model on one pipeline stage (tensor parallel inside)."""

    def __init__(self, config: ZTTConfig):
        super().__init__()
        config.check_parallel_layout(parallel_state.get_tensor_model_parallel_world_size())
        self.config = config
        self.plan = application_plan(config)
        self.embedding = TokenEmbedding(config)
        self.layers = torch.nn.ModuleList(
            build_transformer_layer(config, i) for i in range(config.num_layers))
        self.zero_token_pool = (
            ZeroTokenPool(self.plan, config.query_groups, config.head_dim, config.init_std)
            if config.zero_token else None)
        self.gates = (torch.nn.ModuleList(CycleGate(config) for _ in range(config.num_cycles))
                      if config.gate else None)
        self.output_head = OutputHead(config)

    # ------------------------------------------------------------------ building blocks
    def run_application(self, app: Application, hidden: torch.Tensor, rope: torch.Tensor,
                        record: bool = False):
        """One layer application with its own zero key. Returns (hidden, context)."""
        context = ZeroTokenContext(
            key=self.zero_token_pool[app.name] if self.zero_token_pool is not None else None,
            record=record and self.zero_token_pool is not None)
        layer = self.layers[app.layer]

        def run(h):
            return layer(h, attention_mask=None, rotary_pos_emb=rope, attention_bias=context)[0]

        if self.config.activation_checkpointing and self.training:
            return checkpoint(run, hidden, use_reentrant=False), context
        return run(hidden), context

    def logits_shard(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight if self.config.tie_embeddings else None
        return self.output_head(hidden, embedding_weight=weight)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                exit_threshold: Optional[float] = None, loss_mask: Optional[torch.Tensor] = None,
                return_logits: Optional[bool] = None, collect_stats: bool = True) -> ZTTOutput:
        """input_ids/labels/loss_mask: [batch, seq].

        ``exit_threshold`` stops a sequence after the first cycle whose mean zero attention
        reaches it; ``None`` runs every cycle. (``config.exit_threshold`` is the default
        that evaluation, export and generation pass here.)
        Logits are returned by default only when no labels are given. The losses after
        earlier cycles (``exit_loss_weights``) are computed in training mode only.
        """
        config = self.config
        if exit_threshold is not None and self.zero_token_pool is None:
            raise ValueError("early exit reads the zero attention: the model needs zero_token=true")
        if return_logits is None:
            return_logits = labels is None
        rope = rotary_embedding(config, input_ids.shape[1], input_ids.device)
        tally = _ZeroAttentionTally(config.num_attention_heads)
        out = ZTTOutput()

        hidden = self.embedding(input_ids)
        hidden, out.cycles_used, exit_states = self._run_cycles(
            hidden, rope, tally, out.gate, exit_threshold, collect_stats,
            # earlier exits' losses are a training objective; evaluation reads the final exit
            keep_exit_states=labels is not None and self.training and exit_threshold is None)
        for app in tail_applications(self.plan):
            hidden, context = self.run_application(app, hidden, rope, record=collect_stats)
            tally.add(app.name, context)
        logits = self.logits_shard(hidden)
        if return_logits:
            out.logits = gather_logits(logits, config.vocab_size)

        if labels is not None:
            weights = config.exit_weights
            out.lm_loss = language_model_loss(logits, labels, loss_mask)
            out.exit_losses[config.num_cycles] = out.lm_loss
            for cycle, state in exit_states.items():
                for app in tail_applications(self.plan):
                    state, _ = self.run_application(app, state, rope)
                out.exit_losses[cycle] = language_model_loss(self.logits_shard(state), labels,
                                                             loss_mask)
            out.loss = sum(weights[c - 1] * loss for c, loss in sorted(out.exit_losses.items())
                           if weights[c - 1] > 0)
        if collect_stats:
            out.zero_attention = tally.means()
        return out

    def _run_cycles(self, hidden, rope, tally, gate_means, exit_threshold, collect_stats,
                    keep_exit_states):
        """Head and cycles. Returns (final state [s, b, d], cycles used [b], exit states).

        With an exit threshold, a sequence whose cycle-mean zero attention reaches it keeps
        its state from that cycle and leaves the batch; the others go on.
        """
        config = self.config
        seq, batch, width = hidden.shape
        weights = config.exit_weights
        first_tail = min((a.index for a in tail_applications(self.plan)), default=len(self.plan))
        rows = torch.arange(batch, device=hidden.device)  # rows still cycling
        cycles_used = torch.full((batch,), config.num_cycles, dtype=torch.long,
                                 device=hidden.device)
        exited = None  # states of the rows that left early, [s, b, d]
        exit_states: Dict[int, torch.Tensor] = {}
        cycle_input, cycle_contexts = hidden, []

        for app in self.plan[:first_tail]:
            if app.starts_cycle:
                cycle_input, cycle_contexts = hidden, []
            hidden, context = self.run_application(
                app, hidden, rope, record=collect_stats or exit_threshold is not None)
            tally.add(app.name, context)
            cycle_contexts.append(context)
            if not app.ends_cycle:
                continue
            cycle = app.cycle + 1
            if self.gates is not None:
                hidden, gate = self.gates[app.cycle](cycle_input, hidden)
                gate_means[cycle] = gate.detach().float().mean()
            if cycle == config.num_cycles:
                break
            if keep_exit_states and weights[app.cycle] > 0:
                exit_states[cycle] = hidden
            if exit_threshold is None:
                continue
            done = self._sequence_zero_attention(cycle_contexts) >= exit_threshold
            if done.any():
                if exited is None:
                    exited = hidden.new_zeros(seq, batch, width)
                exited[:, rows[done]] = hidden[:, done]
                cycles_used[rows[done]] = cycle
                rows, hidden = rows[~done], hidden[:, ~done]
                if rows.numel() == 0:
                    break
        if exited is None:
            return hidden, cycles_used, exit_states
        if rows.numel():
            exited[:, rows] = hidden
        return exited, cycles_used, exit_states

    def _sequence_zero_attention(self, contexts: List[ZeroTokenContext]) -> torch.Tensor:
        """A_c per sequence: mean zero attention over the cycle's layers, heads and tokens."""
        per_layer = torch.stack([c.zero_attention_sum.mean(dim=1) for c in contexts])
        total = all_reduce_tensor_parallel(per_layer.sum(dim=0))
        return total / (len(contexts) * self.config.num_attention_heads)
