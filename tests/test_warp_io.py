"""Warp and IMOD tilt series into and out of a repository: real files against warpylib, hand-written ones by hand."""

from __future__ import annotations

import re
import sys

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from click.testing import CliRunner

from conftest import TEST_DATA, needed, shared_file, repo_state, write_mrc
from test_warp import _our_geometry, _Unusable
from cryopool.cli.main import cli
from cryopool.engine.records_io import load_item
from cryopool.engine.tilt_model import _image_warp, particle_defocus, particle_positions_in_tilts
from cryopool.repo import CryopoolError, Repository
from cryopool.repo.importers import import_tilt_series
from cryopool.repo.population import iter_items
from cryopool.repo.warp import read_warp_xml, rebuilt_warp_xml, warp_model, warp_xml_text
from cryopool.repo.warp_io import export_warp, import_warp

WARP = TEST_DATA / "warp"
SIZE = [652, 630, 200]  # 00254's XML predates VolumeDimensionsAngstrom: the tomogram size is given
VOLUME = np.array(SIZE, dtype=float) * 10.0


@pytest.fixture(scope="module")
def warpylib():
    sys.modules.setdefault("torch_projectors", _Unusable("torch_projectors"))
    return needed("warpylib")


def _only_item(repo: Repository, commit):
    return next(iter_items(repo, repo.population(commit)))


# --------------------------------------------------------------------------- the real tilt series 00254


def test_00254_imports_as_an_item_that_projects_and_focuses_like_warp(tmp_path, warpylib):
    """AreAnglesInverted = True (Warp takes defocus from the mirrored geometry) is our handedness −1."""
    repo = Repository.init(tmp_path / "pop")
    commit = import_warp(repo, [WARP / "00254.xml"], source="warp", stacks=[shared_file("warp/00254.stack.mrc")],
                         tomogram_size_px=SIZE)
    key, _, item = _only_item(repo, commit)
    assert key == "warp/00254" and item.handedness == -1 and item.pixel_size_angstrom == 10.0
    assert repo.get_blob(item.metadata["warp"]["xml"]) == (WARP / "00254.xml").read_bytes()  # verbatim, BOM and all
    model = load_item(repo, item, with_stack=False)
    with mrcfile.mmap(shared_file("warp/00254.stack.mrc"), permissive=True) as m:
        h, w = m.data.shape[1:]
        np.testing.assert_array_equal(load_item(repo, item).stack.numpy(), m.data)
    image = torch.tensor([w * 10.0, h * 10.0])
    ts = warpylib.TiltSeries(str(WARP / "00254.xml"), image_dimensions_physical=image,
                             volume_dimensions_physical=torch.tensor(VOLUME, dtype=torch.float32))
    assert ts.are_angles_inverted
    corner = np.random.default_rng(0).uniform(0.2, 0.8, size=(100, 3)) * VOLUME
    expected = ts.get_position_in_all_tilts_single(torch.tensor(corner, dtype=torch.float32)).double().numpy()
    xy, z = particle_positions_in_tilts(model.geometry, torch.tensor(corner - VOLUME / 2))
    np.testing.assert_allclose(xy.numpy() + image.double().numpy() / 2, expected[..., :2], atol=0.01)
    u, v, _ = particle_defocus(model.imaging, z)
    np.testing.assert_allclose(((u + v) / 2).numpy() * 1e-4, expected[..., 2], atol=2e-5)  # µm: 0.2 Å
    # the mirror is real: the other hand gets the defocus gradient wrong by microns
    assert np.abs((((u + v) / 2) - 2 * z).numpy() * 1e-4 - expected[..., 2]).max() > 0.1


