"""The cycle loop of the Zero Token Transformer, in one file of plain torch.

    x = head(embed(tokens))
    for c in 1..C:                     # the middle layers' weights are shared by every cycle
        y = middle_c(x)                # each application with its own zero key
        x = x + g_c * (y - x)          # per-token gate, g_c = sigmoid(w_c . rmsnorm(y) + b_c)
        tokens whose exit signal crossed the threshold stop cycling here
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

import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

CYCLE_MODES = ("vanilla", "basic", "head_tail")
EXIT_MODES = ("token", "sequence")


@dataclass(frozen=True)
class ExitSignal:
    """What a token's exit decision after a cycle reads (see :meth:`CycleEngine.exit_signal`).

    ``exits_below``: the token leaves when its signal is *below* the threshold (``signal <
    threshold``); otherwise when it is at or above it (``signal >= threshold``).
    """

    name: str
    reads_zero_attention: bool
    exits_below: bool
    meaning: str


EXIT_SIGNALS = {s.name: s for s in (
    ExitSignal("zero_attention", True, False,
               "the cycle's zero attention, mean over its layers and all heads; exit when >= "
               "threshold (in [0, 1])"),
    ExitSignal("zero_attention_relative", True, False,
               "the zero key's weight over the average real key's, A (i+1) / (1 - A) at 0-based "
               "position i; 1 under uniform attention at every position; exit when >= threshold"),
    ExitSignal("hidden_change", False, True,
               "relative L2 change of the token's state over the cycle, |x_c - x_(c-1)| / "
               "|x_(c-1)|; exit when < threshold"),
    ExitSignal("random", False, True,
               "a seeded uniform draw in [0, 1) per token, cycle and row; exit when < threshold, "
               "so the threshold is the exit probability per cycle"),
)}


def check_exit_signal(signal: str, zero_token: bool = True) -> ExitSignal:
    """The named signal, or a one-line ValueError naming ``exit_signal``."""
    if signal not in EXIT_SIGNALS:
        raise ValueError(f"exit_signal must be one of {', '.join(EXIT_SIGNALS)}, got {signal!r}")
    found = EXIT_SIGNALS[signal]
    if found.reads_zero_attention and not zero_token:
        raise ValueError(f"exit_signal={signal} reads the zero attention and this model has no "
                         f"zero tokens (zero_token=false); use exit_signal=hidden_change or random")
    return found


def check_num_cycles(num_cycles, trained: int) -> int:
    """The depth dial: 1 <= num_cycles <= 2 * trained, or a one-line ValueError."""
    try:  # any integer type (a numpy or 0-d tensor one too), never a float or a bool
        value = None if isinstance(num_cycles, bool) else operator.index(num_cycles)
    except TypeError:
        value = None
    if value is None or not 1 <= value <= 2 * trained:
        raise ValueError(f"num_cycles must be an integer from 1 to {2 * trained} (twice the "
                         f"{trained} trained cycles), got {num_cycles!r}")
    return value


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
    num_cycles: Optional[int] = None  # cycles this pass runs (the depth dial); None: trained C
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
        if app.cycle is not None and app.label in per_application:
            per_cycle.setdefault(app.cycle + 1, []).append(per_application[app.label])
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

    After cycle c < C the engine computes one ``signal`` per token (``EXIT_SIGNALS``; see
    :meth:`CycleEngine.exit_signal`) and the token leaves when the signal reaches the
    threshold: ``signal >= threshold``, or ``signal < threshold`` for the signals that exit
    below (``hidden_change``, ``random``). ``mode="token"`` decides per token (causal: every
    signal of token t reads only tokens <= t). ``mode="sequence"`` averages the signal over
    the tokens of the call first (``token_axis``; ``token_weights`` leave out padding) and
    stops whole rows; it looks at every token of the call, so it is causal only when a call
    holds one new token per row (decoding).

    ``positions``: per token, the 0-based position among the real tokens of its row (so the
    query sees ``positions + 1`` real keys); needed by ``zero_attention_relative`` and
    ``random``. ``seed`` seeds ``random``.
    """

    threshold: float
    mode: str = "token"
    token_axis: int = 1
    token_weights: Optional[torch.Tensor] = None
    signal: str = "zero_attention"
    positions: Optional[torch.Tensor] = None
    seed: int = 0

    def __post_init__(self):
        if self.mode not in EXIT_MODES:
            raise ValueError(f"exit mode must be one of {', '.join(EXIT_MODES)}, got {self.mode!r}")
        self.kind = check_exit_signal(self.signal)
        if self.signal in ("zero_attention_relative", "random") and self.positions is None:
            raise ValueError(f"exit_signal={self.signal} needs the token positions")

    @property
    def reads_zero_attention(self) -> bool:
        return self.kind.reads_zero_attention


