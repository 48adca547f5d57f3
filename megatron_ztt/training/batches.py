"""The data a run reads: tokenizer and datasets from the run config, and the batches of
this data-parallel rank for training (resumable) and validation (the same every time)."""

from __future__ import annotations

from typing import Dict

import torch

from megatron_ztt.config import RunConfig
from megatron_ztt.model.config import ConfigError
from megatron_ztt.parallel import runtime


def build_tokenizer_and_data(config: RunConfig):
    from megatron_ztt.data.datasets import build_datasets
    from megatron_ztt.data.tokenizer import SENTENCEPIECE, TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
    except TokenizerError as error:
        raise ConfigError(f"data.tokenizer: {error}") from None
    # The project's SentencePiece models define the vocabulary exactly; a pretrained model's
    # embedding may have more rows than its Hugging Face tokenizer has ids (padded), never fewer.
    exact = tokenizer.kind == SENTENCEPIECE
    if (tokenizer.vocab_size != config.model.vocab_size if exact
            else tokenizer.vocab_size > config.model.vocab_size):
        raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) does not match the "
                          f"tokenizer's vocabulary ({tokenizer.vocab_size} in "
                          f"{config.data.tokenizer}); set model.vocab_size="
                          f"{tokenizer.vocab_size}")
    train = config.train
    evaluations = train.train_iters // config.eval.interval + 1
    num_samples = (train.train_iters * train.global_batch_size,
                   evaluations * config.eval.iters * train.global_batch_size,
                   config.eval.iters * train.global_batch_size)
    datasets = build_datasets(config.data, tokenizer, config.model.seq_length, train.seed,
                              num_samples)
    return tokenizer, datasets


class TrainingBatches:
    """Micro batches for this data-parallel rank, from a given number of consumed samples."""

    def __init__(self, dataset, config: RunConfig, consumed_samples: int):
        from megatron.core import parallel_state

        from megatron_ztt.data.loader import build_loader

        self.loader = build_loader(dataset, config.train.micro_batch_size,
                                   parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(),
                                   consumed_samples, config.data.num_workers)
        self.iterator = iter(self.loader)
        self.device = runtime.current_device()

    def __next__(self) -> Dict[str, torch.Tensor]:
        batch = next(self.iterator)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def __iter__(self):
        return self


def validation_batches(dataset, config):
    """A fresh iterator over the validation split: every evaluation sees the same samples."""
    from megatron.core import parallel_state

    from megatron_ztt.data.loader import build_loader

    loader = build_loader(dataset, config.train.micro_batch_size,
                          parallel_state.get_data_parallel_rank(),
                          parallel_state.get_data_parallel_world_size(), 0,
                          config.data.num_workers, cyclic=True)
    device = runtime.current_device()
    return ({k: v.to(device) for k, v in batch.items()} for batch in loader)
