"""Warp's tilt-series model in ours, against warpylib (the Warp authors' PyTorch port of it) on a real Warp XML."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from conftest import TEST_DATA, needed
from cryopool.engine.ctf import ctf_2d
from cryopool.engine.geometry import euler_zyz_to_matrix
from cryopool.engine.tilt_model import (Imaging, TiltGeometry, particle_defocus, particle_positions_in_tilts,
                                        particle_rotations_in_tilts)
from cryopool.repo import CryopoolError
from cryopool.repo.warp import interpolating_to_bspline, read_warp_xml, warp_model
from cryopool.engine.splines import interpolate_bspline_grid

TS_1 = TEST_DATA / "warp/TS_1.xml"


class _Unusable(types.ModuleType):
    """torch-projectors 0.13.1 wheels do not load under torch 2.13; warpylib's geometry never calls them."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"torch_projectors.{name} used by the geometry under test")


@pytest.fixture(scope="module")
def warpylib():
    sys.modules.setdefault("torch_projectors", _Unusable("torch_projectors"))
    return needed("warpylib")


def _our_geometry(model: dict, pixel: float, volume_angstrom) -> tuple[TiltGeometry, Imaging]:
    t = lambda x: None if x is None else torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    n = len(model["tilt_angles_deg"])
    geom = TiltGeometry(
        tilt_angles_deg=t(model["tilt_angles_deg"]), tilt_axis_angle_deg=model["tilt_axis_angle_deg"],
        shifts_angstrom=t(model["shifts_angstrom"]), angle_corrections_deg=t(model["angle_corrections_deg"]),
        image_size_px=model["image_size_px"], tomogram_size_angstrom=tuple(volume_angstrom), pixel_size_angstrom=pixel,
        dose_time=torch.zeros(n, dtype=torch.float64), image_warp=t(model["image_warp"]),
        volume_warp=t(model["volume_warp"]), orientation_corrections_deg=t(model.get("orientation_corrections_deg")))
    im = Imaging(t(model["defocus_u_angstrom"]), t(model["defocus_v_angstrom"]), t(model["defocus_angle_deg"]),
                 model["voltage_kv"], model["spherical_aberration_mm"], model["amplitude_contrast"])
    return geom, im


def test_natural_spline_conversion_interpolates_the_nodes_exactly():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(5, 4, 7))
    c = interpolating_to_bspline(f)
    idx = np.stack(np.meshgrid(*[np.linspace(0, 1, m) for m in f.shape], indexing="ij"), -1)
    got = interpolate_bspline_grid(torch.from_numpy(c)[None], torch.from_numpy(idx)).squeeze(-1).numpy()
    np.testing.assert_allclose(got, f, atol=1e-12)


def test_ts1_positions_and_defocus_match_warp(warpylib):
    """Every tilt, random points through the tomogram: image position (Å) and defocus (µm) as Warp computes them."""
    ts_w = warpylib.TiltSeries(str(TS_1))
    xml = read_warp_xml(TS_1)
    pixel = float(xml.ctf["PixelSize"])
    assert pixel == pytest.approx(0.834)
    model = warp_model(xml, pixel)
    assert model["image_size_px"] == (4092, 5760) and model["tomogram_size_px"] == [4000, 5700, 1000]
    assert model["image_warp"] is not None  # TS_1 has a 6×4×41 image warp: the test exercises the grids
    geom, imaging = _our_geometry(model, pixel, xml.volume_angstrom)
    rng = np.random.default_rng(0)
    vol = np.array(xml.volume_angstrom)
    corner = rng.uniform(0.2, 0.8, size=(300, 3)) * vol  # well inside: every tilt sees them
    expected = ts_w.get_position_in_all_tilts_single(torch.tensor(corner, dtype=torch.float32)).double().numpy()
    xy, z = particle_positions_in_tilts(geom, torch.tensor(corner - vol / 2, dtype=torch.float64))
    image_centre = np.array(xml.image_angstrom) / 2
    ours = xy.numpy() + image_centre
    err = np.abs(ours - expected[..., :2])
    assert err.max() < 0.02, err.max()  # Å; warpylib computes in float32 (≈ 5e-4 Å at 5000 Å)
    u, v, _ = particle_defocus(imaging, z)
    ours_defocus_um = ((u + v) / 2).numpy() * 1e-4
    np.testing.assert_allclose(ours_defocus_um, expected[..., 2], atol=2e-5)  # 0.2 Å


