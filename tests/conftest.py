"""Shared fixtures: repositories (disk and memory), generated MRC/STAR inputs, state snapshots."""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryopool.repo import Repository
from cryopool.repo.importers import import_species, import_tilt_series
from cryopool.repo.server import serve_in_thread

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEST_DATA = Path(__file__).resolve().parent / "data"  # small real files, kept in the project (see its README)


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def needed(module: str):
    """A test dependency (installed by the test extras): skipped visibly where absent, a failure under CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if _under_ci():
            pytest.fail(f"test dependency {module} is missing under CI: {exc}")
        pytest.skip(f"test dependency {module} is not installed ({exc})", allow_module_level=True)


def shared_file(relative: str) -> Path:
    """A large real file from ``../shared/data``: skipped visibly where absent, a failure under CI."""
    path = SHARED / "data" / relative
    if not path.is_file():
        if _under_ci():
            pytest.fail(f"{path} is missing: CI must run the tests that need it")
        pytest.skip(f"{path} is absent (large real file, kept in ../shared only)")
    return path

os.environ.setdefault("CRYOPOOL_AUTHOR", "Test Author <test@example.org>")


def pytest_collection_modifyitems(config, items):
    """Slow tests run with -m slow or CRYOPOOL_SLOW=1; the default run is the fast subset."""
    if os.environ.get("CRYOPOOL_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or CRYOPOOL_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def disk_repo(tmp_path) -> Repository:
    return Repository.init(tmp_path / "pop")


@pytest.fixture(params=["disk", "memory"])
def any_repo(request, tmp_path) -> Repository:
    if request.param == "disk":
        return Repository.init(tmp_path / "pop")
    return Repository.in_memory()


def write_mrc(path: Path, data: np.ndarray, voxel: float = 10.0) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data))
        mrc.voxel_size = voxel
    return path


def write_particles(path: Path, rows: list[dict]) -> Path:
    starfile.write({"particles": pd.DataFrame(rows)}, path, overwrite=True)
    return path


def particle_rows(names: list[str], n_each: int = 4, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for name in names:
        for i in range(n_each):
            rows.append({"rlnTomoName": name, "rlnCenteredCoordinateXAngst": rng.uniform(-400, 400),
                         "rlnCenteredCoordinateYAngst": rng.uniform(-400, 400),
                         "rlnCenteredCoordinateZAngst": rng.uniform(-100, 100),
                         "rlnAngleRot": rng.uniform(-180, 180), "rlnAngleTilt": rng.uniform(0, 180),
                         "rlnAnglePsi": rng.uniform(-180, 180), "rlnRandomSubset": i % 2 + 1})
    return rows


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Small, valid input files: two 9-tilt stacks, half-maps, a mask and a particle table."""
    rng = np.random.default_rng(1)
    d = tmp_path / "inputs"
    d.mkdir()
    files = {
        "ts1": write_mrc(d / "TS_01.mrc", rng.normal(size=(9, 48, 64)).astype(np.float32)),
        "ts2": write_mrc(d / "TS_02.mrc", rng.normal(size=(9, 48, 64)).astype(np.float32)),
    }
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    files["half1"] = write_mrc(d / "half1.mrc", vol)
    files["half2"] = write_mrc(d / "half2.mrc", vol + 0.1)
    files["mask"] = write_mrc(d / "mask.mrc", np.clip(vol, 0, 1))
    files["particles"] = write_particles(d / "particles.star", particle_rows(["TS_01", "TS_02"]))
    return files


TILT_ARGS = dict(tilt_angles="-12:12:3", dose_per_tilt=3.0, defocus_um=3.0)


def lab_population(path: Path, inputs: dict[str, Path]) -> Repository:
    """A lab's repository: tilt series TS_01 and TS_02 from lab_a and species S1 (100 Å)."""
    repo = Repository.init(path)
    import_tilt_series(repo, inputs["ts1"], source="lab_a", **TILT_ARGS)
    import_tilt_series(repo, inputs["ts2"], source="lab_a", **TILT_ARGS)
    import_species(repo, "S1", half_map_1=inputs["half1"], half_map_2=inputs["half2"], particles=inputs["particles"],
                   diameter_angstrom=100)
    return repo


def add_species_s2(repo: Repository, tmp_path: Path, inputs: dict[str, Path]) -> set[str]:
    """Another lab's contribution: species S2 (60 Å) on the checked-out branch; returns the new object ids."""
    before = set(repo.store.ids())
    star = write_particles(tmp_path / "s2.star", particle_rows(["TS_01", "TS_02"], 3, seed=9))
    import_species(repo, "S2", half_map_1=inputs["half1"], half_map_2=inputs["half1"], particles=star,
                   diameter_angstrom=60)
    return set(repo.store.ids()) - before


def repo_state(repo: Repository) -> dict[str, str]:
    """Every file under .cryopool except the lock and temporary files, with its content hash."""
    out = {}
    for path in sorted(repo.root.rglob("*")):
        rel = path.relative_to(repo.root).as_posix()
        if path.is_file() and rel != "refs.lock" and not rel.startswith("tmp/"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


running_server = serve_in_thread  # the library's helper, under the name the tests use


@pytest.fixture(scope="module")
def small_sim():
    """Two species of 4 particles in one small tilt series: the population the engine's refine tests share."""
    from dataclasses import replace

    from cryopool.engine.simulate import PRESETS, SpeciesSpec, simulate  # torch only for the tests that use it
    cfg = replace(PRESETS["test"], species=[SpeciesSpec("a", 150.0, 4), SpeciesSpec("b", 80.0, 4)],
                  items_per_source=1, image_size_px=(112, 112), seed=21)
    return simulate(cfg)
