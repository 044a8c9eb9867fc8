"""Object stores: immutable, content-addressed, written atomically.

An object file on disk is a 16-byte header followed by the payload:

    b"CPOB" | version u8 (=1) | kind u8 | codec u8 (0 raw, 1 zstd) | 0 u8 | logical length u64 LE

The id is BLAKE3 of the *logical* (uncompressed) bytes with the kind's
context, so the id never depends on how the bytes are compressed on disk.
Writes go to a temporary file, are fsynced and renamed into place; writing an
object that exists only refreshes its mtime (which protects it from a
concurrent ``gc``).  A :class:`StagingStore` collects the objects of one
transaction away from ``objects/`` and publishes them only on success, so a
failed import leaves ``objects/`` exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from . import canonical
from .errors import IntegrityError, NotFoundError
from .fsutil import fsync_dir as _fsync_dir, removed_on_failure, touch as _touch
from .hashing import Kind, ObjectId, hash_bytes

__all__ = [
    "ObjectStore",
    "DiskObjectStore",
    "MemoryObjectStore",
    "StagingStore",
    "ObjectInfo",
    "encode_object_file",
    "encode_object_parts",
    "decode_object_file",
    "HEADER_SIZE",
    "children_first",
]

MAGIC = b"CPOB"
FORMAT_VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
HEADER = struct.Struct("<4sBBBBQ")
HEADER_SIZE = HEADER.size
# Store compressed only when it saves at least this fraction: noisy float data
# barely compresses (zstd saves ~7% on Gaussian float32 at ~500 MB/s), and raw
# objects are written and read back several times faster.  Large payloads are
# probed first: a 64 KiB sample decides whether compressing the whole is worth it.
MIN_SAVING = 0.10
PROBE_BYTES = 64 * 1024

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    key = f"c{level}"
    comp = getattr(_local, key, None)
    if comp is None:
        comp = zstandard.ZstdCompressor(level=level)
        setattr(_local, key, comp)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def encode_object_file(kind: Kind, data: bytes | memoryview, level: int | None) -> bytes:
    """Header + payload for one object (compressed when it pays)."""
    return b"".join(encode_object_parts(kind, data, level))


def encode_object_parts(kind: Kind, data: bytes | memoryview, level: int | None) -> tuple[bytes, bytes | memoryview]:
    """The header and the payload separately, so large payloads are written without a copy."""
    payload: bytes | memoryview = data
    codec = CODEC_RAW
    if level is not None and len(data) >= 64:
        comp = _compressor(level)
        view = memoryview(data)
        if len(data) > 4 * PROBE_BYTES:
            start = (len(data) // 2) & ~7
            sample = view[start:start + PROBE_BYTES]
            worth = len(comp.compress(sample)) <= (1.0 - MIN_SAVING) * len(sample)
        else:
            worth = True
        if worth:
            packed = comp.compress(data)
            if len(packed) <= (1.0 - MIN_SAVING) * len(data):
                payload, codec = packed, CODEC_ZSTD
    return HEADER.pack(MAGIC, FORMAT_VERSION, int(kind), codec, 0, len(data)), payload


def _zstd_frame_end(body: memoryview) -> int:
    """Where the (single) zstd frame at the start of ``body`` ends, from its block headers (RFC 8878 §3.1.1)."""
    pos = zstandard.frame_header_size(body)
    checksum = body[4] & 0x04
    while True:
        if pos + 3 > len(body):
            raise ValueError("block header cut short")
        header = int.from_bytes(body[pos:pos + 3], "little")
        block_type, size = (header >> 1) & 3, header >> 3
        pos += 3 + (1 if block_type == 1 else size)  # an RLE block holds one byte
        if block_type == 3:
            raise ValueError("reserved block type")
        if header & 1:
            return pos + (4 if checksum else 0)


def decode_object_file(raw: bytes, where: str) -> tuple[Kind, bytes | memoryview]:
    """Inverse of :func:`encode_object_file`; damage raises IntegrityError.

    Raw payloads come back as a zero-copy view of ``raw``.
    """
    if len(raw) < HEADER_SIZE:
        raise IntegrityError("object file truncated in its header", path=where,
                             expected=f">= {HEADER_SIZE} bytes", found=len(raw))
    magic, version, kind, codec, reserved, length = HEADER.unpack_from(raw)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise IntegrityError("not a cryopool object file", path=where,
                             expected=f"{MAGIC!r} v{FORMAT_VERSION}", found=f"{magic!r} v{version}")
    if reserved != 0:  # every byte of the file is accounted for
        raise IntegrityError("reserved header byte is not zero", path=where, found=reserved)
    try:
        kind = Kind(kind)
    except ValueError:
        raise IntegrityError("unknown object kind in header", path=where, found=kind) from None
    body = memoryview(raw)[HEADER_SIZE:]
    if codec == CODEC_RAW:
        data = body
    elif codec == CODEC_ZSTD:
        try:
            data = _decompressor().decompress(body, max_output_size=length)
            end = _zstd_frame_end(body)
        except (zstandard.ZstdError, IndexError, ValueError) as exc:
            raise IntegrityError(f"compressed payload is damaged ({exc})", path=where) from None
        if end != len(body):
            raise IntegrityError("bytes after the compressed payload", path=where, expected=end, found=len(body))
    else:
        raise IntegrityError("unknown codec in header", path=where, found=codec)
    if len(data) != length:
        raise IntegrityError("payload length differs from header", path=where, expected=length, found=len(data))
    return kind, data


@dataclass(frozen=True)
class ObjectInfo:
    id: ObjectId
    kind: Kind
    stored_size: int
    mtime: float


class ObjectStore(ABC):
    """What every store offers; the repository needs nothing more."""

    @abstractmethod
    def has(self, object_id: str) -> bool: ...

    @abstractmethod
    def get(self, object_id: str, *, verify: bool = True) -> tuple[Kind, bytes | memoryview]:
        """Kind and logical bytes, re-hashed: a corrupted object never feeds a computation or a transfer.

        ``verify=False`` only where the bytes are re-hashed elsewhere or merely walked (``verify --quick``).
        """

    @abstractmethod
    def put(self, kind: Kind, data: bytes | memoryview) -> ObjectId: ...

    @abstractmethod
    def ids(self) -> Iterator[ObjectId]: ...

    @abstractmethod
    def info(self, object_id: str) -> ObjectInfo: ...

    @abstractmethod
    def delete(self, object_id: str) -> None: ...

    def sync(self) -> None:
        """Make every object written so far durable (before a ref moves)."""

    def _check(self, object_id: str, kind: Kind, data: bytes) -> None:
        actual = hash_bytes(kind, data)
        if actual != object_id:
            raise IntegrityError("content does not hash to its id (the object is corrupted)",
                                 path=f"object {object_id}", expected=object_id, found=actual,
                                 hint="'cryopool verify' lists what refers to it; fetch it again from a "
                                      "remote that has it")


class DiskObjectStore(ObjectStore):
    """``objects/ab/cdef...`` files under a repository's ``.cryopool``."""

    def __init__(self, objects_dir: Path, tmp_dir: Path, *, compression_level: int | None = 3,
                 fsync: bool = True) -> None:
        self.root = Path(objects_dir)
        self.tmp_dir = Path(tmp_dir)
        self.compression_level = compression_level
        self.fsync = fsync
        self._dirty_dirs: set[Path] = set()
        self._lock = threading.Lock()
        # A partial clone's way to fetch objects it deferred (stores them here, re-hashed); None otherwise.
        self.fallback: Callable[[list[str]], None] | None = None

    def path(self, object_id: str) -> Path:
        return self.root / object_id[:2] / object_id[2:]

    def has(self, object_id: str) -> bool:
        return self.path(object_id).is_file()

    def read_file(self, object_id: str) -> bytes:
        try:
            return self.path(object_id).read_bytes()
        except FileNotFoundError:
            if self.fallback is None:
                raise NotFoundError(f"object {object_id} not found") from None
        self.fallback([object_id])
        try:
            return self.path(object_id).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"object {object_id} not found, here or on the remote") from None

    def prefetch(self, object_ids: list[str]) -> None:
        """Fetch, in one go, those of ``object_ids`` a partial clone deferred (reads would fetch one by one)."""
        if self.fallback is not None:
            absent = [o for o in object_ids if not self.has(o)]
            if absent:
                self.fallback(absent)

    def get(self, object_id: str, *, verify: bool = True) -> tuple[Kind, bytes | memoryview]:
        kind, data = decode_object_file(self.read_file(object_id), f"object {object_id}")
        if verify:
            self._check(object_id, kind, data)
        return kind, data

    def put(self, kind: Kind, data: bytes | memoryview) -> ObjectId:
        object_id = hash_bytes(kind, data)
        self.write_encoded(object_id, lambda: encode_object_parts(kind, data, self.compression_level))
        return object_id

    def write_encoded(self, object_id: ObjectId, make_parts) -> bool:
        """Write an object file (from its encoded parts) unless present; returns whether it was new."""
        final = self.path(object_id)
        if final.exists():
            _touch(final)
            return False
        parts = make_parts()
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"obj-{uuid.uuid4().hex}"
        with removed_on_failure(tmp):
            with open(tmp, "wb") as fh:
                for part in parts:
                    fh.write(part)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        with self._lock:
            self._dirty_dirs.add(final.parent)
        return True

    def adopt(self, object_id: ObjectId, source: Path) -> None:
        """Move an already-encoded, already-synced object file into place."""
        final = self.path(object_id)
        if final.exists():
            _touch(final)
            source.unlink(missing_ok=True)
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, final)
        with self._lock:
            self._dirty_dirs.add(final.parent)

    def ids(self) -> Iterator[ObjectId]:
        if not self.root.is_dir():
            return
        for fan in sorted(self.root.iterdir()):
            if len(fan.name) != 2 or not fan.is_dir():
                continue
            for f in sorted(fan.iterdir()):
                name = fan.name + f.name
                if len(name) == 64:
                    try:
                        yield ObjectId(name)
                    except Exception:
                        continue

    def info(self, object_id: str) -> ObjectInfo:
        p = self.path(object_id)
        try:
            st = p.stat()
            with open(p, "rb") as fh:
                head = fh.read(HEADER_SIZE)
        except FileNotFoundError:
            raise NotFoundError(f"object {object_id} not found") from None
        if len(head) < HEADER_SIZE:
            raise IntegrityError("object file truncated in its header", path=f"object {object_id}")
        kind = HEADER.unpack_from(head)[2]
        try:
            kind = Kind(kind)
        except ValueError:
            raise IntegrityError("unknown object kind in header", path=f"object {object_id}", found=kind) from None
        return ObjectInfo(ObjectId(object_id), kind, st.st_size, st.st_mtime)

    def delete(self, object_id: str) -> None:
        self.path(object_id).unlink(missing_ok=True)

    def sync(self) -> None:
        with self._lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        if self.fsync:
            for d in dirs | {self.root}:
                _fsync_dir(d)


