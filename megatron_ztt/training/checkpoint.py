"""Saving and resuming training: the collective side of the checkpoint format.

The format and the reader of trained models are ``megatron_ztt.checkpoint``. A save writes
the engine's files, every rank's RNG state, the per-stage model files and the tokenizer, and
only then ``ztt_meta.json`` (which marks the folder complete) and ``latest``; ``latest`` is
replaced with ``os.replace`` after every rank has finished writing, so a crash during a save
leaves the previous checkpoint as ``latest``.
"""

from __future__ import annotations

import json
import os
import shutil
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


@dataclass
class TrainingState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_steps: int = 0


def save(engine, config, state: TrainingState, layout: Dict[str, int],
         extra_rank_state: dict) -> str:
    """Collective: every rank calls it. ``config`` is the RunConfig. Returns the tag folder."""
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
    engine.save(tag_dir)
    save_torch_atomic(extra_rank_state, os.path.join(tag_dir, rank_state_file(rank)))
    specs = [None] * dist.get_world_size()
    dist.all_gather_object(specs, engine.local_partition_spec())
    dist.barrier()
    if rank == 0:
        merged_spec = {}
        for spec in specs:
            merged_spec.update(spec)
        tokenizer, tokenizer_kind = None, None
        if config.data.tokenizer and os.path.exists(config.data.tokenizer):
            tokenizer, tokenizer_kind = copy_tokenizer(config.data.tokenizer, tag_dir)
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": state.iteration,
            "consumed_train_samples": state.consumed_train_samples,
            "skipped_steps": state.skipped_steps,
            "layout": layout,
            "partition_spec": {k: list(v) for k, v in sorted(merged_spec.items())},
            "config": config.to_dict(),
            "tokenizer": tokenizer,
            "tokenizer_kind": tokenizer_kind,
            "versions": _versions(),
        }
        write_text_atomic(os.path.join(tag_dir, META), json.dumps(meta, indent=2))
        repair_latest(root)  # -> this tag, the newest complete one
        _prune(root, config.checkpoint.keep_last)
    dist.barrier()
    return tag_dir


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


def load(engine, root: str, tag: str, layout: Dict[str, int]) -> Tuple[TrainingState, Optional[dict]]:
    """Collective. Restores model, optimizer, LR schedule; returns the training state and this
    rank's extra state (RNG), or None when the checkpoint has none for this rank."""
    tag_dir = os.path.join(root, tag)
    meta = read_meta(tag_dir)
    saved = meta["layout"]
    mismatched = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in mismatched.items())
        raise CheckpointError(f"{tag_dir} was saved with another parallel layout ({details}); "
                              f"resume with the same layout, or start a new run from its "
                              f"weights with train.init_from={tag_dir}")
    _check_readable_on_rank0(root, tag)
    try:
        engine.load(tag_dir)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {fallback_advice(root, tag)}") from None
    rank_file = os.path.join(tag_dir, rank_state_file(dist.get_rank()))
    extra = torch.load(rank_file, weights_only=False) if os.path.isfile(rank_file) else None
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
