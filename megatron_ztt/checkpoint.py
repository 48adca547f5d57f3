"""The checkpoint format on disk, and the one reader of trained models.

A checkpoint directory (``<run.dir>/checkpoints``) holds one folder per saved iteration::

    latest                       # the tag of the newest *complete* checkpoint
    iter_0000200/
        ztt_stage00_tp00.pt ...  # the model: each pipeline stage's and tensor-parallel
                                 # rank's weights under ZTTModel's names (every layout)
        engine/ ...              # the training engine's own files (optimizer state, ...),
                                 # read back only by the same layout to resume
        rank_state_00000.pt ...  # per-rank RNG states
        tokenizer.model          # copy of the SentencePiece model, for export
        ztt_meta.json            # written last: its presence marks the checkpoint complete

:func:`load_trained` turns any layout's checkpoint into one canonical full state dict (the
names of ``gather_full_state_dict(ZTTModel)``): ``ztt eval``, ``ztt export-hf``, ``ztt
generate``, ``train.init_weights`` and the benches all read models through it. The training
side that writes checkpoints is ``megatron_ztt.training.checkpoint``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron_ztt.config import RunConfig, config_from_dict
from megatron_ztt.model.config import ZTTConfig
from megatron_ztt.parallel.sharding import merge_shards

LATEST = "latest"
META = "ztt_meta.json"
TOKENIZER = "tokenizer.model"
ENGINE_DIR = "engine"
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def model_file(pipeline_rank: int, tensor_rank: int) -> str:
    """The model file of one pipeline stage and tensor-parallel rank."""
    return f"ztt_stage{pipeline_rank:02d}_tp{tensor_rank:02d}.pt"


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
        raise CheckpointError(f"{path} is unreadable ({error}); use an earlier checkpoint "
                              f"folder of the same run") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')!r}, this "
                              f"megatron_ztt reads format {FORMAT_VERSION}; use the version "
                              f"that wrote it (its ztt_meta.json lists the versions)")
    return meta


def resolve(path: str) -> Tuple[str, str]:
    """A checkpoint root (with ``latest``) or one iteration's folder -> (root, tag)."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if not is_complete(os.path.join(path, tag)):
            raise CheckpointError(f"{latest} points to {tag}, which is not a complete checkpoint")
        return path, tag
    if is_complete(path):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    raise CheckpointError(f"no checkpoint at {path}: expected a '{LATEST}' file or {META}")


def latest_iteration(root: str) -> Optional[int]:
    try:
        return read_meta(os.path.join(*resolve(root)))["iteration"]
    except CheckpointError:
        return None


def read_model_file(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise CheckpointError(f"cannot read {path}: {error}") from error


@dataclass
class TrainedModel:
    """Everything a trained checkpoint holds about its model, merged to one process."""

    path: str  # the iteration folder
    run_config: RunConfig
    state: Dict[str, torch.Tensor]  # canonical full state dict
    tokenizer: Optional[str]  # the SentencePiece model saved with it
    meta: dict

    @property
    def model_config(self) -> ZTTConfig:
        return self.run_config.model

    @property
    def iteration(self) -> int:
        return self.meta["iteration"]


def merge_model_files(tag_dir: str, meta: dict) -> Dict[str, torch.Tensor]:
    """The per-stage, per-tensor-rank model files -> the canonical full state dict.

    Tensor-parallel shards are merged along the dimension recorded at save time; pipeline
    stages are united, and a weight that several stages hold must be identical there.
    """
    tp, pp = meta["layout"]["tensor"], meta["layout"]["pipeline"]
    spec = {k: tuple(v) for k, v in meta["partition_spec"].items()}
    full: Dict[str, torch.Tensor] = {}
    for stage in range(pp):
        shards = [read_model_file(os.path.join(tag_dir, model_file(stage, t))) for t in range(tp)]
        for name in shards[0]:
            tensor = (merge_shards([s[name] for s in shards], *spec[name])
                      if name in spec and tp > 1 else shards[0][name])
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


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """Full weights from a checkpoint of any layout, or from a ``.pt`` full state dict."""
    if os.path.isfile(path):
        return read_model_file(path)
    return load_trained(path).state
