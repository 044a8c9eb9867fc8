"""From repository records to engine tensors: items to tilt models, particle tables to particle columns.

With ``writer`` (the way back), the only engine modules that touch records, and only through
``cryopool.repo``'s public API.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from cryopool.repo import (DeformationModel, Grid, ImagingModel, ParticleTable, Repository, Species, StateDict, TiltSeries,
                           dose_times)

from .geometry import euler_zyz_to_matrix
from .regularise import NetworkWeights
from .tilt_model import Imaging, TiltGeometry

__all__ = ["ItemModel", "load_item", "to_device", "geometry_to", "imaging_to",
           "unmodelled_optics", "ParticleColumns", "load_particles", "load_map",
           "load_quarter_maps", "load_weights"]


@dataclass
class ItemModel:
    """A tilt series as tensors: images, geometry, imaging, exposure."""

    stack: torch.Tensor  # (t, h, w) float32
    geometry: TiltGeometry
    imaging: Imaging
    pre_exposure: torch.Tensor  # (t,)
    exposure: torch.Tensor  # (t,)


def _array(repo: Repository, ref, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(repo.get_array(ref).read())).to(dtype)


def _grid(repo: Repository, grid: Grid | None) -> torch.Tensor | None:
    return None if grid is None else _array(repo, grid.values)


def load_item(repo: Repository, item: TiltSeries, *, with_stack: bool = True) -> ItemModel:
    deformation = repo.get_record(item.deformation, DeformationModel)
    imaging = repo.get_record(item.imaging, ImagingModel)
    t = item.n_tilts
    pre = torch.tensor(item.pre_exposure_e_per_angstrom2, dtype=torch.float64)
    exposure = torch.tensor(item.exposure_e_per_angstrom2, dtype=torch.float64)
    stack_array = repo.get_array(item.stack)
    h, w = stack_array.shape[1:]
    px = item.pixel_size_angstrom
    geometry = TiltGeometry(
        tilt_angles_deg=torch.tensor(item.tilt_angles_deg, dtype=torch.float64),
        tilt_axis_angle_deg=item.tilt_axis_angle_deg,
        shifts_angstrom=_array(repo, deformation.tilt_shifts_angstrom).reshape(t, 2),
        angle_corrections_deg=_array(repo, deformation.tilt_angle_corrections_deg).reshape(t, 3),
        image_size_px=(h, w), pixel_size_angstrom=px,
        tomogram_size_angstrom=tuple(float(s) * px for s in item.tomogram_size_px),
        dose_time=torch.from_numpy(dose_times(pre.numpy(), exposure.numpy())),
        image_warp=_grid(repo, deformation.image_warp), volume_warp=_grid(repo, deformation.volume_warp),
        orientation_corrections_deg=None if deformation.orientation_corrections_deg is None
        else _array(repo, deformation.orientation_corrections_deg).reshape(t, 3))
    model = Imaging(_array(repo, imaging.defocus_u_angstrom), _array(repo, imaging.defocus_v_angstrom),
                    _array(repo, imaging.defocus_angle_deg), item.voltage_kv, item.spherical_aberration_mm,
                    item.amplitude_contrast, float(item.handedness))
    stack = torch.from_numpy(stack_array.read().astype(np.float32)) if with_stack else torch.empty(0)
    return ItemModel(stack, geometry, model, pre, exposure)


def unmodelled_optics(repo: Repository, item: TiltSeries) -> list[str]:
    """What an item's records hold that the engine's forward model leaves out (refining would ignore it)."""
    imaging = repo.get_record(item.imaging, ImagingModel)
    deformation = repo.get_record(item.deformation, DeformationModel)
    out = []
    if imaging.phase_shift_deg is not None and np.any(repo.get_array(imaging.phase_shift_deg).read() != 0):
        out.append("phase shift (phase plate)")
    mag = imaging.magnification_anisotropy
    if mag is not None and (abs(mag[0] - 1) > 1e-6 or abs(mag[1] - 1) > 1e-6):
        out.append(f"magnification anisotropy {mag}")
    if imaging.beam_tilt_mrad is not None and any(abs(b) > 0 for b in imaging.beam_tilt_mrad):
        out.append(f"beam tilt {imaging.beam_tilt_mrad} mrad")
    out += [f"CTF grid {name}" for name in imaging.grids] + [f"movie grid {name}" for name in deformation.movie_grids]
    return out


@dataclass
class ParticleColumns:
    """A particle table as tensors; poses are trajectories of ``T`` temporal samples (``trajectories``)."""

    ids: np.ndarray  # (n,) uint64
    item_names: list[str]
    item_index: torch.Tensor  # (n,) long
    positions: torch.Tensor  # (n, T, 3) Å
    orientations: torch.Tensor  # (n, T, 3, 3)
    half_sets: torch.Tensor  # (n,) long
    scores: torch.Tensor  # (n,)

    def select(self, item: str) -> torch.Tensor:
        """Row mask of the particles in ``item`` (a "source/item" key)."""
        if item not in self.item_names:
            return torch.zeros(len(self.ids), dtype=torch.bool)
        return self.item_index == self.item_names.index(item)


def load_particles(repo: Repository, table_ref) -> ParticleColumns:
    table = repo.get_record(table_ref, ParticleTable)
    n = table.count
    col = {k: repo.get_array(v).read() for k, v in table.columns.items()}
    t = table.temporal_samples
    angles = torch.from_numpy(col["orientation_deg"].reshape(n, t, 3).astype(np.float64))
    return ParticleColumns(
        ids=col["particle_id"].astype(np.uint64), item_names=list(table.item_names),
        item_index=torch.from_numpy(col["item_index"].astype(np.int64)),
        positions=torch.from_numpy(col["position_angstrom"].reshape(n, t, 3).astype(np.float64)),
        orientations=euler_zyz_to_matrix(angles), half_sets=torch.from_numpy(col["half_set"].astype(np.int64)),
        scores=torch.from_numpy(col["score"].astype(np.float64)))


def load_map(repo: Repository, species: Species, which: str = "half_map_1") -> torch.Tensor:
    return _volume(repo, getattr(species, which))


def _volume(repo: Repository, ref) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(repo.get_array(ref).read()).astype(np.float32))


def load_quarter_maps(repo: Repository, species: Species) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                   tuple[torch.Tensor, torch.Tensor]] | None:
    """Each half's two quarter-maps, if this species version has them."""
    if species.quarter_maps is None:
        return None
    q = [_volume(repo, r) for r in species.quarter_maps]
    return (q[0], q[1]), (q[2], q[3])


