"""Geometry against RELION's own formula (transcribed here) and the eulerangles package."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from eulerangles import euler2matrix
from scipy.spatial.transform import Rotation

from cryopool.engine.geometry import (degrees_between, euler_zyz_to_matrix, matrix_to_euler_zyz,
                                      particle_orientations_in_tilts, project_to_tilts, tilt_rotations)


def relion_euler_angles2matrix(rot, tilt, psi):
    """RELION src/euler.cpp Euler_angles2matrix, transcribed line by line."""
    alpha, beta, gamma = map(math.radians, (rot, tilt, psi))
    ca, sa = math.cos(alpha), math.sin(alpha)
    cb, sb = math.cos(beta), math.sin(beta)
    cg, sg = math.cos(gamma), math.sin(gamma)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
                     [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
                     [sc, ss, cb]])


ANGLES = np.random.default_rng(0).uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))


def test_euler_matches_relion_formula():
    ours = euler_zyz_to_matrix(torch.tensor(ANGLES, dtype=torch.float64)).numpy()
    for a, m in zip(ANGLES, ours):
        np.testing.assert_allclose(m, relion_euler_angles2matrix(*a), atol=1e-12)


def test_euler_matches_eulerangles_relion_meta():
    # eulerangles' RELION meta: zyz, intrinsic, right-handed, passive -> transpose of the active matrix
    active = euler2matrix(ANGLES, axes="zyz", intrinsic=True, right_handed_rotation=True)
    ours = euler_zyz_to_matrix(torch.tensor(ANGLES, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, np.transpose(active, (0, 2, 1)), atol=1e-12)


def test_matrix_to_euler_round_trip():
    m = euler_zyz_to_matrix(torch.tensor(ANGLES, dtype=torch.float64))
    back = euler_zyz_to_matrix(matrix_to_euler_zyz(m))
    assert degrees_between(m, back).max() < 1e-6
    gimbal = torch.tensor([[30.0, 0.0, 20.0], [10.0, 180.0, 5.0]], dtype=torch.float64)
    assert degrees_between(euler_zyz_to_matrix(gimbal), euler_zyz_to_matrix(matrix_to_euler_zyz(
        euler_zyz_to_matrix(gimbal)))).max() < 1e-6


def test_tilt_projection_by_hand():
    # a point 100 Å along x, tilted by 30° about y: x' = 100 cos30, z' = -100 sin30
    tilts = torch.tensor([0.0, 30.0], dtype=torch.float64)
    r = tilt_rotations(tilts, 0.0)
    xy, z = project_to_tilts(torch.tensor([[100.0, 20.0, 0.0]], dtype=torch.float64), r)
    np.testing.assert_allclose(xy[0].numpy(), [[100, 20], [100 * math.cos(math.pi / 6), 20]], atol=1e-9)
    np.testing.assert_allclose(z[0].numpy(), [0, -50], atol=1e-9)
    # tilt axis at 90°: the image turns by 90° in-plane
    xy90, _ = project_to_tilts(torch.tensor([[100.0, 0.0, 0.0]], dtype=torch.float64), tilt_rotations(tilts, 90.0))
    np.testing.assert_allclose(xy90[0, 0].numpy(), [0, 100], atol=1e-9)
    # shifts add in the image plane; a height of +50 Å above the tilt axis stays +50 at 0°
    xy_s, z_s = project_to_tilts(torch.tensor([0.0, 0.0, 50.0], dtype=torch.float64), r,
                                 torch.tensor([[5.0, -5.0], [1.0, 2.0]], dtype=torch.float64))
    np.testing.assert_allclose(xy_s[0].numpy(), [5.0, -5.0])
    np.testing.assert_allclose(z_s.numpy(), [50.0, 50 * math.cos(math.pi / 6)], atol=1e-9)


def test_angle_corrections_compose_as_documented():
    tilts = torch.tensor([10.0], dtype=torch.float64)
    corr = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    r = tilt_rotations(tilts, 5.0, corr)[0].numpy()
    # RELION 5: Rz(rlnTomoZRot) Ry(rlnTomoYTilt) Rx(rlnTomoXTilt), active right-handed rotations
    expect = (Rotation.from_euler("z", 5 + 3, degrees=True) * Rotation.from_euler("y", 10 + 2, degrees=True)
              * Rotation.from_euler("x", 1, degrees=True)).as_matrix()
    np.testing.assert_allclose(r, expect, atol=1e-12)


def test_trajectories_and_orientations_shapes():
    r = tilt_rotations(torch.linspace(-60, 60, 5), 0.0)
    traj = torch.zeros(7, 5, 3)
    xy, z = project_to_tilts(traj, r)
    assert xy.shape == (7, 5, 2) and z.shape == (7, 5)
    o = particle_orientations_in_tilts(euler_zyz_to_matrix(torch.zeros(7, 3)), r)
    assert o.shape == (7, 5, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_flow(dtype):
    angles = torch.tensor([[10.0, 20.0, 30.0]], dtype=dtype, requires_grad=True)
    euler_zyz_to_matrix(angles).sum().backward()
    assert torch.isfinite(angles.grad).all()


def test_rotvec_matches_scipy_and_is_smooth_at_zero():
    from cryopool.engine.geometry import rotvec_to_matrix
    rng = np.random.default_rng(4)
    v = rng.normal(scale=20, size=(20, 3))
    np.testing.assert_allclose(rotvec_to_matrix(torch.tensor(v)).numpy(),
                               Rotation.from_rotvec(v, degrees=True).as_matrix(), atol=1e-12)
    z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    rotvec_to_matrix(z)[0, 0, 1].backward()
    assert torch.isfinite(z.grad).all() and z.grad[0, 2].item() == pytest.approx(-math.pi / 180)


def test_an_image_warp_that_rotates_the_image_reads_as_a_rotation_about_the_beam_axis():
    """A warp grid holding a rigid in-plane rotation by δ moves particles as ωz = δ does (to first order in δ),
    and ``image_warp_rotation_deg`` reads δ back: the quantity the truth comparison adds to ωz."""
    from dataclasses import replace

    from cryopool.engine.tilt_model import TiltGeometry, image_warp_rotation_deg, particle_positions_in_tilts

    t, delta = 5, 0.05
    geom = TiltGeometry(tilt_angles_deg=torch.linspace(-40, 40, t, dtype=torch.float64), tilt_axis_angle_deg=80.0,
                        shifts_angstrom=torch.zeros(t, 2, dtype=torch.float64),
                        angle_corrections_deg=torch.zeros(t, 3, dtype=torch.float64), image_size_px=(100, 120),
                        tomogram_size_angstrom=(1200.0, 1000.0, 400.0), pixel_size_angstrom=10.0,
                        dose_time=torch.linspace(0, 1, t, dtype=torch.float64))
    # control point j of a dimension with n points sits at u = j / (n − 1) across the image
    gx = (torch.linspace(0, 1, 4, dtype=torch.float64) - 0.5) * 1200.0
    gy = (torch.linspace(0, 1, 3, dtype=torch.float64) - 0.5) * 1000.0
    y, x = torch.meshgrid(gy, gx, indexing="ij")
    w = math.radians(delta)
    field = torch.stack([-w * y, w * x])  # (2, gy, gx): the displacement of a rotation by δ
    warped = replace(geom, image_warp=field[:, None].expand(2, t, 3, 4).clone())
    assert torch.allclose(image_warp_rotation_deg(warped), torch.full((t,), delta, dtype=torch.float64), atol=1e-9)
    rotated = replace(geom, angle_corrections_deg=torch.tensor([[0.0, 0.0, delta]] * t, dtype=torch.float64))
    pts = torch.tensor(np.random.default_rng(0).uniform(-300, 300, (30, 3)), dtype=torch.float64)
    a, _ = particle_positions_in_tilts(warped, pts)
    b, _ = particle_positions_in_tilts(rotated, pts)
    moved = (b - particle_positions_in_tilts(geom, pts)[0]).norm(dim=-1).max()
    assert moved > 0.3 and (a - b).norm(dim=-1).max() < 0.01 * moved  # inside the image; the δ² remainder is tiny
    assert torch.equal(image_warp_rotation_deg(geom), torch.zeros(t, dtype=torch.float64))
