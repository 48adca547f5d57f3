"""launch/torchrun.sh on this machine, with the real training on 2 CPU processes: SIGUSR1 to the
script reaches the workers through torchrun, training saves and stops, the script exits 0; the
same command again resumes from that checkpoint and completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch_helpers import (ITERATION, REPO, TINY, assert_interrupted_then_resumed, losses,
                            saved, tiny_data)  # noqa: F401 - tiny_data is a fixture

pytestmark = pytest.mark.slow

SCRIPT = REPO / "launch" / "torchrun.sh"


def test_torchrun_sh_signal_saves_and_rerun_resumes(tiny_data, tmp_path):
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    argv = ["bash", str(SCRIPT), str(TINY), *tiny_data, f"run.dir={run_dir}",
            "train.train_iters=10", "checkpoint.interval=100"]
    env = dict(os.environ, NPROC_PER_NODE="2", PYTHON=sys.executable, LOG_DIR=str(log_dir),
               ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    first_out = tmp_path / "first.txt"
    with open(first_out, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while not ITERATION.search(first_out.read_text()):
            assert proc.poll() is None and time.time() < deadline, first_out.read_text()[-3000:]
            time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)  # to the script, as a user or a scheduler would
        assert proc.wait(timeout=300) == 0, first_out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    first = first_out.read_text()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == "SIGUSR1", status
    assert status["iteration"] == saved(first)[-1] < 10
    assert "training state interrupted" in first
    # the console also went to the log file
    logs = list(log_dir.glob("torchrun-*.log"))
    assert len(logs) == 1 and "received SIGUSR1" in logs[0].read_text()

    second = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert_interrupted_then_resumed(first, second.stdout)
    status = json.loads((run_dir / "status.json").read_text())
    assert status == {**status, "state": "completed", "iteration": 10}, status
    series = losses(first) + losses(second.stdout)
    assert series[-1][0] == 10 and series[-1][1] < series[0][1] - 0.3, series
