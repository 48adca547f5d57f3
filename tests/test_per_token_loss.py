"""The objective is the per-token loss of the global batch: the token losses of every micro
batch on every data-parallel rank summed and divided by the global batch's counted tokens
(exit losses too). With ``data.eod_mask_loss=true`` and short documents the micro batches count
different numbers of tokens, and DP=2 x 2 micro batches (dense) and PP=2 x 4 micro batches
(circular pipeline) still get the gradient of one process on the whole batch at once."""

import random
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from train_helpers import micro_config

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
PER_TOKEN = ["data.eod_mask_loss=true", "parallel.zero_stage=0", "train.nonfinite_loss=stop",
             "train.global_batch_size=8", "train.clip_grad=0", "model.num_layers=4",
             "model.num_cycles=2", "model.exit_loss_weights=[0.5,1.0]"]


@pytest.fixture(scope="module")
def short_documents(sample_data, tmp_path_factory):
    """Documents of 3-30 words, so that end-of-document tokens (masked) fall unevenly."""
    from megatron_ztt.data.preprocess import preprocess

    _, tokenizer = sample_data
    root = tmp_path_factory.mktemp("short_documents")
    words = (SAMPLE / "11-0.txt").read_text(encoding="utf-8").split()[:20000]
    draw = random.Random(7)
    docs = root / "docs"
    docs.mkdir()
    start = 0
    for i in range(400):
        length = draw.randint(3, 30)
        (docs / f"doc{i:04d}.txt").write_text(" ".join(words[start:start + length]) + "\n",
                                              encoding="utf-8")
        start += length
    preprocess([str(docs)], tokenizer, str(root / "short"), append_eod=True, progress=False)
    return str(root / "short"), tokenizer


def _first_step_gradients(rank, data, root, name, overrides):
    """The data-parallel averaged gradients the optimizer would apply at step 1 (gathered to
    full canonical tensors), the first step's counted tokens per micro batch, and its loss."""
    from megatron_ztt.training.batches import TrainingBatches, build_tokenizer_and_data
    from megatron_ztt.training.engines import build_engine

    config = micro_config(data, f"{root}/{name}", *PER_TOKEN, *overrides)
    _, (train_set, _, _) = build_tokenizer_and_data(config)
    engine = build_engine(config)
    ds, captured = engine._ds, {}
    original_step = ds.step

    def step(*args, **kwargs):
        if ds.is_gradient_accumulation_boundary():
            names = engine.canonical_names()
            captured.update({names[n]: p.grad.detach().clone()
                             for n, p in engine.module.named_parameters() if p.grad is not None})
        return original_step(*args, **kwargs)

    ds.step = step
    counts = [float(b["loss_mask"].sum()) for b, _ in
              zip(TrainingBatches(train_set, config, 0),
                  range(config.gradient_accumulation_steps(torch.distributed.get_world_size())))]
    engine.train()
    result = engine.train_step(TrainingBatches(train_set, config, 0), 1, False)
    from megatron_ztt.training.metrics import reduce_means

    losses = reduce_means(result.losses, ["lm loss", "lm loss cycle 1", "lm loss cycle 2"])
    return {"grads": engine.gather_to_full(captured), "counts": counts, "losses": losses}


def _assert_same_gradients(got, reference, what):
    assert set(got) == set(reference), what
    for name, grad in reference.items():
        scale = grad.abs().max().item() + 1e-12
        error = (got[name] - grad).abs().max().item() / scale
        assert error < 2e-5, f"{what}: {name} differs by {error:.2e} of its largest entry"


@pytest.mark.slow
def test_data_and_pipeline_parallel_give_the_whole_batch_gradient(short_documents, tmp_path):
    (whole,) = run_distributed(_first_step_gradients, world_size=1, args=(
        short_documents, str(tmp_path), "whole", ["train.micro_batch_size=8"]))
    dp = run_distributed(_first_step_gradients, world_size=2, args=(
        short_documents, str(tmp_path), "dp2", ["train.micro_batch_size=2"]))
    counts = dp[0]["counts"] + dp[1]["counts"]
    assert len(set(counts)) > 1, f"the micro batches must count unequal tokens: {counts}"
    assert sum(counts) == whole["counts"][0]
    _assert_same_gradients(dp[0]["grads"], whole["grads"], "DP=2 x 2 micro batches")
    for key, value in whole["losses"].items():  # the logged loss is the global per-token mean
        assert abs(dp[0]["losses"][key] - value) < 1e-5 * abs(value), key

    pipe = run_distributed(_first_step_gradients, world_size=2, pipeline_parallel=2, args=(
        short_documents, str(tmp_path), "pp2",
        ["train.micro_batch_size=2", "parallel.pipeline=2"]))
    assert len(set(pipe[1]["counts"])) > 1, pipe[1]["counts"]
    _assert_same_gradients(pipe[0]["grads"], whole["grads"], "PP=2 x 4 micro batches")
    for key, value in whole["losses"].items():
        assert abs(pipe[0]["losses"][key] - value) < 1e-5 * abs(value), key
