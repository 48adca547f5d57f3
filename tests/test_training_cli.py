"""The training entry point as users run it: torchrun, signals, bad settings, ztt eval."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO
from distributed import free_port

MICRO = ["data.split=90,5,5", "model.vocab_size=512", "model.hidden_size=32",
         "model.num_layers=3", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.seq_length=32", "model.num_cycles=2", "model.make_vocab_size_divisible_by=64",
         "model.exit_loss_weights=[0.5,1.0]",
         "train.micro_batch_size=2", "train.global_batch_size=8", "train.warmup_iters=1",
         "eval.iters=2"]
CONFIG = str(REPO / "launch" / "configs" / "tiny.yaml")


def _env():
    env = dict(os.environ, ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    for launcher_variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(launcher_variable, None)  # set in this process by in-process tests
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _data_args(data, run_dir):
    prefix, tokenizer = data
    return [f"data.blend=[{prefix}]", f"data.tokenizer={tokenizer}", f"run.dir={run_dir}"]


def _torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "megatron_ztt.train", "--config", CONFIG,
            *args]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(sample_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _torchrun(2, *_data_args(sample_data, run_dir), *MICRO, "train.train_iters=100000",
                  "logging.interval=1", "checkpoint.interval=100000", "eval.interval=100000"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    seen, deadline = [], time.time() + 300
    try:
        for line in proc.stdout:
            seen.append(line)
            match = re.match(r"iteration\s+(\d+)/", line)
            if match and int(match.group(1)) >= 3:
                break
            assert time.time() < deadline, "".join(seen[-30:])
        # SLURM and most schedulers signal every task of the job, as we do here
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2, "".join(seen[-40:])
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(seen) + rest
    assert proc.returncode == 0, log[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM"
    assert f"saved checkpoint iteration {status['iteration']}" in log

    from export_helpers import load_full_model_state

    config, weights, tokenizer = load_full_model_state(str(run_dir / "checkpoints"))
    assert config.hidden_size == 32 and weights and Path(tokenizer).is_file()

    # ztt eval reads the same checkpoint: full depth and two early-exit thresholds, at the
    # trained depth (2) and at two settings of the depth dial
    result = subprocess.run(
        [sys.executable, "-m", "megatron_ztt.cli", "eval", "--checkpoint",
         str(run_dir / "checkpoints"), "--exit-threshold", "0", "2", "--iters", "2",
         "--num-cycles", "1", "4", "--output", str(tmp_path / "eval.json")],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report == json.loads(result.stdout[result.stdout.index("{"):])
    assert [(r["num_cycles"], r["exit_threshold"]) for r in report["results"]] == [
        (depth, threshold) for depth in (2, 1, 4) for threshold in (None, 0.0, 2.0)]
    by_depth = {r["num_cycles"]: r for r in report["results"] if r["exit_threshold"] is None}
    assert by_depth[1]["mean_cycles"] == 1 and by_depth[4]["mean_cycles"] == 4
    assert len({by_depth[d]["loss"] for d in (1, 2, 4)}) == 3
    by_threshold = {r["exit_threshold"]: r for r in report["results"] if r["num_cycles"] == 2}
    assert by_threshold[None]["mean_cycles"] == 2
    assert by_threshold[0.0]["mean_cycles"] == 1
    assert by_threshold[2.0]["mean_cycles"] == 2
    assert by_threshold[2.0]["loss"] == pytest.approx(by_threshold[None]["loss"], abs=1e-5)
    for row in report["results"]:
        assert row["perplexity"] == pytest.approx(2.718281828 ** row["loss"], rel=1e-6)


@pytest.mark.parametrize("overrides,named", [
    (["train.lrr=1"], "train.lrr"),
    (["train.lr=fast"], "train.lr"),
    (["model.num_cycles=0"], "model.num_cycles"),
    (["parallel.tensor=3"], "parallel.tensor"),
    (["parallel.zero_stage=5"], "parallel.zero_stage"),
    (["parallel.pipeline=2", "parallel.zero_stage=2"], "parallel.zero_stage"),
    (["parallel.pipeline=9", "parallel.zero_stage=1"], "more pipeline stages than cycled layers"),
])
def test_bad_settings_fail_at_start_naming_the_key(sample_data, tmp_path, overrides, named):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_ztt.train", "--config", CONFIG,
         *_data_args(sample_data, tmp_path), *MICRO, *overrides],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_tokenizer_that_does_not_match_the_model_is_refused(sample_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_ztt.train", "--config", CONFIG,
         *_data_args(sample_data, tmp_path), *MICRO, "model.vocab_size=1024"],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.vocab_size (1024)" in result.stderr and "512" in result.stderr


def test_training_without_a_validation_split_skips_validation(sample_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_ztt.train", "--config", CONFIG,
         *_data_args(sample_data, tmp_path), *MICRO, "data.split=100,0,0",
         "train.train_iters=4", "eval.interval=2", "checkpoint.interval=1000"],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "no validation split" in log
    assert "validation at iteration" not in log
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "completed"
