"""Writing files whole or not at all: the one atomic-write helper of the project.

A file is written under a temporary name in its own folder and renamed into place only once
complete, so a crash, a full disk or a signal never leaves a half-written file under the
real name, and never replaces what was there with a broken one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Union

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


class OutputPathError(ValueError):
    """An output path that cannot be written, or that would land on what the command reads."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_path(path: PathLike, flag: str, reads: Iterable[PathLike] = (),
                      folder: bool = False) -> Path:
    """The absolute ``path`` of an output, checked before any work starts: not one of (or
    inside one of) the files and folders in ``reads``, not an existing folder when a file is
    written (``folder=False``) nor an existing file when a folder is, and under a folder this
    process can write into (missing folders in between are created when writing)."""
    target = Path(os.path.abspath(path))
    for source in reads:
        source = Path(os.path.abspath(source))
        if _inside(target, source):
            what = "folder" if source.is_dir() else "file"
            raise OutputPathError(f"{flag} {path}: lands {'on' if target == source else 'inside'} "
                                  f"the {what} {source}, which this command reads; write it "
                                  f"somewhere else")
    if not folder and target.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file name (e.g. "
                              f"{target / 'report.json'})")
    if folder and target.exists() and not target.is_dir():
        raise OutputPathError(f"{flag} {path} is a file; give a folder")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: cannot write into {existing} (permission denied)")
    return target


def run_files(checkpoint_root: PathLike) -> List[Path]:
    """What a run's folder holds besides its checkpoints (``<run.dir>/checkpoints``): the
    files a command that reads the checkpoints must not write over."""
    root = Path(os.path.abspath(checkpoint_root))
    if root.name != "checkpoints":
        return [root]
    return [root] + [root.parent / name for name in ("config.json", "status.json", "tensorboard")]
