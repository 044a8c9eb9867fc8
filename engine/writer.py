"""From engine results to repository records: the one place the engine writes.

Item versions (the published models and each half-set's), species versions (half-maps, particles,
metrics, provenance) and the population that holds them, through ``cryopool.repo``'s public API
(``with_items`` regroups items into their data sources). ``refine`` and ``simulate`` compute; this
module records.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from cryopool.repo import (DeformationModel, HalfSetModel, ImagingModel, ItemModel, Metrics, ParticleTable, Ref,
                           Repository, Species, StateDict, TiltSeries, particle_table)

from .geometry import matrix_to_euler_zyz
from .records_io import ParticleColumns
from .regularise import NetworkWeights
from .tilt_model import Imaging, TiltGeometry

__all__ = ["item_model", "item_records", "species_with_denoiser", "item_version", "particle_table_record",
           "state_dict_record", "species_version"]


def item_model(geometry: TiltGeometry, imaging: Imaging) -> ItemModel:
    """A geometry and imaging model as the arrays records store (float64, on the CPU)."""
    def arr(x: torch.Tensor | None) -> np.ndarray | None:
        return None if x is None else x.detach().cpu().double().numpy()
    return ItemModel(arr(geometry.shifts_angstrom), arr(geometry.angle_corrections_deg),
                     arr(imaging.defocus_u_angstrom), arr(imaging.defocus_v_angstrom), arr(imaging.defocus_angle_deg),
                     image_warp=arr(geometry.image_warp), volume_warp=arr(geometry.volume_warp),
                     orientation_corrections_deg=arr(geometry.orientation_corrections_deg))


def item_records(repo: Repository, geometry: TiltGeometry, imaging: Imaging) -> tuple[DeformationModel, ImagingModel]:
    """Records (with their arrays written to ``repo``) for a geometry and imaging model."""
    return item_model(geometry, imaging).records(repo)


def item_version(tx: Repository, item: TiltSeries, published: tuple[TiltGeometry, Imaging],
                 halves: dict[int, tuple[TiltGeometry, Imaging]] | None = None,
                 refined_against: list[Ref] | None = None) -> Ref:
    """A new version of ``item`` with these models (and, from a gold-standard refinement, each half-set's)."""
    deformation, imaging = item_records(tx, *published)
    changes = dict(deformation=tx.put_record(deformation), imaging=tx.put_record(imaging))
    if halves is not None:
        half_records = {}
        for half, (g, i) in halves.items():
            d, m = item_records(tx, g, i)
            half_records[str(half)] = HalfSetModel(deformation=tx.put_record(d), imaging=tx.put_record(m))
        changes["half_set_models"] = half_records
    if refined_against is not None:
        changes["refined_against"] = refined_against
    return tx.put_record(replace(item, **changes))


def particle_table_record(repo: Repository, columns: ParticleColumns) -> ParticleTable:
    """A ParticleTable record (arrays written to ``repo``) from tensors."""
    angles = matrix_to_euler_zyz(columns.orientations.double()).numpy()
    keys = [columns.item_names[i] for i in columns.item_index.tolist()]
    return particle_table(repo, np.asarray(columns.ids, dtype=np.uint64), keys, columns.positions.double().numpy(),
                          angles, columns.half_sets.numpy(), columns.scores.numpy())


def state_dict_record(tx: Repository, weights: NetworkWeights) -> StateDict:
    """Network weights as a StateDict: one array per named tensor, the architecture and training in metadata."""
    return StateDict(tensors={name: tx.put_array(np.ascontiguousarray(a, dtype=np.float32))
                              for name, a in sorted(weights.arrays.items())}, metadata=weights.metadata)


def species_version(tx: Repository, record: Species, half_maps: tuple[torch.Tensor, torch.Tensor],
                    columns: ParticleColumns, *, metrics: Metrics, reconstructed_from: list[Ref],
                    mask: torch.Tensor | None = None, fsc: tuple[np.ndarray, np.ndarray] | None = None,
                    quarter_maps: list[torch.Tensor] | None = None, denoiser: NetworkWeights | None = None) -> Ref:
    """A new version of a species: half-maps, particles, metrics (with the FSC curve ``(frequency, fsc)`` if given)
    and the item versions the half-maps were reconstructed from; its quarter-maps (only those of these half-maps:
    never carried over) and network weights (carried over unless new ones are given)."""
    changes = dict(half_map_1=tx.put_array(half_maps[0].cpu().numpy()), half_map_2=tx.put_array(half_maps[1].cpu().numpy()),
                   particles=tx.put_record(particle_table_record(tx, columns)), reconstructed_from=reconstructed_from,
                   quarter_maps=None if quarter_maps is None else [tx.put_array(q.cpu().numpy()) for q in quarter_maps])
    if denoiser is not None:
        changes["denoiser"] = tx.put_record(state_dict_record(tx, denoiser))
    if fsc is not None:
        metrics = replace(metrics, fsc=tx.put_array(np.stack(fsc, 1)))
    if mask is not None:
        changes["mask"] = tx.put_array(mask.cpu().numpy())
    return tx.put_record(replace(record, metrics=metrics, **changes))


def species_with_denoiser(tx: Repository, record: Species, weights: NetworkWeights) -> Ref:
    """A new version of a species that differs only in its network weights."""
    return tx.put_record(replace(record, denoiser=tx.put_record(state_dict_record(tx, weights))))
