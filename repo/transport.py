"""How objects and refs travel between repositories: one small interface, three kinds of remote.

A :class:`Transport` answers five questions about a remote repository — its
branches, which of some objects it lacks, the objects themselves, storing
objects, and moving a ref by compare-and-swap — for a directory on a shared
filesystem (:class:`DirTransport`), a ``cryopool serve`` URL
(:class:`HttpTransport`, batched "packs" of objects per request) and any
fsspec URL, S3-compatible object storage in particular
(:class:`FsspecTransport`: a bare repository laid out exactly like
``.cryopool``).

Every transport keeps the closure rule: a repository that has an object has
everything it refers to (senders store children before parents; the server
refuses a record whose children it lacks). Negotiation relies on it: the walk
stops at the first object the other side has. Transports never trust what
they read: the receiver re-hashes every object before storing it.
"""

from __future__ import annotations

import json
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import httpx
from fsspec.asyn import sync as run_async

from . import canonical
from .errors import ConflictError, FormatError, IntegrityError, InvalidInputError, NotFoundError
from .hashing import Kind, ObjectId, hash_bytes, is_object_id
from .refs import DiskRefStore, validate_ref_name
from .store import DiskObjectStore, children_first, decode_object_file, encode_object_file

__all__ = ["Transport", "DirTransport", "HttpTransport", "FsspecTransport", "open_transport", "is_url",
           "encode_frames", "iter_frames", "children_of", "children_first", "receive_object", "FRAME_HEADER",
           "deferred_fetcher", "batches"]

FRAME_HEADER = struct.Struct(">64sQ")  # object id (ASCII hex) | length of the object file that follows
BATCH_OBJECTS = 1024
BATCH_BYTES = 16 * 1024 * 1024  # per pack: big enough to amortise a request, small enough to overlap

Obj = tuple[str, Kind, bytes]


# -- the pack format (HTTP bodies) -----------------------------------------------------------------
def encode_frames(objects: Iterable[Obj]) -> Iterator[bytes]:
    """Frames of a pack: header (id, length) then the object file (format.md §5), uncompressed."""
    for oid, kind, data in objects:
        body = encode_object_file(kind, data, None)
        yield FRAME_HEADER.pack(oid.encode("ascii"), len(body))
        yield body


def iter_frames(chunks: Iterable[bytes], where: str, max_object_bytes: int) -> Iterator[tuple[str, bytes]]:
    """Split a pack arriving in arbitrary pieces into (id, object file); strict about every length."""
    buf = bytearray()
    pos = 0  # parse position in buf (compacted once per piece, never per frame: packs hold thousands)
    need: tuple[str, int] | None = None
    for piece in chunks:
        del buf[:pos]
        pos = 0
        buf += piece
        while True:
            if need is None:
                if len(buf) - pos < FRAME_HEADER.size:
                    break
                raw_id, length = FRAME_HEADER.unpack_from(buf, pos)
                oid = raw_id.decode("ascii", errors="replace")
                if not is_object_id(oid):
                    raise FormatError("pack frame does not start with an object id", path=where,
                                      found=repr(raw_id[:16]))
                if length > max_object_bytes:
                    raise FormatError(f"pack frame larger than {max_object_bytes} bytes", path=f"{where} {oid}",
                                      found=length)
                pos += FRAME_HEADER.size
                need = (oid, length)
            oid, length = need
            if len(buf) - pos < length:
                break
            yield oid, bytes(buf[pos:pos + length])
            pos += length
            need = None
    if need is not None or len(buf) > pos:
        raise FormatError("pack ends in the middle of a frame", path=where)


# -- the object graph ----------------------------------------------------------------------------
def children_of(kind: Kind, data: bytes, where: str = "object") -> list[str]:
    """Ids an object refers to (records only; blobs and chunks are leaves)."""
    if kind != Kind.RECORD:
        return []
    return [r.id for r in canonical.walk_refs(canonical.decode(data, where=where, check_canonical=False))]


def receive_object(oid: str, raw: bytes, where: str) -> tuple[Kind, bytes]:
    """Decode an object file that claims to be ``oid`` and re-hash it (never trust the sender)."""
    kind, data = decode_object_file(raw, f"{where} {oid}")
    got = hash_bytes(kind, data)
    if got != oid:
        raise IntegrityError("received object does not hash to its id", path=f"{where} {oid}", found=got)
    return kind, bytes(data)


