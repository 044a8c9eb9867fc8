"""Per-tilt defocus and astigmatism from the particles' tilt images: M's exhaustive search, then L-BFGS.

Why a target of its own. The refinement target (``refine_item``) compares CTF-premultiplied
data with CTF²-weighted references inside a particle-sized mask. Premultiplication re-localises
half of the signal, the part of CTF² = ½(1 − cos 2χ) that does not depend on the defocus, and
moves the defocus-dependent half twice as far out as the CTF itself does, beyond the mask. That
suits alignment, but leaves the defocus weakly and wrongly constrained: with noise-free images,
the true maps and the true geometry (5 Å/px, 5 µm, 12 Å), that target put the per-tilt defocus
63–240 Å RMS off the truth, and 1400 Å off for three 100 Å particles alone.

Here the model of a particle's tilt image, D·CTF·P (exposure attenuation, CTF at the particle's
own defocus, projection of its half-map), is compared with the data inside a mask that holds the
particle's whole delocalised image (radius: half the diameter plus the delocalisation at the
band edge, ``ctf.delocalisation_angstrom``), in a box that samples the CTF without aliasing and
lets nothing wrap into the mask. Data and model are masked alike, so each tilt's normalised
correlation is maximal at the true CTF. Tilts are independent given the geometry: each tilt's
defocus maximises its own correlation, over all particles of all species.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .ctf import aliasing_free_box, ctf_2d, delocalisation_angstrom
from .fourier import pad_center
from .tilt_model import Imaging

__all__ = ["CTFBatch", "comparison_box", "circular_mask", "mask_images", "pad_projections", "ctf_terms",
           "fit_ctf"]

EDGE_PX = 3.0  # the mask's soft edge


@dataclass
class CTFBatch:
    """What the CTF fit needs of some particles in some tilts (one comparison box)."""

    tilts: torch.Tensor  # (g,) indices into the tilt series
    data: torch.Tensor  # (n, g, B, B/2+1) masked particle images
    projections: torch.Tensor  # (n, g, B, B/2+1) reference projections (no CTF, unmasked)
    heights: torch.Tensor  # (n, g) Å, each particle's height in each tilt
    weight: torch.Tensor  # (g, B, B/2+1) cos(tilt) on the tilt's band, 0 elsewhere
    attenuation: torch.Tensor  # (g, B, B/2+1) exposure attenuation
    mask: torch.Tensor  # (g, B, B) real-space mask, centre at B // 2


def comparison_box(diameter_angstrom: float, max_defocus_angstrom: float, resolution_angstrom: float,
                   pixel_size_angstrom: float, *, voltage_kv: float, spherical_aberration_mm: float) -> tuple[int, float]:
    """The box (a multiple of 8) and the mask radius (px) that hold a particle's delocalised image.

    The model image reaches ``radius`` from the centre, so in a box of at least twice the mask's
    outer radius nothing wraps around into the mask.
    """
    optics = dict(voltage_kv=voltage_kv, spherical_aberration_mm=spherical_aberration_mm)
    spread = delocalisation_angstrom(max_defocus_angstrom, resolution_angstrom, **optics)
    radius = (diameter_angstrom / 2 + spread) / pixel_size_angstrom
    box = max(aliasing_free_box(max_defocus_angstrom, resolution_angstrom, pixel_size_angstrom, **optics),
              2 * (radius + EDGE_PX))
    return 8 * math.ceil(box / 8), radius


def circular_mask(box: int, radius_px: float, *, edge_px: float = EDGE_PX, device=None,
                  dtype=torch.float32, dims: int = 2) -> torch.Tensor:
    """A soft circle (``dims`` = 3: sphere) with a raised-cosine edge beyond ``radius_px``, centred at ``box // 2``."""
    g = torch.arange(box, device=device, dtype=dtype) - box // 2
    r = torch.sqrt(sum(x**2 for x in torch.meshgrid(*[g] * dims, indexing="ij")))
    return torch.clamp(0.5 + 0.5 * torch.cos(math.pi * (r - radius_px).clamp(0, edge_px) / edge_px), 0, 1)


