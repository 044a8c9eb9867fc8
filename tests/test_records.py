"""Typed records: strict reading, coercion on writing, reference targets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cryopool.repo import AlreadyExistsError, DataSource, canonical, with_item, with_items
from cryopool.repo.canonical import Ref
from cryopool.repo.errors import FormatError, InvalidInputError
from cryopool.repo.hashing import Kind
from cryopool.repo.records import (Commit, DeformationModel, Grid, ImagingModel, Metrics, Operation, Population,
                                   Species, TiltSeries, parse_record, reference_targets, validate_name)

R = Ref(Kind.RECORD, "a" * 64)


def _tilt_series(**kw) -> TiltSeries:
    base = dict(name="TS_01", stack=R, pixel_size_angstrom=1.5, voltage_kv=300, spherical_aberration_mm=2.7,
                amplitude_contrast=0.07, tilt_axis_angle_deg=85, tilt_angles_deg=[-3, 0, 3],
                exposure_e_per_angstrom2=[3, 3, 3], pre_exposure_e_per_angstrom2=[3, 0, 6],
                tomogram_size_px=[100, 100, 40], deformation=R, imaging=R)
    base.update(kw)
    return TiltSeries(**base)


def test_round_trip_and_int_to_float_coercion():
    ts = _tilt_series()
    value = ts.to_value()
    assert value["voltage_kv"] == 300.0 and isinstance(value["voltage_kv"], float)
    assert value["_type"] == "TiltSeries" and value["_v"] == 1
    back = parse_record(canonical.decode(canonical.encode(value)))
    assert back == _tilt_series(voltage_kv=300.0, tilt_axis_angle_deg=85.0, tilt_angles_deg=[-3.0, 0.0, 3.0],
                                exposure_e_per_angstrom2=[3.0] * 3, pre_exposure_e_per_angstrom2=[3.0, 0.0, 6.0])
    # 300 and 300.0 give the same bytes, hence the same id
    assert canonical.encode(_tilt_series(voltage_kv=300).to_value()) == \
        canonical.encode(_tilt_series(voltage_kv=300.0).to_value())
    assert canonical.encode(_tilt_series(voltage_kv=np.float32(300)).to_value()) == \
        canonical.encode(_tilt_series(voltage_kv=300.0).to_value())


def test_strict_reading_names_the_field():
    value = _tilt_series().to_value()
    missing = {k: v for k, v in value.items() if k != "pixel_size_angstrom"}
    with pytest.raises(FormatError, match="pixel_size_angstrom"):
        parse_record(missing)
    with pytest.raises(FormatError, match="unknown fields"):
        parse_record({**value, "surprise": 1})
    with pytest.raises(FormatError, match="voltage_kv"):
        parse_record({**value, "voltage_kv": "300"})
    with pytest.raises(FormatError, match="unknown record type"):
        parse_record({**value, "_type": "Nope"})
    with pytest.raises(FormatError, match="version"):
        parse_record({**value, "_v": 2})


def test_wrong_types_are_refused_on_writing():
    with pytest.raises(InvalidInputError, match="tilt_angles_deg"):
        _tilt_series(tilt_angles_deg=["a"]).to_value()
    with pytest.raises(InvalidInputError, match="expected a number"):
        _tilt_series(voltage_kv=True).to_value()
    with pytest.raises(InvalidInputError, match="operation kind"):
        Operation(kind="frobnicate", parameters={}, software="x")


def test_nested_structs_and_optionals():
    d = DeformationModel(tilt_shifts_angstrom=R, tilt_angle_corrections_deg=R,
                         image_warp=Grid(dimensions=[3, 3, 2], values=R), movie_grids={"m": Grid([2], R)})
    assert parse_record(canonical.decode(canonical.encode(d.to_value()))) == d
    sp = Species(name="ribo", symmetry="C1", diameter_angstrom=250, pixel_size_angstrom=4, half_map_1=R,
                 half_map_2=R, particles=R, metrics=Metrics(resolution_angstrom=8.5, fsc=R, values={"x": [1, 2]}))
    back = parse_record(canonical.decode(canonical.encode(sp.to_value())))
    assert back.metrics.resolution_angstrom == 8.5 and back.mask is None


def test_fields_added_later_leave_older_objects_unchanged():
    """A later field is not encoded while null: a model without it has the bytes format 1 gave it."""
    d = DeformationModel(tilt_shifts_angstrom=R, tilt_angle_corrections_deg=R)
    value = d.to_value()
    assert "orientation_corrections_deg" not in value
    assert set(value) == {"tilt_shifts_angstrom", "tilt_angle_corrections_deg", "image_warp", "volume_warp",
                          "movie_grids", "_type", "_v"}
    assert parse_record(value).orientation_corrections_deg is None
    with_it = dataclasses.replace(d, orientation_corrections_deg=R)
    assert parse_record(canonical.decode(canonical.encode(with_it.to_value()))) == with_it
    with pytest.raises(FormatError, match="image_warp"):  # format-1 fields stay required
        parse_record({k: v for k, v in value.items() if k != "image_warp"})


def test_reference_targets_declare_what_each_field_points_to():
    c = Commit(population=R, parents=[R], author="a", time_utc="2026-01-01T00:00:00Z", message="m",
               operation=Operation(kind="import", parameters={}, software="s", inputs={"f": Ref(Kind.BLOB, "b" * 64)}))
    targets = {path: t.types for path, _, t in reference_targets(c)}
    assert targets["population"] == ("Population",)
    assert targets["parents[0]"] == ("Commit",)
    assert targets["operation.inputs.f"] == ("*",)
    im = ImagingModel(defocus_u_angstrom=R, defocus_v_angstrom=R, defocus_angle_deg=R, phase_shift_deg=R)
    assert {p for p, _, _ in reference_targets(im)} == {"defocus_u_angstrom", "defocus_v_angstrom",
                                                        "defocus_angle_deg", "phase_shift_deg"}


def test_every_record_field_is_documented():
    """Each record's paragraph in format.md (from **Name** to the next blank line) names each of its fields."""
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
    from cryopool.repo.records import RECORD_TYPES
    for name, cls in RECORD_TYPES.items():
        if name == "Array":  # documented as a zarr manifest in its own section
            continue
        start = doc.find(f"**{name}**")
        assert start >= 0, name
        paragraph = doc[start:doc.find("\n\n", start)]
        for f in dataclasses.fields(cls):
            assert re.search(rf"`{f.name}[`:\[ ]", paragraph), f"{name}.{f.name} missing from its paragraph"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 200, "a b", "name.lock"])
