"""Every reader, fed mutated real files: a clean CryopoolError or a valid record, never a traceback.

Mutations are what the outside fuzzing campaign used: numbers replaced by
NaN, infinities, 1e308, zero, negatives or garbage; bytes flipped; lines
deleted or repeated. An import that fails must leave the repository
byte-identical; one that succeeds must have stored physically possible values.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import TEST_DATA, particle_rows, repo_state, write_mrc, write_particles
from cryopool.repo import CryopoolError, Repository
from cryopool.repo.formats.mrc import read_mrc
from cryopool.repo.importers import import_species, import_tilt_series
from cryopool.repo.physical import check, check_item_model
from cryopool.repo.population import iter_items
from cryopool.repo.records import DeformationModel, ImagingModel, ParticleTable, Species
from cryopool.repo.warp import read_warp_xml, warp_model

NASTY = ["nan", "NaN", "inf", "-inf", "1e308", "-1e308", "1e-320", "0", "-0", "-1", "-45.5", "1e9", "abc", "", "1,5",
         "0x10", "True", "99999999999999999999", "  ", "\x00"]
NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _mutations():
    number = st.tuples(st.just("number"), st.integers(0, 10**9), st.sampled_from(NASTY))
    flip = st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255))
    line = st.tuples(st.just("line"), st.integers(0, 10**9), st.sampled_from(["delete", "repeat"]))
    return st.lists(st.one_of(number, flip, line), min_size=1, max_size=4)


def mutate(data: bytes, mutations) -> bytes:
    for kind, where, what in mutations:
        if kind == "number":
            hits = list(NUMBER.finditer(data))
            if hits:
                m = hits[where % len(hits)]
                data = data[:m.start()] + what.encode() + data[m.end():]
        elif kind == "flip" and data:
            i = where % len(data)
            data = data[:i] + bytes([data[i] ^ what]) + data[i + 1:]
        elif kind == "line":
            lines = data.split(b"\n")
            i = where % len(lines)
            lines[i:i + 1] = [] if what == "delete" else [lines[i], lines[i]]
            data = b"\n".join(lines)
    return data


def _finite(model: dict) -> None:
    for key, value in model.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), key


@pytest.mark.parametrize("name", ["TS_1.xml", "00254.xml"])
@FUZZ
@given(mutations=_mutations())
@example(mutations=[("number", 24997, "nan")])
@example(mutations=[("number", 300, "1,5")])
def test_warp_xml(tmp_path, name, mutations):
    path = tmp_path / name
    path.write_bytes(mutate((TEST_DATA / "warp" / name).read_bytes(), mutations))
    try:
        model = warp_model(read_warp_xml(path), 2.0, image_size_px=(512, 512), tomogram_size_px=[512, 512, 128])
    except CryopoolError as exc:
        assert name in str(exc)  # the error names the file
        return
    check_item_model(model)  # a model that came through is physically possible
    _finite(model)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    return write_mrc(tmp_path_factory.mktemp("stack") / "00254.mrc",
                     rng.normal(size=(41, 16, 16)).astype(np.float32), voxel=10.0)


def _stored_values_are_physical(repo: Repository) -> None:
    """What an import committed, read back through the public API: the same limits as the readers."""
    population = repo.population()
    for _, _, item in iter_items(repo, population):
        d, im = repo.get_record(item.deformation, DeformationModel), repo.get_record(item.imaging, ImagingModel)
        check("shift_angstrom", repo.get_array(d.tilt_shifts_angstrom).read())
        check("angle_correction_deg", repo.get_array(d.tilt_angle_corrections_deg).read())
        u, v = (repo.get_array(r).read() for r in (im.defocus_u_angstrom, im.defocus_v_angstrom))
        check("defocus_angstrom", u), check("defocus_angstrom", v), check("astigmatism_angstrom", u - v)
    for ref in population.species.values():
        table = repo.get_record(repo.get_record(ref, Species).particles, ParticleTable)
        check("coordinate_angstrom", repo.get_array(table.columns["position_angstrom"]).read())
        check("angle_deg", repo.get_array(table.columns["orientation_deg"]).read())


def _import_clean_or_unchanged(repo: Repository, fn) -> None:
    before = repo_state(repo)
    try:
        fn()
    except CryopoolError:
        assert repo_state(repo) == before
        return
    except Exception as exc:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"traceback instead of a clean error: {type(exc).__name__}: {exc}")
    _stored_values_are_physical(repo)


@pytest.mark.parametrize("kind, source", [("tlt", "warp/imod/00254.tlt"), ("xf", "warp/imod/00254.xf"),
                                          ("mdoc", "mdoc/tilt_series.mdoc")])
@FUZZ
@given(mutations=_mutations())
@example(mutations=[("number", 4, "1e308")])  # .xf: DX of the first line (found NaN shifts in the campaign)
@example(mutations=[("number", 0, "abc")])
@example(mutations=[("number", 0, "nan")])
def test_tilt_metadata_files(tmp_path, stack, kind, source, mutations):
    path = tmp_path / Path(source).name
    path.write_bytes(mutate((TEST_DATA / source).read_bytes(), mutations))
    repo = Repository.init(tmp_path / f"pop{len(list(tmp_path.iterdir()))}")
    import_tilt_series(repo, stack, source="lab", name="first", tilt_angles="-60:60:3", dose_per_tilt=3,
                       defocus_um=3)
    args = {"tlt": dict(tlt=path, dose_per_tilt=3, defocus_um=3),
            "xf": dict(tilt_angles="-60:60:3", xf=path, dose_per_tilt=3, defocus_um=3),
            "mdoc": dict(mdoc=path, dose_per_tilt=3, pixel_size_angstrom=10)}[kind]
    _import_clean_or_unchanged(repo, lambda: import_tilt_series(repo, stack, source="lab", **args))
    shutil.rmtree(repo.root.parent)


@FUZZ
@given(mutations=_mutations())
def test_mrc_stack(tmp_path, mutations):
    clean = write_mrc(tmp_path / "clean.mrc", np.ones((9, 8, 8), np.float32))
    data = bytearray(clean.read_bytes())
    path = tmp_path / "TS_01.mrc"
    # numbers are binary here: mutate the header as bytes (flips), the rest as the mutator does
    path.write_bytes(mutate(bytes(data), mutations))
    try:
        m = read_mrc(path)
        assert np.isfinite(m.data).all()
    except CryopoolError:
        pass
    repo = Repository.init(tmp_path / f"pop{len(list(tmp_path.iterdir()))}")
    _import_clean_or_unchanged(repo, lambda: import_tilt_series(repo, path, source="lab", tilt_angles="-12:12:3",
                                                                dose_per_tilt=3, defocus_um=3))
    shutil.rmtree(repo.root)


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    d = tmp_path_factory.mktemp("species")
    rng = np.random.default_rng(1)
    repo = Repository.init(d / "pop")
    for name in ("TS_01", "TS_02"):
        path = write_mrc(d / f"{name}.mrc", rng.normal(size=(9, 48, 64)).astype(np.float32))
        import_tilt_series(repo, path, source="lab_a", tilt_angles="-12:12:3", dose_per_tilt=3, defocus_um=3)
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    maps = {"half_map_1": write_mrc(d / "h1.mrc", vol), "half_map_2": write_mrc(d / "h2.mrc", vol)}
    star = write_particles(d / "particles.star", particle_rows(["TS_01", "TS_02"]))
    return repo, maps, star.read_bytes()


@FUZZ
@given(mutations=_mutations())
@example(mutations=[("number", 40, "1e308")])
@example(mutations=[("number", 41, "inf")])
def test_star_particles(tmp_path, populated, mutations):
    repo, maps, star = populated
    path = tmp_path / "particles.star"
    path.write_bytes(mutate(star, mutations))
    name = f"s{abs(hash(tuple(mutations))) % 10**8}"
    _import_clean_or_unchanged(repo, lambda: import_species(repo, name, particles=path, diameter_angstrom=100, **maps))


def test_mutations_reach_the_values():
    """The mutator does change numbers (else the tests above would test nothing)."""
    text = b"<Angles>1.5\n-3</Angles>"
    assert mutate(text, [("number", 1, "nan")]) == b"<Angles>1.5\nnan</Angles>"
    assert mutate(b"a\nb", [("line", 0, "repeat")]) == b"a\na\nb"
    assert not math.isnan(float(mutate(b"2", [("flip", 0, 1)])))  # '2' ^ 1 = '3'
