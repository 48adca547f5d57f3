"""The one place that decides device and distributed backend.

CUDA + NCCL when a GPU is visible (and not disabled with ``ZTT_DEVICE=cpu``), otherwise
CPU + gloo. Everything else in the package asks this module instead of calling
``torch.cuda`` itself. It also initialises ``torch.distributed`` from torchrun's or SLURM's
environment, megatron-core's ``parallel_state`` and every random number generator.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_ztt.model.config import ConfigError


def use_cuda() -> bool:
    wanted = os.environ.get("ZTT_DEVICE", "auto").lower()
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"ZTT_DEVICE must be auto, cpu or cuda, got {wanted!r}")
    available = torch.cuda.is_available()
    if wanted == "cuda" and not available:
        raise RuntimeError("ZTT_DEVICE=cuda but no CUDA device is visible")
    return available and wanted != "cpu"


def backend() -> str:
    return "nccl" if use_cuda() else "gloo"


def configure_deepspeed_accelerator() -> None:
    """DeepSpeed picks its accelerator at import time; tell it before anything imports it."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda() else "cpu")


def current_device() -> torch.device:
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def supports_bf16() -> bool:
    return (not use_cuda()) or torch.cuda.is_bf16_supported()


def peak_memory_bytes() -> int:
    """Peak memory of this process on its device: CUDA allocator peak, else max RSS."""
    if use_cuda():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory() -> None:
    """Restart the CUDA allocator's peak count (CPU: max RSS cannot be reset; a no-op)."""
    if use_cuda():
        torch.cuda.reset_peak_memory_stats()


def cuda_visible() -> bool:
    """Whether a CUDA device is visible at all, whatever ``ZTT_DEVICE`` says."""
    return torch.cuda.is_available()


def device_name(device: torch.device | None = None) -> str:
    """The accelerator's name ("NVIDIA H200"), or the CPU's for a CPU device."""
    device = torch.device(device) if device is not None else current_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets: the MFU
# denominator of ``logging.peak_flops_per_device=auto``. Matched as substrings of the CUDA
# device name, first match wins (so the specific names come before the general ones).
KNOWN_BF16_PEAK_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def known_peak_flops(name: str) -> float | None:
    """The table's dense bf16 peak of an accelerator named ``name`` (None if unknown)."""
    for key, peak in KNOWN_BF16_PEAK_FLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def synchronize() -> None:
    if use_cuda():
        torch.cuda.synchronize()


def empty_cache() -> None:
    if use_cuda():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from torchrun's or SLURM's variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    # "node[01-04],other" -> "node01"; the full expansion is scontrol's job, but the first
    # host of a compressed list can be read without it.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous that is about to bind it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(environ: dict | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="slurm",
        )
    # One process on its own: a fresh port, never one left in the environment by a parent.
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


class LaunchError(ConfigError):
    """The job's rendezvous cannot work (MASTER_ADDR, MASTER_PORT); the message names it."""


def check_rendezvous(launch: LaunchEnv) -> None:
    """Before a multi-process start: MASTER_ADDR must resolve here, and under srun (where rank
    0 itself listens; torchrun's agent holds the port for its workers) MASTER_PORT must be free
    on rank 0's host. One line each, naming the variable, instead of a hang or a c10d trace."""
    if launch.world_size < 2 or launch.source == "single":
        return
    here = socket.gethostname()
    try:
        socket.getaddrinfo(launch.master_addr, launch.master_port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise LaunchError(
            f"MASTER_ADDR={launch.master_addr} does not resolve on {here} ({error.strerror}): "
            f"every node must resolve the rendezvous host (the job's first node); fix DNS or "
            f"/etc/hosts, or export MASTER_ADDR as that node's IP address") from None
    if launch.source == "slurm" and launch.rank == 0:
        with socket.socket() as probe:  # like the TCP store: SO_REUSEADDR, every address
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", launch.master_port))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                raise LaunchError(
                    f"MASTER_PORT={launch.master_port} is already in use on {here}, where rank 0 "
                    f"listens for the rendezvous: set MASTER_PORT to a free port (train.sbatch "
                    f"without MASTER_PORT uses 20000 + job id % 20000)") from None
    if not use_cuda():
        check_gloo_address(launch)


