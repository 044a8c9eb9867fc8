"""copick projects: a population's particles (and tomograms) as copick picks, and copick picks back as a species.

copick (the collaborative annotation layout of the cryo-ET community and of the
CryoET Data Portal's tools) pins zarr < 3, so it cannot share our
environment: this module writes and reads its documented filesystem layout
itself, and the tests check that the copick library reads what it writes.

Layout written (``FOLDER`` must not exist)::

    FOLDER/copick_config.json        config_type "filesystem", overlay_root local://FOLDER/overlay,
                                      one pickable object per species (radius = diameter / 2)
    FOLDER/cryopool.json             the commit, run → item and object → species maps
    FOLDER/overlay/ExperimentRuns/RUN/Picks/cryopool_0_OBJECT.json
    FOLDER/overlay/ExperimentRuns/RUN/VoxelSpacingV.VVV/wbp.zarr   (tomograms, when given: OME-Zarr, zarr v2)

Coordinates: a copick location is in Å from the first voxel's centre, so
``location = position + ⌊size / 2⌋ × pixel`` per axis (our positions are Å
from the voxel RELION turns about, ``format.md``); a point's
``transformation`` rotation is RELION's Euler matrix of the particle
(copick's own RELION converter uses the same), its translation zero on
export and added to the location on import; ``instance_id`` carries the
particle id, ``score`` the score.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import zarr

from .errors import FormatError, InvalidInputError, NotFoundError
from .ingest import SpeciesDraft, SpeciesMaps, put_species
from .particles import particle_table
from .population import export_names, find_item, iter_items, stable_particle_ids, with_species
from .records import Operation, ParticleTable, Population, Species, TiltSeries, validate_name
from .repository import Repository, software_version
from .star_particles import euler_matrix, matrix_euler

__all__ = ["export_copick", "import_copick", "copick_name", "CopickPicks", "read_copick_picks", "USER_ID"]

USER_ID, SESSION_ID = "cryopool", "0"  # session "0": picks made by a tool
_INVALID = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f\s_]')  # what copick refuses in object, user and session names


def copick_name(name: str) -> str:
    """A species name as copick accepts it for an object (no underscores, spaces or path characters)."""
    return _INVALID.sub("-", name)


def _colour(i: int) -> list[int]:
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    return [*palette[i % len(palette)], 255]


def _write_tomogram(path: Path, volume: np.ndarray, voxel: float) -> None:
    """One OME-NGFF (0.4) scale level, zarr format 2: what copick opens as a tomogram."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    array = group.create_array("0", shape=volume.shape, dtype="float32", chunks=(64, 64, 64),
                               chunk_key_encoding={"name": "v2", "separator": "/"})  # OME-Zarr's nested chunks
    array[...] = volume.astype(np.float32)
    group.attrs["multiscales"] = [{
        "version": "0.4", "name": "wbp",
        "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [voxel] * 3}]}],
        "metadata": {"writer": f"cryopool {software_version()}"}}]


def export_copick(repo: Repository, rev: str, folder: str | Path, *, species: list[str] | None = None,
                  tomograms: dict[str, tuple[np.ndarray, float]] | None = None) -> dict:
    """Write the particles of ``species`` (default all) at ``rev`` (and ``tomograms``: item → (volume, voxel))."""
    out = Path(folder)
    if out.exists():
        raise InvalidInputError("the export folder exists", path=str(out), hint="give a new folder")
    cid = repo.resolve(rev)
    pop = repo.population(cid)
    names = species or sorted(pop.species)
    for n in names:
        if n not in pop.species:
            raise NotFoundError(f"no species {n!r} at {rev}")
    items = {key: ts for key, _, ts in iter_items(repo, pop)}
    runs = export_names(sorted(items))
    objects = {copick_name(n): n for n in names}
    if len(objects) != len(names):
        raise InvalidInputError("two species map to one copick object name", found=sorted(names))
    overlay = out.resolve() / "overlay"
    pickable = []
    for i, (obj, name) in enumerate(sorted(objects.items())):
        sp = repo.get_record(pop.species[name], Species)
        pickable.append({"name": obj, "is_particle": True, "label": i + 1, "color": _colour(i),
                         "radius": sp.diameter_angstrom / 2, "metadata": {"cryopool": {"species": name}}})
    for key, run in runs.items():
        (overlay / "ExperimentRuns" / run / "Picks").mkdir(parents=True)
    for obj, name in objects.items():
        sp = repo.get_record(pop.species[name], Species)
        table = repo.get_record(sp.particles, ParticleTable)
        col = {k: repo.get_array(v).read() for k, v in table.columns.items()}
        pos = col["position_angstrom"].reshape(table.count, table.temporal_samples, 3)[:, 0]
        rot = euler_matrix(col["orientation_deg"].reshape(table.count, table.temporal_samples, 3)[:, 0])
        for i, key in enumerate(table.item_names):
            ts = items[key]
            offset = np.floor(np.asarray(ts.tomogram_size_px) / 2) * ts.pixel_size_angstrom
            points = []
            for r in np.flatnonzero(col["item_index"] == i):
                m = np.eye(4)
                m[:3, :3] = rot[r]
                loc = pos[r] + offset
                score = float(col["score"][r])
                points.append({"location": {"x": loc[0], "y": loc[1], "z": loc[2]}, "transformation_": m.tolist(),
                               "instance_id": int(col["particle_id"][r]),
                               "score": score if np.isfinite(score) else None})
            picks = {"pickable_object_name": obj, "user_id": USER_ID, "session_id": SESSION_ID, "run_name": runs[key],
                     "voxel_spacing": ts.pixel_size_angstrom, "unit": "angstrom", "points": points,
                     "trust_orientation": True}
            path = overlay / "ExperimentRuns" / runs[key] / "Picks" / f"{USER_ID}_{SESSION_ID}_{obj}.json"
            path.write_text(json.dumps(picks, indent=1))
    for key, (volume, voxel) in (tomograms or {}).items():
        _write_tomogram(overlay / "ExperimentRuns" / runs[key] / f"VoxelSpacing{voxel:.3f}" / "wbp.zarr", volume,
                        voxel)
    config = {"config_type": "filesystem", "name": pop.name, "description": f"cryopool commit {cid}",
              "version": "1.31.0", "pickable_objects": pickable, "overlay_root": f"local://{overlay}"}
    (out / "copick_config.json").write_text(json.dumps(config, indent=1))
    (out / "cryopool.json").write_text(json.dumps({"commit": cid, "runs": {r: k for k, r in runs.items()},
                                                   "objects": objects}, indent=1))
    return {"folder": str(out), "runs": sorted(runs.values()), "objects": objects,
            "tomograms": sorted(tomograms or {})}