def test_ts1_particle_orientations_match_warp(warpylib):
    """Tilt rotations plus GridAngleX/Y/Z, which Warp applies to orientations only (up to 2.7° in TS_1)."""
    ts_w = warpylib.TiltSeries(str(TS_1))
    xml = read_warp_xml(TS_1)
    model = warp_model(xml, 0.834)
    assert np.abs(model["orientation_corrections_deg"]).max() > 2.0
    geom, _ = _our_geometry(model, 0.834, xml.volume_angstrom)
    rng = np.random.default_rng(1)
    angles = rng.uniform(-180, 180, size=(5, 3))
    point = torch.tensor([[1000.0, 2000.0, 400.0]])
    expected = ts_w.get_rotation_matrices_in_all_tilts(
        point[:, None].expand(5, 41, 3).contiguous(),
        torch.tensor(np.radians(angles), dtype=torch.float32)[:, None].expand(5, 41, 3).contiguous())
    ours = particle_rotations_in_tilts(geom, euler_zyz_to_matrix(torch.tensor(angles)))
    np.testing.assert_allclose(ours.numpy(), expected.double().numpy(), atol=2e-6)
    without = particle_rotations_in_tilts(geom.with_(orientation_corrections_deg=None),
                                          euler_zyz_to_matrix(torch.tensor(angles)))
    assert np.abs(without.numpy() - expected.double().numpy()).max() > 0.03  # the corrections matter


def test_bad_xml_is_refused(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<TiltSeries><Angles>1\n2</Angles><Dose>1</Dose></TiltSeries>")
    with pytest.raises(CryopoolError, match=r"bad.xml.*<Dose>"):
        read_warp_xml(bad)
    bad.write_text("<Movie/>")
    with pytest.raises(CryopoolError, match="not a Warp tilt-series XML"):
        read_warp_xml(bad)


@pytest.mark.parametrize("name", ["TS_1.xml", "00254.xml"])
def test_astigmatism_matches_warps_own_ctf(warpylib, name):
    """U, V and the angle per tilt, checked against warpylib's CTF (Warp's, ported): its DefocusDelta is U − V.

    Each tilt's 2-D CTF at the tilt centre from warpylib's own parameters
    (``get_tilt_defocus_delta``/``_angle``, ``CTF.get_2d``) is compared with
    ours from the imported U, V and angle; then U and V alone against the
    half-difference Warp's RELION writers use.
    """
    path = TEST_DATA / "warp" / name
    ts_w = warpylib.TiltSeries(str(path))
    xml = read_warp_xml(path)
    model = warp_model(xml, float(xml.ctf.get("PixelSize", 1.0)), image_size_px=(512, 512),
                       tomogram_size_px=[512, 512, 128])
    keep = model["tilts"]
    deltas = np.array([ts_w.get_tilt_defocus_delta(t) for t in keep])
    assert np.abs(deltas).max() > 0.01, "the file has astigmatism to test"  # µm
    pixel, size = 4.0, 128  # coarse sampling: rings resolvable, the comparison is exact either way
    for j, t in enumerate(keep):
        c = ts_w.ctf.get_copy()
        c.pixel_size = pixel
        c.defocus = ts_w.get_tilt_defocus(t)
        c.defocus_delta, c.defocus_angle = ts_w.get_tilt_defocus_delta(t), ts_w.get_tilt_defocus_angle(t)
        c.scale = 1.0
        expected = c.get_2d(size, ignore_bfactor=True).double().numpy()
        ours = ctf_2d(torch.tensor(model["defocus_u_angstrom"][j]), torch.tensor(model["defocus_v_angstrom"][j]),
                      torch.tensor(model["defocus_angle_deg"][j]), voltage_kv=model["voltage_kv"],
                      spherical_aberration_mm=model["spherical_aberration_mm"],
                      amplitude_contrast=model["amplitude_contrast"], pixel_size_angstrom=pixel, size=size)
        np.testing.assert_allclose(ours.double().numpy(), expected, atol=2e-3, err_msg=f"tilt {t}")
    mean_um = (model["defocus_u_angstrom"] + model["defocus_v_angstrom"]) / 2e4
    np.testing.assert_allclose((model["defocus_u_angstrom"] - model["defocus_v_angstrom"]) / 1e4, deltas, atol=1e-9)
    np.testing.assert_allclose(model["defocus_u_angstrom"] / 1e4, mean_um + deltas / 2, atol=1e-9)
    np.testing.assert_allclose(model["defocus_angle_deg"], [ts_w.get_tilt_defocus_angle(t) for t in keep], atol=1e-9)
