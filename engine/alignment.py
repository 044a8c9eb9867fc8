"""The alignment target of one item's multi-particle system, for one half-set.

M's weighted normalised cross-correlation (digest §2.5), summed over species, particles and tilts,

    M = Σ w D P·(CTF ⊙ X) / √(Σ w D² CTF²|P|² · Σ w |X|²)

where P is the central slice of the particle's own half-map reference at ``R_i A_p``, moved to
the particle's modelled position in the tilt, X the particle's tilt image extracted and masked,
CTF ⊙ X the CTF-premultiplied data computed in an aliasing-free box (M's rule) that also holds
the masked particle's delocalised image, then cropped, CTF² the matching band-limited CTF², D the
exposure attenuation of the tilt (B = 4 Å² per e⁻/Å²), w = cos(tilt) on the tilt's band: from the
particle diameter to the species' own working resolution (M crops each species to its
resolution) or, if lower, the frequency where the tilt's exposure weight falls below 0.25 (M's
exposure-dependent cropping; tilts that share a band edge share the aliasing-free box that edge
needs). The model of a particle image is D·CTF·P; the normalisation is the maximum-likelihood one
under white noise. It differs from M's formula on purpose: M normalises by the premultiplied data
(Σ W² CTF²|X|²) and weights both sides by the dose weight, and by Cauchy–Schwarz such a target
prefers CTF shapes that emphasise high-SNR frequencies.

How it stays cheap (M's own economy, "Optimization procedure"): the data side is extracted,
premultiplied, masked and cropped once per round (:meth:`AlignmentTarget.prepare`) at the
particles' positions at that moment, and only the frequencies inside the band are kept. An
evaluation then samples each reference slice at those frequencies only and moves it to the
particle's current position with a phase ramp, ``P · exp(−2πi k·δ)``, δ being how far the model
has moved the particle since the extraction: no FFT, no re-extraction, and autograd keeps only
``(particles, tilts, band)``-sized tensors. Within a round the mask and the CTF stay where the
extraction put them (the mask is ~1.1 diameters wide and a round moves particles by a pixel or
two; a height change of a few Å moves the CTF by nothing measurable); each new round
re-extracts. The data's own norm Σ w |X|² is a constant of the round.

Particles are processed in batches under a memory budget; the global normalisation is kept exact
by differentiating ``num_b / √(D1 D2) − ½ M (D1_b / D1 + D2_b / D2)`` per batch with the totals
held fixed, whose sum over batches is the gradient of M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ctf import aliasing_free_box, band_limited_ctf2, ctf_2d, premultiply_and_crop, reconstruction_box
from .ctf_fit import circular_mask
from .extraction import angstrom_to_pixel, extract_boxes
from .fourier import rfft_frequencies_2d
from .projection import crop_transform, extract_points, prepare_volume
from .refine_params import ItemParameters, SpeciesInput
from .tilt_model import Imaging, TiltGeometry, particle_positions_in_tilts
from .weighting import dose_tilt_weights, exposure_crop_frequency, mid_exposure

__all__ = ["MASK_RADIUS", "TiltGroup", "AlignmentTarget", "ncc", "band_edges", "max_defocus", "comparison_box",
           "masked_reference", "log_likelihood_gain"]

MASK_RADIUS = 0.55  # the particle images' circular mask, in particle diameters


@dataclass
class TiltGroup:
    """Tilts of one species' box that share a working band edge and hence an aliasing-free box size.

    M's memory rule (``weighting.exposure_crop_frequency``): a tilt's images carry nothing useful
    beyond the frequency where its exposure weight falls below 0.25, so its band ends there (or at
    the working resolution, if lower) and its CTF is applied in the box that band needs.
    """

    tilts: torch.Tensor  # (g,) indices into the tilt series
    big: int  # aliasing-free box for this group's band
    box: int  # c, the comparison box (``comparison_box``)
    attenuation: torch.Tensor  # (g, c, c/2+1) exposure attenuation
    weight: torch.Tensor  # (g, c, c/2+1) cos(tilt) on each tilt's band, 0 elsewhere

    def band(self) -> torch.Tensor:
        """Flat rfft indices ``(K,)`` of the frequencies any of the group's tilts uses."""
        return (self.weight > 0).any(0).flatten().nonzero().flatten()