@dataclass
class CopickPicks:
    item_keys: list[str]
    positions: np.ndarray  # (n, 3) Å, our frame
    angles: np.ndarray  # (n, 3) RELION Euler angles
    ids: np.ndarray  # (n,) uint64, 0 where the file had none
    scores: np.ndarray  # (n,) float32, NaN where none
    files: list[str]


def _root(config: dict, path: Path) -> Path:
    root = config.get("overlay_root", "")
    if not isinstance(root, str) or not root.startswith("local://"):
        raise InvalidInputError("only local overlay roots can be imported", path=str(path), field="overlay_root",
                                expected="local:///path", found=root)
    return Path(root.removeprefix("local://"))


def read_copick_picks(repo: Repository, population: Population, config_path: str | Path, obj: str, *,
                      user_id: str | None = None, session_id: str | None = None) -> CopickPicks:
    """Every pick of object ``obj`` in a copick project (one user and session), in our frame."""
    path = Path(config_path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"not a readable copick config: {exc}", path=str(path)) from None
    if obj not in {o.get("name") for o in config.get("pickable_objects", [])}:
        raise InvalidInputError("no such pickable object", path=str(path), field="pickable_objects",
                                found=obj, expected=sorted(o.get("name") for o in config.get("pickable_objects", [])))
    sidecar = path.parent / "cryopool.json"
    runs = json.loads(sidecar.read_text()).get("runs", {}) if sidecar.is_file() else {}
    files = sorted(_root(config, path).glob(f"ExperimentRuns/*/Picks/*_{obj}.json"))
    sessions = {f.name[: -len(f"_{obj}.json")] for f in files}
    want = None if user_id is None and session_id is None else f"{user_id or USER_ID}_{session_id or SESSION_ID}"
    if want is None and len(sessions) > 1:
        raise InvalidInputError(f"picks of {obj} by several users or sessions", path=str(path), found=sorted(sessions),
                                hint="choose one with --user-id and --session-id")
    files = [f for f in files if want is None or f.name == f"{want}_{obj}.json"]
    if not files:
        raise NotFoundError(f"no picks of {obj} in the copick project", hint=str(path))
    keys, pos, ang, ids, scores = [], [], [], [], []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except ValueError as exc:
            raise FormatError(f"not JSON: {exc}", path=str(f)) from None
        run = f.parent.parent.name
        key, ref = find_item(repo, population, runs.get(run, run))
        ts = repo.get_record(ref, TiltSeries)
        offset = np.floor(np.asarray(ts.tomogram_size_px) / 2) * ts.pixel_size_angstrom
        scale = {"angstrom": 1.0, "pixel": ts.pixel_size_angstrom}.get(data.get("unit", "angstrom"))
        if scale is None:
            raise FormatError("unknown unit", path=str(f), field="unit", expected=["angstrom"], found=data.get("unit"))
        for n, p in enumerate(data.get("points") or []):
            try:
                m = np.asarray(p.get("transformation_", np.eye(4).tolist()), dtype=float)
                loc = np.array([float(p["location"][a]) for a in "xyz"]) * scale + m[:3, 3]
            except (KeyError, TypeError, ValueError) as exc:
                raise FormatError(f"malformed point: {exc}", path=str(f), field=f"points[{n}]") from None
            if m.shape != (4, 4) or not np.all(np.isfinite(m)) or not np.all(np.isfinite(loc)):
                raise FormatError("a finite location and a 4x4 transformation expected", path=str(f),
                                  field=f"points[{n}]")
            if not np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-4):
                raise FormatError("the transformation is not a rotation", path=str(f), field=f"points[{n}]")
            keys.append(key)
            pos.append(loc - offset)
            ang.append(matrix_euler(m[:3, :3]) if data.get("trust_orientation", True) else np.zeros(3))
            ids.append(int(p.get("instance_id") or 0))
            scores.append(np.nan if p.get("score") is None else float(p["score"]))
    return CopickPicks(keys, np.array(pos).reshape(-1, 3), np.array(ang).reshape(-1, 3), np.array(ids, np.uint64),
                       np.array(scores, np.float32), [str(f) for f in files])