def batches(objects: list[str], size_of: Callable[[str], int]) -> Iterator[list[str]]:
    batch: list[str] = []
    total = 0
    for oid in objects:
        n = size_of(oid)
        if batch and (len(batch) >= BATCH_OBJECTS or total + n > BATCH_BYTES):
            yield batch
            batch, total = [], 0
        batch.append(oid)
        total += n
    if batch:
        yield batch


# -- transports ----------------------------------------------------------------------------------
class Transport(ABC):
    """What push, fetch and clone need from the other side."""

    url: str

    @abstractmethod
    def heads(self) -> tuple[dict[str, ObjectId], str | None]:
        """Branches (``refs/heads/*`` → id) and the branch HEAD names (None when detached/unknown)."""

    @abstractmethod
    def missing(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` the remote lacks."""

    @abstractmethod
    def get_many(self, ids: list[str]) -> Iterator[tuple[str, bytes]]:
        """(id, object file) for each of ``ids``, unverified: the receiver re-hashes."""

    @abstractmethod
    def put_many(self, objects: list[Obj]) -> None:
        """Store objects; ``objects`` never refers to one another (callers send levels, children first)."""

    @abstractmethod
    def update_ref(self, name: str, old: str | None, new: str, author: str = "unknown") -> None:
        """Compare-and-swap; :class:`ConflictError` when the ref is no longer ``old``."""

    def close(self) -> None:
        pass


class DirTransport(Transport):
    """A repository on a shared filesystem, opened at the object and ref level."""

    def __init__(self, path: str | os.PathLike) -> None:
        root = Path(path)
        root = root if root.name == ".cryopool" else root / ".cryopool"
        if not (root / "HEAD").is_file() or not (root / "objects").is_dir():
            raise NotFoundError("not a cryopool repository", path=str(path), hint="check the remote's path")
        try:
            level = json.loads((root / "config").read_text()).get("core", {}).get("compression_level", 3)
        except (OSError, json.JSONDecodeError) as exc:
            raise FormatError(f"repository config is unreadable ({exc})", path=str(root / "config")) from None
        self.url = str(root.parent)
        self.store = DiskObjectStore(root / "objects", root / "tmp", compression_level=level)
        self.refs = DiskRefStore(root)

    def heads(self) -> tuple[dict[str, ObjectId], str | None]:
        target = self.refs.head_target()
        return self.refs.list("refs/heads/"), target.removeprefix("refs/heads/") if target else None

    def missing(self, ids: list[str]) -> set[str]:
        return {i for i in ids if not self.store.has(i)}

    def get_many(self, ids: list[str]) -> Iterator[tuple[str, bytes]]:
        for oid in ids:
            yield oid, self.store.read_file(oid)

    def put_many(self, objects: list[Obj]) -> None:
        for oid, kind, data in objects:
            if hash_bytes(kind, data) != oid:
                raise IntegrityError("object does not hash to its id", path=f"object {oid}")
            absent = [k for k in children_of(kind, data, f"object {oid}") if not self.store.has(k)]
            if absent:
                raise IntegrityError("record sent before the objects it refers to", path=f"object {oid}",
                                     found=absent[0])
            self.store.put(kind, data)
        self.store.sync()

    def update_ref(self, name: str, old: str | None, new: str, author: str = "unknown") -> None:
        if not self.store.has(new):
            raise IntegrityError("the remote lacks the commit a ref would point to", path=f"object {new}")
        self.refs.update(name, new, expected=old, author=author, message="push")


class HttpTransport(Transport):
    """A ``cryopool serve`` URL (wire format: docs/wire.md)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=300.0)
        self._limits: dict | None = None

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code == 409:
            raise ConflictError(f"the server refused the ref update: {_detail(r)}",
                                hint="fetch and merge first (or --force)")
        if r.status_code >= 400:
            raise InvalidInputError(f"server answered {r.status_code}: {_detail(r)}", path=self.url)
        return r

    @property
    def limits(self) -> dict:
        if self._limits is None:
            self._limits = self._check(self.client.get("/info")).json()
        return self._limits

    def heads(self) -> tuple[dict[str, ObjectId], str | None]:
        data = self._check(self.client.get("/refs")).json()
        return {k: ObjectId(v) for k, v in data["refs"].items() if k.startswith("refs/heads/")}, data.get("head")

    def missing(self, ids: list[str]) -> set[str]:
        out: set[str] = set()
        ids = list(dict.fromkeys(ids))  # the server refuses an id twice in one request
        for i in range(0, len(ids), 10_000):
            r = self.client.post("/objects/missing", json={"ids": ids[i:i + 10_000]})
            out |= set(self._check(r).json()["missing"])
        return out

    def get_many(self, ids: list[str]) -> Iterator[tuple[str, bytes]]:
        ids = list(dict.fromkeys(ids))
        for i in range(0, len(ids), BATCH_OBJECTS):
            want = ids[i:i + BATCH_OBJECTS]
            with self.client.stream("POST", "/objects/get", json={"ids": want}) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                got = 0
                for oid, raw in iter_frames(r.iter_bytes(), f"pack from {self.url}", 1 << 40):
                    if oid != want[got]:
                        raise IntegrityError("the server sent objects out of order", path=self.url,
                                             expected=want[got], found=oid)
                    got += 1
                    yield oid, raw
                if got != len(want):
                    raise IntegrityError(f"the server sent {got} of {len(want)} objects", path=self.url)

    def put_many(self, objects: list[Obj]) -> None:
        limit = int(self.limits["max_request_bytes"])
        pack: list[Obj] = []
        size = 0
        for obj in objects:
            n = FRAME_HEADER.size + len(obj[2]) + 16
            if pack and size + n > limit:
                self._send_pack(pack)
                pack, size = [], 0
            pack.append(obj)
            size += n
        if pack:
            self._send_pack(pack)

    def _send_pack(self, pack: list[Obj]) -> None:
        body = b"".join(encode_frames(pack))
        self._check(self.client.post("/objects", content=body,
                                     headers={"Content-Type": "application/x-cryopool-pack"}))

    def update_ref(self, name: str, old: str | None, new: str, author: str = "unknown") -> None:
        self._check(self.client.post(f"/refs/{name}", json={"old": old, "new": new}))

    def close(self) -> None:
        self.client.close()


class FsspecTransport(Transport):
    """A bare repository in any fsspec filesystem (``s3://bucket/prefix``…), laid out like ``.cryopool``.

    ``HEAD``, ``refs/heads/<branch>`` (``"<id>\\n"``) and ``objects/ab/cdef…``
    (object files, format.md §5); no config, reflogs or locks. Ref updates use
    the storage's conditional writes (S3 ``If-Match``/``If-None-Match``), so
    pushing needs a filesystem that offers them; fetching works from any.
    """

    def __init__(self, url: str, options: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(options or {}))
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.cas = "s3" in protocols or "s3a" in protocols

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _object_path(self, oid: str) -> str:
        return self._path("objects", oid[:2], oid[2:])

    def heads(self) -> tuple[dict[str, ObjectId], str | None]:
        self.fs.invalidate_cache()  # other labs push meanwhile: never answer from a listing cache
        base = self._path("refs", "heads")
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            paths = []
        out = {}
        for path, raw in (self.fs.cat(paths) if paths else {}).items():
            name = "refs/heads/" + path.split("/refs/heads/", 1)[1] if "/refs/heads/" in path else None
            text = raw.decode("ascii", errors="replace").strip()
            if name and is_object_id(text):
                out[validate_ref_name(name)] = ObjectId(text)
        try:
            head = self.fs.cat_file(self._path("HEAD")).decode().strip()
        except FileNotFoundError:
            head = ""
        return out, head.removeprefix("ref: refs/heads/") if head.startswith("ref: refs/heads/") else None

    def missing(self, ids: list[str]) -> set[str]:
        with ThreadPoolExecutor(16) as pool:
            present = list(pool.map(lambda o: self.fs.exists(self._object_path(o)), ids))
        return {o for o, p in zip(ids, present) if not p}

    def get_many(self, ids: list[str]) -> Iterator[tuple[str, bytes]]:
        for i in range(0, len(ids), 256):
            want = ids[i:i + 256]
            paths = {self._object_path(o): o for o in want}
            got = self.fs.cat(list(paths), on_error="return")
            for path, oid in paths.items():
                raw = got.get(path)
                if not isinstance(raw, bytes):
                    raise NotFoundError(f"object {oid} not found", path=self.url)
                yield oid, raw

    def put_many(self, objects: list[Obj]) -> None:
        self.fs.pipe({self._object_path(oid): encode_object_file(kind, data, 3) for oid, kind, data in objects})

    def update_ref(self, name: str, old: str | None, new: str, author: str = "unknown") -> None:
        validate_ref_name(name)
        if not self.cas:
            raise InvalidInputError(f"{self.fs.protocol} storage offers no compare-and-swap write; "
                                    "pushing needs one (S3-compatible storage has it)", path=self.url)
        if not self.fs.exists(self._object_path(new)):
            raise IntegrityError("the remote lacks the commit a ref would point to", path=f"object {new}")
        bucket, key, _ = self.fs.split_path(self._path(name))
        try:
            current = self.fs.call_s3("get_object", Bucket=bucket, Key=key)  # content and ETag in one answer
            etag, text = current["ETag"], run_async(self.fs.loop, current["Body"].read).decode().strip()
        except FileNotFoundError:
            etag, text = None, None
        if text != old:
            raise ConflictError(f"{name} on {self.url} is {str(text)[:12]}, not {str(old)[:12]}",
                                hint="fetch and merge first (or --force)")
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=f"{new}\n".encode(), **condition)
            if name.startswith("refs/heads/"):
                hb, hk, _ = self.fs.split_path(self._path("HEAD"))
                try:  # the first push to an empty prefix names its HEAD branch
                    self.fs.call_s3("put_object", Bucket=hb, Key=hk, IfNoneMatch="*",
                                    Body=f"ref: {name}\n".encode())
                except Exception:  # noqa: BLE001 — already there: keep it
                    pass
        except Exception as exc:  # noqa: BLE001 — s3fs maps errors loosely; a failed condition is a lost race
            text = f"{exc!r} {exc.__cause__!r}"
            if any(k in text for k in ("PreconditionFailed", "pre-condition", "412", "ConditionalRequestConflict")):
                raise ConflictError(f"{name} on {self.url} moved meanwhile",
                                    hint="fetch and merge first (or --force)") from None
            raise
        self.fs.invalidate_cache()


def _detail(r: httpx.Response) -> str:
    if "json" in r.headers.get("content-type", ""):
        return str(r.json().get("detail", r.text))
    return r.text


def is_url(text) -> bool:
    return "://" in str(text)


LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def open_transport(url: str, *, token: str | None = None, options: dict | None = None) -> Transport:
    """The transport for a remote's URL: http(s) → server, other ``scheme://`` → fsspec, else a path."""
    text = str(url)
    if text.startswith(("http://", "https://")):
        host = urlsplit(text).hostname or ""
        if text.startswith("http://") and host not in LOOPBACK and os.environ.get("CRYOPOOL_ALLOW_HTTP") != "1":
            raise InvalidInputError("plain http to another machine would send tokens and data in clear", path=text,
                                    hint="use https (a TLS proxy in front of 'cryopool serve'), or set "
                                         "CRYOPOOL_ALLOW_HTTP=1 on a network you trust")
        # $CRYOPOOL_TOKEN stands in only where the remote has no token of its own
        return HttpTransport(text, token or os.environ.get("CRYOPOOL_TOKEN"))
    if text.startswith("file://"):
        return DirTransport(text.removeprefix("file://"))
    if is_url(text):
        return FsspecTransport(text, options)
    return DirTransport(text)


def deferred_fetcher(store: DiskObjectStore, remote: dict) -> Callable[[list[str]], None]:
    """For a partial clone: fetch objects missing from ``store`` from the remote, re-hashed, on first use."""
    opened: list[Transport] = []

    def fetch(ids: list[str]) -> None:
        if not opened:
            opened.append(open_transport(remote["url"], token=remote.get("token"), options=remote.get("options")))
        want = [i for i in dict.fromkeys(ids) if not store.has(i)]
        for oid, raw in opened[0].get_many(want):
            kind, data = receive_object(oid, raw, f"deferred object from {remote['url']}")
            if kind == Kind.RECORD:
                raise IntegrityError("a deferred object must be a chunk or blob", path=f"object {oid}")
            store.put(kind, data)
        store.sync()
    return fetch
