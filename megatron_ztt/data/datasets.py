"""Train / valid / test datasets from ``.bin/.idx`` prefixes, through megatron-core.

    train, valid, test = build_datasets(cfg, tokenizer, seq_length=1024, seed=1234,
                                        num_samples=(train_n, valid_n, test_n))

megatron-core's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` do the work: the document
split (``cfg.split``, by document count), the seeded shuffle, the blend of several prefixes in
the asked proportions, and the index cache (``cfg.cache_dir``), built by rank 0 and read by
the others. With ``cfg.valid_blend`` / ``cfg.test_blend`` each split reads its own data
instead (held-out files; megatron-core's ``blend_per_split``). Before handing over, this
module checks what megatron-core would report unclearly or not at all:

- each ``.bin/.idx`` pair is complete and consistent (:func:`validate_indexed_dataset`);
- the token ids were made by the configured tokenizer (:func:`verify_tokenizer_matches`);
- no split asked for samples has zero tokens (megatron-core would loop forever);
- ``torch.distributed`` is initialised (megatron-core's builder needs a process group).

A sample is a dict of ``tokens``, ``labels`` (next tokens), ``loss_mask`` and
``position_ids``, each of length ``seq_length``, plus ``dataset_id`` when several prefixes are
blended. No attention mask is built: the model applies causal attention itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType
from megatron.core.datasets.utils import Split

from megatron_ztt.data.preprocess import SIDECAR_FORMAT, sidecar_path
from megatron_ztt.data.tokenizer import file_sha256
from megatron_ztt.files import write_text_atomic

SPLIT_NAMES = tuple(split.name for split in Split)  # ("train", "valid", "test")
# .idx layout (megatron-core _IndexWriter): magic, <Q version, <B dtype code, <Q sequence count,
# <Q document count, then int32 lengths, int64 pointers, int64 document indices.
_IDX_HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8
_CHUNK = 1 << 24  # elements per chunk when scanning large arrays, to bound memory


class DataError(Exception):
    """The data configuration or files cannot be used; the message names the file or setting."""


@dataclass
class DataConfig:
    blend: list  # ["prefix"] or [0.7, "prefixA", 0.3, "prefixB"] (weights may be strings from YAML)
    split: str = "98,1,1"  # ignored when valid_blend or test_blend is set
    # Per-split data: when either is set, train reads all documents of `blend`, valid reads
    # valid_blend and test reads test_blend (a split without one is not built). Same syntax.
    valid_blend: list | None = None
    test_blend: list | None = None
    # a SentencePiece .model, a Hugging Face tokenizer.json or a directory holding one
    tokenizer: str = ""
    cache_dir: str | None = None  # megatron index cache; default <first prefix dir>/index-cache
    num_workers: int = 0  # DataLoader workers
    eod_mask_loss: bool = False
    verify_checksums: bool = False  # also hash every .bin against its sidecar (reads all data)


@dataclass(frozen=True)
class IndexedDatasetInfo:
    prefix: str
    dtype: np.dtype
    documents: int
    tokens: int
    sequence_lengths: np.ndarray  # what megatron-core splits by (ztt preprocess: one per document)


# ------------------------------------------------------------------------------------ blend


def _as_weight(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def parse_blend(blend, setting: str = "data.blend") -> tuple[list[str], list[float] | None]:
    """``data.blend`` (or another blend ``setting``) -> (prefixes, weights or None).

    Accepts ``["prefix"]``, ``["a", "b"]`` (weighted by size), ``[0.7, "a", 0.3, "b"]``
    (weights may be strings, as YAML may give them) and the same as one whitespace-separated
    string (Megatron-LM's ``--data-path`` style).
    """
    items = blend.split() if isinstance(blend, str) else list(blend or [])
    if not items:
        raise DataError(f"{setting} is empty: give at least one dataset prefix")
    if _as_weight(items[0]) is None:
        bad = [item for item in items if not isinstance(item, (str, os.PathLike))]
        if bad:
            raise DataError(f"{setting}: {bad[0]!r} is not a prefix; write weights before "
                            "every prefix, e.g. [0.7, prefixA, 0.3, prefixB]")
        return [str(item) for item in items], None
    if len(items) % 2:
        raise DataError(f"{setting} {blend!r}: expected weight, prefix pairs")
    weights, prefixes = [], []
    for weight, prefix in zip(items[0::2], items[1::2]):
        value = _as_weight(weight)
        if value is None or not math.isfinite(value) or value <= 0:
            raise DataError(f"{setting}: weight {weight!r} (of {prefix!r}) must be a positive "
                            "number")
        if not isinstance(prefix, (str, os.PathLike)) or _as_weight(prefix) is not None:
            raise DataError(f"{setting}: {prefix!r} after weight {weight!r} is not a prefix")
        weights.append(value)
        prefixes.append(str(prefix))
    return prefixes, weights


def parse_split(split: str) -> list[float]:
    """``"98,1,1"`` -> normalised [train, valid, test] fractions, validated."""
    if not re.fullmatch(r"\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*", str(split)):
        raise DataError(f"data.split {split!r}: expected up to three non-negative numbers "
                        "separated by commas, e.g. '98,1,1'")
    if sum(float(x) for x in str(split).split(",")) <= 0:
        raise DataError(f"data.split {split!r}: the parts must not all be zero")
    return parse_and_normalize_split(str(split))


# ---------------------------------------------------------------------- file integrity checks


def validate_indexed_dataset(prefix: str | os.PathLike) -> IndexedDatasetInfo:
    """Check that ``prefix``.idx and .bin are complete and agree; describe them.

    Catches truncated or overwritten files up front, with the file named, instead of the
    assertion or out-of-bounds read megatron-core would give later.
    """
    prefix = str(prefix)
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(f"{path}: missing (make it with `ztt preprocess --output-prefix "
                            f"{prefix}`)")
    idx_size = idx_path.stat().st_size

    def corrupt(reason: str) -> DataError:
        return DataError(f"{idx_path}: corrupt or truncated index: {reason}")

    with open(idx_path, "rb") as stream:
        header = stream.read(_IDX_HEADER_BYTES)
    if len(header) < _IDX_HEADER_BYTES:
        raise corrupt(f"{idx_size} bytes, shorter than the {_IDX_HEADER_BYTES}-byte header")
    if not header.startswith(_INDEX_HEADER):
        raise corrupt("bad magic bytes (not a Megatron .idx file)")
    offset = len(_INDEX_HEADER)
    version, dtype_code, sequences, documents_plus_one = struct.unpack_from(
        "<QBQQ", header, offset
    )
    if version != 1:
        raise corrupt(f"version {version}, expected 1")
    try:
        dtype = np.dtype(DType.dtype_from_code(dtype_code))
    except ValueError:
        raise corrupt(f"unknown token dtype code {dtype_code}") from None
    expected = _IDX_HEADER_BYTES + 4 * sequences + 8 * sequences + 8 * documents_plus_one
    if idx_size != expected:
        raise corrupt(f"the header announces {sequences} sequences and "
                      f"{max(documents_plus_one - 1, 0)} documents, which take {expected} bytes, "
                      f"but the file has {idx_size}")
    if documents_plus_one < 1:
        raise corrupt("no document index")

    data = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(data, np.int32, sequences, _IDX_HEADER_BYTES)
    pointers = np.frombuffer(data, np.int64, sequences, _IDX_HEADER_BYTES + 4 * sequences)
    doc_index = np.frombuffer(data, np.int64, documents_plus_one,
                              _IDX_HEADER_BYTES + 12 * sequences)
    if doc_index[0] != 0 or doc_index[-1] != sequences or np.any(np.diff(doc_index) < 0):
        raise corrupt("document boundaries are not increasing from 0 to the sequence count")
    # Lengths and pointers must tile the .bin exactly: pointer[i] = itemsize * sum(len[:i]).
    position = 0
    for start in range(0, sequences, _CHUNK):
        chunk = lengths[start:start + _CHUNK].astype(np.int64)
        if np.any(chunk < 0):
            raise corrupt(f"negative sequence length near sequence {start}")
        expected_pointers = (position + np.concatenate(([0], np.cumsum(chunk)[:-1]))) * \
            dtype.itemsize
        if not np.array_equal(pointers[start:start + _CHUNK], expected_pointers):
            raise corrupt(f"sequence offsets disagree with sequence lengths near sequence {start}")
        position += int(chunk.sum())
    bin_size = bin_path.stat().st_size
    if bin_size != position * dtype.itemsize:
        state = "truncated" if bin_size < position * dtype.itemsize else "longer than its index"
        raise DataError(f"{bin_path}: {state}: the index describes {position} tokens of "
                        f"{dtype.name} ({position * dtype.itemsize} bytes) but the file has "
                        f"{bin_size} bytes")
    return IndexedDatasetInfo(prefix, dtype, int(documents_plus_one - 1), position, lengths)


def _read_sidecar(prefix: str) -> dict | None:
    sidecar = sidecar_path(prefix)
    if not sidecar.is_file():
        return None
    try:
        recorded = json.loads(sidecar.read_text())
        if recorded.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"unknown format {recorded.get('format')!r}")
        int(recorded["vocab_size"]), str(recorded["tokenizer_sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{sidecar}: unreadable tokenizer record ({err})") from None
    return recorded


def verify_bin_checksum(prefix: str | os.PathLike) -> None:
    """Hash ``prefix``.bin and compare with the sha256 its sidecar recorded at preprocessing.

    Finds corruption that keeps the file's size (which :func:`validate_indexed_dataset`
    cannot); it reads the whole file, hence opt-in (``DataConfig.verify_checksums``).
    """
    prefix = str(prefix)
    recorded = _read_sidecar(prefix)
    if recorded is None or "bin_sha256" not in recorded:
        raise DataError(f"{prefix}: no checksum to verify against ({sidecar_path(prefix)} is "
                        "missing or predates checksums); re-run `ztt preprocess`")
    actual = file_sha256(prefix + ".bin")
    if actual != recorded["bin_sha256"]:
        raise DataError(f"{prefix}.bin: corrupted: its sha256 is {actual[:12]}…, but "
                        f"{sidecar_path(prefix)} recorded {recorded['bin_sha256'][:12]}… when "
                        "it was written; re-run `ztt preprocess`")


def _max_token_id(prefix: str, dtype: np.dtype) -> int:
    tokens = np.memmap(prefix + ".bin", mode="r", dtype=dtype)
    if tokens.size == 0:
        return -1
    return max(int(tokens[i:i + _CHUNK].max()) for i in range(0, tokens.size, _CHUNK))


def verify_tokenizer_matches(prefixes: Sequence[str], tokenizer,
                             dtypes: dict | None = None) -> None:
    """Refuse to train with a tokenizer other than the one that made the token ids.

    With the sidecar ``PREFIX.tokenizer.json`` written by ``ztt preprocess``, the tokenizer's
    kind, sha256 (of the file that determines the ids: the ``.model`` or ``tokenizer.json``)
    and vocab size must equal the recorded ones (sidecars older than the kind field were all
    written with SentencePiece models). With or without it, every token id in
    the ``.bin`` must be below the tokenizer's vocab size: a file changed in place at the same
    size (which only the opt-in checksum would notice) would otherwise crash training with an
    IndexError at some later step. The max is a chunked vectorised pass over the memory-mapped
    file (about disk read speed). ``dtypes``: prefix -> token dtype, when already known.
    """
    fingerprint = getattr(tokenizer, "fingerprint", None)  # the project's tokenizers have one
    kind = getattr(tokenizer, "kind", None)
    sha_note = f", sha256 {fingerprint[:12]}…" if fingerprint else ""
    described = (f"{getattr(tokenizer, 'path', type(tokenizer).__name__)} "
                 f"({kind + ', ' if kind else ''}vocab {tokenizer.vocab_size}{sha_note})")
    advice = ("re-run `ztt preprocess` with this tokenizer, or set data.tokenizer to the model "
              "the data was made with")
    for prefix in map(str, prefixes):
        recorded = _read_sidecar(prefix)
        if recorded is not None:
            vocab, sha = int(recorded["vocab_size"]), str(recorded["tokenizer_sha256"])
            recorded_kind = recorded.get("tokenizer_kind", "sentencepiece")
            if vocab != tokenizer.vocab_size or (fingerprint and sha != fingerprint) or (
                    kind and recorded_kind != kind):
                raise DataError(
                    f"{prefix}: tokenizer mismatch: the data was made with "
                    f"{recorded.get('tokenizer_file', '?')} ({recorded_kind}, vocab {vocab}, "
                    f"sha256 {sha[:12]}…, "
                    f"recorded in {sidecar_path(prefix)}) but training uses {described}; "
                    f"{advice}"
                )
        dtype = (dtypes or {}).get(prefix) or validate_indexed_dataset(prefix).dtype
        largest = _max_token_id(prefix, dtype)
        if largest >= tokenizer.vocab_size:
            cause = ("the file was changed or corrupted after `ztt preprocess` wrote it"
                     if recorded is not None else "it was made with another tokenizer?")
            raise DataError(
                f"{prefix}.bin: token id {largest} is outside the vocabulary of "
                f"{described} ({cause}); {advice}"
            )


# ----------------------------------------------------------------------------------- build


def _split_bounds(split_range: tuple[float, float], documents: int) -> tuple[int, int]:
    # The same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
    return (int(round(split_range[0] * float(documents))),
            int(round(split_range[1] * float(documents))))


def default_cache_dir(prefixes: Sequence[str]) -> str:
    return str(Path(prefixes[0]).parent / "index-cache")


class FilesGPTDataset(GPTDataset):
    """megatron-core's GPTDataset, whose index-cache key also holds the identity of the
    ``.bin/.idx`` files (``config.data_files``, :func:`data_identity`): megatron-core keys it
    by path, seed, split, sample count, sequence length and tokenizer only, so a corpus
    re-preprocessed under the same prefix would reuse the old corpus's sample index."""

    @staticmethod
    def _key_config_attributes():
        return GPTDataset._key_config_attributes() + ["data_files"]


