"""``gc``: delete objects no ref, reflog entry or unfinished operation can reach.

Safe beside concurrent writers: an object younger than the grace period is
never deleted, writing an object that already exists refreshes its mtime, and
staged objects keep their fresh mtime when they are published; so anything a
running transaction is about to reference is protected.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from dataclasses import dataclass

from . import canonical
from .errors import CryopoolError
from .hashing import Kind
from .repository import Repository
from .verify import roots

__all__ = ["gc", "GcReport", "reachable"]

DEFAULT_GRACE_S = 3600.0


@dataclass
class GcReport:
    reachable: int
    removed: int
    bytes_freed: int
    kept_young: int
    tmp_removed: int
    dry_run: bool


def reachable(repo: Repository, *, include_reflogs: bool = True) -> set[str]:
    """Ids of every object reachable from the roots (missing ones are skipped)."""
    seen: set[str] = set()
    queue = deque(roots(repo, include_reflogs=include_reflogs))
    while queue:
        object_id = queue.popleft()
        if object_id in seen or not repo.store.has(object_id):
            continue
        seen.add(object_id)
        try:
            if repo.store.info(object_id).kind != Kind.RECORD:
                continue
            # walked without re-hashing: a damaged record's children stay alive (verify reports the damage)
            _, data = repo.store.get(object_id, verify=False)
            value = canonical.decode(data, check_canonical=False)
        except CryopoolError:
            continue  # damaged: verify reports it; keep what we can reach
        queue.extend(ref.id for ref in canonical.walk_refs(value) if ref.id not in seen)
    return seen


def gc(repo: Repository, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False) -> GcReport:
    live = reachable(repo)
    now = time.time()
    removed = freed = young = 0
    for object_id in list(repo.store.ids()):
        if object_id in live:
            continue
        try:
            mtime, size = (info := repo.store.info(object_id)).mtime, info.stored_size
        except CryopoolError:  # damaged and unreachable: garbage like any other (verify never reaches it)
            stat = repo.store.path(object_id).stat() if hasattr(repo.store, "path") else None
            mtime, size = (stat.st_mtime, stat.st_size) if stat else (0.0, 0)
        if now - mtime < grace_s:
            young += 1
            continue
        removed += 1
        freed += size
        if not dry_run:
            repo.store.delete(object_id)
    tmp_removed = 0
    if repo.root is not None and (repo.root / "tmp").is_dir():
        for path in (repo.root / "tmp").iterdir():  # leftovers of killed transactions
            if now - _newest_mtime(path) < grace_s:
                continue
            tmp_removed += 1
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if not dry_run:
        repo.store.sync()
    return GcReport(len(live), removed, freed, young, tmp_removed, dry_run)


def _newest_mtime(path) -> float:
    """Newest mtime of a path or of any directory below it (a live transaction writes there)."""
    try:
        newest = path.stat().st_mtime
    except FileNotFoundError:
        return time.time()
    if path.is_dir():
        for dirpath, _, _ in os.walk(path):
            try:
                newest = max(newest, os.stat(dirpath).st_mtime)
            except FileNotFoundError:
                continue
    return newest
