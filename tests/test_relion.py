"""RELION 5 projects in and out, against a hand-written project and RELION's equations written out here."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryopool.engine.geometry import euler_zyz_to_matrix, rotvec_to_matrix
from cryopool.engine.records_io import load_item, load_particles
from cryopool.engine.writer import particle_table_record
from cryopool.engine.tilt_model import particle_defocus, particle_positions_in_tilts
from cryopool.engine.trajectories import positions_at
from cryopool.repo import (CryopoolError, Operation, ParticleTable, Repository, Species, iter_items, software_version,
                           with_species)
from cryopool.repo.relion import export_relion, import_relion
from cryopool.repo.trajectory import dose_times

from conftest import repo_state, write_mrc

PIXEL = 2.0
N_TILTS = 5
TILTS = [0.0, 15.0, -15.0, 30.0, -30.0]  # stack order = acquisition order (dose-symmetric)
# TS_A: even tomogram, one stack with sections named per row (k@file), hand -1
# TS_B: odd tomogram (half-pixel question), one file per tilt named per row, hand +1
SIZES = {"TS_A": (64, 48, 32), "TS_B": (63, 47, 31)}


def _tilt_rows(name: str) -> list[str]:
    rows = []
    for i, t in enumerate(TILTS):
        image = f"{i + 1}@tilt_series/{name}.mrcs" if name == "TS_A" else f"frames/{name}_{i:03d}.mrc"
        rows.append(f"{image} {t} 85.0 {3.0 * i} {0.1 * i} {t + 0.05 * i} {85.0 + 0.2 * i} "
                    f"{1.5 * i} {-2.5 * i} {30000 + 100 * i} {29000 + 100 * i} {10.0 * i}")
    return rows


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_project(root: Path, *, seed: int = 0) -> Path:
    """A RELION 5 tomography project written by hand: two tilt series, two species."""
    rng = np.random.default_rng(seed)
    for name, (w, h, _) in SIZES.items():
        stack = rng.normal(size=(N_TILTS, h, w)).astype(np.float32)
        if name == "TS_A":
            (root / "tilt_series").mkdir(parents=True, exist_ok=True)
            write_mrc(root / "tilt_series/TS_A.mrcs", stack, PIXEL)
        else:
            (root / "frames").mkdir(parents=True, exist_ok=True)
            for i in range(N_TILTS):
                write_mrc(root / f"frames/{name}_{i:03d}.mrc", stack[i], PIXEL)
        _write_text(root / f"tilt_series/{name}.star", "\n".join([
            "", "# version 50001", "", f"data_{name}", "", "loop_",
            *[f"_{c} #{k + 1}" for k, c in enumerate([
                "rlnMicrographName", "rlnTomoNominalStageTiltAngle", "rlnTomoNominalTiltAxisAngle",
                "rlnMicrographPreExposure", "rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot", "rlnTomoXShiftAngst",
                "rlnTomoYShiftAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])],
            *_tilt_rows(name), ""]))
    _write_text(root / "tomograms.star", "\n".join([
        "", "# version 50001", "", "data_global", "", "loop_",
        "_rlnTomoName #1", "_rlnVoltage #2", "_rlnSphericalAberration #3", "_rlnAmplitudeContrast #4",
        "_rlnMicrographOriginalPixelSize #5", "_rlnTomoHand #6", "_rlnTomoTiltSeriesPixelSize #7",
        "_rlnTomoTiltSeriesStarFile #8", "_rlnTomoSizeX #9", "_rlnTomoSizeY #10", "_rlnTomoSizeZ #11",
        "_rlnTomoImportFractionalDose #12",
        "TS_A 300.0 2.7 0.1 2.0 -1 2.0 tilt_series/TS_A.star 64 48 32 3.0",
        "TS_B 300.0 2.7 0.1 2.0 1 2.0 tilt_series/TS_B.star 63 47 31 3.0", ""]))
    for species, n, subtomo in (("ribosome", 6, False), ("proteasome", 4, True)):
        d = root / species
        d.mkdir()
        for k, fname in enumerate(("half1.mrc", "half2.mrc")):
            write_mrc(d / fname, rng.normal(size=(16, 16, 16)).astype(np.float32), 4.0)
        write_mrc(d / "mask.mrc", np.ones((16, 16, 16), np.float32), 4.0)
        cols = ["rlnTomoName", "rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
                "rlnCenteredCoordinateZAngst", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnRandomSubset",
                "rlnOpticsGroup"] + (["rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi",
                                      "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"] if subtomo else [])
        rows = []
        for i in range(n):
            tomo = "TS_A" if i % 2 == 0 else "TS_B"
            vals = [tomo, *np.round(rng.uniform(-20, 20, 3), 3), *np.round(rng.uniform(-170, 170, 3), 2),
                    i % 2 + 1, 1]
            if subtomo:
                vals += [*np.round(rng.uniform(-170, 170, 3), 2), *np.round(rng.uniform(-3, 3, 3), 2)]
            rows.append(" ".join(str(v) for v in vals))
        _write_text(d / "particles.star", "\n".join([
            "", "data_optics", "", "loop_", "_rlnOpticsGroup #1", "_rlnOpticsGroupName #2",
            "_rlnTomoTiltSeriesPixelSize #3", "1 optics1 2.0", "", "data_particles", "", "loop_",
            *[f"_{c} #{k + 1}" for k, c in enumerate(cols)], *rows, ""]))
        _write_text(d / "optimisation_set.star", "\n".join([
            "", "data_optimisation_set", "", "_rlnTomoParticlesFile " + f"{species}/particles.star",
            "_rlnTomoTomogramsFile tomograms.star", f"_rlnTomoReferenceMap1File {species}/half1.mrc",
            f"_rlnTomoReferenceMap2File {species}/half2.mrc", f"_rlnTomoReferenceMaskFile {species}/mask.mrc", ""]))
    return root


def import_project(repo: Repository, root: Path, **kw):
    import_relion(repo, [root / "ribosome/optimisation_set.star"], source="labA", diameter_angstrom=250.0,
                  species="ribosome", **kw)
    return import_relion(repo, [root / "proteasome/optimisation_set.star"], source="labA",
                         diameter_angstrom=110.0, species="proteasome", symmetry="D7", **kw)


@pytest.fixture
def project(tmp_path) -> Path:
    return write_project(tmp_path / "relion")


# ------------------------------------------------------------------ RELION's equations, written out independently


def relion_projection(size_px, image_shape_hw, xtilt, ytilt, zrot, xshift, yshift, pixel):
    """Tomogram::setProjectionMatrix: 4×4 from tomogram pixels (corner origin) to tilt-image pixels."""
    def rot(axis, deg):
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        m = np.eye(4)
        i, j = [(1, 2), (2, 0), (0, 1)][axis]
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m

    def shift(v):
        m = np.eye(4)
        m[:3, 3] = v
        return m
    w, h, d = size_px
    s0 = shift([-(w // 2), -(h // 2), -(d // 2)])
    s1 = shift([xshift / pixel, yshift / pixel, 0])
    s2 = shift([image_shape_hw[1] // 2, image_shape_hw[0] // 2, 0])
    return s1 @ s2 @ rot(2, zrot) @ rot(1, ytilt) @ rot(0, xtilt) @ s0


def test_geometry_matches_relions_projection_matrices(project, disk_repo):
    import_project(disk_repo, project)
    pop = disk_repo.population("HEAD")
    rows = {name: starfile.read(project / f"tilt_series/{name}.star") for name in SIZES}
    globals_ = starfile.read(project / "tomograms.star")
    for sp_name in ("ribosome", "proteasome"):
        sp = disk_repo.get_record(pop.species[sp_name], Species)
        parts = load_particles(disk_repo, sp.particles)
        star = starfile.read(project / sp_name / "particles.star")["particles"]
        for key in parts.item_names:
            tomo = key.split("/")[1]
            model = load_item(disk_repo, disk_repo.get_record(
                disk_repo.get_record(pop.data_sources["labA"]).items[tomo]), with_stack=False)
            sel = parts.select(key)
            xy, z = particle_positions_in_tilts(model.geometry, parts.positions[sel])
            h, w = SIZES[tomo][1], SIZES[tomo][0]
            ours_px = xy.numpy() / PIXEL + np.array([w // 2, h // 2])
            defocus_u, _, _ = particle_defocus(model.imaging, z)
            rows_here = star[star.rlnTomoName == tomo]
            g = globals_[globals_.rlnTomoName == tomo].iloc[0]
            for p, (_, prow) in enumerate(rows_here.iterrows()):
                # RELION: decentred pixel = centred / px + size / 2 (a float); origins in the subtomogram frame
                centred = np.array([prow[f"rlnCenteredCoordinate{a}Angst"] for a in "XYZ"], float)
                a_sub = np.eye(3)
                if "rlnTomoSubtomogramRot" in prow:
                    a_sub = euler_zyz_to_matrix(torch.tensor([prow.rlnTomoSubtomogramRot, prow.rlnTomoSubtomogramTilt,
                                                              prow.rlnTomoSubtomogramPsi], dtype=torch.float64)).numpy()
                    centred = centred - a_sub @ np.array([prow[f"rlnOrigin{a}Angst"] for a in "XYZ"], float)
                decentred = centred / PIXEL + np.array(SIZES[tomo], float) / 2
                for i, (_, trow) in enumerate(rows[tomo].iterrows()):
                    m = relion_projection(SIZES[tomo], (h, w), trow.rlnTomoXTilt, trow.rlnTomoYTilt, trow.rlnTomoZRot,
                                          trow.rlnTomoXShiftAngst, trow.rlnTomoYShiftAngst, PIXEL)
                    img = m @ np.r_[decentred, 1]
                    np.testing.assert_allclose(ours_px[p, i], img[:2], atol=1e-6)
                    # Tomogram::getDepthOffset and the CTF: ΔF = hand × px × (z(p) − z(centre))
                    depth = img[2] - (m @ np.r_[np.array([w // 2, h // 2, SIZES[tomo][2] // 2], float), 1])[2]
                    expect = trow.rlnDefocusU + g.rlnTomoHand * PIXEL * depth
                    assert abs(float(defocus_u[p, i]) - expect) < 1e-6
            # orientation: A = A_subtomogram · A_particle
            for p, (_, prow) in enumerate(rows_here.iterrows()):
                a = euler_zyz_to_matrix(torch.tensor([prow.rlnAngleRot, prow.rlnAngleTilt, prow.rlnAnglePsi],
                                                     dtype=torch.float64)).numpy()
                if "rlnTomoSubtomogramRot" in prow:
                    a = euler_zyz_to_matrix(torch.tensor([prow.rlnTomoSubtomogramRot, prow.rlnTomoSubtomogramTilt,
                                                          prow.rlnTomoSubtomogramPsi], dtype=torch.float64)).numpy() @ a
                np.testing.assert_allclose(parts.orientations[sel][p, 0].numpy(), a, atol=1e-9)


def _moving_ribosomes(repo: Repository, project: Path):
    """The project's ribosomes given 3-sample trajectories (positions and orientations) and committed."""
    import_project(repo, project)
    pop = repo.population("HEAD")
    sp = repo.get_record(pop.species["ribosome"], Species)
    parts = load_particles(repo, sp.particles)
    rng = np.random.default_rng(3)
    drift = torch.tensor(rng.normal(0, 8.0, (len(parts.ids), 3, 3)))
    turn = rotvec_to_matrix(torch.tensor(rng.normal(0, 2.0, (len(parts.ids), 3, 3))))
    moving = replace(parts, positions=parts.positions + drift, orientations=turn @ parts.orientations)
    with repo.transaction() as tx:
        ref = tx.put_record(replace(sp, particles=tx.put_record(particle_table_record(tx, moving))))
        tx.commit(with_species(tx, pop, ref, replace_existing=True), message="moving particles",
                  operation=Operation(kind="edit", parameters={}, software=software_version()), retries=0)
    return parts, moving


