"""The repository: an object store and a ref store, and the verbs over them.

Writing happens in a :meth:`Repository.transaction`: new objects are staged
and become visible only when the transaction's commit publishes them, right
before the branch moves by compare-and-swap.  A failure anywhere before that
leaves ``objects/`` and every ref exactly as they were.

Concurrent committers: a commit is computed as a function of the branch tip
(``update(population) -> population``).  If the tip moves between reading it
and swapping the ref, the function is applied again to the new tip and the
swap retried, so concurrent imports give a linear history containing every
commit.  With ``retries=0`` the loser gets a :class:`ConflictError` instead.
"""

from __future__ import annotations

import contextlib
import getpass
import heapq
import json
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import canonical
from .arrays import StoredArray, write_array
from .canonical import Ref
from .errors import AlreadyExistsError, ConflictError, FormatError, InvalidInputError, NotFoundError
from .fsutil import write_atomic
from .hashing import Kind, ObjectId, is_object_id
from .records import ArrayManifest, Commit, Operation, Population, Record, parse_record
from .refs import ANY, DiskRefStore, MemoryRefStore, RefStore, validate_ref_name
from .store import DiskObjectStore, MemoryObjectStore, ObjectStore, StagingStore
from .version import __version__

__all__ = ["Repository", "Head", "REPO_DIR", "software_version", "utc_now"]

REPO_DIR = ".cryopool"
CONFIG_VERSION = 1
R = TypeVar("R", bound=Record)
_REV_SUFFIX = re.compile(r"(~\d*|\^\d*)$")


def software_version() -> str:
    return f"cryopool {__version__}"


def utc_now() -> str:
    """Commit time; ``CRYOPOOL_COMMIT_TIME`` pins it for reproducible histories."""
    pinned = os.environ.get("CRYOPOOL_COMMIT_TIME")
    if pinned:
        return pinned
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def user_config_path() -> Path:
    """The per-user settings file (``cryopool config --global``): $XDG_CONFIG_HOME/cryopool/config.json."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "cryopool" / "config.json"


def read_user_config() -> dict:
    try:
        value = json.loads(user_config_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"settings file is unreadable ({exc})", path=str(user_config_path())) from None
    return value if isinstance(value, dict) else {}


def author_of(user: dict) -> str | None:
    """``Name <email>`` from a ``user`` settings section, if it names someone."""
    name, email = user.get("name"), user.get("email")
    if not name:
        return None
    return f"{name} <{email}>" if email else str(name)


def default_author(config: dict | None = None) -> str:
    """Who is committing: $CRYOPOOL_AUTHOR, else the repository's user.name/email, else the user's settings
    (``cryopool config --global``), else login@host."""
    env = os.environ.get("CRYOPOOL_AUTHOR")
    if env:
        return env
    for user in ((config or {}).get("user", {}), read_user_config().get("user", {})):
        who = author_of(user)
        if who:
            return who
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _deferred_fetcher(store: DiskObjectStore, remote: dict) -> Callable[[list[str]], None]:
    """The partial clone's fallback, with the network layer imported on its first use, not on every open."""
    fetch: list[Callable[[list[str]], None]] = []

    def fallback(ids: list[str]) -> None:
        if not fetch:
            from .transport import deferred_fetcher
            fetch.append(deferred_fetcher(store, remote))
        fetch[0](ids)
    return fallback


@dataclass(frozen=True)
class Head:
    branch: str | None  # short branch name, None when detached
    commit: ObjectId | None  # None on an unborn branch


