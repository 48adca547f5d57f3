"""Checkpoints that reshard: a checkpoint saved in one parallel layout resumes in another (TP,
PP, DP, ZeRO stage) with the weights, Adam moments and step, LR schedule and data position;
the next losses follow an uninterrupted run."""

import math
import os

import pytest
import torch

from distributed import run_distributed
from train_helpers import micro_config

SAVED_AT, ITERS = 2, 4
TOLERANCE = 2e-3  # relative, on the next steps' losses
# a model the circular pipeline can split over two stages (two cycled layers)
MODEL = ["model.num_layers=4", "model.num_cycles=2"]


def _run(data, run_dir, *overrides):
    from megatron_ztt.training.train import train

    return train(micro_config(data, run_dir, *MODEL, f"train.train_iters={ITERS}",
                              f"train.lr_decay_iters={ITERS}", *overrides))


def _restored_moments(data, run_dir, source, *overrides):
    """Build the engine of the layout ``overrides`` give, load ``source`` into it and return
    its Adam moments merged to full tensors, with the saved ones (rank 0)."""
    from megatron_ztt.checkpoint import SliceReader, read_meta, resolve
    from megatron_ztt.parallel import runtime
    from megatron_ztt.training import checkpoint as ckpt
    from megatron_ztt.training.engines import build_engine
    from megatron_ztt.training.train import layout_of

    config = micro_config(data, run_dir, *MODEL, *overrides)
    runtime.init_distributed(runtime.ParallelLayout(config.parallel.tensor,
                                                    config.parallel.pipeline))
    engine = build_engine(config)
    root, tag = resolve(source)
    state, _ = ckpt.load(engine, root, tag, layout_of(config))
    local = engine.local_optimizer_state()
    # the fp32 master weights too, where the model trains in another precision (bf16)
    parts = engine.MOMENTS + (("fp32",) if local["fp32"] else ())
    restored = {key: engine.gather_to_full(local[key]) for key in parts}
    reader = SliceReader(os.path.join(root, tag), read_meta(os.path.join(root, tag)))
    saved = {key: {name: reader.full(name, key) for name in restored[key]} for key in parts}
    return {"restored": restored, "saved": saved, "step": local["step"],
            "saved_step": reader.step(), "lr": engine.learning_rate(),
            "iteration": state.iteration}


def _reshard_worker(rank, data, root, source_overrides, targets):
    out = {"reference": _run(data, f"{root}/reference", "checkpoint.interval=2",
                             *source_overrides).losses}
    source = f"{root}/reference/checkpoints/iter_{SAVED_AT:07d}"
    for name, overrides in targets.items():
        out[name] = _run(data, f"{root}/{name}", f"train.load={source}", *overrides).losses
        out[f"{name} moments"] = _restored_moments(data, f"{root}/{name}_m", source, *overrides)
    return out


def _check(out, targets):
    reference = out["reference"]
    for name in targets:
        losses = out[name]
        assert sorted(losses) == list(range(SAVED_AT + 1, ITERS + 1)), (name, losses)
        for it, loss in losses.items():
            assert math.isclose(loss, reference[it], rel_tol=TOLERANCE), (name, it, loss,
                                                                          reference[it])
        moments = out[f"{name} moments"]
        assert moments["iteration"] == SAVED_AT
        assert moments["step"] == moments["saved_step"] == SAVED_AT
        for key, tensors in moments["restored"].items():
            assert tensors.keys() == moments["saved"][key].keys() and tensors, key
            for tensor_name, tensor in tensors.items():
                assert torch.equal(tensor, moments["saved"][key][tensor_name]), (name, key,
                                                                                 tensor_name)


DP2_TARGETS = {"pp2": ["parallel.pipeline=2", "parallel.zero_stage=1"],
               "tp2": ["parallel.tensor=2", "parallel.zero_stage=1"],
               "dp2_zero2": ["parallel.zero_stage=2"]}


def _resume_worker(rank, data, root, source, reference_losses, targets):
    out = {"reference": reference_losses}
    for name, overrides in targets.items():
        out[name] = _run(data, f"{root}/{name}", f"train.load={source}", *overrides).losses
        out[f"{name} moments"] = _restored_moments(data, f"{root}/{name}_m", source, *overrides)
    return out


# bf16 weights with fp32 master weights: resumed as PP=2 (the circular pipeline's two stages,
# its own bf16 optimizer), where the masters and moments are split another way
BF16 = ["train.precision=bf16"]
BF16_TARGETS = {"pp2": ["parallel.pipeline=2", "parallel.zero_stage=1", *BF16]}


def _dp2_worker(rank, data, root):
    return {"fp32": _reshard_worker(rank, data, f"{root}/fp32", ["parallel.zero_stage=1"],
                                    DP2_TARGETS),
            "bf16": _reshard_worker(rank, data, f"{root}/bf16", ["parallel.zero_stage=1", *BF16],
                                    BF16_TARGETS)}


