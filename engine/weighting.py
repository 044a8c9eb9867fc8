"""Exposure and tilt weighting of particle images.

Default (RELION 1.4 heuristic, used by M): a B-factor that grows by 4 Å² per
e⁻/Å² of accumulated exposure (at the middle of each tilt's own exposure),
times cos(tilt). The amplitude weight of a B-factor is ``exp(−B k² / 4)``.
An anisotropic 2-D form ``(B_x, B_y, angle)`` is ready for data-driven weights.
"""

from __future__ import annotations

import math

import torch

from .fourier import rfft_frequencies_2d

__all__ = ["dose_tilt_weights", "anisotropic_bfactor_weights", "exposure_crop_frequency", "mid_exposure", "exposure_weight"]


def mid_exposure(pre_exposure: torch.Tensor, exposure: torch.Tensor) -> torch.Tensor:
    """Accumulated dose at the middle of each tilt's exposure (e⁻/Å²)."""
    return pre_exposure + 0.5 * exposure


def exposure_weight(pre_exposure: torch.Tensor, exposure: torch.Tensor, k2: torch.Tensor, *,
                    bfactor_per_dose: float = 4.0) -> torch.Tensor:
    """``exp(−B k² / 4)`` with ``B = bfactor_per_dose ×`` the mid-exposure dose; ``k2`` in 1/Å², broadcast."""
    return torch.exp(-bfactor_per_dose * mid_exposure(pre_exposure, exposure) * k2 / 4)


def dose_tilt_weights(pre_exposure: torch.Tensor, exposure: torch.Tensor, tilt_angles_deg: torch.Tensor, *,
                      size: int, pixel_size_angstrom: float, bfactor_per_dose: float = 4.0,
                      cos_tilt: bool = True) -> torch.Tensor:
    """``(n_tilts,)`` → ``(n_tilts, size, size // 2 + 1)`` amplitude weights in rfft layout."""
    ky, kx = rfft_frequencies_2d(size, pixel_size_angstrom, device=pre_exposure.device, dtype=pre_exposure.dtype)
    w = exposure_weight(pre_exposure[:, None, None], exposure[:, None, None], kx**2 + ky**2,
                        bfactor_per_dose=bfactor_per_dose)
    if cos_tilt:
        w = w * torch.cos(torch.deg2rad(tilt_angles_deg)).clamp(min=0)[:, None, None]
    return w


def anisotropic_bfactor_weights(bx: torch.Tensor, by: torch.Tensor, angle_deg: torch.Tensor, scale: torch.Tensor,
                                *, size: int, pixel_size_angstrom: float) -> torch.Tensor:
    """``scale · exp(−(B_u k_u² + B_v k_v²) / 4)`` with (u, v) rotated by ``angle``; params ``(n,)`` → ``(n, h, w)``."""
    ky, kx = rfft_frequencies_2d(size, pixel_size_angstrom, device=bx.device, dtype=bx.dtype)
    a = torch.deg2rad(angle_deg)[:, None, None]
    ku = kx * torch.cos(a) + ky * torch.sin(a)
    kv = -kx * torch.sin(a) + ky * torch.cos(a)
    return scale[:, None, None] * torch.exp(-(bx[:, None, None] * ku**2 + by[:, None, None] * kv**2) / 4)


def exposure_crop_frequency(dose: float, bfactor_per_dose: float = 4.0, weight: float = 0.25) -> float:
    """M's memory rule: the frequency (1/Å) where the dose weight falls to ``weight`` (√(ln 4 / d) by default)."""
    if dose <= 0:
        return math.inf
    return math.sqrt(-4 * math.log(weight) / (bfactor_per_dose * dose))
