"""Checkpoints: DeepSpeed's files plus our metadata, with an atomic ``latest`` pointer.

A checkpoint directory (``<run.dir>/checkpoints``) holds one folder per saved iteration::

    latest                       # the tag of the newest *complete* checkpoint
    iter_0000200/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   # DeepSpeed (PP=1)
        ztt_stage00_tp00.pt, ...                                       # model, per stage (PP>1)
        rank_state_00000.pt ...  # per-rank RNG states
        tokenizer.model          # copy of the SentencePiece model, for export
        ztt_meta.json            # written last: its presence marks the checkpoint complete

``latest`` is replaced with ``os.replace`` only after every rank has finished writing, so a
crash during a save leaves the previous checkpoint as ``latest``. A kill between the end of a
save and the move of ``latest`` leaves it one save behind: readers (:func:`resolve`) take the
newest complete ``iter_*`` folder, and resume and save repair ``latest``
(:func:`repair_latest`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.parallel.sharding import merge_shards, partition_spec

LATEST = "latest"
META = "ztt_meta.json"
TOKENIZER = "tokenizer.model"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def stage_file(pipeline_rank: int, tensor_rank: int) -> str:
    """Model file of one pipeline stage and tensor-parallel rank (PP > 1 layout)."""
    return f"ztt_stage{pipeline_rank:02d}_tp{tensor_rank:02d}.pt"


def deepspeed_model_file(tensor_rank: int) -> str:
    return f"mp_rank_{tensor_rank:02d}_model_states.pt"


# ZeRO-3 partitions the weights, so DeepSpeed's model files hold no usable tensors; each
# checkpoint then also gets the gathered weights in one file.
ZERO3_MODEL_FILE = "ztt_zero3_full_model.pt"


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, META))


def read_meta(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, META)
    if not os.path.isfile(path):
        raise CheckpointError(f"{tag_dir} is not a complete checkpoint (no {META}; the save "
                              f"may have been interrupted)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable or corrupt ({error}); use another "
                              f"checkpoint folder") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: unsupported checkpoint format "
                              f"{found!r} (expected {FORMAT_VERSION})")
    return meta


_TAG = re.compile(r"iter_(\d+)")


def iteration_tags(root: str) -> List[str]:
    """The ``iter_N`` folders of a checkpoint root, oldest first (complete or not)."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    tags = [n for n in names if _TAG.fullmatch(n) and os.path.isdir(os.path.join(root, n))]
    return sorted(tags, key=lambda t: int(_TAG.fullmatch(t).group(1)))


def complete_tags(root: str) -> List[str]:
    """The complete checkpoints of a root, oldest first."""
    return [t for t in iteration_tags(root) if is_complete(os.path.join(root, t))]


def read_latest(root: str) -> Optional[str]:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip()
    except OSError:
        return None


def repair_latest(root: str) -> Optional[str]:
    """Point ``latest`` at the newest complete checkpoint and remove stale ``latest.tmp*`` files.

    A process killed after a checkpoint's folder was complete but before ``latest`` moved
    leaves ``latest`` one save behind; this repairs it. Returns the newest complete tag.
    Call on one rank only.
    """
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(LATEST + ".tmp"):
            try:
                os.remove(os.path.join(root, name))
            except OSError:
                pass
    tags = complete_tags(root)
    if tags and read_latest(root) != tags[-1]:
        write_text_atomic(os.path.join(root, LATEST), tags[-1])
    return tags[-1] if tags else None


