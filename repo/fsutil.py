"""Small filesystem helpers for durable, atomic writes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["fsync_dir", "touch", "write_atomic"]


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


def write_atomic(path: Path, data: bytes, tmp_dir: Path, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"w-{uuid.uuid4().hex}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
