"""Species maps for simulation: protein-like pseudo-atomic models, or atomic models from PDB files.

Pseudo-atomic models place Cα-like atoms along α-helix-shaped rods and
β-strand-shaped lines packed inside a lumpy globular envelope, so the map
has secondary-structure-scale detail (rods ~10 Å across, strands ~4.8 Å
apart) rather than being a smooth blob. Maps are rendered by trilinear
splatting of atoms weighted by their scattering (Z for real atoms) and a
Gaussian blur given as a B-factor.
"""

from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import torch

from .grids import trilinear_scatter

__all__ = ["pseudo_atomic_model", "atomic_model_from_pdb", "render_map", "detergent_belt", "noisy_quarter_maps"]

_Z = {"C": 6, "N": 7, "O": 8, "S": 16, "P": 15, "H": 1, "SE": 34, "FE": 26, "MG": 12, "ZN": 30}


def pseudo_atomic_model(diameter_angstrom: float, rng: np.random.Generator, *,
                        max_atoms: int = 60000) -> tuple[np.ndarray, np.ndarray]:
    """Atoms ``(n, 3)`` Å around the origin and their weights ``(n,)`` for a globule of this diameter."""
    radius = diameter_angstrom / 2
    lobes = rng.normal(size=(5, 3))
    lobes *= (0.35 * radius) / np.linalg.norm(lobes, axis=1, keepdims=True)
    lobe_r = rng.uniform(0.55, 0.7, 5) * radius

    def inside(p):
        return (np.linalg.norm(p[:, None, :] - lobes[None], axis=-1) < lobe_r).any(axis=1)

    volume = (4 / 3) * np.pi * radius**3 * 0.7
    target = int(min(max_atoms, volume / 135.0))  # one residue per ~135 Å³ of protein
    atoms: list[np.ndarray] = []
    count = 0
    while count < target:
        centre = rng.uniform(-radius, radius, 3)
        if not inside(centre[None])[0]:
            continue
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        if rng.random() < 0.65:  # α-helix: 1.5 Å rise, 100° per residue, radius 2.3 Å
            n = int(rng.integers(7, 25))
            ref = np.cross(axis, [1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.cross(axis, [0.0, 1.0, 0.0])
            ref /= np.linalg.norm(ref)
            other = np.cross(axis, ref)
            k = np.arange(n)
            ang = np.radians(100.0) * k
            pts = (centre + np.outer(k * 1.5 - n * 0.75, axis) + 2.3 * (np.outer(np.cos(ang), ref)
                                                                           + np.outer(np.sin(ang), other)))
        else:  # β-sheet: 3-4 strands, 3.3 Å per residue, 4.8 Å apart
            n = int(rng.integers(5, 10))
            side = np.cross(axis, rng.normal(size=3))
            side /= np.linalg.norm(side)
            k = np.arange(n)
            pts = np.concatenate([centre + np.outer(k * 3.3 - n * 1.65, axis) + s * 4.8 * side
                                  for s in range(int(rng.integers(3, 5)))])
        pts = pts[inside(pts)]
        atoms.append(pts)
        count += len(pts)
    xyz = np.concatenate(atoms)[:target]
    xyz -= xyz.mean(axis=0)
    return xyz, np.full(len(xyz), 7.0)  # Cα stands for a residue's ~7 heavy-atom electrons per atom


def atomic_model_from_pdb(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All atoms of the first model (centred on their centre of mass) and their atomic numbers."""
    structure = gemmi.read_structure(str(path))
    xyz, z = [], []
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                xyz.append(atom.pos.tolist())
                z.append(_Z.get(atom.element.name.upper(), 6))
    xyz, z = np.asarray(xyz, float), np.asarray(z, float)
    xyz -= (xyz * z[:, None]).sum(0) / z.sum()
    return xyz, z


def render_map(atoms: np.ndarray, weights: np.ndarray, box: int, pixel_size_angstrom: float, *,
               bfactor: float = 50.0, dtype=torch.float32) -> torch.Tensor:
    """A ``(box, box, box)`` map: atoms splatted trilinearly around voxel ``box // 2``, blurred by ``bfactor``."""
    idx = torch.tensor(atoms / pixel_size_angstrom + box // 2, dtype=torch.float64)  # x, y, z voxel coords
    grid = torch.zeros((box, box, box), dtype=torch.float64)
    trilinear_scatter(grid, idx, torch.tensor(weights, dtype=torch.float64))
    f = torch.fft.fftfreq(box, d=pixel_size_angstrom, dtype=torch.float64)
    fr = torch.fft.rfftfreq(box, d=pixel_size_angstrom, dtype=torch.float64)
    kz, ky, kx = torch.meshgrid(f, f, fr, indexing="ij")
    blur = torch.exp(-bfactor * (kx**2 + ky**2 + kz**2) / 4)
    vol = torch.fft.irfftn(torch.fft.rfftn(grid) * blur, s=grid.shape)
    return (vol / vol.std()).to(dtype)


def detergent_belt(box: int, pixel_size_angstrom: float, *, inner_px: float = 17.0, outer_px: float = 26.0,
                   height_px: float = 12.0, bfactor: float = 2000.0) -> torch.Tensor:
    """A micelle-like ring around the z axis with only low-resolution content (disordered: unit std)."""
    z, y, x = torch.meshgrid(*[torch.arange(box, dtype=torch.float32) - box // 2] * 3, indexing="ij")
    r = torch.sqrt(x**2 + y**2)
    belt = ((r > inner_px) & (r < outer_px) & (z.abs() < height_px)).float()
    f = torch.fft.fftfreq(box, d=pixel_size_angstrom)
    kz, ky, kx = torch.meshgrid(f, f, torch.fft.rfftfreq(box, d=pixel_size_angstrom), indexing="ij")
    belt = torch.fft.irfftn(torch.fft.rfftn(belt) * torch.exp(-bfactor * (kx**2 + ky**2 + kz**2) / 4), s=belt.shape)
    return belt / belt.std()


def noisy_quarter_maps(truth: torch.Tensor, sigma: float, seed: int) -> list[torch.Tensor]:
    """Four independent noisy copies (white noise σ√2 each: a quarter of the particles, when the half-maps
    averaged from two of them have noise σ): half 1 A, 1 B, half 2 A, 2 B."""
    g = torch.Generator().manual_seed(seed)
    return [truth + torch.randn(truth.shape, generator=g) * sigma * 2**0.5 for _ in range(4)]