IDENTITY_RECORD = "data-identity.json"


def data_identity(prefix: str) -> dict:
    """What tells one corpus under ``prefix`` from another: sizes and modification times of
    the two files, and the sha256 of the ``.idx`` (every document's length and offset)."""
    identity = {}
    for suffix in (".bin", ".idx"):
        stat = os.stat(prefix + suffix)
        identity[f"{suffix[1:]}_bytes"] = stat.st_size
        identity[f"{suffix[1:]}_mtime_ns"] = stat.st_mtime_ns
    identity["idx_sha256"] = file_sha256(prefix + ".idx")
    return identity


def _note_changed_data(cache_dir: str, identities: dict) -> None:
    """Say which prefixes changed since the cache folder last saw them (their sample index
    is rebuilt, under a new key), and record what it sees now. Rank 0 only."""
    record = Path(cache_dir) / IDENTITY_RECORD
    try:
        seen = json.loads(record.read_text())
    except (OSError, ValueError):
        seen = {}
    for prefix, identity in identities.items():
        before = seen.get(prefix) if isinstance(seen, dict) else None
        if before and before != identity:
            changes = ", ".join(f"{key} {before.get(key)} -> {value}" for key, value in
                                identity.items() if before.get(key) != value and
                                "sha" not in key) or "same sizes, other contents"
            print(f"note: {prefix}.bin/.idx changed since the index cache {cache_dir} was "
                  f"built ({changes}): rebuilding its sample index", flush=True)
    if seen != identities:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            write_text_atomic(record, json.dumps({**(seen if isinstance(seen, dict) else {}),
                                                  **identities}, indent=2))
        except OSError:
            pass  # a read-only cache folder: megatron-core reports it if it must write there


