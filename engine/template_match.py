"""Template matching in a tomogram: which places and orientations look like a species' map.

The template is resampled to the tomogram's voxel, low-passed, and weighted
as the tomogram transfers it: every tilt measures a central slice
(perpendicular to its beam direction, from the engine's stage rotations)
with the magnitude of its CTF (the tomogram is phase-flipped) and its
exposure weighting, so the missing wedge and the dose are where the data
put them. For each orientation of a uniform SO(3) grid, the rotated,
weighted template is correlated with the tomogram by FFT and normalised by
the tomogram's local standard deviation under the template's mask (a fast
local correlation, as in STOPGAP and pytom-match-pick). The score volume is
the best over orientations; peaks are picked greedily by score, refusing
places closer than a merge allows to particles already there (other species)
or to better picks (duplicates), down to a threshold at which one false
peak is expected in the whole search (``n_voxels × n_orientations`` trials
of a standard normal).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .ctf import ctf_at
from .fourier import fourier_resample
from .geometry import euler_zyz_to_matrix
from .records_io import ItemModel
from .tomogram import voxel_centres
from .weighting import exposure_weight

__all__ = ["MatchSettings", "MatchResult", "so3_grid", "tomogram_transfer", "match_template", "pick_peaks",
           "false_alarm_threshold"]


@dataclass(frozen=True)
class MatchSettings:
    angular_step_deg: float = 20.0
    symmetry: str = "C1"  # Cn and Dn shrink the orientation search
    lowpass_angstrom: float | None = None  # default: 2.5 voxels
    mask_radius_angstrom: float | None = None  # default: half the species' diameter
    false_peaks: float = 1.0  # expected false peaks in the whole search at the threshold
    factor: float = 0.8  # the merge's collision rule: closer than factor × (r_a + r_b) collides


@dataclass
class MatchResult:
    scores: torch.Tensor  # (z, y, x) best normalised correlation over orientations
    orientation_index: torch.Tensor  # (z, y, x) long, into ``rotations``
    rotations: torch.Tensor  # (n, 3, 3)
    score_std: float  # of the correlation over every voxel and orientation (the noise scale)
    voxel_angstrom: float


def so3_grid(step_deg: float, symmetry: str = "C1") -> torch.Tensor:
    """Rotation matrices ``(n, 3, 3)`` covering SO(3) about every ``step_deg``: directions of the particle's z
    axis on a Fibonacci lattice at that spacing, each with in-plane angles every ``step_deg``.

    A Cn or Dn particle looks the same turned about its n-fold axis (RELION's rot) by 360°/n, and a Dn particle
    also flipped about a two-fold (tilt → 180° − tilt): the lattice then covers only rot < 360°/n (and tilt ≤
    90° for Dn), with 25 % more directions than that area needs (its seams are joined by the symmetry, not by the
    lattice): about n/1.25 (2n/1.25) times fewer orientations. T, O and I are searched in full.
    """
    step = math.radians(step_deg)
    group = re.fullmatch(r"([CD])([1-9][0-9]*)", symmetry.upper())
    fold = int(group.group(2)) if group else 1
    dihedral = bool(group) and group.group(1) == "D"
    parts = fold * (2 if dihedral else 1)
    n_dirs = max(2, math.ceil(4 * math.pi / step**2 * (1.25 if parts > 1 else 1.0) / parts))
    i = torch.arange(n_dirs, dtype=torch.float64) + 0.5
    tilt = torch.rad2deg(torch.arccos(1 - (1 if dihedral else 2) * i / n_dirs))
    rot = 360.0 / fold * ((i * (3 - math.sqrt(5)) / 2) % 1.0)
    psi = torch.arange(0.0, 360.0 - 1e-9, step_deg, dtype=torch.float64)
    angles = torch.stack([rot[:, None].expand(-1, len(psi)), tilt[:, None].expand(-1, len(psi)),
                          psi[None].expand(n_dirs, -1)], dim=-1).reshape(-1, 3)
    return euler_zyz_to_matrix(angles)


def false_alarm_threshold(std: float, trials: float, false_peaks: float = 1.0) -> float:
    """The score a standard normal with ``std`` exceeds ``false_peaks`` times in ``trials`` draws."""
    p = min(0.5, false_peaks / max(trials, 1.0))
    return std * math.sqrt(2) * float(torch.special.erfinv(torch.tensor(1 - 2 * p, dtype=torch.float64)))


def tomogram_transfer(item: ItemModel, box: int, voxel: float) -> torch.Tensor:
    """``(box, box, box // 2 + 1)`` how the tomogram passes each 3D frequency: the mean over the tilts whose
    central slice holds it of |CTF| × exposure weight; zero in the missing wedge."""
    device = item.stack.device
    kz, ky, kx = _frequencies(box, voxel, device)
    k = torch.stack([kx, ky, kz], dim=-1)  # (…, 3) specimen frequencies, x y z
    rotations = item.geometry.rotations().to(torch.float64)  # (t, 3, 3) specimen → tilt frame
    tilt_k = torch.einsum("tij,...j->t...i", rotations, k)  # (t, …, 3)
    on_slice = (tilt_k[..., 2].abs() <= 0.5 / (box * voxel)).to(torch.float64)
    weight = torch.zeros(kx.shape, dtype=torch.float64, device=device)
    im = item.imaging
    for i in range(len(rotations)):  # each tilt with its own defocus and dose
        ctf = ctf_at(tilt_k[i, ..., 0], tilt_k[i, ..., 1], im.defocus_u_angstrom[i].to(torch.float64),
                     im.defocus_v_angstrom[i].to(torch.float64), im.defocus_angle_deg[i].to(torch.float64),
                     voltage_kv=im.voltage_kv, spherical_aberration_mm=im.spherical_aberration_mm,
                     amplitude_contrast=im.amplitude_contrast)
        dose = exposure_weight(item.pre_exposure[i].to(torch.float64), item.exposure[i].to(torch.float64),
                               (tilt_k[i, ..., :2] ** 2).sum(-1))
        weight += on_slice[i] * ctf.abs() * dose
    count = on_slice.sum(0)
    return torch.where(count > 0, weight / count.clamp(min=1), torch.zeros_like(count))


def _frequencies(box: int, voxel: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kz, ky, kx)`` in 1/Å of a ``box³`` volume's rfft."""
    f = torch.fft.fftfreq(box, d=voxel, dtype=torch.float64, device=device)
    fr = torch.fft.rfftfreq(box, d=voxel, dtype=torch.float64, device=device)
    return torch.meshgrid(f, f, fr, indexing="ij")


def _lowpass(box: int, voxel: float, resolution: float, device=None) -> torch.Tensor:
    kz, ky, kx = _frequencies(box, voxel, device)
    k = torch.sqrt(kx**2 + ky**2 + kz**2) * resolution
    return torch.where(k < 0.9, 1.0, 0.5 + 0.5 * torch.cos(math.pi * ((k - 0.9) / 0.2).clamp(0, 1)))


def _rotate(volume: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``volume(Rᵀ x)`` about the box centre (index n // 2), trilinear; x, y, z axes as (x, y, z) of the map."""
    n = volume.shape[-1]
    c = (torch.arange(n, dtype=torch.float64, device=volume.device) - n // 2)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], dim=-1) @ rotation.to(volume.device, torch.float64)  # rows: Rᵀ x
    grid = (2 * (pts + n // 2) + 1) / n - 1
    return torch.nn.functional.grid_sample(volume[None, None].to(torch.float64), grid[None], mode="bilinear",
                                           padding_mode="zeros", align_corners=False)[0, 0].to(volume.dtype)


def match_template(tomogram: torch.Tensor, voxel: float, template: torch.Tensor, template_pixel: float,
                   item: ItemModel, diameter_angstrom: float, settings: MatchSettings = MatchSettings(),
                   progress: Callable[[int, int], None] | None = None) -> MatchResult:
    """Score every voxel and orientation of ``tomogram`` ``(z, y, x)`` against ``template`` (a map, cubic)."""
    dtype, device = torch.float32, tomogram.device
    box = int(round(template.shape[-1] * template_pixel / voxel))
    box += box % 2
    tpl = fourier_resample(template.to(device, torch.float64), box)
    transfer = tomogram_transfer(item, box, voxel) * _lowpass(box, voxel, settings.lowpass_angstrom or 2.5 * voxel,
                                                              device)
    radius = (settings.mask_radius_angstrom or diameter_angstrom / 2) / voxel
    c = torch.arange(box, dtype=torch.float64, device=device) - box // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    mask = (torch.sqrt(xx**2 + yy**2 + zz**2) <= radius).to(torch.float64)
    n_mask = float(mask.sum())
    shape = tomogram.shape
    vol = tomogram.to(dtype)
    vol = (vol - vol.mean()) / vol.std().clamp(min=1e-30)
    padded_mask = _pad_to(mask.to(dtype), shape)
    fm = torch.fft.rfftn(padded_mask)
    fv = torch.fft.rfftn(vol)
    mean = torch.fft.irfftn(fv * fm.conj(), s=shape) / n_mask
    sq = torch.fft.irfftn(torch.fft.rfftn(vol**2) * fm.conj(), s=shape) / n_mask
    local_std = torch.sqrt((sq - mean**2).clamp(min=1e-12))
    rotations = so3_grid(settings.angular_step_deg, settings.symmetry)
    best = torch.full(shape, -torch.inf, dtype=dtype, device=device)
    best_index = torch.zeros(shape, dtype=torch.long, device=device)
    total = total_sq = 0.0
    for r in range(len(rotations)):
        t = torch.fft.irfftn(torch.fft.rfftn(_rotate(tpl, rotations[r])) * transfer, s=(box,) * 3)
        t = (t - (t * mask).sum() / n_mask) * mask
        t = t / torch.sqrt((t**2).sum()).clamp(min=1e-30)
        cc = torch.fft.irfftn(fv * torch.fft.rfftn(_pad_to(t.to(dtype), shape)).conj(), s=shape) / local_std
        total += float(cc.sum())
        total_sq += float((cc.to(torch.float64) ** 2).sum())
        better = cc > best
        best = torch.where(better, cc, best)
        best_index = torch.where(better, r, best_index)
        if progress:
            progress(r + 1, len(rotations))
    n = cc.numel() * len(rotations)
    std = math.sqrt(max(total_sq / n - (total / n) ** 2, 1e-30))
    return MatchResult(best.cpu(), best_index.cpu(), rotations, std, voxel)  # small: picking runs on the CPU


def _pad_to(small: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A box centred on the origin of a volume of ``shape`` (wrapped), for correlation by FFT."""
    out = torch.zeros(shape, dtype=small.dtype, device=small.device)
    b = small.shape[-1]
    out[:b, :b, :b] = small
    return torch.roll(out, shifts=(-(b // 2),) * 3, dims=(0, 1, 2))


def pick_peaks(result: MatchResult, diameter_angstrom: float, occupied: list[tuple[np.ndarray, float]], *,
               threshold: float, factor: float = 0.8, max_picks: int | None = None
               ) -> list[tuple[np.ndarray, torch.Tensor, float]]:
    """Greedy picks ``(position Å from the tomogram centre, rotation, score)`` in descending score, above
    ``threshold``, none colliding with ``occupied`` ``(position, radius)`` particles or an earlier pick, none
    closer to the tomogram's faces than its radius (where its mask would wrap around)."""
    nz, ny, nx = result.scores.shape
    v = result.voxel_angstrom
    zs, ys, xs = (voxel_centres(n, v).numpy() for n in (nz, ny, nx))
    inside = torch.zeros_like(result.scores, dtype=torch.bool)
    border = [min(math.ceil(diameter_angstrom / 2 / v), (n - 1) // 2) for n in (nz, ny, nx)]
    inside[border[0]:nz - border[0], border[1]:ny - border[1], border[2]:nx - border[2]] = True
    flat = torch.where(inside, result.scores, -torch.inf).flatten()  # the template must fit inside the tomogram
    candidates = torch.nonzero(flat > threshold).flatten()
    order = candidates[torch.argsort(flat[candidates], descending=True)]
    radius = diameter_angstrom / 2
    taken = np.array([p for p, _ in occupied], dtype=float).reshape(-1, 3)
    reach = factor * (radius + np.array([r for _, r in occupied], dtype=float))
    picks = []
    for idx in order.tolist():
        z, rem = divmod(idx, ny * nx)
        y, x = divmod(rem, nx)
        pos = np.array([xs[x], ys[y], zs[z]])
        if len(taken) and np.any(np.linalg.norm(taken - pos, axis=1) < reach):
            continue
        picks.append((pos, result.rotations[int(result.orientation_index[z, y, x])], float(flat[idx])))
        taken = np.vstack([taken, pos])
        reach = np.append(reach, factor * 2 * radius)
        if max_picks is not None and len(picks) >= max_picks:
            break
    return picks
