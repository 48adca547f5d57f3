"""Training with DeepSpeed on real gloo processes: layouts agree, resume is exact, failures are
handled. Several runs share one spawn (same world size) to keep the suite fast."""

import glob
import math
import os

import pytest
import torch

from distributed import run_distributed
from train_helpers import micro_config

ITERS = 6


def _poison_loss_at(iteration, accumulation):
    """Make the first micro batch of ``iteration`` return a NaN loss, on every rank."""
    from megatron_ztt.model.ztt import ZTTModel

    original = ZTTModel.forward
    calls = {"train": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            if calls["train"] == (iteration - 1) * accumulation:
                out.lm_loss = out.lm_loss * float("nan")
                out.loss = out.loss * float("nan")
            calls["train"] += 1
        return out

    ZTTModel.forward = forward
    return lambda: setattr(ZTTModel, "forward", original)


def _final_weights(run_dir):
    from export_helpers import load_full_model_state

    return load_full_model_state(os.path.join(run_dir, "checkpoints"))[1]


def _reference_worker(rank, data, root):
    from megatron_ztt.training.train import train

    results = {}
    for zero in (1, 2):
        run = train(micro_config(data, f"{root}/ref_zero{zero}", f"train.train_iters={ITERS}",
                                 f"parallel.zero_stage={zero}"))
        results[f"zero{zero}"] = {"losses": run.losses, "state_bytes": run.optimizer_state_bytes}
    return results


def _parallel_worker(rank, data, root):
    from megatron_ztt.training import checkpoint as ckpt
    from megatron_ztt.training.train import NonFiniteLossError, train

    out = {}

    def run(name, *overrides):
        result = train(micro_config(data, f"{root}/{name}", *overrides))
        out[name] = {"losses": result.losses, "state_bytes": result.optimizer_state_bytes,
                     "skipped": result.skipped_steps, "state": result.state}
        return result

    iters = f"train.train_iters={ITERS}"
    run("dp2_zero1", iters, "parallel.zero_stage=1", "eval.interval=3",
        "eval.exit_thresholds=[0.3]")
    run("dp2_zero2", iters, "parallel.zero_stage=2", "checkpoint.interval=2",
        "checkpoint.keep_last=2")
    out["kept_checkpoints"] = sorted(os.listdir(f"{root}/dp2_zero2/checkpoints"))
    run("dp2_zero3", iters, "parallel.zero_stage=3")
    out["zero3_weights"] = {k: v.shape for k, v in _final_weights(f"{root}/dp2_zero3").items()}
    run("dp2_bf16", iters, "train.precision=bf16")
    run("tp2", iters, "parallel.tensor=2")

    # exact resume: 3 steps, stop, 3 more from the checkpoint
    run("resume", "train.train_iters=3", "train.lr_decay_iters=6")
    run("resume", iters, "train.load=auto", "train.lr_decay_iters=6")
    out["resume_first_half"] = out["resume"]

    # a NaN loss at iteration 3 is reported and its step skipped: the weights after 3
    # iterations are those after 2
    restore = _poison_loss_at(3, accumulation=2)
    try:
        run("nan_skip", "train.train_iters=3", "train.nonfinite_loss=skip",
            "train.lr_decay_iters=6")
    finally:
        restore()
    run("two_steps", "train.train_iters=2", "train.lr_decay_iters=6")
    out["nan_skip_weights_equal"] = all(
        torch.equal(a, b) for a, b in zip(_final_weights(f"{root}/nan_skip").values(),
                                          _final_weights(f"{root}/two_steps").values()))

    restore = _poison_loss_at(2, accumulation=2)
    try:
        run("nan_stop", "train.train_iters=3", "train.nonfinite_loss=stop")
        out["nan_stop_error"] = None
    except NonFiniteLossError as error:
        out["nan_stop_error"] = str(error)
    finally:
        restore()

    # a crash in the middle of the save at iteration 4 (DeepSpeed's files written, ours not)
    # leaves iteration 2 as latest
    original_save = ckpt.save_torch_atomic

    def crash_mid_save(obj, path):
        if "iter_0000004" in str(path):
            raise OSError("simulated crash during save")
        original_save(obj, path)

    ckpt.save_torch_atomic = crash_mid_save
    try:
        run("crash", "train.train_iters=4", "checkpoint.interval=2", "train.lr_decay_iters=6")
        out["crash_error"] = None
    except OSError as error:
        out["crash_error"] = str(error)
    finally:
        ckpt.save_torch_atomic = original_save
    out["partial_left_behind"] = os.path.isdir(f"{root}/crash/checkpoints/iter_0000004")
    with open(f"{root}/crash/checkpoints/latest") as f:
        out["latest_after_crash"] = f.read().strip()
    run("crash", "train.train_iters=4", "checkpoint.interval=2", "train.lr_decay_iters=6",
        "train.load=auto")
    out["crash_resumed"] = out["crash"]
    return out


def _close(a, b, tol=2e-5):
    return all(math.isclose(a[i], b[i], rel_tol=tol, abs_tol=tol) for i in a)


@pytest.fixture(scope="module")
def runs(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    (reference,) = run_distributed(_reference_worker, world_size=1,
                                   args=(sample_data, str(root / "r")))
    ranks = run_distributed(_parallel_worker, world_size=2, args=(sample_data, str(root / "p")))
    return reference, ranks, root


@pytest.mark.slow
def test_layouts_follow_the_single_process_losses(runs):
    reference, ranks, _ = runs
    got = ranks[0]
    ref = reference["zero1"]["losses"]
    assert sorted(ref) == list(range(1, ITERS + 1))
    assert ref[ITERS] < ref[1], "the loss should fall"
    # same global batch: ZeRO-2, DP=2 (ZeRO-1 and -2) and TP=2 follow the DP=1 losses
    assert _close(reference["zero2"]["losses"], ref), (reference["zero2"]["losses"], ref)
    for name in ("dp2_zero1", "dp2_zero2", "dp2_zero3", "tp2"):
        assert _close(got[name]["losses"], ref), (name, got[name]["losses"], ref)
    assert ranks[1]["dp2_zero1"]["losses"] == got["dp2_zero1"]["losses"]
    # bf16 follows the fp32 run to bf16 precision
    assert _close(got["dp2_bf16"]["losses"], ref, tol=3e-2), (got["dp2_bf16"]["losses"], ref)


@pytest.mark.slow
def test_checkpoints_keep_the_last_n_and_zero3_weights_are_complete(runs):
    _, ranks, _ = runs
    got = ranks[0]
    assert [n for n in got["kept_checkpoints"] if n.startswith("iter_")] == [
        "iter_0000004", "iter_0000006"]
    assert "latest" in got["kept_checkpoints"]
    shapes = got["zero3_weights"]
    assert shapes["embedding.word_embeddings.weight"] == (512, 32)
    assert all(0 not in shape for shape in shapes.values())


@pytest.mark.slow
def test_zero_shards_optimizer_state_over_data_parallel_ranks(runs):
    reference, ranks, _ = runs
    for zero in (1, 2):
        single = reference[f"zero{zero}"]["state_bytes"]
        for rank in ranks:
            shared = rank[f"dp2_zero{zero}"]["state_bytes"]
            assert single > 0 and shared <= 0.55 * single, (zero, single, shared)


@pytest.mark.slow
def test_resume_continues_with_the_same_losses(runs):
    _, ranks, _ = runs
    got = ranks[0]
    resumed = got["resume"]["losses"]
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert math.isclose(resumed[it], got["dp2_zero1"]["losses"][it], rel_tol=1e-6,
                            abs_tol=1e-7), (it, resumed, got["dp2_zero1"]["losses"])


@pytest.mark.slow
def test_nonfinite_loss_is_skipped_or_stops(runs):
    _, ranks, _ = runs
    got = ranks[0]
    assert got["nan_skip"]["skipped"] == 1
    assert math.isnan(got["nan_skip"]["losses"][3])
    assert got["nan_skip_weights_equal"], "the step with a NaN loss changed the weights"
    assert got["nan_stop_error"] and "iteration 2" in got["nan_stop_error"]


@pytest.mark.slow
def test_crash_during_save_keeps_latest(runs):
    reference, ranks, _ = runs
    got = ranks[0]
    ref = reference["zero1"]["losses"]
    assert "simulated crash" in got["crash_error"]
    assert got["partial_left_behind"]  # the interrupted save really had started
    assert got["latest_after_crash"] == "iter_0000002"
    assert sorted(got["crash_resumed"]["losses"]) == [3, 4]
    assert _close(got["crash_resumed"]["losses"], {i: ref[i] for i in (3, 4)}, tol=5e-5)


@pytest.mark.slow
def test_tensorboard_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, root = runs
    log_dir = root / "p" / "dp2_zero1" / "tensorboard"
    assert glob.glob(str(log_dir / "events.*"))
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    expected = {"lm loss", "lm loss cycle 1", "lm loss cycle 2", "learning-rate", "grad-norm",
                "tokens-per-sec", "mfu", "zero-attention/cycle 1", "zero-attention/cycle 2",
                "zero-attention/cycle1_layer2", "gate/cycle 1", "gate/cycle 2",
                "lm loss validation", "lm loss validation ppl", "mean-cycles validation",
                "lm loss validation exit 0.3", "mean-cycles validation exit 0.3"}
    assert expected <= tags, expected - tags
    # logging.peak_flops_per_device=auto on a CPU: the matmul peak measured at start, the same
    # at every log, and TensorBoard says where it comes from
    peaks = {e.value for e in accumulator.Scalars("mfu-peak-flops-per-device")}
    assert len(peaks) == 1 and 1e8 < peaks.pop() < 1e14
    assert any(t.startswith("mfu-peak") for t in accumulator.Tags()["tensors"])
    losses = [e.value for e in accumulator.Scalars("lm loss")]
    assert len(losses) == ITERS // 2 and all(math.isfinite(v) for v in losses)
    assert all(0 < e.value < 1 for e in accumulator.Scalars("zero-attention/cycle 1"))
    cycles = [e.value for e in accumulator.Scalars("mean-cycles validation exit 0.3")]
    assert all(1 <= v <= 2 for v in cycles)
