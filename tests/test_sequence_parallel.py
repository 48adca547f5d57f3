"""Sequence parallelism (``parallel.sequence_parallel``): TP=2 with the sequence split over the
tensor-parallel ranks computes what TP=2 without it computes: the losses (exit losses
included), the gradients (the replicated norm and gate weights summed over the group) and,
with an exit rule, the same per-token decisions; in the dense engine and the circular
pipeline, with zero tokens, gates and exit losses on. Bad settings are refused at start."""

import pytest
import torch

from distributed import run_distributed
from test_host_sync import HostReads
from model_helpers import assert_close, batch, tiny_config
from train_helpers import micro_config


def _model_passes(rank):
    """``_model_pass`` without and with sequence parallelism, in the same processes."""
    return [_model_pass(sequence_parallel) for sequence_parallel in (False, True)]


def _model_pass(sequence_parallel):
    """Loss, exit losses and gradients of one training pass of ZTTModel at TP=2 (this rank's
    shards), and an evaluation with an exit rule."""
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sequence import all_reduce_replicated_grads, replicated_parameters

    config = tiny_config(exit_loss_weights=[0.3, 0.5, 1.0], tie_embeddings=True)
    model = ZTTModel(config)
    model.use_sequence_parallel(sequence_parallel)
    tokens, labels = batch(config, size=2)
    mask = (torch.arange(config.seq_length) % 5 != 0).float().expand(2, -1)
    model.train()
    out = model(tokens, labels, loss_mask=mask, collect_stats=True)
    out.loss.backward()
    if sequence_parallel:
        all_reduce_replicated_grads(replicated_parameters(model))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        # the raw zero attention falls with the position: the first tokens leave
        evaluated = model(tokens, exit_threshold=0.15, exit_signal="zero_attention")
        full = model(tokens)
    return {"loss": out.loss.detach(), "exit_losses": {c: v.detach() for c, v in out.exit_losses.items()},
            "grads": grads, "cycles_used": evaluated.cycles_used, "exit_logits": evaluated.logits,
            "logits": full.logits, "full_cycles": full.cycles_used}


@pytest.mark.slow
def test_model_sequence_parallel_matches_tensor_parallel():
    for rank, (want, got) in enumerate(run_distributed(_model_passes, world_size=2,
                                                       tensor_parallel=2)):
        assert_close(got["loss"], want["loss"], atol=1e-6, what="loss")
        assert set(got["exit_losses"]) == {1, 2, 3}
        for cycle, value in want["exit_losses"].items():
            assert_close(got["exit_losses"][cycle], value, atol=1e-6, what=f"exit loss {cycle}")
        for name, grad in want["grads"].items():
            assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-5, what=name)
        assert torch.equal(got["cycles_used"], want["cycles_used"])
        assert 1.0 < want["cycles_used"].float().mean() < 3.0, "the rule must make some exit"
        assert_close(got["exit_logits"], want["exit_logits"], atol=1e-5, what="exit logits")
        assert_close(got["logits"], want["logits"], atol=1e-5, what="logits")
        assert got["full_cycles"].shape == want["full_cycles"].shape


ENGINE = ["parallel.tensor=2", "train.nonfinite_loss=stop", "train.global_batch_size=4",
          "model.exit_loss_weights=[0.5,1.0]", "data.eod_mask_loss=true"]


def _engine_runs(rank, data, root, overrides, steps, exit_threshold):
    """``_engine_steps`` without and with sequence parallelism, in the same processes."""
    return [_engine_steps(data, f"{root}/{on}", [*overrides, f"parallel.sequence_parallel={on}"],
                          steps, exit_threshold) for on in ("false", "true")]


