"""Bad multi-node input gets a one-line error naming the setting, where the launch happens:
launch/slurm/launch_plan.py (the batch step, on the job's first node) and the training's
runtime (every rank, also when a user runs srun by hand). No SLURM needed: the allocation is
faked with SLURM's variables and an srun that only records."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import tiny_data  # noqa: F401 - a fixture
from megatron_ztt.parallel import runtime

REPO = Path(__file__).resolve().parent.parent
PLAN = REPO / "launch" / "slurm" / "launch_plan.py"
TINY = REPO / "launch" / "configs" / "tiny.yaml"
HERE = socket.gethostname().split(".")[0]
UNRESOLVABLE = "ztt-no-such-node.invalid"  # .invalid never resolves (RFC 2606)


@pytest.fixture
def fake_allocation(tmp_path, tiny_data):
    """(run, env): run launch_plan.py launch inside a faked 2-node allocation; srun records.
    The run itself is a valid one (launch_plan checks it before the network)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\necho srun-ran > {tmp_path / 'srun.txt'}\n")
    (bin_dir / "srun").chmod(0o755)
    config = tmp_path / "run.yaml"
    config.write_text("run:\n  dir: runs/x\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("MASTER_PORT", "LAUNCHER", "PROCS_PER_NODE")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="777", SLURM_JOB_NUM_NODES="2",
               SLURM_TASKS_PER_NODE="2(x2)")

    def run(hosts, **extra):
        result = subprocess.run(
            [sys.executable, PLAN, "launch", "--hosts", hosts, "--python", "python", str(config),
             *tiny_data, f"run.dir={tmp_path / 'run'}"],
            capture_output=True, text=True, env={**env, **extra}, timeout=60)
        result.srun_ran = (tmp_path / "srun.txt").exists()
        return result

    return run


def assert_named_error(result, *words):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch_plan: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not result.srun_ran


def test_first_node_that_does_not_resolve_is_refused(fake_allocation):
    result = fake_allocation(f"{UNRESOLVABLE},{HERE}")
    assert_named_error(result, f"MASTER_ADDR={UNRESOLVABLE}", "SLURM_JOB_NODELIST",
                       "does not resolve", "DNS or /etc/hosts")


def test_rendezvous_port_already_taken_on_the_first_node_is_refused(fake_allocation):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = fake_allocation(f"{HERE},other-node", MASTER_PORT=str(port))
    assert_named_error(result, f"MASTER_PORT={port}", "already in use", "free port")
    # the same port, free again: the plan goes ahead and execs srun
    result = fake_allocation(f"{HERE},other-node", MASTER_PORT=str(port))
    assert result.returncode == 0 and result.srun_ran, result.stderr


@pytest.mark.parametrize("extra,words", [
    ({"SLURM_TASKS_PER_NODE": "2,1"}, ["SLURM_TASKS_PER_NODE='2,1'", "--ntasks-per-node"]),
    ({"SLURM_TASKS_PER_NODE": "2,1", "PROCS_PER_NODE": "2"}, ["SLURM_TASKS_PER_NODE='2,1'"]),
    ({"PROCS_PER_NODE": "4"}, ["PROCS_PER_NODE=4", "2 task(s) per node",
                               "--ntasks-per-node=4"]),
], ids=["uneven-allocation", "uneven-with-procs-per-node", "more-procs-than-tasks"])
def test_mismatched_task_counts_per_node_are_refused(fake_allocation, extra, words):
    assert_named_error(fake_allocation(f"localhost,{HERE}x", **extra), *words)


def test_runtime_refuses_an_unresolvable_master_addr():
    launch = runtime.LaunchEnv(1, 2, 0, UNRESOLVABLE, 29500, "slurm")
    with pytest.raises(runtime.LaunchError, match=f"MASTER_ADDR={UNRESOLVABLE} does not resolve"):
        runtime.check_rendezvous(launch)


def test_runtime_refuses_a_taken_port_on_rank_0_only_under_srun():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(runtime.LaunchError, match=f"MASTER_PORT={port} is already in use"):
            runtime.check_rendezvous(runtime.LaunchEnv(0, 2, 0, "127.0.0.1", port, "slurm"))
        # other ranks connect to it; under torchrun the agent itself holds the port
        runtime.check_rendezvous(runtime.LaunchEnv(1, 2, 0, "127.0.0.1", port, "slurm"))
        runtime.check_rendezvous(runtime.LaunchEnv(0, 2, 0, "127.0.0.1", port, "torchrun"))


def test_training_started_by_srun_on_a_taken_port_exits_with_one_line(tmp_path):
    """What a user sees from the training itself (srun started by hand, SLURM's variables)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
        env.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", MASTER_PORT=str(port),
                   PYTHONPATH=str(REPO))
        result = subprocess.run(
            [sys.executable, "-m", "megatron_ztt.train", "--config", str(TINY),
             f"run.dir={tmp_path / 'run'}", f"data.blend=[{tmp_path / 'none'}]",
             f"data.tokenizer={tmp_path / 'none.model'}"],
            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: MASTER_PORT={port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_runtime_refuses_a_loopback_host_name_for_gloo_across_nodes():
    two_nodes = runtime.LaunchEnv(0, 2, 0, "n1", 29500, "slurm")
    env = {"SLURM_STEP_NUM_NODES": "2"}
    with pytest.raises(runtime.LaunchError, match="host name localhost resolves to 127.0.0.1.*"
                                                  "GLOO_SOCKET_IFNAME"):
        runtime.check_gloo_address(two_nodes, env, hostname="localhost")
    with pytest.raises(runtime.LaunchError, match=f"host name {UNRESOLVABLE} resolves to nothing"):
        runtime.check_gloo_address(two_nodes, env, hostname=UNRESOLVABLE)
    # fine: an interface named, one node only, or torchrun's workers all on one node
    runtime.check_gloo_address(two_nodes, {**env, "GLOO_SOCKET_IFNAME": "eth0"}, "localhost")
    runtime.check_gloo_address(two_nodes, {"SLURM_STEP_NUM_NODES": "1"}, "localhost")
    runtime.check_gloo_address(runtime.LaunchEnv(0, 4, 0, "h", 1, "torchrun"),
                               {"LOCAL_WORLD_SIZE": "4"}, "localhost")
    with pytest.raises(runtime.LaunchError, match="GLOO_SOCKET_IFNAME"):
        runtime.check_gloo_address(runtime.LaunchEnv(0, 4, 0, "h", 1, "torchrun"),
                                   {"LOCAL_WORLD_SIZE": "2"}, "localhost")
