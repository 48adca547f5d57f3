"""Intermediate exit losses on a random subset of positions (``model.exit_loss_fraction``).

Each weighted exit before the last runs the tail layer and the output layer once more; at the
results size that is a third of the step (docs/RESULTS.md, "Exit losses"). With a fraction
f < 1 a step draws k = round(f * s) positions per row (>= 1), the same ones for every exit of
the step and every micro batch, and those exits run the tail (its queries, MLP and output; the
keys/values of every position, which the chosen queries read) and the output layer on them
only. The final loss stays on every position.

Unbiased: every position is chosen with probability k / s, and the chosen token losses are
scaled by s / k, so the expected exit loss is the full one, whatever its denominator (this
micro batch's counted tokens, or the per-token loss over the global batch the engines pass).

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
        rows = torch.arange(batch, device=device)[:, None].expand(batch, length)
        positions = torch.arange(length, device=device)[None, :].expand(batch, length)
        draws = uniform_draws(seed, 0, rows, positions)  # [b, s]
        chosen = torch.argsort(draws, dim=1)[:, :self.count].sort(dim=1).values
        self.block = ActiveTokens.of_positions(chosen, length, token_axis=0)

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

    def loss(self, loss_of, block: torch.Tensor, labels: torch.Tensor,
             loss_mask: Optional[torch.Tensor], denominator: Optional[torch.Tensor]):
        """The exit loss of hidden states ``block`` [k, b, d] (already at the chosen positions):
        ``loss_of(block, labels, loss_mask, denominator)`` on the chosen labels, scaled by
        s / k so that it estimates the loss over every position without bias."""
        if denominator is None:  # this micro batch's mean, as loss_of would take it
            denominator = counted_tokens(labels, loss_mask)
        labels_block = torch.gather(labels, 1, self.positions)
        mask_block = None if loss_mask is None else torch.gather(loss_mask, 1, self.positions)
        return loss_of(block, labels_block, mask_block, denominator * (self.count / self.length))
