"""A real, single-node SLURM for the launcher tests: munged, slurmctld and slurmd on localhost.

    from slurm_cluster import slurm_cluster  # the pytest fixture (module scope)

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch(["--ntasks=2", "job.sh"])
        slurm_cluster.wait_for_end(job)

Debian's ``slurm-wlm`` (slurmctld, slurmd, slurm-client) and ``munge`` are installed with
apt-get when missing and the tests run as root (as on CI); ``ZTT_SLURM_NO_INSTALL=1`` forbids
that. Everything else lives in a temporary directory: a fresh munge key and socket, a
slurm.conf on free ports (``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``: no
cgroups needed), state, spool and logs. Client commands find it through ``SLURM_CONF`` (see
:attr:`LocalSlurm.env`). When SLURM cannot be installed or started, the fixture skips with the
concrete reason and the daemons' log tails; it never reports a pass without a cluster.
Teardown cancels every job, waits for their processes to end, and stops the three daemons it
started (by pid).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from megatron_ztt.parallel.runtime import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
COMMANDS = ["munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue",
            "scancel", "sinfo"]
# Debian installs the daemons in /usr/sbin, which a non-login PATH may lack.
SBIN = ["/usr/sbin", "/sbin", "/usr/local/sbin"]


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why."""


def _path_with_sbin(path: str) -> str:
    parts = path.split(os.pathsep) if path else []
    return os.pathsep.join(parts + [p for p in SBIN if p not in parts])


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=_path_with_sbin(os.environ.get("PATH", "")))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_installed() -> None:
    missing = [c for c in COMMANDS if _which(c) is None]
    if not missing:
        return
    if os.environ.get("ZTT_SLURM_NO_INSTALL") == "1":
        raise SlurmUnavailable(f"SLURM commands missing ({', '.join(missing)}) and "
                               f"ZTT_SLURM_NO_INSTALL=1 forbids installing them")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM commands missing ({', '.join(missing)}); installing "
                               f"{' '.join(PACKAGES)} needs root")
    apt = _which("apt-get")
    if apt is None:
        raise SlurmUnavailable(f"SLURM commands missing ({', '.join(missing)}) and no apt-get "
                               f"to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:  # stale package lists on a fresh machine: update once, retry
        update = subprocess.run([apt, "update", "-q"], env=env, capture_output=True, text=True,
                                timeout=900)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise SlurmUnavailable(
                f"apt-get install {' '.join(PACKAGES)} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-800:]} "
                f"[apt-get update: exit {update.returncode}]")
    missing = [c for c in COMMANDS if _which(c) is None]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but still missing "
                               f"{', '.join(missing)}")


