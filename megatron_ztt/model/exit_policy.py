"""Early exit beside the cycle loop: the signal, the decision, the active set, the rule for the
key/values of tokens that left, and the statistics.

The loop (``cycle_engine.py``) asks this policy three things per cycle: which tokens run it
(:meth:`ExitPolicy.begin_cycle`, the cycle's one host sync: the size of the block to gather),
how a layer's key/values of this call are kept (:func:`keep_exited_kv`) and, at the cycle's
end, who leaves (:meth:`ExitPolicy.end_cycle`, on the device: no host sync).

This file imports nothing but torch: it ships inside every exported model directory.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

EXIT_MODES = ("token", "sequence")


@dataclass(frozen=True)
class ExitSignal:
    """What a token's exit decision after a cycle reads (see :meth:`ExitPolicy.signal`).

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
    ExitSignal("kl", False, True,
               "KL(p_c || p_(c-1)) between the next-token distributions read through the final "
               "norm and output layer from the token's state after the cycle and before it "
               "(Huginn's criterion, without the tail layer), for the tokens still cycling; "
               "exit when < threshold (nats)"),
    ExitSignal("trained", True, True,
               "the exit head's (model.exit_objective) predicted probability that the next "
               "cycle lowers the token's loss by more than the margin, read from the cycle's "
               "zero attention, the position and the state's change; exit when < threshold"),
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


EXIT_OBJECTIVES = ("none", "next_cycle_gain")
EXIT_HEAD_FEATURES = 4


