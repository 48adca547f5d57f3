"""The circular pipeline on real gloo processes: PP=2, PP=2 x TP=2 and PP=2 x DP=2 (ZeRO-1)
follow PP=1's losses over optimizer steps (clipping by the norm over all stages on), each rank
holds its slice of the middle layers once and only its own zero keys, the tied embedding's two
copies stay identical, resume is exact, and the export reads a pipeline checkpoint."""

import math
import os

import pytest
import torch

from distributed import run_distributed
from train_helpers import micro_config

STEPS = 4
# C=3 cycles of 2 middle layers: 8 applications, so a cycle spans the stage boundary
PIPE = ["model.num_layers=4", "model.num_cycles=3", "model.exit_loss_weights=[0.3,0.3,1.0]"]


def _initial_weights(rank, data, path):
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    config = micro_config(data, "unused", *PIPE)
    torch.save(gather_full_state_dict(ZTTModel(config.model)), path)


def _train_runs(rank, data, root, weights, runs):
    from megatron_ztt.training.train import train

    out = {}
    for name, overrides in runs:
        result = train(micro_config(data, f"{root}/{name}", *PIPE, f"train.init_from={weights}",
                                    f"train.lr_decay_iters={STEPS}", *overrides))
        out[name] = result.losses
        out[f"{name} validation"] = result.validation
    return out


def _stage_files(run_dir):
    from megatron_ztt.checkpoint import model_file, resolve

    tag_dir = os.path.join(*resolve(os.path.join(run_dir, "checkpoints")))
    return [torch.load(os.path.join(tag_dir, model_file(s, 0)), weights_only=True)
            for s in (0, 1)]


def _training_model_logits(rank, config, state):
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import load_full_state_dict

    model = ZTTModel(config).eval()
    load_full_state_dict(model, state)  # strict: the merged stages are the whole model
    ids = torch.arange(config.seq_length).remainder(config.vocab_size)[None]
    with torch.no_grad():
        return ids, model(ids).logits


