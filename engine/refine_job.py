"""One item's work in a refinement iteration: a function of the repository and the iteration's plan.

Items are independent within an iteration except through the species maps (BRIEF §6). The
``IterationPlan`` holds what they share (each species' references for both half-sets, bands,
reconstruction boxes, the particles' starting poses, the settings, which item-halves hold a kept
fit); ``refine_item`` reads one item from the repository, refines both half-sets and inserts the
item's particles into reconstruction accumulators. The same function runs in process, item after
item into shared accumulators, or on Dask workers (``distributed``), whose accumulators the process
that runs the iteration adds up: Fourier accumulators of different items simply add.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cryopool.repo import Repository, TiltSeries

from .forward import ParticleSet, reconstruct_half_maps
from .projection import FourierAccumulator, VolumeTransform
from .records_io import ItemModel, ParticleColumns, geometry_to, imaging_to, load_item, to_device
from .nonuniform import quarter_set
from .refine_item import RefineSettings, SpeciesInput, refine_item_half
from .symmetry import symmetry_operators
from .tilt_model import Imaging, TiltGeometry

__all__ = ["SpeciesPlan", "IterationPlan", "ItemResult", "refine_item", "new_accumulators"]

Accumulators = dict[str, tuple[FourierAccumulator, ...]]  # per species: 2 half-sets, or 4 quarter-sets


@dataclass
class SpeciesPlan:
    name: str
    references: tuple[VolumeTransform, VolumeTransform]  # per half-set: regularised, masked, transformed
    half_maps: tuple[torch.Tensor, torch.Tensor]  # per half-set, before regularisation (the CTF fit's reference)
    box: int
    diameter_angstrom: float
    resolution_angstrom: float  # this iteration's working resolution: the species' band edge
    reconstruction_box: int
    symmetry: str
    columns: ParticleColumns  # the particle table, poses resampled to the run's temporal samples


@dataclass
class IterationPlan:
    settings: RefineSettings
    species: dict[str, SpeciesPlan]
    fitted: dict[str, bool]  # "item/halfN" -> its start is a kept fit of these data (``refine_item._decide``)
    quarters: bool = False  # reconstruct quarter-sets (each half's particles split by id) for non-uniform filtering

    def to(self, device) -> IterationPlan:
        """The plan with every tensor on ``device`` (a worker moves the shipped CPU plan to its own)."""
        def volume(v: VolumeTransform) -> VolumeTransform:
            return replace(v, values=v.values.to(device))
        species = {name: replace(s, references=tuple(volume(v) for v in s.references),
                                 half_maps=tuple(h.to(device) for h in s.half_maps))
                   for name, s in self.species.items()}
        return replace(self, species=species)


@dataclass
class ItemResult:
    key: str
    half_models: dict[int, tuple[TiltGeometry, Imaging]]
    poses: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # species -> (rows, positions, orientations)
    ncc: dict[str, list[float]]  # "item/halfN" -> target after each stage
    decisions: dict[str, dict]
    accumulators: Accumulators | None  # the item's own, where none were given to add into

    def cpu(self) -> ItemResult:
        """Everything on the CPU, to be shipped back from a worker."""
        accs = None
        if self.accumulators is not None:
            accs = {name: tuple(a.to("cpu") for a in pair) for name, pair in self.accumulators.items()}
        return replace(self, half_models={h: (geometry_to(g, "cpu"), imaging_to(i, "cpu"))
                                          for h, (g, i) in self.half_models.items()},
                       poses={n: tuple(t.cpu() for t in p) for n, p in self.poses.items()}, accumulators=accs)


def new_accumulators(plan: IterationPlan, device, dtype=torch.float32) -> Accumulators:
    n = 4 if plan.quarters else 2
    return {name: tuple(FourierAccumulator(s.reconstruction_box, device=device, dtype=dtype) for _ in range(n))
            for name, s in plan.species.items()}


def _half_model(repo: Repository, item: TiltSeries, half: int, device) -> ItemModel | None:
    hm = item.half_set_models.get(str(half))
    if hm is None:
        return None
    alt = replace(item, deformation=hm.deformation, imaging=hm.imaging)
    return to_device(load_item(repo, alt, with_stack=False), device)


def refine_item(repo: Repository, plan: IterationPlan, key: str, item: TiltSeries, device,
                accumulators: Accumulators | None = None) -> ItemResult:
    """Refine both half-sets of one item and insert its particles into the reconstructions.

    ``accumulators``: add into these (in process); without them the item gets its own, returned
    in the result for the caller to add up (on a worker).
    """
    base = to_device(load_item(repo, item), device)
    own = accumulators is None
    accs = new_accumulators(plan, device, base.stack.dtype) if own else accumulators
    half_models, poses, ncc, decisions = {}, {}, {}, {}
    for half in (1, 2):
        start = _half_model(repo, item, half, device) or base
        inputs, rows = [], []
        for name, s in plan.species.items():
            sel = (s.columns.select(key) & (s.columns.half_sets == half)).nonzero().flatten()
            if len(sel) == 0:
                continue
            inputs.append(SpeciesInput(name, s.references[half - 1], s.box, s.diameter_angstrom,
                                       s.columns.positions[sel].to(device), s.columns.orientations[sel].to(device),
                                       resolution_angstrom=s.resolution_angstrom, half_map=s.half_maps[half - 1]))
            rows.append((name, sel))
        if not inputs:
            half_models[half] = (start.geometry, start.imaging)
            continue
        tag = f"{key}/half{half}"
        state = refine_item_half(base.stack, start.geometry, start.imaging, base.pre_exposure, base.exposure,
                                 inputs, plan.settings, fitted_before=plan.fitted.get(tag, False))
        ncc[tag] = [round(v, 5) for v in state.history]
        decisions[tag] = state.decision
        half_models[half] = (state.geometry, state.imaging)
        for (name, sel), p, o in zip(rows, state.positions, state.orientations):
            s = plan.species[name]
            p, o = p.to(s.columns.positions.dtype), o.to(s.columns.orientations.dtype)  # as they are stored
            poses[name] = _merge_rows(poses.get(name), sel, p, o)
            labels = torch.full((len(sel),), half, dtype=torch.long)
            if plan.quarters:  # half 1 → sets 1, 2; half 2 → sets 3, 4
                labels = 2 * (half - 1) + torch.from_numpy(quarter_set(s.columns.ids[sel.cpu().numpy()]))
            parts = ParticleSet(p.to(device), o.to(device), labels.to(device))
            accs[name] = reconstruct_half_maps(base.stack, state.geometry, state.imaging, parts, base.pre_exposure,
                                               base.exposure, box=s.reconstruction_box,
                                               symmetry=symmetry_operators(s.symmetry, device=device),
                                               accumulators=accs[name])
    return ItemResult(key, half_models, poses, ncc, decisions, accs if own else None)


def _merge_rows(have, sel, positions, orientations):
    if have is None:
        return sel, positions, orientations
    return torch.cat([have[0], sel]), torch.cat([have[1], positions]), torch.cat([have[2], orientations])
