"""Chunked arrays: round trips, partial reads, deduplication, and zarr-python as an independent reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from cryopool.repo.arrays import default_chunks
from cryopool.repo.errors import InvalidInputError
from cryopool.repo.hashing import Kind, hash_bytes
from cryopool.repo.records import ArrayManifest


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "uint16", "uint64", "int8", "bool", "complex64"])
@pytest.mark.parametrize("shape,chunks", [((7,), (3,)), ((5, 6, 7), (2, 4, 3)), ((4, 4), None), ((1,), None)])
def test_round_trip_all_types(any_repo, dtype, shape, chunks):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 100).astype(dtype)
    ref = any_repo.put_array(x, chunks=chunks)
    back = any_repo.get_array(ref)
    assert back.shape == shape and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.read(), x)


def test_partial_reads_match_numpy(any_repo):
    x = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    a = any_repo.get_array(any_repo.put_array(x, chunks=(4, 3, 5)))
    for sel in [(1,), (slice(2, 5), 3), (slice(None), slice(1, 6), slice(4, 8)), (-1, -2, -3), (slice(5, 2),)]:
        np.testing.assert_array_equal(a.read(sel), x[sel])
    with pytest.raises(IndexError):
        a.read((10,))


def test_big_endian_input_is_stored_little_endian(any_repo):
    x = np.arange(10, dtype=">f4")
    ref = any_repo.put_array(x)
    assert any_repo.put_array(x.astype("<f4")) == ref
    np.testing.assert_array_equal(any_repo.get_array(ref).read(), x)


def test_identical_chunks_are_stored_once(disk_repo):
    x = np.zeros((8, 32, 32), np.float32)
    x[0] = 1.0
    disk_repo.put_array(x, chunks=(1, 32, 32))
    # 2 distinct chunks (the ones-slice and the zero-slice) + 1 manifest
    assert len(list(disk_repo.store.ids())) == 3


def test_default_chunks():
    assert default_chunks((41, 1024, 1024), 4) == (1, 1024, 1024)
    c = default_chunks((256, 256, 256), 4)
    assert np.prod(c) * 4 <= 4 * 2**20
    assert default_chunks((10,), 8) == (10,)


def test_unsupported_dtype_is_refused(any_repo):
    with pytest.raises(InvalidInputError):
        any_repo.put_array(np.array(["a", "b"]))


def test_zarr_python_reads_our_chunks(any_repo, tmp_path):
    """Write zarr.json and every chunk under its key: zarr-python must open the same array."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 9, 11)).astype(np.float32)
    ref = any_repo.put_array(x, chunks=(2, 4, 4), attributes={"units": "Å"})
    manifest = any_repo.get_record(ref, ArrayManifest)
    root = tmp_path / "arr.zarr"
    root.mkdir()
    (root / "zarr.json").write_text(json.dumps(manifest.zarr))
    grid = [int(np.ceil(s / c)) for s, c in zip(x.shape, (2, 4, 4))]
    for flat, chunk_ref in enumerate(manifest.chunks):
        index = np.unravel_index(flat, grid)
        path = root.joinpath("c", *map(str, index))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(any_repo.store.get(chunk_ref.id)[1])
    z = zarr.open_array(str(root), mode="r")
    np.testing.assert_array_equal(z[...], x)
    assert z.attrs["units"] == "Å"


def test_zarr_python_writes_the_chunks_we_hash(tmp_path, any_repo):
    """The other way round: chunks zarr-python writes (same metadata) hash to our chunk ids."""
    x = np.arange(5 * 6, dtype=np.int16).reshape(5, 6)
    ref = any_repo.put_array(x, chunks=(2, 4))
    manifest = any_repo.get_record(ref, ArrayManifest)
    z = zarr.create_array(store=str(tmp_path / "z.zarr"), shape=x.shape, chunks=(2, 4), dtype="int16",
                          serializer=zarr.codecs.BytesCodec(endian="little"), compressors=None, fill_value=0,
                          config={"write_empty_chunks": True})
    z[...] = x
    for flat, chunk_ref in enumerate(manifest.chunks):
        i, j = np.unravel_index(flat, (3, 2))
        data = (tmp_path / "z.zarr" / "c" / str(i) / str(j)).read_bytes()
        assert hash_bytes(Kind.CHUNK, data) == chunk_ref.id