def slurm_conf(root: Path, munge_socket: Path, controller: str, ctld_port: int, slurmd_port: int,
               nodes: Dict[str, str], hardware: str, per_node: bool = False) -> str:
    """slurm.conf for a test cluster: ``controller`` is ``host(address)``, ``nodes`` maps node
    names to addresses, all with ``hardware`` (from ``slurmd -C``). No cgroups
    (proctrack/linuxproc, task/none), no accounting; with ``per_node`` every slurmd has its own
    spool, pid and log file (``%n``), as several slurmd on one machine need."""
    node = "-%n" if per_node else ""
    node_lines = "".join(f"NodeName={name} NodeAddr={address} {hardware} State=UNKNOWN\n"
                         for name, address in nodes.items())
    return f"""\
ClusterName=ztttest
SlurmctldHost={controller}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / f'spool{node}'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / f'slurmd{node}.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / f'slurmd{node}.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=30
InactiveLimit=0
MailProg=/bin/true
{node_lines}PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: Dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf),
                        PATH=_path_with_sbin(os.environ.get("PATH", "")))
        for name in list(self.env):  # a job around the test run must not leak into ours
            if name.startswith("SLURM_") and name != "SLURM_CONF":
                del self.env[name]

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs (tests run as uid "
                                   f"{os.geteuid()})")
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        self._wait_idle(timeout=60)

    def _spawn(self, name: str, argv: List[str]) -> None:
        out = open(self.root / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        out.close()

    def _start_munge(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(mode=0o700)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--key-file={key}",
            f"--socket={self.munge_socket}", f"--pid-file={munge_dir / 'munged.pid'}",
            f"--seed-file={munge_dir / 'munged.seed'}", f"--log-file={munge_dir / 'munged.log'}"])
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.procs["munged"].poll() is not None:
                break
            cred = subprocess.run([_which("munge"), "-n", "-S", str(self.munge_socket)],
                                  capture_output=True)
            if cred.returncode == 0:
                check = subprocess.run([_which("unmunge"), "-S", str(self.munge_socket)],
                                       input=cred.stdout, capture_output=True)
                if check.returncode == 0:
                    return
            time.sleep(0.3)
        raise SlurmUnavailable(f"munged did not start: {_tail(self.root / 'munged.out')}")

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        probe = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True)
        node_line = next((line for line in probe.stdout.splitlines()
                          if line.startswith("NodeName=")), None)
        if probe.returncode != 0 or node_line is None:
            raise SlurmUnavailable(f"slurmd -C failed: {probe.stderr.strip()[-500:]}")
        # slurmd -C: "NodeName=h CPUs=2 Boards=1 ... RealMemory=24105"; keep the hardware,
        # pin the address to loopback so that no name resolution is needed.
        hardware = " ".join(f for f in node_line.split()[1:] if not f.startswith("UpTime"))
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        self.conf.write_text(slurm_conf(self.root, self.munge_socket, f"{host}(127.0.0.1)",
                                        free_port(), free_port(), {host: "127.0.0.1"},
                                        hardware))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(
                        f"{name} exited with code {proc.returncode}: "
                        f"{_tail(self.root / f'{name}.out')}")
            result = self.run(["sinfo", "-h", "-o", "%T"], check=False)
            last = (result.stdout + result.stderr).strip()
            if result.returncode == 0 and last == "idle":
                return
            time.sleep(0.5)
        raise SlurmUnavailable(
            f"the node did not become idle in {timeout:.0f}s (sinfo: {last!r}); slurmctld: "
            f"{_tail(self.root / 'slurmctld.out')}; slurmd: {_tail(self.root / 'slurmd.out')}")

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user=root", "--full"], check=False)
            deadline = time.time() + 60
            while time.time() < deadline:
                queue = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    # ------------------------------------------------------------------ client side
    def run(self, argv: List[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        return result

    def sbatch(self, argv: List[str], env: Optional[Dict[str, str]] = None,
               cwd: Optional[str] = None) -> str:
        """Submit; returns the job id. argv may start with a submit wrapper instead of sbatch."""
        command = argv if argv[0] != "sbatch" else ["sbatch", "--parsable", *argv[1:]]
        result = self.run(command, env={**self.env, **(env or {})}, cwd=cwd)
        return result.stdout.strip().splitlines()[-1].split(";")[0].split()[-1]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        text = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        fields = {}
        for item in text.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_for(self, job_id: str, predicate, timeout: float, what: str) -> Dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if predicate(info):
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id}: {what} not reached in {timeout:.0f}s; last "
                                   f"JobState={info.get('JobState')} Reason={info.get('Reason')}")
            time.sleep(1)

    def wait_for_end(self, job_id: str, timeout: float) -> Dict[str, str]:
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                 "BOOT_FAIL", "DEADLINE", "PREEMPTED")
        return self.wait_for(job_id, lambda j: j.get("JobState") in ended, timeout, "the end")

    def release_requeued(self, job_id: str) -> None:
        """Start a requeued job now instead of after SLURM's ~2 minute pause (Reason=BeginTime).

        That pause is there for a reason, so wait for what it waits for: the previous run's step
        daemons must be gone (slurmd's clean-up of the old run kills every step of the job id,
        a new run's included), and slurmd refuses a credential issued in the same second as the
        old one was revoked.
        """
        self.wait_for(job_id, lambda j: j["JobState"] == "PENDING", 120, "PENDING after requeue")
        deadline = time.time() + 120
        while self.step_daemons(job_id):
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id}: old step daemons still alive: "
                                   f"{self.step_daemons(job_id)}")
            time.sleep(0.5)
        time.sleep(2)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    @staticmethod
    def step_daemons(job_id: str) -> List[str]:
        """Process titles of this job's slurmstepd processes ("slurmstepd: [12.batch]")."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"slurmstepd: [{job_id}."):
                found.append(title.strip())
        return found

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{_tail(self.root / f'{n}.log', 30)}"
                         for n in ("slurmctld", "slurmd"))


def running_cluster(cluster_class, prefix: str, what: str):
    """Fixture body: start a cluster in a fresh folder, yield it, stop it and remove the
    folder, also when starting fails; skip with the reason when SLURM cannot run here."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = cluster_class(root)
    try:
        ensure_installed()
        cluster.start()
    except SlurmUnavailable as reason:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no {what}: {reason}")
    except BaseException:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    yield from running_cluster(LocalSlurm, "ztt-slurm-", "local SLURM")
