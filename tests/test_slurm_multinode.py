"""Training across nodes under a real multi-node SLURM (slurm_multinode.py: one network
namespace per node, 192.0.2.0/24 links that exist only for the test), submitted through
launch/slurm/train.sbatch exactly as a user does. The tiny config, a few iterations, CPU/gloo.

- elastic requeue, 1 task per node: data parallel with ZeRO-1 across 2 nodes; SIGUSR1
  (SLURM's warning before the time limit) -> checkpoint -> requeue, resized to 1 node with
  ``scontrol update`` -> resume in that layout (DP=1) -> SIGUSR1 -> requeue, resized to 2
  other nodes (the first start's second node is now the first: rank 0 and
  rendezvous host) -> complete; every step's loss equals an uninterrupted run's (the data
  position kept); the checkpoints written from one and two hosts are read by the next start,
  ``ztt eval`` and ``ztt export-hf``.
- 2 nodes x 2 tasks: TP=2 inside each node, the second dimension across the nodes (LAYOUTS:
  today PP=2 with DeepSpeed's pipeline; add the circular pipeline there when it exists).
- bad multi-node input (uneven tasks per node, rendezvous port taken) fails the job with the
  named error.

Each test checks where the ranks really ran: the network namespace of every training process
(``NetnsSlurm.tasks_by_node``), not only what the job log says.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from launch_helpers import (ITERATION, REPO, RESUMED, TINY, job_env, losses, read, saved,
                            starts, tiny_data,  # noqa: F401 - a fixture
                            wait_for_text)
from slurm_multinode import IFNAME, two_node_cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
N1, N2, N3 = "ztt-n1", "ztt-n2", "ztt-n3"
# the layouts of the 2 x 2 job: TP=2 inside a node (ranks 0,1 and 2,3), the rest across nodes
LAYOUTS = [
    pytest.param(["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"],
                 id="tp2-pp2-deepspeed-pipeline"),
]


def submit(cluster, tmp_path, name, nodes, per_node, overrides, **env):
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    # --time well above the starts: train.sbatch's --signal=USR1@300 would otherwise interrupt
    # a start that a loaded machine makes slow (one took over 5 minutes at load average 19)
    job = cluster.sbatch(
        ["sbatch", f"--job-name={name}", f"--nodes={nodes}", f"--ntasks-per-node={per_node}",
         "--time=30", f"--output={log_dir}/%x-%j.out", str(SBATCH), str(TINY), *overrides],
        env=job_env(ZTT_ROOT=str(REPO), **env), cwd=str(tmp_path))
    return job, log_dir / f"{name}-{job}.out"


def placement(cluster, job, log, expected_ranks: int, timeout: float = 300):
    """{node: ranks} of the job's training processes, once all of them are running."""
    deadline = time.time() + timeout
    seen = {}
    while time.time() < deadline:
        seen = cluster.tasks_by_node(job)
        if sum(len(r) for r in seen.values()) == expected_ranks:
            return seen
        if cluster.job(job).get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING"):
            break
        time.sleep(0.3)
    raise AssertionError(f"job {job}: training processes by node {seen}, expected "
                         f"{expected_ranks}\n--- job log:\n{read(log)[-3000:]}\n{cluster.logs()}")


def assert_completed(cluster, job, log, timeout=400):
    info = cluster.wait_for_end(job, timeout)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{info}\n--- job log:\n{text[-4000:]}\n{cluster.logs()}")
    return text


def ztt(*argv, timeout=300):
    result = subprocess.run([sys.executable, "-m", "megatron_ztt.cli", *map(str, argv)],
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **job_env(), "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def reference_run(tiny_data, run_dir, overrides):
    """The same run on one process, uninterrupted, outside SLURM (started at once: it runs
    while the job waits for its allocations)."""
    log = open(run_dir.parent / "reference.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_ztt.train", "--config", str(TINY), *tiny_data,
         f"run.dir={run_dir}", *overrides], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **job_env(), "PYTHONPATH": str(REPO)}, cwd=str(REPO))


def interrupt(cluster, job, log, start):
    """SIGUSR1 (SLURM's warning before the time limit) to start ``start``, wait for the
    requeue. Sent once the start has built its model (its handlers are installed by then) and
    before the first steps are done, so that it stops after a step or a few however busy the
    machine is."""
    wait_for_text(cluster, job, log, rf"start {start} at [\s\S]*?^MFU peak", 600,
                  f"the model built in start {start}")
    cluster.run(["scancel", "--signal=USR1", job])
    cluster.wait_for(job, lambda j: j["JobState"] == "PENDING" and j["Restarts"] == str(start + 1),
                     200, f"requeue {start + 1} after SIGUSR1")


