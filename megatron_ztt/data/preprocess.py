"""``ztt preprocess``: raw text -> Megatron-LM ``.bin/.idx`` files, tokenised in parallel.

Writes the files through megatron-core's ``IndexedDatasetBuilder``, so Megatron-LM and
GPT-NeoX read them unchanged, plus ``OUT.tokenizer.json``, a small sidecar (ignored by other
readers) that records which tokenizer made the token ids, so that training can refuse a
different one (see :func:`megatron_ztt.data.datasets.verify_tokenizer_matches`).

Documents keep their input order whatever the number of workers, so the output is
byte-identical for 1 or N workers. Nothing appears under the output name until everything is
written: the files are built under temporary names and renamed at the end.

This module is imported by every spawned worker process, so it only imports light libraries at
the top; megatron-core (seconds to import) is imported by the functions of the main process.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from megatron_ztt.data import sources

SIDECAR_SUFFIX = ".tokenizer.json"
SIDECAR_FORMAT = "megatron_ztt.tokenizer-sidecar/1"
# Work is sent to workers in batches of about this many characters: big enough to amortise
# the inter-process transfer, small enough to keep every worker busy on small corpora.
BATCH_CHARS = 1 << 20
BATCH_DOCUMENTS = 256


class PreprocessError(Exception):
    """Preprocessing cannot produce a dataset; the message says why."""


class PreprocessInterrupted(PreprocessError):
    """SIGTERM (or SIGHUP) arrived: the run stops and removes its temporary files."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}: stopped, and removed "
                         "the temporary files (no output was written)")


@contextlib.contextmanager
def _stop_cleanly_on_termination():
    """Turn SIGTERM/SIGHUP into an exception, so that the ``finally`` clauses that remove the
    temporary files run (the default action kills the process on the spot). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise PreprocessInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}{SIDECAR_SUFFIX}")


@dataclass
class PreprocessReport:
    output_prefix: str
    documents: int
    tokens: int
    skipped_empty: int
    skipped_invalid: int
    seconds: float
    workers: int
    dtype: str
    problems: list[str]

    @property
    def skipped(self) -> int:
        return self.skipped_empty + self.skipped_invalid

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"wrote {self.output_prefix}.bin, .idx and {SIDECAR_SUFFIX} ({self.dtype} tokens): "
            f"{self.documents:,} documents, {self.tokens:,} tokens, skipped {self.skipped:,} "
            f"({self.skipped_empty:,} empty, {self.skipped_invalid:,} unreadable) in "
            f"{self.seconds:.1f} s ({rate:,.0f} tokens/s, {self.workers} worker(s))"
        ]
        lines += [f"  skipped: {problem}" for problem in self.problems]
        if self.skipped_invalid > len(self.problems):
            lines.append(f"  ... and {self.skipped_invalid - len(self.problems):,} more")
        return "\n".join(lines)


# ------------------------------------------------------------------------- worker processes

# Long documents are encoded in pieces of about this many characters, cut after a newline
# (or, on very long lines, before a space).
PIECE_CHARS = 4096


def continuation_model(model_proto: bytes) -> bytes | None:
    """The model without its dummy prefix, for encoding a document piece by piece; or None.

    SentencePiece encodes a whole book several times slower, and with hundreds of MB of
    memory, than the same text in pieces. Piecewise encoding is exact when no piece can span
    the cut: for a BPE model with no vocabulary piece containing a newline, a newline is a
    symbol no merge touches, so the text on either side is merged independently. The first
    piece is encoded as usual, the following ones without the dummy prefix ("▁") that
    SentencePiece adds only at the start of the text. The identity normaliser and kept
    whitespace (what `ztt tokenizer train` sets) make normalisation piecewise-exact too. For
    any other model (unigram, whose lattice decoding differs at the cut) this returns None and
    documents are encoded whole.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing: correct, only slower
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    normalizer = proto.normalizer_spec
    exact = (
        proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
        and normalizer.name == "identity"
        and not normalizer.remove_extra_whitespaces
        and not proto.trainer_spec.treat_whitespace_as_suffix
        and not any("\n" in piece.piece for piece in proto.pieces)
    )
    if not exact:
        return None
    normalizer.add_dummy_prefix = False
    return proto.SerializeToString()


