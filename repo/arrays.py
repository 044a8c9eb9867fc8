"""Chunked n-d arrays in the zarr v3 format, every chunk a content-addressed object.

An array is an ``Array`` record (the manifest): the array's zarr v3
``zarr.json`` metadata and the list of chunk references in C order of the
chunk grid.  Each chunk holds exactly the bytes zarr v3 would store for that
chunk with the single codec ``bytes`` (little endian): C-order, full chunk
shape, edge chunks padded with the fill value.  Those logical bytes are what
is hashed; compression happens below, in the object store.  Unchanged chunks
hash the same and are stored once, across arrays, commits and labs.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .canonical import Ref
from .errors import FormatError, IntegrityError, InvalidInputError
from .hashing import Kind
from .store import ObjectStore

__all__ = ["StoredArray", "write_array", "default_chunks", "zarr_metadata", "DTYPES", "TARGET_CHUNK_BYTES"]

TARGET_CHUNK_BYTES = 4 * 1024 * 1024

# zarr v3 data_type name -> numpy little-endian dtype
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "bool": "|b1", "int8": "|i1", "uint8": "|u1", "int16": "<i2", "uint16": "<u2",
        "int32": "<i4", "uint32": "<u4", "int64": "<i8", "uint64": "<u8",
        "float32": "<f4", "float64": "<f8", "complex64": "<c8", "complex128": "<c16",
    }.items()
}

ProgressFn = Callable[[int], None]


def _dtype_name(dtype: np.dtype) -> str:
    le = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    for name, dt in DTYPES.items():
        if dt == le:
            return name
    raise InvalidInputError("array data type cannot be stored", expected=sorted(DTYPES), found=str(dtype))


def _fill_value(name: str):
    if name == "bool":
        return False
    if name.startswith("complex"):
        return [0.0, 0.0]
    if name.startswith("float"):
        return 0.0
    return 0


def default_chunks(shape: Sequence[int], itemsize: int, target: int = TARGET_CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk shape of at most ``target`` bytes.

    Stacks of 2-D images (tilt series, frame series) chunk one image at a time
    so a single tilt is read alone; other arrays halve their largest axis
    until they fit.
    """
    chunks = [max(1, int(s)) for s in shape]
    if len(chunks) == 3 and chunks[1] * chunks[2] * itemsize >= target // 8 and chunks[0] < chunks[1]:
        chunks[0] = 1
    while math.prod(chunks) * itemsize > target and max(chunks) > 1:
        i = int(np.argmax(chunks))
        chunks[i] = (chunks[i] + 1) // 2
    return tuple(chunks)