def resumed_where_stopped(before: str, after: str) -> int:
    """A start stopped by SIGUSR1 with a checkpoint; the next resumed from it with the next
    step (a console line every step). Returns the iteration."""
    stopped = saved(before)[-1]
    assert re.search(rf"received SIGUSR1: checkpoint saved at iteration {stopped}\b", before), \
        before[-3000:]
    resumed = RESUMED.search(after)
    assert resumed and int(resumed.group(1)) == stopped, after[-3000:]
    assert losses(after)[0][0] == stopped + 1, after[-3000:]
    return stopped


def checkpoint_meta(run_dir, iteration):
    return json.loads((run_dir / "checkpoints" / f"iter_{iteration:07d}" / "ztt_meta.json")
                      .read_text())


def resize(cluster, job, nodes):
    """What a user does to a requeued job waiting in the queue: give it another node count."""
    cluster.run(["scontrol", "update", f"JobId={job}", f"NumNodes={nodes}", f"NumTasks={nodes}"])


def test_requeued_from_two_nodes_to_one_and_back_to_two_other_nodes_then_eval_and_export(
        two_node_cluster, tiny_data, tmp_path):
    """Elastic requeue through train.sbatch: start 0 on n1+n2 (DP=2, ZeRO-1 across the
    nodes); SIGUSR1 -> checkpoint -> requeue, resized to one node while only n3 is free ->
    start 1 on n3 alone (DP=1) resumes there; SIGUSR1 again -> requeue, resized to two nodes
    -> start 2 on n2+n3 (n2, the first start's second node, is now rank 0 and the rendezvous
    host) resumes and completes. The data position and the losses follow an uninterrupted
    run; ztt eval and ztt export-hf read the final checkpoint. (One job for all of it: a job
    start costs more than everything else here.)"""
    cluster = two_node_cluster
    run_dir = tmp_path / "run"
    iters, batch = 20, 8
    overrides = ["parallel.zero_stage=1", f"train.train_iters={iters}",
                 f"train.global_batch_size={batch}", "train.warmup_iters=2",
                 "checkpoint.interval=1000", "checkpoint.keep_last=5", "logging.interval=1"]
    reference = reference_run(tiny_data, tmp_path / "reference", overrides)
    cluster.set_node_state(N3, "DRAIN")  # the first start on n1+n2
    try:
        job, log = submit(cluster, tmp_path, "ztt-dp", 2, 1, [
            *tiny_data, f"run.dir={run_dir}", *overrides])
        # one rank per node, each in its own network namespace: the rendezvous crossed the link
        assert placement(cluster, job, log, 2) == {N1: [0], N2: [1]}
        interrupt(cluster, job, log, 0)
        # the restart: one node, and only n3 is free (n1 and n2 drained)
        resize(cluster, job, 1)
        cluster.set_node_state(N1, "DRAIN")
        cluster.set_node_state(N2, "DRAIN")
        cluster.set_node_state(N3, "RESUME")
        cluster.release_requeued(job)
        assert placement(cluster, job, log, 1) == {N3: [0]}
        interrupt(cluster, job, log, 1)
        # two nodes again, n2 and n3: n2, the first start's second node, is now the first
        resize(cluster, job, 2)
        cluster.set_node_state(N2, "RESUME")
        cluster.release_requeued(job)
        assert placement(cluster, job, log, 2) == {N2: [0], N3: [1]}
        text = assert_completed(cluster, job, log)
        assert reference.wait(timeout=600) == 0, read(tmp_path / "reference.log")[-3000:]
    finally:
        for node in (N1, N2, N3):
            cluster.set_node_state(node, "RESUME", check=False)
        if reference.poll() is None:  # the test failed before it ended
            reference.kill()
            reference.wait(timeout=30)
    by_start = starts(text)
    assert sorted(by_start) == [0, 1, 2], text[-3000:]
    for start, hosts, world in ((0, f"{N1},{N2}", 2), (1, N3, 1), (2, f"{N2},{N3}", 2)):
        assert f"on {hosts}; run dir" in by_start[start], by_start[start][-3000:]
        assert f"{world} node(s) x 1 process(es) = world size {world}" in by_start[start], \
            by_start[start][-3000:]
        if start < 2:
            assert "state interrupted" in by_start[start] and "requeueing job" in by_start[start]
    assert f"rendezvous endpoint {N1}:" in by_start[0]
    assert f"rendezvous endpoint {N2}:" in by_start[2]
    first = resumed_where_stopped(by_start[0], by_start[1])
    second = resumed_where_stopped(by_start[1], by_start[2])
    assert first < second < iters, (first, second)
    # the layout change, in one line per resume
    dp2, dp1 = "TP=1 x PP=1 x DP=2, ZeRO-1", "TP=1 x PP=1 x DP=1, ZeRO-1"
    assert f"in another layout: saved as {dp2}, now {dp1} " in by_start[1], by_start[1][-3000:]
    assert f"in another layout: saved as {dp1}, now {dp2} " in by_start[2], by_start[2][-3000:]
    # the data position: each checkpoint counts the samples of the steps before it, and every
    # step after a resume is the next one, with the uninterrupted run's loss (its batch)
    for iteration in (first, second, iters):
        meta = checkpoint_meta(run_dir, iteration)
        assert meta["consumed_train_samples"] == iteration * batch, (iteration, meta)
    assert checkpoint_meta(run_dir, second)["layout"]["data"] == 1
    series = losses(text)
    assert [i for i, _ in series] == list(range(1, iters + 1)), series
    expected = dict(losses(read(tmp_path / "reference.log")))
    assert sorted(expected) == list(range(1, iters + 1)), expected
    for iteration, loss in series:  # the reshard tests' tolerance
        assert abs(loss - expected[iteration]) <= 2e-3 * expected[iteration], (
            iteration, loss, expected[iteration])
    assert series[-1][1] < series[0][1] - 0.5, series
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["iteration"] == iters, status
    # checkpoint format 3 (no DeepSpeed engine files): the slice's optimizer state is written
    # once, every rank wrote its RNG state (n1 + n2, n3, then n2 + n3)
    for iteration, ranks in ((first, 2), (second, 1), (iters, 2)):
        tag = run_dir / "checkpoints" / f"iter_{iteration:07d}"
        files = sorted(p.name for p in tag.rglob("*.pt"))
        assert files == ["optim_stage00_tp00.pt",
                         *[f"rank_state_{r:05d}.pt" for r in range(ranks)],
                         "ztt_stage00_tp00.pt"], (tag, files)

    result = ztt("eval", "--checkpoint", run_dir / "checkpoints", "--iters", "1",
                 "--exit-threshold", "0.02", "--output", tmp_path / "eval.json")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert {r["exit_threshold"] for r in report["results"]} == {None, 0.02}, result.stdout
    assert all(r["loss"] < series[0][1] for r in report["results"]), report
    ztt("export-hf", "--checkpoint", run_dir / "checkpoints", "--output", tmp_path / "hf",
        "--dtype", "fp32")
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_nodes_two_tasks_tensor_parallel_inside_a_node(two_node_cluster, tiny_data, tmp_path,
                                                           layout):
    run_dir = tmp_path / "run"
    # gloo told the interface the nodes share (the same name on every node here), as on a
    # cluster with several interfaces; the DP test above relies on host-name resolution
    job, log = submit(two_node_cluster, tmp_path, "ztt-tp", 2, 2, [
        *tiny_data, f"run.dir={run_dir}", *layout, "train.train_iters=6",
        "train.global_batch_size=8", "train.warmup_iters=2", "checkpoint.interval=6"], GLOO_SOCKET_IFNAME=IFNAME)
    # block distribution: node 0 holds ranks 0,1 (a tensor-parallel pair), node 1 ranks 2,3
    assert placement(two_node_cluster, job, log, 4) == {N1: [0, 1], N2: [2, 3]}
    text = assert_completed(two_node_cluster, job, log)
    assert "2 node(s) x 2 process(es) = world size 4" in text
    series = losses(text)
    assert series[-1][0] == 6 and series[-1][1] < series[0][1], series
    assert 6 in saved(text)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["iteration"] == 6, status


