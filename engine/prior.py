"""A Blush-style learned prior: a U-net denoiser trained once on simulated maps, shipped as arrays.

Kimanius et al. (2024) denoise each half-map with frozen weights between iterations and keep the
denoiser away from the shells that decide the resolution ("spectral trailing"): the reference is the
denoised map up to two shells below the 0.143 resolution and the ordinary FSC-filtered map beyond.
Their network was trained on 422 experimental EMDB half-map pairs; ours is trained on maps simulated
from pseudo-atomic phantoms (``prior_training``), the approach those authors moved away from because it
can hallucinate protein-like features, hence "Blush-style". Maps are resampled to the prior's voxel size
(Fourier cropping or padding), standardised, denoised in overlapping windows, and resampled back.
Fine-tuning the prior on a species' own half-maps with noise2noise is the Blush authors' proposed
future work (``fine_tune``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import blake3
import numpy as np
import torch

from cryopool.repo import InvalidInputError

from .fourier import fourier_resample
from .phantoms import pseudo_atomic_model, render_map
from .regularise import HalfMaps
from .unet import UNet3D, denoise_in_windows, network_from_arrays

__all__ = ["hallucination", "protein_like_maps", "PriorWeights", "load_prior", "weights_digest", "to_prior_space",
           "from_prior_space", "apply_prior", "PRIOR_FILE"]

PRIOR_FILE = "blush_style_prior"  # engine/weights/<name>.npz and .json


def weights_digest(arrays: dict[str, np.ndarray]) -> str:
    """BLAKE3 of the weights: names in order, then each array's dtype, shape and little-endian bytes."""
    h = blake3.blake3()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype=np.float32)
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.astype("<f4").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PriorWeights:
    arrays: dict[str, np.ndarray]
    manifest: dict  # architecture, voxel size, window, training record, digest

    @property
    def digest(self) -> str:
        return self.manifest["blake3"]

    @property
    def voxel_size_angstrom(self) -> float:
        return float(self.manifest["voxel_size_angstrom"])

    def network(self) -> UNet3D:
        return network_from_arrays(self.arrays, self.manifest["architecture"], where=f"{PRIOR_FILE}.npz")


def load_prior(directory=None) -> PriorWeights:
    """The shipped prior (or one in ``directory``), its arrays checked against the manifest's digest."""
    base = resources.files("cryopool.engine") / "weights" if directory is None else directory
    npz, manifest_path = base / f"{PRIOR_FILE}.npz", base / f"{PRIOR_FILE}.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        with np.load(npz, allow_pickle=False) as f:  # never unpickle
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError as e:
        raise InvalidInputError("the Blush-style prior's weights are missing", path=str(e.filename),
                                hint="rebuild them: python -m cryopool.engine.prior_training") from None
    found = weights_digest(arrays)
    if found != manifest.get("blake3"):
        raise InvalidInputError("the prior's weights do not match their manifest", path=str(npz), field="blake3",
                                expected=manifest.get("blake3"), found=found)
    return PriorWeights(arrays, manifest)


def _prior_box(box: int, pixel_size_angstrom: float, voxel: float) -> int:
    size = int(round(box * pixel_size_angstrom / voxel))
    return max(size + size % 2, 8)


def to_prior_space(half_map: torch.Tensor, pixel_size_angstrom: float, voxel: float) -> tuple[torch.Tensor, tuple]:
    """Resampled to the prior's voxel and standardised, with what undoes it."""
    x = fourier_resample(half_map, _prior_box(half_map.shape[-1], pixel_size_angstrom, voxel))
    mean, std = float(x.mean()), float(x.std().clamp(min=1e-30))
    return (x - mean) / std, (half_map.shape[-1], mean, std)


def from_prior_space(x: torch.Tensor, undo: tuple) -> torch.Tensor:
    box, mean, std = undo
    return fourier_resample(x * std + mean, box)


def apply_prior(net: UNet3D, half_map: torch.Tensor, pixel_size_angstrom: float, manifest: dict) -> torch.Tensor:
    """One half-map denoised by the network in the prior's space, returned on the half-map's grid."""
    x, undo = to_prior_space(half_map, pixel_size_angstrom, float(manifest["voxel_size_angstrom"]))
    net.eval()
    with torch.no_grad():
        out = denoise_in_windows(net.to(x.device), x, window=int(manifest.get("window", 48)),
                                 overlap=int(manifest.get("overlap", 16)), stride=net.stride)
    return from_prior_space(out, undo)


def protein_like_maps(box: int, pixel_size_angstrom: float) -> list[torch.Tensor]:
    """What a hallucinating prior would put into noise: three pseudo-atomic globules of 120–220 Å and a centred
    Gaussian blob (σ 8 px)."""
    maps = []
    for seed, diameter in ((11, 120.0), (12, 180.0), (13, 220.0)):
        atoms, weights = pseudo_atomic_model(diameter, np.random.default_rng(seed))
        maps.append(render_map(atoms, weights, box, pixel_size_angstrom, bfactor=100.0))
    z, y, x = torch.meshgrid(*[torch.arange(float(box)) - box // 2] * 3, indexing="ij")
    maps.append(torch.exp(-(x**2 + y**2 + z**2) / (2 * 8.0**2)))
    return maps


def hallucination(regularise, *, box: int = 48, pixel_size_angstrom: float = 5.0, draws: int = 20,
                  seed: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Does a regulariser make pure noise protein-like? Per protein-like map (``protein_like_maps``): the mean and
    standard deviation over ``draws`` pure-noise half-map pairs of the signed correlation between the regularised
    half 1 and the map. Chance gives a mean near 0 (±std/√draws); a network that puts a particle into noise gives
    a mean of one sign well above it. ``regularise`` maps a ``regularise.HalfMaps`` to a ``Regularised``."""
    g = torch.Generator().manual_seed(seed)
    proteins = protein_like_maps(box, pixel_size_angstrom)

    def corr(a: torch.Tensor, p: torch.Tensor) -> float:
        a, b = a - a.mean(), p - p.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))
    signed = []
    for _ in range(draws):
        noise = (torch.randn(box, box, box, generator=g), torch.randn(box, box, box, generator=g))
        out = regularise(HalfMaps(noise, torch.zeros(box // 2 + 1), pixel_size_angstrom, 20.0))
        signed.append([corr(out.references[0], p) for p in proteins])
    return np.mean(signed, axis=0), np.std(signed, axis=0)