@pytest.fixture(scope="module")
def dp2_zero1_runs(sample_data, tmp_path_factory):
    """DP=2 ZeRO-1, uninterrupted, saving at iteration 2, in fp32 and in bf16; resumed there
    as PP=2, TP=2 and DP=2 ZeRO-2 (fp32) and as PP=2 (bf16), all in one spawn."""
    root = tmp_path_factory.mktemp("reshard_dp2")
    (out, _) = run_distributed(_dp2_worker, world_size=2, args=(sample_data, str(root)))
    return out, root


@pytest.mark.slow
def test_dp2_zero1_checkpoint_resumes_as_pp2_tp2_and_zero2(dp2_zero1_runs):
    _check(dp2_zero1_runs[0]["fp32"], DP2_TARGETS)


@pytest.mark.slow
def test_dp2_zero1_checkpoint_resumes_on_one_rank_with_zero3(sample_data, dp2_zero1_runs,
                                                             tmp_path):
    out, root = dp2_zero1_runs[0]["fp32"], dp2_zero1_runs[1] / "fp32"
    targets = {"dp1_zero3": ["parallel.zero_stage=3"]}
    source = f"{root}/reference/checkpoints/iter_{SAVED_AT:07d}"
    (resumed,) = run_distributed(_resume_worker, world_size=1,
                                 args=(sample_data, str(tmp_path), source, out["reference"],
                                       targets))
    _check(resumed, targets)


@pytest.mark.slow
def test_pp2_tp2_checkpoint_resumes_as_dp2(sample_data, tmp_path):
    source_layout = ["parallel.pipeline=2", "parallel.tensor=2", "parallel.zero_stage=1"]
    (reference, *_) = run_distributed(
        _reshard_worker, world_size=4,
        args=(sample_data, str(tmp_path / "pp2tp2"), source_layout, {}))
    targets = {"dp2": ["parallel.zero_stage=1"]}
    source = f"{tmp_path}/pp2tp2/reference/checkpoints/iter_{SAVED_AT:07d}"
    (resumed, _) = run_distributed(_resume_worker, world_size=2,
                                   args=(sample_data, str(tmp_path / "dp2"), source,
                                         reference["reference"], targets))
    _check(resumed, targets)


def _zero3_worker(rank, data, root):
    from megatron_ztt.checkpoint import load_trained
    from megatron_ztt.model.weight_layout import expected_canonical_shapes

    out = {"reference": _run(data, f"{root}/reference", "checkpoint.interval=2",
                             "parallel.zero_stage=3").losses}
    source = f"{root}/reference/checkpoints/iter_{SAVED_AT:07d}"
    out["listing"] = sorted(n for n in os.listdir(source) if n.endswith(".pt"))
    out["sizes"] = {n: os.path.getsize(os.path.join(source, n)) for n in out["listing"]}
    trained = load_trained(source)
    expected = expected_canonical_shapes(trained.model_config)
    out["merged_shapes_ok"] = {k: tuple(v.shape) for k, v in trained.state.items()} == expected
    targets = {"dp2_zero1": ["parallel.zero_stage=1"]}
    out.update(_resume_worker(rank, data, root, source, out["reference"], targets))
    return out


@pytest.mark.slow
def test_zero3_ranks_write_their_own_partitions_and_resume_as_zero1(sample_data, tmp_path):
    (out, _) = run_distributed(_zero3_worker, world_size=2, args=(sample_data, str(tmp_path)))
    assert out["listing"] == ["optim_stage00_tp00_dp000.pt", "optim_stage00_tp00_dp001.pt",
                              "rank_state_00000.pt", "rank_state_00001.pt",
                              "ztt_stage00_tp00_dp000.pt", "ztt_stage00_tp00_dp001.pt"]
    assert out["merged_shapes_ok"]  # eval, export and init_from read the partitions joined
    # each rank's save holds about its half of the weights and moments, not the whole
    for kind in ("ztt", "optim"):
        sizes = [out["sizes"][f"{kind}_stage00_tp00_dp00{d}.pt"] for d in (0, 1)]
        assert max(sizes) < 0.6 * sum(sizes), (kind, sizes)
    _check(out, {"dp2_zero1": None})


@pytest.mark.slow
def test_bf16_dp2_zero1_checkpoint_resumes_as_pp2_with_the_fp32_masters(dp2_zero1_runs):
    """bf16 with fp32 master weights, DP=2 ZeRO-1 -> PP=2: the masters and Adam moments come
    back exactly, the next losses follow the uninterrupted bf16 run."""
    out = dp2_zero1_runs[0]["bf16"]
    restored = out["pp2 moments"]["restored"]
    assert set(restored) == {"exp_avg", "exp_avg_sq", "fp32"}, set(restored)
    # the masters are not the bf16 weights (they carry the bits bf16 rounds off)
    assert any(not torch.equal(t, t.bfloat16().float()) for t in restored["fp32"].values())
    _check(out, BF16_TARGETS)
