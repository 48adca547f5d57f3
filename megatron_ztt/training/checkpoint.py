"""Saving and resuming training: the collective side of the checkpoint format.

The format and the reader of trained models are ``megatron_ztt.checkpoint``. A save writes
each slice's model and optimizer files, every rank's RNG state and the tokenizer, and only
then ``ztt_meta.json`` (which marks the folder complete) and ``latest``; ``latest`` is
replaced with ``os.replace`` after every rank has finished writing, so a crash during a save
leaves the previous checkpoint as ``latest``. A resume reads the checkpoint into any layout
(tensor, pipeline, data parallel, ZeRO stage).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_ztt.checkpoint import (FORMAT_VERSION, META, CheckpointError,
                                     check_readable, fallback_advice, is_complete,
                                     iteration_tags, rank_state_file, read_latest, read_meta,
                                     repair_latest, tag_for)
from megatron_ztt.data.tokenizer import copy_tokenizer
from megatron_ztt.files import save_torch_atomic, write_text_atomic
from megatron_ztt.parallel import runtime


@dataclass
class TrainingState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_steps: int = 0


def save(engine, config, state: TrainingState, layout: Dict[str, int],
         extra_rank_state: dict) -> str:
    """Collective: every rank calls it. ``config`` is the RunConfig. Returns the tag folder.

    With ``checkpoint.async_save`` the state is copied to host memory here and written by a
    background thread while training goes on (:class:`_BackgroundWrite`); a save first waits
    for the previous one's write."""
    wait_for_pending_save()
    dist.barrier()  # rank 0's wait completed that checkpoint: every rank now sees it complete
    root = config.checkpoint_dir
    tag = tag_for(state.iteration)
    tag_dir = os.path.join(root, tag)
    rank = dist.get_rank()
    if is_complete(tag_dir):  # never report a save that did not write (a run saves once per
        # iteration; training.resume_checks refuses a start into another run's checkpoints)
        raise CheckpointError(f"{tag_dir} already holds a complete checkpoint, of another run; "
                              f"not writing over it: set run.dir to a new folder")
    os.makedirs(tag_dir, exist_ok=True)
    dist.barrier()
    files = engine.checkpoint_files()
    files[rank_state_file(rank)] = extra_rank_state
    specs = [None] * dist.get_world_size()
    dist.all_gather_object(specs, engine.local_partition_spec())
    meta = None
    if rank == 0:
        merged_spec = {}
        for spec in specs:
            merged_spec.update(spec)
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": state.iteration,
            "consumed_train_samples": state.consumed_train_samples,
            "skipped_steps": state.skipped_steps,
            "layout": layout,
            "engine_state": engine.training_counters(),
            "zero_partitions": engine.zero_partitions(),
            "partition_spec": {k: list(v) for k, v in sorted(merged_spec.items())},
            "config": config.to_dict(),
            "versions": _versions(),
        }
    if config.checkpoint.async_save:
        global _pending
        _pending = _BackgroundWrite(config, tag_dir, files, meta, dist.get_world_size())
        return tag_dir
    _write_files(tag_dir, files)
    dist.barrier()
    if rank == 0:
        _complete(config, tag_dir, meta)
    dist.barrier()
    return tag_dir


def _write_files(tag_dir: str, files: Dict[str, object]) -> None:
    for name, contents in files.items():
        save_torch_atomic(contents, os.path.join(tag_dir, name))


def _complete(config, tag_dir: str, meta: dict) -> None:
    """Rank 0, once every rank's files are written: the tokenizer, then ``ztt_meta.json``
    (the folder is complete from here on), then ``latest``; old checkpoints are pruned."""
    root = os.path.dirname(tag_dir)
    tokenizer, tokenizer_kind = None, None
    if config.data.tokenizer and os.path.exists(config.data.tokenizer):
        tokenizer, tokenizer_kind = copy_tokenizer(config.data.tokenizer, tag_dir)
    meta = {**meta, "tokenizer": tokenizer, "tokenizer_kind": tokenizer_kind}
    write_text_atomic(os.path.join(tag_dir, META), json.dumps(meta, indent=2))
    repair_latest(root)  # -> this tag, the newest complete one
    _prune(root, config.checkpoint.keep_last)


def _marker(tag_dir: str, rank: int, outcome: str) -> str:
    return os.path.join(tag_dir, f".{outcome}-rank{rank:05d}")


