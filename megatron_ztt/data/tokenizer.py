"""Tokenizers: training SentencePiece ones (``ztt tokenizer train``), and the runtime
interface over both kinds the project reads, its own SentencePiece models and the Hugging Face
tokenizers of pretrained models (see the "runtime" section and :func:`load_tokenizer`).

Every tokenizer this project trains has the same special ids, which the rest of the code
(datasets, loss masking, Hugging Face export) relies on:

    unk=0  <unk>     bos=1  <s>     eos=2  </s>  (also the end-of-document token, "eod")
    pad=3  <pad>

and byte fallback, so that no text is ever mapped to ``<unk>``. The normaliser is the identity
and whitespace is kept as is, so ``detokenize(tokenize(text)) == text``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_ztt.data import sources

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_IDS = {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID}
# Lossless: no Unicode normalisation, whitespace kept, digits split, so that
# decode(encode(x)) == x. Training, the export's checks and the tests all use these.
LOSSLESS_OPTIONS = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                        allow_whitespace_only_pieces=True, split_digits=True)
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
MODEL_TYPES = ("bpe", "unigram")
# Tokenizers are trained on a uniform sample of this many lines, whatever the corpus size.
DEFAULT_INPUT_SENTENCE_SIZE = 2_000_000


class TokenizerError(Exception):
    """A tokenizer cannot be trained or loaded; the message says why and what to change."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------- training


@dataclass
class TrainReport:
    model_path: str
    vocab_path: str
    model_type: str
    vocab_size: int
    files: int
    lines: int  # non-blank lines read
    sampled: int  # lines trained on (the seeded sample)
    documents: int
    skipped_empty: int
    skipped_invalid: int
    seconds: float

    def summary(self) -> str:
        return (
            f"trained a {self.model_type} tokenizer, vocab {self.vocab_size:,} "
            f"(unk={UNK_ID} bos={BOS_ID} eos={EOS_ID} pad={PAD_ID}, byte fallback) in "
            f"{self.seconds:.1f} s from {self.files} file(s): {self.documents:,} documents, "
            f"{self.lines:,} lines, {self.sampled:,} lines sampled for training; skipped "
            f"{self.skipped_empty} empty and {self.skipped_invalid} unreadable document(s)\n"
            f"wrote {self.model_path} and {self.vocab_path}"
        )


def _spm_reason(err: Exception) -> str:
    # "INTERNAL: src/trainer_interface.cc(744) [cond] Vocabulary size too high (5000). ..."
    # -> keep the sentence meant for the user.
    message = str(err)
    match = re.search(r"\]\s*(.+)$", message, re.S)
    return match.group(1).strip() if match else message.strip()


def sample_lines(lines: Iterable[str], size: int, seed: int) -> tuple[int, list[str]]:
    """A uniform random sample of ``size`` lines (all when ``size`` <= 0), in one pass.

    Reservoir sampling keeps memory at ``size`` lines whatever the corpus size. (SentencePiece
    has its own input_sentence_size sampling, but it ignores the random seed.)
    """
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for seen, line in enumerate(lines, start=1):
        if size <= 0 or len(sample) < size:
            sample.append(line)
        else:
            slot = rng.randrange(seen)
            if slot < size:
                sample[slot] = line
    return seen, sample


