"""Small filesystem helpers for durable, atomic writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidInputError

__all__ = ["fsync_dir", "touch", "write_atomic", "staged_folder", "removed_on_failure"]


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


@contextlib.contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    """A temporary file that a failed write (a full disk, an I/O error) leaves behind is removed at once."""
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, tmp_dir: Path, *, fsync: bool = True, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix (``mode``: its permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"w-{uuid.uuid4().hex}"
    with removed_on_failure(tmp):
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A hidden ``.NAME.partial`` folder that becomes ``out`` when the block succeeds and vanishes when it fails.

    Exports never write over anything: ``out`` must be new or an empty folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError("the export folder exists and is not empty", path=str(out),
                                hint="choose a new folder; export never overwrites")
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        raise InvalidInputError("a previous export left a partial folder", path=str(staging),
                                hint="remove it and export again")
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
