"""The cycle loop of the Zero Token Transformer, in one file of plain torch.

    x = head(embed(tokens))
    for c in 1..C:                     # the middle layers' weights are shared by every cycle
        y = middle_c(x)                # each application with its own zero key
        x = x + g_c * (y - x)          # per-token gate, g_c = sigmoid(w_c . rmsnorm(y) + b_c)
        tokens whose zero attention reached the threshold stop cycling here
    logits = output(norm(tail(x)))

Three models run this loop: the training model (``megatron_ztt.model.ztt``, megatron-core
layers), the circular pipeline stages (``megatron_ztt.parallel.circular``) and the exported Hugging
Face model, which ships this very file next to its ``modeling_ztt.py``. What differs between
them is only *how one layer application is computed* (tensor-parallel layers, a key/value
cache, ...): they hand the engine a ``run(app, hidden, state, record)`` callable. Everything
else lives here: the order of applications, the gate, the carried cycle input, which tokens
have left (and the gathering of the others, so that the ones that left are not computed),
the exit decision, the zero-attention statistics and the weighted exit objective.

This file imports nothing but torch: it must load inside an exported model directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

CYCLE_MODES = ("vanilla", "basic", "head_tail")
EXIT_MODES = ("token", "sequence")


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

    @property
    def name(self) -> str:
        """Key of this application's zero token in the Zero-Token Pool (1-based, readable)."""
        if self.cycle is None:
            return "tail" if self.after_cycles else "head"
        return f"cycle{self.cycle + 1}_layer{self.layer + 1}"


def cycled_layers(cycle_mode: str, num_layers: int) -> List[int]:
    """0-based distinct layers that every cycle runs."""
    if cycle_mode == "head_tail":
        return list(range(1, num_layers - 1))
    return list(range(num_layers))


def application_plan(config) -> List[Application]:
    """The unrolled applications of ``config`` (anything with ``cycle_mode``, ``num_layers``
    and ``num_cycles``: the training config and the exported config alike)."""
    plan: List[Application] = []
    head_tail = config.cycle_mode == "head_tail"
    if head_tail:
        plan.append(Application(0, 0, None))
    middle = cycled_layers(config.cycle_mode, config.num_layers)
    for cycle in range(config.num_cycles):
        for position, layer in enumerate(middle):
            plan.append(Application(len(plan), layer, cycle, starts_cycle=position == 0,
                                    ends_cycle=position == len(middle) - 1))
    if head_tail:
        plan.append(Application(len(plan), config.num_layers - 1, None, after_cycles=True))
    return plan


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


# --------------------------------------------------------------------------- state
@dataclass
class CycleState:
    """What flows from one application to the next (and, packed, between pipeline stages).

    Token-shaped tensors (``exited``, ``cycles_used``, ``zero_sum``) have the shape of
    ``hidden`` without its last dimension, whatever the caller's layout ([s, b] or [b, s]).
    """

    hidden: torch.Tensor
    cycle_input: Optional[torch.Tensor] = None  # input of the open cycle (gate, exits)
    exit_states: List[torch.Tensor] = field(default_factory=list)  # kept for exit losses
    exited: Optional[torch.Tensor] = None  # bool: the token has left the cycles
    cycles_used: Optional[torch.Tensor] = None  # cycles each token ran (set by begin())
    zero_sum: Optional[torch.Tensor] = None  # open cycle's zero attention, summed
    # the open cycle's tokens still cycling, gathered (None: every token is computed)
    active: Optional["ActiveTokens"] = None

    @property
    def all_exited(self) -> bool:
        return self.exited is not None and bool(self.exited.all())