def test_bad_multi_node_input_fails_the_job_with_a_named_error(two_node_cluster, tiny_data,
                                                              tmp_path):
    """What a user sees in the job log, from a real two-node allocation (no training starts).
    The run itself is valid: launch_plan checks it (data included) before the allocation."""
    cluster = two_node_cluster
    overrides = [f"run.dir={tmp_path / 'run'}", *tiny_data]
    # mismatched task counts per node: 3 tasks on 2 nodes -> SLURM_TASKS_PER_NODE=2,1
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    job = cluster.sbatch(
        ["sbatch", "--job-name=ztt-uneven", "--nodes=2", "--ntasks=3", "--time=5",
         f"--output={log_dir}/%x-%j.out", str(SBATCH), str(TINY), *overrides],
        env=job_env(ZTT_ROOT=str(REPO)), cwd=str(tmp_path))
    info = cluster.wait_for_end(job, 120)
    text = read(log_dir / f"ztt-uneven-{job}.out")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, text[-2000:])
    assert "launch_plan: error: the allocation does not have the same number of tasks on every " \
           "node (SLURM_TASKS_PER_NODE='2,1')" in text, text[-2000:]

    # the rendezvous port already taken on the first node (by a process of ours there)
    port = 29555
    holder = cluster.popen_on(N1, [sys.executable, "-c",
                                   "import socket, sys, time; s = socket.socket(); "
                                   f"s.bind(('', {port})); s.listen(); print('ready', flush=True);"
                                   " time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        job, log = submit(cluster, tmp_path, "ztt-port", 2, 1, overrides,
                          MASTER_PORT=str(port))
        info = cluster.wait_for_end(job, 120)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    text = read(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, text[-2000:])
    assert f"launch_plan: error: MASTER_PORT={port} is already in use on {N1}, the first node" \
           in text, text[-2000:]
