"""The parameters of one item's multi-particle system, as offsets from its starting state.

Per enabled group (``GROUPS``): per-tilt shifts and stage-angle corrections, per-tilt defocus
and astigmatism, image-warp and volume-warp grids, and each particle's position and orientation
offsets at the control points of its pose trajectory (``trajectories``). A pose offset of shape
``(n, 1, 3)`` is static (every control point moves together); :meth:`ItemParameters.release`
turns it into one per control point. Everything here is a pure function of the tensors, so the
targets built on it are differentiable in every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .geometry import rotvec_to_matrix
from .tilt_model import Imaging, TiltGeometry
from .trajectories import orientations_at, positions_at

__all__ = ["GROUPS", "SpeciesInput", "ItemParameters"]

GROUPS = ("tilt_angles", "shifts", "image_warp", "volume_warp", "poses", "defocus", "astigmatism")


@dataclass
class SpeciesInput:
    name: str
    reference: object  # projection.VolumeTransform: this half-set's regularised half-map
    box: int
    diameter_angstrom: float
    positions: torch.Tensor  # (n, T, 3) Å trajectories of this half-set's particles in this item
    orientations: torch.Tensor  # (n, T, 3, 3)
    resolution_angstrom: float | None = None  # this species' band edge (M crops each species to its own); None: settings'
    # this half-set's half-map before regularisation: the CTF fit's reference is it low-passed at this species'
    # band (and the data alike), without the regulariser's FSC weighting, which costs defocus precision
    # (docs/physics.md §8); None: the CTF fit uses ``reference`` as it is, unfiltered data
    half_map: torch.Tensor | None = None


class ItemParameters:
    """Current offsets from the starting state, and the geometry, imaging and poses they make."""

    def __init__(self, geom: TiltGeometry, imaging: Imaging, species: list[SpeciesInput], *, groups: tuple[str, ...],
                 image_warp_grid: tuple[int, int], volume_warp_grid: tuple[int, int, int, int],
                 static_poses: bool = False):
        self.base_geom, self.base_imaging, self.groups = geom, imaging, groups
        dt, dev = geom.tilt_angles_deg.dtype, geom.tilt_angles_deg.device
        t = geom.n_tilts
        z = lambda *shape: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        self.p: dict[str, torch.Tensor] = {
            "shifts": z(t, 2), "tilt_angles": z(t, 3), "defocus": z(t), "astigmatism": z(t),
            "image_warp": (geom.image_warp.clone() if geom.image_warp is not None
                           and geom.image_warp.shape[2:] == image_warp_grid else z(2, t, *image_warp_grid)),
            "volume_warp": (geom.volume_warp.clone() if geom.volume_warp is not None
                            and geom.volume_warp.shape[1:] == volume_warp_grid else z(3, *volume_warp_grid)),
        }
        self.orientations_in_tilts = []  # the starting orientations at each tilt's dose time, (n, t, 3, 3)
        for k, s in enumerate(species):
            n, samples = s.positions.shape[:2]
            self.p[f"pos{k}"] = z(n, 1 if static_poses else samples, 3)
            self.p[f"rot{k}"] = z(n, 1 if static_poses else samples, 3)
            self.orientations_in_tilts.append(orientations_at(s.orientations, geom.dose_time))
        self.species = species
        self.scales: dict[str, float] = {}  # pose offset = scale × the optimised value (``set_scales``)

    def _offsets(self, name: str, samples: int) -> torch.Tensor:
        p = self.p[name] * self.scales[name] if name in self.scales else self.p[name]
        return p.expand(p.shape[0], samples, 3) if p.shape[1] != samples else p

    def set_scales(self, scales: dict[str, float]) -> None:
        """Optimise pose offsets in units of ``scale`` (a diagonal preconditioner; the offsets themselves do not
        change)."""
        with torch.no_grad():
            for name, scale in scales.items():
                self.p[name].mul_(self.scales.get(name, 1.0) / scale)
                self.scales[name] = scale

    def release(self) -> None:
        """From static pose offsets to trajectories: every control point starts at the static offset."""
        for k, s in enumerate(self.species):
            for name in (f"pos{k}", f"rot{k}"):
                p = self.p[name]
                self.p[name] = p.expand(p.shape[0], s.positions.shape[1], 3).detach().clone()

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
        return replace(g, shifts_angstrom=g.shifts_angstrom + self.p["shifts"],
                       angle_corrections_deg=g.angle_corrections_deg + self.p["tilt_angles"],
                       image_warp=self.p["image_warp"] if "image_warp" in self.groups else g.image_warp,
                       volume_warp=self.p["volume_warp"] if "volume_warp" in self.groups else g.volume_warp)

    def imaging(self) -> Imaging:
        im = self.base_imaging
        return replace(im, defocus_u_angstrom=im.defocus_u_angstrom + self.p["defocus"] + self.p["astigmatism"],
                       defocus_v_angstrom=im.defocus_v_angstrom + self.p["defocus"] - self.p["astigmatism"])

    def poses(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The refined trajectories' control points: positions ``(n, T, 3)``, orientations ``(n, T, 3, 3)``."""
        s = self.species[k]
        samples = s.positions.shape[1]
        return (s.positions + self._offsets(f"pos{k}", samples),
                rotvec_to_matrix(self._offsets(f"rot{k}", samples)) @ s.orientations)

    def poses_in_tilts(self, k: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Position control points ``(m, T, 3)`` and orientations at each tilt ``(m, t, 3, 3)``.

        The orientation offsets are interpolated as rotation vectors on top of the starting
        trajectory (equal to :meth:`poses` at the control points, to first order between them).
        """
        s = self.species[k]
        samples = s.positions.shape[1]
        offsets = positions_at(self._offsets(f"rot{k}", samples)[rows], self.base_geom.dose_time)
        return (s.positions[rows] + self._offsets(f"pos{k}", samples)[rows],
                rotvec_to_matrix(offsets) @ self.orientations_in_tilts[k][rows])

    def detached(self) -> tuple[TiltGeometry, Imaging, list[torch.Tensor], list[torch.Tensor]]:
        """The current geometry, imaging and poses, cut from the graph."""
        with torch.no_grad():
            geom, im = self.geometry(), self.imaging()
            geom = replace(geom, shifts_angstrom=geom.shifts_angstrom.detach(),
                           angle_corrections_deg=geom.angle_corrections_deg.detach(),
                           image_warp=None if geom.image_warp is None else geom.image_warp.detach().clone(),
                           volume_warp=None if geom.volume_warp is None else geom.volume_warp.detach().clone())
            im = replace(im, defocus_u_angstrom=im.defocus_u_angstrom.detach(),
                         defocus_v_angstrom=im.defocus_v_angstrom.detach())
            poses = [self.poses(k) for k in range(len(self.species))]
        return geom, im, [p.detach() for p, _ in poses], [o.detach() for _, o in poses]
