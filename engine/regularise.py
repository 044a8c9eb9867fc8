"""Regularising half-maps into references for the next iteration (a pluggable step).

The baseline is the FSC-weighted Wiener filter: each shell is scaled by
``√(2 FSC / (1 + FSC))`` (Rosenthal & Henderson's figure of merit for the
full map) and the map is low-passed with a soft edge at the working
resolution. The FSC is the one *recorded at the end of the previous
iteration*, so filtering one half never looks at the other half's current
data (the gold standard holds even when a half-map is edited). M's noise2noise
denoiser, non-uniform filtering and the Blush-style prior (``regularisers``)
implement the same call: a species' half-maps (and, where a method needs them,
its quarter-maps and stored network weights) in, one reference per half out,
with the weights to store in the species' next version and a record of what was
done for the operation record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .fourier import spatial_frequency_radius, spatial_frequency_shells
from .fsc import fsc, masked_fsc

__all__ = ["Regulariser", "HalfMaps", "NetworkWeights", "Regularised", "FSCWienerFilter", "wiener_filter",
           "working_resolution", "filtered_map", "low_pass_edge", "low_pass"]


@dataclass
class NetworkWeights:
    """A species' network: named float32 arrays and what they are (architecture, kind, training so far)."""

    arrays: dict[str, np.ndarray]
    metadata: dict


@dataclass
class HalfMaps:
    """What a regulariser may read about one species."""

    halves: tuple[torch.Tensor, torch.Tensor]
    fsc: torch.Tensor  # the recorded (mask-corrected) half-map FSC per shell
    pixel_size_angstrom: float
    resolution_angstrom: float  # this iteration's working resolution
    quarters: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None  # per half
    weights: NetworkWeights | None = None  # the species' stored network, if any


@dataclass
class Regularised:
    references: tuple[torch.Tensor, torch.Tensor]
    weights: NetworkWeights | None = None  # to store with the species' next version (None: keep what it has)
    record: dict = field(default_factory=dict)  # what was done, for the operation record


class Regulariser(Protocol):
    name: str
    needs_quarters: bool  # reconstruct quarter-maps (each half's particles split in two) for the next iteration

    def parameters(self) -> dict:
        """Every choice, for the operation record."""

    def __call__(self, maps: HalfMaps) -> Regularised:
        """One species' half-maps → one reference per half."""


def working_resolution(fsc_curve: torch.Tensor, pixel_size_angstrom: float, *, threshold: float = 0.143,
                       floor_angstrom: float | None = None) -> float:
    """The refinement resolution from an FSC curve (M keeps it conservatively at the global resolution)."""
    d = (fsc_curve.shape[0] - 1) * 2
    c = fsc_curve.detach().cpu()
    below = torch.nonzero(c[1:] < threshold)
    shell = float(below[0]) + 0.5 if below.numel() else float(d // 2)
    res = d * pixel_size_angstrom / max(shell, 1.0)
    return max(res, floor_angstrom or 0.0, 2 * pixel_size_angstrom)


def wiener_filter(half_map: torch.Tensor, fsc_curve: torch.Tensor, *, pixel_size_angstrom: float,
                  resolution_angstrom: float) -> torch.Tensor:
    """Each shell scaled by √(2 FSC / (1 + FSC)), low-passed with a soft edge at the working resolution."""
    d = half_map.shape[-1]
    shells = spatial_frequency_shells(d, device=half_map.device)
    f = fsc_curve.to(half_map.device, half_map.dtype).clamp(min=0.0, max=0.999)
    weight = torch.sqrt(2 * f / (1 + f))
    edge = low_pass_edge(shells.to(half_map.dtype), d, pixel_size_angstrom, resolution_angstrom)
    w = weight[shells.clamp(max=weight.shape[0] - 1)] * edge
    return torch.fft.irfftn(torch.fft.rfftn(half_map) * w, s=half_map.shape[-3:])


class FSCWienerFilter:
    """The baseline: the CV-optimal shift-invariant filter (Punjani et al.), the same for both halves."""

    name = "fsc"
    needs_quarters = False

    def parameters(self) -> dict:
        return {"name": self.name}

    def __call__(self, maps: HalfMaps) -> Regularised:
        return Regularised(tuple(wiener_filter(h, maps.fsc, pixel_size_angstrom=maps.pixel_size_angstrom,
                                               resolution_angstrom=maps.resolution_angstrom) for h in maps.halves))


def filtered_map(half_map_1: torch.Tensor, half_map_2: torch.Tensor, pixel_size_angstrom: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The map to look at: the half-maps' average, FSC-weighted and low-passed at the 0.143 resolution.

    The FSC is the mask-corrected one when a mask is given (Chen et al. 2013);
    the average of two halves is the full map, hence the full-map weight.
    """
    curve = masked_fsc(half_map_1, half_map_2, mask)["corrected"] if mask is not None else fsc(half_map_1, half_map_2)
    resolution = working_resolution(curve, pixel_size_angstrom)
    return wiener_filter((half_map_1 + half_map_2) / 2, curve, pixel_size_angstrom=pixel_size_angstrom,
                         resolution_angstrom=resolution)


def low_pass_edge(shells: torch.Tensor, box: int, pixel_size_angstrom: float,
                  resolution_angstrom: float) -> torch.Tensor:
    """The soft low-pass of every reference: 1 up to the working resolution's shell, then to 0 over 4 shells."""
    cutoff = box * pixel_size_angstrom / resolution_angstrom  # in shells of the box
    return torch.clamp((cutoff + 2 - shells) / 4, 0, 1)


def low_pass(half_map: torch.Tensor, *, pixel_size_angstrom: float, resolution_angstrom: float) -> torch.Tensor:
    """A half-map low-passed at the working resolution, with no FSC weighting (the CTF fit's reference).

    The edge is evaluated at each voxel's exact radius, so a projection of the result is the
    projection of the half-map with the same edge applied in 2D (the CTF fit filters its data so).
    """
    d = half_map.shape[-1]
    radius = spatial_frequency_radius(d, device=half_map.device, dtype=half_map.dtype)
    edge = low_pass_edge(radius, d, pixel_size_angstrom, resolution_angstrom)
    return torch.fft.irfftn(torch.fft.rfftn(half_map) * edge, s=half_map.shape[-3:])
