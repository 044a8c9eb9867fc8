"""Fourier-slice projection and its adjoint, back-projection into Fourier accumulators.

A map of box ``d`` is zero-padded to ``D = pad · d`` and pre-divided by the
real-space apodisation of trilinear interpolation (sinc² per axis, the
"gridding correction"), then Fourier transformed with its centre voxel
``d // 2`` at the origin. A particle image at orientation ``A`` (map → image
frame, see ``geometry``) has the 2-D DFT ``F_img(k) = F_map(Aᵀ (kx, ky, 0))``,
sampled here trilinearly at ``pad · Aᵀ k`` on the padded grid. Slices are
returned in rfft layout ``(..., d, d // 2 + 1)``, un-shifted, with the same
normalisation as ``torch.fft.rfft2`` of the projection image, so they compare
directly with transforms of extracted particle images.

Insertion is the exact adjoint of extraction (the same trilinear weights,
scattered), accumulated into complex data and real weight grids; Friedel
mates are restored when the reconstruction is finalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from cryopool.repo import InvalidInputError

from .fourier import crop_center, pad_center
from .grids import trilinear_sample, trilinear_scatter

__all__ = ["VolumeTransform", "prepare_volume", "extract_slices", "extract_points", "crop_transform", "insert_slices",
           "FourierAccumulator", "gridding_correction", "slice_coordinates"]


def gridding_correction(size: int, padded: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """sinc²(x / padded) per axis, on a ``size³`` grid centred at ``size // 2``."""
    x = (torch.arange(size, device=device, dtype=dtype) - size // 2) / padded
    s = torch.sinc(x) ** 2
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


@dataclass(frozen=True)
class VolumeTransform:
    """A padded, gridding-corrected, centred 3-D FT ready for slicing.

    Held as real values ``(D, D, D, 2)`` (real and imaginary parts side by side, ``torch.view_as_real``'s
    layout): a trilinear sample gathers both parts of a corner in one read (``grids.trilinear_sample``).
    """

    values: torch.Tensor  # (D, D, D, 2) real, imaginary; fftshifted: frequency 0 at index D // 2
    box: int  # d, the original box
    pad: int

    @property
    def padded(self) -> int:
        return self.box * self.pad

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def ft(self) -> torch.Tensor:
        """The transform as one complex grid ``(D, D, D)`` (a copy)."""
        return torch.view_as_complex(self.values.contiguous()).clone()


def prepare_volume(volume: torch.Tensor, pad: int = 2, *, radius: float | None = None) -> VolumeTransform:
    """``(d, d, d)`` real map → its padded, corrected, centred transform (differentiable).

    With ``radius`` (cycles per box) and without gradients: only the part ``crop_transform`` would keep, computed
    one axis at a time and cropped after each (``_band_transform``), so the whole padded transform (a 200-px
    map's is 512 MB) never exists."""
    d = volume.shape[-1]
    if volume.shape[-3:] != (d, d, d):
        raise InvalidInputError("a map must be cubic", field="shape", expected="(d, d, d)", found=tuple(volume.shape))
    D = d * pad
    corrected = volume / gridding_correction(d, D, device=volume.device, dtype=volume.dtype)
    padded = pad_center(corrected, D, dims=3)
    if D % 2:
        ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(padded, dim=(-3, -2, -1)), dim=(-3, -2, -1)),
                                dim=(-3, -2, -1))
        vt = VolumeTransform(values=torch.view_as_real(ft).contiguous(), box=d, pad=pad)
        return vt if radius is None else crop_transform(vt, radius)
    # for an even box both shifts are ±1 checkerboards (a shift by D/2 is a phase of (−1)^k), applied in place:
    # no rolled copies of the padded map and of its transform, half the transient memory of a large map
    s = 1.0 - 2.0 * (torch.arange(D, device=volume.device) % 2).to(volume.dtype)
    board = lambda x: x * s[:, None, None] * s[None, :, None] * s[None, None, :]  # noqa: E731
    inplace = not torch.is_grad_enabled() or not volume.requires_grad
    padded = padded.mul_(s[:, None, None]).mul_(s[None, :, None]).mul_(s[None, None, :]) if inplace else board(padded)
    sign = -1.0 if (3 * D // 2) % 2 else 1.0  # (−1)^(3·D/2): the two shifts' phases meet at the box's half
    if radius is not None and inplace:
        size, start = _band_extent(D, pad, radius)
        band = slice(start, start + size)
        ft = _band_transform(padded, band)
        ft.mul_(s[band, None, None] * sign).mul_(s[None, band, None]).mul_(s[None, None, band])
        # crop_transform keeps this grid as it is, or gives a band at the grid's edge its margin of zeros
        return crop_transform(VolumeTransform(values=torch.view_as_real(ft).contiguous(), box=d, pad=pad), radius)
    ft = torch.fft.fftn(padded, dim=(-3, -2, -1))
    del padded
    if inplace:
        ft.mul_(s[:, None, None] * sign).mul_(s[None, :, None]).mul_(s[None, None, :])
    else:
        ft = board(ft) * sign
    vt = VolumeTransform(values=torch.view_as_real(ft).contiguous(), box=d, pad=pad)
    return vt if radius is None else crop_transform(vt, radius)


def crop_transform(vt: VolumeTransform, radius: float) -> VolumeTransform:
    """The same transform holding only frequencies up to ``radius`` (cycles per box) and their interpolation
    neighbours (zeros where those lie beyond the grid): what slices limited to a band need. Sampling it gives
    the same values in the band; the smaller grid is what makes the sampling fast (the whole transform of a
    128-px map is 256³ voxels, mostly beyond the band, and memory traffic dominates trilinear interpolation)."""
    full = vt.values.shape[0]
    size, start = _band_extent(full, vt.pad, radius, clamp=False)
    if size <= full:
        values = vt.values[start:start + size, start:start + size, start:start + size].contiguous()
    else:  # a band reaching the grid's edge: a margin of zeros, so that every corner a sample reads is on the
        # grid (what trilinear sampling's zeros padding would read, without its per-corner checks)
        m = (size - full) // 2
        values = torch.nn.functional.pad(vt.values, (0, 0, m, m, m, m, m, m))
    return replace(vt, values=values)


def _band_extent(full: int, pad: int, radius: float, *, clamp: bool = True) -> tuple[int, int]:
    """The size and first index of the centred cube holding frequencies up to ``radius`` and their neighbours
    (at most the whole grid unless ``clamp`` is off; the first index is then negative)."""
    size = 2 * math.ceil(radius * pad + 2) + 2
    size = min(full, size) if clamp else size
    size += (full - size) % 2  # the centre voxel stays the centre
    return size, full // 2 - size // 2


def _band_transform(x: torch.Tensor, band: slice, block: int = 32) -> torch.Tensor:
    """``fftn(x)[band, band, band]`` one axis at a time, cropping after each: the first pass runs on blocks of
    ``x``'s columns, so nothing larger than ``(band, D, D)`` complex is ever held."""
    D = x.shape[-1]
    n = band.stop - band.start
    cdtype = torch.complex64 if x.dtype == torch.float32 else torch.complex128
    out = torch.empty((n, D, D), dtype=cdtype, device=x.device)
    for j in range(0, D, block):
        out[:, j:j + block] = torch.fft.fft(x[:, j:j + block], dim=0)[band]
    out = torch.fft.fft(out, dim=1)[:, band]
    return torch.fft.fft(out, dim=2)[..., band].contiguous()


def slice_coordinates(rotations: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency coordinates (x, y, z) in 1/box units of each rfft pixel of each slice, and the in-band mask.

    ``rotations`` ``(..., 3, 3)`` → ``(..., box, box // 2 + 1, 3)`` and ``(box, box // 2 + 1)`` bool
    (inside the Nyquist circle).
    """
    ky = torch.fft.fftfreq(box, device=rotations.device, dtype=rotations.dtype) * box
    kx = torch.fft.rfftfreq(box, device=rotations.device, dtype=rotations.dtype) * box
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    k = torch.stack([gx, gy, torch.zeros_like(gx)], dim=-1)  # (box, w, 3)
    q = torch.einsum("...ji,hwj->...hwi", rotations, k)  # Aᵀ k
    inside = (gx**2 + gy**2) <= (box // 2) ** 2
    return q, inside


def extract_slices(vt: VolumeTransform, rotations: torch.Tensor) -> torch.Tensor:
    """Central slices at ``rotations`` ``(..., 3, 3)`` → ``(..., d, d // 2 + 1)`` complex (differentiable)."""
    d = vt.box
    ky = torch.fft.fftfreq(d, device=rotations.device, dtype=rotations.dtype) * d
    kx = torch.fft.rfftfreq(d, device=rotations.device, dtype=rotations.dtype) * d
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    inside = (gx**2 + gy**2) <= (d // 2) ** 2
    out = extract_points(vt, rotations, torch.stack([gx, gy], -1).reshape(-1, 2))
    return out.reshape(*rotations.shape[:-2], d, d // 2 + 1) * inside


def extract_points(vt: VolumeTransform, rotations: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """The central slices at ``rotations`` ``(..., 3, 3)``, only at the 2-D ``frequencies`` ``(K, 2)`` (kx, ky in
    cycles per box) → ``(..., K)`` complex (differentiable in the rotations).

    What a comparison limited to a band needs: the slice's values there and nowhere else.
    """
    batch = rotations.shape[:-2]
    k = torch.cat([frequencies, torch.zeros_like(frequencies[:, :1])], -1).to(rotations.dtype)
    q = torch.einsum("nji,kj->nki", rotations.reshape(-1, 3, 3), k)  # Aᵀ k, (n, K, 3)
    idx = (q * vt.pad + vt.values.shape[0] // 2).reshape(-1, 3)  # fractional index on the grid (x, y, z)
    out = trilinear_sample(vt.values, idx)
    return torch.complex(out[:, 0], out[:, 1]).reshape(*batch, frequencies.shape[0])


def insert_slices(data: torch.Tensor, weights: torch.Tensor | None, slices: torch.Tensor,
                  slice_weights: torch.Tensor | None, rotations: torch.Tensor, pad: int) -> None:
    """Adjoint of :func:`extract_slices`: add ``slices`` (and ``slice_weights``) into the accumulators in place.

    ``data`` ``(D, D, D)`` complex and ``weights`` ``(D, D, D)`` real are fftshifted grids;
    ``slices``/``slice_weights`` ``(..., d, d // 2 + 1)``; ``rotations`` ``(..., 3, 3)``.
    The kx = 0 column holds each Friedel pair twice in a full-plane view: it is halved here
    and restored by the Friedel symmetrisation in :meth:`FourierAccumulator.finalise`.
    """
    d = slices.shape[-2]
    D = data.shape[-1]
    q, inside = slice_coordinates(rotations.reshape(-1, 3, 3), d)
    idx = (q * pad + D // 2).reshape(-1, 3)
    mask = inside.expand(q.shape[:-1]).reshape(-1)
    trilinear_scatter(data, idx[mask], slices.reshape(-1)[mask])
    if weights is not None and slice_weights is not None:
        trilinear_scatter(weights, idx[mask], slice_weights.reshape(-1)[mask].to(weights.dtype))


class FourierAccumulator:
    """Data and weight grids of one reconstruction (one half-map), finalised by Wiener-like division."""

    def __init__(self, box: int, pad: int = 2, *, device=None, dtype=torch.float32) -> None:
        self.box, self.pad = box, pad
        D = box * pad
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        self.data = torch.zeros((D, D, D), dtype=cdtype, device=device)
        self.weights = torch.zeros((D, D, D), dtype=dtype, device=device)

    def insert(self, slices: torch.Tensor, slice_weights: torch.Tensor, rotations: torch.Tensor,
               symmetry: torch.Tensor | None = None) -> None:
        """Insert ``slices`` (already weighted: Σ w·CTF·X) with weights (Σ w·CTF²) at ``rotations``.

        With ``symmetry`` ``(n_sym, 3, 3)`` every slice is inserted once per operator (at ``A · S``).
        """
        kx0 = torch.ones(slices.shape[-1], device=slices.device, dtype=slice_weights.dtype)
        kx0[0] = 0.5
        ops = symmetry if symmetry is not None else torch.eye(3, dtype=rotations.dtype, device=rotations.device)[None]
        for s in ops:
            insert_slices(self.data, self.weights, slices * kx0, slice_weights * kx0, rotations @ s, self.pad)

    def to(self, device) -> "FourierAccumulator":
        """The same grids on ``device`` (a worker's accumulators travel back on the CPU)."""
        out = FourierAccumulator.__new__(FourierAccumulator)
        out.box, out.pad, out.data, out.weights = self.box, self.pad, self.data.to(device), self.weights.to(device)
        return out

    @classmethod
    def total(cls, parts: "list[FourierAccumulator]") -> "FourierAccumulator":
        """A new accumulator holding the sum of ``parts`` (a half-set from its two quarter-sets)."""
        out = cls.__new__(cls)
        out.box, out.pad, out.data, out.weights = parts[0].box, parts[0].pad, parts[0].data.clone(), parts[0].weights.clone()
        for p in parts[1:]:
            out.add(p)
        return out

    def add(self, other: "FourierAccumulator") -> None:
        """Reduce: accumulators of different items (or machines) simply add."""
        self.data += other.data.to(self.data.device)
        self.weights += other.weights.to(self.weights.device)

    def finalise(self, wiener_constant: float = 1e-3, size: int | None = None) -> torch.Tensor:
        """The map, cropped to ``size`` (default: the box): Friedel-symmetrised data / (weights + c · mean
        weight), gridding-corrected.

        The symmetrised grid is Hermitian, so only its half kx ≥ 0 is formed (``_friedel_half``) and inverted
        with ``irfftn``: the temporaries are half-grids, not whole copies (refining a 200-px species peaked at
        6.6 GB with whole-grid temporaries, 4.5 GB with these)."""
        D = self.box * self.pad
        data = _friedel_half(self.data, conjugate=True)
        weights = _friedel_half(self.weights, conjugate=False)
        c = wiener_constant * _mean_positive_symmetrised(self.weights)
        data /= weights.add_(c)
        del weights
        data = torch.fft.ifftshift(data, dim=(-3, -2))  # centred → FFT order along z and y; x is kx = 0..D/2
        real = torch.fft.fftshift(torch.fft.irfftn(data, s=(D, D, D), dim=(-3, -2, -1)), dim=(-3, -2, -1))
        del data
        size = size or self.box
        vol = crop_center(real, size, dims=3)
        return vol / gridding_correction(size, D, device=vol.device, dtype=vol.dtype)


def _friedel_half(grid: torch.Tensor, *, conjugate: bool) -> torch.Tensor:
    """``g(k) + g(−k)`` (conjugated for data) on the half kx ≥ 0 of a centred even grid, ``(D, D, D/2 + 1)`` in
    rfft order along x (kx = 0 … D/2). On the periodic grid ``−k`` is index ``(D − i) mod D`` on each axis: the
    Nyquist planes (index 0) pair with themselves, so the result is Hermitian and ``irfftn`` inverts it exactly."""
    D = grid.shape[-1]
    h = D // 2
    neg = (-torch.arange(D, device=grid.device)) % D
    out = torch.empty((D, D, h + 1), dtype=grid.dtype, device=grid.device)
    out[..., :h] = grid[..., h:]
    out[..., h] = grid[..., 0]
    # output column m ≥ 0 (kx = m) pairs with column h − m of the centred grid: columns h … 0, i.e. 0 … h flipped
    mirror = grid[..., :h + 1].flip(-1).index_select(0, neg).index_select(1, neg)
    out += mirror.conj() if conjugate else mirror
    return out


def _mean_positive_symmetrised(weights: torch.Tensor, slab: int = 16) -> torch.Tensor:
    """The mean of the positive values of ``w(k) + w(−k)`` over the whole periodic grid, a slab at a time."""
    D = weights.shape[-1]
    neg = (-torch.arange(D, device=weights.device)) % D
    total = torch.zeros((), dtype=torch.float64, device=weights.device)
    count = torch.zeros((), dtype=torch.int64, device=weights.device)
    for start in range(0, D, slab):
        rows = torch.arange(start, min(start + slab, D), device=weights.device)
        w = weights[rows] + weights[neg[rows]].index_select(1, neg).index_select(2, neg)
        positive = w[w > 0]
        total += positive.double().sum()
        count += positive.numel()
    return (total / count).to(weights.dtype) if int(count) else torch.ones((), dtype=weights.dtype,
                                                                            device=weights.device)
