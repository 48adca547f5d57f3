"""Shared by the launcher tests: the tiny run's data, made by the project's own tools, and
readers for the training's console lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "launch" / "configs" / "tiny.yaml"
SAMPLE = REPO / "data" / "sample"

ITERATION = re.compile(r"^iteration\s+(\d+)/\s*(\d+) \| loss ([0-9.]+)", re.M)
SAVED = re.compile(r"^saved checkpoint iteration (\d+) to (\S+)", re.M)
RESUMED = re.compile(r"^resumed from checkpoint iteration (\d+)", re.M)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Overrides that point launch/configs/tiny.yaml at a tokenizer and .bin/.idx files built
    from the bundled sample corpus, plus settings that keep a launcher test short."""
    out = tmp_path_factory.mktemp("tiny-data")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for argv in (
        ["tokenizer", "train", "--input", str(SAMPLE), "--vocab-size", "2048",
         "--output", str(out / "tok")],
        ["preprocess", "--input", str(SAMPLE), "--tokenizer", str(out / "tok.model"),
         "--output-prefix", str(out / "sample"), "--append-eod", "--no-progress"],
    ):
        result = subprocess.run([sys.executable, "-m", "megatron_ztt.cli", *argv], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    return [f"data.blend=[{out / 'sample'}]", f"data.tokenizer={out / 'tok.model'}",
            # no validation passes in the way, a console line every 2 steps
            "eval.interval=1000", "eval.iters=1", "logging.interval=2"]


def losses(text: str):
    """[(iteration, loss)] from the console lines."""
    return [(int(m.group(1)), float(m.group(3))) for m in ITERATION.finditer(text)]


def saved(text: str):
    return [int(m.group(1)) for m in SAVED.finditer(text)]


def assert_interrupted_then_resumed(first: str, second: str) -> int:
    """First run: training, a checkpoint at the signal. Second run: resumes there and carries
    on with the next iterations and losses, not from scratch. Returns the iteration."""
    before = losses(first)
    assert before, first
    interrupted = saved(first)[-1]
    assert re.search(rf"received SIGUSR1: checkpoint saved at iteration {interrupted}\b", first)
    resumed = RESUMED.search(second)
    assert resumed and int(resumed.group(1)) == interrupted, second
    after = losses(second)
    assert after, second
    # iterations continue where the checkpoint left off (a console line every 2 steps)
    assert interrupted < after[0][0] <= interrupted + 2
    assert [i for i, _ in after] == sorted(i for i, _ in after)
    # and so do the losses: far below where the run started
    start_loss, last_loss = before[0][1], before[-1][1]
    assert after[0][1] < start_loss - 0.5 * (start_loss - last_loss), (before, after)
    return interrupted


# --------------------------------------------------------------------------- SLURM jobs
START = re.compile(r"^=== job \d+ start (\d+) ", re.M)


def job_env(**extra):
    return {"PYTHON": sys.executable, "ZTT_DEVICE": "cpu", "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", **extra}


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_text(cluster, job_id, log: Path, pattern, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        match = re.search(pattern, read(log), re.M)
        if match:
            return match
        state = cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "COMPLETING"):
            break
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: no {what} (waited up to {timeout:.0f}s); state "
                         f"{cluster.job(job_id).get('JobState')}\n--- job log:\n{read(log)[-4000:]}"
                         f"\n{cluster.logs()}")


def starts(text: str):
    """The log split at the batch script's '=== job J start N' banners -> {N: text}."""
    marks = list(START.finditer(text))
    return {int(m.group(1)): text[m.start(): marks[i + 1].start() if i + 1 < len(marks) else None]
            for i, m in enumerate(marks)}


# --------------------------------------------------------------------------- CLI cases
_CLI_CASES = r"""
import contextlib, io, json, sys, traceback
from megatron_ztt.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse
            code = stop.code if isinstance(stop.code, int) else 2
        except BaseException:  # what a user would see: a traceback
            traceback.print_exc()
            code = "traceback"
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
print("\n@@CASES@@" + json.dumps(results))
"""


def cli_cases(*argvs, timeout=600, env=None):
    """Run ``ztt ARGV`` for each argv, in order and to its end, in one fresh process (the
    commands' own imports once): [{"code", "out", "err"}]. Each call may depend on the files
    the calls before it wrote."""
    environ = dict(os.environ, PYTHONPATH=str(REPO), ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu",
                   OMP_NUM_THREADS="1", **(env or {}))
    for launcher_variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(launcher_variable, None)
    import json

    result = subprocess.run([sys.executable, "-c", _CLI_CASES,
                             json.dumps([[str(a) for a in argv] for argv in argvs])],
                            env=environ, capture_output=True, text=True, timeout=timeout,
                            cwd=str(REPO))
    assert "@@CASES@@" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.split("@@CASES@@")[-1])


def assert_one_line_error(case, *expected, code=None):
    """The command failed with one line (the last of stderr) holding every ``expected`` text,
    and no traceback anywhere."""
    text = case["out"] + case["err"]
    assert "Traceback" not in text and case["code"] != "traceback", text
    assert case["code"] != 0 if code is None else case["code"] == code, case
    lines = [line for line in case["err"].splitlines() if line.strip()]
    assert lines, case
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, case["err"]
    for text_part in expected:
        assert text_part in errors[0], (text_part, errors[0])
    return errors[0]
