"""Remotes: clone, fetch, push (porcelain over :mod:`transport`).

A remote is another repository named in the config (``remotes.<name>``: a
path, a ``cryopool serve`` URL, or an fsspec URL such as ``s3://…``).
Transfers walk the object graph from the refs being sent and move only the
objects the other side lacks (an object a repository has implies its whole
subgraph: objects are stored children first). The receiver re-hashes every
object before storing it; a ref moves only when everything it needs is
there, by compare-and-swap. Interrupted transfers resume: what arrived stays.
"""

from __future__ import annotations

import errno
import shutil
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import canonical
from .errors import AlreadyExistsError, ConflictError, InvalidInputError, NotFoundError
from .hashing import Kind, ObjectId
from .refs import validate_ref_name
from .repository import REPO_DIR, Repository
from .transport import (DirTransport, Transport, batches, children_first, children_of, is_url, open_transport,
                        receive_object)

__all__ = ["TransferStats", "transfer", "receive", "send", "add_remote", "remove_remote", "open_remote", "fetch",
           "push", "clone", "is_ancestor", "deferred_objects", "fetch_deferred", "readable_at"]


@dataclass
class TransferStats:
    objects: int = 0
    bytes: int = 0
    skipped: int = 0
    deferred: int = 0  # raw tilt-series chunks a partial clone leaves on the remote


def receive(dst: Repository, transport: Transport, roots: list[str], progress: Callable[[int], None] | None = None,
            *, defer_raw: bool = False) -> TransferStats:
    """Bring every object reachable from ``roots`` that ``dst`` lacks; resumable.

    The walk goes level by level, one batched request per level. Chunks and
    blobs (nearly all the bytes) are stored the moment they arrive and
    re-hash, so an interrupted transfer keeps them and a retry skips them.
    Records are stored only after everything they refer to, children first,
    so ``dst`` stays closed under references and the next walk may stop at
    any record it has. ``defer_raw`` leaves the chunks of tilt-series stacks
    on the remote (a partial clone fetches them on first use).
    """
    stats = TransferStats()
    pending: dict[str, tuple[bytes, list[str]]] = {}
    deferred_arrays: set[str] = set()
    frontier, seen = list(roots), set()
    while frontier:
        want = []
        for oid in frontier:
            if oid in seen:
                continue
            seen.add(oid)
            if dst.store.has(oid):
                stats.skipped += 1
            else:
                want.append(oid)
        frontier = []
        for oid, raw in transport.get_many(want):
            kind, data = receive_object(oid, raw, f"object from {transport.url}")
            stats.objects += 1
            stats.bytes += len(data)
            if progress:
                progress(len(data))
            if kind != Kind.RECORD:
                dst.store.put(kind, data)
                continue
            value = canonical.decode(data, where=f"object {oid} from {transport.url}")
            kids = [r.id for r in canonical.walk_refs(value)]
            pending[oid] = (data, kids)
            if defer_raw and isinstance(value, dict) and value.get("_type") == "TiltSeries":
                deferred_arrays.add(value["stack"].id)
            if oid in deferred_arrays:
                stats.deferred += sum(1 for k in kids if not dst.store.has(k))
                continue
            frontier.extend(k for k in kids if k not in seen)
    dst.store.sync()  # the leaves are durable before any record that needs them appears
    for level in children_first({oid: kids for oid, (_, kids) in pending.items()}):
        for oid in level:
            dst.store.put(Kind.RECORD, pending[oid][0])
        dst.store.sync()
    return stats


def send(src: Repository, transport: Transport, root: str,
         progress: Callable[[int], None] | None = None) -> TransferStats:
    """Store on the remote everything reachable from ``root`` that it lacks, children first; resumable.

    Negotiation walks our graph level by level, asking the remote which
    objects it lacks and stopping at those it has. Everything to send is read
    and re-hashed here first, so a damaged object stops the push before the
    remote receives anything; then levels go out in batches, leaves first.
    """
    stats = TransferStats()
    graph: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    frontier, seen = [root], set()
    while frontier:
        ask = [o for o in dict.fromkeys(frontier) if o not in seen]
        seen.update(ask)
        absent = transport.missing(ask) if ask else set()
        stats.skipped += len(ask) - len(absent)
        frontier = []
        for oid in ask:
            if oid in absent:
                kind, data = src.store.get(oid, verify=True)
                graph[oid] = children_of(kind, data, f"object {oid}")
                sizes[oid] = len(data)
                frontier.extend(graph[oid])
    for level in children_first(graph):
        for batch in batches(level, sizes.__getitem__):
            objects = [(oid, *src.store.get(oid)) for oid in batch]
            transport.put_many([(oid, kind, bytes(data)) for oid, kind, data in objects])
            stats.objects += len(batch)
            stats.bytes += sum(sizes[o] for o in batch)
            if progress:
                progress(sum(sizes[o] for o in batch))
    return stats