def test_warp_round_trip_is_exact_and_files_are_readable(tmp_path):
    repo = Repository.init(tmp_path / "pop")
    commit = import_warp(repo, [WARP / "00254.xml"], source="warp", stacks=[shared_file("warp/00254.stack.mrc")],
                         tomogram_size_px=SIZE)
    _, ref, _ = _only_item(repo, commit)
    out = tmp_path / "export"
    summary = export_warp(repo, "HEAD", out)
    assert summary["tilt_series"] == ["00254"] and summary["notes"] == []
    assert (out / "warp_tiltseries/00254.xml").read_bytes() == (WARP / "00254.xml").read_bytes()
    stack = out / "warp_tiltseries/tiltstack/00254/00254.st"
    assert mrcfile.validate(str(stack))
    with mrcfile.open(stack) as m:
        assert m.voxel_size.x == pytest.approx(10.0)
    table = starfile.read(out / "tomostar/00254.tomostar")
    xml = read_warp_xml(WARP / "00254.xml")
    np.testing.assert_array_equal(table["wrpAngleTilt"], xml.angles)
    np.testing.assert_array_equal(table["wrpDose"], xml.dose)
    assert list(table["wrpMovieName"]) == xml.movie_paths
    again = Repository.init(tmp_path / "again")  # stack and tomostar found by WarpTools' layout
    _, ref2, _ = _only_item(again, import_warp(again, [out / "tomostar/00254.tomostar"], source="warp",
                                               tomogram_size_px=SIZE))
    assert ref2 == ref


def test_imod_alignment_agrees_with_warps_import_of_it(tmp_path):
    """``.xf`` + ``.tlt`` → the geometry Warp made of the same files (00254_imported.xml).

    We keep IMOD's angle sign (θ = .tlt angle, as RELION does) where Warp
    negates it: the same alignment seen from the other side of the tomogram, so
    every point p here lands where Warp puts (x, y, −z), at the opposite height.
    """
    repo = Repository.init(tmp_path / "pop")
    commit = import_tilt_series(repo, shared_file("warp/00254.stack.mrc"), source="imod", name="00254",
                                tlt=WARP / "imod/00254.tlt", xf=WARP / "imod/00254.xf", dose_per_tilt=3.0,
                                defocus_um=3.0, tomogram_size_px=SIZE)
    _, _, item = _only_item(repo, commit)
    assert item.handedness == -1
    ours = load_item(repo, item, with_stack=False).geometry
    imported = read_warp_xml(WARP / "imod/00254_imported.xml")
    with pytest.raises(CryopoolError, match="never estimated"):  # Warp's IMOD import has no CTF yet
        warp_model(imported, 10.0, image_size_px=ours.image_size_px, tomogram_size_px=SIZE)
    warp = warp_model(imported, 10.0, image_size_px=ours.image_size_px, tomogram_size_px=SIZE, defocus_um=3.0)
    theirs = _our_geometry(warp, 10.0, VOLUME)[0]
    p = np.random.default_rng(1).uniform(-0.4, 0.4, size=(200, 3)) * VOLUME
    xy, z = particle_positions_in_tilts(ours, torch.tensor(p))
    xy_w, z_w = particle_positions_in_tilts(theirs, torch.tensor(p * [1, 1, -1]))
    np.testing.assert_allclose(xy.numpy(), xy_w.numpy(), atol=0.01)  # Å, at 10 Å/px
    np.testing.assert_allclose(z.numpy(), -z_w.numpy(), atol=0.01)
    assert np.abs(xy.numpy() - particle_positions_in_tilts(theirs, torch.tensor(p))[0].numpy()).max() > 100


