"""What a report shows, read from the records: numbers only, no drawing (``report_figures`` draws them).

Every value comes from a stored record (the engine's own exposure weighting
function is called for the weighting curves, so they are the ones refinement
used); nothing is re-estimated here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cryopool.engine.weighting import dose_tilt_weights
from cryopool.repo import Population, Repository
from cryopool.repo.merge import find_collisions
from cryopool.repo.population import empty_population, find_item, iter_items
from cryopool.repo.records import DeformationModel, ImagingModel, ParticleTable, Species, TiltSeries

__all__ = ["SpeciesData", "ItemData", "species_data", "item_data", "species_history", "collisions_in",
           "merge_collisions", "provenance_graph", "particles_by_item", "ProvenanceGraph", "item_keys",
           "exposure_weights", "stored_tomograms"]


@dataclass
class SpeciesData:
    name: str
    ref: str
    pixel_size_angstrom: float
    resolution_angstrom: float | None
    fsc: np.ndarray | None  # (k, 2): 1/Å, FSC, as recorded by the refinement that made this version
    half_maps: tuple[np.ndarray, np.ndarray]
    history: list[dict]  # oldest first: commit, time, operation, resolution, particles


@dataclass
class ItemData:
    key: str
    ref: str
    tilt_angles_deg: np.ndarray
    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    shifts_angstrom: np.ndarray  # (t, 2)
    angle_corrections_deg: np.ndarray  # (t, 3)
    image_warp: np.ndarray | None  # (2, t, ny, nx) Å
    volume_warp: np.ndarray | None  # (3, nt, nz, ny, nx) Å
    pre_exposure: np.ndarray
    exposure: np.ndarray
    pixel_size_angstrom: float
    image_size_px: tuple[int, int]  # (height, width)
    tomogram_size_angstrom: tuple[float, float, float]


@dataclass
class ProvenanceGraph:
    """Nodes (id → label, kind, commit to link or None) and edges (from → to: "made from")."""

    nodes: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)


def _read(repo: Repository, ref) -> np.ndarray:
    return np.asarray(repo.get_array(ref).read())


def species_history(repo: Repository, rev: str, name: str) -> list[dict]:
    """Every version of species ``name`` in the history of ``rev``, oldest first, with the commit that made it."""
    versions = []
    for cid, commit in repo.log(rev):
        ref = repo.get_record(commit.population, Population).species.get(name)
        if ref is None:
            continue
        parents = [repo.get_record(repo.get_commit(p.id).population, Population).species.get(name)
                   for p in commit.parents]
        if any(p is not None and p.id == ref.id for p in parents):
            continue  # carried over unchanged
        sp = repo.get_record(ref, Species)
        versions.append({"commit": cid, "time_utc": commit.time_utc, "operation": commit.operation.kind,
                         "message": commit.message.splitlines()[0] if commit.message else "",
                         "species": ref.id, "resolution_angstrom": sp.metrics.resolution_angstrom,
                         "particles": repo.get_record(sp.particles, ParticleTable).count,
                         "reconstructed_from": [r.id for r in sp.reconstructed_from],
                         "previous": [p.id for p in parents if p is not None]})
    return sorted(versions, key=lambda v: v["time_utc"])


def species_data(repo: Repository, rev: str, name: str) -> SpeciesData:
    ref = repo.population(rev).species[name]
    sp = repo.get_record(ref, Species)
    fsc = None if sp.metrics.fsc is None else _read(repo, sp.metrics.fsc).reshape(-1, 2)
    return SpeciesData(name, ref.id, sp.pixel_size_angstrom, sp.metrics.resolution_angstrom, fsc,
                       (_read(repo, sp.half_map_1), _read(repo, sp.half_map_2)), species_history(repo, rev, name))


def item_data(repo: Repository, rev: str, key: str) -> ItemData:
    _, ref = find_item(repo, repo.population(rev), key)
    ts = repo.get_record(ref, TiltSeries)
    d = repo.get_record(ts.deformation, DeformationModel)
    m = repo.get_record(ts.imaging, ImagingModel)
    t = ts.n_tilts
    shape = repo.get_array(ts.stack).shape
    return ItemData(
        key=key, ref=ref.id, tilt_angles_deg=np.asarray(ts.tilt_angles_deg, dtype=float),
        defocus_u_angstrom=_read(repo, m.defocus_u_angstrom).reshape(t),
        defocus_v_angstrom=_read(repo, m.defocus_v_angstrom).reshape(t),
        defocus_angle_deg=_read(repo, m.defocus_angle_deg).reshape(t),
        shifts_angstrom=_read(repo, d.tilt_shifts_angstrom).reshape(t, 2),
        angle_corrections_deg=_read(repo, d.tilt_angle_corrections_deg).reshape(t, 3),
        image_warp=None if d.image_warp is None else _read(repo, d.image_warp.values),
        volume_warp=None if d.volume_warp is None else _read(repo, d.volume_warp.values),
        pre_exposure=np.asarray(ts.pre_exposure_e_per_angstrom2, dtype=float),
        exposure=np.asarray(ts.exposure_e_per_angstrom2, dtype=float),
        pixel_size_angstrom=ts.pixel_size_angstrom, image_size_px=(int(shape[1]), int(shape[2])),
        tomogram_size_angstrom=tuple(float(s) * ts.pixel_size_angstrom for s in ts.tomogram_size_px))


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


def stored_tomograms(repo: Repository, rev: str, key: str) -> list[dict]:
    """Tomograms of item ``key`` stored in the history of ``rev`` (``tomogram --store``), newest first, with the
    central xy and xz sections of each read from the stored array (only the chunks they touch)."""
    out = []
    for cid, commit in repo.log(rev):
        ref = commit.attachments.get(f"tomogram {key}") if commit.operation.kind == "tomogram" else None
        if ref is None:
            continue
        array = repo.get_array(ref)
        nz, ny, _ = array.shape
        out.append({"commit": cid, "time_utc": commit.time_utc, "id": ref.id, "shape_zyx": list(array.shape),
                    "voxel_angstrom": array.attributes.get("voxel_angstrom"),
                    "binning": commit.operation.parameters.get("binning"),
                    "xy": array.read((nz // 2, slice(None), slice(None))),
                    "xz": array.read((slice(None), ny // 2, slice(None)))})
    return out


def merge_collisions(repo: Repository, rev: str) -> list[dict]:
    """The merges in the history of ``rev`` with the collisions each recorded and how it settled them."""
    out = []
    for cid, commit in repo.log(rev):
        if commit.operation.kind == "merge":
            p = commit.operation.parameters
            out.append({"commit": cid, "time_utc": commit.time_utc, "message": commit.message,
                        "policy": p.get("policy"), "factor": p.get("factor"),
                        "collisions": p.get("collisions", [])})
    return out


def provenance_graph(repo: Repository, history: list[dict], *, max_versions: int = 6) -> ProvenanceGraph:
    """The species versions (newest ``max_versions``), the operations that made them, and the item versions and
    raw tilt series they were reconstructed from."""
    g = ProvenanceGraph()
    keep = history[-max_versions:]
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
            g.edges.append((op, item_id))
            if (item_id, ts.stack.id) not in g.edges:
                g.edges.append((item_id, ts.stack.id))
    return g


def item_keys(repo: Repository, population: Population) -> list[str]:
    return [key for key, _, _ in iter_items(repo, population)]


def exposure_weights(item: ItemData, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (1/Å) and each tilt's weight along them, from the engine's own weighting function."""
    w = dose_tilt_weights(torch.from_numpy(item.pre_exposure), torch.from_numpy(item.exposure),
                          torch.from_numpy(item.tilt_angles_deg), size=size,
                          pixel_size_angstrom=item.pixel_size_angstrom)
    return np.arange(size // 2 + 1) / (size * item.pixel_size_angstrom), w[:, 0, :].numpy()
