"""Geometry of particles in tilt series: Euler angles, tilt projection, per-tilt positions and defocus.

Conventions (docs/physics.md has them with a worked example):

* Rotation matrices left-multiply column vectors (x, y, z), shape ``(..., 3, 3)``.
* ``euler_zyz_to_matrix(rot, tilt, psi)`` is RELION's ``Euler_angles2matrix``:
  ``A = Rz(-psi) Ry(-tilt) Rz(-rot)``.  ``A`` rotates the reference (map) into
  the particle's orientation: a map point ``r`` appears at ``A r`` in the
  tomogram frame, and the particle's projection samples the map's Fourier
  transform at ``Aᵀ (kx, ky, 0)``.
* Tomogram (specimen) frame: x, y in the grid plane, z towards the electron
  source, origin at the tomogram centre, lengths in Å.
* Tilt ``i`` (RELION 5's order, docs/conventions.md): the specimen turns
  about x by the correction ``ωx`` (specimen pre-tilt), about y by the stage
  tilt plus its correction, then the image turns in-plane by the tilt-axis
  angle plus its correction:
  ``R_i = Rz(axis + ωz_i) · Ry(θ_i + ωy_i) · Rx(ωx_i)``, i.e. RELION's
  ``rlnTomoZRot``, ``rlnTomoYTilt``, ``rlnTomoXTilt``.  A specimen point ``r``
  projects to image position ``(R_i r)_xy + shift_i`` (Å from the image
  centre) and sits at height ``z_i = (R_i r)_z``; its defocus in that tilt is
  ``defocus_i + z_i`` (positive = underfocus: points nearer the source are
  farther from focus).
"""

from __future__ import annotations

import torch

__all__ = [
    "rotation_x", "rotation_y", "rotation_z", "euler_zyz_to_matrix", "matrix_to_euler_zyz", "tilt_rotations",
    "project_to_tilts", "particle_orientations_in_tilts", "degrees_between", "rotvec_to_matrix",
    "matrix_to_rotvec",
]


def _rot(angle_deg: torch.Tensor, axis: int) -> torch.Tensor:
    a = torch.deg2rad(torch.as_tensor(angle_deg))
    c, s = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if axis == 0:
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == 1:
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def rotation_x(angle_deg: torch.Tensor) -> torch.Tensor:
    """Active right-handed rotation about x; ``(...,)`` degrees → ``(..., 3, 3)``."""
    return _rot(angle_deg, 0)


def rotation_y(angle_deg: torch.Tensor) -> torch.Tensor:
    """Active right-handed rotation about y; ``(...,)`` degrees → ``(..., 3, 3)``."""
    return _rot(angle_deg, 1)


def rotation_z(angle_deg: torch.Tensor) -> torch.Tensor:
    """Active right-handed rotation about z; ``(...,)`` degrees → ``(..., 3, 3)``."""
    return _rot(angle_deg, 2)


def euler_zyz_to_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """RELION's rotation matrix from ``(..., 3)`` (rot, tilt, psi) in degrees → ``(..., 3, 3)``."""
    rot, tilt, psi = angles_deg.unbind(-1)
    return rotation_z(-psi) @ rotation_y(-tilt) @ rotation_z(-rot)


