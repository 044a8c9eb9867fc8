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


def small_config():
    """Two species of 4 particles in one small tilt series (the test preset)."""
    from dataclasses import replace

    from cryopool.engine.simulate import PRESETS, SpeciesSpec  # torch only for the tests that use it
    return replace(PRESETS["test"], species=[SpeciesSpec("a", 150.0, 4), SpeciesSpec("b", 80.0, 4)],
                   items_per_source=1, image_size_px=(112, 112), seed=21)


@pytest.fixture(scope="module")
def small_sim():
    """The population the engine's refine tests share (``small_config``)."""
    from cryopool.engine.simulate import simulate
    return simulate(small_config())


def add_colliding_picks(repo: Repository, species: str, near: str, offset_angstrom: float) -> list[tuple]:
    """Commit picks of ``species`` placed ``offset_angstrom`` (along x) from every particle of ``near``, as a
    second lab's picker might; returns (item, near id, new id, distance) for each planted pair."""
    from dataclasses import replace

    from cryopool.repo.records import Operation, ParticleTable, Species
    pop = repo.population()
    sp, other = (repo.get_record(pop.species[n], Species) for n in (species, near))
    table, near_table = (repo.get_record(s.particles, ParticleTable) for s in (sp, other))
    col = {k: repo.get_array(v).read() for k, v in table.columns.items()}
    ncol = {k: repo.get_array(v).read() for k, v in near_table.columns.items()}
    n = near_table.count
    rows = np.arange(n) % table.count  # copy the other columns from existing picks
    new = {k: v[rows].copy() for k, v in col.items()}
    new["position_angstrom"] = ncol["position_angstrom"].reshape(n, -1, 3)[:, :1].repeat(
        table.temporal_samples, axis=1).reshape(new["position_angstrom"].shape) + np.array([offset_angstrom, 0, 0])
    new["item_index"] = np.array([table.item_names.index(near_table.item_names[i]) for i in ncol["item_index"]],
                                 dtype=col["item_index"].dtype)
    new["particle_id"] = (np.arange(n) + 10**9).astype(col["particle_id"].dtype)
    columns = {k: repo.put_array(np.concatenate([col[k], new[k]])) for k in col}
    new_table = repo.put_record(replace(table, count=table.count + n, columns=columns))
    ref = repo.put_record(replace(sp, particles=new_table))
    repo.commit(replace(pop, species={**pop.species, species: ref}), message=f"picks of {species} near {near}",
                operation=Operation(kind="edit", parameters={}, software="test"))
    return [(near_table.item_names[ncol["item_index"][i]], int(ncol["particle_id"][i]), int(new["particle_id"][i]),
             abs(offset_angstrom)) for i in range(n)]


@pytest.fixture(scope="session")
def merged_population(tmp_path_factory):
    """A simulated population refined once; lab B's branch adds picks of species b 30 Å from each particle of
    a; the merge keeps both, so the merge records the collisions and the population still holds them."""
    import dataclasses

    from cryopool.engine.refine import RefineOptions, refine_population
    from cryopool.engine.simulate import simulate, write_simulation
    from cryopool.repo.merge import merge
    from cryopool.repo.records import Operation
    repo = Repository.init(tmp_path_factory.mktemp("report") / "pop")
    write_simulation(repo, simulate(small_config()))
    refine_population(repo, RefineOptions(iterations=1, groups=("shifts", "image_warp", "poses"), lbfgs_iterations=4,
                                          rounds=1, image_warp_grid=(2, 2)))
    repo.create_branch("lab-b")
    repo.checkout("lab-b")
    planted = add_colliding_picks(repo, "b", "a", 30.0)
    repo.checkout("main")
    repo.commit(lambda p: dataclasses.replace(p, metadata={**p.metadata, "note": "lab A moved on"}), message="note",
                operation=Operation(kind="edit", parameters={}, software="test"))  # a real three-way merge
    merge(repo, "lab-b", policy="keep-both")
    return repo, planted