def transfer(src: Repository, dst: Repository, roots: list[str],
             progress: Callable[[int], None] | None = None) -> TransferStats:
    """Copy what ``dst`` lacks from ``src`` (a repository on this machine)."""
    return receive(dst, DirTransport(src.root), roots, progress)


def _remotes(repo: Repository) -> dict:
    return repo.config.setdefault("remotes", {})


def add_remote(repo: Repository, name: str, url: str, token: str | None = None,
               options: dict | None = None) -> None:
    """Name a remote: a shared-filesystem path, a ``cryopool serve`` URL (token), or an fsspec URL (options)."""
    validate_ref_name(f"refs/remotes/{name}/x")
    if name in _remotes(repo):
        raise AlreadyExistsError(f"remote '{name}' already exists")
    _remotes(repo)[name] = {"url": str(url).rstrip("/") if is_url(url) else str(Path(url).resolve())}
    if token:
        _remotes(repo)[name]["token"] = token
    if options:
        _remotes(repo)[name]["options"] = dict(options)
    repo.save_config()


def remove_remote(repo: Repository, name: str) -> None:
    if name not in _remotes(repo):
        raise NotFoundError(f"no remote named '{name}'")
    if repo.config.get("partial", {}).get("remote") == name:
        raise InvalidInputError(f"remote '{name}' still holds data this partial clone has not fetched",
                                hint=f"cryopool fetch {name} --deferred first")
    del _remotes(repo)[name]
    repo.save_config()
    for ref in repo.refs.list(f"refs/remotes/{name}/"):
        repo.refs.update(ref, None, expected=repo.refs.read(ref), author=repo.author(), message="remote removed")


def open_remote(repo: Repository, name: str) -> Transport:
    if name not in _remotes(repo):
        raise NotFoundError(f"no remote named '{name}'", hint="cryopool remote add NAME PATH-OR-URL")
    cfg = _remotes(repo)[name]
    return open_transport(cfg["url"], token=cfg.get("token"), options=cfg.get("options"))


def is_ancestor(repo: Repository, ancestor: str, descendant: str) -> bool:
    queue, seen = deque([descendant]), set()
    while queue:
        c = queue.popleft()
        if c == ancestor:
            return True
        if c in seen:
            continue
        seen.add(c)
        queue.extend(p.id for p in repo.get_commit(c).parents)
    return False


def fetch(repo: Repository, name: str, progress=None) -> tuple[TransferStats, dict[str, ObjectId]]:
    """Bring the remote's branches into ``refs/remotes/<name>/*`` (a partial clone keeps deferring raw data)."""
    transport = open_remote(repo, name)
    try:
        heads, _ = transport.heads()
        defer = repo.config.get("partial", {}).get("remote") == name
        stats = receive(repo, transport, list(heads.values()), progress, defer_raw=defer)
    finally:
        transport.close()
    updated = {}
    for ref, cid in heads.items():
        local = f"refs/remotes/{name}/{ref.removeprefix('refs/heads/')}"
        if repo.refs.read(local) != cid:
            repo.refs.update(local, cid, expected=repo.refs.read(local), author=repo.author(),
                             message=f"fetch from {name}")
            updated[local] = cid
    return stats, updated


def deferred_objects(repo: Repository) -> list[str]:
    """Chunks of tilt-series stacks reachable from any ref that a partial clone has not fetched yet."""
    out, seen = [], set()
    for tip in set(repo.refs.list("refs/").values()):
        for _, commit in repo.log(tip):
            population = repo.get_record(commit.population)
            for source_ref in population.data_sources.values():
                for item_ref in repo.get_record(source_ref).items.values():
                    if item_ref.id in seen:
                        continue
                    seen.add(item_ref.id)
                    stack = repo.get_record(item_ref).stack
                    out.extend(r.id for r in repo.get_record(stack).chunks if not repo.store.has(r.id))
    return list(dict.fromkeys(out))


def fetch_deferred(repo: Repository, progress=None) -> TransferStats:
    """Fetch everything a partial clone deferred, after which it is a full clone."""
    partial = repo.config.get("partial")
    if not partial:
        return TransferStats()
    want = deferred_objects(repo)
    stats = receive(repo, open_remote(repo, partial["remote"]), want, progress)
    if not deferred_objects(repo):
        del repo.config["partial"]
        repo.save_config()
    return stats