def _write_atomically(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # never hide the error that got us here
            pass


def _check_sentence_lengths(sample: list[str], max_sentence_length: int) -> None:
    """SentencePiece drops lines longer than max_sentence_length bytes without a word, and
    with none left fails with an empty reason: say so first."""
    longest = max(len(line.encode("utf-8")) for line in sample)
    if longest > max_sentence_length and all(
            len(line.encode("utf-8")) > max_sentence_length for line in sample):
        raise TokenizerError(
            f"every one of the {len(sample):,} sampled lines is longer than "
            f"--max-sentence-length ({max_sentence_length:,} bytes; the longest has "
            f"{longest:,}), and SentencePiece leaves such lines out: raise "
            f"--max-sentence-length to at least {longest:,}, or break the text into shorter "
            f"lines"
        )


def train_tokenizer(
    inputs: list[str],
    vocab_size: int,
    output_prefix: str,
    model_type: str = "bpe",
    json_key: str = "text",
    on_error: str = "raise",
    input_sentence_size: int = DEFAULT_INPUT_SENTENCE_SIZE,
    character_coverage: float = 0.9995,
    max_sentence_length: int = 8192,
    num_threads: int | None = None,
    seed: int = 1234,
    verbose: bool = False,
) -> TrainReport:
    """Train a SentencePiece model on ``inputs``; write ``output_prefix``.model / .vocab.

    The lines of all documents are streamed once; a seeded uniform sample of
    ``input_sentence_size`` of them (0: all) is kept and trained on, so memory is bounded for
    any corpus size. Both output files appear only once training has succeeded.
    """
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size <= len(SPECIAL_PIECES) + 256:
        raise TokenizerError(
            f"vocab size {vocab_size} is too small: byte fallback alone needs 256 pieces plus "
            f"{len(SPECIAL_PIECES)} special ones"
        )
    files = sources.expand_inputs(inputs)
    from megatron_ztt.files import OutputPathError, check_output_path

    try:  # before reading the corpus: never onto an input file
        for suffix in (".model", ".vocab"):
            check_output_path(f"{output_prefix}{suffix}", "--output", files)
    except OutputPathError as err:
        raise TokenizerError(str(err)) from None
    stats = sources.ReadStats()
    start = time.perf_counter()
    lines_seen, sample = sample_lines(
        sources.iter_lines(files, json_key, on_error, stats), input_sentence_size, seed
    )
    if not sample:
        raise TokenizerError(
            f"no text to train on: {len(files)} input file(s) held no non-empty lines"
        )
    _check_sentence_lengths(sample, max_sentence_length)
    output = Path(output_prefix)
    final_files = [Path(f"{output}.model"), Path(f"{output}.vocab")]
    # The model is trained into memory (model_writer) rather than to model_prefix, which
    # SentencePiece would record inside the model, and is written only once training succeeded.
    model_buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model_buffer,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            unk_piece=SPECIAL_PIECES["unk"], bos_piece=SPECIAL_PIECES["bos"],
            eos_piece=SPECIAL_PIECES["eos"], pad_piece=SPECIAL_PIECES["pad"],
            **LOSSLESS_OPTIONS,
            character_coverage=character_coverage,
            input_sentence_size=0,  # already sampled above
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or min(os.cpu_count() or 1, 16),
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as err:
        raise TokenizerError(f"SentencePiece training failed: {_spm_reason(err)}") from None
    model_proto = model_buffer.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab_text = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        for final, content in zip(final_files, (model_proto, vocab_text.encode("utf-8"))):
            _write_atomically(final, content)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise TokenizerError(
            f"cannot write {output}.model/.vocab: {err.strerror or err}{where}; free disk space "
            "or choose a writable --output"
        ) from None
    seconds = time.perf_counter() - start
    return TrainReport(
        model_path=str(final_files[0]), vocab_path=str(final_files[1]), model_type=model_type,
        vocab_size=vocab_size, files=stats.files, lines=lines_seen, sampled=len(sample),
        documents=stats.documents, skipped_empty=stats.empty, skipped_invalid=stats.invalid,
        seconds=seconds,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = sub.add_parser(
        "train", help="train a SentencePiece model from text, JSON lines, parquet or arrow",
        description="Train a SentencePiece tokenizer (byte fallback; unk=0 bos=1 eos=2 pad=3).",
    )
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help=sources.INPUT_HELP)
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument("--output", required=True, metavar="PREFIX",
                       help="writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    train.add_argument("--json-key", "--text-key", dest="json_key", default="text",
                       help=sources.TEXT_KEY_HELP)
    train.add_argument("--on-error", choices=sources.ON_ERROR_CHOICES, default="raise",
                       help="'skip' counts and skips unreadable documents instead of stopping")
    train.add_argument("--input-sentence-size", type=int, default=DEFAULT_INPUT_SENTENCE_SIZE,
                       metavar="LINES",
                       help="train on a uniform sample of this many lines (0: all lines)")
    train.add_argument("--character-coverage", type=float, default=0.9995,
                       help="share of characters given their own piece; rarer ones use bytes")
    train.add_argument("--max-sentence-length", type=int, default=8192, metavar="BYTES",
                       help="longer lines are left out of training")
    train.add_argument("--num-threads", type=int, default=None)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")


def run(args: argparse.Namespace) -> int:
    if args.tokenizer_command != "train":  # argparse only offers "train" today
        raise SystemExit(f"unknown tokenizer action {args.tokenizer_command!r}")
    try:
        report = train_tokenizer(
            args.input, args.vocab_size, args.output, model_type=args.model_type,
            json_key=args.json_key, on_error=args.on_error,
            input_sentence_size=args.input_sentence_size,
            character_coverage=args.character_coverage,
            max_sentence_length=args.max_sentence_length, num_threads=args.num_threads,
            seed=args.seed, verbose=args.verbose,
        )
    except (sources.InputError, TokenizerError) as err:
        print(f"ztt tokenizer train: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


# ---------------------------------------------------------------------------------- runtime
#
# Two kinds of tokenizer run here, behind one interface (:class:`Tokenizer`):
#
# - "sentencepiece": a ``.model`` file, as ``ztt tokenizer train`` writes (:class:`ZTTTokenizer`);
# - "huggingface": a pretrained model's own tokenizer, a ``tokenizer.json`` file or a directory
#   holding one (plus, usually, ``tokenizer_config.json`` naming the special tokens), run by the
#   ``tokenizers`` library (:class:`HFTokenizer`).
#
# :func:`load_tokenizer` picks the kind from the path. Text is always encoded without special
# tokens; the end-of-document token (eod) is the tokenizer's eos.

SENTENCEPIECE, HUGGINGFACE = "sentencepiece", "huggingface"
TOKENIZER_KINDS = (SENTENCEPIECE, HUGGINGFACE)
# What a checkpoint (and `ztt import-hf`) holds the tokenizer as: ztt_meta.json records this
# name under "tokenizer" and the kind under "tokenizer_kind".
CHECKPOINT_ENTRY = {SENTENCEPIECE: "tokenizer.model", HUGGINGFACE: "tokenizer"}
HF_TOKENIZER_JSON = "tokenizer.json"
# The files of a Hugging Face tokenizer directory that are copied with it (into checkpoints and
# exports), unchanged; tokenizer.json alone determines the ids.
HF_TOKENIZER_FILES = (HF_TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
# Where the roles of the special tokens are named, in order of precedence.
HF_SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SPECIAL_ROLES = ("unk", "bos", "eos", "pad")
TOKENIZER_PATH_HINT = ("a SentencePiece .model file, a Hugging Face tokenizer.json, or a "
                       "directory holding tokenizer.json")


def tokenizer_kind(path: str | os.PathLike) -> str:
    """The kind of tokenizer at ``path``, from its name only (nothing is loaded): a directory or
    a ``.json`` file is a Hugging Face tokenizer, any other file a SentencePiece model."""
    path = Path(path)
    if path.is_dir():
        if not (path / HF_TOKENIZER_JSON).is_file():
            raise TokenizerError(f"{path}: the directory holds no {HF_TOKENIZER_JSON}; point "
                                 f"to {TOKENIZER_PATH_HINT}")
        return HUGGINGFACE
    if not path.exists():
        raise TokenizerError(f"{path}: no such file; point to {TOKENIZER_PATH_HINT}")
    return HUGGINGFACE if path.suffix == ".json" else SENTENCEPIECE


def tokenizer_files(path: str | os.PathLike) -> dict[str, Path]:
    """The files that make up the tokenizer at ``path``: name in a copy -> source file.

    A SentencePiece model is one file; a Hugging Face tokenizer is its ``tokenizer.json`` (a
    lone file keeps that name whatever it was called) and, for a directory, the other files of
    :data:`HF_TOKENIZER_FILES` that it holds (not the weights or anything else next to them).
    """
    path = Path(path)
    if tokenizer_kind(path) == SENTENCEPIECE:
        return {CHECKPOINT_ENTRY[SENTENCEPIECE]: path}
    if path.is_file():
        return {HF_TOKENIZER_JSON: path}
    return {name: path / name for name in HF_TOKENIZER_FILES if (path / name).is_file()}


def copy_tokenizer(path: str | os.PathLike, destination: str | os.PathLike) -> tuple[str, str]:
    """Copy the tokenizer at ``path`` into the folder ``destination``, bytes unchanged, as a
    checkpoint holds it: ``tokenizer.model`` (SentencePiece) or a folder ``tokenizer/`` of the
    original files (Hugging Face). Returns (the entry's name in ``destination``, the kind)."""
    kind = tokenizer_kind(path)
    entry = Path(destination) / CHECKPOINT_ENTRY[kind]
    files = tokenizer_files(path)
    if kind == HUGGINGFACE:
        entry.mkdir(parents=True, exist_ok=True)
        for name, source in files.items():
            shutil.copyfile(source, entry / name)
    else:
        shutil.copyfile(files[entry.name], entry)
    return entry.name, kind


def load_tokenizer(path: str | os.PathLike) -> "Tokenizer":
    """The tokenizer at ``path``, of either kind (see :func:`tokenizer_kind`)."""
    if tokenizer_kind(path) == HUGGINGFACE:
        return HFTokenizer(path)
    return ZTTTokenizer(path)


class Tokenizer(MegatronTokenizerBase):
    """What the data pipeline, training and export need of a tokenizer, either kind.

    The base class is ``MegatronTokenizerBase``, the type ``GPTDatasetConfig.tokenizer`` names:
    in megatron-core 0.16 ``MegatronTokenizer`` is only a factory (its constructor raises) and
    the older ``MegatronLegacyTokenizer`` logs a deprecation warning.

    ``fingerprint`` is the sha256 of the file that determines the ids (the ``.model``, or
    ``tokenizer.json``). ``unique_identifiers`` (read by megatron-core to key its index cache)
    holds it rather than the path, so the cache stays valid when the files move and is rebuilt
    when the tokenizer changes. The megatron-core properties (``eos``, ``eod``, ``pad``, ...)
    are -1 for a token the tokenizer does not have; :meth:`special_ids` says None.
    """

    kind: str
    fingerprint: str

    def _set_identifiers(self) -> None:
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("sha256", self.fingerprint),
             ("vocab_size", self.vocab_size)]
        )

    def special_ids(self) -> dict[str, int | None]:
        """Role (unk, bos, eos, pad) -> id, None where the tokenizer has no such token."""
        return {role: (i if i >= 0 else None)
                for role, i in ((role, getattr(self, role)) for role in SPECIAL_ROLES)}

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: piece for piece, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self.eos

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pretraining tokenizes plain text; there is no chat template")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class ZTTTokenizer(Tokenizer):
    """A SentencePiece model, as ``ztt tokenizer train`` writes it (special ids fixed)."""

    kind = SENTENCEPIECE

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        try:
            model_proto = path.read_bytes()
        except OSError as err:
            raise TokenizerError(
                f"{path}: cannot read tokenizer model ({err.strerror or err})"
            ) from None
        super().__init__(str(path), config={})
        self._load(model_proto)

    def _load(self, model_proto: bytes) -> None:
        if not model_proto:  # SentencePiece "loads" an empty file as a model without pieces
            raise TokenizerError(f"{self.path}: not a SentencePiece model (the file is empty); "
                                 "point to the .model file `ztt tokenizer train` wrote")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as err:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({err})") from None
        self._model_proto = model_proto
        self.fingerprint = sha256_bytes(model_proto)
        ids = {"eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        missing = [name for name, value in ids.items() if value < 0]
        if missing:
            raise TokenizerError(
                f"{self.path}: the model has no {' or '.join(missing)} token; train it with "
                "`ztt tokenizer train`, which fixes unk=0 bos=1 eos=2 pad=3"
            )
        self._set_identifiers()

    def __getstate__(self) -> dict:
        # DataLoader workers may be spawned; send the model bytes, not a path that might differ.
        return {"path": self.path, "model_proto": self._model_proto}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load(state["model_proto"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        return self._sp

    @property
    def model_proto(self) -> bytes:
        """The model file's bytes (what :attr:`fingerprint` hashes)."""
        return self._model_proto

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: the string,
    or an AddedToken's fields ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_special_ids(tokenizer_json: dict) -> dict[str, int]:
    """bos / eos as the tokenizer's own post-processor places them around a single sequence
    (a ``TemplateProcessing`` such as "<s> $A </s>"): the fallback for a lone tokenizer.json."""
    processor = tokenizer_json.get("post_processor") or {}
    processors = processor.get("processors", []) if processor.get("type") == "Sequence" \
        else [processor]
    found: dict[str, int] = {}
    for item in processors:
        if not isinstance(item, dict) or item.get("type") != "TemplateProcessing":
            continue
        specials = item.get("special_tokens", {})
        role = "bos"
        for piece in item.get("single", []):
            if "Sequence" in piece:
                role = "eos"
            elif "SpecialToken" in piece:
                ids = specials.get(piece["SpecialToken"].get("id"), {}).get("ids", [])
                if len(ids) == 1:
                    found.setdefault(role, int(ids[0]))
    return found


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer: ``tokenizer.json`` run by the ``tokenizers`` library, so the ids
    are exactly ``tokenizers``' (and ``AutoTokenizer``'s) ``encode(text,
    add_special_tokens=False)``.

    The special tokens come from ``tokenizer_config.json`` (else ``special_tokens_map.json``) of
    a directory, as transformers reads them (``"eos_token": "</s>"`` or an AddedToken's
    ``{"content": "</s>", ...}``); a lone ``tokenizer.json``, or a role neither file names, falls
    back to the bos/eos its post-processor's template adds around a sequence.
    """

    kind = HUGGINGFACE

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        json_path = path / HF_TOKENIZER_JSON if path.is_dir() else path
        try:
            text = json_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise TokenizerError(f"{json_path}: cannot read tokenizer ({reason or err})") from None
        super().__init__(str(path), config={})
        named = self._named_special_tokens(path) if path.is_dir() else {}
        self._load(json_path, text, named)

    @staticmethod
    def _named_special_tokens(directory: Path) -> dict[str, str]:
        named: dict[str, str] = {}
        for name in HF_SPECIAL_TOKEN_FILES:
            file = directory / name
            if not file.is_file():
                continue
            try:
                values = json.loads(file.read_text(encoding="utf-8"))
                if not isinstance(values, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as err:
                raise TokenizerError(f"{file}: unreadable ({_first_line(err)}); fix or remove "
                                     "it") from None
            for role in SPECIAL_ROLES:
                content = _token_content(values.get(f"{role}_token"))
                if content is not None:
                    named.setdefault(role, content)
        return named

    def _load(self, json_path: Path, text: str, named: dict[str, str]) -> None:
        from tokenizers import Tokenizer as Backend

        try:
            self._backend = Backend.from_str(text)
            template = _template_special_ids(json.loads(text))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise TokenizerError(f"{json_path}: not a Hugging Face tokenizer.json "
                                 f"({_first_line(err)})") from None
        self._json_path, self._text, self._named = str(json_path), text, named
        self.fingerprint = sha256_bytes(text.encode("utf-8"))
        vocab = self._backend.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"{json_path}: the tokenizer has an empty vocabulary")
        self._vocab_size = max(vocab.values()) + 1  # the ids a model needs rows for
        self._special: dict[str, int] = {}
        for role in SPECIAL_ROLES:
            if role in named:
                token_id = self._backend.token_to_id(named[role])
                if token_id is None:
                    raise TokenizerError(
                        f"{Path(self.path)}: the special token {role}_token={named[role]!r} is "
                        f"not in the vocabulary of {json_path.name}")
                self._special[role] = token_id
            elif role in template:
                self._special[role] = template[role]
        self._set_identifiers()

    def __getstate__(self) -> dict:
        # DataLoader workers may be spawned: send the tokenizer itself, not its path.
        return {"path": self.path, "json_path": self._json_path, "text": self._text,
                "named": self._named}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load(Path(state["json_path"]), state["text"], state["named"])

    @property
    def json_text(self) -> str:
        """The tokenizer.json (what :attr:`fingerprint` hashes), for worker processes."""
        return self._text

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def unk(self) -> int:
        return self._special.get("unk", -1)

    @property
    def bos(self) -> int:
        return self._special.get("bos", -1)

    @property
    def eos(self) -> int:
        return self._special.get("eos", -1)

    @property
    def pad(self) -> int:
        return self._special.get("pad", -1)

    def tokenize(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)
