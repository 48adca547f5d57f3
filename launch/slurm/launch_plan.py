#!/usr/bin/env python3
"""The commands every node of a training job runs: one source for train.sbatch and the dry run.

    # what would 4 nodes x 8 GPUs run? (no SLURM needed)
    python launch/slurm/launch_plan.py dry-run --nodes 4 --procs-per-node 8 \\
        --nodelist 'gpu[001-004]' launch/configs/tiny.yaml train.lr=1e-3

    # inside a SLURM allocation (train.sbatch does this): print the plan, then exec srun
    python launch/slurm/launch_plan.py launch --hosts gpu001,gpu002 CONFIG [key=value ...]

Two launchers (``--launcher``, or the LAUNCHER variable in train.sbatch):

``srun`` (default)
    srun starts one task per GPU (per process on CPU) on every node, each a plain
    ``python -m megatron_ztt.train``. The training's runtime (``read_launch_env``) takes rank,
    world size and local rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and the
    rendezvous from MASTER_ADDR (first host of the allocation) and MASTER_PORT (from the job
    id), which this helper exports. Block distribution: node i holds ranks i*P .. i*P+P-1.
    SLURM's signals (``--signal=USR1@T``) reach every training process directly.

``torchrun``
    srun starts one ``torchrun`` per node; the agents meet at a c10d rendezvous on the first
    host and start P workers each. torchrun forwards SIGUSR1 to its workers only because it is
    started with ``--signals-to-handle`` including SIGUSR1, and it waits ``--shutdown-timeout``
    seconds for them to save their checkpoint. The c10d rendezvous numbers the nodes itself
    (in sorted order of the agents' host names), not by SLURM_NODEID.

The dry run uses only the standard library, so it works on any machine; ``run-dir`` reads
the config with the project's own loader.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

TRAIN_MODULE = "megatron_ztt.train"
DEFAULT_PORT = 29500
LAUNCHERS = ("srun", "torchrun")
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# torchrun's variables must not leak from the submitting shell into the job: the runtime
# prefers RANK/WORLD_SIZE over SLURM's numbering.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


class PlanError(ValueError):
    pass


# --------------------------------------------------------------------------- host lists
def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list, e.g. ``gpu[001-003,7],login`` -> gpu001 gpu002 gpu003 gpu7
    login. Several bracket groups in one name expand as a product. (In a job, train.sbatch asks
    ``scontrol show hostnames`` instead; this is for the dry run.)"""
    if not nodelist or not nodelist.strip():
        raise PlanError("empty node list")
    names: List[str] = []
    depth, start = 0, 0
    for i, char in enumerate(nodelist + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise PlanError(f"unbalanced ']' in node list {nodelist!r}")
        elif char == "," and depth == 0:
            item = nodelist[start:i].strip()
            if not item:
                raise PlanError(f"empty host name in node list {nodelist!r}")
            names.extend(_expand_one(item, nodelist))
            start = i + 1
    if depth:
        raise PlanError(f"unbalanced '[' in node list {nodelist!r}")
    return names


def _expand_one(item: str, whole: str) -> List[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        if "[" in item or "]" in item:
            raise PlanError(f"bad host expression {item!r} in node list {whole!r}")
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    values: List[str] = []
    for part in match.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values.extend(f"{n:0{width}d}" for n in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise PlanError(f"bad range {part!r} in node list {whole!r}")
    return [name for v in values for name in _expand_one(head + v + tail, whole)]


def tasks_per_node(environ: Dict[str, str]) -> int:
    """Processes per node from the allocation: SLURM_NTASKS_PER_NODE, else an even
    SLURM_TASKS_PER_NODE such as ``8(x4)``."""
    if environ.get("SLURM_NTASKS_PER_NODE"):
        return _positive(environ["SLURM_NTASKS_PER_NODE"], "SLURM_NTASKS_PER_NODE")
    spec = environ.get("SLURM_TASKS_PER_NODE", "")
    counts = set()
    for part in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x\d+\))?", part)
        if not match:
            raise PlanError(f"cannot read SLURM_TASKS_PER_NODE={spec!r}")
        counts.add(int(match.group(1)))
    if len(counts) != 1:
        raise PlanError(
            f"the allocation does not have the same number of tasks on every node "
            f"(SLURM_TASKS_PER_NODE={spec!r}); submit with --ntasks-per-node=<processes per "
            f"node> instead of --ntasks")
    return counts.pop()


def _positive(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise PlanError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise PlanError(f"{name} must be a positive integer, got {value!r}")
    return number


def choose_port(master_port, job_id: Optional[str]):
    """(port, how it was chosen). Without MASTER_PORT, a port per job so that two jobs sharing
    a node do not collide: 20000 + job id % 20000."""
    if master_port is not None:
        port = _positive(master_port, "master port")
        if port > 65535:
            raise PlanError(f"master port must be at most 65535, got {port}")
        return port, "given"
    if job_id and str(job_id).isdigit():
        return 20000 + int(job_id) % 20000, f"20000 + job id {job_id} % 20000"
    return DEFAULT_PORT, "default"


def check_allocation(environ: Dict[str, str], hosts: List[str], procs_per_node: int,
                     launcher: str) -> None:
    """The allocation SLURM made must fit the plan: the same number of tasks on every node and,
    for the srun launcher, at least PROCS_PER_NODE of them (srun cannot start more)."""
    if not (environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")):
        return
    if launcher == "torchrun" and environ.get("PROCS_PER_NODE"):
        return  # one agent per node; its workers are not SLURM tasks
    allocated = tasks_per_node(environ)  # names SLURM_TASKS_PER_NODE when the nodes differ
    if launcher == "srun" and procs_per_node > allocated:
        raise PlanError(
            f"PROCS_PER_NODE={procs_per_node} but the allocation has {allocated} task(s) per "
            f"node (SLURM_TASKS_PER_NODE={environ.get('SLURM_TASKS_PER_NODE', '?')}): submit "
            f"with --ntasks-per-node={procs_per_node} or lower PROCS_PER_NODE")


def check_rendezvous(master_addr: str, port: int) -> None:
    """On the batch node (the job's first node, where the rendezvous listens): its name must
    resolve, and the port must be free."""
    here = socket.gethostname()
    try:
        socket.getaddrinfo(master_addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise PlanError(
            f"MASTER_ADDR={master_addr} (the first host of SLURM_JOB_NODELIST) does not resolve "
            f"on {here} ({error.strerror}): every node must resolve the node names to addresses "
            f"the other nodes reach; fix the cluster's DNS or /etc/hosts") from None
    if here.split(".")[0] != master_addr.split(".")[0]:
        return  # not on the first node (a test or a copy of the script): nothing to probe
    with socket.socket() as probe:  # as the rendezvous will: SO_REUSEADDR, every address
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise PlanError(
                f"MASTER_PORT={port} is already in use on {here}, the first node, where the "
                f"rendezvous listens: set MASTER_PORT to a free port (unset, it is 20000 + job "
                f"id % 20000)") from None


# --------------------------------------------------------------------------- the plan
@dataclass
class Task:
    rank: int
    local_rank: int
    env: Dict[str, str]  # the variables this process starts with that place it in the job


@dataclass
class NodePlan:
    node_rank: int
    host: str
    argv: List[str]  # the command started on this node (per task for srun, once for torchrun)
    tasks: List[Task] = field(default_factory=list)


@dataclass
class Plan:
    launcher: str
    nodes: List[NodePlan]
    world_size: int
    procs_per_node: int
    master_addr: str
    master_port: int
    job_env: Dict[str, str]  # exported by the batch step before srun
    srun_argv: List[str]  # what the batch step runs on the first node
    port_source: str = ""

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"


def build_plan(hosts: List[str], procs_per_node: int, config: str, overrides: List[str],
               launcher: str = "srun", master_port=None,
               job_id: Optional[str] = None, python: str = "python",
               cpus_per_task=None,
               shutdown_timeout: int = 600) -> Plan:
    if launcher not in LAUNCHERS:
        raise PlanError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if not hosts:
        raise PlanError("no hosts")
    if len(set(hosts)) != len(hosts):
        raise PlanError(f"a host appears twice in {hosts}")
    procs_per_node = _positive(procs_per_node, "processes per node")
    if cpus_per_task is not None:
        cpus_per_task = _positive(cpus_per_task, "cpus per task")
    port, port_source = choose_port(master_port, job_id)
    num_nodes, world = len(hosts), len(hosts) * procs_per_node
    master = hosts[0]
    train = [python, "-m", TRAIN_MODULE, "--config", config, *overrides]
    job_env = {"MASTER_ADDR": master, "MASTER_PORT": str(port)}
    nodes: List[NodePlan] = []

    if launcher == "srun":
        srun = ["srun", f"--nodes={num_nodes}", f"--ntasks={world}",
                f"--ntasks-per-node={procs_per_node}", "--distribution=block",
                "--kill-on-bad-exit=1"]
        if cpus_per_task:
            srun.append(f"--cpus-per-task={cpus_per_task}")
        srun += train
        for node_rank, host in enumerate(hosts):
            node = NodePlan(node_rank, host, train)
            for local in range(procs_per_node):
                rank = node_rank * procs_per_node + local
                node.tasks.append(Task(rank, local, {
                    "SLURM_NODEID": str(node_rank), "SLURM_PROCID": str(rank),
                    "SLURM_LOCALID": str(local), "SLURM_NTASKS": str(world), **job_env}))
            nodes.append(node)
    else:
        agent = [python, "-m", "torch.distributed.run", f"--nnodes={num_nodes}",
                 f"--nproc-per-node={procs_per_node}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={master}:{port}", f"--rdzv-id={job_id or 'ztt'}",
                 "--max-restarts=0", f"--signals-to-handle={TORCHRUN_SIGNALS}",
                 f"--shutdown-timeout={shutdown_timeout}", *train[1:]]
        srun = ["srun", f"--nodes={num_nodes}", f"--ntasks={num_nodes}", "--ntasks-per-node=1",
                "--kill-on-bad-exit=1", f"--cpus-per-task={procs_per_node * (cpus_per_task or 1)}",
                *agent]
        # c10d numbers the agents in sorted order of their host names
        group_rank = {host: i for i, host in enumerate(sorted(hosts))}
        for node_rank, host in enumerate(hosts):
            node = NodePlan(node_rank, host, agent)
            g = group_rank[host]
            for local in range(procs_per_node):
                rank = g * procs_per_node + local
                node.tasks.append(Task(rank, local, {
                    "RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world),
                    "GROUP_RANK": str(g), "LOCAL_WORLD_SIZE": str(procs_per_node)}))
            nodes.append(node)
    return Plan(launcher, nodes, world, procs_per_node, master, port, job_env, srun, port_source)


def describe(plan: Plan) -> str:
    """The plan as text: the batch step's srun line, then every node's command and ranks."""
    q = shlex.join
    lines = [
        f"# launcher {plan.launcher}: {len(plan.nodes)} node(s) x {plan.procs_per_node} "
        f"process(es) = world size {plan.world_size}",
        f"# rendezvous endpoint {plan.endpoint} (first host; port {plan.port_source})"
        + ("" if plan.launcher == "srun" else
           "; c10d numbers the nodes in sorted order of their host names"),
        "# batch step, on the first node:",
        q([f"{k}={v}" for k, v in plan.job_env.items()] + plan.srun_argv),
    ]
    for node in plan.nodes:
        ranks = [t.rank for t in node.tasks]
        lines.append(f"# node {node.node_rank} {node.host}: ranks {min(ranks)}-{max(ranks)} "
                     f"of {plan.world_size}")
        if plan.launcher == "srun":
            for task in node.tasks:
                lines.append(f"[{node.host}] " + q([f"{k}={v}" for k, v in task.env.items()]
                                                    + node.argv))
        else:
            lines.append(f"[{node.host}] " + q(node.argv))
            for task in node.tasks:
                lines.append(f"[{node.host}]   worker " + " ".join(
                    f"{k}={v}" for k, v in task.env.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- run dir, status
def resolve_run_dir(config: str, overrides: List[str]) -> str:
    """``run.dir`` as the training will see it: the project's own config loader (defaults,
    file, overrides, validation), made absolute against the current directory."""
    from megatron_ztt.model.config import ConfigError
    from megatron_ztt.config import load_config

    try:
        return os.path.abspath(load_config(config, overrides).run.dir)
    except ConfigError as error:
        raise PlanError(f"{config}: {error}") from None


def check_run(config: str, overrides: List[str], world_size: int) -> str:
    """Everything about the run that can fail on every rank at once, checked here once
    before any rank starts (so the launcher shows one line, not one traceback per rank):
    the config, the layout for ``world_size`` processes, the data files, and what the run
    starts from (training.resume_checks). Returns run.dir, absolute."""
    from megatron_ztt.checkpoint import CheckpointError, complete_tags, load_run_config, resolve
    from megatron_ztt.data.datasets import DataError, parse_blend, validate_indexed_dataset
    from megatron_ztt.model.config import ConfigError
    from megatron_ztt.training.resume_checks import check_start

    try:
        run = load_run_config(config, overrides)
        run.gradient_accumulation_steps(world_size)
        for blend in (run.data.blend, run.data.valid_blend, run.data.test_blend):
            for prefix in parse_blend(blend)[0] if blend else []:
                validate_indexed_dataset(prefix)
        load = run.train.load
        if load == "auto":
            tags = complete_tags(run.checkpoint_dir)
            point = (run.checkpoint_dir, tags[-1]) if tags else None
        else:
            point = resolve(load, note=False) if load else None
        check_start(run, point)
    except (ConfigError, CheckpointError, DataError) as error:
        message = str(error)
        raise PlanError(message if "processes" in message
                        else f"{message} (checked for {world_size} processes)") from None
    return os.path.abspath(run.run.dir)


def run_state(run_dir: str) -> str:
    """state from <run.dir>/status.json: completed, interrupted, ... or missing/unreadable."""
    path = os.path.join(run_dir, "status.json")
    if not os.path.exists(path):
        return "missing"
    try:
        with open(path) as f:
            return str(json.load(f)["state"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"


# --------------------------------------------------------------------------- CLI
def _config_and_overrides(args) -> List[str]:
    if not os.path.isfile(args.config):
        raise PlanError(f"config file not found: {args.config}")
    bad = [o for o in args.overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise PlanError(f"overrides must look like section.key=value, got {bad}")
    return list(args.overrides)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--launcher", default=os.environ.get("LAUNCHER", "srun"),
                        choices=LAUNCHERS)
    parser.add_argument("--master-port", type=int, default=None,
                        help="default: MASTER_PORT, else 20000 + job id %% 20000, else 29500")
    parser.add_argument("--python", default=os.environ.get("PYTHON", "python"))
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--shutdown-timeout", type=int,
                        default=int(os.environ.get("SHUTDOWN_TIMEOUT", 600)),
                        help="torchrun: seconds its workers get to checkpoint after a signal")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    dry = sub.add_parser("dry-run", help="print every node's commands, without SLURM")
    dry.add_argument("--nodes", required=True, type=int)
    dry.add_argument("--procs-per-node", "--gpus-per-node", dest="procs_per_node", required=True,
                     type=int, help="GPUs per node (processes per node on CPU)")
    dry.add_argument("--nodelist", default=None,
                     help="SLURM host list, e.g. 'gpu[001-004]' (default node[001-N])")
    dry.add_argument("--job-id", default="12345")
    _common(dry)
    launch = sub.add_parser("launch", help="inside an allocation: print the plan, exec srun")
    launch.add_argument("--hosts", required=True, help="comma-separated, in SLURM's order")
    _common(launch)
    run_dir = sub.add_parser("run-dir", help="print run.dir of CONFIG + overrides (validates)")
    run_dir.add_argument("--world-size", type=int, default=None,
                         help="also check the layout, the data and the start for this many "
                              "processes (check_run)")
    run_dir.add_argument("config")
    run_dir.add_argument("overrides", nargs="*")
    status = sub.add_parser("status", help="print the state in RUN_DIR/status.json")
    status.add_argument("run_dir")
    args = parser.parse_args(argv)
    if args.action == "status":
        print(run_state(args.run_dir))
        return 0
    try:
        overrides = _config_and_overrides(args)
        if args.action == "run-dir":
            if args.world_size is not None:
                print(check_run(args.config, overrides,
                                _positive(args.world_size, "--world-size")))
            else:
                print(resolve_run_dir(args.config, overrides))
            return 0
        port = args.master_port
        if args.action == "dry-run":
            nodes = _positive(args.nodes, "--nodes")
            hosts = expand_nodelist(args.nodelist or f"node[{1:03d}-{nodes:03d}]")
            if len(hosts) != nodes:
                raise PlanError(f"--nodes {nodes} but the node list names {len(hosts)} hosts")
            procs, job_id, cpus = args.procs_per_node, args.job_id, args.cpus_per_task
        else:
            hosts = [h for h in args.hosts.split(",") if h]
            env = os.environ
            procs = (_positive(env["PROCS_PER_NODE"], "PROCS_PER_NODE")
                     if env.get("PROCS_PER_NODE") else tasks_per_node(env))
            job_id = env.get("SLURM_JOB_ID")
            cpus = args.cpus_per_task or env.get("SLURM_CPUS_PER_TASK") or None
            if env.get("SLURM_JOB_NUM_NODES") and int(env["SLURM_JOB_NUM_NODES"]) != len(hosts):
                raise PlanError(f"{len(hosts)} hosts given but SLURM_JOB_NUM_NODES="
                                f"{env['SLURM_JOB_NUM_NODES']}")
            if port is None:
                port = env.get("MASTER_PORT") or None
            check_allocation(env, hosts, _positive(procs, "PROCS_PER_NODE"), args.launcher)
        plan = build_plan(hosts, procs, args.config, overrides, launcher=args.launcher,
                          master_port=port, job_id=job_id, python=args.python, cpus_per_task=cpus,
                          shutdown_timeout=args.shutdown_timeout)
        if args.action == "launch":
            check_run(args.config, overrides, len(hosts) * procs)
            check_rendezvous(plan.master_addr, plan.master_port)
    except PlanError as error:
        print(f"launch_plan: error: {error}", file=sys.stderr)
        return 2
    print(describe(plan), flush=True)
    if args.action == "dry-run":
        return 0
    env = dict(os.environ)
    for name in TORCHRUN_VARIABLES:
        env.pop(name, None)
    env.update(plan.job_env)
    os.execvpe(plan.srun_argv[0], plan.srun_argv, env)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
