"""What a run may start from, checked at start before any weight is read.

- A fresh start (no ``train.load``) refuses a ``run.dir`` that already holds complete
  checkpoints: its saves would meet the earlier run's folders, and its work would be lost or
  mixed with theirs.
- A resume (``train.load``) refuses model and data settings that differ from the ones the
  checkpoint was trained with, naming each setting and both values: the checkpoint's
  metadata would otherwise claim the new values for the whole run, and a changed shape
  would fail later as if the checkpoint were corrupt.

Reads only files (``ztt_meta.json``, the tokenizers), so the launchers run it once before
starting any rank (``launch/slurm/launch_plan.py check``), and training runs it again.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from megatron_ztt.checkpoint import CheckpointError, complete_tags, read_meta
from megatron_ztt.config import check_attention_memory

# Model settings a resumed run may change: they are read only by inference and validation's
# early exit, or change memory and not the numbers.
RESUMABLE_MODEL_SETTINGS = ("exit_threshold", "exit_signal", "exit_seed",
                            "activation_checkpointing")
# Data settings that decide which samples a step reads (the others: workers, cache folder,
# checksum verification, may change).
DATA_SETTINGS = ("blend", "split", "valid_blend", "test_blend", "eod_mask_loss")
# The ZTTConfig fields behind checkpoint.SHAPE_SETTINGS (the weights' shapes and set).
SHAPE_FIELDS = {"vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
                "num_attention_heads", "num_query_groups", "num_cycles", "cycle_mode",
                "zero_token", "gate", "normalization", "activation", "tie_embeddings",
                "qkv_bias", "make_vocab_size_divisible_by"}


def check_start(config, point: Optional[Tuple[str, str]]) -> None:
    """``point``: the (root, tag) the run resumes from, or None for a fresh start."""
    check_attention_memory(config)
    own = config.checkpoint_dir
    if point is None:
        tags = complete_tags(own)
        if tags:
            raise CheckpointError(
                f"run.dir={config.run.dir} already holds checkpoints ({', '.join(tags[-3:])} in "
                f"{own}) and this run starts from scratch (train.load not set): its saves would "
                f"meet them; resume them with train.load=auto, or set run.dir to a new folder")
        return
    root, tag = point
    if os.path.abspath(root) != os.path.abspath(own):
        tags = complete_tags(own)
        if tags:
            raise CheckpointError(
                f"train.load={os.path.join(root, tag)} resumes another run's checkpoint, but "
                f"run.dir={config.run.dir} already holds checkpoints of its own "
                f"({', '.join(tags[-3:])}); set run.dir to a new folder")
    differences = setting_differences(config, read_meta(os.path.join(root, tag)),
                                      os.path.join(root, tag))
    if differences:
        shapes = any(shape for _, _, _, shape in differences)
        shape_note = " (changes the weights' shapes)"
        details = "; ".join(
            f"{name}: {saved!r} in the checkpoint, {now!r} now{shape_note if shape else ''}"
            for name, saved, now, shape in differences)
        raise CheckpointError(
            f"train.load resumes {os.path.join(root, tag)}, but the run's settings differ from "
            f"the checkpoint's: {details}. A resumed run keeps its model and data settings: set "
            f"them back{' (the weights do not fit otherwise)' if shapes else ''}, or start a new "
            f"run from these weights with train.init_from={os.path.join(root, tag)} and a new "
            f"run.dir")


def setting_differences(config, meta: dict, tag_dir: str) -> List[tuple]:
    """[(setting, checkpoint's value, run's value, changes shapes)]."""
    saved = meta.get("config", {})
    saved_model, saved_data = saved.get("model", {}), saved.get("data", {})
    differences = []
    for name, now in vars(config.model).items():
        if name in RESUMABLE_MODEL_SETTINGS or name not in saved_model:
            continue
        before = saved_model[name]
        if _normal(before) != _normal(now):
            differences.append((f"model.{name}", before, now, name in SHAPE_FIELDS))
    for name in DATA_SETTINGS:
        before, now = saved_data.get(name), getattr(config.data, name)
        if name.endswith("blend"):
            before, now = _blend(before), _blend(now)
        if _normal(before) != _normal(now):
            differences.append((f"data.{name}", before, now, False))
    saved_seed = saved.get("train", {}).get("seed")
    if saved_seed is not None and saved_seed != config.train.seed:
        differences.append(("train.seed (the data order)", saved_seed, config.train.seed, False))
    tokenizer = _tokenizer_difference(config.data.tokenizer, meta, tag_dir)
    if tokenizer:
        differences.append(tokenizer)
    return differences


def _normal(value):
    """Values as the JSON metadata holds them (tuples as lists, ints and floats alike)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def _blend(blend):
    """Prefixes as absolute paths, so that ./data/x and data/x are the same blend."""
    if blend is None:
        return None
    items = blend.split() if isinstance(blend, str) else list(blend)
    out = []
    for item in items:
        try:
            out.append(float(item))
        except (TypeError, ValueError):
            out.append(os.path.abspath(str(item)))
    return out


def _tokenizer_difference(path: str, meta: dict, tag_dir: str) -> Optional[tuple]:
    """The run's tokenizer against the copy saved in the checkpoint (by content: the path may
    have moved); None when they agree or either is missing (training reports a missing one)."""
    if not meta.get("tokenizer") or not path or not os.path.exists(path):
        return None
    from megatron_ztt.data.tokenizer import TokenizerError, load_tokenizer

    try:
        saved, now = load_tokenizer(os.path.join(tag_dir, meta["tokenizer"])), load_tokenizer(path)
    except TokenizerError:
        return None
    if saved.fingerprint == now.fingerprint:
        return None
    return ("data.tokenizer", f"{meta['tokenizer']} of sha256 {saved.fingerprint[:12]}…",
            f"{path} of sha256 {now.fingerprint[:12]}…", saved.vocab_size != now.vocab_size)
