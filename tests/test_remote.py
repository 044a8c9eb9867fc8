"""Sharing a population through a repository on a shared filesystem: clone, push, fetch, pull, merge."""

from __future__ import annotations

import dataclasses
import errno
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import add_species_s2, lab_population, repo_state
from cryopool.cli.main import cli
from cryopool.repo import Repository
from cryopool.repo.errors import AlreadyExistsError, ConflictError, IntegrityError, InvalidInputError
from cryopool.repo import remote as remote_module
from cryopool.repo.merge import merge
from cryopool.repo.records import Operation
from cryopool.repo.remote import add_remote, clone, fetch, push
from cryopool.repo.verify import verify

EDIT = Operation(kind="edit", parameters={}, software="test")


@pytest.fixture
def world(tmp_path, inputs):
    """Lab A has a population and pushes it to a central repository; lab B clones it."""
    central = Repository.init(tmp_path / "central")
    lab_a = lab_population(tmp_path / "lab_a", inputs)
    add_remote(lab_a, "central", central.work_dir)
    stats, _ = push(lab_a, "central")
    assert stats.objects == len(list(lab_a.store.ids()))  # a first push sends everything
    lab_b = clone(str(central.work_dir), str(tmp_path / "lab_b"))
    return central, lab_a, lab_b


def test_clone_reproduces_history_and_verifies(world):
    central, lab_a, lab_b = world
    assert lab_b.resolve("main") == lab_a.resolve("main") == central.resolve("main")
    assert [c for c, _ in lab_b.log()] == [c for c, _ in lab_a.log()]
    assert lab_b.resolve("origin/main") == lab_a.resolve("main")
    assert verify(central).ok and verify(lab_b).ok


def test_incremental_push_sends_only_new_objects_and_pull_merges(world, tmp_path, inputs):
    central, lab_a, lab_b = world
    lab_b.create_branch("lab-b")
    lab_b.checkout("lab-b")
    new = add_species_s2(lab_b, tmp_path, inputs)
    stats, _ = push(lab_b, "origin", "lab-b")
    assert stats.objects == len(new)  # only what lab B made travels
    # lab A moves on, then fetches lab B's branch and merges it
    lab_a.commit(lambda p: dataclasses.replace(p, metadata={"a": 1}), message="lab A note", operation=EDIT)
    _, refs = fetch(lab_a, "central")
    assert refs == {"refs/remotes/central/lab-b": lab_b.resolve("lab-b")}
    report = merge(lab_a, "central/lab-b", policy="keep-both")
    assert sorted(lab_a.population().species) == ["S1", "S2"]
    assert [p.id for p in lab_a.get_commit(report.commit).parents][1] == lab_b.resolve("lab-b")
    push(lab_a, "central")
    assert verify(lab_a).ok and verify(central).ok


def test_non_fast_forward_push_is_refused_and_nothing_is_lost(world):
    central, lab_a, lab_b = world
    lab_a.commit(lambda p: dataclasses.replace(p, metadata={"who": "a"}), message="a", operation=EDIT)
    lab_b.commit(lambda p: dataclasses.replace(p, metadata={"who": "b"}), message="b", operation=EDIT)
    push(lab_a, "central")
    with pytest.raises(ConflictError, match="not a fast-forward"):
        push(lab_b, "origin")
    assert central.resolve("main") == lab_a.resolve("main")  # lab A's commit survives
    push(lab_b, "origin", force=True)  # an owner may force
    assert central.resolve("main") == lab_b.resolve("main")
    assert verify(central).ok


def test_a_corrupted_object_is_caught_and_the_receiver_is_unchanged(world):
    central, lab_a, _ = world
    lab_a.commit(lambda p: dataclasses.replace(p, metadata={"x": 1}), message="new", operation=EDIT)
    new_commit = lab_a.resolve("main")
    path = lab_a.store.path(new_commit)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    state = repo_state(central)
    with pytest.raises(IntegrityError, match=new_commit):
        push(lab_a, "central")
    assert repo_state(central) == state