def test_names_are_validated(bad):
    with pytest.raises(InvalidInputError):
        validate_name(bad, "item")


def test_population_defaults():
    p = Population(name="p")
    assert parse_record(canonical.decode(canonical.encode(p.to_value()))) == p


def test_with_items_regroups_items_into_their_sources_with_one_record_each(disk_repo):
    blob = lambda text: disk_repo.put_record(DataSource(name=text, items={}))  # noqa: E731  any record will do
    a, b, c = blob("a"), blob("b"), blob("c")
    pop = with_item(disk_repo, Population(name="p", data_sources={}, species={}), "lab_a", "TS_01", a)
    pop = with_items(disk_repo, pop, {"lab_a/TS_02": b, "lab_b/TS_01": c})
    items = {s: disk_repo.get_record(r, DataSource).items for s, r in pop.data_sources.items()}
    assert items == {"lab_a": {"TS_01": a, "TS_02": b}, "lab_b": {"TS_01": c}}
    with pytest.raises(AlreadyExistsError, match="lab_a/TS_01"):
        with_items(disk_repo, pop, {"lab_a/TS_01": c})
    replaced = with_items(disk_repo, pop, {"lab_a/TS_01": c}, replace_existing=True)
    assert disk_repo.get_record(replaced.data_sources["lab_a"], DataSource).items == {"TS_01": c, "TS_02": b}
    with pytest.raises(InvalidInputError):
        with_items(disk_repo, pop, {"no-source-part": a})
