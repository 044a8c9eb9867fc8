"""The shared population server on loopback, driven by the real client: clone, push, pull, and refusals."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import TILT_ARGS, running_server
from cryopool.repo import Repository, canonical
from cryopool.repo.errors import ConflictError, InvalidInputError
from cryopool.repo.hashing import Kind, hash_bytes
from cryopool.repo.importers import import_tilt_series
from cryopool.repo.merge import merge
from cryopool.repo.records import Operation, Population
from cryopool.repo.remote import add_remote, clone, fetch, push
from cryopool.repo.store import encode_object_file
from cryopool.repo.verify import verify

EDIT = Operation(kind="edit", parameters={}, software="test")
TOKENS = {"writer": ["read", "write"], "reader": ["read"], "admin": ["read", "write", "force"]}


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
    obj = {"Content-Type": "application/octet-stream"}
    reader = {"Authorization": "Bearer reader"}
    writer = {"Authorization": "Bearer writer"}
    assert httpx.put(f"{api}/objects/{oid}", content=body, headers=reader | obj).status_code == 403
    assert httpx.put(f"{api}/objects/{oid}", content=body, headers=obj).status_code == 401
    assert httpx.put(f"{api}/objects/{oid}", content=body, headers=writer).status_code == 415  # the declared type
    wrong = hash_bytes(Kind.BLOB, b"something else")
    assert httpx.put(f"{api}/objects/{wrong}", content=body, headers=writer | obj).status_code == 400  # re-hashed
    assert httpx.put(f"{api}/objects/not-an-id", content=body, headers=writer | obj).status_code == 400
    tip = central.resolve("main")
    evil = httpx.post(f"{api}/refs/refs/heads/../../evil", json={"old": tip, "new": tip}, headers=writer)
    assert evil.status_code in (400, 404)
    dangling = httpx.post(f"{api}/refs/refs/heads/x", json={"old": None, "new": "ab" * 32}, headers=writer)
    assert dangling.status_code == 400 and "missing" in dangling.text
    big = httpx.put(f"{api}/objects/{oid}", content=b"x" * (2 << 20), headers=writer | obj)
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
from cryopool.repo import Repository, canonical
from cryopool.repo.errors import ConflictError
from cryopool.repo.merge import merge
from cryopool.repo.records import Operation, Population
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


def _put(api: str, kind: Kind, data: bytes, token: str = "writer") -> httpx.Response:
    return httpx.put(f"{api}/objects/{hash_bytes(kind, data)}", content=encode_object_file(kind, data, None),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})


def test_a_write_token_cannot_rewrite_history_or_store_junk(served, tmp_path):
    """Refs name only well-formed commits; branches move forward, tags never, unless the token may force."""
    central, url = served
    api, writer = url + "/api/v1", {"Authorization": "Bearer writer"}
    tip = central.resolve("main")
    state = sorted(central.store.ids())
    chunk = next(oid for oid in central.store.ids() if central.store.info(oid).kind == Kind.CHUNK)
    population = central.get_commit(tip).population.id
    for not_a_commit in (chunk, population):
        r = httpx.post(f"{api}/refs/refs/heads/x", json={"old": None, "new": not_a_commit}, headers=writer)
        assert r.status_code == 400, r.text
    untyped = canonical.encode({"hello": "world"})  # no _type: not a record
    assert _put(api, Kind.RECORD, untyped).status_code == 400
    deep = b"\x91" * 600 + b"\xc0"  # nested 600 levels: a clean 400, never a RecursionError
    assert _put(api, Kind.RECORD, deep).status_code == 400
    host, port = url.removeprefix("http://").split(":")
    raw = http.client.HTTPConnection(host, int(port), timeout=30)  # httpx would drop the encoded newline
    raw.request("POST", "/api/v1/refs/refs/heads/evil%0A", body=json.dumps({"old": None, "new": tip}),
                headers={**writer, "Content-Type": "application/json"})
    assert raw.getresponse().status == 400
    raw.close()
    assert sorted(central.store.ids()) == state and set(central.refs.list("refs/")) == {"refs/heads/main"}

    # an unrelated commit: a second history pushed as a branch, then aimed at main
    other = Repository.init(tmp_path / "other")
    other.commit(lambda p: Population(name="other", metadata={"x": 1}), message="unrelated", operation=EDIT)
    add_remote(other, "c", url, token="writer")
    other.create_branch("side", "main")
    push(other, "c", "side")
    unrelated = central.resolve("side")
    r = httpx.post(f"{api}/refs/refs/heads/main", json={"old": tip, "new": unrelated}, headers=writer)
    assert r.status_code == 403 and "fast-forward" in r.text and central.resolve("main") == tip
    assert httpx.post(f"{api}/refs/refs/tags/v1", json={"old": None, "new": tip}, headers=writer).status_code == 200
    moved = httpx.post(f"{api}/refs/refs/tags/v1", json={"old": tip, "new": unrelated}, headers=writer)
    assert moved.status_code == 403 and "tags never move" in moved.text
    admin = {"Authorization": "Bearer admin"}
    assert httpx.post(f"{api}/refs/refs/heads/main", json={"old": tip, "new": unrelated}, headers=admin).status_code == 200
    assert central.resolve("main") == unrelated and verify(central).ok


def test_read_endpoints_are_bounded(served):
    central, url = served
    api, reader = url + "/api/v1", {"Authorization": "Bearer reader"}
    tip = central.resolve("main")
    assert httpx.post(f"{api}/objects/get", json={"ids": [tip] * 1000}, headers=reader).status_code == 400
    huge = b'{"ids": ["' + b"a" * (9 << 20) + b'"]}'
    r = httpx.post(f"{api}/objects/missing", content=huge, headers={**reader, "content-type": "application/json"})
    assert r.status_code == 413


def test_a_client_that_trickles_its_headers_is_cut_off(tmp_path):
    """Slowloris: uvicorn alone keeps such a connection open for ever; the server closes it at the deadline,
    while a client that sends its request in time, or several on one connection, is served."""
    Repository.init(tmp_path / "pop")
    with running_server(str(tmp_path / "pop"), header_timeout=1.0, anonymous_read=True) as url:
        host, port = url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\n")
        slow.settimeout(0.25)
        t0, closed = time.monotonic(), False
        while time.monotonic() - t0 < 4:
            try:
                slow.sendall(b"X")  # one byte of a header, never finished
                if slow.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        assert closed and 0.8 < time.monotonic() - t0 < 3
        with httpx.Client(base_url=url) as client:  # keep-alive: the deadline restarts after each response
            for _ in range(3):
                assert client.get("/api/v1/info").status_code == 200
                time.sleep(0.6)
            assert client.get("/api/v1/refs").status_code == 200