def _engine_steps(data, run_dir, overrides, steps, exit_threshold):
    """Losses of ``steps`` training steps, the gathered gradients of the first, and a
    validation loss with an exit rule and without."""
    from deepspeed.utils import safe_get_full_grad

    from megatron_ztt.training.batches import TrainingBatches, build_tokenizer_and_data
    from megatron_ztt.training.engines import build_engine
    from megatron_ztt.training.metrics import reduce_means

    config = micro_config(data, run_dir, *ENGINE, *overrides)
    _, (train_set, valid_set, _) = build_tokenizer_and_data(config)
    engine = build_engine(config)
    ds, captured = engine._ds, {}
    names = engine.canonical_names()
    # the gradients the optimizer steps with: at the dense engine's accumulation boundary,
    # after the pipeline engine's sums (before the data-parallel average: DP=1 here)
    hooked = "allreduce_gradients" if config.parallel.pipeline > 1 else "step"
    original = getattr(ds, hooked)

    def capture(*args, **kwargs):
        if not captured and (hooked != "step" or ds.is_gradient_accumulation_boundary()):
            for name, param in engine.module.named_parameters():
                grad = param.grad if param.grad is not None else safe_get_full_grad(param)
                captured[names[name]] = grad.detach().clone()
        return original(*args, **kwargs)

    setattr(ds, hooked, capture)
    engine.train()
    batches = TrainingBatches(train_set, config, 0)
    losses, host_reads = [], []
    for iteration in range(1, steps + 1):
        with HostReads() as reads:
            result = engine.train_step(batches, iteration, collect_stats=iteration == 1)
        host_reads.append(reads.count)
        # the same keys on every rank (the pipeline's losses live on its last stage)
        losses.append(reduce_means(result.losses, ["lm loss", "lm loss cycle 1",
                                                   "lm loss cycle 2"]))
    grads = engine.gather_to_full(captured)
    engine.eval()
    evaluated = {threshold: engine.evaluate(TrainingBatches(valid_set, config, 0), 1, threshold)
                 for threshold in (None, exit_threshold)}
    return {"losses": losses, "grads": grads, "eval": evaluated, "host_reads": host_reads}


def _assert_same_runs(got, want, what):
    assert got["host_reads"] == want["host_reads"], (what, "sequence parallelism reads the host")
    for step, (a, b) in enumerate(zip(got["losses"], want["losses"]), 1):
        assert set(a) == set(b) and len(a) == 3, (what, a)  # lm loss and both exit losses
        for key, value in b.items():
            assert abs(a[key] - value) <= 1e-5 * abs(value), (what, step, key, a[key], value)
    assert set(got["grads"]) == set(want["grads"])
    for name, grad in want["grads"].items():
        scale = grad.abs().max().item() + 1e-12
        error = (got["grads"][name] - grad).abs().max().item() / scale
        assert error < 1e-5, f"{what}: gradient of {name} differs by {error:.2e} of its largest"
    for threshold, value in want["eval"].items():
        for key in ("loss", "mean_cycles"):
            assert abs(got["eval"][threshold][key] - value[key]) <= 1e-5 * abs(value[key]), (
                what, threshold, key)


@pytest.mark.slow
def test_dense_engine_sequence_parallel_matches_tensor_parallel(sample_data, tmp_path):
    """ZeRO-1, 2 micro batches per step (the replicated gradients summed in the last
    backward), 2 steps."""
    for rank, (want, got) in enumerate(run_distributed(
            _engine_runs, world_size=2, tensor_parallel=2,
            args=(sample_data, str(tmp_path), [], 2, 0.15))):
        _assert_same_runs(got, want, f"dense TP=2 rank {rank}")
        assert want["eval"][0.15]["mean_cycles"] < 2.0, "the exit rule must make some exit"


@pytest.mark.slow
def test_circular_pipeline_sequence_parallel_matches_tensor_parallel(sample_data, tmp_path):
    """PP=2 x TP=2 (4 processes), ZeRO-1, 2 micro batches, 1 step, evaluation with exits."""
    pipe = ["parallel.pipeline=2", "model.num_layers=4", "train.micro_batch_size=1",
            "train.global_batch_size=2", "model.seq_length=16"]
    for rank, (want, got) in enumerate(run_distributed(
            _engine_runs, world_size=4, tensor_parallel=2, pipeline_parallel=2,
            args=(sample_data, str(tmp_path), pipe, 1, 0.15), timeout=1500)):
        _assert_same_runs(got, want, f"PP=2 x TP=2 rank {rank}")


@pytest.mark.parametrize("overrides, message", [
    (["parallel.sequence_parallel=true"],
     "parallel.sequence_parallel: true needs parallel.tensor > 1 (got parallel.tensor=1)"),
    (["parallel.sequence_parallel=true", "parallel.tensor=2", "model.seq_length=33"],
     "parallel.sequence_parallel: needs model.seq_length (33) to be a multiple of "
     "parallel.tensor (2)"),
    (["parallel.sequence_parallel=true", "parallel.tensor=2", "model.exit_loss_fraction=0.25"],
     "parallel.sequence_parallel: true does not combine with model.exit_loss_fraction=0.25"),
])
def test_bad_sequence_parallel_settings_are_refused_in_one_line(overrides, message, tmp_path):
    from megatron_ztt.config import validate
    from megatron_ztt.model.config import ConfigError

    with pytest.raises(ConfigError) as error:  # load_config validates
        validate(micro_config(("prefix", "tok.model"), str(tmp_path), *overrides))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
