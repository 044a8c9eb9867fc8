"""Remotes on a shared filesystem: clone, fetch, push, pull.

A remote is another repository, named in the config (``remotes.<name>.url``).
Transfers walk the object graph from the refs being sent and copy only the
objects the receiver lacks (an object the receiver has implies its whole
subgraph: repositories publish objects before any ref can point to them).
Every object is re-hashed as it is read from the sender and written through
a staging area on the receiver, so nothing is visible there until all of it
arrived; only then does a ref move, by compare-and-swap. A push that is not a
fast-forward is refused unless forced; of two labs pushing at once, one wins
and the other gets a clear conflict and loses nothing.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from . import canonical
from .errors import AlreadyExistsError, ConflictError, IntegrityError, InvalidInputError, NotFoundError
from .hashing import Kind, ObjectId
from .refs import validate_ref_name
from .repository import Repository, default_author
from .store import decode_object_file, encode_object_file

__all__ = ["TransferStats", "transfer", "add_remote", "remove_remote", "open_remote", "fetch", "push", "clone",
           "is_ancestor", "HttpRemote"]


class HttpRemote:
    """A repository served by ``cryopool serve`` (see ``server.py``), spoken to with httpx."""

    def __init__(self, url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=120.0)

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code == 409:
            raise ConflictError(f"the server refused the ref update: {r.json().get('detail', r.text)}",
                                hint="fetch and merge first (or --force)")
        if r.status_code >= 400:
            detail = r.json().get("detail", r.text) if "json" in r.headers.get("content-type", "") else r.text
            raise InvalidInputError(f"server answered {r.status_code}: {detail}", path=self.url)
        return r

    def heads(self) -> tuple[dict[str, ObjectId], str | None]:
        data = self._check(self.client.get("/refs")).json()
        return {k: ObjectId(v) for k, v in data["refs"].items() if k.startswith("refs/heads/")}, data.get("head")

    def missing(self, ids: list[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(ids), 10_000):
            out |= set(self._check(self.client.post("/objects/missing", json={"ids": ids[i:i + 10_000]})).json()["missing"])
        return out

    def get(self, oid: str) -> tuple[Kind, bytes]:
        body = self._check(self.client.get(f"/objects/{oid}")).content
        return decode_object_file(body, f"object {oid} from {self.url}")

    def put(self, oid: str, kind: Kind, data: bytes) -> None:
        self._check(self.client.put(f"/objects/{oid}", content=encode_object_file(kind, data, 3)))

    def update_ref(self, name: str, old: str | None, new: str) -> None:
        self._check(self.client.post(f"/refs/{name}", json={"old": old, "new": new}))


def _is_url(text) -> bool:
    return str(text).startswith(("http://", "https://"))


@dataclass
class TransferStats:
    objects: int = 0
    bytes: int = 0
    skipped: int = 0


def _receive(dst: Repository, roots: list[str], get: Callable[[str], tuple[Kind, bytes]],
             progress: Callable[[int], None] | None = None) -> TransferStats:
    """Copy every object reachable from ``roots`` that ``dst`` lacks, via ``get``; re-hash; publish all at once."""
    stats = TransferStats()
    with dst.transaction() as tx:
        queue, seen = deque(roots), set()
        while queue:
            oid = queue.popleft()
            if oid in seen:
                continue
            seen.add(oid)
            if dst.store.has(oid):
                stats.skipped += 1
                continue
            kind, data = get(oid)
            got = tx.store.put(kind, data)
            if got != oid:
                raise IntegrityError("received object does not hash to its id", path=f"object {oid}", found=got)
            stats.objects += 1
            stats.bytes += len(data)
            if progress:
                progress(len(data))
            if kind == Kind.RECORD:
                queue.extend(r.id for r in canonical.walk_refs(canonical.decode(data)) if r.id not in seen)
        tx.publish()
    return stats


def transfer(src: Repository, dst: Repository, roots: list[str],
             progress: Callable[[int], None] | None = None) -> TransferStats:
    """Copy what ``dst`` lacks from ``src`` (each object verified as it is read: damage names the object)."""
    return _receive(dst, roots, lambda oid: src.store.get(oid, verify=True), progress)


def _remotes(repo: Repository) -> dict:
    return repo.config.setdefault("remotes", {})


def add_remote(repo: Repository, name: str, url: str, token: str | None = None) -> None:
    """Name a remote: a path on a shared filesystem, or the URL of a ``cryopool serve`` (token optional)."""
    validate_ref_name(f"refs/remotes/{name}/x")
    if name in _remotes(repo):
        raise AlreadyExistsError(f"remote '{name}' already exists")
    _remotes(repo)[name] = {"url": str(url).rstrip("/") if _is_url(url) else str(Path(url).resolve())}
    if token:
        _remotes(repo)[name]["token"] = token
    repo.save_config()


def remove_remote(repo: Repository, name: str) -> None:
    if name not in _remotes(repo):
        raise NotFoundError(f"no remote named '{name}'")
    del _remotes(repo)[name]
    repo.save_config()
    for ref in repo.refs.list(f"refs/remotes/{name}/"):
        repo.refs.update(ref, None, expected=repo.refs.read(ref), author=default_author(), message="remote removed")


def open_remote(repo: Repository, name: str) -> Repository | HttpRemote:
    if name not in _remotes(repo):
        raise NotFoundError(f"no remote named '{name}'", hint="cryopool remote add NAME PATH-OR-URL")
    cfg = _remotes(repo)[name]
    if _is_url(cfg["url"]):
        return HttpRemote(cfg["url"], cfg.get("token") or os.environ.get("CRYOPOOL_TOKEN"))
    return Repository.open(cfg["url"], search_parents=False)


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
    """Bring the remote's branches into ``refs/remotes/<name>/*``."""
    remote = open_remote(repo, name)
    if isinstance(remote, HttpRemote):
        heads, _ = remote.heads()
        stats = _receive(repo, list(heads.values()), remote.get, progress)
    else:
        heads = remote.refs.list("refs/heads/")
        stats = transfer(remote, repo, list(heads.values()), progress)
    updated = {}
    for ref, cid in heads.items():
        local = f"refs/remotes/{name}/{ref.removeprefix('refs/heads/')}"
        if repo.refs.read(local) != cid:
            repo.refs.update(local, cid, expected=repo.refs.read(local), author=default_author(),
                             message=f"fetch from {name}")
            updated[local] = cid
    return stats, updated


