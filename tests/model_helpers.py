"""Small configs and comparison helpers shared by the model tests."""

import torch

from megatron_ztt.model.config import ZTTConfig


def tiny_config(**overrides) -> ZTTConfig:
    base = dict(vocab_size=200, hidden_size=64, num_layers=4, num_attention_heads=4,
                num_query_groups=2, seq_length=16, num_cycles=3, cycle_mode="head_tail",
                zero_token=True, gate=True, make_vocab_size_divisible_by=8)
    base.update(overrides)
    return ZTTConfig(**base)


def batch(config: ZTTConfig, size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (size, config.seq_length + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def assert_close(a, b, atol=1e-5, rtol=1e-4, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs diff {diff}"
