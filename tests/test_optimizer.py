"""Learning-rate schedule and weight-decay groups."""

import math

import pytest

from megatron_ztt.config import load_config
from megatron_ztt.training.optimizer import deepspeed_config, lr_multiplier, parameter_groups


def _config(*overrides):
    return load_config(None, ["data.blend=[x]", "data.tokenizer=t", "train.lr=1e-3",
                              "train.min_lr=1e-4", *overrides])


def test_warmup_then_cosine_to_min_lr():
    factor = lr_multiplier(_config("train.warmup_iters=10", "train.train_iters=110"))
    assert factor(0) == pytest.approx(0.1)  # the first step already moves
    assert factor(4) == pytest.approx(0.5)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert factor(110) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)  # stays at min_lr after the decay
    values = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_decay_end_can_differ_from_run_length():
    factor = lr_multiplier(_config("train.warmup_iters=0", "train.train_iters=10",
                                   "train.lr_decay_iters=20"))
    assert factor(10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_no_weight_decay_on_norms_biases_gates_and_zero_keys(seeded):
    from megatron_ztt.model.ztt import ZTTModel
    from model_helpers import tiny_config

    model = ZTTModel(tiny_config())
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embedding.word_embeddings.weight" in decayed
    assert "layers.1.self_attention.linear_qkv.weight" in decayed
    assert {"layers.1.input_layernorm.weight", "gates.0.weight", "gates.0.bias",
            "zero_token_pool.keys.cycle1_layer2", "output_head.final_norm.weight"} <= kept
    assert decayed | kept == set(names.values()) and not decayed & kept


def test_deepspeed_config_batch_arithmetic():
    config = _config("train.micro_batch_size=2", "train.global_batch_size=16")
    ds = deepspeed_config(config, world_size=4)
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    # the circular pipeline's schedule accumulates the micro batches before DeepSpeed steps
    piped = deepspeed_config(_config("train.micro_batch_size=2", "train.global_batch_size=16",
                                     "parallel.pipeline=2"), world_size=4)
    assert piped["gradient_accumulation_steps"] == 1
    assert piped["train_micro_batch_size_per_gpu"] == 8 and piped["train_batch_size"] == 16
    assert piped["gradient_clipping"] == 1.0
    unzeroed = deepspeed_config(_config("parallel.pipeline=2", "parallel.zero_stage=0",
                                        "train.nonfinite_loss=stop"), world_size=2)
    assert unzeroed["gradient_clipping"] == 0.0  # the engine clips by the global norm itself