def test_xf_conversion_by_hand(tmp_path):
    """IMOD: aligned = A·raw + d about the centre. A = R(10°), d = (3, −2) px at 5 Å/px."""
    stack = write_mrc(tmp_path / "ts.mrc", np.zeros((3, 20, 24), np.float32), voxel=5.0)
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    (tmp_path / "ts.xf").write_text("".join(f"{c:.7f} {-s:.7f} {s:.7f} {c:.7f} 3.0 -2.0\n" for _ in range(3)))
    repo = Repository.init(tmp_path / "pop")
    commit = import_tilt_series(repo, stack, source="s", tilt_angles="-3:3:3", xf=tmp_path / "ts.xf",
                                dose_per_tilt=2.0, defocus_um=2.0)
    _, _, item = _only_item(repo, commit)
    geom = load_item(repo, item, with_stack=False).geometry
    assert item.tilt_axis_angle_deg == pytest.approx(-10.0, abs=1e-5)
    # raw = A⁻¹(aligned − d): the untilted centre of the aligned image sits at −A⁻¹d in the raw one
    expected = -np.array([[c, s], [-s, c]]) @ np.array([3.0, -2.0]) * 5.0
    np.testing.assert_allclose(geom.shifts_angstrom[1].numpy(), expected, atol=1e-5)
    # IMOD's defocus convention with handedness −1: at +3° the right side (+x in the aligned image) is deeper
    right = torch.tensor([[100.0, 0.0, 0.0]], dtype=torch.float64)
    _, z = particle_positions_in_tilts(geom, right)
    u, _, _ = particle_defocus(load_item(repo, item, with_stack=False).imaging, z)
    assert u[0, 2] > u[0, 1] > u[0, 0]


# --------------------------------------------------------------------------- a hand-written WarpTools project

ANGLES = [-6.0, -3.0, 0.0, 3.0, 6.0]
DOSE = [9.0, 3.0, 0.0, 6.0, 12.0]


def _warp_project(root, use=(True, True, False, True, True), sections=4):
    """tomostar/TS_1.tomostar, warp_tiltseries/TS_1.xml and the tilt stack, as WarpTools lays them out."""
    (root / "tomostar").mkdir(parents=True)
    ts_dir = root / "warp_tiltseries"
    (ts_dir / "tiltstack/TS_1").mkdir(parents=True)
    rows = "".join(f"../frames/TS_1_{i:03d}.tif {a} 85.0 {d}\n" for i, (a, d) in enumerate(zip(ANGLES, DOSE)))
    (root / "tomostar/TS_1.tomostar").write_text(
        "\ndata_\n\nloop_\n_wrpMovieName #1\n_wrpAngleTilt #2\n_wrpAxisAngle #3\n_wrpDose #4\n" + rows)
    nodes = "".join(f'<Node X="{x}" Y="{y}" Z="{z}" Value="{0.5 * x - 0.25 * y + 0.1 * z}" />'
                    for z in range(5) for y in range(2) for x in range(2))
    ctf = "".join(f'<Node X="0" Y="0" Z="{z}" Value="{2.0 + 0.1 * z}" />' for z in range(5))
    (ts_dir / "TS_1.xml").write_text(f"""<?xml version="1.0" encoding="utf-8"?>
<TiltSeries AreAnglesInverted="False" LevelAngleX="1.5" LevelAngleY="-0.5"
  ImageDimensionsAngstrom="160, 120" VolumeDimensionsAngstrom="160, 120, 40">
<Angles>{chr(10).join(map(str, ANGLES))}</Angles>
<Dose>{chr(10).join(map(str, DOSE))}</Dose>
<UseTilt>{chr(10).join(map(str, use))}</UseTilt>
<AxisAngle>85\n85.5\n86\n86.5\n87</AxisAngle>
<AxisOffsetX>1\n2\n3\n4\n5</AxisOffsetX>
<AxisOffsetY>-1\n-2\n-3\n-4\n-5</AxisOffsetY>
<MoviePath>{chr(10).join(f"../frames/TS_1_{i:03d}.tif" for i in range(5))}</MoviePath>
<CTF><Param Name="Voltage" Value="200" /><Param Name="Cs" Value="2.7" /><Param Name="Amplitude" Value="0.1" />
<Param Name="Defocus" Value="2" /><Param Name="DefocusDelta" Value="0.05" /><Param Name="DefocusAngle" Value="30" />
<Param Name="PixelSize" Value="1.25" /></CTF>
<GridCTF Width="1" Height="1" Depth="5">{ctf}</GridCTF>
<GridMovementX Width="2" Height="2" Depth="5">{nodes}</GridMovementX>
<GridMovementY Width="2" Height="2" Depth="5">{nodes}</GridMovementY>
<GridAngleX Width="1" Height="1" Depth="1"><Node X="0" Y="0" Z="0" Value="0.7" /></GridAngleX>
</TiltSeries>
""")
    data = np.arange(sections * 24 * 32, dtype=np.float32).reshape(sections, 24, 32)
    write_mrc(ts_dir / "tiltstack/TS_1/TS_1.st", data, voxel=5.0)
    return root


