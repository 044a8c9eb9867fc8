"""Object identity: BLAKE3 over full content, domain-separated by object kind.

Each kind hashes in BLAKE3's derive-key mode with its own context string, so a
chunk can never collide with a record or a blob that happens to hold the same
bytes (M hashed a 512 KiB prefix with SHA-1 truncated to 48 bits; we hash
everything, at 256 bits).
"""

from __future__ import annotations

import enum
import re

import blake3

from .errors import InvalidInputError

__all__ = ["Kind", "ObjectId", "hash_bytes", "is_object_id", "CONTEXTS", "DIGEST_SIZE"]

DIGEST_SIZE = 32
_HEX_RE = re.compile(r"[0-9a-f]{64}")


class Kind(enum.IntEnum):
    """The three object kinds. Values are stored on disk and in references."""

    BLOB = 1  # opaque bytes (a file kept verbatim)
    CHUNK = 2  # one chunk of an n-d array, logical little-endian C-order bytes
    RECORD = 3  # a canonical-msgpack record (population, species, commit, array manifest, ...)


CONTEXTS: dict[Kind, str] = {
    Kind.BLOB: "cryopool 2026-11-21 object blob v1",
    Kind.CHUNK: "cryopool 2026-11-21 object chunk v1",
    Kind.RECORD: "cryopool 2026-11-21 object record v1",
}


class ObjectId(str):
    """A 64-character lower-case hex BLAKE3 digest naming one object."""

    __slots__ = ()

    def __new__(cls, value: str) -> "ObjectId":
        if isinstance(value, ObjectId):
            return value
        if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
            raise InvalidInputError("not an object id", expected="64 lower-case hex digits", found=repr(value))
        return super().__new__(cls, value)

    @classmethod
    def from_digest(cls, digest: bytes) -> "ObjectId":
        if len(digest) != DIGEST_SIZE:
            raise InvalidInputError("bad digest length", expected=DIGEST_SIZE, found=len(digest))
        return cls(digest.hex())

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self)

    @property
    def short(self) -> str:
        return self[:12]


def is_object_id(value: str) -> bool:
    return isinstance(value, str) and bool(_HEX_RE.fullmatch(value))


def hash_bytes(kind: Kind, data: bytes | bytearray | memoryview) -> ObjectId:
    """The id of ``data`` stored as an object of ``kind``."""
    hasher = blake3.blake3(derive_key_context=CONTEXTS[Kind(kind)])
    hasher.update(data)
    return ObjectId(hasher.hexdigest())
