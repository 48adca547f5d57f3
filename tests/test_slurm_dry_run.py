"""The launch plan without SLURM: what every node of a 4 x 8 job would run, and whether the
ranks, world size and rendezvous endpoint it prints agree with what the training's runtime
(runtime.read_launch_env) makes of each process's environment."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from launch_helpers import tiny_data  # noqa: F401 - a fixture

from megatron_ztt.parallel import runtime

REPO = Path(__file__).resolve().parent.parent
PLAN = REPO / "launch" / "slurm" / "launch_plan.py"
SUBMIT = REPO / "launch" / "slurm" / "submit.sh"
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
sys.path.insert(0, str(PLAN.parent))
import launch_plan  # noqa: E402

HOSTS = [f"gpu{n:03d}" for n in range(1, 5)]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  dir: runs/x\n")
    return str(path)


def run(argv, env=None, **kwargs):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SLURM_") and k not in ("MASTER_PORT", "LAUNCHER")}
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60, **kwargs)


def dry_run(config, *extra, launcher="srun", overrides=("train.lr=1e-3",)):
    result = run([sys.executable, PLAN, "dry-run", "--nodes", "4", "--procs-per-node", "8",
                  "--nodelist", "gpu[001-004]", "--launcher", launcher, "--python", "python",
                  *extra, config, *overrides])
    assert result.returncode == 0, result.stderr
    return result.stdout


def header(out):
    world = int(re.search(r"world size (\d+)", out).group(1))
    endpoint = re.search(r"rendezvous endpoint (\S+):(\d+)", out)
    return world, endpoint.group(1), int(endpoint.group(2))


def split_env(words):
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def test_srun_plan_4x8_ranks_world_and_endpoint_are_consistent(config):
    out = dry_run(config, "--job-id", "4242")
    world, addr, port = header(out)
    assert (world, addr, port) == (32, "gpu001", 20000 + 4242)

    srun_line = next(l for l in out.splitlines() if "srun " in l and not l.startswith("["))
    job_env, words = split_env(shlex.split(srun_line))
    assert job_env == {"MASTER_ADDR": "gpu001", "MASTER_PORT": str(port)}
    for flag in ("--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--distribution=block"):
        assert flag in words

    tasks = [l for l in out.splitlines() if l.startswith("[")]
    assert len(tasks) == 32
    seen = Counter()
    per_host = defaultdict(list)
    commands = set()
    for line in tasks:
        host = line[1:line.index("]")]
        env, argv = split_env(shlex.split(line[line.index("]") + 1:]))
        commands.add(tuple(argv))
        node = HOSTS.index(host)
        assert int(env["SLURM_NODEID"]) == node
        # the training's own reading of this process's environment
        launch = runtime.read_launch_env(env)
        assert launch.source == "slurm"
        assert launch.world_size == world
        assert (launch.master_addr, launch.master_port) == (addr, port)
        assert launch.rank == node * 8 + launch.local_rank  # block distribution
        seen[launch.rank] += 1
        per_host[host].append(launch.local_rank)
    assert sorted(seen) == list(range(32)) and set(seen.values()) == {1}
    assert {h: sorted(r) for h, r in per_host.items()} == {h: list(range(8)) for h in HOSTS}
    # every process runs the same training command, config and overrides passed through
    assert commands == {("python", "-m", "megatron_ztt.train", "--config", config,
                         "train.lr=1e-3")}
    assert words[-6:] == list(next(iter(commands)))


def test_torchrun_plan_4x8_one_agent_per_node_same_rendezvous(config):
    out = dry_run(config, "--master-port", "29555", launcher="torchrun")
    world, addr, port = header(out)
    assert (world, addr, port) == (32, "gpu001", 29555)
    agents = [l for l in out.splitlines() if l.startswith("[") and "torch.distributed.run" in l]
    assert len(agents) == 4
    argvs = {tuple(shlex.split(l[l.index("]") + 1:])) for l in agents}
    assert len(argvs) == 1, "every node must run the identical torchrun command"
    argv = next(iter(argvs))
    for flag in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=gpu001:29555"):
        assert flag in argv
    assert "SIGUSR1" in next(a for a in argv if a.startswith("--signals-to-handle="))
    assert argv[argv.index("-m", 3):] == ("-m", "megatron_ztt.train", "--config", config,
                                          "train.lr=1e-3")
    workers = [dict(kv.split("=") for kv in l.split("worker", 1)[1].split())
               for l in out.splitlines() if "  worker " in l]
    assert len(workers) == 32
    assert sorted(int(w["RANK"]) for w in workers) == list(range(32))
    assert {w["WORLD_SIZE"] for w in workers} == {"32"}
    for w in workers:
        launch = runtime.read_launch_env(w)
        assert launch.source == "torchrun"
        assert launch.rank == int(w["GROUP_RANK"]) * 8 + launch.local_rank


def test_torchrun_group_ranks_follow_sorted_host_names(config):
    """c10d orders agents by host name, not by SLURM's node order; the plan says so."""
    plan = launch_plan.build_plan(["nodeb", "nodea"], 2, config, [], launcher="torchrun")
    assert [[t.rank for t in n.tasks] for n in plan.nodes] == [[2, 3], [0, 1]]
    plan = launch_plan.build_plan(["nodeb", "nodea"], 2, config, [], launcher="srun")
    assert [[t.rank for t in n.tasks] for n in plan.nodes] == [[0, 1], [2, 3]]
    assert plan.master_addr == "nodeb"  # the first host of the allocation