def matrix_to_euler_zyz(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`euler_zyz_to_matrix` (tilt in [0, 180]); ``(..., 3, 3)`` → ``(..., 3)`` degrees."""
    a = matrices
    tilt = torch.atan2(torch.sqrt(a[..., 2, 0] ** 2 + a[..., 2, 1] ** 2), a[..., 2, 2])
    gimbal = torch.sqrt(a[..., 2, 0] ** 2 + a[..., 2, 1] ** 2) < 1e-6
    rot = torch.where(gimbal, torch.zeros_like(tilt), torch.atan2(a[..., 2, 1], a[..., 2, 0]))
    # at tilt 0 or 180 only rot ± psi is defined: put it all in psi
    psi_gimbal = torch.atan2(a[..., 0, 1], a[..., 0, 0] * torch.sign(a[..., 2, 2]))
    psi = torch.where(gimbal, psi_gimbal, torch.atan2(a[..., 1, 2], -a[..., 0, 2]))
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))


def tilt_rotations(tilt_angles_deg: torch.Tensor, tilt_axis_angle_deg: float | torch.Tensor,
                   angle_corrections_deg: torch.Tensor | None = None) -> torch.Tensor:
    """Specimen → image-frame rotation of every tilt, ``(n_tilts,)`` → ``(n_tilts, 3, 3)``.

    ``angle_corrections_deg`` ``(n_tilts, 3)``: corrections about x, y, z, so that
    ``R_i = Rz(axis + ωz) Ry(θ_i + ωy) Rx(ωx)``.
    """
    theta = torch.as_tensor(tilt_angles_deg)
    axis = torch.as_tensor(tilt_axis_angle_deg, dtype=theta.dtype, device=theta.device).expand_as(theta)
    if angle_corrections_deg is None:
        return rotation_z(axis) @ rotation_y(theta)
    wx, wy, wz = angle_corrections_deg.unbind(-1)
    return rotation_z(axis + wz) @ rotation_y(theta + wy) @ rotation_x(wx)


def project_to_tilts(positions_angstrom: torch.Tensor, rotations: torch.Tensor,
                     shifts_angstrom: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image positions and heights of specimen points in every tilt.

    ``positions_angstrom`` ``(..., 3)`` (or ``(..., n_tilts, 3)`` for trajectories),
    ``rotations`` ``(n_tilts, 3, 3)``, ``shifts_angstrom`` ``(n_tilts, 2)``.
    Returns ``xy`` ``(..., n_tilts, 2)`` in Å from the image centre and ``z``
    ``(..., n_tilts)`` in Å (add to the tilt's defocus for the local defocus).
    """
    p = positions_angstrom
    if p.dim() < 2 or p.shape[-2] != rotations.shape[0]:
        p = p.unsqueeze(-2)
    r = torch.einsum("tij,...tj->...ti", rotations, p.expand(*p.shape[:-2], rotations.shape[0], 3))
    xy = r[..., :2]
    if shifts_angstrom is not None:
        xy = xy + shifts_angstrom
    return xy, r[..., 2]


def particle_orientations_in_tilts(orientations: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Map → image-frame rotation of each particle in each tilt: ``R_i · A_p``.

    ``orientations`` ``(..., 3, 3)`` particle matrices, ``rotations`` ``(n_tilts, 3, 3)``
    → ``(..., n_tilts, 3, 3)``.
    """
    return rotations @ orientations.unsqueeze(-3)


def rotvec_to_matrix(rotvec_deg: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation vectors ``(..., 3)`` (axis × angle in degrees) → ``(..., 3, 3)``; smooth at 0."""
    v = torch.deg2rad(rotvec_deg)
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]
    theta = torch.sqrt(theta2 + 1e-30)
    small = theta2 < 1e-12
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / (theta2 + 1e-30))
    zero = torch.zeros_like(v[..., 0])
    k = torch.stack([torch.stack([zero, -v[..., 2], v[..., 1]], -1),
                     torch.stack([v[..., 2], zero, -v[..., 0]], -1),
                     torch.stack([-v[..., 1], v[..., 0], zero], -1)], -2)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def matrix_to_rotvec(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotvec_to_matrix` for rotations below 180°: ``(..., 3, 3)`` → ``(..., 3)`` degrees."""
    m = matrices
    v = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    sin = torch.linalg.vector_norm(v, dim=-1) / 2
    cos = (m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    theta = torch.atan2(sin, cos)
    small = sin < 1e-8
    factor = torch.where(small, 0.5 + theta**2 / 12, theta / (2 * torch.where(small, torch.ones_like(sin), sin)))
    return torch.rad2deg(factor[..., None] * v)


def degrees_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle of the rotation taking ``a`` to ``b`` (``(..., 3, 3)`` each), in degrees."""
    m = a.transpose(-1, -2) @ b
    cos = (m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    v = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    return torch.rad2deg(torch.atan2(torch.linalg.vector_norm(v, dim=-1) / 2, cos))  # precise near 0 and 180

