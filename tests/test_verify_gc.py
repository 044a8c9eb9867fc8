"""verify catches every kind of damage and names it; gc removes only the unreachable."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from conftest import TILT_ARGS
from cryopool.repo import CryopoolError, canonical
from cryopool.repo.canonical import Ref
from cryopool.repo.gc import gc, reachable
from cryopool.repo.hashing import Kind
from cryopool.repo.importers import import_species, import_tilt_series
from cryopool.repo.records import Operation, ParticleTable, Population, Species
from cryopool.repo.store import HEADER_SIZE, encode_object_file
from cryopool.repo.verify import verify

OP = Operation(kind="edit", parameters={}, software="test")


@pytest.fixture
def repo(disk_repo, inputs):
    import_tilt_series(disk_repo, inputs["ts1"], source="lab_a", **TILT_ARGS)
    import_tilt_series(disk_repo, inputs["ts2"], source="lab_a", **TILT_ARGS)
    import_species(disk_repo, "ribo", half_map_1=inputs["half1"], half_map_2=inputs["half2"], mask=inputs["mask"],
                   particles=inputs["particles"], diameter_angstrom=250)
    return disk_repo


def test_clean_repository_verifies(repo):
    report = verify(repo)
    assert report.ok, report.problems
    assert report.commits == 3 and report.objects == len(list(repo.store.ids()))
    assert report.bytes_hashed > 9 * 48 * 64 * 4 * 2


def test_a_flipped_byte_in_any_object_is_detected(repo):
    ids = sorted(repo.store.ids())
    assert len(ids) > 50
    for object_id in ids:
        path = repo.store.path(object_id)
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2 + 8] ^= 0x40  # in the payload (past the 16-byte header)
        path.write_bytes(bytes(damaged))
        try:
            report = verify(repo)
            assert not report.ok
            assert object_id in {p.object_id for p in report.problems}, object_id
        finally:
            path.write_bytes(original)
    assert verify(repo).ok


def test_quick_checks_structure_only(repo):
    chunk = next(i for i in sorted(repo.store.ids()) if repo.store.info(i).kind == Kind.CHUNK
                 and repo.store.path(i).read_bytes()[6] == 0)  # a raw (uncompressed) chunk
    path = repo.store.path(chunk)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert verify(repo, quick=True).ok
    full = verify(repo)
    assert [p.object_id for p in full.problems] == [chunk]
    assert "does not hash to its id" in full.problems[0].problem


def test_missing_object_names_its_referrers(repo):
    sp = repo.get_record(repo.population().species["ribo"], Species)
    repo.store.delete(sp.mask.id)
    report = verify(repo, quick=True)
    (problem,) = report.problems
    assert problem.object_id == sp.mask.id and problem.problem == "missing object"
    assert any("Species" in r and r.endswith(".mask") for r in problem.referrers)


def test_wrongly_typed_references_are_reported(repo):
    pop = repo.population()
    item_ref = next(iter(repo.get_record(pop.data_sources["lab_a"]).items.values()))
    blob = repo.put_blob(b"not a species")
    bad = dataclasses.replace(pop, species={**pop.species, "fake": item_ref, "blobby": blob})
    repo.commit(bad, message="bad refs", operation=OP)
    problems = [str(p) for p in verify(repo, quick=True).problems]
    assert any("is a TiltSeries record" in p and "expects Species" in p for p in problems), problems
    assert any("refers to a blob, expected a record" in p for p in problems), problems


def test_semantic_invariants(repo):
    pop = repo.population()
    sp = repo.get_record(pop.species["ribo"], Species)
    table = repo.get_record(sp.particles, ParticleTable)
    wrong = dataclasses.replace(table, count=table.count + 1)
    sp2 = dataclasses.replace(sp, particles=repo.put_record(wrong))
    repo.commit(dataclasses.replace(pop, species={"ribo": repo.put_record(sp2)}), message="bad count", operation=OP)
    problems = [p.problem for p in verify(repo).problems]
    assert any("column particle_id has 8 rows, table count is 9" in p for p in problems), problems


def test_gc_removes_only_unreachable_and_old(repo):
    live_before = reachable(repo)
    junk = repo.put_blob(b"unreferenced junk").id
    report = gc(repo)  # default grace: the junk is too young
    assert report.removed == 0 and report.kept_young == 1 and repo.store.has(junk)
    old = time.time() - 7200
    os.utime(repo.store.path(junk), (old, old))
    assert gc(repo, dry_run=True).removed == 1 and repo.store.has(junk)
    report = gc(repo)
    assert report.removed == 1 and not repo.store.has(junk)
    assert reachable(repo) == live_before and verify(repo).ok


def test_reflog_keeps_objects_of_deleted_branches(repo):
    repo.create_branch("side")
    repo.checkout("side")
    cid = repo.commit(lambda p: dataclasses.replace(p, metadata={"x": 1}), message="side work", operation=OP)
    repo.checkout("main")
    repo.delete_ref("refs/heads/side")
    gc(repo, grace_s=0)
    assert repo.store.has(cid)  # still reachable through the reflog
    assert verify(repo).ok


def test_gc_removes_stale_staging_areas(repo):
    stale = repo.root / "tmp" / "txn-dead"
    (stale / "objects" / "ab").mkdir(parents=True)
    (stale / "objects" / "ab" / "cd").write_bytes(b"x")
    assert gc(repo).tmp_removed == 0  # young: might belong to a running import
    old = time.time() - 7200
    for p in [stale, stale / "objects", stale / "objects" / "ab"]:
        os.utime(p, (old, old))
    assert gc(repo).tmp_removed == 1 and not stale.exists()


def test_cycles_are_detected(repo):
    """Content addressing makes cycles impossible to write honestly: forge one on disk."""
    a = repo.put_record(Population(name="a")).id
    b_value = Population(name="b", metadata={"r": 0})
    # population a -> b -> a via species refs, by writing files under each other's names
    rec_a = canonical.encode({**Population(name="a").to_value(), "species": {"s": Ref(Kind.RECORD, "f" * 64)}})
    rec_f = canonical.encode({**b_value.to_value(), "species": {"s": Ref(Kind.RECORD, a)}})
    repo.store.path(a).write_bytes(encode_object_file(Kind.RECORD, rec_a, None))
    fpath = repo.store.path("f" * 64)
    fpath.parent.mkdir(parents=True, exist_ok=True)
    fpath.write_bytes(encode_object_file(Kind.RECORD, rec_f, None))
    repo.refs.update("refs/tags/forged", "f" * 64, expected=None, author="t", message="forged")
    problems = [p.problem for p in verify(repo, quick=True).problems]
    assert any("cycle" in p for p in problems), problems
    full = [p.problem for p in verify(repo).problems]
    assert any("does not hash" in p for p in full)


def test_every_byte_of_every_object_file_is_accounted_for(repo):
    """A flip in any header byte (the reserved one included), or bytes after a compressed payload, fail verify.

    (Flips in the payload are the test above; a zstd stream has a few redundant bits whose flip decodes to
    the same content, which is then intact: the content hash is the check there.)
    """
    commit = repo.resolve("HEAD")
    path = repo.store.path(commit)
    original = path.read_bytes()
    for i in range(HEADER_SIZE):
        damaged = bytearray(original)
        damaged[i] ^= 0x01
        path.write_bytes(bytes(damaged))
        report = verify(repo)
        assert not report.ok and any(commit in p.object_id or commit in str(p) for p in report.problems), i
    compressed = next(o for o in repo.store.ids() if repo.store.path(o).read_bytes()[6] == 1)  # codec: zstd
    path.write_bytes(original)
    other = repo.store.path(compressed)
    kept = other.read_bytes()
    other.write_bytes(kept + b"\0")
    assert compressed in {p.object_id for p in verify(repo).problems}
    other.write_bytes(kept)
    assert verify(repo).ok


@pytest.mark.parametrize("damage", ["truncated", "garbage", "stray space"])
def test_damaged_ref_files_fail_verify(repo, damage):
    head = repo.root / "HEAD"
    ref = repo.root / "refs/heads/main"
    if damage == "truncated":
        head.write_text(head.read_text()[:9])
    elif damage == "garbage":
        ref.write_text(ref.read_text() + "junk\n")
    else:
        ref.write_text(" " + ref.read_text())
    report = verify(repo)
    assert not report.ok and any(p.object_id in (str(head), str(ref)) for p in report.problems), report.problems


def test_a_symlinked_reflog_is_never_written_through(repo, tmp_path):
    outside = tmp_path / "outside.log"
    outside.write_text("")
    log = repo.root / "logs/refs/heads/main"
    log.unlink()
    log.symlink_to(outside)
    with pytest.raises(CryopoolError, match="symbolic link"):
        repo.create_branch("other", "main")
        repo.commit(lambda p: dataclasses.replace(p, metadata={"x": 1}), message="x", operation=OP)
    assert outside.read_text() == ""
    assert any("symbolic link" in p.problem for p in verify(repo).problems)


def test_gc_collects_a_damaged_unreachable_object(repo):
    junk = repo.store.put(Kind.BLOB, b"unreachable")
    path = repo.store.path(junk)
    path.write_bytes(path.read_bytes()[:5])  # cut short in its header: info() cannot read it
    old = time.time() - 7200
    os.utime(path, (old, old))
    report = gc(repo, grace_s=60)
    assert report.removed == 1 and not path.exists() and verify(repo).ok


def test_verify_mentions_what_killed_operations_left_in_tmp(repo):
    leftover = repo.root / "tmp" / "tx-killed"
    leftover.mkdir(parents=True)
    (leftover / "big").write_bytes(b"\0" * 4096)
    report = verify(repo)
    assert report.ok and report.temporary_bytes == 4096
