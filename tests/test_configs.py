"""Every shipped config loads, validates and describes a model that can be built."""

from pathlib import Path

import pytest

from megatron_ztt.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    config = load_config(str(path), ["data.blend=[corpus]", "data.tokenizer=tok.model"])
    model = config.model
    model.check_parallel_layout(config.parallel.tensor, config.parallel.pipeline)
    world = config.parallel.tensor * config.parallel.pipeline * 2
    assert config.gradient_accumulation_steps(world) >= 1
    assert model.num_applications == (2 + model.num_cycles * (model.num_layers - 2)
                                      if model.cycle_mode == "head_tail" else
                                      model.num_cycles * model.num_layers)


def test_config_overrides_and_errors():
    from megatron_ztt.model.config import ConfigError

    config = load_config(str(CONFIGS[0]), ["data.blend=[0.7,a,0.3,b]", "data.tokenizer=t",
                                           "train.lr=1e-3", "model.num_cycles=4",
                                           "model.exit_loss_weights=null"])
    assert config.train.lr == 1e-3 and config.model.num_cycles == 4
    assert config.data.blend == [0.7, "a", 0.3, "b"]
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(str(CONFIGS[0]), ["data.blend=[a]", "data.tokenizer=t",
                                      "train.global_batch_size=7"]).gradient_accumulation_steps(2)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no/such.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(str(CONFIGS[0]), ["train.lr"])


def test_circular_pipeline_refuses_zero_2_and_3_naming_both_settings():
    from megatron_ztt.model.config import ConfigError

    for stage in (2, 3):
        with pytest.raises(ConfigError) as error:
            load_config(str(CONFIGS[0]), ["data.blend=[a]", "data.tokenizer=t",
                                          "parallel.pipeline=2", f"parallel.zero_stage={stage}"])
        assert "parallel.zero_stage" in str(error.value)
        assert "parallel.pipeline=2" in str(error.value)
