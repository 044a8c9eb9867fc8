"""The shared population server on loopback, driven by the real client: clone, push, pull, and refusals."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import httpx
import pytest

from conftest import TILT_ARGS, running_server
from cryopool.repo import Repository
from cryopool.repo.errors import ConflictError, InvalidInputError
from cryopool.repo.hashing import Kind, hash_bytes
from cryopool.repo.importers import import_tilt_series
from cryopool.repo.merge import merge
from cryopool.repo.records import Operation
from cryopool.repo.remote import add_remote, clone, fetch, push
from cryopool.repo.store import encode_object_file
from cryopool.repo.verify import verify

EDIT = Operation(kind="edit", parameters={}, software="test")
TOKENS = {"writer": ["read", "write"], "reader": ["read"]}


@pytest.fixture
def served(tmp_path, inputs):
    central = Repository.init(tmp_path / "central")
    import_tilt_series(central, inputs["ts1"], source="lab_a", **TILT_ARGS)
    with running_server(central.work_dir, tokens=TOKENS, anonymous_read=False, max_object_bytes=1 << 20) as url:
        yield central, url


def test_clone_push_pull_through_the_server(served, tmp_path):
    central, url = served
    lab_a = clone(url, str(tmp_path / "a"), token="writer")
    lab_b = clone(url, str(tmp_path / "b"), token="writer")
    assert lab_a.resolve("main") == central.resolve("main") and verify(lab_a).ok
    lab_a.commit(lambda p: dataclasses.replace(p, metadata={"a": 1}), message="a", operation=EDIT)
    stats, cid = push(lab_a, "origin")
    assert stats.objects == 2 and central.resolve("main") == cid  # the new population and commit only
    lab_b.commit(lambda p: dataclasses.replace(p, metadata={"b": 2}), message="b", operation=EDIT)
    with pytest.raises(ConflictError, match="not a fast-forward"):
        push(lab_b, "origin")
    fetch(lab_b, "origin")
    merge(lab_b, "origin/main", policy="keep-both")
    push(lab_b, "origin")
    assert central.population().metadata == {"a": 1, "b": 2} and verify(central).ok


def test_refusals(served, tmp_path):
    central, url = served
    api = url + "/api/v1"
    state = sorted(central.store.ids())
    assert httpx.get(api + "/refs").status_code == 401  # no token, no anonymous read
    assert httpx.get(api + "/refs", headers={"Authorization": "Bearer nope"}).status_code == 401
    data = b"a new blob"
    oid = hash_bytes(Kind.BLOB, data)
    body = encode_object_file(Kind.BLOB, data, None)
    reader = {"Authorization": "Bearer reader"}
    writer = {"Authorization": "Bearer writer"}
    assert httpx.put(f"{api}/objects/{oid}", content=body, headers=reader).status_code == 403
    assert httpx.put(f"{api}/objects/{oid}", content=body).status_code == 401
    wrong = hash_bytes(Kind.BLOB, b"something else")
    assert httpx.put(f"{api}/objects/{wrong}", content=body, headers=writer).status_code == 400  # re-hashed
    assert httpx.put(f"{api}/objects/not-an-id", content=body, headers=writer).status_code == 400
    tip = central.resolve("main")
    evil = httpx.post(f"{api}/refs/refs/heads/../../evil", json={"old": tip, "new": tip}, headers=writer)
    assert evil.status_code in (400, 404)
    dangling = httpx.post(f"{api}/refs/refs/heads/x", json={"old": None, "new": "ab" * 32}, headers=writer)
    assert dangling.status_code == 400 and "missing" in dangling.text
    big = httpx.put(f"{api}/objects/{oid}", content=b"x" * (2 << 20), headers=writer)
    assert big.status_code == 413
    assert sorted(central.store.ids()) == state  # nothing written by any refused request
    assert httpx.get(url + "/openapi.json").status_code == 200
    lab = Repository.init(tmp_path / "r")
    add_remote(lab, "srv", url, token="reader")
    stats, refs = fetch(lab, "srv")
    assert refs and stats.objects > 0
    lab.create_branch("main", "srv/main", force=True)
    with pytest.raises(InvalidInputError, match="403"):
        push(lab, "srv", "main", force=True)


PUSHER = """
import dataclasses, sys
from cryopool.repo import Repository
from cryopool.repo.errors import ConflictError
from cryopool.repo.merge import merge
from cryopool.repo.records import Operation
from cryopool.repo.remote import fetch, push
repo = Repository.open(sys.argv[1])
who = sys.argv[2]
for i in range(3):
    repo.commit(lambda p: dataclasses.replace(p, metadata={**p.metadata, f"{who}-{i}": i}), message=f"{who} {i}",
                operation=Operation(kind="edit", parameters={}, software="t"))
    for attempt in range(60):
        try:
            push(repo, "origin")
            break
        except ConflictError:
            fetch(repo, "origin")
            merge(repo, "origin/main", policy="keep-both")
    else:
        raise SystemExit("never landed")
"""


def test_concurrent_pushes_through_the_server_lose_nothing(served, tmp_path):
    central, url = served
    labs = [clone(url, str(tmp_path / f"lab{k}"), token="writer") for k in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, str(r.work_dir), f"lab{k}"]) for k, r in enumerate(labs)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert {f"lab{k}-{i}" for k in range(3) for i in range(3)} <= set(central.population().metadata)
    assert verify(central).ok