class MemoryObjectStore(ObjectStore):
    """An in-memory twin for tests and for staging in memory."""

    def __init__(self) -> None:
        self._objects: dict[ObjectId, tuple[Kind, bytes, float]] = {}
        self._lock = threading.Lock()

    def has(self, object_id: str) -> bool:
        return object_id in self._objects

    def get(self, object_id: str, *, verify: bool = True) -> tuple[Kind, bytes | memoryview]:
        try:
            kind, data, _ = self._objects[object_id]
        except KeyError:
            raise NotFoundError(f"object {object_id} not found") from None
        if verify:
            self._check(object_id, kind, data)
        return kind, data

    def put(self, kind: Kind, data: bytes | memoryview) -> ObjectId:
        object_id = hash_bytes(kind, data)
        with self._lock:
            self._objects[object_id] = (Kind(kind), bytes(data), time.time())
        return object_id

    def ids(self) -> Iterator[ObjectId]:
        yield from sorted(self._objects)

    def info(self, object_id: str) -> ObjectInfo:
        try:
            kind, data, mtime = self._objects[object_id]
        except KeyError:
            raise NotFoundError(f"object {object_id} not found") from None
        return ObjectInfo(ObjectId(object_id), kind, len(data), mtime)

    def delete(self, object_id: str) -> None:
        with self._lock:
            self._objects.pop(object_id, None)


