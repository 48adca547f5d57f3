"""`ztt plan`: every rank's module built on the meta device, checked against real runs."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO
from test_training_cli import _data_args, _env, _torchrun

CONFIG = str(REPO / "launch" / "configs" / "tiny.yaml")
# the training tests' few-step settings; the size is bench/training_layouts.py's mid one
FEW_STEPS = ["model.vocab_size=512", "data.split=90,5,5", "train.train_iters=1",
             "train.warmup_iters=1", "eval.iters=0", "checkpoint.save_at_end=false",
             "train.micro_batch_size=2", "train.global_batch_size=8"]
MID_SIZE = ["model.hidden_size=384", "model.num_layers=6", "model.num_attention_heads=6",
            "model.num_query_groups=2", "model.seq_length=64"]
LAYOUTS = {"DP=2 ZeRO-1": ["parallel.zero_stage=1"], "DP=2 ZeRO-2": ["parallel.zero_stage=2"],
           "TP=2": ["parallel.tensor=2"], "PP=2": ["parallel.pipeline=2"]}


PLANS = """
import json, sys
from megatron_ztt.training.plan import load_plan_config, plan_layout
print(json.dumps([plan_layout(load_plan_config(sys.argv[1], o), n, g).to_dict()
                  for o, n, g in json.loads(sys.argv[2])]))
"""


def _plans(*requests):
    """Plans of (overrides, nodes, gpus per node), in one fresh process: the planner's fake
    process group cannot share a process with the tests' real one."""
    done = subprocess.run([sys.executable, "-c", PLANS, CONFIG, json.dumps(requests)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [SimpleNamespace(**{**p, "per_rank": [SimpleNamespace(**r) for r in p["per_rank"]]})
            for p in json.loads(done.stdout.splitlines()[-1])]


def _plan(*overrides, nodes=1, gpus=2):
    return _plans((list(overrides), nodes, gpus))[0]


def _ztt_plan(*args):
    return subprocess.run([sys.executable, "-m", "megatron_ztt.cli", "plan", "--config", CONFIG,
                           *args], env=_env(), capture_output=True, text=True, timeout=300)


def test_plan_covers_every_rank_and_partitions_by_layout():
    pp, dense, zero1, zero0, tp, sp = _plans(
        (["parallel.pipeline=2", "parallel.tensor=2"], 2, 4), ([], 1, 1),
        (["parallel.zero_stage=1"], 1, 2),
        (["parallel.zero_stage=0", "train.nonfinite_loss=stop"], 1, 2),
        (["parallel.tensor=2"], 1, 2),
        (["parallel.tensor=2", "parallel.sequence_parallel=true"], 1, 2))
    assert [r.rank for r in pp.per_rank] == list(range(8))
    # megatron-core's order: tensor fastest, then data, then pipeline
    assert [(r.pipeline_rank, r.data_rank, r.tensor_rank) for r in pp.per_rank] == [
        (p, d, t) for p in range(2) for d in range(2) for t in range(2)]
    assert [r.node for r in pp.per_rank] == [0] * 4 + [1] * 4
    dense = dense.per_rank[0]
    split = {r.pipeline_rank: r for r in pp.per_rank}
    # the stages hold the layers once between them (the last also a copy of the tied
    # embedding); each tensor-parallel rank half of its stage
    both = split[0].parameters + split[1].parameters
    assert dense.parameters < 2 * both < 1.3 * dense.parameters
    assert pp.bubble == pytest.approx(1 / (3 * pp.micro_batches_per_step + 1))
    # the first stage holds more micro batches at once (interleaved 1F1B's warm-up)
    assert split[0].micro_batches_in_flight > split[1].micro_batches_in_flight
    # ZeRO-1 halves the state over two data-parallel ranks; ZeRO-0 keeps the moments only
    assert zero1.per_rank[0].optimizer_state_bytes == pytest.approx(12 * dense.parameters / 2,
                                                                    rel=1e-3)
    assert zero0.per_rank[0].optimizer_state_bytes == pytest.approx(8 * dense.parameters,
                                                                    rel=1e-2)
    # checkpointing keeps less; tensor parallelism splits the attention and MLP part
    assert dense.activation_bytes_with_checkpointing < dense.activation_bytes_without_checkpointing
    assert tp.per_rank[0].activation_bytes_per_micro_batch < dense.activation_bytes_per_micro_batch
    # sequence parallelism splits what lives between the tensor-parallel regions too
    # (norms, gates, carried states, the final norm): the same parameters, less activation
    assert sp.per_rank[0].parameters == tp.per_rank[0].parameters
    assert (sp.per_rank[0].activation_bytes_per_micro_batch
            < 0.9 * tp.per_rank[0].activation_bytes_per_micro_batch)


@pytest.mark.slow
def test_cli_prints_json_per_rank_and_refuses_impossible_layouts_in_one_line():
    done = _ztt_plan("--nodes", "1", "--gpus-per-node", "4", "--json", "--peak", "1e12",
                     "parallel.tensor=2")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert [r["rank"] for r in plan["per_rank"]] == [0, 1, 2, 3]
    for key in ("parameters", "optimizer_state_bytes", "activation_bytes"):
        assert all(r[key] > 0 for r in plan["per_rank"])
    assert plan["step_seconds_at_peak"] > 0 and plan["model_flops_per_step"] > 0
    bad = _ztt_plan("--nodes", "1", "--gpus-per-node", "3", "parallel.tensor=2")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "parallel.tensor (2)" in bad.stderr
    heads = _ztt_plan("--nodes", "1", "--gpus-per-node", "8", "parallel.tensor=8")
    assert heads.returncode == 2 and "num_attention_heads" in heads.stderr
    assert "Traceback" not in heads.stderr + bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_matches_a_real_run(sample_data, tmp_path, layout):
    # the mid size only: it has what the tiny one has and grouped-query attention on top (each
    # real run costs the suite 25 s; bench/plan_activation_check.py covers more sizes)
    overrides = FEW_STEPS + MID_SIZE + LAYOUTS[layout]
    run = subprocess.run(_torchrun(2, *_data_args(sample_data, tmp_path), *overrides),
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    status = json.loads((tmp_path / "status.json").read_text())
    plan = _plan(*overrides)
    assert [r.parameters for r in plan.per_rank] == status["parameters_per_rank"]
    for planned, measured in zip(plan.per_rank, status["optimizer_state_bytes_per_rank"]):
        assert planned.optimizer_state_bytes == pytest.approx(measured, rel=0.05)


@pytest.mark.slow
def test_activation_model_is_within_15_percent_of_the_measured_peak(tmp_path):
    """bench/plan_activation_check.py on its tiny size (the docs give all its sizes)."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "plan_activation_check.py"),
                           "--sizes", "tiny", "--out", str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "report.json").read_text())["results"]
    assert sorted(r["activation_checkpointing"] for r in rows) == [False, True]
    for row in rows:
        assert abs(row["error"]) < 0.15, row