def test_submit_dry_run_prints_sbatch_and_node_commands(config):
    env = {"NODES": "4", "GPUS_PER_NODE": "8", "ACCOUNT": "proj", "PARTITION": "gpu",
           "TIME_LIMIT": "12:00:00", "SIGNAL_SECONDS": "600", "NODELIST": "gpu[001-004]",
           "PYTHON": "python"}
    result = run(["bash", SUBMIT, "--dry-run", config, "model.num_cycles=4"], env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    sbatch = shlex.split(next(l for l in lines if l.startswith("sbatch ")))
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--account=proj",
                 "--partition=gpu", "--time=12:00:00", "--signal=USR1@600", "--requeue",
                 "--open-mode=append", "--output=logs/%x-%j.out"):
        assert flag in sbatch
    assert sbatch[-3:] == [str(SBATCH), config, "model.num_cycles=4"]
    world, addr, _ = header(result.stdout)
    assert (world, addr) == (32, "gpu001")
    tasks = [l for l in lines if l.startswith("[gpu")]
    assert len(tasks) == 32
    # the job resumes from the run's latest checkpoint on every start
    assert all(l.endswith("model.num_cycles=4 train.load=auto") for l in tasks)


def test_expand_nodelist():
    assert launch_plan.expand_nodelist("gpu[001-003,7],login") == [
        "gpu001", "gpu002", "gpu003", "gpu7", "login"]
    assert launch_plan.expand_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    for bad in ("", "gpu[1-", "gpu[3-1]", "gpu[a-b]", "a,,b"):
        with pytest.raises(launch_plan.PlanError):
            launch_plan.expand_nodelist(bad)


def test_tasks_per_node_from_slurm_variables():
    assert launch_plan.tasks_per_node({"SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert launch_plan.tasks_per_node({"SLURM_TASKS_PER_NODE": "8(x4)"}) == 8
    with pytest.raises(launch_plan.PlanError, match="same number of tasks"):
        launch_plan.tasks_per_node({"SLURM_TASKS_PER_NODE": "2,1"})


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0", "--procs-per-node", "8"], "--nodes must be a positive integer"),
    (["--nodes", "3", "--procs-per-node", "8", "--nodelist", "gpu[1-2]"],
     "--nodes 3 but the node list names 2 hosts"),
    (["--nodes", "2", "--procs-per-node", "0"], "processes per node must be a positive"),
    (["--nodes", "2", "--procs-per-node", "8", "--master-port", "70000"], "at most 65535"),
])
def test_dry_run_rejects_bad_shapes(config, argv, message):
    result = run([sys.executable, PLAN, "dry-run", *argv, config])
    assert result.returncode == 2
    assert message in result.stderr