def test_trajectories_export_as_relion_motion(tmp_path, project, disk_repo):
    """Particles moving over the exposure: RELION's position + motion.star offset lands, in every tilt, where ours does."""
    parts, moving = _moving_ribosomes(disk_repo, project)
    out = tmp_path / "export"
    summary = export_relion(disk_repo, "HEAD", out, species=["ribosome"])
    assert any("motion.star" in n for n in summary["notes"])
    assert starfile.read(out / "ribosome/optimisation_set.star")["rlnTomoTrajectoriesFile"] == "ribosome/motion.star"
    motion = starfile.read(out / "ribosome/motion.star", always_dict=True)
    star = starfile.read(out / "ribosome/particles.star")["particles"]
    assert int(motion["general"]["rlnParticleNumber"]) == len(star) == len(parts.ids)
    tomograms = starfile.read(out / "tomograms.star")
    pop = disk_repo.population("HEAD")
    for key in parts.item_names:
        source, item_name = key.split("/")
        model = load_item(disk_repo, disk_repo.get_record(disk_repo.get_record(pop.data_sources[source]).items[item_name]),
                          with_stack=False)
        sel = parts.select(key)
        xy, _ = particle_positions_in_tilts(model.geometry, moving.positions[sel])  # ours, from the trajectory
        row = tomograms[tomograms.rlnTomoName == item_name].iloc[0]
        size = (int(row.rlnTomoSizeX), int(row.rlnTomoSizeY), int(row.rlnTomoSizeZ))
        tilts = starfile.read(out / row.rlnTomoTiltSeriesStarFile)
        h, w = SIZES[item_name][1], SIZES[item_name][0]
        first = int(np.argmin(tilts.rlnMicrographPreExposure))
        rows_here = star[star.rlnTomoName == item_name]
        assert len(rows_here) == int(sel.sum())
        for p, (_, prow) in enumerate(rows_here.iterrows()):
            offsets = motion[prow.rlnTomoParticleName][[f"rlnOrigin{a}Angst" for a in "XYZ"]].to_numpy()
            assert offsets.shape == (len(tilts), 3) and np.abs(offsets[first]).max() == 0  # relative to the first
            centred = np.array([prow[f"rlnCenteredCoordinate{a}Angst"] for a in "XYZ"], float)
            if "rlnOriginXAngst" in prow:
                centred = centred - np.array([prow[f"rlnOrigin{a}Angst"] for a in "XYZ"], float)
            for f, (_, trow) in enumerate(tilts.iterrows()):
                # Trajectory::getShiftsInPix: position in frame f = position + shifts_Ang[f] / pixel
                decentred = (centred + offsets[f]) / PIXEL + np.array(size, float) / 2
                m = relion_projection(size, (h, w), trow.rlnTomoXTilt, trow.rlnTomoYTilt, trow.rlnTomoZRot,
                                      trow.rlnTomoXShiftAngst, trow.rlnTomoYShiftAngst, PIXEL)
                img = (m @ np.r_[decentred, 1])[:2]
                np.testing.assert_allclose(xy[p, f].numpy() / PIXEL + np.array([w // 2, h // 2]), img, atol=1e-6)


def test_trajectories_import_from_relion_motion(tmp_path, project, disk_repo):
    """motion.star back in: the 3-sample position trajectories come back exactly; RELION's one orientation at each."""
    _, moving = _moving_ribosomes(disk_repo, project)
    out = tmp_path / "export"
    export_relion(disk_repo, "HEAD", out, species=["ribosome"])
    back = Repository.init(tmp_path / "back")
    import_relion(back, [out / "ribosome/optimisation_set.star"], source="labA")
    sp = back.get_record(back.population("HEAD").species["ribosome"], Species)
    assert back.get_record(sp.particles, ParticleTable).temporal_samples == 3
    parts = load_particles(back, sp.particles)
    np.testing.assert_allclose(parts.positions.numpy(), moving.positions.numpy(), atol=1e-6)
    star = starfile.read(out / "ribosome/particles.star")["particles"]
    written = euler_zyz_to_matrix(torch.tensor(star[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()))
    np.testing.assert_allclose(parts.orientations.numpy(), written[:, None].expand(-1, 3, -1, -1).numpy(), atol=1e-9)
    one = Repository.init(tmp_path / "one")  # one pose: the trajectory's least-squares constant, its mean over tilts
    import_relion(one, [out / "ribosome/optimisation_set.star"], source="labA", temporal_samples=1)
    single = load_particles(one, one.get_record(one.population("HEAD").species["ribosome"], Species).particles)
    item = one.get_record(one.get_record(one.population("HEAD").data_sources["labA"]).items["TS_A"])
    times = torch.tensor(dose_times(item.pre_exposure_e_per_angstrom2, item.exposure_e_per_angstrom2))
    sel = single.select("labA/TS_A")
    np.testing.assert_allclose(single.positions[sel, 0].numpy(),
                               positions_at(moving.positions[sel], times).mean(dim=1).numpy(), atol=1e-6)


def test_a_trajectory_file_without_a_particle_is_refused(tmp_path, project, disk_repo):
    _moving_ribosomes(disk_repo, project)
    out = tmp_path / "export"
    export_relion(disk_repo, "HEAD", out, species=["ribosome"])
    motion = out / "ribosome/motion.star"
    first = next(ln for ln in motion.read_text().splitlines() if ln.startswith("data_") and ln != "data_general")
    motion.write_text(motion.read_text().replace(first + "\n", "data_somebody_else\n", 1))
    with pytest.raises(CryopoolError, match=f"motion.star: field '{first}': no trajectory for this particle"):
        import_relion(Repository.init(tmp_path / "back"), [out / "ribosome/optimisation_set.star"], source="labA")


def test_conversions_by_hand(tmp_path, disk_repo):
    root = write_project(tmp_path / "p")
    # one ribosome particle in the odd tomogram at centred (10, -20, 30) Å: x, y, z sizes 63, 47, 31 are all odd
    text = (root / "ribosome/particles.star").read_text().splitlines()
    header = [ln for ln in text if not ln.startswith(("TS_A", "TS_B"))]
    (root / "ribosome/particles.star").write_text("\n".join(header + ["TS_B 10 -20 30 0 0 0 1 1", ""]))
    import_relion(disk_repo, [root / "ribosome/optimisation_set.star"], source="s", species="r",
                  diameter_angstrom=100.0)
    pop = disk_repo.population("HEAD")
    parts = load_particles(disk_repo, disk_repo.get_record(pop.species["r"], Species).particles)
    # RELION projects it about floor(size/2) = 31, 23, 15 while size/2 = 31.5, 23.5, 15.5: +0.5 px = +1 Å
    np.testing.assert_allclose(parts.positions[0, 0].numpy(), [11.0, -19.0, 31.0])
    item = disk_repo.get_record(disk_repo.get_record(pop.data_sources["s"]).items["TS_B"])
    model = load_item(disk_repo, item, with_stack=False)
    # tilt 3: nominal 30, xtilt 0.3, ytilt 30.15, zrot 85.6, axis 85 → ωx 0.3, ωy 0.15, ωz 0.6
    np.testing.assert_allclose(model.geometry.angle_corrections_deg[3].numpy(), [0.3, 0.15, 0.6], atol=1e-12)
    np.testing.assert_allclose(model.geometry.shifts_angstrom[3].numpy(), [4.5, -7.5])
    assert item.tilt_axis_angle_deg == 85.0 and item.tilt_angles_deg == TILTS
    assert item.exposure_e_per_angstrom2 == [3.0] * N_TILTS
    assert item.pre_exposure_e_per_angstrom2 == [0.0, 3.0, 6.0, 9.0, 12.0]
    assert item.handedness == 1 and item.tomogram_size_px == [63, 47, 31]


def test_round_trip_gives_identical_hashes_and_readable_files(project, tmp_path):
    a = Repository.init(tmp_path / "a")
    import_project(a, project)
    first = tmp_path / "export1"
    summary = export_relion(a, "HEAD", first)
    assert summary["species"] == ["proteasome", "ribosome"] and summary["tilt_series"] == ["TS_A", "TS_B"]
    b = Repository.init(tmp_path / "b")
    import_relion(b, [first / "proteasome/optimisation_set.star", first / "ribosome/optimisation_set.star"],
                  source="labA")
    pa, pb = a.population("HEAD"), b.population("HEAD")
    assert pa.data_sources == pb.data_sources
    assert pa.species == pb.species
    second = tmp_path / "export2"
    time.sleep(1.1)  # nothing in an export may depend on the clock
    export_relion(b, "HEAD", second)
    for f in sorted(first.rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (second / f.relative_to(first)).read_bytes(), f
    # readable by the field's own readers
    for f in first.rglob("*.star"):
        assert starfile.read(f, always_dict=True)
    for f in first.rglob("*.mrc*"):
        assert mrcfile.validate(str(f)), f
    tomos = starfile.read(first / "tomograms.star")
    assert list(tomos.rlnTomoName) == ["TS_A", "TS_B"] and list(tomos.rlnTomoHand) == [-1, 1]
    with mrcfile.open(first / "ribosome/half_map_1.mrc") as m:
        assert m.voxel_size.x == pytest.approx(4.0) and tuple(m.header.origin.tolist()) == (0, 0, 0)


def test_two_labs_same_tomogram_names_stay_apart(project, disk_repo, tmp_path):
    import_relion(disk_repo, [project / "tomograms.star"], source="labA")
    other = write_project(tmp_path / "other", seed=1)
    import_relion(disk_repo, [other / "tomograms.star"], source="labB")
    pop = disk_repo.population("HEAD")
    assert sorted(pop.data_sources) == ["labA", "labB"]
    out = export_relion(disk_repo, "HEAD", tmp_path / "out")
    assert out["tilt_series"] == ["labA_TS_A", "labA_TS_B", "labB_TS_A", "labB_TS_B"]


def test_export_refuses_a_non_empty_folder(project, disk_repo, tmp_path):
    import_project(disk_repo, project)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/keep.txt").write_text("mine")
    with pytest.raises(CryopoolError, match="not empty"):
        export_relion(disk_repo, "HEAD", tmp_path / "busy")
    assert (tmp_path / "busy/keep.txt").read_text() == "mine"


def _edit_line(root: Path, rel: str, starts: str, edit) -> None:
    p = root / rel
    lines = p.read_text().splitlines()
    k = next(i for i, ln in enumerate(lines) if ln.startswith(starts))
    lines[k] = edit(lines[k])
    p.write_text("\n".join(line for line in lines if line is not None) + "\n")


def _break(root: Path, rel: str, old: str, new: str) -> None:
    p = root / rel
    text = p.read_text()
    assert old in text, (rel, old)
    p.write_text(text.replace(old, new, 1))


BAD = {
    "missing column": (lambda r: _break(r, "tilt_series/TS_A.star", "_rlnTomoYTilt #6", "_rlnSomethingElse #6"),
                       "TS_A.star", "rlnTomoYTilt"),
    "unknown tomo name": (lambda r: _break(r, "ribosome/particles.star", "\nTS_B ", "\nTS_Q "),
                          "particles.star", "rlnTomoName row"),
    "tilt count": (lambda r: _edit_line(r, "tilt_series/TS_A.star", "5@", lambda line: None),
                   "TS_A", "tilt count"),
    "pixel size in STAR": (lambda r: _break(r, "ribosome/particles.star", "1 optics1 2.0", "1 optics1 2.5"),
                           "particles.star", "rlnTomoTiltSeriesPixelSize"),
    "pixel size in MRC": (lambda r: write_mrc(r / "tilt_series/TS_A.mrcs",
                                               np.zeros((N_TILTS, 48, 64), np.float32), 3.0),
                          "TS_A.mrcs", "pixel sizes disagree"),
    "NaN": (lambda r: _break(r, "tilt_series/TS_B.star", " 30100 ", " nan "), "TS_B.star", "rlnDefocusU row 2"),
    "inf": (lambda r: _edit_line(r, "ribosome/particles.star", "TS_B ",
                                 lambda line: " ".join(["TS_B", "inf", *line.split()[2:]])),
            "particles.star", "rlnCenteredCoordinateXAngst row 2"),
    "truncated MRC": (lambda r: (r / "frames/TS_B_002.mrc").write_bytes((r / "frames/TS_B_002.mrc").read_bytes()[:-100]),
                      "TS_B_002.mrc", "truncated"),
    "wrong mode": (lambda r: (r / "frames/TS_B_001.mrc").write_bytes(
        (r / "frames/TS_B_001.mrc").read_bytes()[:12] + (99).to_bytes(4, "little")
        + (r / "frames/TS_B_001.mrc").read_bytes()[16:]), "TS_B_001.mrc", "mode"),
    "big-endian mislabelled": (lambda r: (r / "tilt_series/TS_A.mrcs").write_bytes(
        (r / "tilt_series/TS_A.mrcs").read_bytes()[:212] + b"\x11\x11\x00\x00"
        + (r / "tilt_series/TS_A.mrcs").read_bytes()[216:]), "TS_A.mrcs", ""),
    "missing stack": (lambda r: (r / "frames/TS_B_004.mrc").unlink(), "TS_B.star", "rlnMicrographName row 5"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_clearly_and_writes_nothing(case, project, disk_repo):
    import_relion(disk_repo, [project / "tomograms.star"], source="before")  # something to keep
    breaker, where, what = BAD[case]
    breaker(project)
    before = repo_state(disk_repo)
    with pytest.raises(CryopoolError) as info:
        import_project(disk_repo, project)
    message = str(info.value)
    assert where in message and what in message, message
    assert repo_state(disk_repo) == before


def test_cli_import_and_export(project, tmp_path):
    from click.testing import CliRunner

    from cryopool.cli.main import cli
    runner = CliRunner()
    pop = str(tmp_path / "pop")

    def invoke(*args):
        result = runner.invoke(cli, ["-C", pop, *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if "--json" in args else result.output
    assert runner.invoke(cli, ["init", pop]).exit_code == 0
    out = invoke("import", "relion", project / "ribosome/optimisation_set.star", "--source", "labA",
                 "--species", "ribosome", "--diameter", 250, "--json")
    assert out["tilt_series"] == ["TS_A", "TS_B"] and out["species"] == ["ribosome"]
    summary = invoke("export", "relion", tmp_path / "out", "--json")
    assert summary["species"] == ["ribosome"] and (tmp_path / "out/ribosome/optimisation_set.star").is_file()
    filtered = tmp_path / "out/ribosome/filtered.mrc"  # the engine's filter, written by the CLI layer
    assert mrcfile.validate(str(filtered))
    with mrcfile.open(filtered) as m, mrcfile.open(tmp_path / "out/ribosome/half_map_1.mrc") as h:
        assert m.voxel_size.x == h.voxel_size.x and m.data.shape == h.data.shape
    invoke("export", "relion", tmp_path / "plain", "--no-filtered")
    assert not (tmp_path / "plain/ribosome/filtered.mrc").exists()
    bad = runner.invoke(cli, ["-C", pop, "import", "relion", str(project / "tomograms.star"), "--source", "labA",
                              "--half1", str(project / "ribosome/half1.mrc")])
    assert bad.exit_code == 2 and "--half2" in bad.output


def test_a_project_with_two_species_imports_in_one_call(project, tmp_path):
    """Two optimisation sets as RELION writes them (no cryopool keys): one call, the tilt series once, each species
    named in order, diameters from the masks."""
    a = Repository.init(tmp_path / "a")
    import_project(a, project)
    out = tmp_path / "export"
    export_relion(a, "HEAD", out)
    sets = []
    for name in ("proteasome", "ribosome"):
        path = out / name / "optimisation_set.star"
        text = "\n".join(line for line in path.read_text().splitlines() if "cryopool" not in line) + "\n"
        path.write_text(text)
        sets.append(path)
    b = Repository.init(tmp_path / "b")
    with pytest.raises(CryopoolError, match="needs a name"):
        import_relion(b, sets, source="labA")
    with pytest.raises(CryopoolError, match="one --species per optimisation set"):
        import_relion(b, sets, source="labA", species=["proteasome"])
    import_relion(b, sets, source="labA", species=["proteasome", "ribosome"], diameter_angstrom=[110.0, 250.0],
                  symmetry=None)
    pop = b.population()
    assert sorted(pop.species) == ["proteasome", "ribosome"]
    assert [k for k, _, _ in iter_items(b, pop)] == ["labA/TS_A", "labA/TS_B"]
    for name in pop.species:
        ours, theirs = (r.get_record(r.population().species[name], Species) for r in (a, b))
        assert theirs.diameter_angstrom == ours.diameter_angstrom, name
        assert theirs.particles == ours.particles and theirs.half_map_1 == ours.half_map_1
    c = Repository.init(tmp_path / "c")  # no diameters: each from its mask
    import_relion(c, sets, source="labA", species=["proteasome", "ribosome"])
    assert all(c.get_record(r, Species).diameter_angstrom > 0 for r in c.population().species.values())


@pytest.mark.parametrize("radius_px", [5.0, 9.5, 14.0])
def test_the_diameter_a_mask_implies(radius_px):
    """A soft-edged sphere of known radius (the 0.5 level at that radius) gives its diameter within a pixel."""
    from cryopool.repo.relion import _mask_diameter
    n = 40
    g = np.arange(n) - (n - 1) / 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    mask = 0.5 * (1 - np.tanh((r - radius_px) / 1.5))  # 0.5 exactly at the radius, soft edge
    assert _mask_diameter(mask, 4.0) == pytest.approx(2 * radius_px * 4.0, abs=4.0)