def build_datasets(
    cfg: DataConfig,
    tokenizer,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    is_built_on_rank: Callable[[], bool] | None = None,
):
    """Build (train, valid, test) datasets. Call on every rank, after torch.distributed init.

    ``num_samples`` is the number of samples each split must provide (a split cycles through
    its documents as many epochs as needed). A split whose ``cfg.split`` share is 0 comes back
    as None; so does, with per-split blends (``cfg.valid_blend`` / ``cfg.test_blend``), a
    split that has no blend. ``is_built_on_rank`` (default: every rank) is megatron-core's
    hook for building only where data is consumed; rank 0 always builds the index cache first.
    """
    if not torch.distributed.is_initialized():
        raise DataError("build_datasets needs torch.distributed to be initialised first "
                        "(megatron_ztt.parallel.runtime.init_distributed): megatron-core's "
                        "dataset builder synchronises the ranks that share the index cache")
    if seq_length < 1:
        raise DataError(f"sequence length must be positive, got {seq_length}")
    if len(num_samples) != len(SPLIT_NAMES) or any(int(n) < 0 for n in num_samples):
        raise DataError(f"num_samples must be three non-negative counts (train, valid, test), "
                        f"got {num_samples!r}")
    num_samples = [int(n) for n in num_samples]
    per_split = cfg.valid_blend is not None or cfg.test_blend is not None
    if per_split:
        # One blend per split, each read whole (megatron-core's blend_per_split).
        blends = [parse_blend(cfg.blend)]
        for name, blend in (("valid_blend", cfg.valid_blend), ("test_blend", cfg.test_blend)):
            blends.append(None if blend is None else parse_blend(blend, f"data.{name}"))
        blends = [None if b is None else (b[0], None if len(b[0]) == 1 else b[1])
                  for b in blends]
        split_matrix = [None if b is None else (0.0, 1.0) for b in blends]
        split_prefixes = [[] if b is None else b[0] for b in blends]
        split_setting = [f"data.{name}" for name in ("blend", "valid_blend", "test_blend")]
    else:
        prefixes, weights = parse_blend(cfg.blend)
        if len(prefixes) == 1:
            weights = None  # a single weighted prefix would build a pointless one-way blend
        split_matrix = convert_split_vector_to_split_matrix(parse_split(cfg.split))
        split_prefixes = [prefixes] * len(SPLIT_NAMES)
        split_setting = [f"data.split {cfg.split!r}"] * len(SPLIT_NAMES)
    all_prefixes = list(dict.fromkeys(p for group in split_prefixes for p in group))

    infos = {prefix: validate_indexed_dataset(prefix) for prefix in all_prefixes}
    if cfg.verify_checksums:
        for prefix in all_prefixes:
            verify_bin_checksum(prefix)
    verify_tokenizer_matches(all_prefixes, tokenizer,
                             {prefix: info.dtype for prefix, info in infos.items()})

    # megatron-core never finishes building a split whose documents hold no tokens: check here.
    for index, name in enumerate(SPLIT_NAMES):
        if split_matrix[index] is None:
            continue
        empty = []
        for info in (infos[prefix] for prefix in split_prefixes[index]):
            sequences = len(info.sequence_lengths)
            begin, end = _split_bounds(split_matrix[index], sequences)
            if int(info.sequence_lengths[begin:end].sum(dtype=np.int64)) == 0:
                empty.append(f"{info.prefix} ({end - begin} of {sequences} documents)")
        if not empty:
            continue
        if num_samples[index] == 0:
            split_matrix[index] = None  # nothing asked of it: leave it out rather than fail
            if per_split:
                blends[index] = None
            continue
        advice = (f"give {split_setting[index]} data with tokens" if per_split else
                  f"add documents, or change data.split so that {name} gets at least one "
                  f"document")
        raise DataError(
            f"the {name} split ({split_setting[index]}) of {', '.join(empty)} holds no tokens, "
            f"but {num_samples[index]} {name} samples are needed: {advice}"
        )

    cache_dir = cfg.cache_dir or default_cache_dir(all_prefixes)
    identities = {os.path.abspath(prefix): data_identity(prefix) for prefix in all_prefixes}
    if torch.distributed.get_rank() == 0:
        _note_changed_data(cache_dir, identities)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=None if per_split else (prefixes, weights),
        blend_per_split=blends if per_split else None,
        split=None if per_split else cfg.split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    if not per_split:
        config.split_matrix = split_matrix
    config.data_files = identities  # part of the cache key (FilesGPTDataset)
    builder = BlendedMegatronDatasetBuilder(
        FilesGPTDataset, num_samples, is_built_on_rank or (lambda: True), config
    )
    train, valid, test = builder.build()
    return train, valid, test