def test_scripts_fail_loudly_on_bad_input(config, tmp_path):
    missing = tmp_path / "nope.yaml"
    result = run([sys.executable, PLAN, "dry-run", "--nodes", "1", "--procs-per-node", "1",
                  missing])
    assert result.returncode == 2 and f"config file not found: {missing}" in result.stderr
    result = run([sys.executable, PLAN, "dry-run", "--nodes", "1", "--procs-per-node", "1",
                  config, "train.lr"])
    assert result.returncode == 2 and "section.key=value" in result.stderr
    result = run(["bash", SUBMIT, "--dry-run", config], env={"NODES": "four"})
    assert result.returncode == 2 and "NODES must be a positive integer" in result.stderr
    result = run(["bash", SUBMIT, "--dry-run", config], env={"GPUS_PER_NODE": "0"})
    assert result.returncode == 2 and "set it when GPUS_PER_NODE=0" in result.stderr
    result = run(["bash", SUBMIT, missing])
    assert result.returncode == 2 and "config file not found" in result.stderr
    result = run(["bash", SBATCH, config])
    assert result.returncode == 2 and "submit me with sbatch" in result.stderr
    result = run(["bash", SBATCH, missing], env={"SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": REPO})
    assert result.returncode == 2 and "config file not found" in result.stderr
    result = run(["bash", TORCHRUN_SH, "--dry-run", config], env={"NPROC_PER_NODE": "-1"})
    assert result.returncode == 2 and "NPROC_PER_NODE must be a positive integer" in result.stderr


def test_run_dir_comes_from_the_training_config_loader(tmp_path):
    """train.sbatch finds status.json through run.dir as the training resolves it."""
    config = tmp_path / "c.yaml"
    config.write_text("run:\n  dir: from_file\ndata:\n  blend: [x]\n  tokenizer: t.model\n")
    result = run([sys.executable, PLAN, "run-dir", config, "run.dir=over/ridden"],
                 env={"PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "over" / "ridden")
    result = run([sys.executable, PLAN, "run-dir", config, "train.no_such_key=1"],
                 env={"PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert result.returncode == 2 and "no_such_key" in result.stderr


def test_torchrun_sh_dry_run(config):
    result = run(["bash", TORCHRUN_SH, "--dry-run", config, "train.lr=1e-3"],
                 env={"NPROC_PER_NODE": "2", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for flag in ("--standalone", "--nnodes=1", "--nproc-per-node=2"):
        assert flag in argv
    assert argv[-6:] == ["-m", "megatron_ztt.train", "--config", config, "train.lr=1e-3",
                         "train.load=auto"]


def test_launch_execs_the_planned_srun_with_the_job_environment(config, tiny_data, tmp_path):
    """Inside an allocation (faked: SLURM's variables and an srun that records what it got).
    The run (config, layout for 8 processes, data) is checked before srun starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.txt"
    (bin_dir / "srun").write_text(f'#!/bin/bash\n{{ printf "%s\\n" "$@"; echo ---; env; }} > {record}\n')
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "777",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_CPUS_PER_TASK": "3",
           "RANK": "5", "LOCAL_RANK": "1"}  # leftovers of a torchrun shell must not leak
    result = run([sys.executable, PLAN, "launch", "--hosts", "localhost,n2", "--python", "python",
                  config, "train.lr=1e-3", *tiny_data, "train.global_batch_size=32"], env=env)
    assert result.returncode == 0, result.stderr
    printed = next(l for l in result.stdout.splitlines() if "srun " in l and not l.startswith("["))
    job_env, planned = split_env(shlex.split(printed))
    argv, _, environ = record.read_text().partition("---\n")
    assert argv.splitlines() == planned[1:]
    assert "--ntasks=8" in planned and "--cpus-per-task=3" in planned
    got = dict(line.split("=", 1) for line in environ.splitlines() if "=" in line)
    assert {k: got[k] for k in job_env} == job_env == {
        "MASTER_ADDR": "localhost", "MASTER_PORT": str(20000 + 777)}
    assert "RANK" not in got and "LOCAL_RANK" not in got

    env["MASTER_PORT"] = "nope"
    result = run([sys.executable, PLAN, "launch", "--hosts", "n1,n2", config], env=env)
    assert result.returncode == 2 and "master port must be a positive integer" in result.stderr
    result = run([sys.executable, PLAN, "launch", "--hosts", "n1", config],
                 env={**env, "MASTER_PORT": "1234"})
    assert result.returncode == 2 and "SLURM_JOB_NUM_NODES=2" in result.stderr