def test_hand_written_project_converts_as_computed_by_hand(tmp_path):
    root = _warp_project(tmp_path / "project")
    repo = Repository.init(tmp_path / "pop")
    commit = import_warp(repo, [root / "tomostar/TS_1.tomostar"], source="lab")
    _, _, item = _only_item(repo, commit)
    m = load_item(repo, item, with_stack=False)
    keep = [0, 1, 3, 4]  # the third tilt is not in use, and the stack holds only the four in use
    assert item.tilt_angles_deg == [6.0, 3.0, -3.0, -6.0]  # θ = −Angles
    assert item.tilt_axis_angle_deg == 85.0 and item.tomogram_size_px == [32, 24, 8]
    assert item.pre_exposure_e_per_angstrom2 == [9.0, 3.0, 6.0, 12.0]
    assert item.exposure_e_per_angstrom2 == [3.0, 3.0, 3.0, 3.0]  # steps to the next tilt in acquisition order
    np.testing.assert_allclose(m.geometry.angle_corrections_deg.numpy(),
                               [[1.5, 0.5, 0.0], [1.5, 0.5, 0.5], [1.5, 0.5, 1.5], [1.5, 0.5, 2.0]])
    np.testing.assert_allclose(m.geometry.shifts_angstrom.numpy(), [[1, -1], [2, -2], [4, -4], [5, -5]])
    np.testing.assert_allclose(m.imaging.defocus_u_angstrom.numpy(), [(2.0 + 0.1 * z + 0.025) * 1e4 for z in keep])
    np.testing.assert_allclose(m.imaging.defocus_v_angstrom.numpy(), [(2.0 + 0.1 * z - 0.025) * 1e4 for z in keep])
    assert m.imaging.voltage_kv == 200.0 and m.imaging.amplitude_contrast == 0.1
    # the image warp is −movement; Warp's node values hold at the tilts kept (grid corners: x, y ∈ {0, 1})
    corners = torch.tensor([[-80.0, -60.0], [80.0, -60.0], [-80.0, 60.0], [80.0, 60.0]], dtype=torch.float64)
    got = _image_warp(m.geometry, corners[:, None, :].expand(4, 4, 2).clone())
    for j, z in enumerate(keep):
        want = [-(0.5 * x - 0.25 * y + 0.1 * z) for y in range(2) for x in range(2)]
        np.testing.assert_allclose(got[:, j, 0].numpy(), want, atol=1e-9)
    # GridAngleX (one node: every tilt) turns orientations only; the XML itself travels with the item
    np.testing.assert_array_equal(m.geometry.orientation_corrections_deg.numpy(), [[0.7, 0.0, 0.0]] * 4)
    assert repo.get_blob(item.metadata["warp"]["xml"]) == (root / "warp_tiltseries/TS_1.xml").read_bytes()


