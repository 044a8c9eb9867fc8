"""Image formation and its inverse for one tilt series: render particles into tilt images, reconstruct maps.

Forward (the simulator's physics): each particle's tilt image is the central
slice of its species map at ``R_i A_p``, multiplied by the CTF at the
particle's own defocus and by the exposure attenuation, computed in a box big
enough for the CTF not to alias (M's rule), shifted to its sub-pixel position
and added into the tilt image.

Inverse (M's reconstruction, digest §2.11): from the original tilt images,
each particle box is extracted, multiplied by its CTF, weighted by exposure
and tilt, and inserted at ``R_i A_p`` into the accumulator of its half-set
(and species), with CTF² as weights. Unlike M, nothing is cropped between
premultiplication and division: the box is ``ctf.reconstruction_box`` (the
particle plus its CTF delocalisation on each side), in which data / weights
is exact; the finalised map is cropped to the species box.
"""

from __future__ import annotations

import torch

from .ctf import ctf_2d, reconstruction_box
from .extraction import angstrom_to_pixel, extract_boxes
from .fourier import fourier_shift_2d, pad_center
from .projection import FourierAccumulator, VolumeTransform, extract_slices
from .tilt_model import Imaging, TiltGeometry, particle_defocus, particle_positions_in_tilts, \
    particle_rotations_in_tilts
from .weighting import dose_tilt_weights

__all__ = ["render_particles", "render_tilt_series", "reconstruct_half_maps", "species_reconstruction_box",
           "ParticleSet"]


class ParticleSet:
    """Particles of one species in one item: positions ``(n, 3)`` Å, orientations ``(n, 3, 3)``, half-sets."""

    def __init__(self, positions: torch.Tensor, orientations: torch.Tensor, half_sets: torch.Tensor | None = None):
        self.positions, self.orientations = positions, orientations
        self.half_sets = half_sets if half_sets is not None else torch.ones(positions.shape[0], dtype=torch.long)

    def __len__(self) -> int:
        return self.positions.shape[0]


def _ctf(imaging: Imaging, u, v, a, pixel: float, size: int) -> torch.Tensor:
    return ctf_2d(u, v, a, voltage_kv=imaging.voltage_kv, spherical_aberration_mm=imaging.spherical_aberration_mm,
                  amplitude_contrast=imaging.amplitude_contrast, pixel_size_angstrom=pixel, size=size)


def render_particles(vt: VolumeTransform, rotations: torch.Tensor, defocus: tuple, imaging: Imaging,
                     attenuation: torch.Tensor, pixel_size_angstrom: float, box: int) -> torch.Tensor:
    """Particle images in the tilts, real space ``(n, t, box, box)``, centred on pixel ``box // 2``.

    ``rotations`` ``(n, t, 3, 3)``; ``defocus`` (U, V, angle) each ``(n, t)``;
    ``attenuation`` ``(t, box, box // 2 + 1)`` exposure weights.
    """
    d = vt.box
    slices = extract_slices(vt, rotations)  # (n, t, d, d//2+1)
    proj = torch.fft.fftshift(torch.fft.irfft2(slices, s=(d, d)), dim=(-2, -1))
    big = torch.fft.rfft2(torch.fft.ifftshift(pad_center(proj, box), dim=(-2, -1)))
    big = big * _ctf(imaging, *defocus, pixel_size_angstrom, box) * attenuation
    return torch.fft.fftshift(torch.fft.irfft2(big, s=(box, box)), dim=(-2, -1))


def _paste(image: torch.Tensor, patches: torch.Tensor, corners_yx: torch.Tensor) -> None:
    """Add ``patches`` ``(n, b, b)`` into ``image`` ``(h, w)`` with their top-left at ``corners_yx`` (in place)."""
    h, w = image.shape
    b = patches.shape[-1]
    off = torch.arange(b, device=image.device)
    ys = corners_yx[:, 0, None] + off
    xs = corners_yx[:, 1, None] + off
    ok = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    lin = ys[:, :, None] * w + xs[:, None, :]
    image.view(-1).index_add_(0, lin[ok], patches[ok])