def load_weights(repo: Repository, species: Species) -> NetworkWeights | None:
    """The species' network weights (a StateDict of named arrays), if any."""
    if species.denoiser is None:
        return None
    sd = repo.get_record(species.denoiser, StateDict)
    return NetworkWeights({name: np.asarray(repo.get_array(ref).read(), dtype=np.float32)
                           for name, ref in sd.tensors.items()}, dict(sd.metadata))


def geometry_to(g: TiltGeometry, device) -> TiltGeometry:
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return replace(g, tilt_angles_deg=g.tilt_angles_deg.to(device), shifts_angstrom=g.shifts_angstrom.to(device),
                   angle_corrections_deg=g.angle_corrections_deg.to(device), dose_time=g.dose_time.to(device),
                   image_warp=move(g.image_warp), volume_warp=move(g.volume_warp),
                   orientation_corrections_deg=move(g.orientation_corrections_deg))


def imaging_to(i: Imaging, device) -> Imaging:
    return replace(i, defocus_u_angstrom=i.defocus_u_angstrom.to(device),
                   defocus_v_angstrom=i.defocus_v_angstrom.to(device), defocus_angle_deg=i.defocus_angle_deg.to(device))


def to_device(model: ItemModel, device) -> ItemModel:
    """The item's tensors on ``device`` (CPU or CUDA)."""
    return ItemModel(model.stack.to(device), geometry_to(model.geometry, device), imaging_to(model.imaging, device),
                     model.pre_exposure.to(device), model.exposure.to(device))