def test_tomostar_alone_and_a_stack_with_every_tilt(tmp_path):
    root = _warp_project(tmp_path / "project", sections=5)
    (root / "warp_tiltseries/TS_1.xml").unlink()
    repo = Repository.init(tmp_path / "pop")
    with pytest.raises(CryopoolError, match="defocus"):
        import_warp(repo, [root / "tomostar/TS_1.tomostar"], source="lab",
                    stacks=[root / "warp_tiltseries/tiltstack/TS_1/TS_1.st"])
    commit = import_warp(repo, [root / "tomostar/TS_1.tomostar"], source="lab", defocus_um=3.0,
                         stacks=[root / "warp_tiltseries/tiltstack/TS_1/TS_1.st"])
    _, _, item = _only_item(repo, commit)
    assert item.tilt_angles_deg == [6.0, 3.0, -0.0, -3.0, -6.0] and item.handedness == 1
    assert repo.get_blob(item.metadata["warp"]["tomostar"]) == (root / "tomostar/TS_1.tomostar").read_bytes()


def test_stack_with_every_tilt_drops_the_unused_one(tmp_path):
    root = _warp_project(tmp_path / "project", sections=5)
    repo = Repository.init(tmp_path / "pop")
    _, _, item = _only_item(repo, import_warp(repo, [root / "warp_tiltseries/TS_1.xml"], source="lab"))
    stack = load_item(repo, item).stack.numpy()
    full = np.arange(5 * 24 * 32, dtype=np.float32).reshape(5, 24, 32)
    np.testing.assert_array_equal(stack, full[[0, 1, 3, 4]])


def test_generated_xml_reads_back_to_the_same_geometry(tmp_path):
    """A model Warp did not write (per-tilt y corrections, a volume warp) → XML → the same projections."""
    rng = np.random.default_rng(4)
    model = warp_model(read_warp_xml(TEST_DATA / "warp/TS_1.xml"), 0.834)
    n = len(model["tilt_angles_deg"])
    model["angle_corrections_deg"][:, 1] += rng.normal(0, 0.3, n)
    model["volume_warp"] = rng.normal(0, 5, size=(3, 1, 2, 3, 3))
    model["handedness"] = -1
    text, notes = warp_xml_text(model, 0.834, [f"m{i}.tif" for i in range(n)])
    assert notes == []
    path = tmp_path / "TS_1.xml"
    path.write_text(text)
    back = warp_model(read_warp_xml(path), 0.834)
    assert back["handedness"] == -1
    volume = np.array(model["tomogram_size_px"]) * 0.834
    p = torch.tensor(rng.uniform(-0.4, 0.4, size=(200, 3)) * volume)
    a = particle_positions_in_tilts(_our_geometry(model, 0.834, volume)[0], p)
    b = particle_positions_in_tilts(_our_geometry(back, 0.834, volume)[0], p)
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), atol=1e-8)
    np.testing.assert_allclose(a[1].numpy(), b[1].numpy(), atol=1e-8)
    for key in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "pre_exposure",
                "orientation_corrections_deg"):
        np.testing.assert_allclose(back[key], model[key], rtol=1e-12)
    model["angle_corrections_deg"][:, 0] += rng.normal(0, 0.3, n)  # Warp has one LevelAngleX
    assert "LevelAngleX" in warp_xml_text(model, 0.834, [f"m{i}.tif" for i in range(n)])[1][0]