@dataclass
class Repository:
    """Open with :meth:`init`, :meth:`open` or :meth:`in_memory`."""

    store: ObjectStore
    refs: RefStore
    root: Path | None = None  # the .cryopool directory, None in memory
    config: dict[str, Any] = field(default_factory=dict)
    _staging: StagingStore | None = None
    # after a transaction: how many chunks and blobs it added (0: everything was already stored, deduplicated)
    last_new_data_objects: int | None = None

    # -- construction ---------------------------------------------------------------
    @classmethod
    def init(cls, path: str | os.PathLike = ".", *, initial_branch: str = "main",
             compression_level: int | None = 3) -> "Repository":
        """Create ``<path>/.cryopool``; refuses to overwrite an existing repository."""
        work = Path(path).resolve()
        root = work / REPO_DIR
        if root.exists():
            raise AlreadyExistsError("a cryopool repository already exists here", path=str(root))
        validate_ref_name(f"refs/heads/{initial_branch}")
        work.mkdir(parents=True, exist_ok=True)
        tmp_root = work / f".cryopool-init-{uuid.uuid4().hex}"
        for sub in ("objects", "refs/heads", "refs/tags", "refs/remotes", "logs", "tmp"):
            (tmp_root / sub).mkdir(parents=True)
        config = {"format_version": CONFIG_VERSION, "core": {"compression_level": compression_level},
                  "remotes": {}}
        (tmp_root / "config").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp_root / "HEAD").write_text(f"ref: refs/heads/{initial_branch}\n")
        os.replace(tmp_root, root)  # the repository appears whole or not at all
        return cls.open(work, search_parents=False)

    @classmethod
    def open(cls, path: str | os.PathLike = ".", *, search_parents: bool = True) -> "Repository":
        start = Path(path).resolve()
        candidates = [start, *start.parents] if search_parents else [start]
        for cand in candidates:
            root = cand / REPO_DIR if cand.name != REPO_DIR else cand
            if (root / "HEAD").is_file() and (root / "objects").is_dir():
                break
        else:
            raise NotFoundError("not a cryopool repository (or any parent)", path=str(start),
                                hint="run 'cryopool init' first")
        try:
            config = json.loads((root / "config").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise FormatError(f"repository config is unreadable ({exc})", path=str(root / "config")) from None
        if config.get("format_version") != CONFIG_VERSION:
            raise FormatError("unsupported repository format", path=str(root / "config"), field="format_version",
                              expected=CONFIG_VERSION, found=config.get("format_version"))
        level = config.get("core", {}).get("compression_level", 3)
        fsync = os.environ.get("CRYOPOOL_FSYNC", "1") != "0"
        store = DiskObjectStore(root / "objects", root / "tmp", compression_level=level, fsync=fsync)
        partial = config.get("partial")
        if partial:  # a partial clone: deferred objects come from the remote on first use
            remote = config.get("remotes", {}).get(partial.get("remote"))
            if remote is None:
                raise FormatError("partial clone names a remote the config lacks", path=str(root / "config"),
                                  field="partial.remote", found=partial.get("remote"))
            store.fallback = _deferred_fetcher(store, remote)
        return cls(store=store, refs=DiskRefStore(root, fsync=fsync), root=root, config=config)

    @classmethod
    def in_memory(cls, initial_branch: str = "main") -> "Repository":
        return cls(store=MemoryObjectStore(), refs=MemoryRefStore(initial_branch), root=None, config={})

    @property
    def work_dir(self) -> Path | None:
        return None if self.root is None else self.root.parent

    def author(self) -> str:
        return default_author(self.config)

    def save_config(self) -> None:
        if self.root is None:
            return
        data = (json.dumps(self.config, indent=2, sort_keys=True) + "\n").encode()
        write_atomic(self.root / "config", data, self.root / "tmp", mode=0o600)  # it may hold remote tokens
        os.chmod(self.root / "config", 0o600)  # umask may have narrowed it further; never wider

    # -- objects ----------------------------------------------------------------------
    def put_record(self, record: Record) -> Ref:
        return Ref(Kind.RECORD, self.store.put(Kind.RECORD, canonical.encode(record.to_value())))

    def get_record(self, ref: Ref | str, expect: type[R] | None = None) -> R:
        object_id = ref.id if isinstance(ref, Ref) else ObjectId(ref)
        kind, data = self.store.get(object_id)
        where = f"object {object_id}"
        if kind != Kind.RECORD:
            raise FormatError("object is not a record", path=where, found=kind.name.lower())
        record = parse_record(canonical.decode(data, where=where), where)
        if expect is not None and not isinstance(record, expect):
            raise FormatError("record has the wrong type", path=where, expected=expect.TYPE, found=record.TYPE)
        return record

    def put_blob(self, data: bytes) -> Ref:
        return Ref(Kind.BLOB, self.store.put(Kind.BLOB, data))

    def get_blob(self, ref: Ref | str) -> bytes:
        object_id = ref.id if isinstance(ref, Ref) else ObjectId(ref)
        kind, data = self.store.get(object_id)
        if kind != Kind.BLOB:
            raise FormatError("object is not a blob", path=f"object {object_id}", found=kind.name.lower())
        return bytes(data)

    def put_array(self, array: np.ndarray, *, chunks=None, attributes: dict | None = None,
                  progress: Callable[[int], None] | None = None, check=None) -> Ref:
        metadata, chunk_refs = write_array(self.store, array, chunks=chunks, attributes=attributes, progress=progress,
                                           check=check)
        return self.put_record(ArrayManifest(zarr=metadata, chunks=chunk_refs))

    def get_array(self, ref: Ref | str) -> StoredArray:
        manifest = self.get_record(ref, ArrayManifest)
        object_id = ref.id if isinstance(ref, Ref) else ref
        return StoredArray(self.store, manifest.zarr, tuple(manifest.chunks), where=f"array {object_id}")

    # -- revisions --------------------------------------------------------------------
    def head(self) -> Head:
        target = self.refs.head_target()
        branch = target[len("refs/heads/"):] if target and target.startswith("refs/heads/") else None
        return Head(branch, self.refs.read("HEAD"))

    def _ref_candidates(self, name: str) -> list[str]:
        if name == "HEAD" or name.startswith("refs/"):
            return [name]
        return [f"refs/heads/{name}", f"refs/tags/{name}", f"refs/remotes/{name}"]

    def resolve(self, rev: str = "HEAD") -> ObjectId:
        """A commit id from ``HEAD``, a branch, tag, remote ref, id prefix, with ``~N``/``^N``."""
        rev = rev.strip()
        m = _REV_SUFFIX.search(rev)
        if m and m.start() > 0:
            base = self.resolve(rev[: m.start()])
            op, num = m.group(0)[0], m.group(0)[1:]
            n = int(num) if num else 1
            if op == "~":
                for _ in range(n):
                    parents = self.get_commit(base).parents
                    if not parents:
                        raise NotFoundError(f"revision '{rev}' goes past the first commit")
                    base = parents[0].id
                return base
            parents = self.get_commit(base).parents
            if n == 0:
                return base
            if len(parents) < n:
                raise NotFoundError(f"revision '{rev}': commit has {len(parents)} parent(s)")
            return parents[n - 1].id
        for cand in self._ref_candidates(rev):
            try:
                value = self.refs.read(cand)
            except InvalidInputError:
                continue
            if value is not None:
                return value
            if cand == "HEAD":
                raise NotFoundError("HEAD has no commits yet (unborn branch)", hint="import something first")
        if re.fullmatch(r"[0-9a-f]{4,64}", rev):
            matches = self.find_ids(rev)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidInputError(f"ambiguous id prefix '{rev}'", found=[m[:12] for m in matches[:5]])
        raise NotFoundError(f"unknown revision '{rev}'", hint="use a branch, tag, commit id (prefix) or HEAD~N")

    def find_ids(self, prefix: str) -> list[ObjectId]:
        if is_object_id(prefix):
            return [ObjectId(prefix)] if self.store.has(prefix) else []
        if isinstance(self.store, DiskObjectStore):
            fan = self.store.root / prefix[:2]
            if not fan.is_dir():
                return []
            return sorted(ObjectId(prefix[:2] + p.name) for p in fan.iterdir() if (prefix[:2] + p.name).startswith(prefix))
        return [i for i in self.store.ids() if i.startswith(prefix)]

    def get_commit(self, rev_or_id: str | Ref) -> Commit:
        if isinstance(rev_or_id, Ref):
            return self.get_record(rev_or_id, Commit)
        object_id = rev_or_id if is_object_id(rev_or_id) else self.resolve(rev_or_id)
        return self.get_record(object_id, Commit)

    def population(self, rev: str = "HEAD") -> Population:
        return self.get_record(self.get_commit(rev).population, Population)

    def log(self, rev: str = "HEAD", *, first_parent: bool = False) -> Iterator[tuple[ObjectId, Commit]]:
        """Commits reachable from ``rev``, newest first, each parent after all its children."""
        start = self.resolve(rev)
        commits: dict[ObjectId, Commit] = {}
        children: dict[ObjectId, int] = {}
        stack = [start]
        while stack:  # gather the sub-DAG and count children, for a topological walk
            cid = stack.pop()
            if cid in commits:
                continue
            c = commits[cid] = self.get_commit(cid)
            parents = c.parents[:1] if first_parent else c.parents
            for p in parents:
                children[p.id] = children.get(p.id, 0) + 1
                stack.append(p.id)
        ready = [(_neg_time(commits[start].time_utc), start)]
        while ready:
            _, cid = heapq.heappop(ready)
            c = commits[cid]
            yield cid, c
            for p in (c.parents[:1] if first_parent else c.parents):
                children[p.id] -= 1
                if children[p.id] == 0:
                    heapq.heappush(ready, (_neg_time(commits[p.id].time_utc), p.id))

    # -- writing ----------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator["Repository"]:
        """A writer whose new objects appear only when its commit succeeds."""
        staging_dir = None if self.root is None else self.root / "tmp" / f"txn-{uuid.uuid4().hex}"
        staging = StagingStore(self.store, staging_dir)
        tx = Repository(store=staging, refs=self.refs, root=self.root, config=self.config, _staging=staging)
        try:
            yield tx
        finally:
            self.last_new_data_objects = staging.published_data_objects
            staging.discard()

    def publish(self) -> int:
        """Make a transaction's staged objects visible without committing (e.g. objects received from a remote)."""
        if self._staging is None:
            self.store.sync()
            return 0
        return self._staging.publish()

    def commit(
        self,
        update: Callable[[Population | None], Population] | Population,
        *,
        message: str,
        operation: Operation,
        branch: str | None = None,
        author: str | None = None,
        retries: int = 20,
        attachments: dict[str, Ref] | None = None,
        allow_empty: bool = False,
        extra_parents: list[str] | None = None,
    ) -> ObjectId:
        """Commit a new population on ``branch`` (default: HEAD's branch, or detached HEAD)."""
        if not isinstance(message, str) or not message.strip():
            raise InvalidInputError("a commit needs a message", field="message")
        ref_name = self.branch_ref(branch)
        author = author or self.author()
        for attempt in range(retries + 1):
            tip = self.refs.read(ref_name)
            base = self.population(tip) if tip else None
            population = update(base) if callable(update) else update
            if not isinstance(population, Population):
                raise InvalidInputError("commit needs a Population", found=type(population).__name__)
            pop_ref = self.put_record(population)
            if tip and not allow_empty and not extra_parents and self.get_commit(tip).population == pop_ref:
                raise InvalidInputError("nothing to commit: the population is unchanged", field="population")
            parents = ([Ref(Kind.RECORD, tip)] if tip else []) + [Ref(Kind.RECORD, p) for p in extra_parents or []]
            commit = Commit(population=pop_ref, parents=parents, author=author,
                            time_utc=utc_now(), message=message.strip(), operation=operation,
                            attachments=dict(attachments or {}))
            commit_ref = self.put_record(commit)
            if self._staging is not None:
                self._staging.publish()
            else:
                self.store.sync()
            try:
                self.refs.update(ref_name, commit_ref.id, expected=tip, author=author,
                                 message=f"{operation.kind}: {message.strip().splitlines()[0]}")
                return commit_ref.id
            except ConflictError:
                if attempt == retries or not callable(update):
                    raise
        raise AssertionError("unreachable")

    def branch_ref(self, branch: str | None = None) -> str:
        """The ref a commit on ``branch`` moves: ``refs/heads/<branch>``, HEAD's branch, or a detached HEAD."""
        if branch is not None:
            return validate_ref_name(branch if branch.startswith("refs/") else f"refs/heads/{branch}")
        return self.refs.head_target() or "HEAD"

    # -- branches and tags ------------------------------------------------------------
    def create_branch(self, name: str, rev: str = "HEAD", *, force: bool = False) -> ObjectId:
        ref_name = validate_ref_name(f"refs/heads/{name}")
        target = self.resolve(rev)
        self.refs.update(ref_name, target, expected=ANY if force else None, author=self.author(),
                         message=f"branch: created from {rev}")
        return target

    def reset(self, rev: str, *, branch: str | None = None) -> tuple[ObjectId | None, ObjectId]:
        """Move a branch (default: the checked-out one) to ``rev``; returns (old tip, new tip).

        Nothing is lost: the old tip stays reachable through the reflog (``reflog``) until ``gc`` and its
        grace period, so a reset is undone by resetting to it.
        """
        ref_name = self.branch_ref(branch)
        target = self.resolve(rev)
        self.get_commit(target)  # a commit, not some other object an id prefix names
        if self.root is not None and (self.root / "state").is_dir() and any((self.root / "state").iterdir()):
            raise ConflictError("an unfinished operation is waiting", hint="cryopool resolve or resolve --abort first")
        old = self.refs.read(ref_name)
        self.refs.update(ref_name, target, expected=old, author=self.author(), message=f"reset: moving to {rev}")
        return old, target

    def delete_ref(self, ref_name: str) -> None:
        current = self.refs.read(ref_name)
        if current is None:
            raise NotFoundError(f"no such ref {ref_name}")
        if ref_name == self.refs.head_target():
            raise ConflictError(f"cannot delete {ref_name}: it is checked out", hint="check out another branch first")
        self.refs.update(ref_name, None, expected=current, author=self.author(), message="deleted")

    def create_tag(self, name: str, rev: str = "HEAD") -> ObjectId:
        ref_name = validate_ref_name(f"refs/tags/{name}")
        target = self.resolve(rev)
        try:
            self.refs.update(ref_name, target, expected=None, author=self.author(), message=f"tag: {rev}")
        except ConflictError:
            raise AlreadyExistsError(f"tag '{name}' already exists") from None
        return target

    def checkout(self, rev: str, *, create: bool = False) -> Head:
        """Point HEAD at a branch (or create it), or detach it at a commit."""
        if create:
            self.create_branch(rev)
        if self.branch_exists(rev):
            self.refs.set_head(f"refs/heads/{rev}")
        else:
            self.refs.set_head(self.resolve(rev))
        return self.head()

    def branch_exists(self, name: str) -> bool:
        try:
            return self.refs.read(validate_ref_name(f"refs/heads/{name}")) is not None
        except InvalidInputError:
            return False


def _neg_time(t: str) -> tuple:
    # Newest first: invert the ISO string's characters' order for the min-heap.
    return tuple(-ord(ch) for ch in t)