def push(repo: Repository, name: str, branch: str | None = None, *, force: bool = False,
         progress=None) -> tuple[TransferStats, ObjectId]:
    """Send ``branch`` (default: the checked-out one) to the remote's branch of the same name."""
    branch = branch or repo.head().branch
    if branch is None:
        raise InvalidInputError("HEAD is detached: name the branch to push")
    cid = repo.resolve(f"refs/heads/{branch}")
    remote = open_remote(repo, name)
    target = f"refs/heads/{branch}"
    if isinstance(remote, HttpRemote):
        return _push_http(repo, remote, target, cid, force, name, branch, progress), cid
    current = remote.refs.read(target)
    if current is not None and not force:
        if not repo.store.has(current) or not is_ancestor(repo, current, cid):
            raise ConflictError(f"push to {name}/{branch} refused: not a fast-forward",
                                hint=f"fetch and merge {name}/{branch} first (or --force)")
    stats = transfer(repo, remote, [cid], progress)
    remote.refs.update(target, cid, expected=current, author=default_author(), message=f"push from {repo.work_dir}")
    repo.refs.update(f"refs/remotes/{name}/{branch}", cid, expected=repo.refs.read(f"refs/remotes/{name}/{branch}"),
                     author=default_author(), message=f"push to {name}")
    return stats, cid


def _push_http(repo: Repository, remote: HttpRemote, target: str, cid: str, force: bool, name: str,
               branch: str, progress: Callable[[int], None] | None = None) -> TransferStats:
    heads, _ = remote.heads()
    current = heads.get(target)
    if current is not None and not force and (not repo.store.has(current) or not is_ancestor(repo, current, cid)):
        raise ConflictError(f"push to {name}/{branch} refused: not a fast-forward",
                            hint=f"fetch and merge {name}/{branch} first (or --force)")
    reachable, queue = [], deque([cid])
    seen: set[str] = set()
    while queue:  # read and verify everything first: a damaged object stops us before the server sees anything
        oid = queue.popleft()
        if oid in seen:
            continue
        seen.add(oid)
        reachable.append(oid)
        kind, data = repo.store.get(oid, verify=True)
        if kind == Kind.RECORD:
            queue.extend(r.id for r in canonical.walk_refs(canonical.decode(data)))
    stats = TransferStats()
    absent = remote.missing(reachable)
    for oid in [o for o in reachable if o in absent]:
        kind, data = repo.store.get(oid, verify=True)
        remote.put(oid, kind, data)
        stats.objects += 1
        stats.bytes += len(data)
        if progress:
            progress(len(data))
    stats.skipped = len(reachable) - stats.objects
    remote.update_ref(target, current, cid)
    local = f"refs/remotes/{name}/{branch}"
    repo.refs.update(local, cid, expected=repo.refs.read(local), author=default_author(), message=f"push to {name}")
    return stats


def clone(url: str, directory: str, progress=None, token: str | None = None) -> Repository:
    """A new repository with ``origin`` = ``url``, its branches fetched and its HEAD branch checked out."""
    url = str(url)
    if _is_url(url):
        _, head_branch = HttpRemote(url, token or os.environ.get("CRYOPOOL_TOKEN")).heads()
    else:
        head_branch = Repository.open(url, search_parents=False).head().branch
    repo = Repository.init(directory, initial_branch=head_branch or "main")
    add_remote(repo, "origin", url, token)
    _, refs = fetch(repo, "origin", progress)
    for ref, cid in refs.items():
        short = ref.removeprefix("refs/remotes/origin/")
        repo.refs.update(f"refs/heads/{short}", cid, expected=None, author=default_author(),
                         message=f"clone from {url}")
    return repo
