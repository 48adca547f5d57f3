"""The cycle loop of the Zero Token Transformer, in one file of plain torch.

    x = head(embed(tokens))
    for c in 1..C:                     # the middle layers' weights are shared by every cycle
        y = middle_c(x)                # each application with its own zero key
        x = x + g_c * (y - x)          # per-token gate, g_c = sigmoid(w_c . rmsnorm(y) + b_c)
        tokens whose exit signal crossed the threshold stop cycling here
    logits = output(norm(tail(x)))

Three models run this loop: the training model (``megatron_ztt.model.ztt``, megatron-core
layers), the circular pipeline stages (``megatron_ztt.parallel.circular``) and the exported Hugging
Face model, which ships this very file (and ``exit_policy.py``) next to its ``modeling_ztt.py``.
What differs between them is only *how one layer application is computed* (tensor-parallel
layers, a key/value cache, ...): they hand the loop a ``run(app, hidden, state, record)``
callable, whose attention is :func:`zero_key_attention`. The loop owns the order of
applications, the zero keys' attention, the gate and the carried cycle input; who runs a cycle
and who leaves after it is the exit policy's (``exit_policy.py``).

This file imports nothing but torch (and its sibling): it must load inside an exported model
directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .exit_policy import (EXIT_MODES, EXIT_OBJECTIVES, EXIT_SIGNALS, ActiveTokens,  # noqa: F401
                          EXIT_HEAD_FEATURES, ExitHead, ExitPolicy, ExitRule, ExitSignal,
                          ZeroAttentionTally,
                          check_exit_signal, check_num_cycles, exit_head_features,
                          keep_exited_kv, token_positions, uniform_draws)

CYCLE_MODES = ("vanilla", "basic", "head_tail")


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Application:
    """One run of one distinct layer. ``cycle`` is None for the head and the tail."""

    index: int  # position in the unrolled sequence (= the cache layer in the export)
    layer: int  # 0-based distinct layer
    cycle: Optional[int]  # 0-based cycle, None for head/tail
    starts_cycle: bool = False
    ends_cycle: bool = False
    after_cycles: bool = False  # runs after the last cycle (the tail): every exit passes it
    # the trained cycle whose zero keys and gate this application uses: its own cycle, or the
    # last trained one for the extra cycles of the depth dial (None: its own cycle)
    weights_cycle: Optional[int] = None

    @property
    def trained_cycle(self) -> Optional[int]:
        return self.cycle if self.weights_cycle is None else self.weights_cycle

    @property
    def name(self) -> str:
        """Key of this application's zero token in the Zero-Token Pool (1-based, readable).
        An extra cycle of the depth dial (beyond the trained C) names cycle C's key."""
        if self.cycle is None:
            return "tail" if self.after_cycles else "head"
        return f"cycle{self.trained_cycle + 1}_layer{self.layer + 1}"

    @property
    def label(self) -> str:
        """Unique name of the application (statistics): ``name`` with its own cycle."""
        if self.cycle is None:
            return self.name
        return f"cycle{self.cycle + 1}_layer{self.layer + 1}"


def cycled_layers(cycle_mode: str, num_layers: int) -> List[int]:
    """0-based distinct layers that every cycle runs."""
    if cycle_mode == "head_tail":
        return list(range(1, num_layers - 1))
    return list(range(num_layers))


def application_plan(config, num_cycles: Optional[int] = None) -> List[Application]:
    """The unrolled applications of ``config`` (anything with ``cycle_mode``, ``num_layers``
    and ``num_cycles``: the training config and the exported config alike).

    ``num_cycles`` is the depth dial: run C' cycles of a model trained with C (1 <= C' <= 2C).
    Cycles beyond C reuse the last trained cycle's zero keys and gate (cycle C's); C' < C
    simply stops after cycle C'."""
    trained = config.num_cycles
    cycles = trained if num_cycles is None else check_num_cycles(num_cycles, trained)
    plan: List[Application] = []
    head_tail = config.cycle_mode == "head_tail"
    if head_tail:
        plan.append(Application(0, 0, None))
    middle = cycled_layers(config.cycle_mode, config.num_layers)
    for cycle in range(cycles):
        for position, layer in enumerate(middle):
            plan.append(Application(len(plan), layer, cycle, starts_cycle=position == 0,
                                    ends_cycle=position == len(middle) - 1,
                                    weights_cycle=min(cycle, trained - 1)))
    if head_tail:
        plan.append(Application(len(plan), config.num_layers - 1, None, after_cycles=True))
    return plan


