"""Sub-pixel extraction of particle images from tilt images (differentiable in the positions).

Each box is cut around the nearest pixel (zero outside the image) and then
shifted by the fractional remainder with a Fourier phase ramp, so the particle
centre lands exactly on pixel ``box // 2``. Transforms are returned with the
box centre at the origin (``rfft2(ifftshift(box))``), the convention of the
projector's slices, so the two compare directly. Gradients flow through the
fractional shift, which is what a local optimiser needs.
"""

from __future__ import annotations

import torch

from .fourier import fourier_shift_2d

__all__ = ["extract_boxes", "angstrom_to_pixel"]


def angstrom_to_pixel(xy_angstrom: torch.Tensor, pixel_size_angstrom: float, image_shape: tuple[int, int]):
    """Å from the image centre → pixel coordinates (x, y) with the centre at (w // 2, h // 2)."""
    h, w = image_shape
    centre = torch.tensor([w // 2, h // 2], dtype=xy_angstrom.dtype, device=xy_angstrom.device)
    return xy_angstrom / pixel_size_angstrom + centre


def extract_boxes(images: torch.Tensor, positions_px: torch.Tensor, box: int) -> torch.Tensor:
    """Boxes centred on ``positions_px``: images ``(t, h, w)``, positions ``(..., t, 2)`` (x, y)
    → rfft of the boxes ``(..., t, box, box // 2 + 1)``."""
    t, h, w = images.shape
    batch = positions_px.shape[:-2]
    pos = positions_px.reshape(-1, t, 2)
    centre = torch.round(pos.detach())
    frac = pos - centre
    offs = torch.arange(box, device=images.device) - box // 2
    ys = centre[..., 1].long()[..., None] + offs  # (n, t, box)
    xs = centre[..., 0].long()[..., None] + offs
    valid = ((ys >= 0) & (ys < h))[..., :, None] & ((xs >= 0) & (xs < w))[..., None, :]
    yi, xi = ys.clamp(0, h - 1), xs.clamp(0, w - 1)
    tile = torch.arange(t, device=images.device)[None, :, None, None]
    boxes = images[tile, yi[..., :, None], xi[..., None, :]] * valid
    ft = torch.fft.rfft2(torch.fft.ifftshift(boxes, dim=(-2, -1)))  # box centre at the origin, as projections
    ft = fourier_shift_2d(ft, -frac)
    return ft.reshape(*batch, t, box, box // 2 + 1)