def mask_images(images_rfft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply centred-at-origin transforms ``(..., B, B/2+1)`` by a centred real-space mask ``(..., B, B)``."""
    b = mask.shape[-1]  # the mask moved to the transforms' layout (centre at index 0), not the images to the mask's
    return torch.fft.rfft2(torch.fft.irfft2(images_rfft, s=(b, b)) * torch.fft.ifftshift(mask, dim=(-2, -1)))


def pad_projections(slices: torch.Tensor, box: int) -> torch.Tensor:
    """Central slices of a ``d``-box map ``(..., d, d/2+1)`` → the same projections in a ``box`` box (zero-padded)."""
    d = slices.shape[-2]
    real = torch.fft.fftshift(torch.fft.irfft2(slices, s=(d, d)), dim=(-2, -1))
    return torch.fft.rfft2(torch.fft.ifftshift(pad_center(real, box), dim=(-2, -1)))


def ctf_terms(batch: CTFBatch, imaging: Imaging, pixel_size_angstrom: float, n_tilts: int,
              defocus_offset: torch.Tensor | None = None, astigmatism_offset: torch.Tensor | None = None):
    """Per-tilt sums ``(n_tilts,)`` of model·data, model² and data² (the normalised correlation's parts)."""
    t = batch.tilts
    dz = imaging.handedness * batch.heights
    du, dv = imaging.defocus_u_angstrom[t] + dz, imaging.defocus_v_angstrom[t] + dz
    if defocus_offset is not None:
        du, dv = du + defocus_offset[t], dv + defocus_offset[t]
    if astigmatism_offset is not None:
        du, dv = du + astigmatism_offset[t], dv - astigmatism_offset[t]
    dtype = batch.data.real.dtype
    box = batch.mask.shape[-1]
    ctf = ctf_2d(du.to(dtype), dv.to(dtype), imaging.defocus_angle_deg[t].expand_as(du).to(dtype),
                 voltage_kv=imaging.voltage_kv, spherical_aberration_mm=imaging.spherical_aberration_mm,
                 amplitude_contrast=imaging.amplitude_contrast, pixel_size_angstrom=pixel_size_angstrom, size=box)
    model = mask_images(batch.attenuation * ctf * batch.projections, batch.mask)
    w = batch.weight

    def per_tilt(x):
        sums = x.sum(dim=(0, 2, 3))
        return sums.new_zeros(n_tilts).index_add(0, t, sums)
    return (per_tilt(w * (model.conj() * batch.data).real), per_tilt(w * model.abs() ** 2),
            per_tilt(w * batch.data.abs() ** 2))


def _per_tilt_ncc(batches, imaging, pixel, n_tilts, defocus_offsets: list, astigmatism_offset=None) -> torch.Tensor:
    """Per-tilt normalised correlations ``(n_tilts, len(defocus_offsets))``, in one pass over the batches
    (which may be rebuilt on each pass: ``refine_item._ctf_batches``)."""
    sums = None
    for b in batches:
        parts = [torch.stack(ctf_terms(b, imaging, pixel, n_tilts, d, astigmatism_offset)) for d in defocus_offsets]
        sums = torch.stack(parts, dim=-1) if sums is None else sums + torch.stack(parts, dim=-1)
    num, d1, d2 = sums
    return num / torch.sqrt(d1 * d2).clamp(min=1e-30)


class _SinglePrecision:
    """The search's view of the batches, in single precision: half the cost of its coarse levels (~80 of its ~85
    passes). The finest level, whose near-ties float32's summation order could break either way, and the L-BFGS
    polish that follows (astigmatism included) run in the batches' own double precision. Batches rebuilt on every
    pass are cast on every pass."""

    def __init__(self, batches: Iterable[CTFBatch]):
        self.batches = batches

    def __iter__(self):
        for b in self.batches:
            yield CTFBatch(b.tilts, b.data.to(torch.complex64), b.projections.to(torch.complex64), b.heights.float(),
                           b.weight.float(), b.attenuation.float(), b.mask.float())


def fit_ctf(batches: Iterable[CTFBatch], imaging: Imaging, pixel_size_angstrom: float, *, search_angstrom: float,
            step_angstrom: float, halvings: int, astigmatism: bool, lbfgs_iterations: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tilt defocus and astigmatism offsets ``(t,)``, ``(t,)``.

    M's search: ±range in steps, then the step halved around each tilt's two best values,
    ``halvings`` times; then L-BFGS on the defocus (and astigmatism) from there.
    """
    n_tilts = imaging.defocus_u_angstrom.shape[0]
    dtype, device = imaging.defocus_u_angstrom.dtype, imaging.defocus_u_angstrom.device
    n = int(round(search_angstrom / step_angstrom))
    offsets = (torch.arange(-n, n + 1, dtype=dtype, device=device) * step_angstrom)[None, :].expand(n_tilts, -1)
    step = step_angstrom
    search = list(_SinglePrecision(batches)) if isinstance(batches, list) else _SinglePrecision(batches)  # cast once
    with torch.no_grad():
        for level in range(halvings + 1):
            scores = _per_tilt_ncc(search if level < halvings else batches, imaging, pixel_size_angstrom, n_tilts,
                                   [offsets[:, j] for j in range(offsets.shape[1])])
            centres = torch.gather(offsets, 1, torch.topk(scores, k=min(2, scores.shape[1]), dim=1).indices)
            if level == halvings:
                break
            step = step / 2
            offsets = torch.cat([centres - step, centres, centres + step], dim=1)
    defocus = centres[:, 0].clone()
    # in units of 10 Å: the correlation's curvature per Å is tiny next to L-BFGS's first step
    scale = 10.0
    u = torch.zeros(n_tilts, dtype=dtype, device=device, requires_grad=True)
    a = torch.zeros(n_tilts, dtype=dtype, device=device, requires_grad=astigmatism)
    params = [u, a] if astigmatism else [u]
    opt = torch.optim.LBFGS(params, max_iter=lbfgs_iterations, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-12, history_size=20)

    def closure():
        opt.zero_grad()
        loss = -_per_tilt_ncc(batches, imaging, pixel_size_angstrom, n_tilts, [defocus + scale * u], scale * a).sum()
        loss.backward()
        return loss

    if lbfgs_iterations > 0:
        opt.step(closure)
    return (defocus + scale * u).detach(), (scale * a).detach()