@pytest.fixture(scope="module")
def pipeline_runs(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    weights = str(root / "initial.pt")
    run_distributed(_initial_weights, world_size=1, args=(sample_data, weights))
    # validation after the last step, on the same held-out batches: full depth and with
    # per-token early exit (the early positions' zero attention reaches 0.1 at this size)
    steps = f"train.train_iters={STEPS}", f"eval.interval={STEPS}", "eval.exit_thresholds=[0.1]"
    (single,) = run_distributed(_train_runs, world_size=1, args=(
        sample_data, str(root), weights,
        [("pp1", [*steps]), ("pp1_frozen", ["train.train_iters=1", "train.lr=0", "train.min_lr=0"])]))
    pipe = run_distributed(_train_runs, world_size=2, args=(
        sample_data, str(root), weights,
        [("pp2", [*steps, "parallel.pipeline=2"]),
         ("pp2_resume", ["train.train_iters=2", "parallel.pipeline=2"]),
         ("pp2_resume", [*steps, "parallel.pipeline=2", "train.load=auto"]),
         ("pp2_frozen", ["train.train_iters=1", "train.lr=0", "train.min_lr=0",
                         "parallel.pipeline=2"])]))
    pipe_tensor = run_distributed(_train_runs, world_size=4, args=(
        sample_data, str(root), weights,
        [("pp2_tp2", [*steps, "parallel.pipeline=2", "parallel.tensor=2"]),
         ("pp2_dp2", [*steps, "parallel.pipeline=2", "parallel.zero_stage=1"])]))
    return single, pipe, pipe_tensor, root


def _assert_same(losses, reference, what, tol=5e-5):
    assert sorted(losses) == sorted(reference), what
    for it, value in reference.items():
        assert math.isclose(losses[it], value, rel_tol=tol, abs_tol=tol), (what, losses, reference)


@pytest.mark.slow
def test_pipeline_layouts_follow_single_stage_losses(pipeline_runs):
    single, pipe, pipe_tensor, _ = pipeline_runs
    reference = single["pp1"]
    assert reference[STEPS] < reference[1]
    _assert_same(pipe[0]["pp2"], reference, "PP=2")
    _assert_same(pipe[1]["pp2"], reference, "PP=2 (last stage)")
    _assert_same(pipe_tensor[0]["pp2_tp2"], reference, "PP=2 x TP=2")
    _assert_same(pipe_tensor[0]["pp2_dp2"], reference, "PP=2 x DP=2 (ZeRO-1)")


@pytest.mark.slow
def test_pipeline_validation_matches_single_stage(pipeline_runs):
    single, pipe, pipe_tensor, _ = pipeline_runs
    (expected,) = single["pp1 validation"].values()
    for name, runs in (("pp2", pipe), ("pp2_tp2", pipe_tensor), ("pp2_dp2", pipe_tensor)):
        for rank in (0, len(runs) - 1):  # the loss lives on the last stage; every rank reports it
            (got,) = runs[rank][f"{name} validation"].values()
            assert got["lm loss validation"] == pytest.approx(expected["lm loss validation"],
                                                              abs=5e-5), name
            assert got["mean-cycles validation"] == expected["mean-cycles validation"]
            # the ring applies the training model's per-token exit rule
            assert got["lm loss validation exit 0.1"] == pytest.approx(
                expected["lm loss validation exit 0.1"], abs=5e-5), name
            assert got["mean-cycles validation exit 0.1"] == pytest.approx(
                expected["mean-cycles validation exit 0.1"], abs=1e-6), name
    assert 1 < expected["mean-cycles validation exit 0.1"] < 3


@pytest.mark.slow
@pytest.mark.parametrize("run", ["pp2", "pp2_dp2"])
def test_each_rank_holds_its_slice_once_and_the_tied_embedding_stays_identical(pipeline_runs,
                                                                               run):
    *_, root = pipeline_runs
    first, second = _stage_files(root / run)
    layers = [{int(n.split(".")[1]) for n in stage if n.startswith("layers.")}
              for stage in (first, second)]
    # L=4: the head and middle layer 2 on the first rank, middle layer 3 and the tail on the
    # last; each middle layer exists once although it runs in all 3 cycles
    assert layers == [{0, 1}, {2, 3}]
    shared = sorted(set(first) & set(second))
    assert shared == ["embedding.word_embeddings.weight"]  # tied: the last rank's copy
    assert torch.equal(first[shared[0]], second[shared[0]]), "the tied embedding copies differ"
    keys = [{n.split(".")[-1] for n in stage if n.startswith("zero_token_pool.")}
            for stage in (first, second)]
    assert keys[0] == {"head", "cycle1_layer2", "cycle2_layer2", "cycle3_layer2"}
    assert keys[1] == {"cycle1_layer3", "cycle2_layer3", "cycle3_layer3", "tail"}
    gates = [{n.split(".")[1] for n in stage if n.startswith("gates.")} for stage in (first, second)]
    assert gates == [set(), {"0", "1", "2"}]  # a cycle's gate sits with its last layer
    assert "output_head.final_norm.weight" in second and not any(
        n.startswith("output_head.") for n in first)


@pytest.mark.slow
def test_pipeline_resume_continues_with_the_same_losses(pipeline_runs):
    _, pipe, _, _ = pipeline_runs
    resumed, straight = pipe[0]["pp2_resume"], pipe[0]["pp2"]
    assert sorted(resumed) == [3, 4]
    _assert_same(resumed, {i: straight[i] for i in (3, 4)}, "resumed", tol=1e-6)


@pytest.mark.slow
def test_export_reads_pipeline_checkpoints(pipeline_runs, tmp_path):
    from megatron_ztt.export.hf import export_hf
    from export_helpers import load_full_model_state
    from export_helpers import safetensors_tensors

    *_, root = pipeline_runs
    # the same weights (lr 0) saved by PP=1 and PP=2 export to identical files
    exports = {}
    for name in ("pp1_frozen", "pp2_frozen"):
        config, state, tokenizer = load_full_model_state(str(root / name / "checkpoints"))
        exports[name] = safetensors_tensors(export_hf(config, state, tokenizer,
                                                      tmp_path / name, "fp32"))
    assert exports["pp1_frozen"].keys() == exports["pp2_frozen"].keys()
    for key, tensor in exports["pp1_frozen"].items():
        assert torch.equal(tensor, exports["pp2_frozen"][key]), key


@pytest.mark.slow
def test_exported_pipeline_checkpoint_has_the_training_models_logits(pipeline_runs, tmp_path):
    from megatron_ztt.export.hf import export_hf
    from export_helpers import load_full_model_state
    from export_helpers import load_export

    *_, root = pipeline_runs
    config, state, tokenizer = load_full_model_state(str(root / "pp2" / "checkpoints"))

    ((ids, expected),) = run_distributed(_training_model_logits, world_size=1,
                                         args=(config, state))
    exported = load_export(export_hf(config, state, tokenizer, tmp_path / "hf", "fp32"))
    with torch.no_grad():
        got = exported(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