@dataclass
class _Terms:
    num: torch.Tensor  # (t,)
    d1: torch.Tensor
    d2: torch.Tensor


@dataclass
class _Extracted:
    """One batch's data side, fixed for a round: the band's frequencies of the premultiplied, masked boxes."""

    at_px: torch.Tensor  # (n, g, 2) where each particle was extracted, pixels (x, y)
    data: torch.Tensor  # (n, g, K) complex: w·D·(CTF ⊙ X)
    ctf2: torch.Tensor  # (n, g, K) real: w·D²·CTF²
    d2: torch.Tensor  # (t,) Σ w |X|² per tilt
    frequencies: torch.Tensor  # (K, 2) the band's (kx, ky), cycles per comparison box


@dataclass
class _Batch:
    species: int
    rows: slice
    group: TiltGroup
    extracted: _Extracted | None = None


def ncc(num, d1, d2):
    return num / torch.sqrt(d1 * d2).clamp(min=1e-30)


def log_likelihood_gain(before: float, after: float, samples: float) -> float:
    """The log-likelihood ratio of two fits with normalised correlations ``before`` and ``after`` over ``samples``
    independent values under white Gaussian noise of unknown level: ``(N / 2) · log((1 − ρ₀²) / (1 − ρ₁²))``
    (the residual of the best-scaled model is the share 1 − ρ² of the data's power)."""
    clamp = lambda r: min(max(r, 0.0), 1.0 - 1e-12)  # noqa: E731  a negative correlation explains nothing
    return 0.5 * samples * (math.log1p(-clamp(before) ** 2) - math.log1p(-clamp(after) ** 2))


def max_defocus(defocus_search_angstrom: float, geom: TiltGeometry, imaging: Imaging) -> float:
    """The largest defocus a particle may be given: tilt defocus + search range + tomogram thickness."""
    return float(imaging.defocus_u_angstrom.abs().max() + defocus_search_angstrom + geom.tomogram_size_angstrom[2])


def band_edges(resolution_angstrom: float, exposure_crop_weight: float | None, pre: torch.Tensor,
               exposure: torch.Tensor) -> list[float]:
    """Each tilt's band edge (1/Å): the working resolution, or where the exposure weight falls below the crop
    weight."""
    edges = []
    for dose in mid_exposure(pre, exposure).tolist():
        edge = 1.0 / resolution_angstrom
        if exposure_crop_weight is not None:
            edge = min(edge, exposure_crop_frequency(dose, weight=exposure_crop_weight))
        edges.append(edge)
    return edges


def _mask_radius_px(diameter_angstrom: float, pixel_size_angstrom: float) -> tuple[float, float]:
    """The particle images' mask: radius and soft edge, pixels."""
    radius = MASK_RADIUS * diameter_angstrom / pixel_size_angstrom
    return radius, max(2.0, 0.1 * radius)


def masked_reference(volume: torch.Tensor, diameter_angstrom: float, pixel_size_angstrom: float, *,
                     band: float | None = None):
    """A half-map reference ready for the target: masked like the particle images (a soft sphere of the same
    radius and edge), so its projections fit in the comparison box, then transformed (``prepare_volume``; with
    ``band``, cycles per box, only what the target samples)."""
    radius, edge = _mask_radius_px(diameter_angstrom, pixel_size_angstrom)
    mask = circular_mask(volume.shape[-1], radius, edge_px=edge, device=volume.device, dtype=volume.dtype, dims=3)
    return prepare_volume(volume * mask, radius=band)


def comparison_box(species: SpeciesInput, pixel_size_angstrom: float) -> int:
    """The box data and model are compared in: the masked particle and nothing more (at most the species box).

    The masked data fit in it whole, so Fourier samples at its spacing lose nothing; the references are
    masked alike (``refine``), so their projections do not wrap into it. A species box is often twice the
    diameter: this box then has ~2.7× fewer frequencies in the band, and an evaluation costs that much less.
    """
    radius, edge = _mask_radius_px(species.diameter_angstrom, pixel_size_angstrom)
    box = math.ceil(2 * (radius + edge) + 2)
    return min(species.box, box + box % 2)