# --------------------------------------------------------------------------- state
@dataclass
class CycleState:
    """What flows from one application to the next (and, packed, between pipeline stages).

    Token-shaped tensors (``exited``, ``cycles_used``) have the shape of the full hidden
    without its last dimension, whatever the caller's layout ([s, b] or [b, s]). While a cycle
    runs on ``active``'s block, ``hidden`` and ``zero_sum`` are the block's.
    """

    hidden: torch.Tensor
    cycle_input: Optional[torch.Tensor] = None  # the open cycle's input, every token
    block_input: Optional[torch.Tensor] = None  # the same, ``active``'s block (the gate's)
    exit_states: List[torch.Tensor] = field(default_factory=list)  # kept for exit losses
    exited: Optional[torch.Tensor] = None  # bool: the token has left the cycles
    cycles_used: Optional[torch.Tensor] = None  # cycles each token ran
    zero_sum: Optional[torch.Tensor] = None  # open cycle's zero attention, summed
    num_cycles: Optional[int] = None  # cycles this pass runs (the depth dial)
    active: Optional[ActiveTokens] = None  # the open cycle's tokens (None: every token)
    # the reference (``ExitPolicy.compute_exited``): tokens that left are computed and then
    # overwritten; otherwise ``active`` is None only while nobody has left, with nothing to
    # overwrite (no masked copy of the hidden and key/values per application)
    overwrite_exited: bool = False

    @property
    def skipping(self) -> bool:
        """Every token has left the open cycle: nothing to compute."""
        return self.active is not None and self.active.empty


# A layer application as the caller computes it: (app, hidden, state, record) ->
# (new hidden, zero attention summed over the caller's heads per token, or None).
# While some tokens have left, ``hidden`` is ``state.active``'s block and so are the returned
# tensors; the caller's attention reads every token's key/values (``keep_exited_kv``).
RunApplication = Callable[[Application, torch.Tensor, CycleState, bool],
                          Tuple[torch.Tensor, Optional[torch.Tensor]]]


# =========================== the core: zero key, gate, cycle loop ===========================

# --------------------------------------------------------------------------- the zero key
def with_zero_key(key: torch.Tensor, value: torch.Tensor, zero_key: torch.Tensor):
    """key/value [b, groups, k, d] -> the same with the zero key (value 0) in row 0."""
    b, groups, _, d = key.shape
    zero_row = zero_key.to(key.dtype)[None, :, None, :].expand(b, groups, 1, d)
    return (torch.cat([zero_row, key], dim=2),
            torch.cat([value.new_zeros(b, groups, 1, value.shape[-1]), value], dim=2))


def zero_key_attention(query, keys, values, scale, *, zero_token: bool, mask=None,
                       causal: bool = False, zero_attention: bool = False, dropout_p: float = 0.0):
    """Attention over ``[k_z; K]``: every query sees the zero key, whose value is zero.

    query [b, heads, q, d]; keys/values [b, groups, k, d], with ``zero_token`` the zero key in
    row 0 (:func:`with_zero_key`, or a cache that holds it). ``mask`` [b or 1, 1, q, k] bool
    over those keys, or None: ``causal`` (the queries are the last tokens, one per real key)
    or every key. A causal call with a zero key puts a dummy query next to it, so that "every
    query sees k_z and the keys up to itself" is a square causal mask (fused kernels apply).

    ``zero_attention``: also the zero key's softmax weight per query [b, heads, q], read from
    the log-sum-exp of the same attention pass (exp(q.k_z scale - lse)), no second pass.
    Returns (output [b, heads, q, d], zero attention or None).
    """
    causal = causal and mask is None
    dummy = causal and zero_token
    if dummy:
        query = torch.cat([query.new_zeros(*query.shape[:2], 1, query.shape[-1]), query], dim=2)
    if zero_attention and zero_token:
        out, lse = attention_with_lse(query, keys, values, scale, mask, causal, dropout_p)
        heads, groups = query.shape[1], keys.shape[1]
        zero_keys = keys[:, :, 0].detach().repeat_interleave(heads // groups, dim=1)
        scores = torch.einsum("bhqd,bhd->bhq", query.detach().float(), zero_keys.float()) * scale
        probs = torch.exp(scores - lse)
    else:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                             dropout_p=dropout_p, is_causal=causal,
                                             scale=scale, enable_gqa=query.shape[1] != keys.shape[1])
        probs = None
    if dummy:
        out, probs = out[:, :, 1:], None if probs is None else probs[:, :, 1:]
    return out, probs


