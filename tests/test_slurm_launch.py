"""End to end under a real SLURM (slurmctld + slurmd + munged on this machine, see
slurm_cluster.py): the tiny config, 2 CPU processes, the real training.

- srun launcher, submitted with plain ``sbatch``: the job's own time limit sends SIGUSR1
  (``--signal=USR1@60``), training checkpoints and stops, the batch script requeues the job, the
  second start resumes from that checkpoint; a user's ``scancel`` then ends it without requeue.
- torchrun launcher, submitted with ``submit.sh``: ``scancel --signal=USR1`` mid-run (what
  SLURM does at the warning time), requeue, resume, run to the end, job COMPLETED.
"""

from __future__ import annotations

import json
import time

import pytest

from launch_helpers import (ITERATION, REPO, TINY, assert_interrupted_then_resumed, job_env,
                            losses, read, saved, starts, tiny_data,  # noqa: F401 - a fixture
                            wait_for_text)
from slurm_cluster import slurm_cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
SUBMIT = REPO / "launch" / "slurm" / "submit.sh"
def assert_requeued_and_resumed(first: str, second: str) -> int:
    assert "state interrupted" in first and "requeueing job" in first, first[-3000:]
    return assert_interrupted_then_resumed(first, second)


def test_time_limit_signal_checkpoints_requeues_resumes(slurm_cluster, tiny_data, tmp_path):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    run_dir = tmp_path / "run"
    job = slurm_cluster.sbatch(
        ["sbatch", "--job-name=ztt-limit", "--nodes=1", "--ntasks-per-node=2", "--time=10",
         "--signal=USR1@60", f"--output={log_dir}/%x-%j.out", str(SBATCH), str(TINY),
         *tiny_data, f"run.dir={run_dir}", "train.train_iters=100000",
         "checkpoint.interval=100000"],
        env=job_env(ZTT_ROOT=str(REPO)), cwd=str(tmp_path))
    log = log_dir / f"ztt-limit-{job}.out"
    wait_for_text(slurm_cluster, job, log, ITERATION.pattern, 300, "training iterations")
    # Bring the time limit close, the way a long job gets there: SLURM itself sends SIGUSR1
    # once fewer than 60 s are left (it checks about every 30 s).
    info = slurm_cluster.job(job)
    elapsed = sum(int(x) * 60 ** i for i, x in enumerate(reversed(info["RunTime"].split(":"))))
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed // 60 + 2}"])
    slurm_cluster.wait_for(job, lambda j: j["JobState"] == "PENDING" and j["Restarts"] == "1",
                           200, "requeue after the time-limit signal")
    text = read(log)
    assert "training exited with code 0, state interrupted" in text, text[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == "SIGUSR1", status

    slurm_cluster.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"])
    slurm_cluster.release_requeued(job)
    wait_for_text(slurm_cluster, job, log, r"^resumed from checkpoint[^\0]*^iteration ", 300,
                  "iterations after the resume")
    by_start = starts(read(log))
    first = losses(by_start[0])
    assert first[-1][1] < first[0][1] - 0.5, first  # the first start trained: a falling loss
    interrupted = assert_requeued_and_resumed(by_start[0], by_start[1])
    assert (run_dir / "checkpoints" / "latest").exists()
    assert status["iteration"] == interrupted

    # A user's scancel ends the job for good: no requeue.
    slurm_cluster.run(["scancel", job])
    slurm_cluster.wait_for_end(job, 120)
    time.sleep(3)
    info = slurm_cluster.job(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", info


def test_submit_torchrun_preempted_requeued_and_completed(slurm_cluster, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job = slurm_cluster.sbatch(
        ["bash", str(SUBMIT), str(TINY), *tiny_data, f"run.dir={run_dir}",
         "train.train_iters=16", "checkpoint.interval=8"],
        env=job_env(NODES="1", GPUS_PER_NODE="0", PROCS_PER_NODE="2", TIME_LIMIT="10",
                    LAUNCHER="torchrun", JOB_NAME="ztt-tr", LOG_DIR=str(tmp_path / "logs")),
        cwd=str(tmp_path))
    log = tmp_path / "logs" / f"ztt-tr-{job}.out"
    wait_for_text(slurm_cluster, job, log, ITERATION.pattern, 300, "training iterations")
    # SLURM's warning signal, now: to the job's steps (torchrun and its workers), not the script
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    slurm_cluster.wait_for(job, lambda j: j["JobState"] == "PENDING" and j["Restarts"] == "1",
                           200, "requeue after SIGUSR1")
    slurm_cluster.release_requeued(job)
    info = slurm_cluster.wait_for_end(job, 300)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{info}\n--- job log:\n{text[-3000:]}\n{slurm_cluster.logs()}")
    by_start = starts(text)
    assert sorted(by_start) == [0, 1], text[-3000:]
    assert "--rdzv-backend=c10d" in by_start[0]  # really the torchrun launcher
    assert_requeued_and_resumed(by_start[0], by_start[1])

    # the whole job: a falling loss, the final checkpoint, a completed status
    series = losses(text)
    assert series[-1][0] == 16
    assert series[-1][1] < series[0][1] - 0.5, series
    assert 16 in saved(text)
    assert "training exited with code 0, state completed" in by_start[1]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["iteration"] == 16, status
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest).is_dir()