def test_bad_warp_and_imod_input_changes_nothing(tmp_path):
    root = _warp_project(tmp_path / "project")
    repo = Repository.init(tmp_path / "pop")
    import_warp(repo, [root / "warp_tiltseries/TS_1.xml"], source="lab")
    before = repo_state(repo)

    def edit(old: str, new: str):
        return lambda xml: xml.write_text(xml.read_text().replace(old, new))
    cases = [
        (edit('ImageDimensionsAngstrom="160, 120"', 'ImageDimensionsAngstrom="200, 120"'), "lab2", "pixel sizes disagree"),
        (edit("<AxisOffsetX>1\n", "<AxisOffsetX>nan\n"), "lab2", "AxisOffsetX"),
        (edit("<Dose>9.0\n", "<Dose>"), "lab2", "Dose"),
        (edit("</TiltSeries>", ""), "lab2", "not well-formed"),
        (edit('<GridCTF Width="1"', '<GridCTF Width="2"'), "lab2", "vary across the image"),
        (lambda xml: write_mrc(xml.parent / "tiltstack/TS_1/TS_1.st", np.zeros((3, 24, 32), np.float32), 5.0), "lab2",
         "tilt count differs"),
        (lambda xml: (xml.parent / "tiltstack/TS_1/TS_1.st").unlink(), "lab2", "no tilt stack found"),
        (edit("<AxisOffsetX>1\n", "<AxisOffsetX>1.5\n"), "lab", "different tilt series"),
    ]
    for i, (break_it, source, message) in enumerate(cases):
        xml = _warp_project(tmp_path / f"case{i}") / "warp_tiltseries/TS_1.xml"
        break_it(xml)
        with pytest.raises(CryopoolError, match=message):
            import_warp(repo, [xml], source=source)
        assert repo_state(repo) == before, message
    stack = write_mrc(tmp_path / "s.mrc", np.zeros((3, 20, 24), np.float32), voxel=5.0)
    for text, message in (("1 0 0 1 0 0\n" * 2, "tilt count differs between .xf"),
                          ("1.1 0 0 1.1 0 0\n" * 3, "not a rotation"), ("1 0 0 1 0\n" * 3, "6 numbers"),
                          ("1 0 0 1 0 x\n" * 3, "line 1")):
        (tmp_path / "bad.xf").write_text(text)
        with pytest.raises(CryopoolError, match=message):
            import_tilt_series(repo, stack, source="x", tilt_angles="-3:3:3", xf=tmp_path / "bad.xf",
                               dose_per_tilt=1.0, defocus_um=1.0)
        assert repo_state(repo) == before