def _tilt_groups(species: SpeciesInput, resolution_angstrom: float, geom: TiltGeometry, imaging: Imaging,
                 pre: torch.Tensor, exposure: torch.Tensor, low_angstrom: float, max_def: float,
                 exposure_crop_weight: float | None, dtype) -> list[TiltGroup]:
    px = geom.pixel_size_angstrom
    device = pre.device
    box = comparison_box(species, px)
    attenuation = dose_tilt_weights(pre, exposure, geom.tilt_angles_deg, size=box,
                                    pixel_size_angstrom=px, cos_tilt=False).to(dtype)
    tilt_weight = torch.cos(torch.deg2rad(geom.tilt_angles_deg)).clamp(min=0).to(dtype)[:, None, None]
    ky, kx = rfft_frequencies_2d(box, px, device=device, dtype=dtype)
    k = torch.sqrt(kx**2 + ky**2)
    edges = band_edges(resolution_angstrom, exposure_crop_weight, pre, exposure)
    optics = dict(voltage_kv=imaging.voltage_kv, spherical_aberration_mm=imaging.spherical_aberration_mm)
    # the box must sample the CTF (M's rule) and hold the masked particle's delocalised model image, which
    # would otherwise wrap around in it; multiples of 8: few groups, fast FFT sizes
    bigs = [max(box, 8 * math.ceil(max(aliasing_free_box(max_def, 1.0 / e, px, **optics), reconstruction_box(
        2 * MASK_RADIUS * species.diameter_angstrom, max_def, 1.0 / e, px, **optics)) / 8)) for e in edges]
    band = torch.stack([((k <= e) & (k >= 1.0 / low_angstrom)).to(dtype) for e in edges])
    groups = []
    for big in sorted(set(bigs), reverse=True):
        tilts = torch.tensor([i for i, b in enumerate(bigs) if b == big], dtype=torch.long, device=device)
        groups.append(TiltGroup(tilts, big, box, attenuation[tilts], tilt_weight[tilts] * band[tilts]))
    return groups


