"""Multi-particle refinement of one item (tilt series) for one half-set.

All particles of all species in the item form one system. The target is M's
weighted normalised cross-correlation (digest §2.5), summed over species,
particles and tilts,

    M = Σ w D P·(CTF ⊙ X) / √(Σ w D² CTF²|P|² · Σ w |X|²)

where P is the central slice of the particle's own half-map reference at
``R_i A_p``, X the particle's tilt image extracted (and masked) at its
modelled position, CTF ⊙ X the CTF-premultiplied data computed in an
aliasing-free box (M's rule) that also holds the masked particle's
delocalised image, then cropped, CTF² the matching band-limited CTF²,
D the exposure attenuation of the tilt (B = 4 Å² per e⁻/Å²), w = cos(tilt) on
the tilt's band: from the particle diameter to the species' own working
resolution (M crops each species to its resolution) or, if
lower, the frequency where the tilt's exposure weight falls below 0.25 (M's
exposure-dependent cropping; tilts that share a band edge share the
aliasing-free box that edge needs, so late, high-exposure tilts are
processed in smaller boxes). The model of a particle image is D·CTF·P; the
normalisation is the maximum-likelihood one under white noise. It differs from
M's formula on purpose: M normalises by the premultiplied data (Σ W² CTF²|X|²)
and weights both sides by the dose weight, and by Cauchy–Schwarz such a
target prefers CTF shapes that emphasise high-SNR frequencies. Parameters
(per enabled group): per-tilt shifts and stage-angle corrections, image-warp
and volume-warp grids, per-particle position and orientation offsets at each
of the trajectory's temporal samples (``trajectories``). Gradients are exact
(autograd); the optimiser is L-BFGS.

Per-tilt defocus and astigmatism are fitted after the geometry and poses, with
a target of their own (``ctf_fit``: M's exhaustive search, then L-BFGS):
premultiplication moves the defocus-dependent half of the signal (CTF²'s
cos 2χ) twice as far out as the CTF does, beyond a particle-sized mask, so
this target, good for alignment, pins the defocus weakly and with a bias
(measured on noise-free images with the true maps and geometry: 60–1400 Å
off).

Particles are processed in batches under a memory budget; the global
normalisation is kept exact by differentiating
``num_b / √(D1 D2) − ½ M (D1_b / D1 + D2_b / D2)`` per batch with the totals held
fixed, whose sum over batches is the gradient of M.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from .ctf import aliasing_free_box, band_limited_ctf2, ctf_2d, electron_wavelength_angstrom, premultiply_and_crop, \
    reconstruction_box
from .ctf_fit import CTFBatch, circular_mask, comparison_box, fit_ctf, mask_images, pad_projections
from .extraction import angstrom_to_pixel, extract_boxes
from .fourier import rfft_frequencies_2d
from .geometry import rotvec_to_matrix
from .projection import VolumeTransform, extract_slices, prepare_volume
from .regularise import low_pass, low_pass_edge
from .tilt_model import Imaging, TiltGeometry, particle_positions_in_tilts
from .trajectories import orientations_at, positions_at
from .weighting import dose_tilt_weights, exposure_crop_frequency, mid_exposure

__all__ = ["GROUPS", "RefineSettings", "SpeciesInput", "ItemState", "refine_item_half", "ncc", "ctf_zeros_in_band"]

GROUPS = ("tilt_angles", "shifts", "image_warp", "volume_warp", "poses", "defocus", "astigmatism")


@dataclass
class RefineSettings:
    groups: tuple[str, ...] = ("tilt_angles", "shifts", "image_warp", "poses", "defocus")
    image_warp_grid: tuple[int, int] = (3, 3)  # (y, x) control points, one grid per tilt
    volume_warp_grid: tuple[int, int, int, int] = (2, 2, 2, 2)  # (time, z, y, x)
    lbfgs_iterations: int = 40
    rounds: int = 2
    defocus_search_angstrom: float = 3000.0  # ±300 nm
    defocus_step_angstrom: float = 100.0  # 10 nm
    defocus_halvings: int = 4
    resolution_angstrom: float = 20.0  # working resolution: the band's upper edge where a species has none
    low_resolution_angstrom: float | None = None  # band's lower edge (default: the particle diameter)
    memory_budget_bytes: int = 2 * 1024**3
    warp_regularisation: float = 1e-4  # per Å² of warp, relative to the NCC
    exposure_crop_weight: float | None = 0.25  # a tilt's band ends where its exposure weight falls below this


@dataclass
class SpeciesInput:
    name: str
    reference: VolumeTransform  # this half-set's regularised half-map
    box: int
    diameter_angstrom: float
    positions: torch.Tensor  # (n, T, 3) Å trajectories of this half-set's particles in this item
    orientations: torch.Tensor  # (n, T, 3, 3)
    resolution_angstrom: float | None = None  # this species' band edge (M crops each species to its own); None: settings'
    # this half-set's half-map before regularisation: the CTF fit's reference is it low-passed at this species'
    # band (and the data alike), without the regulariser's FSC weighting, which costs defocus precision
    # (docs/physics.md §8); None: the CTF fit uses ``reference`` as it is, unfiltered data
    half_map: torch.Tensor | None = None


@dataclass
class ItemState:
    """The outcome: refined models and poses (same species order as the input)."""

    geometry: TiltGeometry
    imaging: Imaging
    positions: list[torch.Tensor]
    orientations: list[torch.Tensor]
    history: list[float] = field(default_factory=list)  # NCC after each stage


def _mask_2d(box: int, radius_px: float, device, dtype) -> torch.Tensor:
    return circular_mask(box, radius_px, edge_px=max(2.0, 0.1 * radius_px), device=device, dtype=dtype)


class _Model:
    """Current parameters (offsets from the starting state) and how they make geometry and imaging."""

    def __init__(self, geom: TiltGeometry, imaging: Imaging, species: list[SpeciesInput], settings: RefineSettings):
        self.base_geom, self.base_imaging, self.settings = geom, imaging, settings
        dt = geom.tilt_angles_deg.dtype
        dev = geom.tilt_angles_deg.device
        t = geom.n_tilts
        z = lambda *shape: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        self.p: dict[str, torch.Tensor] = {
            "shifts": z(t, 2), "tilt_angles": z(t, 3), "defocus": z(t), "astigmatism": z(t),
            "image_warp": (geom.image_warp.clone() if geom.image_warp is not None
                           and geom.image_warp.shape[2:] == settings.image_warp_grid
                           else z(2, t, *settings.image_warp_grid)),
            "volume_warp": (geom.volume_warp.clone() if geom.volume_warp is not None
                            and geom.volume_warp.shape[1:] == settings.volume_warp_grid
                            else z(3, *settings.volume_warp_grid)),
        }
        self.orientations_in_tilts = []  # the starting orientations at each tilt's dose time, (n, t, 3, 3)
        for k, s in enumerate(species):
            self.p[f"pos{k}"] = z(*s.positions.shape)
            self.p[f"rot{k}"] = z(*s.positions.shape)
            self.orientations_in_tilts.append(orientations_at(s.orientations, geom.dose_time))
        self.species = species
        self.static = False  # True: every temporal sample moves together (a static pose offset)

    def _offsets(self, name: str) -> torch.Tensor:
        p = self.p[name]
        return p[:, :1].expand_as(p) if self.static else p

    def release(self) -> None:
        """From static offsets to trajectories: every sample starts at the static offset."""
        with torch.no_grad():
            for name, p in self.p.items():
                if name.startswith(("pos", "rot")):
                    p.copy_(p[:, :1].expand_as(p))
        self.static = False

    def trainable(self, groups: tuple[str, ...]) -> list[torch.Tensor]:
        names = [g for g in groups if g != "poses"]
        if "poses" in groups:
            names += [k for k in self.p if k.startswith(("pos", "rot"))]
        out = []
        for name, tensor in self.p.items():
            tensor.requires_grad_(name in names)
            if name in names:
                out.append(tensor)
        return out

    def geometry(self) -> TiltGeometry:
        g = self.base_geom
        use = self.settings.groups
        return replace(g, shifts_angstrom=g.shifts_angstrom + self.p["shifts"],
                       angle_corrections_deg=g.angle_corrections_deg + self.p["tilt_angles"],
                       image_warp=self.p["image_warp"] if "image_warp" in use else g.image_warp,
                       volume_warp=self.p["volume_warp"] if "volume_warp" in use else g.volume_warp)

    def imaging(self) -> Imaging:
        im = self.base_imaging
        return replace(im, defocus_u_angstrom=im.defocus_u_angstrom + self.p["defocus"] + self.p["astigmatism"],
                       defocus_v_angstrom=im.defocus_v_angstrom + self.p["defocus"] - self.p["astigmatism"])

    def poses(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The refined trajectories' control points: positions ``(n, T, 3)``, orientations ``(n, T, 3, 3)``."""
        s = self.species[k]
        return s.positions + self._offsets(f"pos{k}"), rotvec_to_matrix(self._offsets(f"rot{k}")) @ s.orientations

    def poses_in_tilts(self, k: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Position control points ``(m, T, 3)`` and orientations at each tilt ``(m, t, 3, 3)``.

        The orientation offsets are interpolated as rotation vectors on top of the starting
        trajectory (equal to :meth:`poses` at the control points, to first order between them).
        """
        s = self.species[k]
        offsets = positions_at(self._offsets(f"rot{k}")[rows], self.base_geom.dose_time)
        return (s.positions[rows] + self._offsets(f"pos{k}")[rows],
                rotvec_to_matrix(offsets) @ self.orientations_in_tilts[k][rows])


@dataclass
class _Terms:
    num: torch.Tensor  # (t,)
    d1: torch.Tensor
    d2: torch.Tensor


@dataclass
class _TiltGroup:
    """Tilts of one species' box that share a working band edge and hence an aliasing-free box size.

    M's memory rule (``weighting.exposure_crop_frequency``): a tilt's images carry nothing useful
    beyond the frequency where its exposure weight falls below 0.25, so its band ends there (or at
    the working resolution, if lower) and its CTF is applied in the box that band needs.
    """

    tilts: torch.Tensor  # (g,) indices into the tilt series
    big: int  # aliasing-free box for this group's band
    attenuation: torch.Tensor  # (g, d, d/2+1) exposure attenuation
    weight: torch.Tensor  # (g, d, d/2+1) cos(tilt) on each tilt's band, 0 elsewhere


@dataclass
class _Fixed:
    """What does not depend on the CTF: extracted boxes, heights, weighted reference slices."""

    group: _TiltGroup
    boxes: torch.Tensor  # (n, g, B, B/2+1)
    z: torch.Tensor  # (n, g)
    ref: torch.Tensor  # (n, g, d, d/2+1)


MASK_RADIUS = 0.55  # the particle images' circular mask, in particle diameters


def _fixed(model: _Model, k: int, stack: torch.Tensor, rows: slice, geometry: TiltGeometry,
           group: _TiltGroup) -> _Fixed:
    s = model.species[k]
    tilts = group.tilts
    pos, ori = model.poses_in_tilts(k, rows)
    xy, z = particle_positions_in_tilts(geometry, pos)
    rot = geometry.orientation_rotations()[tilts] @ ori[:, tilts]  # (n, g, 3, 3)
    px = angstrom_to_pixel(xy[:, tilts], geometry.pixel_size_angstrom, geometry.image_size_px)
    boxes = extract_boxes(stack[tilts], px.to(stack.dtype), group.big)
    return _Fixed(group, boxes, z[:, tilts], extract_slices(s.reference, rot.to(stack.dtype)))


def _ctf_terms(model: _Model, k: int, fixed: _Fixed, geometry: TiltGeometry, imaging: Imaging) -> _Terms:
    """Per-tilt sums ``(t,)`` of the target for one batch and tilt group, given its CTF-independent part."""
    s, group = model.species[k], fixed.group
    tilts, big = group.tilts, group.big
    dtype = fixed.boxes.real.dtype
    du = imaging.defocus_u_angstrom[tilts] + imaging.handedness * fixed.z
    dv = imaging.defocus_v_angstrom[tilts] + imaging.handedness * fixed.z
    ctf = ctf_2d(du.to(dtype), dv.to(dtype), imaging.defocus_angle_deg[tilts].expand_as(du).to(dtype),
                 voltage_kv=imaging.voltage_kv, spherical_aberration_mm=imaging.spherical_aberration_mm,
                 amplitude_contrast=imaging.amplitude_contrast, pixel_size_angstrom=geometry.pixel_size_angstrom,
                 size=big)
    mask = _mask_2d(s.box, MASK_RADIUS * s.diameter_angstrom / geometry.pixel_size_angstrom, fixed.boxes.device, dtype)

    def masked(ft):
        real = torch.fft.fftshift(torch.fft.irfft2(ft, s=(s.box, s.box)), dim=(-2, -1)) * mask
        return torch.fft.rfft2(torch.fft.ifftshift(real, dim=(-2, -1)))
    data_ctf = masked(premultiply_and_crop(fixed.boxes, ctf, s.box))
    data = masked(premultiply_and_crop(fixed.boxes, torch.ones_like(ctf), s.box))
    ctf2 = band_limited_ctf2(ctf, s.box)
    w, attenuation = group.weight, group.attenuation
    n_tilts = imaging.defocus_u_angstrom.shape[0]

    def per_tilt(x):
        sums = x.sum(dim=(0, 2, 3))
        return sums.new_zeros(n_tilts).index_add(0, tilts, sums)
    return _Terms(num=per_tilt(w * attenuation * (fixed.ref.conj() * data_ctf).real),
                  d1=per_tilt(w * attenuation**2 * ctf2 * fixed.ref.abs() ** 2),
                  d2=per_tilt(w * data.abs() ** 2))


def _tilt_groups(settings: RefineSettings, species: SpeciesInput, geom: TiltGeometry, imaging: Imaging,
                 pre: torch.Tensor, exposure: torch.Tensor, low_angstrom: float, dtype) -> list[_TiltGroup]:
    px = geom.pixel_size_angstrom
    device = pre.device
    attenuation = dose_tilt_weights(pre, exposure, geom.tilt_angles_deg, size=species.box,
                                    pixel_size_angstrom=px, cos_tilt=False).to(dtype)
    tilt_weight = torch.cos(torch.deg2rad(geom.tilt_angles_deg)).clamp(min=0).to(dtype)[:, None, None]
    ky, kx = rfft_frequencies_2d(species.box, px, device=device, dtype=dtype)
    k = torch.sqrt(kx**2 + ky**2)
    max_def = _max_defocus(settings, geom, imaging)
    edges = _band_edges(settings, species, pre, exposure)
    optics = dict(voltage_kv=imaging.voltage_kv, spherical_aberration_mm=imaging.spherical_aberration_mm)
    # the box must sample the CTF (M's rule) and hold the masked particle's delocalised model image, which
    # would otherwise wrap around in it; multiples of 8: few groups, fast FFT sizes
    bigs = [max(species.box, 8 * math.ceil(max(aliasing_free_box(max_def, 1.0 / e, px, **optics), reconstruction_box(
        2 * MASK_RADIUS * species.diameter_angstrom, max_def, 1.0 / e, px, **optics)) / 8)) for e in edges]
    band = torch.stack([((k <= e) & (k >= 1.0 / low_angstrom)).to(dtype) for e in edges])
    groups = []
    for big in sorted(set(bigs), reverse=True):
        tilts = torch.tensor([i for i, b in enumerate(bigs) if b == big], dtype=torch.long, device=device)
        groups.append(_TiltGroup(tilts, big, attenuation[tilts], tilt_weight[tilts] * band[tilts]))
    return groups


def _resolution(species: SpeciesInput, settings: RefineSettings) -> float:
    return species.resolution_angstrom or settings.resolution_angstrom


def _max_defocus(settings: RefineSettings, geom: TiltGeometry, imaging: Imaging) -> float:
    """The largest defocus a particle may be given: tilt defocus + search range + tomogram thickness."""
    return float(imaging.defocus_u_angstrom.abs().max() + settings.defocus_search_angstrom
                 + geom.tomogram_size_angstrom[2])


def _band_edges(settings: RefineSettings, species: SpeciesInput, pre: torch.Tensor, exposure: torch.Tensor) -> list[float]:
    """Each tilt's band edge (1/Å): the species' working resolution, or where the exposure weight falls below
    the crop weight."""
    edges = []
    for dose in mid_exposure(pre, exposure).tolist():
        edge = 1.0 / _resolution(species, settings)
        if settings.exposure_crop_weight is not None:
            edge = min(edge, exposure_crop_frequency(dose, weight=settings.exposure_crop_weight))
        edges.append(edge)
    return edges


class _RebuiltBatches:
    """The CTF fit's batches, rebuilt on every pass: what a system too large to hold them costs in time."""

    def __init__(self, build: Callable[[], Iterator[CTFBatch]]):
        self.build = build

    def __iter__(self) -> Iterator[CTFBatch]:
        return self.build()


def _ctf_batches(model: _Model, stack: torch.Tensor, pre: torch.Tensor, exposure: torch.Tensor,
                 settings: RefineSettings) -> list[CTFBatch] | _RebuiltBatches:
    """The CTF fit's view of the current system (``ctf_fit``): masked images and reference projections,
    per species and comparison box, in batches under the memory budget.

    Held in memory when all batches together fit in half the budget, otherwise rebuilt on each pass
    (``ctf_fit`` makes one pass per search level and per L-BFGS evaluation).
    """
    refs = [_ctf_reference(s, settings, model.base_geom.pixel_size_angstrom) for s in model.species]
    held = sum(_iter_ctf_batches(model, stack, pre, exposure, settings, refs, sizes_only=True))
    if held <= settings.memory_budget_bytes // 2:
        return list(_iter_ctf_batches(model, stack, pre, exposure, settings, refs))
    return _RebuiltBatches(lambda: _iter_ctf_batches(model, stack, pre, exposure, settings, refs))


@torch.no_grad()
def _ctf_reference(species: SpeciesInput, settings: RefineSettings, pixel_size_angstrom: float
                   ) -> tuple[VolumeTransform, float | None]:
    """The CTF fit's reference for one species and the resolution of the low-pass the data get alike (None: none)."""
    if species.half_map is None:
        return species.reference, None
    res = _resolution(species, settings)
    return prepare_volume(low_pass(species.half_map, pixel_size_angstrom=pixel_size_angstrom,
                                   resolution_angstrom=res)), res


@torch.no_grad()  # the decorator, not a with-block: grad mode must not leak to the consumer across yields
def _iter_ctf_batches(model: _Model, stack: torch.Tensor, pre: torch.Tensor, exposure: torch.Tensor,
                      settings: RefineSettings, refs: list, *, sizes_only: bool = False) -> Iterator:
    """Yield the CTF batches (or, with ``sizes_only``, the bytes each would hold)."""
    geometry, imaging = model.geometry(), model.imaging()
    px = geometry.pixel_size_angstrom
    dtype, device = torch.float64, stack.device  # a few Å of astigmatism move a float32 correlation by its rounding
    low = settings.low_resolution_angstrom or max(sp.diameter_angstrom for sp in model.species)
    max_def = _max_defocus(settings, geometry, imaging)
    optics = dict(voltage_kv=imaging.voltage_kv, spherical_aberration_mm=imaging.spherical_aberration_mm)
    tilt_weight = torch.cos(torch.deg2rad(geometry.tilt_angles_deg)).clamp(min=0).to(dtype)
    for k, s in enumerate(model.species):
        edges = _band_edges(settings, s, pre, exposure)
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
            size = max(1, int(settings.memory_budget_bytes // per_particle))
            for start in range(0, len(s.positions), size):
                rows = slice(start, min(start + size, len(s.positions)))
                if sizes_only:  # data and projections, complex128
                    yield 2 * (rows.stop - rows.start) * len(idx) * box * (box // 2 + 1) * 16
                    continue
                pos, ori = model.poses_in_tilts(k, rows)
                xy, z = particle_positions_in_tilts(geometry, pos)
                rot = geometry.orientation_rotations()[tilts] @ ori[:, tilts]
                pix = angstrom_to_pixel(xy[:, tilts], px, geometry.image_size_px)
                data = mask_images(data_filter * extract_boxes(stack[tilts].to(dtype), pix.to(dtype), box), mask)
                slices = extract_slices(reference, rot.to(reference.ft.real.dtype)).to(torch.complex128)
                projections = pad_projections(slices, box)
                yield CTFBatch(tilts, data, projections, z[:, tilts], tilt_weight[tilts, None, None] * band,
                               attenuation, mask)


class _Objective:
    def __init__(self, model: _Model, stack: torch.Tensor, pre: torch.Tensor, exposure: torch.Tensor,
                 settings: RefineSettings):
        self.model, self.stack, self.settings = model, stack, settings
        low = settings.low_resolution_angstrom or max(sp.diameter_angstrom for sp in model.species)
        groups: dict[tuple[int, float], list[_TiltGroup]] = {}  # by box and band edge
        self.batches: list[tuple[int, slice, _TiltGroup]] = []
        for k, s in enumerate(model.species):
            key = (s.box, _resolution(s, settings))
            if key not in groups:
                groups[key] = _tilt_groups(settings, s, model.base_geom, model.base_imaging, pre, exposure, low,
                                           stack.dtype)
            for group in groups[key]:
                per_particle = len(group.tilts) * group.big ** 2 * stack.element_size() * 24  # FFT work buffers
                size = max(1, int(settings.memory_budget_bytes // per_particle))
                n = len(s.positions)
                self.batches += [(k, slice(i, min(i + size, n)), group) for i in range(0, n, size)]

    def terms(self, *, grad: bool) -> list[_Terms]:
        geometry, imaging = self.model.geometry(), self.model.imaging()
        out = []
        with torch.set_grad_enabled(grad):
            for k, rows, group in self.batches:
                fixed = _fixed(self.model, k, self.stack, rows, geometry, group)
                out.append(_ctf_terms(self.model, k, fixed, geometry, imaging))
        return out

    def value(self) -> float:
        t = self.terms(grad=False)
        return float(ncc(sum(x.num.sum() for x in t), sum(x.d1.sum() for x in t), sum(x.d2.sum() for x in t)))

    def _regulariser(self) -> torch.Tensor:
        reg = torch.zeros((), dtype=self.stack.dtype)
        lam = self.settings.warp_regularisation
        for name in ("image_warp", "volume_warp"):
            if self.model.p[name].requires_grad:
                reg = reg + lam * (self.model.p[name] ** 2).mean()
        return reg

    def loss_and_backward(self) -> float:
        """−M with exact gradients accumulated batch by batch (a no-grad pass first, for the totals)."""
        with torch.no_grad():
            t = self.terms(grad=False)
            num = sum(x.num.sum() for x in t)
            d1, d2 = sum(x.d1.sum() for x in t), sum(x.d2.sum() for x in t)
            m = ncc(num, d1, d2)
        for k, rows, group in self.batches:
            geometry, imaging = self.model.geometry(), self.model.imaging()  # a fresh graph per batch
            x = _ctf_terms(self.model, k, _fixed(self.model, k, self.stack, rows, geometry, group), geometry, imaging)
            part = x.num.sum() / torch.sqrt(d1 * d2) - 0.5 * m * (x.d1.sum() / d1 + x.d2.sum() / d2)
            (-part).backward()
        reg = self._regulariser()
        if reg.requires_grad:
            reg.backward()
        return float(-m + reg.detach())


def ncc(num, d1, d2):
    return num / torch.sqrt(d1 * d2).clamp(min=1e-30)


def ctf_zeros_in_band(imaging: Imaging, resolution_angstrom: float) -> int:
    """How many CTF zeros (at the mean defocus, Cs neglected) lie below the working resolution."""
    from_defocus = float(imaging.defocus_u_angstrom.mean() + imaging.defocus_v_angstrom.mean()) / 2
    lam = electron_wavelength_angstrom(imaging.voltage_kv)
    return int(lam * max(from_defocus, 0.0) / resolution_angstrom**2)


# Measured with the true maps and geometry (ctf_fit's target; 5 Å/px, 5 µm, 16 particles of two species
# per tilt, per-tilt RMS error from 253 Å): 3.8 zeros in the band → 56 Å, 2.5 → 86 Å (seed 1: 282 → 66, 106 Å),
# 1.6 → 152 Å; at 10 Å/px, whose noise per unit of band is 4× higher: 2.5 zeros → 215 Å, 1.6 → 298 Å (worse).
MIN_CTF_ZEROS_FOR_DEFOCUS = 3


def refine_item_half(stack: torch.Tensor, geometry: TiltGeometry, imaging: Imaging, pre_exposure: torch.Tensor,
                     exposure: torch.Tensor, species: list[SpeciesInput], settings: RefineSettings) -> ItemState:
    """Refine one half-set's system in one item; returns the refined models and poses.

    Per-tilt defocus (and astigmatism) are refined only when the working band holds at least
    ``MIN_CTF_ZEROS_FOR_DEFOCUS`` CTF zeros: below that the data constrain them weakly (a 300 Å
    error moves the CTF phase at the band edge by ~0.06 rad at 3 zeros and 18 Å) and the fit may
    follow the noise. They are held while the geometry and poses are refined (the alignment target
    barely depends on them), then fitted at the refined geometry with ``ctf_fit``'s target: a fit at
    the starting geometry, with particles ~14 Å off, put some tilts 900–2900 Å off in the first
    iteration the gate opened.
    """
    finest = min(_resolution(s, settings) for s in species)  # the band that carries the CTF's oscillations
    if ctf_zeros_in_band(imaging, finest) < MIN_CTF_ZEROS_FOR_DEFOCUS:
        settings = replace(settings, groups=tuple(g for g in settings.groups if g not in ("defocus", "astigmatism")))
    model = _Model(geometry, imaging, species, settings)
    obj = _Objective(model, stack, pre_exposure, exposure, settings)
    history = [obj.value()]
    ctf_groups = [g for g in ("defocus", "astigmatism") if g in settings.groups]
    settings = replace(settings, groups=tuple(g for g in settings.groups if g not in ("defocus", "astigmatism")))

    def fit_defocus():
        defocus, astigmatism = fit_ctf(
            _ctf_batches(model, stack, pre_exposure, exposure, settings), model.imaging(), geometry.pixel_size_angstrom,
            search_angstrom=settings.defocus_search_angstrom if "defocus" in ctf_groups else 0.0,
            step_angstrom=settings.defocus_step_angstrom, halvings=settings.defocus_halvings,
            astigmatism="astigmatism" in ctf_groups, lbfgs_iterations=settings.lbfgs_iterations)
        with torch.no_grad():
            model.p["defocus"] += defocus
            model.p["astigmatism"] += astigmatism
        history.append(obj.value())
    # trajectories start as static poses: fitting 3 samples per particle from a pose ~1 px off finds
    # worse local optima (measured: 7.2 vs 5.4 Å per-tilt error on particles drifting ~20 Å)
    trajectories = "poses" in settings.groups and any(s.positions.shape[1] > 1 for s in species)
    for stage in (["static"] if trajectories else []) + ["full"] * settings.rounds:
        model.static = stage == "static"
        params = model.trainable(settings.groups)
        if not params:
            break
        opt = torch.optim.LBFGS(params, max_iter=settings.lbfgs_iterations, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-12, history_size=20)

        def closure():
            opt.zero_grad()
            return obj.loss_and_backward()

        opt.step(closure)
        if model.static:
            model.release()
        history.append(obj.value())
    if ctf_groups:
        fit_defocus()
    with torch.no_grad():
        geom, im = model.geometry(), model.imaging()
        geom = replace(geom, shifts_angstrom=geom.shifts_angstrom.detach(),
                       angle_corrections_deg=geom.angle_corrections_deg.detach(),
                       image_warp=None if geom.image_warp is None else geom.image_warp.detach().clone(),
                       volume_warp=None if geom.volume_warp is None else geom.volume_warp.detach().clone())
        im = replace(im, defocus_u_angstrom=im.defocus_u_angstrom.detach(),
                     defocus_v_angstrom=im.defocus_v_angstrom.detach())
        poses = [model.poses(k) for k in range(len(species))]
    return ItemState(geom, im, [p.detach() for p, _ in poses], [o.detach() for _, o in poses], history)