# --------------------------------------------------------------------------- the gate
class CycleGate(torch.nn.Module):
    """x_next = x + g * (y - x), g = sigmoid(w . rmsnorm(y) + b), one scalar per token.

    w starts at zero and b at ``bias_init``, so a cycle starts almost fully open (b = 4:
    g = 0.98) or closed (b very negative), as the config asks.
    """

    def __init__(self, hidden_size: int, bias_init: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))
        self.bias = torch.nn.Parameter(torch.full((1,), float(bias_init)))

    def forward(self, cycle_input: torch.Tensor, cycle_output: torch.Tensor):
        normed = F.rms_norm(cycle_output, (cycle_output.shape[-1],), eps=self.eps)
        gate = torch.sigmoid(normed @ self.weight.to(normed.dtype) + self.bias.to(normed.dtype))
        gate = gate.unsqueeze(-1)
        return cycle_input + gate * (cycle_output - cycle_input), gate


# --------------------------------------------------------------------------- the loop
class CycleLoop:
    """Applications in order. A cycle opens (its input kept, its tokens gathered once), runs
    its layers (each application with its own zero key) and closes: the gate blends output and
    input, the block goes back to every token, the policy decides who leaves. The bookkeeping
    it calls (``gather``, ``scatter``, ``record_*``, ...) is :class:`CycleEngine`'s, below."""

    def run(self, apps: Sequence[Application], state: CycleState, run: RunApplication,
            policy: ExitPolicy, *, keep_exit_states: bool = False,
            tally: Optional[ZeroAttentionTally] = None,
            skip: Optional[Callable[[Application, CycleState], None]] = None,
            after: Optional[Callable[[CycleState], None]] = None, exit_tail=None) -> CycleState:
        """``apps`` in order (the options: :class:`CycleEngine`)."""
        keep = keep_exit_states and state.num_cycles == self.num_cycles
        for app in apps:
            if app.cycle is None:  # head and tail: every token
                state.hidden = run(app, state.hidden, state, False)[0]
                self.tail_of_exit_states(app, state, run, exit_tail)
            else:
                self.step(app, state, run, policy, keep, tally, skip)
            if after is not None:
                after(state)
        return state

    def step(self, app, state, run, policy, keep_exit_states, tally, skip) -> None:
        """One application of cycle ``app.cycle``."""
        if app.starts_cycle:
            self.open_cycle(app.cycle, state, policy)
        if state.skipping:
            if skip is not None:
                skip(app, state)
        else:
            reads_zero = policy.reads_zero_attention(app.cycle, state.num_cycles)
            state.hidden, zero = run(app, state.hidden, state, reads_zero or tally is not None)
            self.record_zero_attention(app, state, zero, reads_zero, tally)
        if app.ends_cycle:
            self.close_cycle(app, state, policy, keep_exit_states, tally)

    def open_cycle(self, cycle: int, state: CycleState, policy: ExitPolicy) -> None:
        """The cycle's input is kept (gate, leavers); its tokens are gathered once."""
        state.cycle_input, state.zero_sum = state.hidden, None
        state.active = policy.begin_cycle(cycle, state.exited)
        self.gather(state)

    def close_cycle(self, app, state, policy, keep_exit_states, tally) -> None:
        if self.gates is not None and not state.skipping:
            state.hidden, gate = self.gates[app.trained_cycle](state.block_input, state.hidden)
            self.record_gate(app, state, gate, tally)
        self.scatter(state)
        self.keep_exit_state(app, state, keep_exit_states)
        policy.end_cycle(app.cycle, state.num_cycles, state, self.exit_signal)


