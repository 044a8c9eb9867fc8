"""Keeping a species' half-maps in one frame: translational registration, and the matching move of the poses.

A species' frame is a gauge: shifting its map and every particle the opposite way leaves every model image
unchanged, so nothing in the data pins it. Each half-set's frame starts where its starting half-map put it
and then drifts with that half's poses, each half its own way (strict gold standard). Two half-maps out of
register blur their average and lower their FSC, from which the next iteration takes its band; a drifting
map leaves its mask, and any model fitted into it, behind (measured: docs/physics.md §8, where the
abundant species' half-maps of the co-refinement test ended 1.0 px apart).

So after each reconstruction, each half-map is shifted onto the frame of the map the iteration started
from (the average of the two half-maps it refined against) and that half's particles are moved alike.
Only three numbers per half come from that shared map, at the working resolution. Rotations are not
registered: they added nothing where measured, and their estimates between halves were not consistent.

A shift ``s`` (pixels, x, y, z) moves a map ``V`` to ``V'(u) = V(u − s)``; with particle orientations ``A`` (map →
specimen) the same images come from positions ``x' = x − A s``.
"""

from __future__ import annotations

import torch

from .fourier import spatial_frequency_radius

__all__ = ["register_shift", "shift_map", "shift_poses", "symmetric_part"]


def _ramp(shape: tuple[int, int, int], shift_px: torch.Tensor) -> torch.Tensor:
    """``e^(−2πi k·s)`` on the rfft grid of a ``shape`` volume (``shift_px`` x, y, z; differentiable)."""
    d = shape[-1]
    f = torch.fft.fftfreq(d, device=shift_px.device, dtype=shift_px.dtype)
    fr = torch.fft.rfftfreq(d, device=shift_px.device, dtype=shift_px.dtype)
    phase = (fr * shift_px[0])[None, None, :] + (f * shift_px[1])[None, :, None] + (f * shift_px[2])[:, None, None]
    return torch.polar(torch.ones_like(phase), -2 * torch.pi * phase)


def shift_map(volume: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """``V'(u) = V(u − s)``, exactly (a phase ramp)."""
    s = shift_px.to(volume.device, torch.float64)
    out = torch.fft.irfftn(torch.fft.rfftn(volume.to(torch.float64)) * _ramp(volume.shape, s), s=volume.shape[-3:])
    return out.to(volume.dtype)


def shift_poses(positions_angstrom: torch.Tensor, orientations: torch.Tensor, shift_px: torch.Tensor,
                pixel_size_angstrom: float) -> torch.Tensor:
    """The positions that give the same images with the map shifted by ``shift_px``: ``x' = x − A s``.

    ``positions_angstrom`` ``(..., 3)`` and ``orientations`` ``(..., 3, 3)``, any batch shape (temporal samples
    included); orientations do not change.
    """
    s = shift_px.to(positions_angstrom.device, positions_angstrom.dtype) * pixel_size_angstrom
    return positions_angstrom - orientations.to(positions_angstrom.dtype) @ s


def symmetric_part(shift_px: torch.Tensor, operators: torch.Tensor) -> torch.Tensor:
    """The part of a shift that every operator ``(n, 3, 3)`` of a point group leaves unchanged: along a Cn axis,
    nothing for Dn, T, O and I. A symmetrised reconstruction is centred on the box's symmetry axes, so a
    symmetric species' frame can only move along them (the mean of the group's rotations projects onto that
    subspace)."""
    return operators.to(shift_px.dtype).mean(0) @ shift_px


def register_shift(moving: torch.Tensor, fixed: torch.Tensor, *, pixel_size_angstrom: float,
                   resolution_angstrom: float, iterations: int = 50) -> torch.Tensor:
    """The shift ``s`` (pixels, x, y, z) with ``moving(u − s)`` best matching ``fixed`` (same box).

    The correlation of the two transforms over the band up to ``resolution_angstrom`` (and never past
    Nyquist), maximised from its best whole-pixel value by L-BFGS, in float64.
    """
    moving, fixed = moving.to(torch.float64), fixed.to(torch.float64)
    d = fixed.shape[-1]
    radius = min(d * pixel_size_angstrom / resolution_angstrom, d / 2)
    band = spatial_frequency_radius(d, device=fixed.device, dtype=fixed.dtype) <= radius
    cross = torch.where(band, torch.fft.rfftn(fixed) * torch.fft.rfftn(moving).conj(), 0)
    # rfft stores kx > 0 once for two Friedel mates: count them twice
    weight = torch.full(band.shape, 2.0, dtype=fixed.dtype, device=fixed.device)
    weight[..., 0] = 1.0
    if d % 2 == 0:
        weight[..., -1] = 1.0
    c = torch.fft.irfftn(cross, s=fixed.shape)
    z, y, x = torch.unravel_index(torch.argmax(c), c.shape)
    wrap = lambda i: float(i - d if i > d // 2 else i)  # noqa: E731
    shift = torch.tensor([wrap(x), wrap(y), wrap(z)], dtype=torch.float64, device=fixed.device, requires_grad=True)
    opt = torch.optim.LBFGS([shift], max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        value = -(weight * (cross * _ramp(fixed.shape, shift).conj()).real).sum()
        value.backward()
        return value

    opt.step(closure)
    return shift.detach()
