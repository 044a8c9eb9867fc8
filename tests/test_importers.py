"""Importing stacks and species: correct content, real files, and every kind of bad input.

Each bad input must raise a clear error naming the file and the field, and
leave the repository byte-for-byte as it was.
"""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from conftest import TEST_DATA, shared_file, TILT_ARGS, particle_rows, repo_state, write_mrc, write_particles
from cryopool.repo import Repository
from cryopool.repo.errors import AlreadyExistsError, CryopoolError, FormatError, InvalidInputError, NotFoundError
from cryopool.repo.importers import import_species, import_tilt_series, stable_particle_ids
from cryopool.repo.population import find_item, iter_items
from cryopool.repo.records import ParticleTable, Species, TiltSeries
from cryopool.repo.verify import verify


@pytest.fixture
def populated(disk_repo, inputs):
    import_tilt_series(disk_repo, inputs["ts1"], source="lab_a", **TILT_ARGS)
    import_tilt_series(disk_repo, inputs["ts2"], source="lab_a", **TILT_ARGS)
    return disk_repo


def test_tilt_series_content(disk_repo, inputs):
    cid = import_tilt_series(disk_repo, inputs["ts1"], source="lab_a", **TILT_ARGS)
    key, ref = find_item(disk_repo, disk_repo.population(), "TS_01")
    ts = disk_repo.get_record(ref, TiltSeries)
    assert key == "lab_a/TS_01" and ts.n_tilts == 9 and ts.pixel_size_angstrom == 10.0
    with mrcfile.open(inputs["ts1"]) as m:
        np.testing.assert_array_equal(disk_repo.get_array(ts.stack).read(), m.data)
    assert ts.tilt_angles_deg == [-12.0, -9.0, -6.0, -3.0, 0.0, 3.0, 6.0, 9.0, 12.0]
    # dose-symmetric, groups of 2: 0, +3, +6, -3, -6, +9, +12, -9, -12
    assert ts.pre_exposure_e_per_angstrom2 == [24.0, 21.0, 12.0, 9.0, 0.0, 3.0, 6.0, 15.0, 18.0]
    imaging = disk_repo.get_record(ts.imaging)
    assert np.allclose(disk_repo.get_array(imaging.defocus_u_angstrom).read(), 30000.0)
    op = disk_repo.get_commit(cid).operation
    assert op.kind == "import" and op.parameters["files"]["stack"]["name"] == "TS_01.mrc"


def test_same_name_from_two_sources_is_namespaced(populated, inputs):
    import_tilt_series(populated, inputs["ts1"], source="lab_b", **TILT_ARGS)
    keys = [k for k, _, _ in iter_items(populated, populated.population())]
    assert keys == ["lab_a/TS_01", "lab_a/TS_02", "lab_b/TS_01"]
    with pytest.raises(InvalidInputError, match="ambiguous"):
        find_item(populated, populated.population(), "TS_01")
    with pytest.raises(AlreadyExistsError):
        import_tilt_series(populated, inputs["ts1"], source="lab_b", **TILT_ARGS)


def test_reimport_writes_only_new_records(populated, inputs):
    before = set(populated.store.ids())
    import_tilt_series(populated, inputs["ts1"], source="lab_c", **TILT_ARGS)
    new = set(populated.store.ids()) - before
    assert len(new) == 3  # data source lab_c, population, commit: the item itself is identical