def exit_head_features(zero_attention: torch.Tensor, positions: torch.Tensor,
                       before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per token after a cycle, what the exit head reads ([..., 4], float, no gradient): log A,
    log (1 - A) (A: the cycle's zero attention, mean over its layers and heads; so log of the
    relative zero attention A (i+1) / (1-A) is a linear combination), log (i + 1) (i: the
    0-based position) and log of the state's relative change over the cycle."""
    a = zero_attention.detach().float().clamp(1e-6, 1 - 1e-6)
    before, after = before.detach().float(), after.detach().float()
    change = (torch.linalg.vector_norm(after - before, dim=-1)
              / torch.linalg.vector_norm(before, dim=-1).clamp(min=1e-12))
    return torch.stack([a.log(), (1 - a).log(), (positions.to(a.device).float() + 1).log(),
                        change.clamp(min=1e-12).log()], dim=-1)


class ExitHead(torch.nn.Module):
    """``model.exit_objective``'s exit head: logit of p(the next cycle lowers the token's loss
    by more than the margin) = w_c . f + b_c, f = :func:`exit_head_features`, one (w_c, b_c)
    per cycle before the last (the depth dial's extra cycles reuse the last). Starts at
    p = 0.5 (zeros). Its inputs carry no gradient, so its training reaches only w and b."""

    def __init__(self, cycles: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(cycles, EXIT_HEAD_FEATURES))
        self.bias = torch.nn.Parameter(torch.zeros(cycles))

    def forward(self, cycle: int, features: torch.Tensor) -> torch.Tensor:
        cycle = min(cycle, self.weight.shape[0] - 1)
        return features @ self.weight[cycle].float() + self.bias[cycle].float()


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


@dataclass
class ExitRule:
    """When a token stops cycling (inference only).

    After cycle c < C the policy computes one ``signal`` per token (``EXIT_SIGNALS``; see
    :meth:`ExitPolicy.signal`) and the token leaves when the signal reaches the threshold:
    ``signal >= threshold``, or ``signal < threshold`` for the signals that exit below
    (``hidden_change``, ``random``). ``mode="token"`` decides per token (causal: every signal
    of token t reads only tokens <= t). ``mode="sequence"`` averages the signal over the
    tokens of the call first (``token_axis``; ``token_weights`` leave out padding) and stops
    whole rows; it looks at every token of the call, so it is causal only when a call holds
    one new token per row (decoding).

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
        if self.signal in ("zero_attention_relative", "random", "trained") and self.positions is None:
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


def next_token_kl(readout: Optional[Callable[[torch.Tensor], torch.Tensor]],
                  before: torch.Tensor, after: torch.Tensor, exited: torch.Tensor) -> torch.Tensor:
    """Per token, ``KL(p_after || p_before)`` in nats, ``p = softmax(readout(state))``; only the
    tokens still cycling (``~exited``) are read out (the others get 0). The readout is
    per token (no tail layer: that would read the other tokens' states of this cycle), so
    the signal is causal. Gathering the cycling tokens reads their count on the host."""
    if readout is None:
        raise ValueError("exit_signal=kl needs the model's output layer (its readout), which "
                         "this model part does not hold")
    cycling = ~exited
    log_after = torch.log_softmax(readout(after[cycling]).float(), dim=-1)
    log_before = torch.log_softmax(readout(before[cycling]).float(), dim=-1)
    kl = (log_after.exp() * (log_after - log_before)).sum(dim=-1)
    return torch.zeros(exited.shape, dtype=kl.dtype, device=kl.device).masked_scatter(cycling, kl)


# --------------------------------------------------------------------------- the active set
_WIDTH_BITS = 24  # up to 16M tokens per row


def read_block_size(rows: torch.Tensor, width: torch.Tensor, everyone: torch.Tensor):
    """(rows, width, everyone) of a block, read on the host with one device-to-host copy of
    one integer (the cycle's only host sync; a tuple of three would be three)."""
    packed = (rows.long() << (_WIDTH_BITS + 1)) | (width.long() << 1) | everyone.long()
    value = int(packed.item())
    return value >> (_WIDTH_BITS + 1), (value >> 1) & ((1 << _WIDTH_BITS) - 1), bool(value & 1)


class ActiveTokens:
    """The tokens still cycling, gathered row by row into a padded block [r, n] (row-major
    terms), so that a cycle computes them only.

    ``rows`` [r]: the rows with a token still cycling; ``positions`` [r, n]: the token of each
    slot (a row's cycling tokens first, in order, then its other tokens as padding, so every
    slot is a distinct token); ``valid`` [r, n]: the slots that hold a cycling token. Padding
    slots compute throwaway but finite values and :meth:`scatter` writes their old values
    back, so no slot needs a host-side count. Forming the set reads two numbers on the host
    (rows and width of the block): the cycle's only host sync.

    Built once per cycle and kept for all of its layers (and rebuilt from the travelling exit
    record on each pipeline rank); whatever a caller derives from it (rotary angles, masks)
    can be kept in ``memo``.
    """

    def __init__(self, exited: torch.Tensor, token_axis: int):
        self.seq_axis, self.batch_axis = token_axis, 1 - token_axis
        active = ~exited.movedim(token_axis, 1)  # [rows, tokens]
        counts = active.sum(dim=1)
        running = counts > 0
        num_rows, width, everyone = read_block_size(running.sum(), counts.max(),
                                                    counts.sum() == active.numel())
        self.shape = tuple(active.shape)
        self.empty = num_rows == 0
        self.everyone = everyone
        self.every_row = num_rows == self.shape[0]
        self._memo: Dict[str, object] = {}
        if everyone:  # nobody has left: the policy runs every token, no block to index
            self.rows = self.positions = self.valid = None
            return
        self.rows = torch.argsort((~running).to(torch.uint8), stable=True)[:num_rows]
        active = active[self.rows]
        order = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)
        self.positions = order[:, :width]
        self.valid = torch.arange(width, device=exited.device)[None] < counts[self.rows][:, None]

    @classmethod
    def of_positions(cls, positions: torch.Tensor, length: int, token_axis: int) -> "ActiveTokens":
        """A block of every row's ``positions`` [rows, n] (distinct, increasing), built without
        a host read: the exit losses' chosen positions (``model/exit_losses.py``)."""
        block = cls.__new__(cls)
        block.seq_axis, block.batch_axis = token_axis, 1 - token_axis
        block.shape = (positions.shape[0], length)
        block.empty, block.everyone, block.every_row = False, False, True
        block.rows = torch.arange(positions.shape[0], device=positions.device)
        block.positions = positions
        block.valid = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
        block._memo = {}
        return block

    def memo(self, name: str, make: Callable[[], object]):
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    def _index(self):
        return self.rows[:, None], self.positions

    def _axes(self, batch_axis, seq_axis):
        return (self.batch_axis, self.seq_axis) if batch_axis is None else (batch_axis, seq_axis)

    def gather(self, full: torch.Tensor, batch_axis: Optional[int] = None,
               seq_axis: Optional[int] = None) -> torch.Tensor:
        """The block of ``full`` (rows/tokens on the given axes, default: the state's)."""
        b, s = self._axes(batch_axis, seq_axis)
        return full.movedim((b, s), (0, 1))[self._index()].movedim((0, 1), (b, s))

    def scatter(self, full: torch.Tensor, block: torch.Tensor, batch_axis: Optional[int] = None,
                seq_axis: Optional[int] = None, in_place: bool = False) -> torch.Tensor:
        """``full`` whose cycling tokens take their values from ``block`` (a new tensor, or
        ``full`` itself written in place)."""
        b, s = self._axes(batch_axis, seq_axis)
        target = full.movedim((b, s), (0, 1))
        block = block.movedim((b, s), (0, 1))
        valid = self.valid.view(*self.valid.shape, *([1] * (block.dim() - 2)))
        block = torch.where(valid, block, target[self._index()])  # padding writes back itself
        if in_place:
            target.index_put_(self._index(), block)
            return full
        return target.index_put(self._index(), block).movedim((0, 1), (b, s))

    def total(self, block: torch.Tensor):
        """(sum over the block's cycling tokens, their count), on the device."""
        valid = self.valid.movedim((0, 1), (self.batch_axis, self.seq_axis))
        return torch.where(valid, block, 0).sum(), valid.sum()


def keep_exited_kv(store: Dict[int, tuple], layer: int, key: torch.Tensor, value: torch.Tensor,
                   active: Optional[ActiveTokens] = None, exited: Optional[torch.Tensor] = None):
    """The exited-token rule for key/values: a token that left keeps serving later tokens with
    its last computed cycle's key/values of this layer.

    ``key``/``value`` [b, groups, s, d] are this application's, or with ``active`` its block's
    [r, groups, n, d], written into the layer's stored ones (in place when no gradient is
    recorded: no copy of the whole store per application). ``exited`` [b, s] (compute
    everything: the reference) keeps the stored entries of the tokens that left.
    Returns every token's key/values, [b, groups, s, d], and stores them.
    """
    if active is not None:
        last_key, last_value = store[layer]
        in_place = not torch.is_grad_enabled()
        key = active.scatter(last_key, key, 0, 2, in_place=in_place)
        value = active.scatter(last_value, value, 0, 2, in_place=in_place)
    elif exited is not None and layer in store:
        last_key, last_value = store[layer]
        left = exited[:, None, :, None]
        key, value = torch.where(left, last_key, key), torch.where(left, last_value, value)
    store[layer] = (key, value)
    return key, value


# --------------------------------------------------------------------------- statistics
class ZeroAttentionTally:
    """Mean zero attention per application and mean gate per cycle, over micro batches.

    Sums (and counts) stay on the device; ``zero_attention(reduce)`` reduces them over the
    ranks that split the heads (one collective for all entries) and divides by tokens x heads.
    """

    def __init__(self, num_heads: int):
        self.num_heads = num_heads
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.tokens: Dict[str, torch.Tensor] = {}
        self.gates: Dict[int, List[torch.Tensor]] = {}

    def add_zero_attention(self, name: str, per_token: torch.Tensor,
                           active: Optional[ActiveTokens] = None) -> None:
        """``per_token``: zero attention summed over this rank's heads, one value per token
        (with ``active``: the block's, padding left out)."""
        per_token = per_token.detach().float()
        total, count = (per_token.sum(), per_token.numel()) if active is None else active.total(per_token)
        self.sums[name] = self.sums.get(name, 0) + total
        self.tokens[name] = self.tokens.get(name, 0) + count

    def add_gate(self, cycle: int, gate: torch.Tensor, active: Optional[ActiveTokens] = None) -> None:
        gate = gate.detach().float().squeeze(-1)
        if active is None:
            self.gates.setdefault(cycle, []).append(gate.mean())
        else:  # the mean over the tokens that ran the cycle
            total, count = active.total(gate)
            self.gates.setdefault(cycle, []).append(total / count)

    def zero_attention(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not self.sums:
            return {}
        names = list(self.sums)
        totals = reduce(torch.stack([torch.as_tensor(self.sums[n]) for n in names]))
        return {n: totals[i] / (self.tokens[n] * self.num_heads) for i, n in enumerate(names)}

    def gate_means(self) -> Dict[int, torch.Tensor]:
        return {c: torch.stack(v).mean() for c, v in sorted(self.gates.items())}


# --------------------------------------------------------------------------- the policy
class ExitPolicy:
    """Who runs a cycle and who leaves after it, for one :class:`ExitRule` (None: nobody
    leaves). ``state`` is the loop's ``CycleState`` (token-shaped tensors full size here).

    ``compute_exited``: compute the tokens that left too and overwrite them afterwards (slower,
    same results; the tests' reference).
    """

    def __init__(self, rule: Optional[ExitRule], *,
                 zero_attention_mean: Callable[[torch.Tensor], torch.Tensor],
                 compute_exited: bool = False,
                 readout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 exit_head: Optional[ExitHead] = None):
        self.rule = rule
        self.zero_attention_mean = zero_attention_mean  # the loop's: layers and heads it spans
        self.compute_exited = compute_exited
        # states [n, d] -> next-token logits [n, vocab] (final norm + output layer): ``kl``'s
        self.readout = readout
        self.exit_head = exit_head  # exit_signal=trained's
        # training with model.exit_objective: record every cycle's zero attention and hand
        # ``observe(cycle, state)`` the state after each cycle but the last
        self.record_zero_attention = False
        self.observe: Optional[Callable] = None

    def begin(self, tokens, device) -> Optional[torch.Tensor]:
        """``exited`` before the first cycle (None without a rule)."""
        return None if self.rule is None else torch.zeros(tokens, dtype=torch.bool, device=device)

    def begin_cycle(self, cycle: int, exited: Optional[torch.Tensor]) -> Optional[ActiveTokens]:
        """Cycle ``cycle``'s active set, or None: every token runs it (no rule, the first
        cycle, nobody left yet, or the reference)."""
        if exited is None or cycle == 0 or self.compute_exited:
            return None
        active = ActiveTokens(exited, self.rule.token_axis)
        return None if active.everyone else active

    def reads_zero_attention(self, cycle: int, depth: int) -> bool:
        reads = self.rule is not None and self.rule.reads_zero_attention
        return (reads or self.record_zero_attention) and cycle < depth - 1

    def end_cycle(self, cycle: int, depth: int, state, signal: Callable) -> None:
        """After cycle ``cycle`` (0-based) closed: the tokens that reached the threshold
        leave (``state.exited``, ``state.cycles_used``), on the device."""
        if self.observe is not None and cycle < depth - 1:
            self.observe(cycle, state)
        if self.rule is None or cycle >= depth - 1:
            return
        if self.rule.reads_zero_attention and state.zero_sum is None:
            return  # every token had left: nobody ran the cycle
        rule = self.rule
        value = signal(cycle, state, rule)
        if rule.mode == "sequence":
            weights = rule.token_weights
            if weights is None:
                value = value.mean(dim=rule.token_axis, keepdim=True)
            else:
                weights = weights.to(value.dtype)
                value = ((value * weights).sum(dim=rule.token_axis, keepdim=True)
                         / weights.sum(dim=rule.token_axis, keepdim=True).clamp(min=1.0))
            value = value.expand_as(state.exited)
        reached = value < rule.threshold if rule.kind.exits_below else value >= rule.threshold
        leaving = reached & ~state.exited
        state.cycles_used = torch.where(leaving, cycle + 1, state.cycles_used)
        state.exited = state.exited | leaving

    def signal(self, cycle: int, state, rule: ExitRule) -> torch.Tensor:
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
        * ``kl``: ``KL(p_c || p_(c-1))``, ``p`` the next-token distribution the final norm
          and output layer read from the token's state after the cycle and before it
          (:func:`next_token_kl`).
        * ``trained``: the exit head's probability that the next cycle lowers the token's
          loss by more than ``model.exit_objective_margin`` (:class:`ExitHead`).
        * ``random``: a seeded uniform draw in [0, 1) per (cycle, row, position).
        """
        name = rule.signal
        if name == "trained":
            if self.exit_head is None:
                raise ValueError("exit_signal=trained needs a model trained with "
                                 "model.exit_objective (it has no exit head)")
            features = exit_head_features(self.zero_attention_mean(state.zero_sum),
                                          rule.positions, state.cycle_input, state.hidden)
            return torch.sigmoid(self.exit_head(cycle, features))
        if name == "kl":
            return next_token_kl(self.readout, state.cycle_input, state.hidden, state.exited)
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
