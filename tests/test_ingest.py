"""The ingest kernel: the one place new item records are built, checked once for every reader and the simulator."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import repo_state, write_mrc
from cryopool.repo import DeformationModel, ImagingModel, Operation, Repository, TiltSeries
from cryopool.repo.errors import InvalidInputError
from cryopool.repo.ingest import (ItemModel, TiltSeriesDraft, add_items, items_in_source, put_tilt_series,
                                  read_species_maps)
from cryopool.repo.population import iter_items

ROOT = Path(__file__).resolve().parents[1]


def _draft(n: int = 5, **changes) -> TiltSeriesDraft:
    rng = np.random.default_rng(0)
    angles = np.linspace(-30, 30, n)
    model = ItemModel(shifts_angstrom=rng.normal(0, 3, (n, 2)), angle_corrections_deg=rng.normal(0, 0.2, (n, 3)),
                      defocus_u_angstrom=np.full(n, 31000.0), defocus_v_angstrom=np.full(n, 29000.0),
                      defocus_angle_deg=np.full(n, 12.0))
    d = TiltSeriesDraft(name="TS_9", stack=rng.normal(size=(n, 16, 16)).astype(np.float32), pixel_size_angstrom=8.0,
                        voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.07,
                        tilt_axis_angle_deg=85.0, tilt_angles_deg=angles, exposure_e_per_angstrom2=np.full(n, 3.0),
                        pre_exposure_e_per_angstrom2=np.arange(n) * 3.0, tomogram_size_px=[16, 16, 8], handedness=-1,
                        model=model, metadata={"acquisition_order": list(range(n))}, origin="lab/TS_9.star",
                        fields={"defocus_u_angstrom": "rlnDefocusU"})
    return replace(d, **changes)


def test_only_the_kernel_builds_item_records():
    """A check added to the kernel protects every path: no other module builds these records from scratch
    (the engine builds species versions from its results, through its writer)."""
    for folder in ("repo", "engine", "cli"):
        built = {"TiltSeries", "DeformationModel", "ImagingModel"} | ({"Species"} if folder == "repo" else set())
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "ingest.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in built:
                    raise AssertionError(f"{path}:{node.lineno}: builds a {node.func.id} outside repo/ingest.py")


def test_a_draft_is_stored_as_the_records_it_describes():
    """Built here by hand, record by record: the kernel's objects hash the same (the format is unchanged)."""
    d = _draft()
    a, b = Repository.in_memory(), Repository.in_memory()
    m = d.model
    with a.transaction() as tx:
        ref = put_tilt_series(tx, d)
        ts = tx.get_record(ref, TiltSeries)
        np.testing.assert_array_equal(tx.get_array(ts.stack).read(), d.stack)
        assert np.allclose(tx.get_array(tx.get_record(ts.deformation).tilt_shifts_angstrom).read(), m.shifts_angstrom)
    with b.transaction() as tx:
        deformation = DeformationModel(tilt_shifts_angstrom=tx.put_array(m.shifts_angstrom),
                                       tilt_angle_corrections_deg=tx.put_array(m.angle_corrections_deg))
        imaging = ImagingModel(defocus_u_angstrom=tx.put_array(m.defocus_u_angstrom),
                               defocus_v_angstrom=tx.put_array(m.defocus_v_angstrom),
                               defocus_angle_deg=tx.put_array(m.defocus_angle_deg))
        expected = tx.put_record(TiltSeries(
            name="TS_9", stack=tx.put_array(d.stack, chunks=(1, 16, 16)), pixel_size_angstrom=8.0, voltage_kv=300.0,
            spherical_aberration_mm=2.7, amplitude_contrast=0.07, tilt_axis_angle_deg=85.0,
            tilt_angles_deg=[float(x) for x in d.tilt_angles_deg], exposure_e_per_angstrom2=[3.0] * 5,
            pre_exposure_e_per_angstrom2=[0.0, 3.0, 6.0, 9.0, 12.0], tomogram_size_px=[16, 16, 8],
            deformation=tx.put_record(deformation), imaging=tx.put_record(imaging), handedness=-1,
            metadata={"acquisition_order": [0, 1, 2, 3, 4]}))
    assert ref == expected