# A line longer than this is cut at single spaces too (see _piece_end).
LONG_LINE_CHARS = 16 * PIECE_CHARS
# Pieces encoded per SentencePiece call; their ids become one numpy array at once, so a
# huge document never exists as one Python list of ints (about 36 bytes per token).
PIECES_PER_CALL = 256
# A single space between two non-space characters: SentencePiece (BPE, whitespace not a
# suffix) starts a new word at that space, so no piece spans the cut.
_SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")


def splits_at_spaces(model_proto: bytes) -> bool:
    """Whether a cut before a single space is exact too: SentencePiece splits words at
    whitespace (split_by_whitespace, the default and what `ztt tokenizer train` uses)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    return proto.trainer_spec.split_by_whitespace


def _piece_end(text: str, start: int, space_cuts: bool = True) -> int:
    """Where the piece that starts at ``start`` ends: after the first newline past
    PIECE_CHARS; on a line longer than LONG_LINE_CHARS, before a single space past PIECE_CHARS
    (the next piece then starts with that space). Text with neither stays whole."""
    target = start + PIECE_CHARS
    if target >= len(text):
        return len(text)
    window = target + LONG_LINE_CHARS  # every search is bounded: linear time overall
    newline = text.find("\n", target, window)
    if newline >= 0:
        return newline + 1
    space = _SPACE_CUT.search(text, target, window) if space_cuts else None
    if space is not None:
        return space.start()
    newline = text.find("\n", window)
    return len(text) if newline < 0 else newline + 1


def _pieces(text: str, space_cuts: bool = True) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = _piece_end(text, start, space_cuts)
        yield text[start:end]
        start = end


_worker_state: dict = {}


def encoder_spec(tokenizer) -> tuple:
    """What a worker process needs to rebuild ``tokenizer``'s encoder (picklable bytes):
    ("sentencepiece", model, continuation model or None) or ("huggingface", tokenizer.json).
    The kinds are spelled out rather than imported from data.tokenizer, which workers must not
    import (it pulls in megatron-core)."""
    if tokenizer.kind == "huggingface":
        return ("huggingface", tokenizer.json_text)
    return ("sentencepiece", tokenizer.model_proto, continuation_model(tokenizer.model_proto))


def _init_encoder(encoder: tuple, eod: int | None, dtype_name: str) -> None:
    kind, *payload = encoder
    if kind == "huggingface":
        from tokenizers import Tokenizer

        _worker_state["hf"] = Tokenizer.from_str(payload[0])
    else:
        model_proto, continuation_proto = payload
        _worker_state["hf"] = None
        _worker_state["sp"] = spm.SentencePieceProcessor(model_proto=model_proto)
        _worker_state["continuation"] = (
            spm.SentencePieceProcessor(model_proto=continuation_proto)
            if continuation_proto else None
        )
        _worker_state["space_cuts"] = bool(continuation_proto) and splits_at_spaces(model_proto)
    _worker_state["eod"] = eod
    _worker_state["dtype"] = np.dtype(dtype_name)


def encode_document(text: str, dtype=np.int64) -> np.ndarray:
    """SentencePiece's encoding of the whole ``text`` (piecewise when that is exact).

    Piecewise, memory stays near the size of the text plus its ids in ``dtype``, however long
    the document or its lines: pieces are encoded a few at a time and kept as numpy arrays.
    """
    sp, continuation = _worker_state["sp"], _worker_state["continuation"]
    if continuation is None or len(text) <= PIECE_CHARS:
        return np.asarray(sp.encode(text), dtype=dtype)
    pieces = _pieces(text, _worker_state["space_cuts"])
    arrays = [np.asarray(sp.encode(next(pieces)), dtype=dtype)]
    while True:
        group = list(itertools.islice(pieces, PIECES_PER_CALL))
        if not group:
            break
        arrays += [np.asarray(ids, dtype=dtype) for ids in continuation.encode(group)]
    return np.concatenate(arrays)


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    """The ids of each text (+ eod). A Hugging Face tokenizer encodes each document whole,
    without special tokens: its pre-tokenizer may join characters across a newline (runs of
    whitespace), so the piecewise shortcut of SentencePiece models is not exact there."""
    eod, dtype, hf = _worker_state["eod"], _worker_state["dtype"], _worker_state["hf"]
    if hf is not None:
        documents = [np.asarray(encoding.ids, dtype=dtype)
                     for encoding in hf.encode_batch(texts, add_special_tokens=False)]
    else:
        documents = (encode_document(text, dtype) for text in texts)
    encoded = []
    for ids in documents:
        if eod is not None:
            ids = np.append(ids, np.asarray(eod, dtype=dtype))
        encoded.append(ids)
    return encoded


def _batches(documents: Iterable[sources.Document]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for document in documents:
        batch.append(document.text)
        chars += len(document.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_in_order(
    batches: Iterator[list[str]], workers: int, initargs: tuple
) -> Iterator[list[np.ndarray]]:
    """Encode batches on ``workers`` processes, yielding results in input order.

    ``Pool.imap`` would also keep the order, but its feeder thread reads the whole input as
    fast as it can, which holds an entire corpus in memory; here at most a few batches per
    worker are in flight.
    """
    if workers == 1:
        _init_encoder(*initargs)
        for batch in batches:
            yield _encode_batch(batch)
        return
    # spawn, not fork: the parent holds torch/megatron state and threads (tqdm) that a forked
    # child should not inherit.
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(workers, initializer=_init_encoder, initargs=initargs)
    try:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 3 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ------------------------------------------------------------------------------ main process


def _install(temporary: dict[str, Path], final: dict[str, Path]) -> None:
    # Remove the old index first and install the new one last: a reader never sees a
    # complete-looking pair made of an old .idx and a new .bin.
    final["idx"].unlink(missing_ok=True)
    for key in ("bin", "sidecar", "idx"):
        os.replace(temporary[key], final[key])


def _output_error(err: OSError, prefix: Path) -> PreprocessError:
    where = f" ({err.filename})" if err.filename else ""
    return PreprocessError(
        f"cannot write {prefix}.bin/.idx: {err.strerror or err}{where}; free disk space or "
        f"choose a writable --output-prefix (nothing was written under {prefix})"
    )


def _cleanup(builder, temporary_paths) -> None:
    """Close and remove the temporary files, never raising: on a full or read-only disk,
    closing (which flushes) fails again, and that must not hide the first error."""
    if builder is not None:
        try:
            builder.data_file.close()  # still open when a failure came before finalize()
        except OSError:
            pass
    for path in temporary_paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def preprocess(
    inputs: list[str],
    tokenizer_model: str,
    output_prefix: str,
    workers: int = 1,
    json_key: str = "text",
    append_eod: bool = False,
    on_error: str = "raise",
    progress: bool | None = None,
) -> PreprocessReport:
    """Tokenise ``inputs`` into ``output_prefix``.bin/.idx (+ sidecar). See the module doc.

    ``progress``: show a tqdm bar (None: only when stderr is a terminal).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_ztt.data.tokenizer import file_sha256, load_tokenizer, tokenizer_files

    if workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {workers}")
    files = sources.expand_inputs(inputs)  # fail on a missing input before any work
    tokenizer = load_tokenizer(tokenizer_model)
    dtype = np.dtype(DType.optimal_dtype(tokenizer.vocab_size))
    if append_eod and tokenizer.eod < 0:
        raise PreprocessError(
            f"--append-eod: the tokenizer {tokenizer_model} names no end-of-text (eos) token; "
            "give the directory holding its tokenizer_config.json (which names eos_token), or "
            "leave out --append-eod")
    eod = tokenizer.eod if append_eod else None

    prefix = Path(output_prefix)
    from megatron_ztt.files import OutputPathError, check_output_path

    try:  # never onto an input or the tokenizer (written only at the end, but then lost)
        for path in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), sidecar_path(prefix)):
            check_output_path(path, "--output-prefix", [*files, tokenizer_model])
    except OutputPathError as err:
        raise PreprocessError(str(err)) from None
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _output_error(err, prefix) from None
    tag = f".tmp-{os.getpid()}"
    final = {"bin": Path(f"{prefix}.bin"), "idx": Path(f"{prefix}.idx"),
             "sidecar": sidecar_path(prefix)}
    temporary = {key: path.with_name(path.name + tag) for key, path in final.items()}

    stats = sources.ReadStats()
    documents = sources.iter_documents(files, json_key, on_error, stats)
    tokens = 0
    # The .bin's checksum, kept as it is written, lets training detect a corrupted file.
    bin_digest = hashlib.sha256()
    start = time.perf_counter()
    bar = tqdm(desc="preprocess", unit="doc", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    builder = None
    try:
        builder = IndexedDatasetBuilder(str(temporary["bin"]), dtype=dtype.type)
        for encoded in _encode_in_order(
            _batches(documents), workers,
            (encoder_spec(tokenizer), eod, dtype.name),
        ):
            for ids in encoded:
                builder.add_document(ids, [len(ids)])
                bin_digest.update(ids.tobytes())
                tokens += len(ids)
            bar.update(len(encoded))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
        builder.finalize(str(temporary["idx"]))
        if stats.documents == 0:
            raise PreprocessError(
                f"no documents to write: {stats.files} input file(s) held {stats.empty} empty "
                f"and {stats.invalid} unreadable document(s)"
            )
        sidecar = {
            "format": SIDECAR_FORMAT,
            "tokenizer_kind": tokenizer.kind,
            "tokenizer_sha256": tokenizer.fingerprint,
            "tokenizer_file": Path(tokenizer_model).name,
            "tokenizer_files": {name: file_sha256(source) for name, source
                                in tokenizer_files(tokenizer_model).items()},
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod if tokenizer.eod >= 0 else None,
            "append_eod": append_eod,
            "dtype": dtype.name,
            "documents": stats.documents,
            "tokens": tokens,
            "bin_sha256": bin_digest.hexdigest(),
        }
        temporary["sidecar"].write_text(json.dumps(sidecar, indent=2) + "\n")
        _install(temporary, final)
    except OSError as err:  # reading the inputs reports InputError: this is the output side
        raise _output_error(err, prefix) from None
    finally:
        bar.close()
        _cleanup(builder, temporary.values())
    return PreprocessReport(
        output_prefix=str(prefix), documents=stats.documents, tokens=tokens,
        skipped_empty=stats.empty, skipped_invalid=stats.invalid,
        seconds=time.perf_counter() - start, workers=workers, dtype=dtype.name,
        problems=stats.problems,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tokenise text into Megatron-LM .bin/.idx files: one document per .txt file, one per "
        "line of JSON lines (.jsonl, .jsonl.gz, .jsonl.zst, ...), one per row of .parquet and "
        ".arrow (a `datasets` folder)."
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=sources.INPUT_HELP)
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="SentencePiece .model from `ztt tokenizer train`, or a Hugging Face "
                             "tokenizer: tokenizer.json or a directory holding it")
    parser.add_argument("--output-prefix", required=True, metavar="OUT",
                        help="writes OUT.bin, OUT.idx and OUT.tokenizer.json")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokeniser processes (default 1)")
    parser.add_argument("--json-key", "--text-key", dest="json_key", default="text",
                        help=sources.TEXT_KEY_HELP)
    parser.add_argument("--append-eod", action="store_true",
                        help="end every document with the end-of-document token (the "
                             "tokenizer's eos)")
    parser.add_argument("--on-error", choices=sources.ON_ERROR_CHOICES, default="raise",
                        help="'skip' counts and skips unreadable documents instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from megatron_ztt.data.tokenizer import TokenizerError

    try:
        with _stop_cleanly_on_termination():
            report = preprocess(
                args.input, args.tokenizer, args.output_prefix, workers=args.workers,
                json_key=args.json_key, append_eod=args.append_eod, on_error=args.on_error,
                progress=False if args.no_progress else None,
            )
    except PreprocessInterrupted as err:
        print(f"ztt preprocess: {err}", file=sys.stderr)
        return 128 + err.signum
    except (sources.InputError, PreprocessError, TokenizerError) as err:
        print(f"ztt preprocess: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
