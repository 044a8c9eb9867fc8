"""The object store contract, run against the disk and the memory store."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryopool.repo.errors import IntegrityError, NotFoundError
from cryopool.repo.hashing import Kind, hash_bytes
from cryopool.repo.store import (HEADER_SIZE, DiskObjectStore, MemoryObjectStore, StagingStore, decode_object_file,
                                 encode_object_file)


@pytest.fixture(params=["disk", "memory"])
def store(request, tmp_path):
    if request.param == "disk":
        return DiskObjectStore(tmp_path / "objects", tmp_path / "tmp")
    return MemoryObjectStore()


def test_put_get_has_ids(store):
    a = store.put(Kind.BLOB, b"alpha")
    b = store.put(Kind.CHUNK, b"alpha")
    assert a != b and a == hash_bytes(Kind.BLOB, b"alpha")
    assert store.get(a) == (Kind.BLOB, b"alpha")
    assert store.get(b, verify=True) == (Kind.CHUNK, b"alpha")
    assert store.has(a) and not store.has("0" * 64)
    assert set(store.ids()) == {a, b}
    assert store.put(Kind.BLOB, b"alpha") == a  # idempotent
    assert len(list(store.ids())) == 2
    store.delete(a)
    with pytest.raises(NotFoundError):
        store.get(a)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.binary(max_size=5000), st.sampled_from(list(Kind)))
def test_get_put_round_trip_property(data, kind):
    s = MemoryObjectStore()
    assert s.get(s.put(kind, data)) == (kind, data)
    assert decode_object_file(encode_object_file(kind, data, 3), "x") == (kind, data)


def test_ids_do_not_depend_on_compression(tmp_path):
    data = np.zeros(100_000, np.float32).tobytes()  # very compressible
    raw = DiskObjectStore(tmp_path / "a", tmp_path / "t", compression_level=None)
    packed = DiskObjectStore(tmp_path / "b", tmp_path / "t", compression_level=19)
    i, j = raw.put(Kind.CHUNK, data), packed.put(Kind.CHUNK, data)
    assert i == j
    assert packed.path(j).stat().st_size < raw.path(i).stat().st_size // 10
    assert raw.get(i, verify=True)[1] == packed.get(j, verify=True)[1] == data


def test_incompressible_data_is_stored_raw(tmp_path):
    s = DiskObjectStore(tmp_path / "o", tmp_path / "t")
    data = np.random.default_rng(0).bytes(50_000)
    oid = s.put(Kind.CHUNK, data)
    raw = s.path(oid).read_bytes()
    assert raw[6] == 0 and raw[HEADER_SIZE:] == data


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header_kind", "truncate", "magic"])
def test_damaged_object_files_are_detected(tmp_path, damage):
    s = DiskObjectStore(tmp_path / "o", tmp_path / "t")
    oid = s.put(Kind.RECORD, b"\x80" * 300)
    path = s.path(oid)
    raw = bytearray(path.read_bytes())
    if damage == "flip_payload":
        raw[-1] ^= 0x01
    elif damage == "flip_header_kind":
        raw[5] = 1  # record -> blob: hashes with another context
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[0:4] = b"XXXX"
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        s.get(oid, verify=True)


def test_staging_publishes_only_on_success(tmp_path):
    base = DiskObjectStore(tmp_path / "o", tmp_path / "t")
    kept = base.put(Kind.BLOB, b"already here")
    stage = StagingStore(base, tmp_path / "t" / "txn-1")
    new = stage.put(Kind.BLOB, b"new")
    assert stage.put(Kind.BLOB, b"already here") == kept
    assert stage.has(new) and not base.has(new)
    assert stage.get(new) == (Kind.BLOB, b"new")
    stage.publish()
    assert base.has(new) and not (tmp_path / "t" / "txn-1").exists()

    stage2 = StagingStore(base, tmp_path / "t" / "txn-2")
    lost = stage2.put(Kind.BLOB, b"discarded")
    stage2.discard()
    assert not base.has(lost) and not (tmp_path / "t" / "txn-2").exists()
    assert set(base.ids()) == {kept, new}


def test_existing_object_write_refreshes_mtime(tmp_path):
    s = DiskObjectStore(tmp_path / "o", tmp_path / "t")
    oid = s.put(Kind.BLOB, b"x")
    os.utime(s.path(oid), (1000, 1000))
    s.put(Kind.BLOB, b"x")
    assert s.info(oid).mtime > 1000
