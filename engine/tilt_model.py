"""The per-item model: where each particle lands in each tilt, at which orientation and defocus.

This is M's tilt-series deformation and imaging model (digest §2.3–2.4) as a
pure function of tensors, differentiable in every parameter:

    r_i  = r + V(r, i)                                 volume warp, anchored in the specimen
    xy_i = (R_i r_i)_xy + shift_i + W(xy_i, i)         stage rotation, global shift, image warp
    z_i  = (R_i r_i)_z                                 height → defocus_i + z_i
    A_i  = R_i · A_p                                   particle orientation in the tilt

A particle's ``r`` and ``A_p`` are either fixed or trajectories over the
accumulated exposure (``trajectories``), sampled at each tilt's dose time.

``R_i`` comes from ``geometry.tilt_rotations`` (stage tilt, stage-angle
corrections, tilt axis). The warps are cubic B-spline grids
(``splines``): the image warp ``W`` has 2 channels (dx, dy in Å) over
(tilt, y, x) in image coordinates; the volume warp ``V`` has 3 channels
(dx, dy, dz in Å) over (time, z, y, x) in specimen coordinates, time being
the accumulated exposure normalised to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .geometry import (particle_orientations_in_tilts, project_to_tilts, rotation_x, rotation_y, rotation_z,
                       tilt_rotations)
from .splines import interpolate_bspline_grid
from .trajectories import orientations_at, positions_at

__all__ = ["TiltGeometry", "Imaging", "particle_positions_in_tilts", "particle_rotations_in_tilts",
           "particle_defocus", "image_warp_rotation_deg"]


@dataclass
class TiltGeometry:
    """Everything that decides where a specimen point appears in each tilt image."""

    tilt_angles_deg: torch.Tensor  # (t,)
    tilt_axis_angle_deg: float
    shifts_angstrom: torch.Tensor  # (t, 2)
    angle_corrections_deg: torch.Tensor  # (t, 3)
    image_size_px: tuple[int, int]  # (h, w)
    tomogram_size_angstrom: tuple[float, float, float]  # x, y, z extent
    pixel_size_angstrom: float
    dose_time: torch.Tensor  # (t,) accumulated exposure of each tilt, normalised to [0, 1]
    image_warp: torch.Tensor | None = None  # (2, t, gy, gx) Å
    volume_warp: torch.Tensor | None = None  # (3, gt, gz, gy, gx) Å
    orientation_corrections_deg: torch.Tensor | None = None  # (t, 3): x, y, z, orientations only (Warp's GridAngle)
    extra: dict = field(default_factory=dict)

    @property
    def n_tilts(self) -> int:
        return self.tilt_angles_deg.shape[0]

    def rotations(self) -> torch.Tensor:
        return tilt_rotations(self.tilt_angles_deg, self.tilt_axis_angle_deg, self.angle_corrections_deg)

    def orientation_rotations(self) -> torch.Tensor:
        """The rotations that turn particle *orientations*: ``Rz Ry Rx`` (the corrections) · ``R_i``."""
        r = self.rotations()
        if self.orientation_corrections_deg is None:
            return r
        x, y, z = self.orientation_corrections_deg.to(r.dtype).unbind(-1)
        return rotation_z(z) @ rotation_y(y) @ rotation_x(x) @ r

    def with_(self, **changes) -> "TiltGeometry":
        return replace(self, **changes)


@dataclass
class Imaging:
    """Per-tilt CTF parameters and the optics they share."""

    defocus_u_angstrom: torch.Tensor  # (t,)
    defocus_v_angstrom: torch.Tensor  # (t,)
    defocus_angle_deg: torch.Tensor  # (t,)
    voltage_kv: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    handedness: float = 1.0  # RELION's rlnTomoHand: defocus = tilt defocus + handedness × height


def _per_tilt(geom: TiltGeometry, positions: torch.Tensor) -> torch.Tensor:
    """Positions ``(n, 3)`` or trajectories ``(n, T, 3)`` → each particle's position in each tilt ``(n, t, 3)``."""
    if positions.dim() == 3:
        return positions_at(positions, geom.dose_time.to(positions.device))
    return positions[:, None, :].expand(positions.shape[0], geom.n_tilts, 3)