def test_cli_clone_push_pull(world, tmp_path):
    central, lab_a, _ = world
    runner = CliRunner()
    out = runner.invoke(cli, ["clone", str(central.work_dir), str(tmp_path / "lab_c"), "--json"],
                        catch_exceptions=False)
    assert out.exit_code == 0 and json.loads(out.stdout)["branch"] == "main"
    lab_a.commit(lambda p: dataclasses.replace(p, metadata={"y": 2}), message="more", operation=EDIT)
    assert runner.invoke(cli, ["-C", str(lab_a.work_dir), "push", "central"]).exit_code == 0
    pulled = runner.invoke(cli, ["-C", str(tmp_path / "lab_c"), "pull", "--json"], catch_exceptions=False)
    data = json.loads(pulled.stdout)
    assert pulled.exit_code == 0 and data["fast_forward"] and data["commit"] == lab_a.resolve("main")
    listed = runner.invoke(cli, ["-C", str(tmp_path / "lab_c"), "remote", "list", "--json"])
    assert json.loads(listed.stdout)["remotes"]["origin"] == str(central.work_dir)


PUSHER = """
import dataclasses, sys
from cryopool.repo import Repository
from cryopool.repo.errors import ConflictError
from cryopool.repo.records import Operation
from cryopool.repo.remote import fetch, push
from cryopool.repo.merge import merge
repo = Repository.open(sys.argv[1])
who, n = sys.argv[2], int(sys.argv[3])
landed = refused = 0
for i in range(n):
    repo.commit(lambda p: dataclasses.replace(p, metadata={**p.metadata, f"{who}-{i}": i}), message=f"{who} {i}",
                operation=Operation(kind="edit", parameters={}, software="t"))
    for attempt in range(50):
        try:
            push(repo, "origin")
            landed += 1
            break
        except ConflictError:
            refused += 1
            fetch(repo, "origin")
            merge(repo, "origin/main", policy="keep-both")
print(landed, refused)
"""


def test_concurrent_pushes_lose_no_commit(world, tmp_path):
    central, lab_a, _ = world
    labs = [clone(str(central.work_dir), str(tmp_path / f"p{k}")) for k in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, str(r.work_dir), f"p{k}", "3"], stdout=subprocess.PIPE,
                              text=True) for k, r in enumerate(labs)]
    results = [tuple(map(int, p.communicate(timeout=300)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs) and all(landed == 3 for landed, _ in results)
    final = central.population()
    assert {f"p{k}-{i}" for k in range(3) for i in range(3)} <= set(final.metadata)  # every change arrived
    history = {c for c, _ in central.log()}
    for r in labs:  # every commit any lab made is in the central history
        assert {c for c, _ in r.log()} <= history | {r.resolve("main")}
    assert verify(central).ok


def test_an_interrupted_clone_resumes_and_a_full_disk_cleans_up(tmp_path, inputs, monkeypatch):
    source = lab_population(tmp_path / "src", inputs)
    real_fetch = remote_module.fetch

    def broken(errno_code):
        def fetch(repo, name, progress=None):
            real_fetch(repo, name, progress)  # everything arrives, then the line drops before refs are set
            raise OSError(errno_code, "simulated")
        return fetch
    monkeypatch.setattr(remote_module, "fetch", broken(errno.EIO))
    with pytest.raises(OSError):
        remote_module.clone(str(source.work_dir), str(tmp_path / "lab"))
    assert (tmp_path / "lab/.cryopool").is_dir()  # kept: what arrived stays
    monkeypatch.setattr(remote_module, "fetch", real_fetch)
    again = remote_module.clone(str(source.work_dir), str(tmp_path / "lab"))  # the same command resumes
    assert again.resolve("main") == source.resolve("main") and "cloning" not in again.config
    with pytest.raises(AlreadyExistsError):  # a finished clone is not cloned over
        remote_module.clone(str(source.work_dir), str(tmp_path / "lab"))
    monkeypatch.setattr(remote_module, "fetch", broken(errno.ENOSPC))
    with pytest.raises(OSError):
        remote_module.clone(str(source.work_dir), str(tmp_path / "full"))
    assert not (tmp_path / "full").exists()  # the space is given back


def test_plain_http_off_this_machine_is_refused_unless_asked(monkeypatch):
    from cryopool.repo.transport import open_transport
    monkeypatch.delenv("CRYOPOOL_ALLOW_HTTP", raising=False)
    with pytest.raises(InvalidInputError, match="in clear"):
        open_transport("http://central.example.org:8765", token="t")
    open_transport("http://127.0.0.1:8765", token="t").close()  # loopback: the tests' and a tunnel's case
    monkeypatch.setenv("CRYOPOOL_ALLOW_HTTP", "1")
    open_transport("http://central.example.org:8765", token="t").close()
