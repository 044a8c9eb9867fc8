"""Example input files (``cryopool demo --inputs-only``, the tutorial): two labs' tilt series and two species.

This is deliberately simple image formation (pseudo-atom densities splatted
along the tilted projection direction, plus Gaussian noise) so the files are
made in seconds anywhere; the physically complete simulator with CTF, dose
weighting and ground truth is ``cryopool simulate`` in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

__all__ = ["DemoFiles", "write_demo_files"]

PIXEL_A = 10.0
IMAGE_PX = 128
TILTS = np.arange(-60.0, 60.0 + 1e-6, 3.0)


def _pseudo_atoms(rng: np.random.Generator, radius_a: float, n: int) -> np.ndarray:
    """Protein-like blob: atoms in a ball, clustered a little like secondary structure."""
    centres = rng.normal(size=(max(3, n // 40), 3))
    centres *= radius_a * 0.6 / np.linalg.norm(centres, axis=1, keepdims=True).clip(1e-6)
    atoms = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=radius_a * 0.25, size=(n, 3))
    r = np.linalg.norm(atoms, axis=1)
    return atoms[r < radius_a]


def _map(atoms: np.ndarray, box: int, pixel: float) -> np.ndarray:
    grid = (np.arange(box) - box // 2) * pixel
    hist, _ = np.histogramdd(atoms[:, ::-1], bins=[np.append(grid, grid[-1] + pixel) - pixel / 2] * 3)
    k = np.fft.fftfreq(box)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    blur = np.exp(-2 * (np.pi * 0.8) ** 2 * (kx**2 + ky**2 + kz**2))
    return np.fft.ifftn(np.fft.fftn(hist) * blur).real.astype(np.float32)


def _euler_zyz(rot: float, tilt: float, psi: float) -> np.ndarray:
    def rz(a):
        c, s = np.cos(a), np.sin(a)
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])

    def ry(a):
        c, s = np.cos(a), np.sin(a)
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return rz(np.radians(psi)) @ ry(np.radians(tilt)) @ rz(np.radians(rot))


def _tilt_series(rng, particles: list[tuple[np.ndarray, np.ndarray, np.ndarray]], snr: float) -> np.ndarray:
    stack = np.zeros((len(TILTS), IMAGE_PX, IMAGE_PX), np.float32)
    edges = (np.arange(IMAGE_PX + 1) - IMAGE_PX / 2) * PIXEL_A
    for t, angle in enumerate(TILTS):
        a = np.radians(angle)
        tilt = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        pts = np.concatenate([(atoms @ rot.T + pos) @ tilt.T for atoms, pos, rot in particles])
        img, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=[edges, edges])
        k = np.fft.fftfreq(IMAGE_PX)
        blur = np.exp(-2 * (np.pi * 0.8) ** 2 * (k[:, None] ** 2 + k[None] ** 2))
        stack[t] = np.fft.ifft2(np.fft.fft2(img) * blur).real
    signal = stack.std()
    return stack + rng.normal(scale=signal / np.sqrt(snr), size=stack.shape).astype(np.float32)


@dataclass(frozen=True)
class DemoFiles:
    tilt_series: dict[str, list[Path]]  # lab -> stacks
    species: dict[str, dict[str, Path | float]]  # name -> half1, half2, mask, particles, diameter


def write_demo_files(directory: Path, seed: int = 0) -> DemoFiles:
    """Write MRC stacks, half-maps, masks and STAR tables for two labs and two species."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    kinds = {"ribosome": (125.0, 3000, 32), "proteasome": (60.0, 900, 16)}  # radius Å, atoms, box px
    atoms = {k: _pseudo_atoms(rng, r, n) for k, (r, n, _) in kinds.items()}
    layout = {"lab_a": ["TS_01", "TS_02"], "lab_b": ["TS_03"]}
    stacks: dict[str, list[Path]] = {}
    rows: dict[str, list[dict]] = {k: [] for k in kinds}
    for lab, names in layout.items():
        for name in names:
            placed: list[tuple[np.ndarray, float]] = []
            particles = []
            for kind, count in (("ribosome", 6), ("proteasome", 4)):
                radius = kinds[kind][0]
                for _ in range(count):
                    for _ in range(200):  # non-overlapping positions in a 300 Å slab
                        pos = np.array([rng.uniform(-450, 450), rng.uniform(-450, 450), rng.uniform(-150, 150)])
                        if all(np.linalg.norm(pos - p) > radius + r for p, r in placed):
                            break
                    placed.append((pos, radius))
                    angles = (rng.uniform(-180, 180), np.degrees(np.arccos(rng.uniform(-1, 1))), rng.uniform(-180, 180))
                    particles.append((atoms[kind], pos, _euler_zyz(*angles)))
                    rows[kind].append({"rlnTomoName": name, "rlnCenteredCoordinateXAngst": pos[0],
                                       "rlnCenteredCoordinateYAngst": pos[1], "rlnCenteredCoordinateZAngst": pos[2],
                                       "rlnAngleRot": angles[0], "rlnAngleTilt": angles[1], "rlnAnglePsi": angles[2],
                                       "rlnRandomSubset": len(rows[kind]) % 2 + 1})
            path = directory / f"{name}.mrc"
            with mrcfile.new(path, overwrite=True) as mrc:
                mrc.set_data(_tilt_series(rng, particles, snr=0.5))
                mrc.voxel_size = PIXEL_A
            stacks.setdefault(lab, []).append(path)
    species = {}
    for kind, (radius, _, box) in kinds.items():
        truth = _map(atoms[kind], box, PIXEL_A)
        files = {}
        for half in ("half1", "half2"):
            noisy = truth + rng.normal(scale=truth.std() * 0.3, size=truth.shape).astype(np.float32)
            files[half] = directory / f"{kind}_{half}.mrc"
            with mrcfile.new(files[half], overwrite=True) as mrc:
                mrc.set_data(noisy.astype(np.float32))
                mrc.voxel_size = PIXEL_A
        r = np.linalg.norm(np.stack(np.meshgrid(*[np.arange(box) - box // 2] * 3, indexing="ij")), axis=0) * PIXEL_A
        mask = np.clip((radius + 20 - r) / 20, 0, 1).astype(np.float32)
        files["mask"] = directory / f"{kind}_mask.mrc"
        with mrcfile.new(files["mask"], overwrite=True) as mrc:
            mrc.set_data(mask)
            mrc.voxel_size = PIXEL_A
        files["particles"] = directory / f"{kind}_particles.star"
        starfile.write({"particles": pd.DataFrame(rows[kind])}, files["particles"], overwrite=True)
        files["diameter"] = 2 * radius
        species[kind] = files
    return DemoFiles(stacks, species)
