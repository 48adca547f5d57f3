"""The checkpoint format on disk, and the one reader of trained models.

A checkpoint directory (``<run.dir>/checkpoints``) holds one folder per saved iteration::

    latest                       # the tag of the newest *complete* checkpoint
    iter_0000200/
        ztt_stage00_tp00.pt ...  # the model: each pipeline stage's and tensor-parallel
                                 # rank's weights under ZTTModel's names (every layout)
        optim_stage00_tp00.pt .. # the same slices' optimizer state: Adam's exp_avg and
                                 # exp_avg_sq, the step, and the fp32 master weights where
                                 # the model trains in another precision
        rank_state_00000.pt ...  # per-rank RNG states
        tokenizer.model          # copy of the run's tokenizer, for export: the SentencePiece
                                 # model, or a folder tokenizer/ of a Hugging Face tokenizer's
                                 # original files (ztt_meta.json: "tokenizer", "tokenizer_kind")
        ztt_meta.json            # written last: its presence marks the checkpoint complete

:func:`load_trained` turns any layout's checkpoint into one canonical full state dict (the
names of ``gather_full_state_dict(ZTTModel)``): ``ztt eval``, ``ztt export-hf``, ``ztt
generate``, ``train.init_from`` and the benches all read models through it. ``ztt import-hf``
(``megatron_ztt.pretrained``) writes a checkpoint of this format from a pretrained Hugging
Face model: one iteration-0 folder with the full single-layout model file, its tokenizer
folder (``"tokenizer": "tokenizer"``, ``"tokenizer_kind": "huggingface"`` in the metadata) and
the run config. The training
side that writes checkpoints is ``megatron_ztt.training.checkpoint``.

Format 3 holds no file of DeepSpeed's layout-bound engine state: every tensor is stored by
(pipeline stage, tensor-parallel rank) slice under its canonical name with the split recorded
in ``partition_spec``, so :class:`SliceReader` serves any other layout the full tensors it
asks for, one at a time. Format 2 (DeepSpeed's engine files in ``engine/``) still gives its
weights to every reader but cannot resume training.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_ztt.config import RunConfig, config_from_dict, load_config
from megatron_ztt.data.tokenizer import SENTENCEPIECE
from megatron_ztt.files import write_text_atomic
from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.model.weight_layout import expected_canonical_shapes
from megatron_ztt.parallel.sharding import merge_shards

LATEST = "latest"
META = "ztt_meta.json"
FORMAT_VERSION = 3
# formats whose model files every reader of trained models understands; resuming training
# needs FORMAT_VERSION
READABLE_FORMATS = (2, 3)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _partition(data_rank: Optional[int]) -> str:
    return "" if data_rank is None else f"_dp{data_rank:03d}"


def model_file(pipeline_rank: int, tensor_rank: int, data_rank: Optional[int] = None) -> str:
    """The model file of one pipeline stage and tensor-parallel rank; under ZeRO-3 one per
    data-parallel rank, holding that rank's partition of every weight (flat)."""
    return f"ztt_stage{pipeline_rank:02d}_tp{tensor_rank:02d}{_partition(data_rank)}.pt"


def optimizer_file(pipeline_rank: int, tensor_rank: int, data_rank: Optional[int] = None) -> str:
    """The optimizer state of the same slice (or partition) as :func:`model_file`."""
    return f"optim_stage{pipeline_rank:02d}_tp{tensor_rank:02d}{_partition(data_rank)}.pt"


def rank_state_file(rank: int) -> str:
    return f"rank_state_{rank:05d}.pt"


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
                              f"checkpoint folder of the same run") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_FORMATS:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this megatron_ztt reads "
                              f"formats {', '.join(map(str, READABLE_FORMATS))}; use the "
                              f"version that wrote it (its ztt_meta.json lists the versions)")
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
    """Point ``latest`` at the newest complete checkpoint and remove stale ``latest`` temporary
    files; returns that tag. Call on one rank only.

    A process killed after a checkpoint's folder was complete but before ``latest`` moved
    leaves ``latest`` one save behind; this repairs it.
    """
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(f".{LATEST}.tmp") or name.startswith(f"{LATEST}.tmp"):
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

    For a root, the newest complete checkpoint: what ``latest`` names unless a crash came
    between a checkpoint's completion and the move of ``latest`` (a note then says which one
    is used).
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
    if not _TAG.fullmatch(tag):
        return None
    number = int(_TAG.fullmatch(tag).group(1))
    older = [t for t in complete_tags(root) if int(_TAG.fullmatch(t).group(1)) < number]
    return older[-1] if older else None


def fallback_advice(root: str, tag: str) -> str:
    previous = previous_complete(root, tag)
    if previous is None:
        return "there is no older complete checkpoint to fall back to"
    return (f"the previous complete checkpoint is {os.path.join(root, previous)}: to resume "
            f"from it, move {os.path.join(root, tag)} out of {root} (e.g. rename it to "
            f"{tag}.corrupt) and resume with train.load=auto")