class ZeroAttentionTally:
    """Mean zero attention per application and mean gate per cycle, over micro batches.

    Sums stay local; ``means(reduce)`` reduces them over the ranks that split the heads (one
    collective for all entries) and divides by tokens x heads.
    """

    def __init__(self, num_heads: int):
        self.num_heads = num_heads
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.tokens: Dict[str, int] = {}
        self.gates: Dict[int, List[torch.Tensor]] = {}

    def add_zero_attention(self, name: str, per_token: torch.Tensor) -> None:
        """``per_token``: zero attention summed over this rank's heads, one value per token."""
        self.sums[name] = self.sums.get(name, 0) + per_token.detach().float().sum()
        self.tokens[name] = self.tokens.get(name, 0) + per_token.numel()

    def add_gate(self, cycle: int, gate: torch.Tensor) -> None:
        self.gates.setdefault(cycle, []).append(gate.detach().float().mean())

    def zero_attention(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not self.sums:
            return {}
        names = list(self.sums)
        totals = reduce(torch.stack([torch.as_tensor(self.sums[n]) for n in names]))
        return {n: totals[i] / (self.tokens[n] * self.num_heads) for i, n in enumerate(names)}

    def gate_means(self) -> Dict[int, torch.Tensor]:
        return {c: torch.stack(v).mean() for c, v in sorted(self.gates.items())}


def zero_attention_by_cycle(plan: Sequence[Application],
                            per_application: Dict[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Mean zero attention of each cycle's middle block (cycles numbered from 1)."""
    per_cycle: Dict[int, List[torch.Tensor]] = {}
    for app in plan:
        if app.cycle is not None and app.name in per_application:
            per_cycle.setdefault(app.cycle + 1, []).append(per_application[app.name])
    return {c: torch.stack(v).mean() for c, v in sorted(per_cycle.items())}


class ActiveTokens:
    """The tokens still cycling, gathered row by row into a padded block, so that a layer
    application computes them only (the tokens that left are not computed at all).

    ``exited``: the state's token-shaped bool tensor, whose sequence axis is ``token_axis``
    (the other one holds the rows). In row-major terms ([rows, tokens]): ``rows`` [r] are the
    rows with a token still cycling, ``positions`` [r, n] the token index of each slot of the
    block (a row's cycling tokens first, in order), ``valid`` [r, n] marks the slots that hold
    one. The other slots pad a row to the longest one: they repeat one of the row's tokens,
    so they compute throwaway but finite values, and they are never written back.

    A decoding step (one token per row) gathers the rows still cycling; a prompt gathers
    its cycling tokens. Everything a caller derives from the set (rotary angles, attention
    masks) can be kept in ``memo`` for the cycle's other layers.
    """

    def __init__(self, exited: torch.Tensor, token_axis: int):
        self.seq_axis, self.batch_axis = token_axis, 1 - token_axis
        active = ~exited.movedim(token_axis, 1)
        self.rows = active.any(dim=1).nonzero().squeeze(1)
        active = active[self.rows]
        counts = active.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0
        order = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)
        self.positions = order[:, :width]
        self.valid = torch.arange(width, device=exited.device)[None] < counts[:, None]
        slot_row, slot = self.valid.nonzero(as_tuple=True)
        self._slots = (slot_row, slot)
        self._tokens = (self.rows[slot_row], self.positions[slot_row, slot])
        self._memo: Dict[str, object] = {}

    def memo(self, name: str, make: Callable[[], object]):
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    def _axes(self, batch_axis: Optional[int], seq_axis: Optional[int]) -> Tuple[int, int]:
        if batch_axis is None:
            return self.batch_axis, self.seq_axis
        return batch_axis, seq_axis

    def gather(self, full: torch.Tensor, batch_axis: Optional[int] = None,
               seq_axis: Optional[int] = None) -> torch.Tensor:
        """The block of ``full`` (rows/tokens on the given axes, default: the state's)."""
        b, s = self._axes(batch_axis, seq_axis)
        rows_first = full.movedim((b, s), (0, 1))
        return rows_first[self.rows[:, None], self.positions].movedim((0, 1), (b, s))

    def scatter(self, full: torch.Tensor, block: torch.Tensor, batch_axis: Optional[int] = None,
                seq_axis: Optional[int] = None) -> torch.Tensor:
        """A copy of ``full`` whose cycling tokens take their values from ``block``."""
        b, s = self._axes(batch_axis, seq_axis)
        out = full.clone()
        out.movedim((b, s), (0, 1))[self._tokens] = block.movedim((b, s), (0, 1))[self._slots]
        return out

    def values(self, block: torch.Tensor) -> torch.Tensor:
        """The real slots of a token-shaped block, flat (padding left out)."""
        return block.movedim((self.batch_axis, self.seq_axis), (0, 1))[self._slots]


# A layer application as the caller computes it: (app, hidden, state, record) ->
# (new hidden, zero attention summed over the caller's heads per token, or None).
# While some tokens have left, ``hidden`` is ``state.active``'s block (see ActiveTokens) and
# so are the returned tensors; the caller's attention reads every token's key/values: the
# block's new ones, and the last computed cycle's for the tokens that left.
RunApplication = Callable[[Application, torch.Tensor, CycleState, bool],
                          Tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass
class ExitRule:
    """When a token stops cycling (inference only).

    After cycle c < C, the token's zero attention over the cycle's layers and all heads is
    averaged: ``A_c`` per token. ``mode="token"`` stops each token whose ``A_c >= threshold``
    (causal: ``A_c`` of token t reads only tokens <= t). ``mode="sequence"`` averages ``A_c``
    over the tokens of the call first (``token_axis``; ``token_weights`` leave out padding)
    and stops whole rows; it looks at every token of the call, so it is causal only when a
    call holds one new token per row (decoding).
    """

    threshold: float
    mode: str = "token"
    token_axis: int = 1
    token_weights: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.mode not in EXIT_MODES:
            raise ValueError(f"exit mode must be one of {', '.join(EXIT_MODES)}, got {self.mode!r}")


class CycleEngine:
    """Runs applications of the plan on a :class:`CycleState`; see the module docstring.

    ``gates``: cycle (0-based) -> :class:`CycleGate`, or None without gates (a pipeline stage
    passes the gates it holds). ``num_heads``: attention heads of the whole model (the zero
    attention is a mean over them). ``reduce_heads`` sums a tensor over the ranks that split
    the heads (identity on one rank).

    ``compute_exited``: compute the tokens that left too and overwrite them afterwards, as
    before tokens were gathered (slower, same results; the tests' reference).
    """

    compute_exited = False

    def __init__(self, plan: Sequence[Application], *, num_cycles: int, num_heads: int,
                 gates=None, exit_loss_weights: Optional[Sequence[float]] = None,
                 reduce_heads: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
        self.plan = list(plan)
        self.num_cycles = num_cycles
        self.num_heads = num_heads
        self.gates = gates
        self.has_gate = gates is not None
        weights = exit_loss_weights or [0.0] * (num_cycles - 1) + [1.0]
        self.exit_loss_weights = [float(w) for w in weights]
        self.reduce_heads = reduce_heads
        self.layers_per_cycle = sum(1 for a in self.plan if a.cycle == 0)

    # ------------------------------------------------------------------ what travels
    @property
    def exit_cycles(self) -> List[int]:
        """0-based cycles before the last whose state is kept for a weighted exit loss."""
        return [c for c, w in enumerate(self.exit_loss_weights) if w > 0 and c < self.num_cycles - 1]

    def carries_cycle_input(self, app: Application) -> bool:
        """Whether the state arriving at ``app`` holds the open cycle's input (the gate's)."""
        return self.has_gate and app.cycle is not None and not app.starts_cycle

    def pack(self, state: CycleState, next_app: Optional[Application]) -> Tuple[torch.Tensor, ...]:
        """The tensors a pipeline stage sends on: (hidden, [cycle input], *exit states)."""
        carried = [state.hidden]
        if next_app is not None and self.carries_cycle_input(next_app):
            carried.append(state.cycle_input)
        return (*carried, *state.exit_states)

    def unpack(self, app: Application, tensors: Sequence[torch.Tensor]) -> CycleState:
        tensors = list(tensors)
        state = CycleState(hidden=tensors.pop(0))
        if self.carries_cycle_input(app):
            state.cycle_input = tensors.pop(0)
        state.exit_states = tensors
        return state

    # ------------------------------------------------------------------ the loop
    def begin(self, hidden: torch.Tensor, exit_rule: Optional[ExitRule] = None) -> CycleState:
        tokens = hidden.shape[:-1]
        state = CycleState(hidden=hidden, cycles_used=torch.full(
            tokens, self.num_cycles, dtype=torch.long, device=hidden.device))
        if exit_rule is not None:
            state.exited = torch.zeros(tokens, dtype=torch.bool, device=hidden.device)
        return state

    def run(self, apps: Sequence[Application], state: CycleState, run: RunApplication, *,
            exit_rule: Optional[ExitRule] = None, keep_exit_states: bool = False,
            tally: Optional[ZeroAttentionTally] = None,
            skip: Optional[Callable[[Application, CycleState], None]] = None) -> CycleState:
        for app in apps:
            state = self.step(app, state, run, exit_rule=exit_rule,
                              keep_exit_states=keep_exit_states, tally=tally, skip=skip)
        return state

    def step(self, app: Application, state: CycleState, run: RunApplication, *,
             exit_rule: Optional[ExitRule] = None, keep_exit_states: bool = False,
             tally: Optional[ZeroAttentionTally] = None,
             skip: Optional[Callable[[Application, CycleState], None]] = None) -> CycleState:
        """One application. ``keep_exit_states``: keep the states after the cycles whose exit
        loss is weighted (training); ``skip(app, state)`` is told about applications that
        nobody needs because every token has left (the export fills its cache there).
        While some tokens have left, ``run`` gets the block of the others (``state.active``)."""
        cycling = app.cycle is not None
        decides = (exit_rule is not None and cycling and app.cycle < self.num_cycles - 1)
        if app.starts_cycle:
            # the exit rule restores leavers from here, the gate blends with it
            if self.has_gate or exit_rule is not None:
                state.cycle_input = state.hidden
            state.zero_sum = None
            state.active = self._active_tokens(state, exit_rule)
        if not cycling:
            state.active = None
        if cycling and state.all_exited:
            if skip is not None:
                skip(app, state)
            return state

        active = state.active
        block = state.hidden if active is None else active.gather(state.hidden)
        hidden, zero = run(app, block, state, decides or tally is not None)
        if active is not None:  # the tokens that left keep their state (restored below)
            hidden = active.scatter(state.hidden, hidden)
            if tally is not None and zero is not None:
                tally.add_zero_attention(app.name, active.values(zero))
            if zero is not None:
                zero = active.scatter(zero.new_zeros(state.exited.shape), zero)
        elif tally is not None and zero is not None:
            tally.add_zero_attention(app.name, zero)
        if decides and zero is not None:
            state.zero_sum = zero.float() if state.zero_sum is None else state.zero_sum + zero.float()
        if app.after_cycles and state.exit_states:  # every kept exit goes through the tail too
            state.exit_states = [run(app, kept, state, False)[0] for kept in state.exit_states]
        state.hidden = hidden
        if not app.ends_cycle:
            return state

        if self.gates is not None:
            state.hidden, gate = self.gates[app.cycle](state.cycle_input, state.hidden)
            if tally is not None:
                # the mean over the tokens that ran the cycle
                tally.add_gate(app.cycle + 1, gate if active is None else gate[~state.exited])
        if state.exited is not None and bool(state.exited.any()):
            state.hidden = torch.where(state.exited[..., None], state.cycle_input, state.hidden)
        if keep_exit_states and app.cycle in self.exit_cycles:
            state.exit_states = [*state.exit_states, state.hidden]
        if decides and state.zero_sum is not None:
            self._decide_exits(app.cycle, state, exit_rule)
        return state

    def _active_tokens(self, state: CycleState, exit_rule: Optional[ExitRule]
                       ) -> Optional[ActiveTokens]:
        """The cycle's tokens to compute, when some (not all) have left; None: all of them."""
        if (exit_rule is None or self.compute_exited or state.exited is None
                or not bool(state.exited.any()) or bool(state.exited.all())):
            return None
        return ActiveTokens(state.exited, exit_rule.token_axis)

    def exit_signal(self, zero_sum: torch.Tensor) -> torch.Tensor:
        """Per token: the cycle's zero attention averaged over its layers and all heads."""
        total = self.reduce_heads(zero_sum)
        return total / (self.layers_per_cycle * self.num_heads)

    def _decide_exits(self, cycle: int, state: CycleState, rule: ExitRule) -> None:
        signal = self.exit_signal(state.zero_sum)
        if rule.mode == "sequence":
            weights = rule.token_weights
            if weights is None:
                signal = signal.mean(dim=rule.token_axis, keepdim=True)
            else:
                weights = weights.to(signal.dtype)
                signal = ((signal * weights).sum(dim=rule.token_axis, keepdim=True)
                          / weights.sum(dim=rule.token_axis, keepdim=True).clamp(min=1.0))
            signal = signal.expand_as(state.exited)
        leaving = (signal >= rule.threshold) & ~state.exited
        if bool(leaving.any()):
            state.cycles_used = torch.where(leaving, torch.full_like(state.cycles_used, cycle + 1),
                                            state.cycles_used)
            state.exited = state.exited | leaving

    # ------------------------------------------------------------------ the objective
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