def render_tilt_series(species: list[tuple[VolumeTransform, ParticleSet]], geom: TiltGeometry, imaging: Imaging,
                       pre_exposure: torch.Tensor, exposure: torch.Tensor, box: int, *,
                       dtype=torch.float32) -> torch.Tensor:
    """Noise-free tilt images ``(t, h, w)`` of all particles of all species."""
    h, w = geom.image_size_px
    pixel = geom.pixel_size_angstrom
    stack = torch.zeros((geom.n_tilts, h, w), dtype=dtype)
    attenuation = dose_tilt_weights(pre_exposure, exposure, geom.tilt_angles_deg, size=box,
                                    pixel_size_angstrom=pixel, cos_tilt=False).to(dtype)
    for vt, parts in species:
        if len(parts) == 0:
            continue
        gdtype = geom.tilt_angles_deg.dtype
        xy, z = particle_positions_in_tilts(geom, parts.positions.to(gdtype))
        rot = particle_rotations_in_tilts(geom, parts.orientations.to(gdtype)).to(vt.dtype)
        z = z.to(vt.dtype)
        px = angstrom_to_pixel(xy, pixel, (h, w))  # (n, t, 2)
        for i in range(geom.n_tilts):
            defocus = particle_defocus(_tilt(imaging, i), z[:, i])
            patches = render_particles(vt, rot[:, i:i + 1], tuple(x[:, None] for x in defocus), imaging,
                                       attenuation[i:i + 1], pixel, box)[:, 0]
            centre = torch.round(px[:, i])
            frac = px[:, i] - centre
            shifted = torch.fft.irfft2(fourier_shift_2d(torch.fft.rfft2(patches), frac), s=(box, box))
            corners = (centre.flip(-1) - box // 2).long()
            _paste(stack[i], shifted.to(dtype), corners)
    return stack


def _tilt(imaging: Imaging, i: int) -> Imaging:
    return Imaging(imaging.defocus_u_angstrom[i], imaging.defocus_v_angstrom[i], imaging.defocus_angle_deg[i],
                   imaging.voltage_kv, imaging.spherical_aberration_mm, imaging.amplitude_contrast,
                   imaging.handedness)


def species_reconstruction_box(diameter_angstrom: float, species_box: int, pixel_size_angstrom: float,
                               max_defocus_angstrom: float, *, voltage_kv: float, spherical_aberration_mm: float,
                               max_bytes: float | None = None) -> int:
    """The box a species is reconstructed in (up to Nyquist): ``ctf.reconstruction_box``, at least the species box.

    With ``max_bytes``, capped so that one pair of half-map accumulators (padded 2×, complex data
    and real weights) fits; the map is then only as exact as that box allows.
    """
    box = max(species_box, reconstruction_box(diameter_angstrom, max_defocus_angstrom, 2 * pixel_size_angstrom,
                                              pixel_size_angstrom, voltage_kv=voltage_kv,
                                              spherical_aberration_mm=spherical_aberration_mm))
    if max_bytes is not None:
        fits = int((max_bytes / (2 * 12)) ** (1 / 3) / 2)  # 2 accumulators × (2B)³ × (8 + 4) bytes
        box = max(species_box, min(box, fits - fits % 2))
    return box


def reconstruct_half_maps(stack: torch.Tensor, geom: TiltGeometry, imaging: Imaging, particles: ParticleSet,
                          pre_exposure: torch.Tensor, exposure: torch.Tensor, *, box: int,
                          symmetry: torch.Tensor | None = None,
                          accumulators: tuple[FourierAccumulator, ...] | None = None,
                          ) -> tuple[FourierAccumulator, ...]:
    """Insert every particle-tilt of one species in one item into its half-set's accumulator.

    ``box`` must hold each particle's whole delocalised image (``ctf.reconstruction_box``).
    Returns the (possibly given) accumulators, one per set label in ``particles.half_sets`` (1, 2; or
    1–4 for quarter-sets); add those of all items, then ``finalise(size=species box)``.
    """
    pixel = geom.pixel_size_angstrom
    dtype = stack.dtype
    accs = accumulators or (FourierAccumulator(box, dtype=dtype), FourierAccumulator(box, dtype=dtype))
    if len(particles) == 0:
        return accs
    gdtype = geom.tilt_angles_deg.dtype  # geometry is computed in the model's precision, then cast
    xy, z = particle_positions_in_tilts(geom, particles.positions.to(gdtype))
    rot = particle_rotations_in_tilts(geom, particles.orientations.to(gdtype)).to(dtype)
    px = angstrom_to_pixel(xy, pixel, geom.image_size_px).to(dtype)
    z = z.to(dtype)
    weights = dose_tilt_weights(pre_exposure.to(dtype), exposure.to(dtype), geom.tilt_angles_deg.to(dtype),
                                size=box, pixel_size_angstrom=pixel)
    attenuation = dose_tilt_weights(pre_exposure.to(dtype), exposure.to(dtype), geom.tilt_angles_deg.to(dtype),
                                    size=box, pixel_size_angstrom=pixel, cos_tilt=False)
    for i in range(geom.n_tilts):
        boxes = extract_boxes(stack[i:i + 1], px[:, i:i + 1], box)[:, 0]  # (n, B, B/2+1)
        u, v, a = particle_defocus(_tilt(imaging, i), z[:, i])
        ctf = _ctf(imaging, u, v, a, pixel, box)
        data = boxes * ctf * weights[i]
        ctf2 = ctf**2 * weights[i] * attenuation[i]
        for label, acc in enumerate(accs, 1):  # half-sets 1, 2 (or quarter-sets 1–4 with four accumulators)
            sel = particles.half_sets == label
            if sel.any():
                acc.insert(data[sel], ctf2[sel], rot[sel, i], symmetry)
    return accs