def push(repo: Repository, name: str, branch: str | None = None, *, force: bool = False,
         progress=None) -> tuple[TransferStats, ObjectId]:
    """Send ``branch`` (default: the checked-out one) to the remote's branch of the same name.

    Compare-and-swap on the remote ref: refused unless a fast-forward (or
    ``force``); of two labs pushing at once one wins, the other gets a
    conflict and loses nothing. An interrupted push resumes where it stopped.
    """
    branch = branch or repo.head().branch
    if branch is None:
        raise InvalidInputError("HEAD is detached: name the branch to push")
    cid = repo.resolve(f"refs/heads/{branch}")
    target = f"refs/heads/{branch}"
    transport = open_remote(repo, name)
    try:
        current = transport.heads()[0].get(target)
        if current is not None and not force and (not repo.store.has(current) or not is_ancestor(repo, current, cid)):
            raise ConflictError(f"push to {name}/{branch} refused: not a fast-forward",
                                hint=f"fetch and merge {name}/{branch} first (or --force)")
        stats = send(repo, transport, cid, progress)
        transport.update_ref(target, current, cid, author=repo.author())
    finally:
        transport.close()
    local = f"refs/remotes/{name}/{branch}"
    repo.refs.update(local, cid, expected=repo.refs.read(local), author=repo.author(), message=f"push to {name}")
    return stats, cid


def readable_at(location: str, roots: list[str], cache: str | Path, *, token: str | None = None) -> Repository:
    """A repository from which everything reachable from ``roots`` can be read: the one at ``location`` if that is a
    path, or, for a URL (``cryopool serve``, ``s3://…``), a local cache into which those objects are received,
    each re-hashed on arrival (what the cache already holds is not fetched again). For processes that read part of
    a repository they do not own, such as refinement workers on other machines."""
    if not is_url(location):
        return Repository.open(location, search_parents=False)
    try:
        repo = Repository.init(cache)
    except AlreadyExistsError:
        repo = Repository.open(cache, search_parents=False)
    transport = open_transport(location, token=token)
    try:
        receive(repo, transport, roots)
    finally:
        transport.close()
    return repo


def clone(url: str, directory: str, progress=None, token: str | None = None, *, options: dict | None = None,
          partial: bool = False) -> Repository:
    """A new repository with ``origin`` = ``url``, its branches fetched and its HEAD branch checked out.

    ``partial``: leave raw tilt-series chunks on the remote; they are fetched
    (and re-hashed) the first time something reads them. A clone that was
    interrupted (killed, network lost) is resumed by running it again into the
    same directory: what arrived stays. One stopped by a full disk removes
    the directory it made, to give the space back.
    """
    url = str(url)
    target = Path(directory)
    existed = target.exists()
    try:
        return _clone_into(url, target, progress, token, options, partial)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # wherever it happens: init, config, objects, refs
            shutil.rmtree(target / REPO_DIR if existed else target, ignore_errors=True)
        raise


def _clone_into(url: str, target: Path, progress, token: str | None, options: dict | None,
                partial: bool) -> Repository:
    if (target / REPO_DIR).exists():
        repo = Repository.open(target, search_parents=False)
        if repo.config.get("cloning") != url:
            raise AlreadyExistsError("a cryopool repository already exists here", path=str(repo.root),
                                     hint="clone into a new directory")
    else:
        transport = open_transport(url, token=token, options=options)
        try:
            _, head_branch = transport.heads()
        finally:
            transport.close()
        repo = Repository.init(target, initial_branch=head_branch or "main")
        add_remote(repo, "origin", url, token, options)
        repo.config["cloning"] = url  # until the branches are set: a re-run resumes instead of refusing
        if partial:
            repo.config["partial"] = {"remote": "origin", "deferred": "tilt-series stack chunks"}
        repo.save_config()
        repo = Repository.open(repo.work_dir, search_parents=False)
    fetch(repo, "origin", progress)
    for ref, cid in repo.refs.list("refs/remotes/origin/").items():  # all of them: a resumed clone too
        short = ref.removeprefix("refs/remotes/origin/")
        local = f"refs/heads/{short}"
        repo.refs.update(local, cid, expected=repo.refs.read(local), author=repo.author(),
                         message=f"clone from {url}")
    del repo.config["cloning"]
    repo.save_config()
    return repo
