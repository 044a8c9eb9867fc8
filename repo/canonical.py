"""Canonical msgpack: the same record always gives the same bytes, everywhere.

Rules (docs/format.md has the full text and test vectors):

* maps have ``str`` keys, written in ascending order of their UTF-8 bytes;
* integers use msgpack's shortest encoding; every float is a float64;
  every NaN is written as the quiet NaN ``0x7ff8000000000000``;
* tuples and lists are arrays; ``bytes`` are bin; strings are UTF-8 str;
* a reference to another object is ext type 1: one kind byte then the
  32-byte digest, so any tool can walk the object graph without a schema.

Decoding is strict: anything that does not re-encode to the same bytes is
rejected, so two encodings of one value can never both be valid.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .errors import FormatError, InvalidInputError
from .hashing import DIGEST_SIZE, Kind, ObjectId

__all__ = ["Ref", "encode", "decode", "walk_refs", "REF_EXT_TYPE", "MAX_RECORD_BYTES"]

REF_EXT_TYPE = 1
CANONICAL_NAN = struct.unpack(">d", bytes.fromhex("7ff8000000000000"))[0]
# Records describe things; data lives in chunks. A bound keeps a hostile
# record from exhausting memory when it is decoded.
MAX_RECORD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Ref:
    """A typed pointer from a record to another object."""

    kind: Kind
    id: ObjectId

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "id", ObjectId(self.id))

    def __repr__(self) -> str:
        return f"Ref({self.kind.name.lower()}:{self.id[:12]})"


def _normalise(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str, bytes, Ref)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        v = int(value)
        if not -(2**63) <= v < 2**64:
            raise InvalidInputError("integer out of the 64-bit range", field=where, found=v)
        return v
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return CANONICAL_NAN if math.isnan(v) else v
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (list, tuple)):
        return [_normalise(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k in sorted(value, key=_key_bytes):
            if not isinstance(k, str):
                raise InvalidInputError("record keys must be strings", field=where, found=repr(k))
            out[k] = _normalise(value[k], f"{where}.{k}" if where else k)
        return out
    raise InvalidInputError(
        "value cannot be stored in a record", field=where or "<root>",
        expected="None/bool/int/float/str/bytes/list/dict/Ref",
        found=type(value).__name__,
    )


def _key_bytes(k: Any) -> bytes:
    return k.encode("utf-8") if isinstance(k, str) else b""


def _default(obj: Any) -> Any:
    if isinstance(obj, Ref):
        return msgpack.ExtType(REF_EXT_TYPE, bytes([int(obj.kind)]) + obj.id.digest)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(value: Any) -> bytes:
    """Canonical msgpack bytes of ``value``."""
    return msgpack.packb(_normalise(value, ""), use_bin_type=True, use_single_float=False, default=_default)


def _ext_hook(code: int, data: bytes) -> Ref:
    if code != REF_EXT_TYPE or len(data) != 1 + DIGEST_SIZE:
        raise FormatError("unknown msgpack extension in record", expected=f"ext {REF_EXT_TYPE} of 33 bytes",
                          found=f"ext {code} of {len(data)} bytes")
    try:
        kind = Kind(data[0])
    except ValueError:
        raise FormatError("reference with unknown object kind", found=data[0]) from None
    return Ref(kind, ObjectId.from_digest(data[1:]))


MAX_DEPTH = 64  # records nest a few levels; msgpack itself allows thousands


def _depth(value: Any) -> int:
    """Nesting depth of a decoded value, iteratively (a hostile record must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def decode(data: bytes | memoryview, *, check_canonical: bool = True, where: str = "record") -> Any:
    """Decode canonical msgpack; reject anything non-canonical or oversized."""
    if len(data) > MAX_RECORD_BYTES:
        raise FormatError("record too large", path=where, expected=f"<= {MAX_RECORD_BYTES} bytes", found=len(data))
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=True, ext_hook=_ext_hook, use_list=True)
    except FormatError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types
        raise FormatError(f"not valid msgpack ({exc})", path=where) from None
    depth = _depth(value)
    if depth > MAX_DEPTH:  # before anything recursive (re-encoding, walking refs) touches it
        raise FormatError("record nested too deeply", path=where, expected=f"<= {MAX_DEPTH} levels", found=depth)
    if check_canonical and encode(value) != bytes(data):
        raise FormatError("record is not in canonical encoding", path=where,
                          hint="keys must be sorted, floats float64, integers shortest")
    return value


def walk_refs(value: Any):
    """Yield every Ref inside a decoded record, depth first, in encoding order."""
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, dict):
        for k in sorted(value, key=_key_bytes):
            yield from walk_refs(value[k])
    elif isinstance(value, list):
        for v in value:
            yield from walk_refs(v)
