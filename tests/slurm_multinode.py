"""A real multi-node SLURM on one machine: every node is a Linux network namespace.

    from slurm_multinode import two_node_cluster  # the pytest fixture (module scope)

    def test_x(two_node_cluster):
        job = two_node_cluster.sbatch(["sbatch", "--nodes=2", "job.sh"])

Layout (everything made here, nothing else touched):

- one namespace per node (``ztt-n1``, ``ztt-n2``, and a spare ``ztt-n3`` that a requeued job
  can land on) and one for the controller; the controller's namespace holds a bridge with
  192.0.2.10/24 (TEST-NET-1, the documentation range), each node a veth ``ztt0`` with
  192.0.2.11, .12, .13 plugged into it. The root namespace gets no interface or address:
  the links live and die with the namespaces.
- ``/etc/netns/<namespace>/hosts`` names every node and the controller. Each slurmd (and
  slurmctld) starts under ``unshare -m -u`` with that file bind-mounted on /etc/hosts and its
  own host name, then ``nsenter --net`` into its namespace; its jobs inherit all three, so in
  a job ``hostname`` says ``ztt-n2`` and ``ztt-n1`` resolves to 192.0.2.11. (``ip netns exec``
  would remount /sys, after which slurmd finds no cgroup file system.)
- munged runs in the root namespace (its socket is a file, reachable from every namespace);
  SLURM's client commands run in the controller's namespace (:meth:`NetnsSlurm.run`).

Needs root, ``ip``/``unshare``/``nsenter`` and SLURM (installed like the single-node fixture,
see slurm_cluster.py). When any of it is missing or does not work, the fixture skips with the
concrete reason; it never passes a test without a cluster. Teardown, also after a failure or
a failed start: cancel every job, stop the daemons it started (by pid), delete the namespaces
(and with them the links) and the /etc/netns directories it made.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

from slurm_cluster import (LocalSlurm, SlurmUnavailable, _tail, _which, running_cluster,
                           slurm_conf)

SUBNET = "192.0.2"  # TEST-NET-1 (RFC 5737): never routed, never anyone's real address
CONTROLLER = "ztt-ctl"
NODES = ("ztt-n1", "ztt-n2", "ztt-n3")
IFNAME = "ztt0"  # the node's interface, the same name on every node (GLOO_SOCKET_IFNAME)


class NetnsSlurm(LocalSlurm):
    """slurmctld in one namespace, one slurmd per node namespace; see the module docstring."""

    def __init__(self, root: Path, nodes=NODES):
        super().__init__(root)
        self.nodes = list(nodes)
        tag = f"ztt{os.getpid() % 100000}"  # namespace names are global: one set per run
        self.netns = {CONTROLLER: f"{tag}-ctl",
                      **{node: f"{tag}-{node.split('-')[-1]}" for node in self.nodes}}
        self.address = {CONTROLLER: f"{SUBNET}.10",
                        **{node: f"{SUBNET}.{11 + i}" for i, node in enumerate(self.nodes)}}
        self.made_netns: List[str] = []

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable(f"network namespaces and slurmd need root (uid {os.geteuid()})")
        for tool in ("ip", "unshare", "nsenter", "mount"):
            if _which(tool) is None:
                raise SlurmUnavailable(f"{tool} not found (iproute2 / util-linux)")
        self._make_network()
        self._start_munge()
        (self.root / "state").mkdir()
        self.conf.write_text(slurm_conf(
            self.root, self.munge_socket, f"{CONTROLLER}({self.address[CONTROLLER]})", 6817,
            6818, {node: self.address[node] for node in self.nodes}, self._hardware(),
            per_node=True))
        self._spawn_in_node("slurmctld", CONTROLLER, [_which("slurmctld"), "-D", "-f",
                                                      str(self.conf)])
        for node in self.nodes:
            (self.root / f"spool-{node}").mkdir()
            self._spawn_in_node(f"slurmd-{node}", node, [_which("slurmd"), "-D", "-N", node,
                                                         "-f", str(self.conf)])
        self._wait_idle(timeout=90)

    def _ip(self, *argv: str) -> None:
        result = subprocess.run([_which("ip"), *argv], capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            raise SlurmUnavailable(f"ip {' '.join(argv)} failed: {result.stderr.strip()}")

    def _make_network(self) -> None:
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{address} {name}\n" for name, address in self.address.items())
        for name, netns in self.netns.items():
            if Path("/run/netns", netns).exists():
                raise SlurmUnavailable(f"network namespace {netns} exists already (another "
                                       f"run?); not touching it")
            self._ip("netns", "add", netns)
            self.made_netns.append(netns)
            etc = Path("/etc/netns", netns)
            etc.mkdir(parents=True)
            (etc / "hosts").write_text(hosts)
            self._ip("-n", netns, "link", "set", "lo", "up")
        ctl = self.netns[CONTROLLER]
        self._ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        self._ip("-n", ctl, "addr", "add", f"{self.address[CONTROLLER]}/24", "dev", "br0")
        self._ip("-n", ctl, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            # the pair is born in the controller's namespace, its peer moved into the node's
            self._ip("-n", ctl, "link", "add", f"veth{i}", "type", "veth", "peer", "name",
                     IFNAME, "netns", self.netns[node])
            self._ip("-n", ctl, "link", "set", f"veth{i}", "master", "br0", "up")
            self._ip("-n", self.netns[node], "addr", "add", f"{self.address[node]}/24", "dev",
                     IFNAME)
            self._ip("-n", self.netns[node], "link", "set", IFNAME, "up")

    def _hardware(self) -> str:
        probe = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True)
        line = next((l for l in probe.stdout.splitlines() if l.startswith("NodeName=")), None)
        if probe.returncode != 0 or line is None:
            raise SlurmUnavailable(f"slurmd -C failed: {probe.stderr.strip()[-500:]}")
        return " ".join(f for f in line.split()[1:] if not f.startswith("UpTime"))

    def _spawn_in_node(self, name: str, node: str, argv: List[str]) -> None:
        """Own host name and /etc/hosts (a private mount namespace), then the node's network.
        unshare and nsenter exec (no fork), so the pid is the daemon's."""
        netns = self.netns[node]
        hosts = Path("/etc/netns", netns, "hosts")
        script = (f"hostname {node} && mount --bind {hosts} /etc/hosts && "
                  f'exec {_which("nsenter")} --net=/run/netns/{netns} "$@"')
        self._spawn(name, [_which("unshare"), "-m", "-u", "--propagation", "private", "sh",
                           "-c", script, "sh", *argv])

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with code {proc.returncode}: "
                                           f"{_tail(self.root / f'{name}.out')}")
            result = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            last = (result.stdout + result.stderr).strip()
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            if result.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(
            f"the nodes did not become idle in {timeout:.0f}s (sinfo: {last!r}); slurmctld: "
            f"{_tail(self.root / 'slurmctld.log')}; slurmd: "
            f"{_tail(self.root / f'slurmd-{self.nodes[0]}.log')}")

    def stop(self) -> None:
        try:
            stop_order = ([f"slurmd-{n}" for n in self.nodes], ["slurmctld", "munged"])
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.run(["scancel", "--user=root", "--full"], check=False)
                deadline = time.time() + 60
                while time.time() < deadline:
                    queue = self.run(["squeue", "-h", "-o", "%i"], check=False)
                    if queue.returncode != 0 or not queue.stdout.strip():
                        break
                    time.sleep(0.5)
            for group in stop_order:
                for name in group:
                    proc = self.procs.get(name)
                    if proc is not None and proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                for name in group:
                    proc = self.procs.get(name)
                    if proc is None or proc.poll() is not None:
                        continue
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=10)
            self._kill_leftovers()
        finally:
            for netns in reversed(self.made_netns):  # deleting it deletes its links
                subprocess.run([_which("ip") or "ip", "netns", "del", netns],
                               capture_output=True, timeout=30)
                shutil.rmtree(Path("/etc/netns", netns), ignore_errors=True)
            self.made_netns.clear()

    def _kill_leftovers(self) -> None:
        """Anything still running inside one of our namespaces (a step daemon or a task that
        outlived its slurmd) is ours: kill it by pid before its namespace goes."""
        ours = {self.netns_inode(n) for n in self.made_netns}
        for pid in self.pids_in(ours):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ introspection
    @staticmethod
    def netns_inode(netns: str) -> int:
        return os.stat(f"/run/netns/{netns}").st_ino

    @staticmethod
    def pids_in(inodes) -> List[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.stat(entry / "ns" / "net").st_ino in inodes:
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def tasks_by_node(self, job_id: str, marker: str = "megatron_ztt.train") -> Dict[str, List[int]]:
        """{node: sorted SLURM_PROCIDs} of this job's running processes whose command line
        contains ``marker``, placed by the network namespace each process really lives in."""
        node_of = {self.netns_inode(self.netns[n]): n for n in self.nodes}
        placed: Dict[str, List[int]] = {}
        for pid in self.pids_in(set(node_of)):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                inode = os.stat(f"/proc/{pid}/ns/net").st_ino
            except OSError:
                continue
            env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
            if marker.encode() in cmdline and env.get("SLURM_JOB_ID") == job_id \
                    and "SLURM_PROCID" in env:
                placed.setdefault(node_of[inode], []).append(int(env["SLURM_PROCID"]))
        return {node: sorted(set(ranks)) for node, ranks in placed.items()}

    def set_node_state(self, node: str, state: str, check: bool = True) -> None:
        """DRAIN (no new jobs) or RESUME a node."""
        argv = ["scontrol", "update", f"NodeName={node}", f"State={state}"]
        self.run(argv + (["Reason=test"] if state == "DRAIN" else []), check=check)

    def popen_on(self, node: str, argv: List[str], **kwargs) -> subprocess.Popen:
        """A process of the test's own in a node's network namespace (stop it by its pid)."""
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.netns[node]}", *argv],
                                env=self.env, **kwargs)

    # ------------------------------------------------------------------ client side
    def run(self, argv: List[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A client command (sinfo, sbatch, a submit wrapper ...) in the controller's
        network namespace, where 192.0.2.10 is."""
        ns = ["nsenter", f"--net=/run/netns/{self.netns[CONTROLLER]}"]
        return super().run(ns + list(argv), check=check, **kwargs)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{_tail(self.root / f'{n}.log', 30)}"
                         for n in ("slurmctld", *(f"slurmd-{n}" for n in self.nodes)))


@pytest.fixture(scope="module")
def two_node_cluster():
    yield from running_cluster(NetnsSlurm, "ztt-slurm-nodes-", "multi-node SLURM in network "
                               "namespaces")
