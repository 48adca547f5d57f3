"""Bad model configurations fail at construction with a message naming the setting."""

import pytest

from megatron_ztt.model.config import ConfigError, ZTTConfig


@pytest.mark.parametrize("overrides,setting", [
    (dict(cycle_mode="head_tail", num_layers=2), "model.num_layers"),
    (dict(num_cycles=0), "model.num_cycles"),
    (dict(cycle_mode="vanilla", num_cycles=3, gate=False), "model.num_cycles"),
    (dict(cycle_mode="vanilla", num_cycles=1, gate=True), "model.gate"),
    (dict(cycle_mode="loop"), "model.cycle_mode"),
    (dict(hidden_size=60, num_attention_heads=8), "model.num_attention_heads"),
    (dict(num_attention_heads=8, num_query_groups=3), "model.num_query_groups"),
    (dict(exit_loss_weights=[1.0]), "model.exit_loss_weights"),
    (dict(exit_loss_weights=[0.0, 0.0, 0.0]), "model.exit_loss_weights"),
    (dict(exit_threshold=0.5, zero_token=False), "model.exit_threshold"),
    (dict(activation="relu"), "model.activation"),
    (dict(normalization="BatchNorm"), "model.normalization"),
    (dict(vocab_size=0), "model.vocab_size"),
    (dict(hidden_dropout=1.5), "model.hidden_dropout"),
])
def test_bad_settings_are_named(overrides, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        ZTTConfig(**overrides)


@pytest.mark.parametrize("overrides,tp,pp,fragment", [
    (dict(num_attention_heads=6, hidden_size=96, num_query_groups=None), 4, 1, "num_attention_heads"),
    (dict(num_attention_heads=8, num_query_groups=2), 4, 1, "num_query_groups"),
    (dict(num_layers=3, num_cycles=1), 1, 4, "more pipeline stages than cycled layers"),
    (dict(num_layers=5), 1, 2, "do not split evenly over 2 stages"),
    (dict(num_layers=3, cycle_mode="basic", num_cycles=2), 1, 2, "do not split evenly"),
    (dict(num_layers=2, cycle_mode="vanilla", num_cycles=1, gate=False, zero_token=False), 1, 3,
     "more pipeline stages than cycled layers"),
    (dict(vocab_size=100, make_vocab_size_divisible_by=2), 8, 1, "padded vocabulary"),
])
def test_impossible_layouts_are_named(overrides, tp, pp, fragment):
    config = ZTTConfig(**overrides)
    with pytest.raises(ConfigError, match=fragment):
        config.check_parallel_layout(tp, pp)


def test_derived_sizes():
    config = ZTTConfig(hidden_size=96, num_attention_heads=6, num_layers=5, num_cycles=4,
                       vocab_size=1000, make_vocab_size_divisible_by=128)
    assert config.head_dim == 16
    assert config.ffn_size == 256  # 8/3 * 96 rounded up to a multiple of 64
    assert config.padded_vocab_size == 1024
    assert config.num_applications == 2 + 4 * 3
    assert config.exit_weights == [0.0, 0.0, 0.0, 1.0]
