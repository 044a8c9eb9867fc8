"""The CTF fit's view of one item's multi-particle system (``ctf_fit``): masked images and reference
projections, per species and comparison box, in batches under a memory budget."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .ctf_fit import CTFBatch, circular_mask, comparison_box, mask_images, pad_projections
from .alignment import band_edges, max_defocus
from .extraction import angstrom_to_pixel, extract_boxes
from .fourier import rfft_frequencies_2d
from .projection import VolumeTransform, extract_slices, prepare_volume
from .refine_params import ItemParameters, SpeciesInput
from .regularise import low_pass, low_pass_edge
from .tilt_model import particle_positions_in_tilts
from .weighting import dose_tilt_weights

__all__ = ["ctf_batches", "RebuiltBatches"]


class RebuiltBatches:
    """The CTF fit's batches, rebuilt on every pass: what a system too large to hold them costs in time."""

    def __init__(self, build: Callable[[], Iterator[CTFBatch]]):
        self.build = build

    def __iter__(self) -> Iterator[CTFBatch]:
        return self.build()


def ctf_batches(params: ItemParameters, stack: torch.Tensor, pre: torch.Tensor, exposure: torch.Tensor, *,
                resolutions: list[float], low_resolution_angstrom: float | None, defocus_search_angstrom: float,
                exposure_crop_weight: float | None, memory_budget_bytes: int) -> list[CTFBatch] | RebuiltBatches:
    """The CTF fit's batches at the current parameters.

    Held in memory when all batches together fit in half the budget, otherwise rebuilt on each pass
    (``ctf_fit`` makes one pass per search level and per L-BFGS evaluation).
    """
    px = params.base_geom.pixel_size_angstrom
    refs = [_ctf_reference(s, res, px) for s, res in zip(params.species, resolutions)]
    options = dict(resolutions=resolutions, low=low_resolution_angstrom, search=defocus_search_angstrom,
                   crop=exposure_crop_weight, budget=memory_budget_bytes, refs=refs)
    held = sum(_iter_ctf_batches(params, stack, pre, exposure, sizes_only=True, **options))
    if held <= memory_budget_bytes // 2:
        return list(_iter_ctf_batches(params, stack, pre, exposure, **options))
    return RebuiltBatches(lambda: _iter_ctf_batches(params, stack, pre, exposure, **options))


@torch.no_grad()
def _ctf_reference(species: SpeciesInput, resolution_angstrom: float, pixel_size_angstrom: float
                   ) -> tuple[VolumeTransform, float | None]:
    """The CTF fit's reference for one species and the resolution of the low-pass the data get alike (None: none)."""
    if species.half_map is None:
        return species.reference, None
    return prepare_volume(low_pass(species.half_map, pixel_size_angstrom=pixel_size_angstrom,
                                   resolution_angstrom=resolution_angstrom)), resolution_angstrom


@torch.no_grad()  # the decorator, not a with-block: grad mode must not leak to the consumer across yields
def _iter_ctf_batches(params: ItemParameters, stack: torch.Tensor, pre: torch.Tensor, exposure: torch.Tensor, *,
                      resolutions: list[float], low: float | None, search: float, crop: float | None, budget: int,
                      refs: list, sizes_only: bool = False) -> Iterator:
    """Yield the CTF batches (or, with ``sizes_only``, the bytes each would hold)."""
    geometry, imaging = params.geometry(), params.imaging()
    px = geometry.pixel_size_angstrom
    dtype, device = torch.float64, stack.device  # a few Å of astigmatism move a float32 correlation by its rounding
    low = low or max(sp.diameter_angstrom for sp in params.species)
    max_def = max_defocus(search, geometry, imaging)
    optics = dict(voltage_kv=imaging.voltage_kv, spherical_aberration_mm=imaging.spherical_aberration_mm)
    tilt_weight = torch.cos(torch.deg2rad(geometry.tilt_angles_deg)).clamp(min=0).to(dtype)
    for k, (s, res) in enumerate(zip(params.species, resolutions)):
        edges = band_edges(res, crop, pre, exposure)
        boxes = [comparison_box(s.diameter_angstrom, max_def, 1.0 / e, px, **optics) for e in edges]
        for box in sorted({b for b, _ in boxes}, reverse=True):
            idx = [i for i, (b, _) in enumerate(boxes) if b == box]
            tilts = torch.tensor(idx, dtype=torch.long, device=device)
            ky, kx = rfft_frequencies_2d(box, px, device=device, dtype=dtype)
            freq = torch.sqrt(kx**2 + ky**2)
            band = torch.stack([((freq <= edges[i]) & (freq >= 1.0 / low)).to(dtype) for i in idx])
            attenuation = dose_tilt_weights(pre[tilts], exposure[tilts], geometry.tilt_angles_deg[tilts], size=box,
                                            pixel_size_angstrom=px, cos_tilt=False).to(dtype)
            mask = torch.stack([circular_mask(box, boxes[i][1], device=device, dtype=dtype) for i in idx])
            reference, low_pass_res = refs[k]
            data_filter = 1.0 if low_pass_res is None else low_pass_edge(freq * s.box * px, s.box, px, low_pass_res)
            per_particle = len(idx) * box**2 * torch.finfo(dtype).bits // 8 * 24  # float64 FFT buffers
            size = max(1, int(budget // per_particle))
            for start in range(0, len(s.positions), size):
                rows = slice(start, min(start + size, len(s.positions)))
                if sizes_only:  # data and projections, complex128
                    yield 2 * (rows.stop - rows.start) * len(idx) * box * (box // 2 + 1) * 16
                    continue
                pos, ori = params.poses_in_tilts(k, rows)
                xy, z = particle_positions_in_tilts(geometry, pos)
                rot = geometry.orientation_rotations()[tilts] @ ori[:, tilts]
                pix = angstrom_to_pixel(xy[:, tilts], px, geometry.image_size_px)
                data = mask_images(data_filter * extract_boxes(stack[tilts].to(dtype), pix.to(dtype), box), mask)
                slices = extract_slices(reference, rot.to(reference.dtype)).to(torch.complex128)
                projections = pad_projections(slices, box)
                yield CTFBatch(tilts, data, projections, z[:, tilts], tilt_weight[tilts, None, None] * band,
                               attenuation, mask)