def token_positions(length: int, batch: int, device, token_axis: int = 1) -> torch.Tensor:
    """``ExitRule.positions`` without padding or cache: 0..length-1 along ``token_axis``."""
    positions = torch.arange(length, device=device)
    if token_axis == 0:
        return positions[:, None].expand(length, batch)
    return positions[None, :].expand(batch, length)


_MASK32 = 0xFFFFFFFF


def uniform_draws(seed: int, cycle: int, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) for each (seed, cycle, row, position), from an integer hash
    (so that the draw of a token does not depend on how many tokens a call holds: a prefill
    and token-by-token decoding draw the same numbers)."""
    x = ((seed * 0x9E3779B1) ^ (cycle * 0x85EBCA77)) & _MASK32
    x = (x + rows.long() * 0xC2B2AE3D + positions.long() * 0x27D4EB2F) & _MASK32
    for multiplier in (0x7FEB352D, 0x846CA68B):  # lowbias32 (two multiply-xorshift rounds)
        x = x ^ (x >> 16)
        x = (x * multiplier) & _MASK32
    x = x ^ (x >> 16)
    return (x >> 8).float() / float(1 << 24)


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

    def carries_cycle_input(self, app: Application, exits: bool = False) -> bool:
        """Whether the state arriving at ``app`` holds the open cycle's input (the gate's, and
        with an exit rule the one leavers are restored to)."""
        return (self.has_gate or exits) and app.cycle is not None and not app.starts_cycle

    def pack(self, state: CycleState, next_app: Optional[Application]) -> Tuple[torch.Tensor, ...]:
        """The tensors a pipeline stage sends on: (hidden, [cycle input], [exit record],
        *exit states). The exit record ([..., 3] float32: exited, cycles used, the open
        cycle's zero-attention sum) travels when an exit rule is on."""
        exits = state.exited is not None
        carried = [state.hidden]
        if next_app is not None and self.carries_cycle_input(next_app, exits):
            carried.append(state.cycle_input)
        if exits:
            zero_sum = (state.zero_sum if state.zero_sum is not None
                        else torch.zeros_like(state.exited, dtype=torch.float32))
            carried.append(torch.stack([state.exited.float(), state.cycles_used.float(),
                                        zero_sum.float()], dim=-1))
        return (*carried, *state.exit_states)

    def unpack(self, app: Application, tensors: Sequence[torch.Tensor],
               exit_rule: Optional[ExitRule] = None) -> CycleState:
        tensors = list(tensors)
        exits = exit_rule is not None
        state = CycleState(hidden=tensors.pop(0), num_cycles=self.num_cycles)
        if self.carries_cycle_input(app, exits):
            state.cycle_input = tensors.pop(0)
        if exits:
            record = tensors.pop(0)
            state.exited = record[..., 0] > 0.5
            state.cycles_used = record[..., 1].round().long()
            # a cycle's first application starts a new sum
            state.zero_sum = None if app.starts_cycle else record[..., 2]
        else:
            state.cycles_used = torch.full(state.hidden.shape[:-1], self.num_cycles,
                                           dtype=torch.long, device=state.hidden.device)
        state.exit_states = tensors
        return state

    # ------------------------------------------------------------------ the loop
    def begin(self, hidden: torch.Tensor, exit_rule: Optional[ExitRule] = None,
              num_cycles: Optional[int] = None) -> CycleState:
        """The state before the first application. ``num_cycles``: the depth of this pass
        (the plan handed to :meth:`run` must be ``application_plan(config, num_cycles)``)."""
        tokens = hidden.shape[:-1]
        depth = self.num_cycles if num_cycles is None else num_cycles
        state = CycleState(hidden=hidden, num_cycles=depth, cycles_used=torch.full(
            tokens, depth, dtype=torch.long, device=hidden.device))
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
        depth = self.num_cycles if state.num_cycles is None else state.num_cycles
        decides = (exit_rule is not None and cycling and app.cycle < depth - 1)
        reads_zero = decides and exit_rule.reads_zero_attention
        # the weighted exit losses belong to the trained depth
        keep_exit_states = keep_exit_states and depth == self.num_cycles
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
        hidden, zero = run(app, block, state, reads_zero or tally is not None)
        if active is not None:  # the tokens that left keep their state (restored below)
            hidden = active.scatter(state.hidden, hidden)
            if tally is not None and zero is not None:
                tally.add_zero_attention(app.label, active.values(zero))
            if zero is not None:
                zero = active.scatter(zero.new_zeros(state.exited.shape), zero)
        elif tally is not None and zero is not None:
            tally.add_zero_attention(app.label, zero)
        if reads_zero and zero is not None:
            state.zero_sum = zero.float() if state.zero_sum is None else state.zero_sum + zero.float()
        if app.after_cycles and state.exit_states:  # every kept exit goes through the tail too
            state.exit_states = [run(app, kept, state, False)[0] for kept in state.exit_states]
        state.hidden = hidden
        if not app.ends_cycle:
            return state

        if self.gates is not None:
            state.hidden, gate = self.gates[app.trained_cycle](state.cycle_input, state.hidden)
            if tally is not None:
                # the mean over the tokens that ran the cycle
                tally.add_gate(app.cycle + 1, gate if active is None else gate[~state.exited])
        if state.exited is not None and bool(state.exited.any()):
            state.hidden = torch.where(state.exited[..., None], state.cycle_input, state.hidden)
        if keep_exit_states and app.cycle in self.exit_cycles:
            state.exit_states = [*state.exit_states, state.hidden]
        if decides and (state.zero_sum is not None or not reads_zero):
            self._decide_exits(app.cycle, state, exit_rule)
        return state

    def _active_tokens(self, state: CycleState, exit_rule: Optional[ExitRule]
                       ) -> Optional[ActiveTokens]:
        """The cycle's tokens to compute, when some (not all) have left; None: all of them."""
        if (exit_rule is None or self.compute_exited or state.exited is None
                or not bool(state.exited.any()) or bool(state.exited.all())):
            return None
        return ActiveTokens(state.exited, exit_rule.token_axis)

    def zero_attention_mean(self, zero_sum: torch.Tensor) -> torch.Tensor:
        """Per token: the cycle's zero attention averaged over its layers and all heads."""
        total = self.reduce_heads(zero_sum)
        return total / (self.layers_per_cycle * self.num_heads)

    def exit_signal(self, cycle: int, state: CycleState, rule: ExitRule) -> torch.Tensor:
        """Per token, after cycle ``cycle`` (0-based) closed: what ``rule.signal`` reads.

        * ``zero_attention``: ``A`` = the cycle's zero attention averaged over its layers and
          all heads.
        * ``zero_attention_relative``: ``A (i + 1) / (1 - A)`` for the query at 0-based
          position i, which sees the zero key and i + 1 real keys: the zero key's weight over
          the average real key's weight ``(1 - A) / (i + 1)``. Under uniform attention (all
          scores equal) ``A = 1 / (i + 2)``, so the signal is 1 at every position, where the
          raw ``A`` falls as 1 / (i + 2).
        * ``hidden_change``: ``|x_c - x_(c-1)| / |x_(c-1)|``, the relative L2 change of the
          token's state over the cycle (after the gate).
        * ``random``: a seeded uniform draw in [0, 1) per (cycle, row, position).
        """
        name = rule.signal
        if name in ("zero_attention", "zero_attention_relative"):
            mean = self.zero_attention_mean(state.zero_sum)
            if name == "zero_attention":
                return mean
            real_keys = rule.positions.to(mean.device).float() + 1.0
            return mean * real_keys / (1.0 - mean).clamp(min=1e-6)
        if name == "hidden_change":
            before = state.cycle_input.float()
            change = torch.linalg.vector_norm(state.hidden.float() - before, dim=-1)
            return change / torch.linalg.vector_norm(before, dim=-1).clamp(min=1e-12)
        # random: rows run along the axis that is not the tokens'
        positions = rule.positions.to(state.exited.device)
        row_axis = 1 - rule.token_axis
        rows = torch.arange(positions.shape[row_axis], device=positions.device)
        rows = rows[:, None] if row_axis == 0 else rows[None, :]
        return uniform_draws(rule.seed, cycle, rows.expand_as(positions), positions)

    def _decide_exits(self, cycle: int, state: CycleState, rule: ExitRule) -> None:
        signal = self.exit_signal(cycle, state, rule)
        if rule.mode == "sequence":
            weights = rule.token_weights
            if weights is None:
                signal = signal.mean(dim=rule.token_axis, keepdim=True)
            else:
                weights = weights.to(signal.dtype)
                signal = ((signal * weights).sum(dim=rule.token_axis, keepdim=True)
                          / weights.sum(dim=rule.token_axis, keepdim=True).clamp(min=1.0))
            signal = signal.expand_as(state.exited)
        reached = signal < rule.threshold if rule.kind.exits_below else signal >= rule.threshold
        leaving = reached & ~state.exited
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