def resolve(path: str, note: bool = True) -> Tuple[str, str]:
    """A checkpoint root or one iteration's folder -> (root, tag).

    For a root, the newest complete checkpoint, which is what ``latest`` names unless a
    crash came between a checkpoint's completion and the move of ``latest`` (then a note
    says which one is used).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if is_complete(path):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    tags = complete_tags(path)
    latest = read_latest(path)
    if tags:
        if note and latest is not None and latest != tags[-1] and (
                not dist.is_initialized() or dist.get_rank() == 0):
            print(f"note: {os.path.join(path, LATEST)} names {latest or 'nothing'}, but "
                  f"{tags[-1]} is the newest complete checkpoint: using {tags[-1]}",
                  file=sys.stderr, flush=True)
        return path, tags[-1]
    if latest is not None:
        raise CheckpointError(f"{os.path.join(path, LATEST)} points to {latest}, which is not "
                              f"a complete checkpoint, and {path} holds no complete one")
    if is_checkpoint_folder(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META}; the save "
                              f"may have been interrupted)")
    raise CheckpointError(f"no checkpoint at {path}: expected a '{LATEST}' file or {META}")


def is_checkpoint_folder(path: str) -> bool:
    return bool(_TAG.fullmatch(os.path.basename(os.path.abspath(path))))


def previous_complete(root: str, tag: str) -> Optional[str]:
    """The newest complete checkpoint older than ``tag`` in ``root``, or None."""
    older = [t for t in complete_tags(root)
             if int(_TAG.fullmatch(t).group(1)) < int(_TAG.fullmatch(tag).group(1))] \
        if _TAG.fullmatch(tag) else []
    return older[-1] if older else None


def check_readable(root: str, tag: str) -> None:
    """Fail, naming the file, if a ``.pt`` file of the checkpoint is truncated.

    torch's files are zip archives whose directory is at the end, so opening it finds a
    truncated file without reading the tensors. The error names the previous complete
    checkpoint and how to resume from it.
    """
    tag_dir = os.path.join(root, tag)
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if not name.endswith(".pt") or not os.path.isfile(path):
            continue
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as error:
            raise CheckpointError(f"{path} is truncated or corrupt ({error}); "
                                  f"{fallback_advice(root, tag)}") from None


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


def fallback_advice(root: str, tag: str) -> str:
    previous = previous_complete(root, tag)
    if previous is None:
        return "there is no older complete checkpoint to fall back to"
    return (f"the previous complete checkpoint is {os.path.join(root, previous)}: to resume "
            f"from it, move {os.path.join(root, tag)} out of {root} (e.g. rename it to "
            f"{tag}.corrupt) and resume with train.load=auto")


def latest_iteration(root: str) -> Optional[int]:
    try:
        return read_meta(os.path.join(*resolve(root)))["iteration"]
    except CheckpointError:
        return None


@dataclass
class TrainingState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_steps: int = 0


def save(engine, model: torch.nn.Module, config, state: TrainingState, layout: Dict[str, int],
         extra_rank_state: dict) -> str:
    """Collective: every rank calls it. ``config`` is the RunConfig. Returns the tag folder."""
    root = config.checkpoint_dir
    tag = tag_for(state.iteration)
    tag_dir = os.path.join(root, tag)
    rank = dist.get_rank()
    if is_complete(tag_dir):  # already saved at this iteration (e.g. interval + end of run)
        if rank == 0:
            repair_latest(root)  # a crash may have come before `latest` moved to it
        dist.barrier()
        return tag_dir
    os.makedirs(tag_dir, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state={}, save_latest=False)
    if layout.get("zero_stage") == 3:
        engine.save_16bit_model(tag_dir, ZERO3_MODEL_FILE)
    _save_atomic(extra_rank_state, os.path.join(tag_dir, f"rank_state_{rank:05d}.pt"))
    specs = [None] * dist.get_world_size()
    local_spec = (model.canonical_partition_spec() if hasattr(model, "canonical_partition_spec")
                  else partition_spec(model))
    dist.all_gather_object(specs, local_spec)
    dist.barrier()
    if rank == 0:
        merged_spec = {}
        for spec in specs:
            merged_spec.update(spec)
        if config.data.tokenizer and os.path.isfile(config.data.tokenizer):
            shutil.copyfile(config.data.tokenizer, os.path.join(tag_dir, TOKENIZER))
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": state.iteration,
            "consumed_train_samples": state.consumed_train_samples,
            "skipped_steps": state.skipped_steps,
            "layout": layout,
            "partition_spec": {k: list(v) for k, v in sorted(merged_spec.items())},
            "config": config.to_dict(),
            "tokenizer": TOKENIZER if os.path.isfile(os.path.join(tag_dir, TOKENIZER)) else None,
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
                              f"resume with the same layout, or export it "
                              f"(ztt export-hf) and start a new run from the weights")
    _check_readable_on_rank0(root, tag)
    try:
        path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        # damage that keeps a file's zip directory intact (torch's error names no file)
        raise CheckpointError(f"cannot load {tag_dir} ({str(error).splitlines()[0]}); "
                              f"{fallback_advice(root, tag)}") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
    rank_file = os.path.join(tag_dir, f"rank_state_{dist.get_rank():05d}.pt")
    extra = torch.load(rank_file, weights_only=False) if os.path.isfile(rank_file) else None
    state = TrainingState(meta["iteration"], meta["consumed_train_samples"],
                          meta.get("skipped_steps", 0))
    return state, extra


def load_full_model_state(path: str) -> Tuple[ZTTConfig, Dict[str, torch.Tensor], Optional[str]]:
    """Any layout's checkpoint -> (model config, full canonical state dict, tokenizer path).

    Tensor-parallel shards are merged along the dimension recorded at save time; pipeline
    stages are united, and the copies of the shared middle layers that several stages hold
    are checked to be identical and kept once. Needs no process group.
    """
    from megatron_ztt.training.config import config_from_dict

    root, tag = resolve(path)
    tag_dir = os.path.join(root, tag)
    meta = read_meta(tag_dir)
    config = config_from_dict(meta["config"])
    tp, pp = meta["layout"]["tensor"], meta["layout"]["pipeline"]
    spec = {k: tuple(v) for k, v in meta["partition_spec"].items()}

    if meta["layout"].get("zero_stage") == 3:
        path = os.path.join(tag_dir, ZERO3_MODEL_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {tag_dir} is missing {ZERO3_MODEL_FILE}")
        full = torch.load(path, map_location="cpu", weights_only=True)
        tokenizer = os.path.join(tag_dir, meta["tokenizer"]) if meta.get("tokenizer") else None
        return config.model, {k: v for k, v in full.items() if not k.endswith("_extra_state")}, \
            tokenizer

    full: Dict[str, torch.Tensor] = {}
    for stage in range(pp):
        shards = [_read_model_file(tag_dir, stage, t, pp) for t in range(tp)]
        for name in shards[0]:
            if name.endswith("_extra_state"):
                continue
            tensor = (merge_shards([s[name] for s in shards], *spec[name])
                      if name in spec and tp > 1 else shards[0][name])
            if name in full and not torch.equal(full[name], tensor):
                raise CheckpointError(f"{tag_dir}: the pipeline stages hold different copies "
                                      f"of the shared weight {name}")
            full[name] = tensor
    tokenizer = os.path.join(tag_dir, meta["tokenizer"]) if meta.get("tokenizer") else None
    return config.model, full, tokenizer


def _read_model_file(tag_dir: str, stage: int, tensor_rank: int, pipeline: int) -> dict:
    name = stage_file(stage, tensor_rank) if pipeline > 1 else deepspeed_model_file(tensor_rank)
    path = os.path.join(tag_dir, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {tag_dir} is missing {name}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise CheckpointError(f"cannot read {path}: {error}") from error
    return data["module"] if pipeline == 1 else data
