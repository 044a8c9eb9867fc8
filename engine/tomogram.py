"""Tomograms from an item's tilt series and its current models: weighted back-projection, streamed in slabs.

Each tilt image is padded square, binned by Fourier cropping, phase-flipped
with its own CTF (defocus at the tomogram's centre: the defocus gradient
across a tilted image is not corrected), weighted by the engine's exposure
and tilt weighting, and ramp-filtered perpendicular to the tilt axis. Each
voxel is then placed in every tilt by the engine's own deformation model
(``particle_positions_in_tilts``: volume warp, stage rotation, shift, image
warp), so a tomogram is where refinement says the specimen is; the filtered
images are sampled there bilinearly and summed. Voxels are processed in
z-slabs sized to a memory budget, so a large tilt series fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .ctf import ctf_2d
from .extraction import angstrom_to_pixel
from .fourier import pad_center, rfft_frequencies_2d
from .records_io import ItemModel
from .tilt_model import particle_positions_in_tilts
from .weighting import dose_tilt_weights

__all__ = ["TomogramSettings", "filtered_tilts", "reconstruct_tomogram", "tomogram_shape", "voxel_centres"]

CTF_MODES = ("phase-flip", "none")


@dataclass(frozen=True)
class TomogramSettings:
    binning: int = 1
    ctf: str = "phase-flip"  # or "none"
    exposure_weighting: bool = True
    memory_budget_bytes: int = 512 * 1024**2  # for the per-slab sampling grids
    dtype: torch.dtype = torch.float32


def _tilt_axis_normal(geometry) -> torch.Tensor:
    """The unit image direction ``(2,)`` in which height moves a point: perpendicular to the tilt axis, read off
    the most tilted image (low tilts barely move a point)."""
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1000.0]], dtype=geometry.shifts_angstrom.dtype,
                       device=geometry.shifts_angstrom.device)
    xy, _ = particle_positions_in_tilts(geometry, pts)
    d = (xy[1] - xy[0]).to(torch.float64)  # (t, 2)
    big = int(torch.argmax(d.norm(dim=-1)))
    return d[big] / d[big].norm().clamp(min=1e-12)


def filtered_tilts(item: ItemModel, settings: TomogramSettings = TomogramSettings()) -> tuple[torch.Tensor, float]:
    """The tilt images ready to back-project ``(t, s, s)`` and their pixel size (Å), one tilt at a time (the
    padded spectra of a 4k stack would not fit)."""
    if settings.ctf not in CTF_MODES:
        raise ValueError(f"ctf must be one of {CTF_MODES}, not {settings.ctf!r}")
    t, h, w = item.stack.shape
    size = max(h, w) + max(h, w) % 2
    binned = max(2, size // settings.binning)
    binned -= binned % 2
    pixel = item.geometry.pixel_size_angstrom * size / binned
    device = item.stack.device
    ky, kx = rfft_frequencies_2d(binned, pixel, dtype=torch.float64, device=device)
    nyquist = 0.5 / pixel
    k = torch.hypot(kx, ky) / nyquist  # cosine roll-off from 0.9 Nyquist: no ringing from the cut
    taper = torch.where(k < 0.9, 1.0, 0.5 + 0.5 * torch.cos(math.pi * ((k - 0.9) / 0.1).clamp(0, 1)))
    normal = _tilt_axis_normal(item.geometry)
    ramp_taper = ((kx * normal[0] + ky * normal[1]).abs() / nyquist + 1.0 / t) * taper  # the same for every tilt
    im = item.imaging
    out = torch.empty((t, binned, binned), dtype=settings.dtype, device=device)
    for i in range(t):
        image = item.stack[i].to(settings.dtype)
        spectrum = torch.fft.rfft2(pad_center(image - image.mean(), size))
        rows = torch.fft.fftshift(spectrum, dim=-2).narrow(-2, size // 2 - binned // 2, binned)
        spectrum = torch.fft.ifftshift(rows, dim=-2)[..., :binned // 2 + 1]  # binned: the central frequencies
        weight = ramp_taper
        if settings.ctf == "phase-flip":
            weight = weight * torch.sign(ctf_2d(im.defocus_u_angstrom[i], im.defocus_v_angstrom[i],
                                                im.defocus_angle_deg[i], voltage_kv=im.voltage_kv,
                                                spherical_aberration_mm=im.spherical_aberration_mm,
                                                amplitude_contrast=im.amplitude_contrast, pixel_size_angstrom=pixel,
                                                size=binned)).to(torch.float64)
        if settings.exposure_weighting:
            weight = weight * dose_tilt_weights(item.pre_exposure[i:i + 1], item.exposure[i:i + 1],
                                                item.geometry.tilt_angles_deg[i:i + 1], size=binned,
                                                pixel_size_angstrom=pixel)[0].to(torch.float64)
        out[i] = torch.fft.irfft2(spectrum * weight.to(spectrum.real.dtype), s=(binned, binned)) / t
    return out, pixel


def tomogram_shape(tomogram_size_px: list[int], binning: int) -> tuple[int, int, int]:
    """(z, y, x) voxels of the binned tomogram."""
    x, y, z = (max(1, math.ceil(n / binning)) for n in tomogram_size_px)
    return z, y, x


def voxel_centres(n: int, voxel: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """Å from the tomogram centre of voxel indices 0..n-1 (index n // 2 at the centre)."""
    return (torch.arange(n, dtype=dtype, device=device) - n // 2) * voxel


def reconstruct_tomogram(item: ItemModel, tomogram_size_px: list[int], settings: TomogramSettings = TomogramSettings(),
                         progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, float]:
    """The tomogram ``(z, y, x)`` and its voxel size (Å), in slabs of z, on the item's device."""
    images, pixel = filtered_tilts(item, settings)
    t, s, _ = images.shape
    nz, ny, nx = tomogram_shape(tomogram_size_px, settings.binning)
    voxel = item.geometry.pixel_size_angstrom * settings.binning
    device = images.device
    xs, ys, zs = (voxel_centres(n, voxel, device=device) for n in (nx, ny, nz))
    plane = nx * ny
    per_plane = plane * t * 2 * 8 * 3  # positions, pixel coordinates and sampling grid, float64
    slab = max(1, min(nz, settings.memory_budget_bytes // per_plane))
    out = torch.empty((nz, ny, nx), dtype=settings.dtype, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    source = images[:, None]  # (t, 1, s, s)
    for z0 in range(0, nz, slab):
        z = zs[z0:z0 + slab]
        pos = torch.stack([gx.expand(len(z), ny, nx), gy.expand(len(z), ny, nx),
                           z[:, None, None].expand(len(z), ny, nx)], dim=-1).reshape(-1, 3)
        xy, _ = particle_positions_in_tilts(item.geometry, pos.to(item.geometry.shifts_angstrom.dtype))
        px = angstrom_to_pixel(xy.to(torch.float64), pixel, (s, s))  # (n, t, 2) in the binned image
        grid = (2 * px + 1) / s - 1  # align_corners=False: pixel i covers [-1 + 2i/s, -1 + 2(i+1)/s]
        grid = grid.permute(1, 0, 2)[:, None].to(images.dtype)  # (t, 1, n, 2)
        sampled = torch.nn.functional.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                                                  align_corners=False)  # (t, 1, 1, n)
        out[z0:z0 + len(z)] = sampled.sum(dim=0).reshape(len(z), ny, nx)
        if progress:
            progress(min(z0 + slab, nz), nz)
    return out, voxel
