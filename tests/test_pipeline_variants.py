"""Every model variant under TP=2, PP=2, PP=2 x TP=2 and PP=2 x DP=2 against one process: the
same initial weights at the same seed, the same loss and the same gathered gradients for one
global batch.

All layouts build their engine through ``training.engines.build_engine`` at the same seed;
gradients are read just before the optimizer would step (clipping off, ZeRO stage 0, so that
each parameter's ``.grad`` is the reduced gradient of the whole global batch).
"""

import pytest
import torch

from distributed import run_distributed
from train_helpers import micro_config

BASE = ["model.num_layers=4", "model.num_cycles=3", "train.clip_grad=0.0",
        "parallel.zero_stage=0", "train.nonfinite_loss=stop", "train.micro_batch_size=2",
        "train.global_batch_size=4"]
NO_EXITS = "model.exit_loss_weights=[0.0,0.0,1.0]"
EXITS = "model.exit_loss_weights=[0.3,0.3,1.0]"
VARIANTS = {
    "vanilla": ["model.cycle_mode=vanilla", "model.num_cycles=1", "model.zero_token=false",
                "model.gate=false", "model.exit_loss_weights=null"],
    "basic": ["model.cycle_mode=basic", "model.num_cycles=2", "model.zero_token=false",
              "model.gate=false", "model.exit_loss_weights=null"],
    "head_tail": ["model.zero_token=false", "model.gate=false", NO_EXITS],
    "head_tail_exit": ["model.zero_token=false", "model.gate=false", EXITS],
    "ztt": [NO_EXITS],
    "ztt_exit": [EXITS],
    "zero_token_no_gate": ["model.gate=false", EXITS],
    "gate_no_zero_token": ["model.zero_token=false", NO_EXITS],
}


def _global_batch(config):
    g = torch.Generator().manual_seed(7)
    micro = config.train.micro_batch_size
    count = config.train.global_batch_size // micro
    ids = torch.randint(0, config.model.vocab_size, (count, micro, config.model.seq_length + 1),
                        generator=g)
    mask = torch.ones(count, micro, config.model.seq_length)
    mask[:, :, :3] = 0  # the loss mask must travel too
    return [{"tokens": ids[i, :, :-1].contiguous(), "labels": ids[i, :, 1:].contiguous(),
             "loss_mask": mask[i]} for i in range(count)]


def _capture_gradients(engine):
    """Wrap the optimizer's step: keep this rank's reduced gradients, canonical names."""
    captured = {}
    optimizer = engine._ds.optimizer
    step = optimizer.step
    names = engine.canonical_names()

    def capturing_step(*args, **kwargs):
        for name, param in engine.module.named_parameters():
            if param.grad is not None:
                captured[names[name]] = param.grad.detach().clone()
        return step(*args, **kwargs)

    optimizer.step = capturing_step
    return captured


def _run_variants(rank, data, root, layout):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ztt.training.engines import build_engine

    out = {}
    for name, overrides in VARIANTS.items():
        config = micro_config(data, f"{root}/{name}", *BASE, *overrides, *layout)
        engine = build_engine(config)
        initial = engine.full_state_dict()
        captured = _capture_gradients(engine)
        engine.train()
        # each data-parallel rank takes its share of the global batch's micro batches
        dp = parallel_state.get_data_parallel_world_size()
        share = _global_batch(config)[parallel_state.get_data_parallel_rank()::dp]
        result = engine.train_step(iter(share), 1, collect_stats=False)
        loss = result.losses.get("lm loss")
        mean = torch.tensor([loss or 0.0], dtype=torch.float64)
        dist.all_reduce(mean, group=parallel_state.get_data_parallel_group())
        out[name] = {"initial": initial, "loss": None if loss is None else mean.item() / dp,
                     "grads": engine.gather_to_full(captured)}
    return out


@pytest.fixture(scope="module")
def layouts(sample_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("variants"))
    runs = {
        "pp1": run_distributed(_run_variants, world_size=1, args=(sample_data, root, [])),
        "tp2": run_distributed(_run_variants, world_size=2, tensor_parallel=2,
                               args=(sample_data, root, ["parallel.tensor=2"])),
        "pp2": run_distributed(_run_variants, world_size=2, pipeline_parallel=2,
                               args=(sample_data, root, ["parallel.pipeline=2"])),
        "pp2_tp2": run_distributed(_run_variants, world_size=4, pipeline_parallel=2,
                                   tensor_parallel=2,
                                   args=(sample_data, root, ["parallel.pipeline=2",
                                                             "parallel.tensor=2"])),
        "pp2_dp2": run_distributed(_run_variants, world_size=4, pipeline_parallel=2,
                                   args=(sample_data, root, ["parallel.pipeline=2"])),
    }
    return runs


def _assert_state_equal(got, expected, what, atol=0.0):
    assert sorted(got) == sorted(expected), what
    for name, tensor in expected.items():
        if atol:
            assert torch.allclose(got[name], tensor, atol=atol, rtol=1e-4), (
                what, name, (got[name] - tensor).abs().max().item())
        else:
            assert torch.equal(got[name], tensor), (what, name)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_tp2", "pp2_dp2"])
def test_every_variant_matches_one_process(layouts, layout):
    reference = layouts["pp1"][0]
    last_stage = layouts[layout][-1]
    for name, expected in reference.items():
        got = last_stage[name]
        _assert_state_equal(got["initial"], expected["initial"], f"{layout} {name} initial")
        assert abs(got["loss"] - expected["loss"]) < 1e-5, (layout, name, got["loss"],
                                                            expected["loss"])
        _assert_state_equal(got["grads"], expected["grads"], f"{layout} {name} grads", atol=1e-6)
        assert any(g.abs().sum() > 0 for g in got["grads"].values())