def _volume_warp(geom: TiltGeometry, positions: torch.Tensor) -> torch.Tensor:
    """Per-tilt positions ``(n, t, 3)`` → warped by the volume warp at their own place and dose time."""
    if geom.volume_warp is None:
        return positions
    n, t = positions.shape[:2]
    size = torch.tensor(geom.tomogram_size_angstrom, dtype=positions.dtype, device=positions.device)
    u_xyz = (positions / size + 0.5).clamp(0, 1)  # (n, t, 3) x, y, z in [0, 1]
    u = torch.cat([geom.dose_time.to(positions.dtype)[None, :, None].expand(n, t, 1),
                   u_xyz.flip(-1)], dim=-1)  # (n, t, 4): time, z, y, x
    return positions + interpolate_bspline_grid(geom.volume_warp, u)


def _image_warp(geom: TiltGeometry, xy: torch.Tensor) -> torch.Tensor:
    """Image warp displacement ``(n, t, 2)`` at image positions ``xy`` ``(n, t, 2)`` Å from the centre."""
    if geom.image_warp is None:
        return torch.zeros_like(xy)
    h, w = geom.image_size_px
    extent = torch.tensor([w, h], dtype=xy.dtype, device=xy.device) * geom.pixel_size_angstrom
    uv = (xy / extent + 0.5).clamp(0, 1)  # x, y in [0, 1]
    t = geom.n_tilts
    ti = torch.arange(t, dtype=xy.dtype, device=xy.device) / max(t - 1, 1)
    u = torch.cat([ti[None, :, None].expand(xy.shape[0], t, 1), uv.flip(-1)], dim=-1)  # (tilt, y, x)
    return interpolate_bspline_grid(geom.image_warp, u)


def image_warp_rotation_deg(geom: TiltGeometry, samples: int = 9) -> torch.Tensor:
    """The in-plane rotation ``(t,)`` (degrees, like ωz) that each tilt's image warp carries, least squares.

    A rotation of a whole tilt image moves every particle alike whatever their heights, so the data
    cannot tell the stage-angle correction about the beam axis (ωz) from the same rotation held by
    the warp grid: only their sum is measurable, and comparisons with a truth use the sum.
    """
    t = geom.n_tilts
    if geom.image_warp is None:
        return geom.angle_corrections_deg.new_zeros(t)
    h, w = geom.image_size_px
    dt = geom.image_warp.dtype
    gx = (torch.linspace(-0.5, 0.5, samples, dtype=dt, device=geom.image_warp.device) * w * geom.pixel_size_angstrom)
    gy = (torch.linspace(-0.5, 0.5, samples, dtype=dt, device=geom.image_warp.device) * h * geom.pixel_size_angstrom)
    xy = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).reshape(-1, 1, 2).expand(-1, t, 2)
    d = _image_warp(geom, xy)  # (n, t, 2)
    x, y = xy.unbind(-1)
    omega = ((x * d[..., 1] - y * d[..., 0]).sum(0) / (x**2 + y**2).sum(0))  # rad: d = ω (−y, x)
    return torch.rad2deg(omega)


def particle_positions_in_tilts(geom: TiltGeometry, positions_angstrom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Specimen positions (Å from the tomogram centre) → image ``xy`` ``(n, t, 2)`` Å, heights ``(n, t)``.

    ``positions_angstrom`` is ``(n, 3)`` or a trajectory ``(n, T, 3)`` over dose (``trajectories``).
    """
    warped = _volume_warp(geom, _per_tilt(geom, positions_angstrom))
    xy, z = project_to_tilts(warped, geom.rotations(), geom.shifts_angstrom)
    return xy + _image_warp(geom, xy), z


def particle_rotations_in_tilts(geom: TiltGeometry, orientations: torch.Tensor) -> torch.Tensor:
    """``(n, 3, 3)`` particle matrices (or trajectories ``(n, T, 3, 3)``) → ``(n, t, 3, 3)`` map → image rotations."""
    if orientations.dim() == 4:
        return geom.orientation_rotations() @ orientations_at(orientations, geom.dose_time.to(orientations.device))
    return particle_orientations_in_tilts(orientations, geom.orientation_rotations())


def particle_defocus(imaging: Imaging, heights_angstrom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per particle-tilt defocus U, V (Å) and angle from the tilt's defocus plus the particle's height."""
    dz = imaging.handedness * heights_angstrom
    return (imaging.defocus_u_angstrom + dz, imaging.defocus_v_angstrom + dz,
            imaging.defocus_angle_deg.expand_as(heights_angstrom))
