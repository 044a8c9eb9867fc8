"""A really full disk (a 3 MiB tmpfs, where this machine lets the tests mount one): every command that writes
says so in one line, moves no ref, leaves no temporary file and nothing half-made, and the same command
finishes once there is space."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import repo_state, write_mrc
from cryopool.cli.main import cli
from cryopool.repo import Repository
from cryopool.repo.verify import verify

TS = ["--tilt-angles", "-60:60:3", "--dose-per-tilt", "3", "--defocus-um", "4"]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB filesystem of its own (needs root and a kernel that allows tmpfs mounts: else skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _no_temporary_files(repo_dir: Path) -> bool:
    tmp = repo_dir / ".cryopool" / "tmp"
    return not tmp.exists() or not any(p.is_file() for p in tmp.rglob("*"))


def test_a_full_disk_is_said_plainly_and_loses_nothing(small_disk, tmp_path):
    stacks = [write_mrc(tmp_path / f"TS_0{i}.mrc", np.random.default_rng(i).normal(size=(41, 64, 64))
                        .astype(np.float32)) for i in (1, 2)]  # 0.7 MiB each
    # an import that does not fit
    pop = small_disk / "pop"
    assert _run("init", pop).exit_code == 0
    assert _run("-C", pop, "import", "tilt-series", stacks[0], "--source", "a", *TS).exit_code == 0
    before = repo_state(Repository.open(pop))
    filler = _fill(small_disk)
    for args in (["import", "tilt-series", stacks[1], "--source", "a", *TS], ["branch", "b"], ["tag", "t"],
                 ["config", "user.name", "Someone"]):
        result = _run("-C", pop, *args)
        assert result.exit_code == 1, (args, result.output)
        assert "no space left on the device" in result.output and "Traceback" not in result.output, args
        assert repo_state(Repository.open(pop)) == before and _no_temporary_files(pop), args
    assert verify(Repository.open(pop)).ok
    filler.unlink()
    assert _run("-C", pop, "import", "tilt-series", stacks[1], "--source", "a", *TS).exit_code == 0  # now it fits
    shutil.rmtree(pop)

    # a push to a remote on the full disk, and a clone onto it
    source = tmp_path / "source"
    assert _run("init", source).exit_code == 0
    for s in stacks:
        assert _run("-C", source, "import", "tilt-series", s, "--source", "a", *TS).exit_code == 0
    central = small_disk / "central"
    assert _run("init", central).exit_code == 0
    assert _run("-C", source, "remote", "add", "central", central).exit_code == 0
    filler = _fill(small_disk)
    filler.write_bytes(b"\0" * (filler.stat().st_size - (1 << 20)))  # room for about one stack
    pushed = _run("-C", source, "push", "central", "main")
    assert pushed.exit_code == 1 and "no space left" in pushed.output and "Traceback" not in pushed.output
    assert Repository.open(central).refs.read("refs/heads/main") is None and _no_temporary_files(central)
    assert verify(Repository.open(central)).ok
    cloned = _run("clone", source, small_disk / "lab")
    assert cloned.exit_code == 1 and "no space left" in cloned.output
    assert not (small_disk / "lab").exists()  # no half-made folder
    filler.unlink()
    assert _run("-C", source, "push", "central", "main").exit_code == 0  # resumes
    assert Repository.open(central).resolve("main") == Repository.open(source).resolve("main")
    assert verify(Repository.open(central)).ok
