"""Refs: names for commits, moved only by compare-and-swap.

Layout (as git): ``HEAD`` holds ``ref: refs/heads/<branch>`` or a commit id;
``refs/heads/*``, ``refs/tags/*``, ``refs/remotes/<remote>/*`` hold one id
each; ``logs/<ref>`` is the reflog, one line per move:
``<old> <new> <unix seconds> <author>\\t<message>``.

Every update takes one repository-wide ``flock`` (released by the kernel if
the process dies, so a ``kill -9`` never leaves a stale lock), re-reads the
ref, compares it with what the caller expects, appends the reflog line, and
replaces the ref file atomically (temp file, fsync, rename, fsync dir).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .fsutil import write_atomic
from .errors import ConflictError, FormatError, IntegrityError, InvalidInputError, LockedError, NotFoundError
from .hashing import ObjectId, is_object_id

__all__ = ["RefStore", "DiskRefStore", "MemoryRefStore", "ReflogEntry", "validate_ref_name", "ANY", "ZERO_ID"]

ZERO_ID = "0" * 64


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()  # "don't compare" for update()

_COMPONENT = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_REFLOG_LINE = re.compile(rb"[0-9a-f]{64} [0-9a-f]{64} [0-9]+ [^\t\n]*\t[^\n]*")


def _valid_ref(name: str) -> bool:
    try:
        validate_ref_name(name)
    except InvalidInputError:
        return False
    return name.startswith("refs/")


def validate_ref_name(name: str) -> str:
    """Full ref names: ``HEAD`` or ``refs/...`` with safe components (no ``..``, no traversal)."""
    if name == "HEAD":
        return name
    parts = name.split("/") if isinstance(name, str) else []
    bad = (
        len(parts) < 3 or parts[0] != "refs" or len(name) > 255
        or any(not _COMPONENT.fullmatch(p) or p.endswith(".lock") or ".." in p for p in parts[1:])
    )
    if bad:
        raise InvalidInputError("invalid ref name", field="ref", found=repr(name),
                                expected="refs/<kind>/<name> with components of A-Z a-z 0-9 . _ + - (no '..', no '.lock')")
    return name


@dataclass(frozen=True)
class ReflogEntry:
    old: ObjectId | None
    new: ObjectId | None
    time: float
    author: str
    message: str


class RefStore(ABC):
    @abstractmethod
    def read(self, name: str) -> ObjectId | None:
        """The id a ref holds (``HEAD`` is followed if symbolic); None if absent."""

    @abstractmethod
    def head_target(self) -> str | None:
        """``refs/heads/<b>`` if HEAD is symbolic, None if detached."""

    @abstractmethod
    def set_head(self, target: str) -> None:
        """Point HEAD at a branch ref name or detach it at a commit id."""

    @abstractmethod
    def update(self, name: str, new: str | None, *, expected, author: str, message: str) -> None:
        """Compare-and-swap ``name`` from ``expected`` (None: absent; ANY) to ``new`` (None: delete)."""

    @abstractmethod
    def list(self, prefix: str = "refs/") -> dict[str, ObjectId]: ...

    @abstractmethod
    def reflog(self, name: str) -> list[ReflogEntry]: ...

    @abstractmethod
    def reflog_names(self) -> list[str]: ...

    def _resolve_head_name(self, name: str) -> str:
        if name == "HEAD":
            target = self.head_target()
            return target if target is not None else "HEAD"
        return validate_ref_name(name)


class MemoryRefStore(RefStore):
    """In-memory twin (tests); same semantics, a thread lock for the CAS."""

    def __init__(self, initial_branch: str = "main") -> None:
        self._refs: dict[str, ObjectId] = {}
        self._head: str = f"refs/heads/{initial_branch}"
        self._logs: dict[str, list[ReflogEntry]] = {}
        self._lock = threading.Lock()

    def read(self, name: str) -> ObjectId | None:
        if name == "HEAD" and not self._head.startswith("refs/"):
            return ObjectId(self._head)
        return self._refs.get(self._resolve_head_name(name))

    def head_target(self) -> str | None:
        return self._head if self._head.startswith("refs/") else None

    def set_head(self, target: str) -> None:
        self._head = validate_ref_name(target) if target.startswith("refs/") else ObjectId(target)

    def update(self, name: str, new: str | None, *, expected, author: str, message: str) -> None:
        with self._lock:
            real = self._resolve_head_name(name)
            detached = None if self._head.startswith("refs/") else ObjectId(self._head)
            current = self.read(real) if real != "HEAD" else detached
            _compare(real, current, expected)
            self._logs.setdefault(real, []).append(
                ReflogEntry(current, None if new is None else ObjectId(new), time.time(), author, message))
            if real == "HEAD":
                self._head = ObjectId(new)
            elif new is None:
                self._refs.pop(real, None)
            else:
                self._refs[real] = ObjectId(new)

    def list(self, prefix: str = "refs/") -> dict[str, ObjectId]:
        return {k: v for k, v in sorted(self._refs.items()) if k.startswith(prefix)}

    def reflog(self, name: str) -> list[ReflogEntry]:
        return list(self._logs.get(self._resolve_head_name(name), []))

    def reflog_names(self) -> list[str]:
        return sorted(self._logs)


def _compare(name: str, current: ObjectId | None, expected) -> None:
    if expected is ANY:
        return
    if (current or None) != (expected or None):
        raise ConflictError(
            f"ref {name} moved: another process updated it first", expected=expected or "no ref",
            found=current or "no ref", hint="re-read the branch and try again (your objects are kept)")


class DiskRefStore(RefStore):
    def __init__(self, root: Path, *, lock_timeout_s: float = 60.0, fsync: bool = True) -> None:
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s
        self.fsync = fsync
        self._thread_lock = threading.Lock()

    # -- locking ------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock over all refs, across processes and threads."""
        with self._thread_lock:
            fd = os.open(self.root / "refs.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                deadline = time.monotonic() + self.lock_timeout_s
                delay = 0.001
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise LockedError("refs are locked by another process", path=str(self.root / "refs.lock"),
                                              hint=f"waited {self.lock_timeout_s:.0f} s") from None
                        time.sleep(delay)
                        delay = min(delay * 2, 0.05)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    # -- reading ------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.root / name

    def _read_file(self, name: str) -> str | None:
        try:
            text = self._path(name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return text

    def head_target(self) -> str | None:
        text = self._read_file("HEAD")
        if text is None:
            raise NotFoundError("HEAD is missing", path=str(self.root / "HEAD"))
        return text[5:].strip() if text.startswith("ref: ") else None

    def read(self, name: str) -> ObjectId | None:
        real = self._resolve_head_name(name)
        text = self._read_file(real)
        if text is None:
            return None
        try:
            return ObjectId(text)
        except InvalidInputError:
            raise FormatError("ref file does not hold an object id", path=str(self._path(real)), found=text[:80]) from None

    def set_head(self, target: str) -> None:
        text = f"ref: {validate_ref_name(target)}\n" if target.startswith("refs/") else f"{ObjectId(target)}\n"
        with self.locked():
            self._write_atomic(self._path("HEAD"), text)

    # -- writing ------------------------------------------------------------------
    def _write_atomic(self, path: Path, text: str) -> None:
        write_atomic(path, text.encode("utf-8"), self.root / "tmp", fsync=self.fsync)

    def _append_log(self, name: str, old: str | None, new: str | None, author: str, message: str) -> None:
        path = self.root / "logs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        author = author.replace("\n", " ").replace("\t", " ")
        message = message.splitlines()[0] if message else ""
        line = f"{old or ZERO_ID} {new or ZERO_ID} {int(time.time())} {author}\t{message}\n"
        if any(p.is_symlink() for p in path.parents if self.root in p.parents):
            raise IntegrityError("a reflog directory is a symbolic link: refusing to write through it",
                                 path=str(path.parent))
        existed = path.exists()
        try:  # never through a symbolic link: a shared directory remote must not write outside itself
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IntegrityError("the reflog is a symbolic link: refusing to write through it",
                                     path=str(path)) from None
            raise
        try:
            start = os.fstat(fd).st_size
            try:
                data, written = line.encode("utf-8"), 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                if self.fsync:
                    os.fsync(fd)
            except OSError:  # a full disk: no half line (the next entry would be glued to it), no empty log
                os.ftruncate(fd, start)
                if not existed:
                    path.unlink(missing_ok=True)
                raise
        finally:
            os.close(fd)

    def update(self, name: str, new: str | None, *, expected, author: str, message: str) -> None:
        if new is not None:
            new = ObjectId(new)
        with self.locked():
            real = self._resolve_head_name(name)
            current = self.read(real)
            _compare(real, current, expected)
            # The reflog line goes first: if we die between the two writes the
            # log names one id too many (harmless: gc keeps it), never too few.
            self._append_log(real, current, new, author, message)
            if new is None:
                self._path(real).unlink(missing_ok=True)
            else:
                self._write_atomic(self._path(real), f"{new}\n")

    def list(self, prefix: str = "refs/") -> dict[str, ObjectId]:
        out: dict[str, ObjectId] = {}
        base = self.root / "refs"
        if not base.is_dir():
            return out
        for path in sorted(base.rglob("*")):
            if path.is_file():
                name = path.relative_to(self.root).as_posix()
                if name.startswith(prefix):
                    value = self.read(name)
                    if value is not None:
                        out[name] = value
        return out

    def reflog(self, name: str) -> list[ReflogEntry]:
        path = self.root / "logs" / self._resolve_head_name(name)
        entries = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return entries
        for line in lines:
            try:
                head, message = line.split("\t", 1)
                old, new, t, author = head.split(" ", 3)
                entries.append(ReflogEntry(None if old == ZERO_ID else ObjectId(old),
                                           None if new == ZERO_ID else ObjectId(new), float(t), author, message))
            except (ValueError, InvalidInputError):
                # A line cut short by a crash is the only expected damage: skip it, keep the rest.
                continue
        return entries

    def reflog_names(self) -> list[str]:
        base = self.root / "logs"
        if not base.is_dir():
            return []
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def problems(self) -> list[tuple[str, str]]:
        """(file, what is wrong) for HEAD, every ref file and every reflog: each byte must mean something.

        HEAD is ``ref: <valid ref name>\\n`` or ``<id>\\n``; a ref file is ``<id>\\n``; a reflog
        line is ``old new time author\\tmessage``, and only its last line may be cut short (a crash
        while appending). Symbolic links are refused anywhere under refs/ and logs/.
        """
        out: list[tuple[str, str]] = []
        head = self.root / "HEAD"
        try:
            text = head.read_bytes().decode("utf-8")
        except (FileNotFoundError, UnicodeDecodeError) as exc:
            return [(str(head), f"unreadable ({exc})")]
        body = text[:-1] if text.endswith("\n") else None
        target = body[5:] if body is not None and body.startswith("ref: ") else None
        if body is None or not (_valid_ref(target) if target is not None else is_object_id(body)):
            out.append((str(head), f"expected 'ref: refs/heads/<name>' or a commit id and a newline, found "
                                   f"{text[:80]!r}"))
        for base in (self.root / "refs", self.root / "logs"):
            for path in sorted(base.rglob("*")) if base.is_dir() else []:
                if path.is_symlink():
                    out.append((str(path), "symbolic link (refs and reflogs must be plain files)"))
                elif path.is_file() and base.name == "refs":
                    raw = path.read_bytes()
                    if not (raw.endswith(b"\n") and is_object_id(raw[:-1].decode("ascii", "replace"))):
                        out.append((str(path), f"expected a commit id and a newline, found {raw[:80]!r}"))
                elif path.is_file():
                    lines = path.read_bytes().split(b"\n")
                    for n, line in enumerate(lines[:-1], 1):  # the part after the last newline may be torn
                        if not _REFLOG_LINE.fullmatch(line):
                            out.append((str(path), f"line {n} is not a reflog entry: {line[:80]!r}"))
                            break
        return out
