"""What a report shows, read from the records: numbers only, no drawing (``figures`` draws them).

Every value comes from a stored record, read by the engine's own loaders
where it has one (``load_item``) and weighted by its own exposure function,
so the curves are the ones refinement used; nothing is re-estimated here.
The history is walked once (``history_of``) and shared by every section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cryopool.engine.records_io import ItemModel
from cryopool.engine.weighting import dose_tilt_weights
from cryopool.repo import Commit, Population, Ref, Repository
from cryopool.repo.merge import find_collisions
from cryopool.repo.population import empty_population, iter_items
from cryopool.repo.records import ParticleTable, Species, TiltSeries

__all__ = ["HistoryEntry", "history_of", "species_history", "collisions_in", "merge_collisions",
           "provenance_graph", "particles_by_item", "ProvenanceGraph", "exposure_weights", "stored_tomograms"]


@dataclass(frozen=True)
class HistoryEntry:
    id: str
    commit: Commit
    species: dict[str, Ref]  # the commit's population's species


def history_of(repo: Repository, rev: str) -> list[HistoryEntry]:
    """Every commit in the history of ``rev`` (newest first) with its species, read once."""
    return [HistoryEntry(cid, c, repo.get_record(c.population, Population).species) for cid, c in repo.log(rev)]


@dataclass
class ProvenanceGraph:
    """Nodes (id → label, kind, commit to link or None) and edges (from → to: "made from")."""

    nodes: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)


def _read(repo: Repository, ref) -> np.ndarray:
    return np.asarray(repo.get_array(ref).read())


def species_history(repo: Repository, history: list[HistoryEntry], name: str) -> list[dict]:
    """Every version of species ``name`` in ``history``, oldest first, with the commit that made it."""
    species_at = {e.id: e.species for e in history}
    versions = []
    for e in history:
        ref = e.species.get(name)
        if ref is None:
            continue
        parents = [species_at[p.id].get(name) if p.id in species_at else None for p in e.commit.parents]
        if any(p is not None and p.id == ref.id for p in parents):
            continue  # carried over unchanged
        sp = repo.get_record(ref, Species)
        versions.append({"commit": e.id, "time_utc": e.commit.time_utc, "operation": e.commit.operation.kind,
                         "message": e.commit.message.splitlines()[0] if e.commit.message else "",
                         "species": ref.id, "resolution_angstrom": sp.metrics.resolution_angstrom,
                         "particles": repo.get_record(sp.particles, ParticleTable).count,
                         "reconstructed_from": [r.id for r in sp.reconstructed_from],
                         "previous": [p.id for p in parents if p is not None]})
    return sorted(versions, key=lambda v: v["time_utc"])


def particles_by_item(repo: Repository, population: Population) -> dict[str, dict[str, dict]]:
    """item key → species → {"ids", "positions" (n, 3) Å at the first temporal sample, "radius" Å}."""
    out: dict[str, dict[str, dict]] = {key: {} for key, _, _ in iter_items(repo, population)}
    for name in sorted(population.species):
        sp = repo.get_record(population.species[name], Species)
        t = repo.get_record(sp.particles, ParticleTable)
        ids = _read(repo, t.columns["particle_id"])
        idx = _read(repo, t.columns["item_index"])
        pos = _read(repo, t.columns["position_angstrom"]).reshape(t.count, t.temporal_samples, 3)[:, 0]
        for i, key in enumerate(t.item_names):
            rows = idx == i
            out.setdefault(key, {})[name] = {"ids": ids[rows], "positions": pos[rows],
                                             "radius": sp.diameter_angstrom / 2}
    return out


def collisions_in(repo: Repository, population: Population, factor: float = 0.8) -> list[dict]:
    """Every pair of particles closer than a merge allows (the merge's own rule), whichever commit added them."""
    return [{"item": item, "a": {"species": a.species, "particle_id": a.pid},
             "b": {"species": b.species, "particle_id": b.pid}, "distance_angstrom": d, "threshold_angstrom": limit,
             "positions": [a.pos.tolist(), b.pos.tolist()]}
            for item, a, b, d, limit in find_collisions(repo, population, empty_population(), factor=factor)]


def stored_tomograms(repo: Repository, history: list[HistoryEntry], key: str) -> list[dict]:
    """Tomograms of item ``key`` stored in ``history`` (``tomogram --store``), newest first, with the central xy
    and xz sections of the newest read from the stored array (only the chunks they touch)."""
    out = []
    for e in history:
        ref = e.commit.attachments.get(f"tomogram {key}") if e.commit.operation.kind == "tomogram" else None
        if ref is None:
            continue
        array = repo.get_array(ref)
        entry = {"commit": e.id, "time_utc": e.commit.time_utc, "id": ref.id, "shape_zyx": list(array.shape),
                 "voxel_angstrom": array.attributes.get("voxel_angstrom"),
                 "binning": e.commit.operation.parameters.get("binning")}
        if not out:
            nz, ny, _ = array.shape
            entry |= {"xy": array.read((nz // 2, slice(None), slice(None))),
                      "xz": array.read((slice(None), ny // 2, slice(None)))}
        out.append(entry)
    return out


def merge_collisions(history: list[HistoryEntry]) -> list[dict]:
    """The merges in ``history`` with the collisions each recorded and how it settled them."""
    return [{"commit": e.id, "time_utc": e.commit.time_utc, "message": e.commit.message,
             "policy": e.commit.operation.parameters.get("policy"),
             "factor": e.commit.operation.parameters.get("factor"),
             "collisions": e.commit.operation.parameters.get("collisions", [])}
            for e in history if e.commit.operation.kind == "merge"]


def provenance_graph(repo: Repository, versions: list[dict], *, max_versions: int = 6) -> ProvenanceGraph:
    """The species ``versions`` (``species_history``; the newest ``max_versions``), the operations that made them,
    and the item versions and raw tilt series they were reconstructed from."""
    g = ProvenanceGraph()
    keep = versions[-max_versions:]
    kept = {v["species"] for v in keep}
    for v in keep:
        sid, op = v["species"], f"op:{v['commit']}"
        res = "" if v["resolution_angstrom"] is None else f", {v['resolution_angstrom']:.1f} Å"
        g.nodes[sid] = (f"species {sid[:8]}{res}", "species", v["commit"])
        g.nodes[op] = (f"{v['operation']} {v['commit'][:8]}", "operation", v["commit"])
        g.edges.append((sid, op))
        for prev in v["previous"]:
            if prev in kept:
                g.edges.append((op, prev))
        for item_id in v["reconstructed_from"]:
            ts = repo.get_record(item_id, TiltSeries)
            g.nodes.setdefault(item_id, (f"{ts.name} {item_id[:8]}", "item", None))
            g.nodes.setdefault(ts.stack.id, (f"raw {ts.name} {ts.stack.id[:8]}", "raw", None))
            g.edges += [(op, item_id), (item_id, ts.stack.id)]
    g.edges = list(dict.fromkeys(g.edges))  # an item shared by several versions: its edge to the raw data once
    return g


def exposure_weights(item: ItemModel, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (1/Å) and each tilt's weight along them, from the engine's own weighting function."""
    pixel = item.geometry.pixel_size_angstrom
    w = dose_tilt_weights(item.pre_exposure, item.exposure, item.geometry.tilt_angles_deg, size=size,
                          pixel_size_angstrom=pixel)
    return np.arange(size // 2 + 1) / (size * pixel), w[:, 0, :].numpy()
