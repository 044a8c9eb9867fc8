"""Object ids and canonical encoding, against independent oracles.

* BLAKE3 itself: the official test vectors (derive-key mode) from
  github.com/BLAKE3-team/BLAKE3 test_vectors/test_vectors.json.
* Canonical msgpack: bytes built by hand from the msgpack spec in the test.
* Golden object ids: the values documented in docs/format.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryopool.repo import canonical
from cryopool.repo.canonical import Ref
from cryopool.repo.errors import FormatError, InvalidInputError
from cryopool.repo.hashing import CONTEXTS, Kind, ObjectId, hash_bytes

DOCS = Path(__file__).resolve().parents[1] / "docs" / "format.md"

# Official BLAKE3 derive_key vectors (first 32 bytes), input = bytes(i % 251).
BLAKE3_CONTEXT = "BLAKE3 2019-12-27 16:29:52 test vectors context"
BLAKE3_DERIVE_KEY = {
    0: "2cc39783c223154fea8dfb7c1b1660f2ac2dcbd1c1de8277b0b0dd39b7e50d7d",
    1: "b3e2e340a117a499c6cf2398a19ee0d29cca2bb7404c73063382693bf66cb06c",
    1024: "7356cd7720d5b66b6d0697eb3177d9f8d73a4a5c5e968896eb6a689684302706",
    1025: "effaa245f065fbf82ac186839a249707c3bddf6d3fdda22d1b95a3c970379bcb",
}


def _vector_input(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


@pytest.mark.parametrize("n", sorted(BLAKE3_DERIVE_KEY))
def test_blake3_derive_key_matches_official_vectors(n):
    got = blake3.blake3(_vector_input(n), derive_key_context=BLAKE3_CONTEXT).hexdigest()
    assert got == BLAKE3_DERIVE_KEY[n][:64]


def test_object_id_is_derive_key_blake3_with_kind_context():
    data = b"tilt series"
    for kind in Kind:
        expected = blake3.blake3(data, derive_key_context=CONTEXTS[kind]).hexdigest()
        assert hash_bytes(kind, data) == expected
    assert len({hash_bytes(k, data) for k in Kind}) == 3  # domain separation


def _doc_vectors() -> list[dict]:
    text = DOCS.read_text()
    block = re.search(r"```json test-vectors\n(.*?)```", text, re.S)
    assert block, "docs/format.md must contain a ```json test-vectors block"
    return json.loads(block.group(1))


def test_golden_vectors_documented_in_format_md():
    vectors = _doc_vectors()
    assert len(vectors) >= 5
    for v in vectors:
        kind = Kind[v["kind"].upper()]
        if "record" in v:
            value = json.loads(json.dumps(v["record"]))
            data = canonical.encode(_refs_from_json(value))
            assert data.hex() == v["bytes_hex"], v["name"]
        else:
            data = bytes.fromhex(v["bytes_hex"])
        # independent of our code: BLAKE3 derive-key with the documented context
        ctx = v["context"]
        assert blake3.blake3(data, derive_key_context=ctx).hexdigest() == v["id"], v["name"]
        assert hash_bytes(kind, data) == v["id"], v["name"]


def _refs_from_json(value):
    if isinstance(value, dict) and set(value) == {"$ref", "kind"}:
        return Ref(Kind[value["kind"].upper()], value["$ref"])
    if isinstance(value, dict):
        return {k: _refs_from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_refs_from_json(v) for v in value]
    return value


def test_canonical_bytes_built_by_hand_from_the_msgpack_spec():
    ref_id = "ab" * 32
    value = {"b": 1, "a": [1.5, None, True, "é"], "Z": b"\x00\x01", "r": Ref(Kind.CHUNK, ref_id), "n": -1}
    expected = (
        b"\x85"  # fixmap, 5 entries, keys sorted by UTF-8 bytes: Z a b n r
        + b"\xa1Z" + b"\xc4\x02\x00\x01"  # bin8
        + b"\xa1a" + b"\x94" + b"\xcb" + struct.pack(">d", 1.5) + b"\xc0" + b"\xc3" + b"\xa2" + "é".encode()
        + b"\xa1b" + b"\x01"
        + b"\xa1n" + b"\xff"  # negative fixint
        + b"\xa1r" + b"\xc7\x21\x01" + bytes([2]) + bytes.fromhex(ref_id)  # ext8, 33 bytes, type 1
    )
    assert canonical.encode(value) == expected
    assert canonical.decode(expected) == value


def test_numbers_are_canonicalised():
    nan_payload = np.frombuffer(bytes.fromhex("01000000000ff8ff"), dtype="<f8")[0]  # negative NaN, payload
    assert math.isnan(nan_payload)
    assert canonical.encode(nan_payload) == b"\xcb" + bytes.fromhex("7ff8000000000000")
    assert canonical.encode(np.float32(0.5)) == canonical.encode(0.5) == b"\xcb" + struct.pack(">d", 0.5)
    assert canonical.encode(np.int64(5)) == canonical.encode(5) == b"\x05"
    assert canonical.encode(300) == b"\xcd\x01\x2c"  # uint16, the shortest form


def test_non_canonical_encodings_are_rejected():
    unsorted = b"\x82\xa1b\x01\xa1a\x02"
    with pytest.raises(FormatError, match="canonical"):
        canonical.decode(unsorted)
    float32 = b"\xca" + struct.pack(">f", 0.5)
    with pytest.raises(FormatError, match="canonical"):
        canonical.decode(float32)
    long_int = b"\xcd\x00\x05"  # 5 as uint16
    with pytest.raises(FormatError, match="canonical"):
        canonical.decode(long_int)
    with pytest.raises(FormatError, match="extension"):
        canonical.decode(b"\xd4\x05\x00")  # fixext1 of an unknown type
    with pytest.raises(FormatError):
        canonical.decode(b"\x92\x01")  # truncated array


def test_unstorable_values_are_refused():
    with pytest.raises(InvalidInputError):
        canonical.encode({"a": object()})
    with pytest.raises(InvalidInputError):
        canonical.encode({1: "int key"})
    with pytest.raises(InvalidInputError):
        canonical.encode(2**64)


def test_object_id_validation():
    with pytest.raises(InvalidInputError):
        ObjectId("ABC")
    with pytest.raises(InvalidInputError):
        ObjectId("g" * 64)
    assert ObjectId("a" * 64).short == "a" * 12


def test_hash_is_stable_across_processes():
    code = ("from cryopool.repo import canonical; from cryopool.repo.hashing import hash_bytes, Kind;"
            "print(hash_bytes(Kind.RECORD, canonical.encode({'z': [1, 2.5, {'y': 'x', 'a': None}], 'a': 'b'})))")
    ids = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        ids.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                               check=True).stdout.strip())
    local = hash_bytes(Kind.RECORD, canonical.encode({"a": "b", "z": [1, 2.5, {"a": None, "y": "x"}]}))
    assert ids == {local}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(json_values)
def test_encode_decode_round_trip_and_determinism(value):
    data = canonical.encode(value)
    back = canonical.decode(data)
    assert canonical.encode(back) == data
