"""Fourier-space helpers: frequency grids, sub-pixel shifts, cropping and padding.

Layout: images ``(..., h, w)``, their rfft ``(..., h, w // 2 + 1)`` un-shifted
(DC at index 0). Frequencies are in cycles per Å unless named ``_px``.
"""

from __future__ import annotations

import torch

__all__ = ["rfft_frequencies_2d", "fftn_frequencies_3d", "fourier_shift_2d", "crop_center", "pad_center",
           "spatial_frequency_shells", "fourier_resample"]


def rfft_frequencies_2d(size: int, pixel_size_angstrom: float, *, device=None, dtype=torch.float32):
    """``(ky, kx)`` each ``(size, size // 2 + 1)`` in 1/Å for a square image's rfft."""
    fy = torch.fft.fftfreq(size, d=pixel_size_angstrom, device=device, dtype=dtype)
    fx = torch.fft.rfftfreq(size, d=pixel_size_angstrom, device=device, dtype=dtype)
    return torch.meshgrid(fy, fx, indexing="ij")


def fftn_frequencies_3d(size: int, *, device=None, dtype=torch.float32):
    """``(kz, ky, kx)`` each ``(size, size, size)`` in cycles per pixel, un-shifted."""
    f = torch.fft.fftfreq(size, device=device, dtype=dtype)
    return torch.meshgrid(f, f, f, indexing="ij")


def fourier_shift_2d(image_rfft: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Shift images by ``shift_px`` ``(..., 2)`` = (dx, dy) pixels (content moves to +x, +y).

    Differentiable in the shift; ``image_rfft`` is ``(..., h, w // 2 + 1)`` of square ``h x h`` images.
    """
    h = image_rfft.shape[-2]
    ky, kx = rfft_frequencies_2d(h, 1.0, device=image_rfft.device, dtype=shift_px.dtype)
    phase = -2 * torch.pi * (kx * shift_px[..., 0, None, None] + ky * shift_px[..., 1, None, None])
    return image_rfft * torch.polar(torch.ones_like(phase), phase)


def crop_center(x: torch.Tensor, size: int, dims: int = 2) -> torch.Tensor:
    """The central ``size`` along each of the last ``dims`` axes (centre at index n // 2 kept at size // 2)."""
    for d in range(-dims, 0):
        n = x.shape[d]
        start = n // 2 - size // 2
        x = x.narrow(d, start, size)
    return x


def pad_center(x: torch.Tensor, size: int, dims: int = 2, value: float = 0.0) -> torch.Tensor:
    """Zero-pad the last ``dims`` axes to ``size``, keeping index n // 2 at size // 2."""
    pads = []
    for d in range(-1, -dims - 1, -1):
        n = x.shape[d]
        before = size // 2 - n // 2
        pads += [before, size - n - before]
    return torch.nn.functional.pad(x, pads, value=value)


def spatial_frequency_radius(size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``|k| · size`` (in shells, not rounded) of each rfft voxel of a ``size³`` volume."""
    f = torch.fft.fftfreq(size, device=device, dtype=dtype) * size
    fr = torch.fft.rfftfreq(size, device=device, dtype=dtype) * size
    kz, ky, kx = torch.meshgrid(f, f, fr, indexing="ij")
    return torch.sqrt(kz**2 + ky**2 + kx**2)


def spatial_frequency_shells(size: int, *, device=None) -> torch.Tensor:
    """Integer shell index ``round(|k| · size)`` of each rfft voxel of a ``size³`` volume."""
    return spatial_frequency_radius(size, device=device).round().long()


def fourier_resample(volume: torch.Tensor, size: int) -> torch.Tensor:
    """A cubic volume resampled to ``size`` voxels per edge over the same extent (Fourier crop or zero-pad);
    values keep their scale."""
    d = volume.shape[-1]
    if size == d:
        return volume
    spectrum = torch.fft.fftshift(torch.fft.fftn(volume), dim=(-3, -2, -1))
    spectrum = crop_center(spectrum, size, dims=3) if size < d else pad_center(spectrum, size, dims=3)
    out = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-3, -2, -1))).real
    return out * (size / d) ** 3