class _BackgroundWrite:
    """One rank's asynchronous write of a checkpoint, in a thread.

    The thread uses no collective (training's collectives run meanwhile): each rank marks
    the end of its own write with a hidden file in the folder, and rank 0's thread completes
    the checkpoint (``ztt_meta.json``, then ``latest``) only once every rank's marker says
    written. A write that fails, or a process killed meanwhile, leaves a folder without
    ``ztt_meta.json``: never a complete-looking checkpoint.
    """

    POLL_SECONDS = 0.05

    def __init__(self, config, tag_dir: str, files: Dict[str, object], meta: Optional[dict],
                 world_size: int):
        self.error: Optional[BaseException] = None
        self._args = (config, tag_dir, files, meta, world_size)
        self._thread = threading.Thread(target=self._run, name="ztt-checkpoint-write",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        config, tag_dir, files, meta, world_size = self._args
        rank = dist.get_rank()
        try:
            _write_files(tag_dir, files)
            write_text_atomic(_marker(tag_dir, rank, "written"), "")
        except BaseException as error:  # noqa: BLE001 - reported by wait()
            self.error = error
            with contextlib.suppress(OSError):
                write_text_atomic(_marker(tag_dir, rank, "failed"), repr(error))
            return
        if meta is None:
            return
        try:
            while True:
                failed = [r for r in range(world_size)
                          if os.path.exists(_marker(tag_dir, r, "failed"))]
                if failed:
                    raise CheckpointError(f"{tag_dir}: the write of rank(s) {failed} failed; "
                                          f"the checkpoint stays incomplete")
                if all(os.path.exists(_marker(tag_dir, r, "written"))
                       for r in range(world_size)):
                    break
                time.sleep(self.POLL_SECONDS)
            for r in range(world_size):
                os.remove(_marker(tag_dir, r, "written"))
            _complete(config, tag_dir, meta)
        except BaseException as error:  # noqa: BLE001 - reported by wait()
            self.error = error

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


_pending: Optional[_BackgroundWrite] = None


def wait_for_pending_save() -> None:
    """Block until this rank's asynchronous write (if any) is done; raise its error. The
    training loop calls it before the next save, a final save on SIGTERM and at the end."""
    global _pending
    pending, _pending = _pending, None
    if pending is not None:
        pending.wait()


def _prune(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and stale partial ones)."""
    latest = read_latest(root)
    tags = iteration_tags(root)
    if latest not in tags:
        return
    complete = [t for t in tags if is_complete(os.path.join(root, t))]
    keep = set(complete[-keep_last:]) | {latest}
    for tag in tags[:tags.index(latest)]:
        if tag not in keep:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def _versions() -> dict:
    import deepspeed
    import megatron.core

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron_core": megatron.core.__version__}


def describe_layout(layout: Dict[str, int]) -> str:
    return (f"TP={layout.get('tensor')} x PP={layout.get('pipeline')} x DP={layout.get('data')}, "
            f"ZeRO-{layout.get('zero_stage')}")


def load(engine, root: str, tag: str, layout: Dict[str, int]) -> Tuple[TrainingState, Optional[dict]]:
    """Collective. Restores model, optimizer, LR schedule in any layout; returns the training
    state and this rank's extra state (RNG), or None when the checkpoint has none for it.

    In the layout that saved it every rank gets its own RNG states back (bit-exact resume).
    In another layout the per-rank streams cannot map (they belong to ranks that no longer
    exist): every rank takes saved rank 0's Python, NumPy and torch generators, and
    megatron-core's tensor-parallel streams (dropout inside tensor-parallel regions) keep
    this run's start-up seeding."""
    tag_dir = os.path.join(root, tag)
    meta = read_meta(tag_dir)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{tag_dir} is a checkpoint of format {meta.get('format_version')} (DeepSpeed's "
            f"engine files), which this megatron_ztt cannot resume (it reads format "
            f"{FORMAT_VERSION}); resume it with the version that wrote it, or start a new run "
            f"from its weights with train.init_from={tag_dir} (the optimizer starts fresh)")
    saved = meta["layout"]
    same_layout = all(saved.get(k) == v for k, v in layout.items())
    _check_readable_on_rank0(root, tag)
    if not same_layout and dist.get_rank() == 0:
        print(f"resuming {tag_dir} in another layout: saved as {describe_layout(saved)}, now "
              f"{describe_layout(layout)} (weights, optimizer state, LR schedule and data "
              f"position carry over; per-rank RNG streams restart, see docs/TRAINING.md)",
              flush=True)
    try:
        engine.load(tag_dir, meta)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {fallback_advice(root, tag)}") from None
    rank = dist.get_rank() if same_layout else 0
    rank_file = os.path.join(tag_dir, rank_state_file(rank))
    extra = torch.load(rank_file, weights_only=False) if os.path.isfile(rank_file) else None
    if extra is not None and not same_layout:
        rng = runtime.rng_state()  # this run's own tensor-parallel (and device) streams
        rng.update({k: extra["rng"][k] for k in ("python", "numpy", "torch")})
        extra = {**extra, "rng": rng}
    state = TrainingState(meta["iteration"], meta["consumed_train_samples"],
                          meta.get("skipped_steps", 0))
    return state, extra


def _check_readable_on_rank0(root: str, tag: str) -> None:
    """Collective: rank 0 checks the files, every rank raises the same error (none hangs)."""
    message = [None]
    if dist.get_rank() == 0:
        try:
            check_readable(root, tag)
        except CheckpointError as error:
            message[0] = str(error)
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise CheckpointError(message[0])