class StagingStore(ObjectStore):
    """New objects of one transaction, kept apart until :meth:`publish`.

    Reads fall through to the base store; writes of objects the base already
    has only touch them there.  ``discard`` throws the staged objects away, so
    a failed transaction leaves the base store as it was.
    """

    def __init__(self, base: ObjectStore, staging_dir: Path | None = None) -> None:
        self.base = base
        self._staged: dict[ObjectId, Kind] = {}
        self.published_data_objects: int | None = None  # chunks and blobs that were new, once published
        self._lock = threading.Lock()
        if isinstance(base, DiskObjectStore):
            assert staging_dir is not None
            self.dir = Path(staging_dir)
            self.dir.mkdir(parents=True, exist_ok=False)
            self._disk = DiskObjectStore(self.dir / "objects", self.dir / "tmp",
                                         compression_level=base.compression_level, fsync=base.fsync)
            self._mem = None
        else:
            self.dir = None
            self._disk = None
            self._mem = MemoryObjectStore()

    @property
    def _inner(self) -> ObjectStore:
        return self._disk if self._disk is not None else self._mem

    def has(self, object_id: str) -> bool:
        return object_id in self._staged or self.base.has(object_id)

    def get(self, object_id: str, *, verify: bool = True) -> tuple[Kind, bytes | memoryview]:
        if object_id in self._staged:
            return self._inner.get(object_id, verify=verify)
        return self.base.get(object_id, verify=verify)

    def put(self, kind: Kind, data: bytes | memoryview) -> ObjectId:
        object_id = hash_bytes(kind, data)
        if object_id in self._staged:
            return object_id
        if self.base.has(object_id):
            if isinstance(self.base, DiskObjectStore):
                _touch(self.base.path(object_id))
            return object_id
        if self._disk is not None:
            self._disk.write_encoded(object_id, lambda: encode_object_parts(kind, data, self._disk.compression_level))
        else:
            self._mem.put(kind, data)
        with self._lock:
            self._staged[object_id] = Kind(kind)
        return object_id

    def ids(self) -> Iterator[ObjectId]:
        yield from sorted(set(self._staged) | set(self.base.ids()))

    def info(self, object_id: str) -> ObjectInfo:
        if object_id in self._staged:
            return self._inner.info(object_id)
        return self.base.info(object_id)

    def delete(self, object_id: str) -> None:
        raise IntegrityError("objects are not deleted inside a transaction")

    @property
    def staged(self) -> list[ObjectId]:
        return sorted(self._staged)

    def publish(self) -> int:
        """Move staged objects into the base store, children before the records that refer to them.

        Each level is made durable before the next appears, so the base store
        stays closed under references even if the process dies midway.
        """
        staged = self.staged
        records = [o for o in staged if self._staged[o] == Kind.RECORD]
        self.published_data_objects = len(staged) - len(records)
        order = [[o for o in staged if self._staged[o] != Kind.RECORD]]
        order += children_first({o: self._record_children(o) for o in records})
        for level in order:
            for object_id in level:
                if self._disk is not None:
                    self.base.adopt(object_id, self._disk.path(object_id))
                else:
                    kind, data = self._mem.get(object_id)
                    self.base.put(kind, data)
            self.base.sync()
        self.discard()
        return len(staged)

    def _record_children(self, object_id: str) -> list[str]:
        _, data = self._inner.get(object_id)
        return [r.id for r in canonical.walk_refs(canonical.decode(data, check_canonical=False))]

    def discard(self) -> None:
        with self._lock:
            self._staged.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def children_first(graph: dict[str, list[str]]) -> list[list[str]]:
    """Objects of ``graph`` (id → ids it refers to) in levels, each referring only to earlier levels or outside."""
    level: dict[str, int] = {}

    def depth(oid: str) -> int:
        stack = [oid]
        while stack:
            top = stack[-1]
            pending = [k for k in graph[top] if k in graph and k not in level]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            level[top] = 1 + max((level[k] for k in graph[top] if k in graph), default=-1)
        return level[oid]

    out: list[list[str]] = []
    for oid in graph:
        d = depth(oid)
        out.extend([] for _ in range(d + 1 - len(out)))
    for oid, d in level.items():
        out[d].append(oid)
    return [sorted(x) for x in out]
