"""Reading raw text corpora: .txt files, directories of them, and .jsonl / .jsonl.gz files.

Shared by tokenizer training and preprocessing so that both see exactly the same documents
and report bad input the same way: an :class:`InputError` whose message starts with
``path:line:`` (the line is omitted when the problem concerns a whole file).

Document boundaries: a ``.txt`` file is one document; each line of a ``.jsonl`` file is one
document, its text under ``json_key``. Documents whose text is empty or whitespace only are
skipped and counted. With ``on_error="skip"`` a document that cannot be read (invalid UTF-8,
malformed JSON, missing key, corrupt gzip stream) is skipped and counted instead of raising.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
ON_ERROR_CHOICES = ("raise", "skip")


class InputError(Exception):
    """Unreadable input, located by file and (when it applies) line."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    line: int | None  # 1-based line of a .jsonl record; None for a whole .txt file


@dataclass
class ReadStats:
    """What reading saw; filled in while the iterator is consumed."""

    files: int = 0
    documents: int = 0  # yielded
    empty: int = 0  # skipped: no text, or whitespace only
    invalid: int = 0  # skipped under on_error="skip"
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)  # the first few skipped errors, for the log

    @property
    def skipped(self) -> int:
        return self.empty + self.invalid


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    # longest first, so that .jsonl.gz is not taken for something else
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Turn files and directories into the sorted list of supported files they name.

    Directories are searched recursively for the supported suffixes. A path that does not exist,
    a file with an unsupported suffix, or a directory without any supported file is an error:
    these are nearly always typos, and silently training on less data than intended is worse
    than stopping, so this check is not relaxed by ``on_error="skip"``.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(path, None, "no such file or directory")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
            if not found:
                raise InputError(
                    path, None, f"directory holds no {', '.join(SUPPORTED_SUFFIXES)} files"
                )
            files.extend(found)
        elif _suffix(path):
            files.append(path)
        else:
            raise InputError(
                path, None, f"unsupported file type (expected {', '.join(SUPPORTED_SUFFIXES)})"
            )
    return files


def _decode(data: bytes, path: Path, first_line: int, strip_bom: bool) -> str:
    try:
        return data.decode("utf-8-sig" if strip_bom else "utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise InputError(
            path, line, f"invalid UTF-8 (byte 0x{data[err.start]:02x}: {err.reason})"
        ) from None


def _read_txt(path: Path, stats: ReadStats) -> Iterator[Document]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(path, None, f"cannot read ({err.strerror or err})") from None
    stats.bytes_read += len(data)
    yield Document(_decode(data, path, 1, strip_bom=True), str(path), None)


def _read_jsonl(path: Path, json_key: str, stats: ReadStats, on_error: str) -> Iterator[Document]:
    opener = gzip.open if _suffix(path) == ".jsonl.gz" else open
    try:
        stream = opener(path, "rb")
    except OSError as err:
        raise InputError(path, None, f"cannot read ({err.strerror or err})") from None
    with stream:
        line_number = 0
        while True:
            try:
                raw = stream.readline()
            except (OSError, EOFError, zlib.error) as err:
                # A broken gzip stream cannot be resynchronised: the rest of the file is lost.
                raise InputError(path, line_number + 1, f"corrupt gzip stream ({err})") from None
            if not raw:
                return
            line_number += 1
            stats.bytes_read += len(raw)
            try:
                yield _parse_record(raw, path, line_number, json_key)
            except InputError as err:
                if on_error == "raise":
                    raise
                _count_problem(stats, err)


def _parse_record(raw: bytes, path: Path, line_number: int, json_key: str) -> Document:
    text = _decode(raw, path, line_number, strip_bom=line_number == 1)
    if not text.strip():
        return Document("", str(path), line_number)  # a blank line is an empty document
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, line_number, f"malformed JSON ({err})") from None
    if not isinstance(record, dict):
        raise InputError(
            path, line_number, f"expected a JSON object, got {type(record).__name__}"
        )
    if json_key not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise InputError(
            path, line_number, f"no key {json_key!r} in this record (keys: {keys}); "
            "choose the text field with --json-key"
        )
    value = record[json_key]
    if not isinstance(value, str):
        raise InputError(
            path, line_number, f"value of {json_key!r} is {type(value).__name__}, not a string"
        )
    try:  # JSON may escape a lone surrogate (\ud800), which no UTF-8 text can hold
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(path, line_number, f"the text holds a lone surrogate escape "
                         f"(\\u{ord(value[err.start]):04x} at character {err.start}), which is "
                         f"not Unicode text") from None
    return Document(value, str(path), line_number)


def _count_problem(stats: ReadStats, err: InputError) -> None:
    stats.invalid += 1
    if len(stats.problems) < 10:
        stats.problems.append(str(err))


def iter_documents(
    files: Iterable[Path],
    json_key: str = "text",
    on_error: str = "raise",
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Yield the non-empty documents of ``files`` (from :func:`expand_inputs`) in order."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    stats = ReadStats() if stats is None else stats
    for path in files:
        stats.files += 1
        if _suffix(path) == ".txt":
            documents = _read_txt(path, stats)
        else:
            documents = _read_jsonl(path, json_key, stats, on_error)
        try:
            for document in documents:
                if document.text.strip():
                    stats.documents += 1
                    yield document
                else:
                    stats.empty += 1
        except InputError as err:
            if on_error == "raise":
                raise
            _count_problem(stats, err)


def iter_lines(
    files: Iterable[Path],
    json_key: str = "text",
    on_error: str = "raise",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """The non-blank lines of every document: the "sentences" SentencePiece trains on."""
    for document in iter_documents(files, json_key, on_error, stats):
        for line in document.text.splitlines():
            if line.strip():
                yield line
