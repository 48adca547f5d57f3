"""Reading raw text corpora: .txt, JSON lines (plain, gzip or zstd), parquet, and the arrow
files of a Hugging Face ``datasets`` folder (``save_to_disk``), alone or in directories.

Shared by tokenizer training and preprocessing so that both see exactly the same documents
and report bad input the same way: an :class:`InputError` whose message starts with
``path:line:`` (JSON lines) or ``path:row:`` (parquet, arrow; 1-based over the whole file); the
line is omitted when the problem concerns a whole file.

Document boundaries: a ``.txt`` file is one document; each line of a JSON lines file and each
row of a parquet or arrow file is one document, its text under ``json_key`` (a column for
parquet and arrow). Documents whose text is empty or whitespace only are skipped and counted.
With ``on_error="skip"`` a document that cannot be read (invalid UTF-8, malformed JSON, missing
key, null text, corrupt compressed stream or parquet page) is skipped and counted instead of
raising. A parquet or arrow file without the text column, or whose column is not text, stops
the run whatever ``on_error`` says: that is a wrong ``--json-key``, not a bad document.

Large files are streamed: compressed lines are decompressed as they are read, parquet is read a
row group at a time (in batches of BATCH_ROWS), arrow record batch by record batch.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst",
                      ".parquet", ".arrow")
JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
ON_ERROR_CHOICES = ("raise", "skip")
# The --input / --json-key help of `ztt tokenizer train` and `ztt preprocess`.
INPUT_HELP = ("files (.txt; JSON lines .jsonl, .jsonl.gz, .json.gz, .jsonl.zst, .json.zst; "
              ".parquet; .arrow) or directories searched recursively (a `datasets` "
              "save_to_disk folder is one)")
TEXT_KEY_HELP = ("text field of JSON lines records, text column of parquet and arrow tables "
                 "(default: text)")
# Rows converted to Python strings at a time: bounds memory on files with huge row groups.
BATCH_ROWS = 1024


class InputError(Exception):
    """Unreadable input, located by file and (when it applies) line."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


class ColumnError(InputError):
    """A table without a usable text column: stops the run even under on_error="skip"."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    line: int | None  # 1-based line of a JSON record or row of a table; None for a .txt file


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
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and _suffix(p) and not _unlisted_arrow_file(p))
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


def _unlisted_arrow_file(path: Path) -> bool:
    """An arrow file in a ``datasets`` folder that its ``state.json`` does not list: a cache
    file that ``Dataset.map`` and friends write beside the data, which is not the dataset."""
    if _suffix(path) != ".arrow":
        return False
    state = path.parent / "state.json"
    try:
        listed = {entry["filename"] for entry in json.loads(state.read_text())["_data_files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not a datasets folder: every arrow file counts
    return path.name not in listed


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


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame, streamed.

    zstandard's own stream_reader ends quietly at the end of a truncated file; this reader
    raises EOFError there instead, so that a cut-off download is an error, not a shorter corpus.
    """

    def __init__(self, raw):
        import zstandard

        self._raw = raw
        self._context = zstandard.ZstdDecompressor()
        self._frame = self._context.decompressobj()
        self._in_frame = False  # bytes of an unfinished frame were fed
        self._pending = b""  # compressed bytes past the end of the last frame
        self._buffer = memoryview(b"")  # decompressed, not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            compressed = self._pending or self._raw.read(1 << 20)
            self._pending = b""
            if not compressed:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated?)")
                return 0
            self._buffer = memoryview(self._frame.decompress(compressed))
            self._in_frame = not self._frame.eof
            if self._frame.eof:
                self._pending = self._frame.unused_data
                self._frame = self._context.decompressobj()
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]  # a view: no copy of the rest
        return size

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_json_lines(path: Path):
    suffix = _suffix(path)
    if suffix.endswith(".gz"):
        return gzip.open(path, "rb"), "gzip"
    if suffix.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(open(path, "rb")), 1 << 20), "zstd"
    return open(path, "rb"), None


def _read_jsonl(path: Path, json_key: str, stats: ReadStats, on_error: str) -> Iterator[Document]:
    import zstandard

    try:
        stream, compression = _open_json_lines(path)
    except OSError as err:
        raise InputError(path, None, f"cannot read ({err.strerror or err})") from None
    with stream:
        line_number = 0
        while True:
            try:
                raw = stream.readline()
            except (OSError, EOFError, zlib.error, zstandard.ZstdError) as err:
                # A broken compressed stream cannot be resynchronised: the rest is lost.
                reason = (f"corrupt {compression} stream ({err})" if compression else
                          f"cannot read ({getattr(err, 'strerror', None) or err})")
                raise InputError(path, line_number + 1, reason) from None
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


def _text_column(path: Path, schema, json_key: str) -> None:
    """Refuse a table without a string column ``json_key`` (ColumnError: a wrong key)."""
    import pyarrow as pa

    if json_key not in schema.names:
        columns = ", ".join(schema.names) or "none"
        raise ColumnError(path, None, f"no column {json_key!r} (columns: {columns}); choose "
                                      "the text column with --json-key")
    kind = schema.field(json_key).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise ColumnError(path, None, f"column {json_key!r} holds {kind}, not strings; choose "
                                      "the text column with --json-key")


def _table_rows(path: Path, batches, json_key: str, stats: ReadStats,
                on_error: str) -> Iterator[Document]:
    """Documents of a table's record batches, one per row."""
    import pyarrow as pa

    row = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise InputError(path, row + 1, f"unreadable data ({err})") from None
        stats.bytes_read += batch.nbytes  # as decoded: a parquet file is compressed
        for text in batch.column(json_key).to_pylist():
            row += 1
            if text is None:
                err = InputError(path, row, f"null text in column {json_key!r}")
                if on_error == "raise":
                    raise err
                _count_problem(stats, err)
                continue
            yield Document(text, str(path), row)


def _read_parquet(path: Path, json_key: str, stats: ReadStats,
                  on_error: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(path, None, f"not a readable parquet file ({err})") from None
    with table:
        _text_column(path, table.schema_arrow, json_key)
        # one row group at a time, only the text column: a large file is never read whole
        batches = (batch for group in range(table.num_row_groups)
                   for batch in table.iter_batches(BATCH_ROWS, row_groups=[group],
                                                   columns=[json_key]))
        yield from _table_rows(path, batches, json_key, stats, on_error)


def _read_arrow(path: Path, json_key: str, stats: ReadStats,
                on_error: str) -> Iterator[Document]:
    """An arrow IPC file: the stream format (what ``datasets`` writes) or the file format."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
    except (pa.ArrowException, OSError) as err:
        raise InputError(path, None, f"cannot read ({err})") from None
    with source:
        try:
            reader = pa.ipc.open_stream(source)
            batches = (batch for batch in reader)
        except pa.ArrowException:
            try:
                source.seek(0)
                reader = pa.ipc.open_file(source)
            except pa.ArrowException as err:
                raise InputError(path, None, f"not a readable arrow file ({err})") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        _text_column(path, reader.schema, json_key)
        yield from _table_rows(path, batches, json_key, stats, on_error)


_READERS = {".parquet": _read_parquet, ".arrow": _read_arrow}


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
        suffix = _suffix(path)
        if suffix == ".txt":
            documents = _read_txt(path, stats)
        else:
            documents = _READERS.get(suffix, _read_jsonl)(path, json_key, stats, on_error)
        try:
            for document in documents:
                if document.text.strip():
                    stats.documents += 1
                    yield document
                else:
                    stats.empty += 1
        except InputError as err:
            if on_error == "raise" or isinstance(err, ColumnError):
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