class AlignmentTarget:
    """M's target for one half-set's system, with exact gradients, data extracted once per round."""

    def __init__(self, params: ItemParameters, stack: torch.Tensor, pre: torch.Tensor, exposure: torch.Tensor, *,
                 resolutions: list[float], low_resolution_angstrom: float | None, defocus_search_angstrom: float,
                 exposure_crop_weight: float | None, memory_budget_bytes: int, warp_regularisation: float,
                 priors: dict[str, float] | None = None):
        self.params, self.stack = params, stack
        self.memory_budget_bytes, self.warp_regularisation = memory_budget_bytes, warp_regularisation
        # Gaussian priors on the move of per-tilt groups (group → σ, in the group's units), in log-likelihood units;
        # converted to units of M at each round's start (``value``), where dLL/dM = N·M / (1 − M²)
        self.priors = {g: s for g, s in (priors or {}).items() if s}
        self._prior_scale = 0.0
        species = params.species
        low = low_resolution_angstrom or max(sp.diameter_angstrom for sp in species)
        max_def = max_defocus(defocus_search_angstrom, params.base_geom, params.base_imaging)
        groups: dict[tuple[int, float, float], list[TiltGroup]] = {}  # by box, diameter and band edge
        self.batches: list[_Batch] = []
        px = params.base_geom.pixel_size_angstrom
        self.references = [crop_transform(s.reference, s.box * px / res + 1) for s, res in zip(species, resolutions)]
        for k, (s, res) in enumerate(zip(species, resolutions)):
            key = (s.box, s.diameter_angstrom, res)
            if key not in groups:
                groups[key] = _tilt_groups(s, res, params.base_geom, params.base_imaging, pre, exposure, low,
                                           max_def, exposure_crop_weight, stack.dtype)
            for group in groups[key]:
                # the round's extraction bounds the batch: FFT work buffers in the aliasing-free box
                per_particle = len(group.tilts) * group.big ** 2 * stack.element_size() * 24
                size = max(1, int(memory_budget_bytes // per_particle))
                n = len(s.positions)
                self.batches += [_Batch(k, slice(i, min(i + size, n)), group) for i in range(0, n, size)]

    # -- the round's data side -------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self) -> None:
        """Extract, premultiply, mask and crop every batch at the particles' current positions (a new round)."""
        geometry, imaging = self.params.geometry(), self.params.imaging()
        for b in self.batches:
            b.extracted = self._extract(b, geometry, imaging)

    def _extract(self, b: _Batch, geometry: TiltGeometry, imaging: Imaging) -> _Extracted:
        s, group = self.params.species[b.species], b.group
        tilts, big = group.tilts, group.big
        dtype = self.stack.dtype
        pos, _ = self.params.poses_in_tilts(b.species, b.rows)
        xy, z = particle_positions_in_tilts(geometry, pos)
        at_px = angstrom_to_pixel(xy[:, tilts], geometry.pixel_size_angstrom, geometry.image_size_px)
        boxes = extract_boxes(self.stack[tilts], at_px.to(dtype), big)
        du = imaging.defocus_u_angstrom[tilts] + imaging.handedness * z[:, tilts]
        dv = imaging.defocus_v_angstrom[tilts] + imaging.handedness * z[:, tilts]
        ctf = ctf_2d(du.to(dtype), dv.to(dtype), imaging.defocus_angle_deg[tilts].expand_as(du).to(dtype),
                     voltage_kv=imaging.voltage_kv, spherical_aberration_mm=imaging.spherical_aberration_mm,
                     amplitude_contrast=imaging.amplitude_contrast, pixel_size_angstrom=geometry.pixel_size_angstrom,
                     size=big)
        c = group.box
        radius, edge = _mask_radius_px(s.diameter_angstrom, geometry.pixel_size_angstrom)
        mask = torch.fft.ifftshift(circular_mask(c, radius, edge_px=edge, device=boxes.device, dtype=dtype),
                                   dim=(-2, -1))

        def masked(ft):  # the mask moved to the FFT's own layout (centre at index 0): the images need no shifts
            return torch.fft.rfft2(torch.fft.irfft2(ft, s=(c, c)) * mask)
        band = group.band()
        data_ctf = masked(premultiply_and_crop(boxes, ctf, c)).flatten(-2)[..., band]
        data = masked(premultiply_and_crop(boxes, 1.0, c)).flatten(-2)[..., band]
        ctf2 = band_limited_ctf2(ctf, c).flatten(-2)[..., band]
        w = group.weight.flatten(-2)[:, band]
        att = group.attenuation.flatten(-2)[:, band]
        return _Extracted(at_px, w * att * data_ctf, w * att**2 * ctf2, self._per_tilt(tilts, w * data.abs() ** 2),
                          _band_frequencies(c, band, boxes.device, dtype))

    def _per_tilt(self, tilts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sums = x.sum(dim=(0, 2))
        return sums.new_zeros(self.params.base_geom.n_tilts).index_add(0, tilts, sums)

    # -- evaluation --------------------------------------------------------------------------------------------
    def _terms(self, b: _Batch, geometry: TiltGeometry) -> _Terms:
        s, group, ex = self.params.species[b.species], b.group, b.extracted
        tilts = group.tilts
        pos, ori = self.params.poses_in_tilts(b.species, b.rows)
        xy, _ = particle_positions_in_tilts(geometry, pos)
        rot = geometry.orientation_rotations()[tilts] @ ori[:, tilts]  # (n, g, 3, 3)
        px = angstrom_to_pixel(xy[:, tilts], geometry.pixel_size_angstrom, geometry.image_size_px)
        freq, c = ex.frequencies, group.box
        reference = self.references[b.species]
        slices = extract_points(reference, rot.to(reference.dtype), freq * (s.box / c))  # (n, g, K)
        delta = (px - ex.at_px).to(slices.real.dtype)
        phase = (-2 * math.pi / c) * (delta @ freq.T.to(delta.dtype))  # the slice moved by δ
        model = slices * torch.polar(torch.ones_like(phase), phase)
        return _Terms(num=self._per_tilt(tilts, (model.conj() * ex.data).real),
                      d1=self._per_tilt(tilts, ex.ctf2 * (slices.real**2 + slices.imag**2)), d2=ex.d2)

    def _all_terms(self, *, grad: bool) -> list[_Terms]:
        if any(b.extracted is None for b in self.batches):
            self.prepare()
        geometry = self.params.geometry()
        with torch.set_grad_enabled(grad):
            return [self._terms(b, geometry) for b in self.batches]

    def value(self) -> float:
        """M at the current parameters, freshly extracted there (a round starts where it is measured)."""
        self.prepare()
        t = self._all_terms(grad=False)
        m = float(ncc(sum(x.num.sum() for x in t), sum(x.d1.sum() for x in t), sum(x.d2.sum() for x in t)))
        if self.priors:  # one log-likelihood unit in units of M, here (the round's linearisation)
            self._prior_scale = (1 - min(m, 1 - 1e-9) ** 2) / (self.effective_samples() * max(m, 1e-6))
        return m

    def prior_cost(self, *, grad: bool = False) -> torch.Tensor:
        """−log prior of the current moves of the groups with a prior: Σ ½ (move / σ)², log-likelihood units."""
        cost = torch.zeros((), dtype=self.stack.dtype, device=self.stack.device)
        for name, sigma in self.priors.items():
            p = self.params.p[name]
            if grad and not p.requires_grad:
                continue
            cost = cost + 0.5 * ((p if grad else p.detach()) / sigma).pow(2).sum()
        return cost

    def _regulariser(self) -> torch.Tensor:
        reg = torch.zeros((), dtype=self.stack.dtype, device=self.stack.device)
        for name in ("image_warp", "volume_warp"):
            if self.params.p[name].requires_grad:
                reg = reg + self.warp_regularisation * (self.params.p[name] ** 2).mean()
        if self.priors:
            reg = reg + self._prior_scale * self.prior_cost(grad=True)
        return reg

    def loss_and_backward(self) -> float:
        """−M with exact gradients: one graph for the whole system where it fits in the memory budget, otherwise
        batch by batch (a no-grad pass first, for the totals)."""
        if self._graph_bytes() <= self.memory_budget_bytes:
            t = self._all_terms(grad=True)
            m = ncc(sum(x.num.sum() for x in t), sum(x.d1.sum() for x in t), sum(x.d2.sum() for x in t))
            loss = self._regulariser() - m
            loss.backward()
            return float(loss.detach())
        with torch.no_grad():
            t = self._all_terms(grad=False)
            num = sum(x.num.sum() for x in t)
            d1, d2 = sum(x.d1.sum() for x in t), sum(x.d2.sum() for x in t)
            m = ncc(num, d1, d2)
        for b in self.batches:
            x = self._terms(b, self.params.geometry())  # a fresh graph per batch
            part = x.num.sum() / torch.sqrt(d1 * d2) - 0.5 * m * (x.d1.sum() / d1)  # d2 is fixed for the round
            (-part).backward()
        reg = self._regulariser()
        if reg.requires_grad:
            reg.backward()
        return float(-m + reg.detach())

    def effective_samples(self) -> float:
        """How many independent real data values the target compares: per particle-tilt, the band's frequencies
        of that tilt (2 real values each) times the share of the comparison box the soft mask keeps (Σ mask² / c²).

        The scale that turns a change of M into a log-likelihood ratio (``significant_gain``)."""
        total = 0.0
        for b in self.batches:
            s, g = self.params.species[b.species], b.group
            radius, edge = _mask_radius_px(s.diameter_angstrom, self.params.base_geom.pixel_size_angstrom)
            kept = float((circular_mask(g.box, radius, edge_px=edge, dtype=torch.float64) ** 2).mean())
            per_tilt = (g.weight > 0).flatten(1).sum(1).double()  # (g,) band frequencies of each tilt
            total += (b.rows.stop - b.rows.start) * 2 * kept * float(per_tilt.sum())
        return total

    def _graph_bytes(self) -> int:
        """What autograd keeps of one evaluation of the whole system (an estimate, ``GRAPH_BYTES_PER_POINT``)."""
        return sum(b.extracted.data.numel() * GRAPH_BYTES_PER_POINT for b in self.batches if b.extracted is not None)


# per particle-tilt frequency: sampling grid (3 × float64 and float32), slices, phase, ramp, products and their
# gradients, counted from the operations in ``_terms`` with a margin (an estimate, not a measurement)
GRAPH_BYTES_PER_POINT = 160


def _band_frequencies(box: int, band: torch.Tensor, device, dtype) -> torch.Tensor:
    """(kx, ky) in cycles per box ``(K, 2)`` of the flat rfft indices ``band``."""
    ky = torch.fft.fftfreq(box, device=device, dtype=dtype) * box
    kx = torch.fft.rfftfreq(box, device=device, dtype=dtype) * box
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([gx.flatten()[band], gy.flatten()[band]], -1)