def test_cli_import_and_export_warp(tmp_path):
    root = _warp_project(tmp_path / "project")
    pop = str(tmp_path / "pop")
    runner = CliRunner()
    assert runner.invoke(cli, ["init", pop]).exit_code == 0
    r = runner.invoke(cli, ["-C", pop, "import", "warp", str(root / "warp_tiltseries/TS_1.xml"), "--source", "lab",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert '"TS_1"' in r.output
    r = runner.invoke(cli, ["-C", pop, "show", "HEAD"])  # the import's files are listed with their roles
    assert r.exit_code == 0 and "file xml (TS_1): TS_1.xml" in r.output, r.output
    r = runner.invoke(cli, ["-C", pop, "export", "warp", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out/warp_tiltseries/TS_1.xml").read_bytes() == (root / "warp_tiltseries/TS_1.xml").read_bytes()
    r = runner.invoke(cli, ["-C", pop, "import", "warp", str(tmp_path / "nothing.xml"), "--source", "lab"])
    assert r.exit_code != 0 and "nothing.xml" in r.output


def test_two_sources_export_in_one_step_without_clashing(tmp_path):
    root = _warp_project(tmp_path / "project")
    repo = Repository.init(tmp_path / "pop")
    for lab in ("lab_a", "lab_b"):
        import_warp(repo, [root / "warp_tiltseries/TS_1.xml"], source=lab)
    summary = export_warp(repo, "HEAD", tmp_path / "out")
    assert summary["tilt_series"] == ["lab_a_TS_1", "lab_b_TS_1"]
    again = Repository.init(tmp_path / "again")
    import_warp(again, [tmp_path / "out/warp_tiltseries/lab_b_TS_1.xml"], source="lab_b")
    (key, _, item), = iter_items(again, again.population("HEAD"))
    original = {k: i for k, _, i in iter_items(repo, repo.population("HEAD"))}["lab_b/TS_1"]
    assert key == "lab_b/lab_b_TS_1" and item.stack == original.stack


def test_written_xml_holds_u_minus_v_as_warp_reads_it(tmp_path, warpylib):
    """A model with U − V = 600 Å → XML → warpylib's CTF reads DefocusDelta 0.06 µm (not half of it)."""
    model = warp_model(read_warp_xml(TEST_DATA / "warp/TS_1.xml"), 0.834)
    n = len(model["tilt_angles_deg"])
    model["defocus_u_angstrom"] = np.full(n, 30300.0)
    model["defocus_v_angstrom"] = np.full(n, 29700.0)
    path = tmp_path / "TS_1.xml"
    path.write_text(warp_xml_text(model, 0.834, [f"m{i}.tif" for i in range(n)])[0])
    ts_w = warpylib.TiltSeries(str(path))
    assert [ts_w.get_tilt_defocus_delta(t) for t in range(n)] == pytest.approx([0.06] * n, abs=1e-6)
    assert [ts_w.get_tilt_defocus(t) for t in range(n)] == pytest.approx([3.0] * n, abs=1e-6)


def test_phase_plate_data_keeps_its_phase_shift(tmp_path, warpylib):
    """Warp's phase shift (fractions of π) becomes the item's phase_shift_deg and is written back as Warp reads it."""
    xml = read_warp_xml(TEST_DATA / "warp/TS_1.xml")
    text = xml.raw.decode("utf-8-sig").replace('<Param Name="PhaseShift" Value="0" />',
                                               '<Param Name="PhaseShift" Value="0.5" />')
    text = re.sub(r"<GridCTFPhase .*?</GridCTFPhase>", "", text, flags=re.S)  # its per-tilt grid would win
    assert 'Name="PhaseShift" Value="0.5"' in text, "TS_1.xml names its phase shift"
    path = tmp_path / "TS_1.xml"
    path.write_text(text)
    model = warp_model(read_warp_xml(path), 0.834)
    np.testing.assert_allclose(model["phase_shift_deg"], 90.0)
    n = len(model["tilt_angles_deg"])
    out = tmp_path / "back.xml"
    out.write_text(warp_xml_text(model, 0.834, [f"m{i}.tif" for i in range(n)])[0])
    ts_w = warpylib.TiltSeries(str(out))
    assert [ts_w.get_tilt_phase(t) for t in range(n)] == pytest.approx([0.5] * n, abs=1e-6)


def test_a_rebuilt_xml_keeps_every_element_the_model_does_not_hold(tmp_path):
    """TS_1 refined (shifts and defocus changed): the rebuilt XML carries the new model and, byte for byte,
    everything else Warp wrote (magnification correction, plane normal, movie paths, power spectra, dose and
    location grids, Zernike and other CTF parameters, processing options)."""
    raw = (TEST_DATA / "warp/TS_1.xml").read_bytes()
    model = warp_model(read_warp_xml(TEST_DATA / "warp/TS_1.xml"), 0.834)
    model["shifts_angstrom"] = model["shifts_angstrom"] + 5.0
    model["defocus_u_angstrom"] = model["defocus_u_angstrom"] + 100.0
    text, _ = rebuilt_warp_xml(raw, model, 0.834)
    import xml.etree.ElementTree as ET
    before, after = ET.fromstring(raw.decode("utf-8-sig")), ET.fromstring(text.split("\n", 1)[1])
    assert sorted(e.tag for e in before) == sorted(e.tag for e in after)
    modelled = {"Angles", "Dose", "UseTilt", "AxisAngle", "AxisOffsetX", "AxisOffsetY", "CTF"} | \
        {e.tag for e in before if e.tag.startswith(("GridCTF", "GridAngle", "GridMovement", "GridVolumeWarp"))}
    kept = [e for e in before if e.tag not in modelled]
    assert len(kept) > 80  # TiltPS1D, TiltSimulatedScale, FOVFraction, OptionsCTF, dose and location grids, …
    for old, new in zip(kept, [e for e in after if e.tag not in modelled]):
        assert ET.tostring(old) == ET.tostring(new), old.tag
    for name in ("MagnificationCorrection", "PlaneNormal", "DataDirectory", "Bfactor"):
        assert after.attrib[name] == before.attrib[name]
    params = {p.attrib["Name"]: p.attrib["Value"] for p in after.find("CTF")}
    assert params["ZernikeCoeffsOdd"] == {p.attrib["Name"]: p.attrib["Value"] for p in before.find("CTF")}[
        "ZernikeCoeffsOdd"] and len(params) == len(before.find("CTF"))
    path = tmp_path / "TS_1.xml"
    path.write_text(text)
    back = warp_model(read_warp_xml(path), 0.834)
    for key in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg"):
        np.testing.assert_allclose(back[key], model[key], atol=1e-9)
    volume = np.array(model["tomogram_size_px"]) * 0.834  # the same projections (y tilts folded into Angles)
    p = torch.tensor(np.random.default_rng(5).uniform(-0.4, 0.4, size=(100, 3)) * volume)
    a = particle_positions_in_tilts(_our_geometry(model, 0.834, volume)[0], p)
    b = particle_positions_in_tilts(_our_geometry(back, 0.834, volume)[0], p)
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), atol=1e-6)


def test_an_xml_without_a_ctf_estimate_imports_with_a_defocus_and_exports(tmp_path):
    root = _warp_project(tmp_path / "project")
    xml = root / "warp_tiltseries/TS_1.xml"
    text = re.sub(r"<GridCTF .*?</GridCTF>", "", xml.read_text(), flags=re.S).replace(
        '<Param Name="Defocus" Value="2" />', '<Param Name="Defocus" Value="0" />')
    xml.write_text(text)
    repo = Repository.init(tmp_path / "pop")
    with pytest.raises(CryopoolError, match="never estimated"):
        import_warp(repo, [xml], source="lab")
    _, _, item = _only_item(repo, import_warp(repo, [xml], source="lab", defocus_um=4.0))
    m = load_item(repo, item, with_stack=False)
    np.testing.assert_allclose((m.imaging.defocus_u_angstrom + m.imaging.defocus_v_angstrom).numpy() / 2, 4e4)
    export_warp(repo, "HEAD", tmp_path / "out")  # the stored XML is compared with the model at that defocus
    assert (tmp_path / "out/warp_tiltseries/TS_1.xml").read_bytes() == xml.read_bytes()


def test_warps_magnification_correction_is_kept_and_refine_is_told(tmp_path):
    """TS_1's MagnificationCorrection (0.6 % anisotropy) becomes the imaging model's magnification_anisotropy,
    which the engine does not model: refine refuses the item unless told (tests/engine/test_refine.py)."""
    model = warp_model(read_warp_xml(TEST_DATA / "warp/TS_1.xml"), 0.834)
    major, minor, angle = model["magnification_anisotropy"]
    m = np.array([[1.0062196, 0.00422745], [0.004283654, 1.0009562]])  # the file's matrix
    for scale, axis in ((major, angle), (minor, angle + 90.0)):
        v = np.array([np.cos(np.radians(axis)), np.sin(np.radians(axis))])
        assert np.linalg.norm(m @ v) == pytest.approx(scale, abs=3e-5)  # stretch along each axis, as the matrix
    root = _warp_project(tmp_path / "project", use=(True,) * 5, sections=5)
    xml = root / "warp_tiltseries/TS_1.xml"
    xml.write_text(xml.read_text().replace('LevelAngleX="1.5"',
                                           'LevelAngleX="1.5" MagnificationCorrection="1.01, 0, 0, 0.99"'))
    repo = Repository.init(tmp_path / "pop")
    _, _, item = _only_item(repo, import_warp(repo, [xml], source="lab"))
    from cryopool.engine.records_io import unmodelled_optics
    assert any("magnification" in w for w in unmodelled_optics(repo, item))
    export_warp(repo, "HEAD", tmp_path / "out")  # not refined: the original XML comes back, byte for byte
    assert (tmp_path / "out/warp_tiltseries/TS_1.xml").read_bytes() == xml.read_bytes()