def _nodes_in_job(launch: LaunchEnv, env) -> int:
    if launch.source == "slurm":
        return int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    local = int(env.get("LOCAL_WORLD_SIZE") or launch.world_size)
    return -(-launch.world_size // max(local, 1))


def check_gloo_address(launch: LaunchEnv, environ: dict | None = None,
                       hostname: str | None = None) -> None:
    """Across nodes, gloo gives the others the address its own host name resolves to (unless
    GLOO_SOCKET_IFNAME names an interface); a name that resolves only to loopback (Debian's
    127.0.1.1) or not at all makes it fall back to 127.0.0.1, and the job hangs at the first
    collective. Refuse that before starting."""
    env = os.environ if environ is None else environ
    if env.get("GLOO_SOCKET_IFNAME") or _nodes_in_job(launch, env) < 2:
        return
    hostname = hostname or socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(hostname, None)}
    except socket.gaierror:
        addresses = set()
    if not any(not _is_loopback(a) for a in addresses):
        found = ", ".join(sorted(addresses)) or "nothing"
        raise LaunchError(
            f"this node's host name {hostname} resolves to {found}, so gloo would offer the "
            f"other nodes a loopback address: set GLOO_SOCKET_IFNAME to the interface the nodes "
            f"share (e.g. eth0, ib0), or make the host name resolve to that interface's address")


def _is_loopback(address: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address.split("%")[0]).is_loopback


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int = 1
    pipeline: int = 1

    def data(self, world_size: int) -> int:
        model = self.tensor * self.pipeline
        if world_size % model:
            raise ValueError(
                f"parallel layout impossible: world size {world_size} is not divisible by "
                f"tensor_parallel ({self.tensor}) x pipeline_parallel ({self.pipeline}) = {model}"
            )
        return world_size // model


def init_distributed(layout: ParallelLayout = ParallelLayout(), seed: int = 1234,
                     timeout_minutes: int = 30) -> LaunchEnv:
    """Start the process group and megatron-core's parallel state, then seed every RNG."""
    from megatron.core import parallel_state

    configure_deepspeed_accelerator()
    launch = read_launch_env()
    layout.data(launch.world_size)  # fail early, naming the layout
    # DeepSpeed reads LOCAL_RANK itself; under srun or as a single process nobody sets it.
    os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
    if use_cuda():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        check_rendezvous(launch)
        dist.init_process_group(
            backend=backend(),
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    # DeepSpeed's own communication layer (its pipeline module builds groups through it)
    # wraps the process group that now exists.
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=not use_cuda(),
    )
    seed_everything(seed)
    return launch


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class CpuRNGStatesTracker:
    """megatron-core's RNG tracker, over the CPU generator.

    megatron-core keeps named RNG streams (one per tensor-parallel rank, one shared by the
    data-parallel replicas) for dropout inside tensor-parallel regions and for weight init;
    its own tracker stores CUDA generator states only. This one has the same interface.
    """

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron-core's tensor-parallel RNG tracker.

    The default generators get the same seed on every rank (so that weights initialised on
    the CPU are identical across data-parallel replicas and tensor-parallel layouts); the
    tracker's model-parallel stream is offset by the tensor-parallel rank, as in Megatron-LM.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if use_cuda():
        tp_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = CpuRNGStatesTracker()
    tp_rank = (parallel_state.get_tensor_model_parallel_rank()
               if parallel_state.model_parallel_is_initialized() else 0)
    tracker.add(tp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(tp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * tp_rank)
    # megatron-core reads the tracker from this module global (get_cuda_rng_tracker()).
    tp_random._CUDA_RNG_STATE_TRACKER = tracker
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def rng_state() -> dict:
    """Every generator's state, for exact resume."""
    from megatron.core.tensor_parallel import random as tp_random

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tp_random.get_cuda_rng_tracker().get_states(),
    }
    if use_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as tp_random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tp_random.get_cuda_rng_tracker().set_states(state["tracker"])
    if use_cuda() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
