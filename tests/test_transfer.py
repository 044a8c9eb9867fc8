"""Transfers: children-first storage, resumable fetch and push, packs over HTTP, partial clones."""

from __future__ import annotations

import random

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TILT_ARGS, lab_population, repo_state, running_server
from cryopool.cli.main import cli
from cryopool.repo import Repository
from cryopool.repo.canonical import decode, walk_refs
from cryopool.repo.errors import FormatError, InvalidInputError
from cryopool.repo.hashing import Kind, hash_bytes
from cryopool.repo.importers import import_tilt_series
from cryopool.repo.population import iter_items
from cryopool.repo.remote import add_remote, clone, deferred_objects, fetch_deferred, push, receive, remove_remote
from cryopool.repo.store import children_first
from cryopool.repo.transport import DirTransport, HttpTransport, encode_frames, iter_frames
from cryopool.repo.verify import verify


def _closed(repo: Repository) -> bool:
    """Every stored record's children are stored too (the rule negotiation relies on)."""
    for oid in repo.store.ids():
        kind, data = repo.store.get(oid)
        if kind == Kind.RECORD and not all(repo.store.has(r.id) for r in walk_refs(decode(data))):
            return False
    return True


@pytest.fixture
def source(tmp_path, inputs):
    return lab_population(tmp_path / "source", inputs)


def test_children_first_levels_on_random_dags():
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(1, 40)
        graph = {f"n{i}": [f"n{j}" for j in range(i) if rng.random() < 0.2] + ["outside"] * (rng.random() < 0.3)
                 for i in range(n)}
        levels = children_first(dict(reversed(list(graph.items()))))
        assert sorted(o for level in levels for o in level) == sorted(graph)
        where = {o: k for k, level in enumerate(levels) for o in level}
        assert all(where[c] < where[o] for o in graph for c in graph[o] if c in graph)


class Flaky(DirTransport):
    """A directory remote whose connection drops after ``budget`` objects."""

    def __init__(self, path, budget: int) -> None:
        super().__init__(path)
        self.budget = budget

    def get_many(self, ids):
        for item in super().get_many(ids):
            if self.budget == 0:
                raise ConnectionError("connection lost")
            self.budget -= 1
            yield item


def test_an_interrupted_fetch_keeps_what_arrived_and_resumes(source, tmp_path):
    total = len(list(source.store.ids()))
    dst = Repository.init(tmp_path / "dst")
    tip = source.resolve("main")
    with pytest.raises(ConnectionError):
        receive(dst, Flaky(source.root, budget=total - 3), [tip])
    kept = set(dst.store.ids())
    assert kept and all(dst.store.info(o).kind != Kind.RECORD for o in kept)  # leaves stay, records wait
    assert _closed(dst)
    stats = receive(dst, DirTransport(source.root), [tip])
    assert stats.objects == total - len(kept)  # nothing that arrived travels again
    assert set(dst.store.ids()) == set(source.store.ids()) and _closed(dst)


def test_a_damaged_object_on_the_sender_is_named_and_not_stored(source, tmp_path):
    dst = Repository.init(tmp_path / "dst")
    leaf = next(o for o in source.store.ids() if source.store.info(o).kind == Kind.CHUNK)
    path = source.store.path(leaf)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception, match=leaf):
        receive(dst, DirTransport(source.root), [source.resolve("main")])
    assert not dst.store.has(leaf) and _closed(dst)


def test_a_transaction_publishes_children_before_records(tmp_path, inputs, monkeypatch):
    repo = Repository.init(tmp_path / "r")
    order = []
    original = type(repo.store).adopt
    monkeypatch.setattr(type(repo.store), "adopt", lambda self, oid, src: (order.append(oid), original(self, oid, src)))
    import_tilt_series(repo, inputs["ts1"], source="lab_a", **TILT_ARGS)
    position = {o: i for i, o in enumerate(order)}
    for oid in order:
        kind, data = repo.store.get(oid)
        if kind == Kind.RECORD:
            assert all(position.get(r.id, -1) < position[oid] for r in walk_refs(decode(data)))


def test_pack_frames_round_trip_and_refuse_damage():
    objs = [(hash_bytes(Kind.BLOB, b), Kind.BLOB, b) for b in (b"", b"a" * 1000, bytes(range(256)))]
    body = b"".join(encode_frames(objs))
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]  # arrives in awkward pieces
    assert [oid for oid, _ in iter_frames(pieces, "pack", 1 << 20)] == [o[0] for o in objs]
    with pytest.raises(FormatError, match="middle of a frame"):
        list(iter_frames([body[:-1]], "pack", 1 << 20))
    with pytest.raises(FormatError, match="larger than"):
        list(iter_frames([body], "pack", 100))
    with pytest.raises(FormatError, match="object id"):
        list(iter_frames([b"z" * 72], "pack", 100))


@pytest.fixture
def served(tmp_path, source):
    central = Repository.init(tmp_path / "central")
    tokens = {"w": ["read", "write"]}
    with running_server(central.work_dir, tokens=tokens, anonymous_read=True,
                        max_object_bytes=128 << 10, max_request_bytes=256 << 10) as url:
        yield central, url


