"""A new species from template matching: tomograms of the items, matches, picks, one commit.

Picks avoid every particle already in the item (any species, by the merge's
collision rule) and each other, so a branch made this way merges back
without collisions. The species starts from the template (both half-maps,
resampled to the items' pixel size); its first refinement reconstructs each
half from its own picks. Scores are in units of the search's noise (σ).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from cryopool.repo import (InvalidInputError, Metrics, Operation, Repository, Species, find_item, iter_items,
                           software_version, stable_particle_ids, with_species)

from .ctf_fit import circular_mask
from .fourier import fourier_resample
from .records_io import ParticleColumns, load_item, load_particles, to_device
from .template_match import MatchSettings, false_alarm_threshold, match_template, pick_peaks
from .tomogram import TomogramSettings, reconstruct_tomogram
from .writer import species_version

__all__ = ["PickingReport", "pick_species", "occupied"]


@dataclass
class PickingReport:
    species: str
    commit: str | None = None
    items: dict[str, dict] = field(default_factory=dict)  # key → picks, threshold, best score, orientations, s

    @property
    def picks(self) -> int:
        return sum(v["picks"] for v in self.items.values())


def occupied(repo: Repository, population) -> dict[str, list[tuple[np.ndarray, float]]]:
    """Per item, (position Å, radius Å) of every particle of every species there (first temporal sample)."""
    out: dict[str, list] = {}
    for name in sorted(population.species):
        sp = repo.get_record(population.species[name], Species)
        cols = load_particles(repo, sp.particles)
        for i, key in enumerate(cols.item_names):
            out.setdefault(key, []).extend((p.numpy(), sp.diameter_angstrom / 2)
                                           for p in cols.positions[cols.item_index == i, 0])
    return out


def pick_species(repo: Repository, name: str, template: torch.Tensor, template_pixel: float, *,
                 diameter_angstrom: float, symmetry: str = "C1", items: list[str] | None = None,
                 branch: str | None = None, settings: MatchSettings = MatchSettings(), binning: int = 1,
                 threshold_sigma: float | None = None, max_picks: int | None = None, message: str | None = None,
                 template_attributes: dict | None = None, device: torch.device | str = "cpu",
                 progress: Callable[[str, int, int], None] | None = None,
                 scores: Callable[[str, torch.Tensor, float], None] | None = None) -> PickingReport:
    """Match ``template`` in every item (or ``items``) and commit the picks as species ``name`` on ``branch``."""
    new_branch = bool(branch) and not repo.branch_exists(branch)
    rev = "HEAD" if new_branch else repo.branch_ref(branch)
    start = repo.resolve(rev)
    population = repo.population(start)
    if name in population.species:
        raise InvalidInputError(f"species {name} already exists on {rev}", field="species",
                                hint="matching adds a new species: choose another name, or rm it first")
    refs = dict(find_item(repo, population, k) for k in items) if items else \
        {k: ref for k, ref, _ in iter_items(repo, population)}
    keys = list(refs)
    report = PickingReport(name)
    taken = occupied(repo, population)
    rows = []  # (key, position, rotation, score σ)
    pixel = None
    for n, key in enumerate(keys):
        ts = repo.get_record(refs[key])
        pixel = pixel or ts.pixel_size_angstrom
        if abs(ts.pixel_size_angstrom - pixel) > 1e-6:
            raise InvalidInputError("items of one match must share a pixel size", field=key,
                                    expected=pixel, found=ts.pixel_size_angstrom)
        t0 = time.perf_counter()
        item = to_device(load_item(repo, ts), device)
        if progress:
            progress(f"{key}: tomogram", n, len(keys))
        tomogram, voxel = reconstruct_tomogram(item, ts.tomogram_size_px, TomogramSettings(binning=binning))
        if progress:
            progress(f"{key}: matching", n, len(keys))
        result = match_template(tomogram, voxel, template, template_pixel, item, diameter_angstrom, settings)
        trials = result.scores.numel() * len(result.rotations)
        threshold = (threshold_sigma * result.score_std if threshold_sigma is not None else
                     false_alarm_threshold(result.score_std, trials, settings.false_peaks))
        found = pick_peaks(result, diameter_angstrom, taken.get(key, []), threshold=threshold,
                           factor=settings.factor, max_picks=max_picks)
        rows += [(key, pos, rot, score / result.score_std) for pos, rot, score in found]
        if scores:
            scores(key, result.scores / result.score_std, voxel)
        report.items[key] = {"picks": len(found), "threshold_sigma": round(threshold / result.score_std, 3),
                             "best_sigma": round(float(result.scores.max()) / result.score_std, 3),
                             "orientations": len(result.rotations), "voxel_angstrom": voxel,
                             "seconds": round(time.perf_counter() - t0, 2)}
    if progress:
        progress("committing", len(keys), len(keys))
    if not rows:
        raise InvalidInputError(f"no place in {', '.join(keys)} scored above the threshold", field="threshold",
                                hint="lower --threshold (in σ of the search's noise), or check the template's "
                                     "pixel size and hand")
    if new_branch:  # made only now, so a failed search leaves no branch behind (from HEAD, as checkout -b would)
        repo.create_branch(branch, start)
    box = int(round(template.shape[-1] * template_pixel / pixel))
    box += box % 2
    reference = fourier_resample(template.to(torch.float64), box).to(torch.float32)
    record = Species(name=name, symmetry=symmetry.upper(), diameter_angstrom=diameter_angstrom,
                     pixel_size_angstrom=pixel, half_map_1=None, half_map_2=None, particles=None,
                     metadata={"picked_by": "template matching"})
    params = {**asdict(settings), "binning": binning, "threshold_sigma": threshold_sigma, "max_picks": max_picks,
              "template_pixel_angstrom": template_pixel, "diameter_angstrom": diameter_angstrom,
              "items": report.items}
    columns = _columns(name, rows)
    with repo.transaction() as tx:
        ref = species_version(tx, record, (reference, reference), columns, metrics=Metrics(),
                              reconstructed_from=[refs[k] for k in columns.item_names],
                              mask=circular_mask(box, 0.55 * diameter_angstrom / pixel, edge_px=3.0, dims=3))
        inputs = {} if template_attributes is None else {
            "template": tx.put_array(template.numpy(), attributes=template_attributes)}  # provenance: the map used
        report.commit = tx.commit(
            lambda pop: with_species(tx, pop, ref), branch=branch, retries=0,
            operation=Operation(kind="match", parameters=params, software=software_version(), inputs=inputs),
            message=message or f"Template matching: {len(rows)} {name} picked in {len(columns.item_names)} item(s)")
    return report


def _columns(name: str, rows: list[tuple]) -> ParticleColumns:
    """Picks ``(item, position, rotation, score)`` as particle columns; half-sets alternate within each item in
    descending score."""
    keys = sorted({r[0] for r in rows})
    rank = {}
    half = []
    for key, *_ in rows:
        rank[key] = rank.get(key, 0) + 1
        half.append(1 + (rank[key] + 1) % 2)
    positions = np.stack([r[1] for r in rows])
    return ParticleColumns(
        ids=stable_particle_ids(name, [r[0] for r in rows], positions), item_names=keys,
        item_index=torch.tensor([keys.index(r[0]) for r in rows]),
        positions=torch.from_numpy(positions)[:, None], orientations=torch.stack([r[2] for r in rows])[:, None],
        half_sets=torch.tensor(half), scores=torch.tensor([r[3] for r in rows], dtype=torch.float64))