@pytest.mark.parametrize("changes, field, message", [
    (dict(model=replace(_draft().model, defocus_u_angstrom=np.array([31000.0, np.nan, 1, 1, 1]))),
     "rlnDefocusU value 2", "not physically possible"),
    (dict(model=replace(_draft().model, defocus_v_angstrom=np.full(4, 1e4))), "defocus_v_angstrom",
     "one value per tilt"),
    (dict(model=replace(_draft().model, shifts_angstrom=np.full((5, 2), 1e308))), "shifts_angstrom value 1",
     "not physically possible"),
    (dict(tilt_angles_deg=np.linspace(-30, 95, 5)), "tilt_angles_deg value 5", "not physically possible"),
    (dict(tilt_angles_deg=np.linspace(-30, 30, 6)), "tilt angles", "tilt count differs"),
    (dict(pixel_size_angstrom=0.0), "pixel size", "not physically possible"),
    (dict(tomogram_size_px=[16, 16, 0]), "tomogram_size_px [2]", "count out of range"),
    (dict(exposure_e_per_angstrom2=np.full(5, -1.0)), "exposure value 1", "not physically possible"),
])
def test_the_kernel_refuses_what_no_reader_may_commit(changes, field, message, disk_repo):
    repo = disk_repo
    before = repo_state(repo)
    with pytest.raises(InvalidInputError, match=message) as err:
        with repo.transaction() as tx:
            put_tilt_series(tx, _draft(**changes))
    assert err.value.path == "lab/TS_9.star" and err.value.field == field
    assert repo_state(repo) == before


def test_identical_items_are_reused_and_different_ones_refused(tmp_path):
    repo = Repository.init(tmp_path / "pop")
    with repo.transaction() as tx:
        ref = put_tilt_series(tx, _draft())
        tx.commit(add_items(tx, None, "lab", {"TS_9": ref}, {}), message="one",
                  operation=Operation(kind="import", parameters={}, software="test"))
    existing = items_in_source(repo, None, "lab")
    assert list(existing) == ["TS_9"] and existing["TS_9"][0] == ref
    assert items_in_source(repo, None, "other") == {}
    with repo.transaction() as tx:
        again = put_tilt_series(tx, _draft())
        same = add_items(tx, repo.population(), "lab", {"TS_9": again}, existing)
        assert same == repo.population()  # nothing new
        other = put_tilt_series(tx, _draft(voltage_kv=200.0))
        with pytest.raises(InvalidInputError, match="different tilt series") as err:
            add_items(tx, repo.population(), "lab", {"TS_9": other}, existing, {"TS_9": "b/TS_9.xml"})
    assert err.value.path == "b/TS_9.xml" and err.value.found == "lab/TS_9"
    keys = [k for k, _, _ in iter_items(repo, repo.population())]
    assert keys == ["lab/TS_9"]


def test_species_maps_are_checked_once_for_every_importer(tmp_path):
    cube = np.zeros((8, 8, 8), np.float32)
    h1, h2 = write_mrc(tmp_path / "h1.mrc", cube + 1), write_mrc(tmp_path / "h2.mrc", cube + 2)
    maps = read_species_maps(h1, h2, write_mrc(tmp_path / "m.mrc", cube + 0.5))
    assert maps.pixel_size_angstrom == 10.0 and maps.half_map_2.mean() == 2 and maps.mask.max() == 0.5
    assert read_species_maps(h1, h2, pixel_size_angstrom=4.0).pixel_size_angstrom == 4.0
    cases = [
        ((h1, write_mrc(tmp_path / "flat.mrc", np.zeros((8, 8, 4), np.float32))), "cubic", "flat.mrc", "shape"),
        ((h1, write_mrc(tmp_path / "big.mrc", np.zeros((10,) * 3, np.float32))), "shapes differ", "big.mrc", "shape"),
        ((h1, write_mrc(tmp_path / "px.mrc", cube, voxel=5.0)), "pixel sizes differ", "px.mrc", "voxel size"),
        ((h1, h2, write_mrc(tmp_path / "bad_mask.mrc", cube + 2)), r"\[0, 1\]", "bad_mask.mrc", "data"),
        ((write_mrc(tmp_path / "nopx.mrc", cube, voxel=0.0), h2), "no pixel size", "nopx.mrc", "voxel size"),
    ]
    for args, message, name, field in cases:
        with pytest.raises(InvalidInputError, match=message) as err:
            read_species_maps(*args)
        assert Path(err.value.path).name == name and err.value.field == field
