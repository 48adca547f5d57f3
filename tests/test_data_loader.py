"""The resumable data-parallel sampler and the DataLoader built on it."""

import numpy as np
import pytest
import torch

from megatron_ztt.data.loader import ResumableBatchSampler, build_loader, collate_samples


class NumberedSamples(torch.utils.data.Dataset):
    """Sample i carries i in its tokens, so batches reveal which samples they hold."""

    def __init__(self, size, seq=8):
        self.size, self.seq = size, seq

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        tokens = np.full(self.seq, index, dtype=np.int32)
        return {"tokens": tokens, "labels": tokens + 1, "loss_mask": np.ones(self.seq, np.float32),
                "dataset_id": np.int16(index % 2)}


def _sample_ids(batch):
    return batch["tokens"][:, 0].tolist()


def _optimizer_steps(dataset, mbs, dp_size, accumulation, steps, consumed=0):
    """Samples each optimizer step sees, over all data-parallel ranks together."""
    iterators = [iter(build_loader(dataset, mbs, rank, dp_size, consumed, num_workers=0))
                 for rank in range(dp_size)]
    seen = []
    for _ in range(steps):
        step = []
        for _ in range(accumulation):
            for iterator in iterators:
                step += _sample_ids(next(iterator))
        seen.append(sorted(step))
    return seen


def test_same_global_batch_sees_the_same_samples_for_any_dp_size():
    dataset = NumberedSamples(200)
    global_batch = 8
    dp1 = _optimizer_steps(dataset, mbs=2, dp_size=1, accumulation=4, steps=5)
    dp2 = _optimizer_steps(dataset, mbs=2, dp_size=2, accumulation=2, steps=5)
    dp4 = _optimizer_steps(dataset, mbs=1, dp_size=4, accumulation=2, steps=5)
    assert dp1 == dp2 == dp4
    assert dp1[0] == list(range(global_batch)) and dp1[4] == list(range(32, 40))


def test_each_rank_takes_its_contiguous_slice_of_a_micro_step():
    rank_batches = [list(ResumableBatchSampler(20, 0, 3, rank, 2)) for rank in range(2)]
    assert rank_batches[0][:2] == [[0, 1, 2], [6, 7, 8]]
    assert rank_batches[1][:2] == [[3, 4, 5], [9, 10, 11]]
    assert len(rank_batches[0]) == len(rank_batches[1]) == 20 // 6  # incomplete step dropped


def test_resuming_from_consumed_samples_continues_exactly():
    dataset = NumberedSamples(100)
    full = [_sample_ids(b) for b in build_loader(dataset, 2, 1, 2, 0, num_workers=0)]
    consumed = 3 * 2 * 2  # three micro steps of 2 samples on 2 ranks
    resumed = [_sample_ids(b) for b in build_loader(dataset, 2, 1, 2, consumed, num_workers=0)]
    assert resumed == full[3:]
    assert len(build_loader(dataset, 2, 1, 2, consumed, num_workers=0)) == len(resumed)


def test_keeping_the_last_incomplete_step():
    sampler = [ResumableBatchSampler(11, 0, 2, rank, 2, drop_last=False) for rank in range(2)]
    batches = [list(s) for s in sampler]
    assert batches[0] == [[0, 1], [4, 5], [8, 9]]
    assert batches[1] == [[2, 3], [6, 7], [10]]
    assert [len(s) for s in sampler] == [3, 3]
    short = [list(ResumableBatchSampler(9, 0, 2, rank, 2, drop_last=False)) for rank in range(2)]
    assert short[0][-1] == [8] and short[1][-1] == [6, 7]


def test_cyclic_wraps_around_and_resumes():
    sampler = ResumableBatchSampler(5, 0, 2, 0, 1, cyclic=True)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(4)]
    assert first == [[0, 1], [2, 3], [4, 0], [1, 2]]
    resumed = iter(ResumableBatchSampler(5, 6, 2, 0, 1, cyclic=True))
    assert next(resumed) == [1, 2]
    with pytest.raises(TypeError):
        len(sampler)
    # a validation set smaller than one global batch still gives full batches
    loader = build_loader(NumberedSamples(3), 2, 1, 2, 0, num_workers=0, cyclic=True)
    assert _sample_ids(next(iter(loader))) == [2, 0]


def test_collate_gives_int64_tokens_and_float_loss_mask():
    batch = collate_samples([NumberedSamples(4)[i] for i in range(3)])
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (3, 8)
    assert batch["labels"].dtype == torch.int64
    assert batch["dataset_id"].dtype == torch.int64 and batch["dataset_id"].tolist() == [0, 1, 0]
    assert batch["loss_mask"].dtype == torch.float32


def test_worker_processes_do_not_change_the_batches():
    dataset = NumberedSamples(64)
    inline = [_sample_ids(b) for b in build_loader(dataset, 4, 0, 2, 8, num_workers=0)]
    workers = [_sample_ids(b) for b in build_loader(dataset, 4, 0, 2, 8, num_workers=2)]
    assert inline == workers and len(inline) == (64 - 8) // 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_samples=0), "no samples"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(dp_rank=2), "not in"),
    (dict(consumed_samples=101), "consumed_samples"),
])
def test_invalid_arguments_are_named(kwargs, message):
    arguments = dict(total_samples=100, consumed_samples=0, micro_batch_size=2, dp_rank=0,
                     dp_size=2)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ResumableBatchSampler(**arguments)
    with pytest.raises(ValueError, match="no dataset"):
        build_loader(None, 2, 0, 1, 0, 0)
