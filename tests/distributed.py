"""Run a function on N real processes with torch.distributed (gloo on CPU).

    results = run_distributed(worker, world_size=2, tensor_parallel=2, args=(...))

`worker(rank, *args)` runs after megatron-core's parallel state is initialised with the
requested layout; whatever it returns (picklable) comes back as results[rank]. An exception
on any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import io
import os
import traceback

import torch
import torch.multiprocessing as mp

from megatron_ztt.parallel.runtime import free_port


def _entry(rank, world_size, port, tensor_parallel, pipeline_parallel, seed, fn, args, queue):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ZTT_DEVICE="cpu", DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from megatron_ztt.parallel import runtime

    try:
        runtime.init_distributed(runtime.ParallelLayout(tensor_parallel, pipeline_parallel), seed=seed)
        result = fn(rank, *args)
        # serialised here: tensors shared through file descriptors die with this process
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent reports it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        runtime.shutdown_distributed()


def run_distributed(fn, world_size=1, tensor_parallel=1, pipeline_parallel=1, seed=1234,
                    args=(), timeout=600):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, tensor_parallel, pipeline_parallel,
                                          seed, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
                break
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
