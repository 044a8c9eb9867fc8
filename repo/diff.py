"""``diff`` between two populations: what a scientist needs to know changed.

Data sources and items are matched by name, species by name, particles by
their stable id, so a diff says "12 particles added, 3 moved" rather than
"particles.star changed".  Because everything is content-addressed, equal
references mean equal content and are never opened.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .population import item_refs
from .records import ParticleTable, Population, Species, StateDict, TiltSeries
from .repository import Repository

__all__ = ["diff_populations", "particle_changes", "weights_summary"]


def weights_summary(repo: Repository, species: Species) -> dict | None:
    """Which network weights a species version carries: their id, kind and training steps so far."""
    if species.denoiser is None:
        return None
    sd = repo.get_record(species.denoiser, StateDict)
    return {"id": species.denoiser.id, "kind": sd.metadata.get("kind"), "steps": sd.metadata.get("steps"),
            "tensors": len(sd.tensors)}


def _changed_fields(a, b) -> list[str]:
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def particle_changes(repo: Repository, before: ParticleTable, after: ParticleTable) -> dict:
    """Particles added, removed, moved (position) and turned (orientation), by stable id."""
    def load(table: ParticleTable):
        ids = repo.get_array(table.columns["particle_id"]).read()
        pos = repo.get_array(table.columns["position_angstrom"]).read().reshape(table.count, -1)
        ori = repo.get_array(table.columns["orientation_deg"]).read().reshape(table.count, -1)
        return ids, pos, ori
    ida, posa, oria = load(before)
    idb, posb, orib = load(after)
    common, ia, ib = np.intersect1d(ida, idb, assume_unique=True, return_indices=True)
    moved = turned = 0
    if len(common) and posa.shape[1] == posb.shape[1]:
        moved = int(np.any(posa[ia] != posb[ib], axis=1).sum())
    if len(common) and oria.shape[1] == orib.shape[1]:
        turned = int(np.any(oria[ia] != orib[ib], axis=1).sum())
    return {"before": before.count, "after": after.count, "added": int(len(np.setdiff1d(idb, ida))),
            "removed": int(len(np.setdiff1d(ida, idb))), "moved": moved, "turned": turned}


def diff_populations(repo: Repository, a: Population, b: Population) -> dict:
    """A JSON-able description of how population ``b`` differs from ``a``."""
    out: dict = {"data_sources": {"added": sorted(set(b.data_sources) - set(a.data_sources)),
                                  "removed": sorted(set(a.data_sources) - set(b.data_sources))}}
    items_a, items_b = item_refs(repo, a), item_refs(repo, b)
    changed_items = {}
    for key in sorted(set(items_a) & set(items_b)):
        if items_a[key] != items_b[key]:
            ta, tb = repo.get_record(items_a[key], TiltSeries), repo.get_record(items_b[key], TiltSeries)
            changed_items[key] = _changed_fields(ta, tb)
    out["items"] = {"added": sorted(set(items_b) - set(items_a)), "removed": sorted(set(items_a) - set(items_b)),
                    "changed": changed_items}
    changed_species = {}
    for name in sorted(set(a.species) & set(b.species)):
        if a.species[name] == b.species[name]:
            continue
        sa, sb = repo.get_record(a.species[name], Species), repo.get_record(b.species[name], Species)
        entry = {"fields": _changed_fields(sa, sb),
                 "resolution_angstrom": [sa.metrics.resolution_angstrom, sb.metrics.resolution_angstrom]}
        if sa.denoiser != sb.denoiser:
            entry["denoiser"] = [weights_summary(repo, sa), weights_summary(repo, sb)]
        if sa.particles != sb.particles:
            entry["particles"] = particle_changes(repo, repo.get_record(sa.particles, ParticleTable),
                                                  repo.get_record(sb.particles, ParticleTable))
        changed_species[name] = entry
    added_species = {}
    for name in sorted(set(b.species) - set(a.species)):
        sp = repo.get_record(b.species[name], Species)
        added_species[name] = {"particles": repo.get_record(sp.particles, ParticleTable).count}
    out["species"] = {"added": added_species, "removed": sorted(set(a.species) - set(b.species)),
                      "changed": changed_species}
    return out
