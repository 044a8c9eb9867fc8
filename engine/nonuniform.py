"""Non-uniform refinement's regulariser (Punjani, Zhang & Fleet 2020): a local filter chosen per voxel by
cross-validation inside one half-set.

Each half's particles are split in two (quarter-sets, by a hash of the particle id, so the split is stable
across iterations and labs); the two quarter-maps of a half cross-validate a family of low-pass filters:
at every voxel, the filter whose output from one quarter-map best predicts the other (and vice versa),
averaged over a window whose size is tied to the filter's scale (eq. 8: ρ = γ·θ, γ = 3), wins. The chosen
filter is then applied to that half's map. Nothing of the other half is read, so the halves stay
independent (unlike a local-resolution filter shared by both).

Choices the paper leaves open, ours (docs/physics.md): the filters are Butterworth low-passes of order 8,
``|H(k)|² = 1 / (1 + (k/k_c)^16)``; 50 cut-offs ``k_c`` equispaced in frequency from 2 shells of the box to
Nyquist; θ = 1/k_c (px) and the window a Gaussian of FWHM γ·θ (normalised), ρ at its lower bound γ·θ; the
chosen filter is applied to the half-map, reconstructed from both quarter-sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .fourier import spatial_frequency_radius

__all__ = ["NonUniformSettings", "quarter_set", "butterworth", "cutoff_levels", "window_scales", "local_filter_levels",
           "apply_local_filter", "nonuniform_filter"]


@dataclass(frozen=True)
class NonUniformSettings:
    order: int = 8  # Butterworth order (the paper's)
    levels: int = 50  # cut-offs, equispaced in frequency (the paper's)
    window_factor: float = 3.0  # γ, the adaptive window factor (the paper's)
    lowest_shell: float = 2.0  # the coarsest cut-off, in shells of the box
    windows: int = 8  # window sizes tried, geometric between γ·θ of the finest and the coarsest cut-off


def quarter_set(particle_ids: np.ndarray) -> np.ndarray:
    """1 or 2 for each particle: a fixed pseudo-random split (splitmix64's finaliser, top bit) of its id."""
    z = np.asarray(particle_ids, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(63)).astype(np.int64) + 1


def cutoff_levels(box: int, settings: NonUniformSettings) -> torch.Tensor:
    """The cut-off frequencies (cycles/px), coarse to fine."""
    return torch.linspace(settings.lowest_shell / box, 0.5, settings.levels, dtype=torch.float64)


def butterworth(radius_cycles: torch.Tensor, cutoff: float, order: int) -> torch.Tensor:
    return 1 / torch.sqrt(1 + (radius_cycles / cutoff) ** (2 * order))


def _window(shape, fwhm_px: float, radius_cycles: torch.Tensor) -> torch.Tensor:
    """The rfft transfer of a normalised Gaussian of this FWHM (a convolution by it in real space)."""
    sigma = fwhm_px / 2.3548
    return torch.exp(-2 * (np.pi * sigma * radius_cycles) ** 2)


def _filtered(spectrum: torch.Tensor, transfer: torch.Tensor, shape) -> torch.Tensor:
    return torch.fft.irfftn(spectrum * transfer, s=shape)


def window_scales(box: int, settings: NonUniformSettings) -> torch.Tensor:
    """The window FWHMs (px) the cross-validation is evaluated over: geometric, from γ·θ of the finest
    cut-off to γ·θ of the coarsest (θ = 1/k_c)."""
    cut = cutoff_levels(box, settings)
    lo, hi = settings.window_factor / float(cut[-1]), settings.window_factor / float(cut[0])
    return torch.logspace(np.log10(lo), np.log10(hi), settings.windows, dtype=torch.float64)


def local_filter_levels(quarter_a: torch.Tensor, quarter_b: torch.Tensor,
                        settings: NonUniformSettings = NonUniformSettings()) -> torch.Tensor:
    """Per voxel, the index of the cut-off chosen by windowed cross-validation (eq. 8).

    Levels are compared over one window at a time (comparing each level over a window of its own size
    favours coarse levels, whose wide windows average in the solvent's low residual); the voxel takes
    the choice of the smallest window that is at least γ times the chosen filter's scale (ρ ≥ γ·θ).
    """
    shape = quarter_a.shape[-3:]
    d = shape[-1]
    radius = spatial_frequency_radius(d, device=quarter_a.device, dtype=quarter_a.dtype) / d  # cycles/px
    fa, fb = torch.fft.rfftn(quarter_a), torch.fft.rfftn(quarter_b)
    scales = window_scales(d, settings).tolist()
    windows = [_window(shape, w, radius) for w in scales]
    best = torch.full((len(scales), *shape), float("inf"), device=quarter_a.device, dtype=quarter_a.dtype)
    choice = torch.zeros((len(scales), *shape), dtype=torch.long, device=quarter_a.device)
    cutoffs = cutoff_levels(d, settings)
    for k, cutoff in enumerate(cutoffs.tolist()):
        h = butterworth(radius, cutoff, settings.order)
        residual = torch.fft.rfftn((_filtered(fa, h, shape) - quarter_b) ** 2 + (_filtered(fb, h, shape) - quarter_a) ** 2)
        for j, w in enumerate(windows):
            windowed = _filtered(residual, w, shape)
            better = windowed < best[j]
            best[j] = torch.where(better, windowed, best[j])
            choice[j][better] = k
    theta = (1 / cutoffs.to(quarter_a.device, quarter_a.dtype))[choice]  # (windows, ...) px
    reliable = torch.tensor(scales, device=quarter_a.device, dtype=quarter_a.dtype)[:, None, None, None] \
        >= settings.window_factor * theta * (1 - 1e-6)
    reliable[-1] = True  # the largest window always answers
    first = torch.argmax(reliable.to(torch.uint8), dim=0)  # the smallest reliable window
    return torch.gather(choice, 0, first[None])[0]


def apply_local_filter(volume: torch.Tensor, levels: torch.Tensor,
                       settings: NonUniformSettings = NonUniformSettings()) -> torch.Tensor:
    """``volume`` filtered at each voxel by the Butterworth low-pass its level names."""
    shape = volume.shape[-3:]
    d = shape[-1]
    radius = spatial_frequency_radius(d, device=volume.device, dtype=volume.dtype) / d
    spectrum = torch.fft.rfftn(volume)
    out = torch.zeros_like(volume)
    cutoffs = cutoff_levels(d, settings).tolist()
    for k in torch.unique(levels).tolist():
        cutoff = cutoffs[k]
        sel = levels == k
        out[sel] = _filtered(spectrum, butterworth(radius, cutoff, settings.order), shape)[sel]
    return out


def nonuniform_filter(half_map: torch.Tensor, quarter_a: torch.Tensor, quarter_b: torch.Tensor,
                      settings: NonUniformSettings = NonUniformSettings()) -> tuple[torch.Tensor, torch.Tensor]:
    """One half-map, locally filtered by the cut-offs its own quarter-maps choose → (map, level per voxel)."""
    levels = local_filter_levels(quarter_a, quarter_b, settings)
    return apply_local_filter(half_map, levels, settings), levels
