"""Intermediate exit losses on a random subset of positions (``model.exit_loss_fraction``).

Each weighted exit before the last runs the tail layer and the output layer once more; at the
results size that is a third of the step (docs/RESULTS.md, "Exit losses"). With a fraction
f < 1 a step draws k = round(f * s) positions per row (>= 1), one in each of k consecutive
strata of the row (sizes floor or ceil of s / k), the same ones for every exit of the step and
every micro batch, and those exits run the tail (its queries, MLP and output; the
keys/values of every position, which the chosen queries read) and the output layer on them
only. The final loss stays on every position.

Unbiased: a position of a stratum of n positions is chosen with probability 1 / n, and its
token loss is scaled by n (s / k where k divides s), so the expected exit loss is the full one,
whatever its denominator (this micro batch's counted tokens, or the per-token loss over the
global batch the engines pass). Stratified rather than k positions drawn anywhere in the row,
so that no stretch of the sequence is over- or under-sampled; at the results size this alone
changed the trained loss by no more than the seeds do (docs/RESULTS.md, "Where the loss of
fraction 0.25 comes from").

A control variate lowers the estimate's variance at no cost: the final loss is known at
every position, so each exit loss c is estimated as the final loss plus the subset's estimate
of the difference, L_C + est(L_c - L_C). In the objective that is the final loss with other
token weights (``ExitLossPositions.final_loss_weights``), which the final loss's own output
pass takes (``OutputHead.loss``'s ``objective_weights``). Still unbiased; where the exits'
token losses move with the final one (a trained ZTT's later cycles change little), most of
the subset's noise cancels: at the results size fraction 0.25 trained 0.063 nats behind
fraction 1.0 without it and 0.018 ahead with it after 200 steps, +0.0065 after 800 (within
the seeds' 0.032; docs/RESULTS.md, "Where the loss of fraction 0.25 comes from").

The positions come from an integer seed the training engines draw once per step from the
default torch generator (on every rank, so tensor and pipeline ranks agree and a resume, which
restores that generator, draws the same ones), hashed per (row, position) by
``exit_policy.uniform_draws``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ztt.model.exit_policy import ActiveTokens, uniform_draws
from megatron_ztt.model.layers import counted_tokens


def draw_exit_loss_seed() -> int:
    """The step's seed of the exit-loss positions, from the default torch generator."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item())


class ExitLossPositions:
    """The positions whose intermediate exit losses count, for hidden states [s, b, d]."""

    def __init__(self, seed: int, fraction: float, length: int, batch: int, device):
        self.count = max(1, min(length, round(fraction * length)))
        self.length = length
        bounds = torch.arange(self.count + 1, device=device) * length // self.count
        sizes = bounds[1:] - bounds[:-1]  # [k], each >= 1
        rows = torch.arange(batch, device=device)[:, None].expand(batch, self.count)
        strata = torch.arange(self.count, device=device)[None, :].expand(batch, self.count)
        draws = uniform_draws(seed, 0, rows, strata)  # [b, k]
        offsets = torch.minimum((draws * sizes).long(), sizes - 1)
        chosen = bounds[:-1] + offsets  # increasing: one position per stratum
        self.block = ActiveTokens.of_positions(chosen, length, token_axis=0)
        # a chosen token loss stands for its stratum's n positions [b, k]: n / (s / k) on top
        # of the s / k of the denominator (None: k divides s, every such weight is 1)
        self.stratum_sizes = sizes.float()[None, :].expand(batch, -1)
        self.weights = (None if length % self.count == 0
                        else self.stratum_sizes * (self.count / length))

    @property
    def positions(self) -> torch.Tensor:
        """[b, k]: the chosen positions of each row, increasing."""
        return self.block.positions

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, b, ...] -> [k, b, ...] at the chosen positions."""
        return self.block.gather(hidden)

    def scatter(self, hidden: torch.Tensor) -> torch.Tensor:
        """[k, b, d] -> [s, b, d], zeros elsewhere (a pipeline stage's fixed output shape)."""
        return self.block.scatter(hidden.new_zeros(self.length, *hidden.shape[1:]), hidden)

    def gather_mask(self, loss_mask: Optional[torch.Tensor], batch_first: bool = True):
        """The loss mask [b, s] (or [s, b] with ``batch_first=False``; None: every token) at the
        chosen positions, times the strata weights: the token weights of the exit losses."""
        if loss_mask is None and self.weights is None:
            return None
        weights = (torch.ones_like(self.positions, dtype=torch.float32) if self.weights is None
                   else self.weights)
        if loss_mask is not None:
            mask = loss_mask if batch_first else loss_mask.t()
            weights = torch.gather(mask.to(weights.dtype), 1, self.positions) * weights
        return weights if batch_first else weights.t()

    def final_loss_weights(self, loss_mask: Optional[torch.Tensor], exits_weight: float,
                           final_weight: float) -> torch.Tensor:
        """[b, s] token weights of the final loss in the objective, with the control variate:
        final_weight * L_C + exits_weight * (L_C - est(L_C)), est(L_C) the subset's estimate
        of the final loss (each chosen token stands for its stratum's positions)."""
        batch = self.positions.shape[0]
        base = (torch.ones(batch, self.length, device=self.positions.device)
                if loss_mask is None else loss_mask.to(torch.float32))
        chosen = torch.gather(base, 1, self.positions) * self.stratum_sizes * exits_weight
        return (base * (final_weight + exits_weight)).scatter_add(1, self.positions, -chosen)

    def loss(self, loss_of, block: torch.Tensor, labels: torch.Tensor,
             loss_mask: Optional[torch.Tensor], denominator: Optional[torch.Tensor]):
        """The exit loss of hidden states ``block`` [k, b, d] (already at the chosen positions):
        ``loss_of(block, labels, loss_mask, denominator)`` on the chosen labels, scaled by
        s / k so that it estimates the loss over every position without bias."""
        if denominator is None:  # this micro batch's mean, as loss_of would take it
            denominator = counted_tokens(labels, loss_mask)
        labels_block = torch.gather(labels, 1, self.positions)
        mask_block = self.gather_mask(loss_mask)
        return loss_of(block, labels_block, mask_block, denominator * (self.count / self.length))


def final_loss_and_term(loss_of, hidden: torch.Tensor, labels: torch.Tensor,
                        loss_mask: Optional[torch.Tensor], denominator: Optional[torch.Tensor],
                        chosen: Optional[ExitLossPositions], exit_loss_weights):
    """(the final LM loss, the term it adds to the objective) of the final hidden states
    [s, b, d] after the tail: w_C * L_C, or with exit losses on ``chosen``'s positions the
    control-variate term (``ExitLossPositions.final_loss_weights``), one output pass for
    both. The training model and the circular pipeline's last stage call this."""
    final_weight = float(exit_loss_weights[-1])
    if chosen is None:
        loss = loss_of(hidden, labels, loss_mask, denominator)
        return loss, final_weight * loss
    exits_weight = float(sum(exit_loss_weights[:-1]))
    term, loss = loss_of(hidden, labels, loss_mask, denominator,
                         objective_weights=chosen.final_loss_weights(loss_mask, exits_weight,
                                                                     final_weight))
    return loss, term