# =========================== end of the core ===============================================
# Bookkeeping around it (with the plan and the state above, and exit_policy.py).


def attention_with_lse(query, keys, values, scale, mask, causal, dropout_p, fused=None):
    """(output, log-sum-exp of each query's scores [b, heads, q] float32): the fused CPU
    kernel returns both (``fused``, by default on CPU without dropout, which it lacks);
    elsewhere one plain pass over the scores (a CUDA build could read the lse of its
    efficient-attention kernel the same way)."""
    if fused is None:
        fused = query.device.type == "cpu" and not dropout_p
    if fused:
        bias = None
        if mask is not None:  # the CPU kernel takes an additive mask of the query's dtype
            bias = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, dropout_p, causal, attn_mask=bias, scale=scale)
        return out, lse.float()
    repeat = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
    scores = (query @ keys.transpose(-1, -2)).float() * scale
    if mask is None and causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril(
            scores.shape[-1] - scores.shape[-2])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = F.dropout(torch.exp(scores - lse[..., None]), dropout_p)
    return (weights.to(values.dtype) @ values), lse


def zero_attention_by_cycle(plan: Sequence[Application],
                            per_application: Dict[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Mean zero attention of each cycle's middle block (cycles numbered from 1)."""
    per_cycle: Dict[int, List[torch.Tensor]] = {}
    for app in plan:
        if app.cycle is not None and app.label in per_application:
            per_cycle.setdefault(app.cycle + 1, []).append(per_application[app.label])
    return {c: torch.stack(v).mean() for c, v in sorted(per_cycle.items())}


# --------------------------------------------------------------------------- the engine
class CycleEngine(CycleLoop):
    """Runs applications of the plan on a :class:`CycleState`; see the module docstring.

    ``gates``: cycle (0-based) -> :class:`CycleGate`, or None without gates (a pipeline stage
    passes the gates it holds). ``num_heads``: attention heads of the whole model (the zero
    attention is a mean over them). ``reduce_heads`` sums a tensor over the ranks that split
    the heads (identity on one rank). ``compute_exited``: the reference that computes every
    token (see :class:`ExitPolicy`).

    :meth:`CycleLoop.run` options: ``keep_exit_states``: keep the states after the cycles whose
    exit loss is weighted (training, trained depth only); ``tally``: zero-attention and gate
    statistics; ``skip(app, state)`` hears of the applications nobody runs because every
    token has left (the export fills its cache); ``after(state)`` sees the state after each
    application (every token's between cycles); ``exit_tail(app, exit_state)`` runs the tail
    on a kept exit state instead of ``run`` (the exit losses on a subset of positions,
    ``model/exit_losses.py``).
    """

    compute_exited = False
    # states [n, d] -> next-token logits [n, vocab]: what exit_signal=kl reads (the model
    # that holds the output layer sets it)
    readout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    exit_head = None  # exit_signal=trained's ExitHead (models trained with exit_objective)

    def __init__(self, plan: Sequence[Application], *, num_cycles: int, num_heads: int,
                 gates=None, exit_loss_weights: Optional[Sequence[float]] = None,
                 reduce_heads: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
        self.plan = list(plan)
        self.num_cycles = num_cycles
        self.num_heads = num_heads
        self.gates = gates
        weights = exit_loss_weights or [0.0] * (num_cycles - 1) + [1.0]
        self.exit_loss_weights = [float(w) for w in weights]
        self.reduce_heads = reduce_heads
        self.layers_per_cycle = sum(1 for a in self.plan if a.cycle == 0)

    def policy(self, rule: Optional[ExitRule]) -> ExitPolicy:
        return ExitPolicy(rule, zero_attention_mean=self.zero_attention_mean,
                          compute_exited=self.compute_exited, readout=self.readout,
                          exit_head=self.exit_head)

    def zero_attention_mean(self, zero_sum: torch.Tensor) -> torch.Tensor:
        """Per token: the cycle's zero attention averaged over its layers and all heads."""
        return self.reduce_heads(zero_sum) / (self.layers_per_cycle * self.num_heads)

    def exit_signal(self, cycle: int, state: CycleState, rule: ExitRule) -> torch.Tensor:
        """What the exit decision after ``cycle`` reads (``ExitPolicy.signal``)."""
        return self.policy(rule).signal(cycle, state, rule)

    def begin(self, hidden: torch.Tensor, policy: ExitPolicy,
              num_cycles: Optional[int] = None) -> CycleState:
        """The state before the first application (``num_cycles``: this pass's depth)."""
        depth = self.num_cycles if num_cycles is None else num_cycles
        tokens = hidden.shape[:-1]
        return CycleState(hidden=hidden, num_cycles=depth, exited=policy.begin(tokens, hidden.device),
                          cycles_used=torch.full(tokens, depth, dtype=torch.long, device=hidden.device),
                          overwrite_exited=policy.compute_exited)

    def record_zero_attention(self, app, state: CycleState, zero, reads_zero: bool,
                              tally: Optional[ZeroAttentionTally]) -> None:
        """An application's zero attention: into the statistics, and into the open cycle's sum
        when the exit decision reads it."""
        if tally is not None and zero is not None:
            tally.add_zero_attention(app.label, zero, state.active)
        if reads_zero and zero is not None:
            state.zero_sum = zero.float() if state.zero_sum is None else state.zero_sum + zero.float()

    def record_gate(self, app, state: CycleState, gate, tally) -> None:
        if tally is not None:  # the mean over the tokens that ran the cycle
            tally.add_gate(app.cycle + 1, gate, state.active)

    def keep_exit_state(self, app, state: CycleState, keep: bool) -> None:
        """After a cycle whose exit loss is weighted: its state is kept for that loss."""
        if keep and app.cycle in self.exit_cycles:
            state.exit_states = [*state.exit_states, state.hidden]

    def tail_of_exit_states(self, app, state: CycleState, run,
                            exit_tail: Optional[Callable[[Application, torch.Tensor],
                                                         torch.Tensor]] = None) -> None:
        """The tail runs on the kept exit states too (each exit loss reads its output);
        ``exit_tail(app, exit_state)`` runs it instead of ``run`` (the exit losses on a subset
        of positions, ``model/exit_losses.py``)."""
        if app.after_cycles:
            state.exit_states = [run(app, s, state, False)[0] if exit_tail is None
                                 else exit_tail(app, s) for s in state.exit_states]

    def gather(self, state: CycleState) -> None:
        """``hidden`` and ``block_input`` become the active set's block (once per cycle)."""
        state.block_input = state.cycle_input
        if state.active is not None and not state.active.empty:
            state.hidden = state.block_input = state.active.gather(state.cycle_input)

    def scatter(self, state: CycleState) -> None:
        """Back to every token (once per cycle): the tokens that left keep the cycle's input."""
        active = state.active
        if active is not None and active.empty:
            state.hidden = state.cycle_input
        elif active is not None:
            state.hidden = active.scatter(state.cycle_input, state.hidden)
            if state.zero_sum is not None:
                state.zero_sum = active.scatter(state.zero_sum.new_zeros(state.exited.shape),
                                                state.zero_sum)
        elif state.exited is not None and state.overwrite_exited:  # every token computed
            state.hidden = torch.where(state.exited[..., None], state.cycle_input, state.hidden)
        state.active = None

    # ------------------------------------------------------------------ the objective
    @property
    def exit_cycles(self) -> List[int]:
        """0-based cycles before the last whose state is kept for a weighted exit loss."""
        return [c for c, w in enumerate(self.exit_loss_weights) if w > 0 and c < self.num_cycles - 1]

    def objective(self, losses: Dict[int, torch.Tensor]) -> torch.Tensor:
        """sum_c w_c * loss_c over the cycles (1-based keys) whose weight is positive."""
        return sum(self.exit_loss_weights[c - 1] * loss for c, loss in sorted(losses.items())
                   if self.exit_loss_weights[c - 1] > 0)

    def exit_losses(self, final_loss: torch.Tensor, exit_state_losses: Sequence[torch.Tensor]
                    ) -> Dict[int, torch.Tensor]:
        """Cycle (1-based) -> LM loss: the final output's and those of the kept exit states."""
        losses = {self.num_cycles: final_loss}
        for cycle, loss in zip(self.exit_cycles, exit_state_losses):
            losses[cycle + 1] = loss
        return losses