def test_packs_are_checked_whole_and_records_need_their_children(served, source):
    central, url = served
    api, writer = url + "/api/v1", {"Authorization": "Bearer w", "Content-Type": "application/x-cryopool-pack"}
    state = repo_state(central)
    commit = source.resolve("main")
    kind, data = source.store.get(commit)
    body = b"".join(encode_frames([(commit, kind, bytes(data))]))
    r = httpx.post(f"{api}/objects", content=body, headers=writer)  # a record before what it refers to
    assert r.status_code == 400 and "send the objects a record refers to first" in r.text
    r = httpx.put(f"{api}/objects/{commit}", content=body[72:],
                  headers={**writer, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400
    good = b"".join(encode_frames([(hash_bytes(Kind.BLOB, b"ok"), Kind.BLOB, b"ok")]))
    bad = bytearray(b"".join(encode_frames([(hash_bytes(Kind.BLOB, b"xy"), Kind.BLOB, b"xy")])))
    bad[-1] ^= 1
    r = httpx.post(f"{api}/objects", content=good + bytes(bad), headers=writer)
    assert r.status_code == 400 and "hashes to" in r.text
    assert httpx.post(f"{api}/objects", content=good[:-1], headers=writer).status_code == 400
    assert httpx.post(f"{api}/objects", content=good * 6000, headers=writer).status_code == 413  # > 256 KiB
    assert httpx.post(f"{api}/objects", content=good).status_code == 401
    assert httpx.post(f"{api}/objects", content=good, headers={"Authorization": "Bearer w"}).status_code == 415
    assert repo_state(central) == state  # nothing written by any refused pack
    assert httpx.post(f"{api}/objects", content=good, headers=writer).status_code == 201
    got = httpx.post(f"{api}/objects/get", json={"ids": [hash_bytes(Kind.BLOB, b"ok")]})
    assert got.status_code == 200 and [o for o, _ in iter_frames([got.content], "t", 1 << 20)]
    assert httpx.post(f"{api}/objects/get", json={"ids": ["ab" * 32]}).status_code == 404
    assert httpx.post(f"{api}/objects/get", json={"ids": ["../x"]}).status_code == 400


def test_an_interrupted_push_resumes_without_resending(served, source, monkeypatch):
    central, url = served
    add_remote(source, "central", url, token="w")
    calls = []
    original = HttpTransport._send_pack

    def dropping(self, pack):
        calls.append(len(pack))
        if len(calls) == 3:
            raise httpx.ConnectError("connection lost")
        return original(self, pack)

    monkeypatch.setattr(HttpTransport, "_send_pack", dropping)
    with pytest.raises(httpx.ConnectError):
        push(source, "central")
    landed = set(central.store.ids())
    assert len(calls) == 3 and len(landed) == sum(calls[:2]) and central.refs.read("refs/heads/main") is None
    assert _closed(central)
    monkeypatch.setattr(HttpTransport, "_send_pack", original)
    stats, cid = push(source, "central")
    assert stats.objects == len(list(source.store.ids())) - len(landed)  # only what had not landed
    assert central.resolve("main") == cid and verify(central).ok


def test_partial_clone_defers_raw_data_and_fetches_it_on_first_use(served, source, tmp_path):
    central, url = served
    add_remote(source, "central", url, token="w")
    push(source, "central")
    lab = clone(url, str(tmp_path / "lab"), partial=True)
    deferred = deferred_objects(lab)
    stacks = [ts.stack for _, _, ts in iter_items(lab, lab.population())]
    assert len(deferred) == sum(len(lab.get_record(s).chunks) for s in stacks) > 0
    assert not any(lab.store.has(o) for o in deferred)
    report = verify(lab)
    assert report.ok and report.deferred == len(deferred)
    # species, particles and maps are all there without the remote
    species = lab.population().species["S1"]
    assert np.array_equal(lab.get_array(lab.get_record(species).half_map_1).read(),
                          source.get_array(source.get_record(source.population().species["S1"]).half_map_1).read())
    # reading a stack fetches exactly its chunks, re-hashed, and gives the original pixels
    reopened = Repository.open(lab.work_dir)
    first = stacks[0]
    assert np.array_equal(reopened.get_array(first).read(), source.get_array(first).read())
    assert len(deferred_objects(reopened)) == len(deferred) - len(lab.get_record(first).chunks)
    result = CliRunner().invoke(cli, ["-C", str(lab.work_dir), "fetch", "--deferred"])
    assert result.exit_code == 0, result.output
    full = Repository.open(lab.work_dir)
    assert "partial" not in full.config and not deferred_objects(full)
    assert verify(full).ok and verify(full).deferred == 0
    assert set(full.store.ids()) >= set(source.store.ids())


def test_partial_clone_from_a_path_and_refusals(source, tmp_path):
    lab = clone(str(source.work_dir), str(tmp_path / "lab"), partial=True)
    assert deferred_objects(lab)
    with pytest.raises(InvalidInputError, match="has not fetched"):
        remove_remote(lab, "origin")
    assert fetch_deferred(lab).objects > 0 and verify(Repository.open(lab.work_dir)).ok
