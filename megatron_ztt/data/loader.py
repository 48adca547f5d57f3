"""Resumable, data-parallel batching in Megatron-LM's order.

The dataset's own index order is the global sample order (megatron-core already shuffled it
with the seed). Each micro step consumes the next ``micro_batch_size * dp_size`` samples and
data-parallel rank ``r`` takes the slice ``[r * mbs, (r + 1) * mbs)`` of them. Hence:

- an optimizer step sees the same samples for any data-parallel size with the same global
  batch (DP=2 x 2 micro steps covers the same 4*mbs samples as DP=1 x 4 micro steps);
- resuming needs one number, ``consumed_samples`` (samples consumed by all ranks together),
  and continues exactly where the interrupted run stopped.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from megatron_ztt.parallel import runtime


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's index list for every micro step, from ``consumed_samples`` on.

    ``cyclic``: wrap around the dataset forever (for validation loops that may need more
    batches than one pass gives); otherwise stop at the end of the dataset. Without
    ``drop_last`` the final, incomplete micro step gives each rank its part of the leftover
    samples, possibly fewer than ``micro_batch_size`` and none at all for the last ranks.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, drop_last: bool = True, cyclic: bool = False):
        if total_samples <= 0:
            raise ValueError(f"the dataset has no samples (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is not in [0, {dp_size})")
        if consumed_samples < 0 or (not cyclic and consumed_samples > total_samples):
            raise ValueError(f"consumed_samples={consumed_samples} is outside the dataset's "
                             f"{total_samples} samples")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last
        self.cyclic = cyclic

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.dp_size

    def _slice(self, step_start: int) -> range:
        begin = step_start + self.dp_rank * self.micro_batch_size
        return range(begin, begin + self.micro_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        step_start = self.consumed_samples
        if self.cyclic:
            while True:
                yield [index % self.total_samples for index in self._slice(step_start)]
                step_start += self.samples_per_step
        while step_start + self.samples_per_step <= self.total_samples:
            yield list(self._slice(step_start))
            step_start += self.samples_per_step
        if not self.drop_last:
            leftover = [i for i in self._slice(step_start) if i < self.total_samples]
            if leftover:
                yield leftover

    def __len__(self) -> int:
        if self.cyclic:
            raise TypeError("a cyclic sampler never ends and has no length")
        remaining = self.total_samples - self.consumed_samples
        full_steps = remaining // self.samples_per_step
        if self.drop_last:
            return full_steps
        leftover = remaining - full_steps * self.samples_per_step
        return full_steps + int(leftover > self.dp_rank * self.micro_batch_size)


def collate_samples(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts: integer fields to int64, ``loss_mask`` (a weight) to float32."""
    batch = {}
    for key in samples[0]:
        values = [torch.as_tensor(np.asarray(sample[key])) for sample in samples]
        stacked = torch.stack(values)
        if key == "loss_mask":
            batch[key] = stacked.to(torch.float32)
        elif stacked.is_floating_point():
            batch[key] = stacked
        else:
            batch[key] = stacked.to(torch.int64)
    return batch


def build_loader(dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int, num_workers: int, drop_last: bool = True,
                 cyclic: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` for data-parallel rank ``dp_rank`` of ``dp_size``."""
    if dataset is None:
        raise ValueError("no dataset to load (its split share is 0 or it was not built on "
                         "this rank)")
    sampler = ResumableBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank,
                                    dp_size, drop_last=drop_last, cyclic=cyclic)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=runtime.use_cuda(),
        persistent_workers=num_workers > 0,
    )