def import_copick(repo: Repository, config_path: str | Path, obj: str, species: str | None = None, *,
                  half_maps: tuple[np.ndarray, np.ndarray] | None = None, mask: np.ndarray | None = None,
                  pixel_size_angstrom: float | None = None, diameter_angstrom: float | None = None,
                  symmetry: str = "C1", user_id: str | None = None, session_id: str | None = None,
                  branch: str | None = None, message: str | None = None) -> str:
    """Picks of copick object ``obj`` as species ``species`` (default: the name the export recorded, else ``obj``):
    a new version of an existing species (its maps kept, the half-set of every particle it already had kept), or a
    new species from ``half_maps``."""
    path = Path(config_path)
    sidecar = path.parent / "cryopool.json"
    recorded = json.loads(sidecar.read_text()).get("objects", {}) if sidecar.is_file() else {}
    name = species or recorded.get(obj, obj)
    validate_name(name, "species")
    tip = repo.refs.read(repo.branch_ref(branch))
    if tip is None:
        raise NotFoundError("the branch has no data sources yet", hint="import tilt series before picks")
    base = repo.population(tip)
    picks = read_copick_picks(repo, base, path, obj, user_id=user_id, session_id=session_id)
    n = len(picks.item_keys)
    ids = picks.ids.copy()
    if np.any(ids == 0) or len(np.unique(ids)) != n:
        ids = stable_particle_ids(name, picks.item_keys, picks.positions)
    item_names = sorted(set(picks.item_keys))
    existing = repo.get_record(base.species[name], Species) if name in base.species else None
    half = np.array([1 + i % 2 for i in range(n)], dtype=np.uint8)
    if existing is not None:
        table = repo.get_record(existing.particles, ParticleTable)
        known = dict(zip(repo.get_array(table.columns["particle_id"]).read().tolist(),
                         repo.get_array(table.columns["half_set"]).read().tolist()))
        half = np.array([known.get(int(i), h) for i, h in zip(ids, half)], dtype=np.uint8)
    elif half_maps is None or diameter_angstrom is None:
        raise InvalidInputError(f"species {name} is new: its half-maps and diameter are needed",
                                field="half_maps", hint="give --half1, --half2 and --diameter")
    refs = {k: find_item(repo, base, k)[1] for k in item_names}
    with repo.transaction() as tx:
        provenance = {"copick": {"config": str(path), "object": obj, "files": len(picks.files)}}
        if existing is not None:
            table = tx.put_record(particle_table(tx, ids, picks.item_keys, picks.positions, picks.angles, half,
                                                 picks.scores))
            ref = tx.put_record(replace(existing, particles=table, reconstructed_from=[refs[k] for k in item_names],
                                        quarter_maps=None, metadata={**existing.metadata, **provenance}))
        else:
            maps = SpeciesMaps(half_maps[0].astype(np.float32), half_maps[1].astype(np.float32),
                               None if mask is None else mask.astype(np.float32), float(pixel_size_angstrom))
            ref = put_species(tx, SpeciesDraft(name, symmetry, float(diameter_angstrom), maps, ids, picks.item_keys,
                                               picks.positions, picks.angles, half, picks.scores,
                                               [refs[k] for k in item_names], provenance))
        operation = Operation(kind="import", software=software_version(),
                              inputs={f"picks {i}": tx.put_blob(Path(f).read_bytes()) for i, f in enumerate(picks.files)},
                              parameters={"what": "copick", "object": obj, "species": name, "particles": n,
                                          "config": str(path), "files": [Path(f).name for f in picks.files]})
        return tx.commit(lambda pop: with_species(tx, pop, ref, replace_existing=True), operation=operation,
                         branch=branch, message=message or f"Import copick picks of {obj} as {name} ({n} particles)")
