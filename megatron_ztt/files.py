"""Writing files whole or not at all: the one atomic-write helper of the project.

A file is written under a temporary name in its own folder and renamed into place only once
complete, so a crash, a full disk or a signal never leaves a half-written file under the
real name, and never replaces what was there with a broken one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def temporary_name(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes ``path`` when the block ends normally.

    On any error the temporary file is removed (a failing removal does not hide the
    original error) and ``path`` is left as it was.
    """
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as written:  # durable before it takes the real name
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_torch_atomic(obj, path: PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