def check_readable(root: str, tag: str) -> None:
    """Fail, naming the file, if a ``.pt`` file of the checkpoint is truncated.

    torch's files are zip archives whose directory is at the end, so opening it finds a
    truncated file without reading the tensors. The error names the previous complete
    checkpoint and how to resume from it.
    """
    tag_dir = os.path.join(root, tag)
    for folder, _, names in sorted(os.walk(tag_dir)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if not name.endswith(".pt"):
                continue
            try:
                with zipfile.ZipFile(path):
                    pass
            except (zipfile.BadZipFile, OSError) as error:
                raise CheckpointError(f"{path} is truncated or corrupt ({error}); "
                                      f"{fallback_advice(root, tag)}") from None


def latest_iteration(root: str) -> Optional[int]:
    try:
        return read_meta(os.path.join(*resolve(root)))["iteration"]
    except CheckpointError:
        return None


def read_model_file(path: str, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """A model or optimizer file; ``mmap`` maps the tensors instead of reading them all."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch file (torch.save writes a zip archive): "
                              f"truncated, or a file of another format")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"cannot read {path} as a torch file of tensors (a state dict "
                              f"saved with torch.save): {first}") from None


class SliceReader:
    """Full tensors of a checkpoint's slices, one name at a time, for any reading layout.

    The files are memory-mapped, so a rank touches only the bytes of the tensors it asks for:
    each full tensor is assembled from the saved tensor-parallel slices along the recorded
    split (and, for a ZeRO-3 checkpoint, each slice from its data-parallel partitions), and
    the caller keeps its own part of it.
    """

    def __init__(self, tag_dir: str, meta: dict):
        self.tag_dir = tag_dir
        self.tensor, self.pipeline = meta["layout"]["tensor"], meta["layout"]["pipeline"]
        self.spec = {k: tuple(v) for k, v in meta["partition_spec"].items()}
        # ZeRO-3: {"data": partitions per slice, "shapes": {name: a slice's shape}}
        self.partitions = meta.get("zero_partitions")
        self._files: Dict[tuple, dict] = {}
        self._stage_of: Dict[str, int] = {}
        for stage in range(self.pipeline):  # the first stage holding a (shared) weight wins
            for name in self.stage_names(stage):
                self._stage_of.setdefault(name, stage)

    def _file(self, kind, stage: int, tensor_rank: int, data_rank: Optional[int] = None) -> dict:
        key = (kind.__name__, stage, tensor_rank, data_rank)
        if key not in self._files:
            path = os.path.join(self.tag_dir, kind(stage, tensor_rank, data_rank))
            self._files[key] = read_model_file(path, mmap=True)
        return self._files[key]

    def _held(self, part: str, stage: int, tensor_rank: int, data_rank=None) -> dict:
        if part == "weight":
            return self._file(model_file, stage, tensor_rank, data_rank)
        return self._file(optimizer_file, stage, tensor_rank, data_rank).get(part, {})

    def stage_names(self, stage: int) -> List[str]:
        return list(self._held("weight", stage, 0, 0 if self.partitions else None))

    def names(self) -> List[str]:
        return list(self._stage_of)

    def step(self) -> Optional[float]:
        """The optimizer's step count (the same in every slice)."""
        return self._file(optimizer_file, 0, 0, 0 if self.partitions else None).get("step")

    def _slice(self, name: str, part: str, stage: int, tensor_rank: int):
        if not self.partitions:
            return self._held(part, stage, tensor_rank).get(name)
        pieces = [self._held(part, stage, tensor_rank, d).get(name)
                  for d in range(self.partitions["data"])]
        if any(piece is None for piece in pieces):
            return None
        shape = self.partitions["shapes"][name]
        return torch.cat([p.reshape(-1) for p in pieces])[:math.prod(shape)].reshape(shape)

    def full(self, name: str, part: str = "weight",
             stage: Optional[int] = None) -> Optional[torch.Tensor]:
        """The full tensor ``name`` (of pipeline ``stage``, default the first holding it):
        its weight, or ``part`` of its optimizer state ("fp32", "exp_avg", "exp_avg_sq");
        None where the checkpoint has none (a frozen weight's moments, an fp32 master that
        is the weight itself)."""
        if name not in self._stage_of:
            raise CheckpointError(f"{self.tag_dir} holds no weight {name}: the checkpoint is of "
                                  f"another model")
        stage = self._stage_of[name] if stage is None else stage
        shards = [self._slice(name, part, stage, rank) for rank in range(self.tensor)]
        if any(shard is None for shard in shards):
            return None
        if name in self.spec and self.tensor > 1:
            return merge_shards(shards, *self.spec[name])
        return shards[0].clone()


@dataclass
class TrainedModel:
    """Everything a trained checkpoint holds about its model, merged to one process."""

    path: str  # the iteration folder
    run_config: RunConfig
    state: Dict[str, torch.Tensor]  # canonical full state dict
    tokenizer: Optional[str]  # the tokenizer saved with it: tokenizer.model or tokenizer/
    meta: dict

    @property
    def tokenizer_kind(self) -> Optional[str]:
        """The tokenizer's kind, "sentencepiece" or "huggingface" (None without one);
        checkpoints written before Hugging Face tokenizers were supported hold SentencePiece
        models."""
        if self.tokenizer is None:
            return None
        return self.meta.get("tokenizer_kind", SENTENCEPIECE)

    @property
    def model_config(self) -> ZTTConfig:
        return self.run_config.model

    @property
    def iteration(self) -> int:
        return self.meta["iteration"]


def merge_model_files(tag_dir: str, meta: dict) -> Dict[str, torch.Tensor]:
    """The per-stage, per-tensor-rank model files -> the canonical full state dict.

    Tensor-parallel shards are merged along the dimension recorded at save time (ZeRO-3
    partitions first joined); pipeline stages are united, and a weight that several stages
    hold must be identical there.
    """
    reader = SliceReader(tag_dir, meta)
    full: Dict[str, torch.Tensor] = {}
    for stage in range(reader.pipeline):
        for name in reader.stage_names(stage):
            tensor = reader.full(name, stage=stage)
            if name in full and not torch.equal(full[name], tensor):
                raise CheckpointError(f"{tag_dir}: the pipeline stages hold different copies "
                                      f"of the shared weight {name}")
            full[name] = tensor
    return full


def load_trained(path: str, overrides=None) -> TrainedModel:
    """Any layout's checkpoint (a root with ``latest`` or one iteration's folder) -> the run
    config (with dotted ``overrides``), the canonical full state, tokenizer and metadata.
    Needs no process group."""
    root, tag = resolve(path)
    tag_dir = os.path.join(root, tag)
    meta = read_meta(tag_dir)
    run_config = config_from_dict(meta["config"], overrides)
    tokenizer = os.path.join(tag_dir, meta["tokenizer"]) if meta.get("tokenizer") else None
    return TrainedModel(tag_dir, run_config, merge_model_files(tag_dir, meta), tokenizer, meta)


# Model settings that change the shape or the set of weights: a run started from a checkpoint
# (train.init_from) must have the checkpoint's values.
SHAPE_SETTINGS = ("vocab_size", "padded_vocab_size", "hidden_size", "ffn_size",
                  "num_layers", "num_attention_heads", "query_groups", "num_cycles",
                  "cycle_mode", "zero_token", "gate", "normalization", "activation",
                  "tie_embeddings", "qkv_bias")
_SETTING_NAMES = {"ffn_size": "ffn_hidden_size", "query_groups": "num_query_groups",
                  "padded_vocab_size": "make_vocab_size_divisible_by (the padded vocabulary)"}


def load_run_config(path: Optional[str] = None, overrides=None) -> RunConfig:
    """``load_config``, with the model section of ``train.init_from``'s checkpoint as the
    defaults of the run's model section: a fine-tuning config needs no model section, and
    the settings it does give (sequence length, dropout, exit losses ...) win."""
    first = load_config(path, overrides, check=False)
    source = first.train.init_from or first.train.init_weights
    model = None
    if source and not os.path.isfile(source):
        root, tag = resolve(source, note=False)
        model = read_meta(os.path.join(root, tag))["config"]["model"]
    return load_config(path, overrides, model_defaults=model)


def check_init_compatible(source: str, saved: ZTTConfig, run: ZTTConfig) -> None:
    """Fail, naming the settings, if the run's model cannot take the checkpoint's weights."""
    differ = [(_SETTING_NAMES.get(name, name), getattr(saved, name), getattr(run, name))
              for name in SHAPE_SETTINGS if getattr(saved, name) != getattr(run, name)]
    if differ:
        details = ", ".join(f"model.{name} is {a!r} in the checkpoint but {b!r} in this run"
                            for name, a, b in differ)
        raise CheckpointError(f"train.init_from={source}: {details}; these settings change the "
                              f"weights' shapes: leave them out of the run config (they default "
                              f"to the checkpoint's) or set them as the checkpoint has them")


def load_initial_weights(source: str, run: ZTTConfig) -> Dict[str, torch.Tensor]:
    """``train.init_from``: the canonical full state of a checkpoint (any layout) or ``.pt``
    file, checked against the run's model config."""
    if os.path.isfile(source):
        state = read_model_file(source)
    else:
        trained = load_trained(source)
        check_init_compatible(source, trained.model_config, run)
        state = trained.state
    expected = expected_canonical_shapes(run)
    wrong = sorted(set(expected) ^ set(state))
    wrong += [f"{name} {tuple(state[name].shape)} (the run's model: {expected[name]})"
              for name in sorted(expected) if name in state
              and tuple(state[name].shape) != expected[name]]
    if wrong:
        raise CheckpointError(f"train.init_from={source}: the weights do not fit the run's model "
                              f"config: {', '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}")
    return state
