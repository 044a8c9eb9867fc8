"""kill -9 at any moment of an import or a commit: the repository verifies, the previous commit is intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import TILT_ARGS, write_mrc
from cryopool.repo import Repository
from cryopool.repo.gc import gc
from cryopool.repo.importers import import_tilt_series
from cryopool.repo.population import iter_items
from cryopool.repo.verify import verify

IMPORTER = textwrap.dedent("""
    import sys
    from cryopool.repo import Repository
    from cryopool.repo.importers import import_tilt_series
    repo = Repository.open(sys.argv[1])
    print("started", flush=True)
    import_tilt_series(repo, sys.argv[2], source=sys.argv[3], tilt_angles="-60:60:3", dose_per_tilt=3.0,
                       defocus_um=3.0)
    print("done", flush=True)
""")


def _kill_during_import(repo: Repository, stack, source: str, delay: float) -> bool:
    proc = subprocess.Popen([sys.executable, "-c", IMPORTER, str(repo.work_dir), str(stack), source],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode == 0


def _crash_trials(tmp_path, shape, delays):
    repo = Repository.init(tmp_path / "pop")
    rng = np.random.default_rng(0)
    stack = write_mrc(tmp_path / "big.mrc", rng.normal(size=shape).astype(np.float32))
    small = write_mrc(tmp_path / "small.mrc", rng.normal(size=(9, 16, 16)).astype(np.float32))
    first = import_tilt_series(repo, small, source="base", **TILT_ARGS)
    head = first
    landed = 0
    for trial, delay in enumerate(delays):
        _kill_during_import(repo, stack, f"s{trial}", delay)
        report = verify(repo)
        assert report.ok, (delay, report.problems)
        now = repo.resolve("HEAD")
        if now != head:  # the import finished before the kill: it must be whole
            assert repo.get_commit(now).parents[0].id == head
            assert f"s{trial}/big" in [k for k, _, _ in iter_items(repo, repo.population())]
            landed += 1
        head = now
        assert [cid for cid, _ in repo.log()][-1] == first  # the earliest commit is intact
        (key, ref, ts), = [x for x in iter_items(repo, repo.population(first))]
        assert repo.get_array(ts.stack).read().shape == (9, 16, 16)
    # leftover staging areas are garbage; gc clears them and everything still verifies
    gc(repo, grace_s=0)
    assert not any((repo.root / "tmp").iterdir())
    assert verify(repo).ok
    return landed


def test_kill_during_import_leaves_a_verifiable_repository(tmp_path):
    delays = [0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.9, 1.5, 3.0]
    landed = _crash_trials(tmp_path, (41, 256, 256), delays)
    assert landed < len(delays)  # at least one kill landed mid-import


@pytest.mark.slow
def test_kill_during_large_import(tmp_path):
    delays = list(np.linspace(0.0, 4.0, 16))
    _crash_trials(tmp_path, (41, 1024, 1024), delays)


COMMITTER = textwrap.dedent("""
    import dataclasses, sys
    from cryopool.repo import Repository
    from cryopool.repo.records import Operation, Population
    repo = Repository.open(sys.argv[1])
    print("started", flush=True)
    i = 0
    while True:
        i += 1
        repo.commit(lambda p: dataclasses.replace(p or Population(name="p"), metadata={"i": i}),
                    message=f"commit {i}", operation=Operation(kind="edit", parameters={}, software="t"))
""")


def test_kill_during_commit_loop(tmp_path):
    repo = Repository.init(tmp_path / "pop")
    for delay in (0.2, 0.35, 0.5, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", COMMITTER, str(repo.work_dir)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "started"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report = verify(repo)
        assert report.ok, report.problems
        history = list(repo.log())
        # each process commits 1, 2, 3, …: newest first, every commit is its predecessor's number plus one,
        # or a new process's first; and each commit's population holds the number its message names
        numbers = [int(c.message.removeprefix("commit ")) for _, c in history]
        assert all(newer in (older + 1, 1) for newer, older in zip(numbers, numbers[1:])), numbers
        assert all(repo.population(cid).metadata["i"] == k for (cid, _), k in zip(history, numbers))
        # the reflog is written just before the ref: its last line names the tip or the one being written
        last = repo.refs.reflog("refs/heads/main")[-1]
        assert history[0][0] in (last.new, last.old)