def zarr_metadata(shape: Sequence[int], dtype_name: str, chunks: Sequence[int],
                  attributes: dict | None = None) -> dict:
    """The exact ``zarr.json`` document for an array stored here."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [int(s) for s in shape],
        "data_type": dtype_name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [int(c) for c in chunks]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": _fill_value(dtype_name),
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": dict(attributes or {}),
    }


def _grid(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.ceil(s / c) if s else 0 for s, c in zip(shape, chunks))


def _chunk_bytes(array: np.ndarray, index: tuple[int, ...], chunks: tuple[int, ...], check=None) -> memoryview | bytes:
    sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, array.shape))
    part = array[sl]
    if check is not None:
        check(part, tuple(i * c for i, c in zip(index, chunks)))
    if part.shape != chunks:
        padded = np.zeros(chunks, dtype=array.dtype)
        padded[tuple(slice(0, n) for n in part.shape)] = part
        part = padded
    if not part.flags.c_contiguous:
        part = np.ascontiguousarray(part)
    return memoryview(part).cast("B") if part.size else b""


def write_array(
    store: ObjectStore,
    array: np.ndarray,
    *,
    chunks: Sequence[int] | None = None,
    attributes: dict | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    check: Callable[[np.ndarray, tuple[int, ...]], None] | None = None,
) -> tuple[dict, list[Ref]]:
    """Store the chunks of ``array``; return its zarr metadata and chunk refs.

    Chunks are hashed, compressed and written in parallel threads (BLAKE3,
    zstd and file I/O release the GIL).  ``progress`` receives byte counts;
    ``check(block, origin)`` may inspect each chunk first and raise to abort.
    """
    arr = np.asarray(array)
    name = _dtype_name(arr.dtype)
    arr = arr.astype(DTYPES[name], copy=False)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    chunk_shape = tuple(int(c) for c in (chunks or default_chunks(arr.shape, arr.itemsize)))
    if len(chunk_shape) != arr.ndim or any(c < 1 for c in chunk_shape):
        raise InvalidInputError("bad chunk shape", expected=f"{arr.ndim} positive integers", found=chunk_shape)
    indices = list(itertools.product(*(range(g) for g in _grid(arr.shape, chunk_shape))))

    def one(index: tuple[int, ...]) -> Ref:
        data = _chunk_bytes(arr, index, chunk_shape, check)
        ref = Ref(Kind.CHUNK, store.put(Kind.CHUNK, data))
        if progress:
            progress(len(data))
        return ref

    n_workers = workers or min(8, os.cpu_count() or 1)
    if len(indices) > 1 and n_workers > 1:
        with ThreadPoolExecutor(n_workers) as pool:
            refs = list(pool.map(one, indices))
    else:
        refs = [one(i) for i in indices]
    return zarr_metadata(arr.shape, name, chunk_shape, attributes), refs


@dataclass(frozen=True)
class StoredArray:
    """A lazy view of a stored array: chunks are read only when needed."""

    store: ObjectStore
    metadata: dict
    chunk_refs: tuple[Ref, ...]
    where: str = "array"

    def __post_init__(self) -> None:
        md = self.metadata
        try:
            ok = (md["zarr_format"] == 3 and md["node_type"] == "array" and md["data_type"] in DTYPES
                  and md["chunk_grid"]["name"] == "regular"
                  and md["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}])
            shape, chunks = md["shape"], md["chunk_grid"]["configuration"]["chunk_shape"]
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise FormatError("array manifest is not a supported zarr v3 array", path=self.where)
        if len(shape) != len(chunks) or len(self.chunk_refs) != math.prod(_grid(shape, chunks)):
            raise FormatError("array manifest chunk count does not match its grid", path=self.where,
                              expected=math.prod(_grid(shape, chunks)), found=len(self.chunk_refs))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["shape"])

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.metadata["data_type"]]

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["chunk_grid"]["configuration"]["chunk_shape"])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def attributes(self) -> dict:
        return dict(self.metadata.get("attributes", {}))

    def _chunk(self, flat_index: int) -> np.ndarray:
        ref = self.chunk_refs[flat_index]
        try:
            kind, data = self.store.get(ref.id)
        except IntegrityError as exc:  # say which array the damaged chunk belongs to
            raise IntegrityError(exc.message, path=f"object {ref.id} (chunk {flat_index} of {self.where})",
                                 expected=exc.expected, found=exc.found, hint=exc.hint) from None
        expected = math.prod(self.chunk_shape) * self.dtype.itemsize
        if kind != Kind.CHUNK or len(data) != expected:
            raise IntegrityError("array chunk has the wrong kind or size", path=f"{self.where} chunk {ref.id}",
                                 expected=f"chunk of {expected} bytes", found=f"{kind.name.lower()} of {len(data)} bytes")
        return np.frombuffer(data, dtype=self.dtype).reshape(self.chunk_shape)

    def read(self, selection: tuple[slice | int, ...] | slice | int | None = None) -> np.ndarray:
        """Read a basic-indexing selection (ints and unit-step slices)."""
        shape, chunks = self.shape, self.chunk_shape
        sel = selection if isinstance(selection, tuple) else ((selection,) if selection is not None else ())
        sel = sel + (slice(None),) * (len(shape) - len(sel))
        starts, stops, drop = [], [], []
        for axis, (s, n) in enumerate(zip(sel, shape)):
            if isinstance(s, (int, np.integer)):
                i = int(s) + n if s < 0 else int(s)
                if not 0 <= i < n:
                    raise IndexError(f"index {s} out of range for axis {axis} of size {n}")
                starts.append(i), stops.append(i + 1), drop.append(axis)
            elif isinstance(s, slice) and s.step in (None, 1):
                a, b, _ = s.indices(n)
                starts.append(a), stops.append(max(a, b))
            else:
                raise IndexError("only integers and unit-step slices are supported")
        out = np.zeros([b - a for a, b in zip(starts, stops)], dtype=self.dtype)
        grid = _grid(shape, chunks)
        ranges = [range(a // c, (b - 1) // c + 1) if b > a else range(0) for a, b, c in zip(starts, stops, chunks)]
        prefetch = getattr(self.store, "prefetch", None)
        if prefetch is not None:  # a partial clone fetches the chunks it deferred in one go
            prefetch([self.chunk_refs[int(np.ravel_multi_index(i, grid)) if grid else 0].id
                      for i in itertools.product(*ranges)])
        for index in itertools.product(*ranges):
            flat = int(np.ravel_multi_index(index, grid)) if grid else 0
            block = self._chunk(flat)
            src, dst = [], []
            for i, c, a, b in zip(index, chunks, starts, stops):
                lo, hi = max(a, i * c), min(b, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = block[tuple(src)]
        return out.reshape([n for ax, n in enumerate(out.shape) if ax not in drop]) if drop else out

    def __array__(self, dtype=None, copy=None):
        out = self.read()
        return out if dtype is None else out.astype(dtype)