def test_species_content(populated, inputs):
    import_species(populated, "ribo", half_map_1=inputs["half1"], half_map_2=inputs["half2"], mask=inputs["mask"],
                   particles=inputs["particles"], diameter_angstrom=250, symmetry="d7")
    sp = populated.get_record(populated.population().species["ribo"], Species)
    t = populated.get_record(sp.particles, ParticleTable)
    assert sp.symmetry == "D7" and t.count == 8 and t.item_names == ["lab_a/TS_01", "lab_a/TS_02"]
    rows = particle_rows(["TS_01", "TS_02"])
    pos = populated.get_array(t.columns["position_angstrom"]).read()
    assert pos.shape == (8, 1, 3)
    assert np.allclose(pos[:, 0, 0], [r["rlnCenteredCoordinateXAngst"] for r in rows])
    ids = populated.get_array(t.columns["particle_id"]).read()
    assert len(set(ids.tolist())) == 8
    assert list(populated.get_array(t.columns["half_set"]).read()) == [1, 2] * 4
    assert {r.id for r in sp.reconstructed_from} == {find_item(populated, populated.population(), k)[1].id
                                                     for k in t.item_names}
    assert verify(populated).ok


def test_pixel_coordinates_are_converted_to_centred_angstrom(populated, tmp_path):
    rows = [{"rlnTomoName": "TS_01", "rlnCoordinateX": 32.0, "rlnCoordinateY": 24.0, "rlnCoordinateZ": 10.0,
             "rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0}]
    star = write_particles(tmp_path / "px.star", rows)
    vol = np.zeros((8, 8, 8), np.float32)
    h = write_mrc(tmp_path / "h.mrc", vol)
    import_species(populated, "s", half_map_1=h, half_map_2=h, particles=star, diameter_angstrom=50)
    t = populated.get_record(populated.get_record(populated.population().species["s"], Species).particles)
    # default tomogram size for a 64x48 stack: (64, 48, 16) px at 10 Å; centre = size / 2
    np.testing.assert_allclose(populated.get_array(t.columns["position_angstrom"]).read()[0, 0],
                               [(32 - 32) * 10, (24 - 24) * 10, (10 - 8) * 10])


def test_stable_ids_are_deterministic():
    pos = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    a = stable_particle_ids("ribo", ["s/a", "s/a"], pos)
    assert a.dtype == np.uint64 and (a == stable_particle_ids("ribo", ["s/a", "s/a"], pos)).all()
    assert not (a == stable_particle_ids("other", ["s/a", "s/a"], pos)).any()


# --------------------------------------------------------------------------- real files


def test_real_warp_stack_imports_and_round_trips(disk_repo):
    stack = shared_file("warp/00254.stack.mrc")
    import_tilt_series(disk_repo, stack, source="warp", name="00254", tilt_angles="-60:60:3", dose_per_tilt=2.0,
                       defocus_um=4.0)
    ts = disk_repo.get_record(find_item(disk_repo, disk_repo.population(), "00254")[1], TiltSeries)
    with mrcfile.open(stack) as m:
        np.testing.assert_array_equal(disk_repo.get_array(ts.stack).read(), m.data)
        assert ts.pixel_size_angstrom == pytest.approx(float(m.voxel_size.x))
    assert verify(disk_repo).ok


def test_real_mdoc_supplies_angles_pixel_size_and_axis(disk_repo, tmp_path):
    mdoc = TEST_DATA / "mdoc" / "tilt_series.mdoc"
    stack = write_mrc(tmp_path / "TS_01.mrc", np.zeros((41, 16, 16), np.int16), voxel=5.4)
    import_tilt_series(disk_repo, stack, source="serialem", mdoc=mdoc, dose_per_tilt=2.5)
    ts = disk_repo.get_record(find_item(disk_repo, disk_repo.population(), "TS_01")[1], TiltSeries)
    assert ts.pixel_size_angstrom == 5.4 and ts.tilt_axis_angle_deg == 85.3
    assert ts.tilt_angles_deg[:3] == pytest.approx([0.000999877, 3.00113, -2.99863])
    assert sorted(ts.pre_exposure_e_per_angstrom2)[1] == 2.5 and min(ts.pre_exposure_e_per_angstrom2) == 0
    assert disk_repo.get_array(ts.stack).dtype == np.int16
    imaging = disk_repo.get_record(ts.imaging)
    assert disk_repo.get_array(imaging.defocus_u_angstrom).read()[0] == pytest.approx(40000.0)  # TargetDefocus -4


def test_real_emdb_map_as_species(populated, tmp_path):
    emd = TEST_DATA / "maps" / "EMD-3197.map"
    star = write_particles(tmp_path / "p.star", particle_rows(["TS_01"], 2))
    import_species(populated, "emd3197", half_map_1=emd, half_map_2=emd, particles=star, diameter_angstrom=200)
    sp = populated.get_record(populated.population().species["emd3197"], Species)
    with mrcfile.open(emd) as m:
        np.testing.assert_array_equal(populated.get_array(sp.half_map_1).read(), m.data)
    assert sp.pixel_size_angstrom == pytest.approx(11.4, abs=1e-4)


# --------------------------------------------------------------------------- bad input


def _expect_unchanged(repo: Repository, fn, exc_type, *must_mention):
    before = repo_state(repo)
    with pytest.raises(exc_type) as info:
        fn()
    text = str(info.value)
    for word in must_mention:
        assert word in text, f"{word!r} not in error: {text}"
    assert repo_state(repo) == before
    return text


def test_truncated_mrc(populated, inputs, tmp_path):
    bad = tmp_path / "TS_09.mrc"
    bad.write_bytes(inputs["ts1"].read_bytes()[:-1000])
    _expect_unchanged(populated, lambda: import_tilt_series(populated, bad, source="x", **TILT_ARGS),
                      FormatError, "TS_09.mrc", "truncated")


def test_not_an_mrc(populated, tmp_path):
    bad = tmp_path / "notes.mrc"
    bad.write_text("this is not an MRC file at all, just some text" * 40)
    _expect_unchanged(populated, lambda: import_tilt_series(populated, bad, source="x", **TILT_ARGS),
                      FormatError, "notes.mrc")


def test_wrong_endianness_header_is_refused(populated, inputs, tmp_path):
    bad = tmp_path / "swapped.mrc"
    raw = bytearray(inputs["ts1"].read_bytes())
    raw[212:216] = b"\x11\x11\x00\x00"  # machine stamp says big endian, data is little
    bad.write_bytes(bytes(raw))
    _expect_unchanged(populated, lambda: import_tilt_series(populated, bad, source="x", **TILT_ARGS),
                      CryopoolError, "swapped.mrc")


def test_tilt_count_mismatch(populated, inputs, tmp_path):
    tlt = tmp_path / "TS_01.tlt"
    tlt.write_text("\n".join(str(a) for a in range(-30, 31, 3)))
    _expect_unchanged(populated, lambda: import_tilt_series(populated, inputs["ts1"], source="x", tlt=tlt,
                                                            dose_per_tilt=3, defocus_um=3),
                      InvalidInputError, "TS_01.tlt", "9", "21")


def test_bad_tlt_line(populated, inputs, tmp_path):
    tlt = tmp_path / "bad.tlt"
    tlt.write_text("-3\n0\nthree\n")
    _expect_unchanged(populated, lambda: import_tilt_series(populated, inputs["ts1"], source="x", tlt=tlt,
                                                            dose_per_tilt=3, defocus_um=3),
                      FormatError, "bad.tlt", "line 3")


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_in_stack(populated, tmp_path):
    data = np.zeros((9, 8, 8), np.float32)
    data[4, 2, 3] = np.nan
    bad = write_mrc(tmp_path / "nan.mrc", data)
    _expect_unchanged(populated, lambda: import_tilt_series(populated, bad, source="x", **TILT_ARGS),
                      InvalidInputError, "nan.mrc", "(4, 2, 3)")
    assert not any((populated.root / "tmp").iterdir())  # the aborted staging area is gone


def test_given_pixel_size_overrides_a_wrong_header(populated, inputs):
    commit = import_tilt_series(populated, inputs["ts1"], source="x", pixel_size_angstrom=4.0, **TILT_ARGS)
    item = populated.get_record(find_item(populated, populated.population(commit), "x/TS_01")[1], TiltSeries)
    assert item.pixel_size_angstrom == 4.0


def _species(repo, inputs, **kw):
    args = dict(half_map_1=inputs["half1"], half_map_2=inputs["half2"], mask=inputs["mask"],
                particles=inputs["particles"], diameter_angstrom=250)
    args.update(kw)
    return lambda: import_species(repo, "ribo", **args)


def test_star_missing_column(populated, inputs, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "rlnAngleTilt"} for r in particle_rows(["TS_01"])]
    star = write_particles(tmp_path / "nocol.star", rows)
    _expect_unchanged(populated, _species(populated, inputs, particles=star), FormatError,
                      "nocol.star", "rlnAngleTilt")


def test_particle_on_unknown_item(populated, inputs, tmp_path):
    star = write_particles(tmp_path / "unknown.star", particle_rows(["TS_01", "TS_77"]))
    _expect_unchanged(populated, _species(populated, inputs, particles=star), InvalidInputError,
                      "unknown.star", "row 5", "TS_77")


def test_nan_coordinates(populated, inputs, tmp_path):
    rows = particle_rows(["TS_01"])
    rows[2]["rlnCenteredCoordinateYAngst"] = float("nan")
    star = write_particles(tmp_path / "nan.star", rows)
    _expect_unchanged(populated, _species(populated, inputs, particles=star), InvalidInputError,
                      "nan.star", "rlnCenteredCoordinateYAngst row 3")


def test_bad_half_set(populated, inputs, tmp_path):
    rows = particle_rows(["TS_01"])
    rows[1]["rlnRandomSubset"] = 3
    star = write_particles(tmp_path / "half.star", rows)
    _expect_unchanged(populated, _species(populated, inputs, particles=star), InvalidInputError,
                      "half.star", "rlnRandomSubset row 2")


def test_mismatched_half_map_shapes(populated, inputs, tmp_path):
    other = write_mrc(tmp_path / "small.mrc", np.zeros((12, 12, 12), np.float32))
    _expect_unchanged(populated, _species(populated, inputs, half_map_2=other), InvalidInputError,
                      "small.mrc", "shape", "(16, 16, 16)")


def test_mismatched_half_map_pixel_sizes(populated, inputs, tmp_path):
    other = write_mrc(tmp_path / "px.mrc", np.zeros((16, 16, 16), np.float32), voxel=7.0)
    _expect_unchanged(populated, _species(populated, inputs, half_map_2=other), InvalidInputError,
                      "px.mrc", "pixel sizes")


def test_mask_out_of_range(populated, inputs, tmp_path):
    bad = write_mrc(tmp_path / "mask2.mrc", np.full((16, 16, 16), 2.0, np.float32))
    _expect_unchanged(populated, _species(populated, inputs, mask=bad), InvalidInputError, "mask2.mrc", "[0, 1]")


def test_non_cubic_map(populated, inputs, tmp_path):
    bad = write_mrc(tmp_path / "flat.mrc", np.zeros((8, 16, 16), np.float32))
    _expect_unchanged(populated, _species(populated, inputs, half_map_1=bad), InvalidInputError, "flat.mrc", "cubic")


def test_bad_symmetry_and_names(populated, inputs):
    _expect_unchanged(populated, _species(populated, inputs, symmetry="C0"), InvalidInputError, "symmetry")
    _expect_unchanged(populated, lambda: import_tilt_series(populated, inputs["ts1"], source="../evil", **TILT_ARGS),
                      InvalidInputError, "data source")


def test_missing_file(populated, tmp_path):
    _expect_unchanged(populated, lambda: import_tilt_series(populated, tmp_path / "nope.mrc", source="x",
                                                            **TILT_ARGS), NotFoundError, "nope.mrc")


def test_species_needs_items(disk_repo, inputs):
    with pytest.raises(NotFoundError, match="no data sources"):
        _species(disk_repo, inputs)()
