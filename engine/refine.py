"""``refine``: check out a population, refine every item as a multi-particle system, reconstruct, commit.

One iteration (BRIEF §6):

1. For each species, regularise each half-map into that half's reference,
   using the FSC recorded at the end of the previous iteration (or measured
   once from the half-maps if none is recorded) and the working resolution
   it implies.
2. For each item and each half-set, refine the item's models and the poses of
   that half's particles of all species jointly (``refine_item``). Half-sets
   never share anything (gold standard); the item's published models are the
   parameter-wise average of the two half-set models.
3. Reconstruct each species' half-maps from the original tilt images at the
   refined geometry of their own half-set; masked FSC (phase-randomised),
   resolution at 0.143.
4. Commit new item versions (``refined_against`` = the species versions used,
   ``half_set_models``) and species versions (half-maps, poses, FSC,
   resolution, ``reconstructed_from`` = the new item versions; quarter-maps
   for non-uniform filtering, the network weights a learned regulariser
   trained), with an operation record holding every parameter. One commit per iteration; an
   interrupted run resumes after its last completed iteration.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from cryopool.repo import (ConflictError, InvalidInputError, item_refs, iter_items, Metrics, NotFoundError, Operation,
                           Population, Ref, Repository, Species, TiltSeries, software_version, with_items, without_marks)

from .forward import species_reconstruction_box
from .alignment import masked_reference
from .fsc import masked_fsc, resolution_at
from .records_io import load_item, load_map, load_particles, load_quarter_maps, load_weights, unmodelled_optics
from .refine_item import GROUPS, RefineSettings
from .register import register_shift, shift_map, shift_poses, symmetric_part
from .refine_job import IterationPlan, SpeciesPlan, new_accumulators, refine_item
from .denoiser import DenoiserSettings
from .projection import FourierAccumulator
from .regularise import HalfMaps, Regularised, Regulariser, working_resolution
from .regularisers import REGULARISERS, make_regulariser
from .symmetry import symmetry_operators
from .tilt_model import Imaging, TiltGeometry
from .trajectories import MAX_TEMPORAL_SAMPLES, resample_orientations, resample_positions
from .writer import item_version, species_version

__all__ = ["RefineOptions", "refine_population", "IterationReport", "resume_point", "pick_device", "species_fsc"]

ProgressFn = Callable[[str, int, int], None]


@dataclass
class RefineOptions:
    """Everything a user chooses about a refine run (the CLI's options are derived from these defaults; the
    per-item ones default to ``RefineSettings``'s)."""

    iterations: int = 3
    groups: tuple[str, ...] = RefineSettings.groups
    image_warp_grid: tuple[int, int] = RefineSettings.image_warp_grid
    volume_warp_grid: tuple[int, int, int, int] = RefineSettings.volume_warp_grid
    start_resolution_angstrom: float | None = None  # None: from the recorded (or measured) FSC
    lbfgs_iterations: int = RefineSettings.lbfgs_iterations
    rounds: int = RefineSettings.rounds
    device: str = "auto"
    memory_budget_gb: float = RefineSettings.memory_budget_bytes / 1024**3
    wiener_constant: float = 1e-3
    warp_regularisation: float = RefineSettings.warp_regularisation  # so global parameters explain what they can
    tilt_angle_prior_deg: float = RefineSettings.tilt_angle_prior_deg  # σ of a refinement's move (0: no prior)
    shift_prior_angstrom: float = RefineSettings.shift_prior_angstrom
    temporal_samples: int = 1  # control points of each particle's pose trajectory over the exposure (1–3)
    allow_unmodelled: bool = False  # refine items whose records hold optics the engine does not model
    require_significance: bool = RefineSettings.require_significance  # keep only moves the data support (AIC)
    regulariser: str = "fsc"  # half-maps → references: fsc, nu, denoiser, prior, prior+denoiser (``regularisers``)
    denoiser_steps: int = DenoiserSettings.steps  # noise2noise training steps per species per iteration

    def __post_init__(self) -> None:
        unknown = sorted(set(self.groups) - set(GROUPS))
        if unknown:
            raise InvalidInputError("unknown parameter groups", field="groups", expected=list(GROUPS), found=unknown)
        if self.regulariser not in REGULARISERS:
            raise InvalidInputError("unknown regulariser", field="regulariser", expected=list(REGULARISERS),
                                    found=self.regulariser)
        for name, low in (("iterations", 1), ("rounds", 1), ("lbfgs_iterations", 0), ("denoiser_steps", 0)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise InvalidInputError(f"{name} must be an integer of at least {low}", field=name,
                                        expected=f">= {low}", found=getattr(self, name))
        if not self.memory_budget_gb > 0 or not self.wiener_constant > 0 or not self.warp_regularisation >= 0:
            raise InvalidInputError("memory budget and Wiener constant must be positive, warp regularisation not "
                                    "negative", field="options",
                                    found=(self.memory_budget_gb, self.wiener_constant, self.warp_regularisation))
        if not self.tilt_angle_prior_deg >= 0 or not self.shift_prior_angstrom >= 0:
            raise InvalidInputError("prior widths must not be negative (0: no prior)", field="priors",
                                    found=(self.tilt_angle_prior_deg, self.shift_prior_angstrom))
        if not 1 <= self.temporal_samples <= MAX_TEMPORAL_SAMPLES:
            raise InvalidInputError("temporal samples out of range", field="temporal_samples",
                                    expected=f"1..{MAX_TEMPORAL_SAMPLES}", found=self.temporal_samples)


@dataclass
class IterationReport:
    commit: str
    iteration: int
    resolution_before: dict[str, float]
    resolution_after: dict[str, float]
    particles: dict[str, int]
    ncc: dict[str, list[float]] = field(default_factory=dict)  # item/half -> history
    decisions: dict[str, dict] = field(default_factory=dict)  # item/half -> kept or not, and why


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("no CUDA device is available", field="device", found=name,
                                hint="use --device cpu (or auto)")
    return torch.device(name)


def resume_point(repo: Repository, branch: str | None = None) -> dict | None:
    """The unfinished refine run at the branch tip, if any: its run record."""
    tip = repo.refs.read(repo.branch_ref(branch))
    if tip is None:
        return None
    op = repo.get_commit(tip).operation
    run = op.parameters.get("run") if op.kind == "refine" else None
    if run and run["iteration"] < run["of"]:
        return run
    return None


@dataclass
class _SpeciesState:
    name: str
    record: Species
    ref: Ref
    columns: object  # ParticleColumns
    halves: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    curve: torch.Tensor
    resolution: float
    box: int
    quarters: tuple | None  # each half's two quarter-maps, where this version has them
    weights: object  # regularise.NetworkWeights | None: the species' stored network


def species_fsc(repo: Repository, species: Species, h1: torch.Tensor, h2: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    """The species' FSC curve: as its last refinement recorded it, else measured from its half-maps (masked, with
    the phase-randomisation correction, where it has a mask)."""
    if species.metrics.fsc is not None:
        return torch.from_numpy(np.asarray(repo.get_array(species.metrics.fsc).read())[:, 1]).to(h1.device)
    return (masked_fsc(h1, h2, mask)["corrected"] if mask is not None else
            masked_fsc(h1, h2, torch.ones_like(h1))["unmasked"])


def _load_species(repo: Repository, pop: Population, device) -> dict[str, _SpeciesState]:
    out = {}
    for name in sorted(pop.species):
        ref = pop.species[name]
        sp = repo.get_record(ref, Species)
        h1, h2 = load_map(repo, sp, "half_map_1").to(device), load_map(repo, sp, "half_map_2").to(device)
        mask = load_map(repo, sp, "mask").to(device) if sp.mask is not None else None
        curve = species_fsc(repo, sp, h1, h2, mask)
        res = sp.metrics.resolution_angstrom or resolution_at(curve, sp.pixel_size_angstrom, 0.143)
        quarters = load_quarter_maps(repo, sp)
        if quarters is not None:
            quarters = tuple(tuple(q.to(device) for q in pair) for pair in quarters)
        out[name] = _SpeciesState(name, sp, ref, load_particles(repo, sp.particles), (h1, h2), mask, curve, res,
                                  h1.shape[-1], quarters, load_weights(repo, sp))
    return out


def _average(a: TiltGeometry, b: TiltGeometry, ia: Imaging, ib: Imaging) -> tuple[TiltGeometry, Imaging]:
    def mean(x, y):
        return None if x is None or y is None else (x + y) / 2
    g = replace(a, shifts_angstrom=mean(a.shifts_angstrom, b.shifts_angstrom),
                angle_corrections_deg=mean(a.angle_corrections_deg, b.angle_corrections_deg),
                image_warp=mean(a.image_warp, b.image_warp), volume_warp=mean(a.volume_warp, b.volume_warp))
    im = replace(ia, defocus_u_angstrom=mean(ia.defocus_u_angstrom, ib.defocus_u_angstrom),
                 defocus_v_angstrom=mean(ia.defocus_v_angstrom, ib.defocus_v_angstrom))
    return g, im


def _reconstruction_boxes(repo: Repository, items: list, species: dict, opts: RefineOptions,
                          sets: int = 2) -> dict[str, int]:
    """Per species, the box that holds every particle's delocalised image in every item (up to Nyquist).

    The defocus may move by the search range during refinement, and particles sit up to half the
    tomogram's thickness off the tilt's defocus. The accumulators of all species together stay
    within half the memory budget (``sets`` accumulators per species: 2 half-sets, or 4 quarter-sets).
    """
    if not items:
        return {name: s.box for name, s in species.items()}
    max_def = 0.0
    for _, _, item in items:
        m = load_item(repo, item, with_stack=False)
        max_def = max(max_def, float(m.imaging.defocus_u_angstrom.abs().max()) + RefineSettings.defocus_search_angstrom
                      + m.geometry.tomogram_size_angstrom[2] / 2)
        optics = dict(voltage_kv=m.imaging.voltage_kv, spherical_aberration_mm=m.imaging.spherical_aberration_mm)
    return {name: species_reconstruction_box(s.record.diameter_angstrom, s.box, s.record.pixel_size_angstrom, max_def,
                                             max_bytes=opts.memory_budget_gb * 1024**3 / (sets * len(species)), **optics)
            for name, s in species.items()}


def _plan(repo: Repository, tip: str, species: dict[str, _SpeciesState], items: list, opts: RefineOptions, run: dict,
          regulariser: Regulariser) -> tuple[IterationPlan, dict[str, Regularised]]:
    """What every item of this iteration shares, and what regularising each species produced (its new
    network weights and record, for the commit)."""
    settings = RefineSettings(groups=tuple(opts.groups), image_warp_grid=tuple(opts.image_warp_grid),
                              volume_warp_grid=tuple(opts.volume_warp_grid), lbfgs_iterations=opts.lbfgs_iterations,
                              rounds=opts.rounds, memory_budget_bytes=int(opts.memory_budget_gb * 1024**3),
                              require_significance=opts.require_significance,
                              warp_regularisation=opts.warp_regularisation,
                              tilt_angle_prior_deg=opts.tilt_angle_prior_deg,
                              shift_prior_angstrom=opts.shift_prior_angstrom)
    rec_box = _reconstruction_boxes(repo, items, species, opts, sets=4 if regulariser.needs_quarters else 2)
    samples = opts.temporal_samples  # stored trajectories are resampled to it (exactly, when adding samples)
    plans, work_res, regularised = {}, {}, {}
    pixel = {key: item.pixel_size_angstrom for key, _, item in items}
    for name, s in species.items():  # 1. references, per half, from the recorded FSC
        res = opts.start_resolution_angstrom if (opts.start_resolution_angstrom and run["iteration"] == 0) \
            else working_resolution(s.curve, s.record.pixel_size_angstrom)
        work_res[name] = res
        regularised[name] = regulariser(HalfMaps(s.halves, s.curve, s.record.pixel_size_angstrom, res, s.quarters,
                                                 s.weights))
        columns = replace(s.columns, positions=resample_positions(s.columns.positions, samples).clone(),
                          orientations=resample_orientations(s.columns.orientations, samples).clone())
        # only the band's part of each reference's transform is computed and kept (the alignment target crops to
        # it anyway): a 128-px map's whole 256³ transform is 134 MB per half, held through the iteration and sent
        # to every worker
        band = s.box * max(pixel.values(), default=s.record.pixel_size_angstrom) / res + 1
        plans[name] = SpeciesPlan(name, tuple(masked_reference(f, s.record.diameter_angstrom,
                                                               s.record.pixel_size_angstrom, band=band)
                                              for f in regularised[name].references),
                                  s.halves, s.box, s.record.diameter_angstrom, res, rec_box[name],
                                  s.record.symmetry, columns)
    fitted = _fitted_starts(repo, tip)
    # each species is compared within its own band (SpeciesInput.resolution_angstrom, as M does): a species
    # with a poor map cannot narrow the others' bands; the settings keep the finest as the default
    settings = replace(settings, resolution_angstrom=min(work_res.values()))
    return IterationPlan(settings, plans, fitted, quarters=regulariser.needs_quarters), regularised


def _fitted_starts(repo: Repository, tip: str) -> dict[str, bool]:
    """Which item-halves start from a kept fit of these data (``refine_item._decide``): those the last refine commit
    on the first-parent line says it fitted, where neither the item nor any species' particle table has changed
    since (an edited half-map changes neither; a merge that brings particles changes the tables)."""
    pop, commit = repo.population(tip), repo.get_commit(tip)
    while commit.operation.kind != "refine":
        if not commit.parents:
            return {}
        commit = repo.get_commit(commit.parents[0].id)
    then = repo.get_record(commit.population, Population)
    particles = lambda p: {n: repo.get_record(r, Species).particles for n, r in p.species.items()}  # noqa: E731
    if particles(pop) != particles(then):
        return {}
    before = item_refs(repo, then)
    same = {k for k, r in item_refs(repo, pop).items() if before.get(k) == r}
    return {k: bool(d.get("fitted", False)) for k, d in commit.operation.parameters.get("decisions", {}).items()
            if k.rsplit("/half", 1)[0] in same}


class InProcess:
    """Items one after the other in this process, into one set of accumulators."""

    def __init__(self, device) -> None:
        self.device = device

    def run(self, repo: Repository, plan: IterationPlan, items: list, accumulators, progress: ProgressFn | None):
        for n, (key, _, item) in enumerate(items):
            if progress:
                progress(f"item {key}", n, len(items))
            yield refine_item(repo, plan, key, item, self.device, accumulators)


def _iteration(repo: Repository, tip: str, opts: RefineOptions, run: dict, device,
               regulariser: Regulariser, progress: ProgressFn | None, runner, ref_name: str) -> IterationReport:
    pop = repo.population(tip)
    species = _load_species(repo, pop, device)
    items = [(key, ref, repo.get_record(ref, TiltSeries)) for key, ref in item_refs(repo, pop).items()]
    plan, regularised = _plan(repo, tip, species, items, opts, run, regulariser)
    # 2. per item, per half: refine; 3. accumulate reconstructions with that half's geometry
    accs = new_accumulators(plan, device)
    poses = {name: (s.columns.positions.clone(), s.columns.orientations.clone()) for name, s in plan.species.items()}
    new_items: dict[str, tuple[TiltSeries, dict]] = {}
    ncc_history, decisions = {}, {}
    records = {key: item for key, _, item in items}
    for result in runner.run(repo, plan, items, accs, progress):
        for name, (rows, positions, orientations) in result.poses.items():
            poses[name][0][rows] = positions.cpu()
            poses[name][1][rows] = orientations.cpu()
        if result.accumulators is not None:  # a worker's own: add them up
            for name, pair in result.accumulators.items():
                for total, part in zip(accs[name], pair):
                    total.add(part)
        ncc_history.update(result.ncc)
        decisions.update(result.decisions)
        new_items[result.key] = (records[result.key], result.half_models)
    if progress:
        progress("reconstructing", len(items), len(items))
    return _commit(repo, tip, pop, species, plan, new_items, poses, accs, opts, run, ncc_history, decisions,
                   regulariser, regularised, ref_name)


def _half_maps(accs: tuple[FourierAccumulator, ...], opts: RefineOptions, box: int):
    """Both half-maps, and the four quarter-maps where the accumulators are quarter-sets."""
    if len(accs) == 2:
        return tuple(a.finalise(opts.wiener_constant, size=box).cpu() for a in accs), None
    halves = tuple(FourierAccumulator.total(list(accs[i:i + 2])).finalise(opts.wiener_constant, size=box).cpu()
                   for i in (0, 2))
    return halves, [a.finalise(opts.wiener_constant, size=box).cpu() for a in accs]


def _in_register(s: _SpeciesState, halves: tuple[torch.Tensor, torch.Tensor], quarters: list | None,
                 positions: torch.Tensor, orientations: torch.Tensor, resolution_angstrom: float):
    """Each new half-map shifted onto the frame of the map the iteration started from (the average of the
    half-maps it refined against; along its symmetry axes only), and that half's particles moved alike
    (``register``). Returns the half-maps, quarter-maps, positions and each half's shift in Å (for the operation
    record)."""
    frame = 0.5 * (s.halves[0] + s.halves[1]).cpu()
    px = s.record.pixel_size_angstrom
    group = symmetry_operators(s.record.symmetry, dtype=torch.float64)
    halves, quarters, positions, shifts = list(halves), quarters and list(quarters), positions.clone(), {}
    for half in (1, 2):
        shift = symmetric_part(register_shift(halves[half - 1], frame, pixel_size_angstrom=px,
                                              resolution_angstrom=resolution_angstrom), group)
        halves[half - 1] = shift_map(halves[half - 1], shift)
        for i in ((2 * half - 2, 2 * half - 1) if quarters else ()):  # half 1 → sets 1, 2; half 2 → sets 3, 4
            quarters[i] = shift_map(quarters[i], shift)
        rows = s.columns.half_sets == half
        positions[rows] = shift_poses(positions[rows], orientations[rows], shift, px)
        shifts[f"half{half}"] = [round(v * px, 3) for v in shift.tolist()]
    return tuple(halves), quarters, positions, shifts


def _commit(repo, tip, pop, species, plan, new_items, poses, accs, opts, run, ncc_history, decisions, regulariser,
            regularised, ref_name):
    work_res = {name: s.resolution_angstrom for name, s in plan.species.items()}
    rec_box = {name: s.reconstruction_box for name, s in plan.species.items()}
    with repo.transaction() as tx:
        species_refs_used = [s.ref for s in species.values()]
        refined: dict[str, Ref] = {}
        for key, (old, halves) in new_items.items():
            published = _average(halves[1][0], halves[2][0], halves[1][1], halves[2][1])
            refined[key] = item_version(tx, old, published, halves, refined_against=species_refs_used)
        new_species, before, after, counts, registered = {}, {}, {}, {}, {}
        for name, s in species.items():
            maps, quarters = _half_maps(accs[name], opts, s.box)
            (h1, h2), quarters, positions, registered[name] = _in_register(s, maps, quarters, *poses[name],
                                                                           work_res[name])
            mask = s.mask.cpu() if s.mask is not None else torch.ones_like(h1)
            curve = masked_fsc(h1, h2, mask)["corrected"]
            res = resolution_at(curve, s.record.pixel_size_angstrom, 0.143)
            freq = np.arange(len(curve)) / (len(h1) * s.record.pixel_size_angstrom)
            used = sorted({s.columns.item_names[i] for i in s.columns.item_index.unique().tolist()})
            metrics = Metrics(resolution_angstrom=float(res), values={
                "resolution_0.5_angstrom": float(resolution_at(curve, s.record.pixel_size_angstrom, 0.5)),
                "working_resolution_angstrom": float(work_res[name])})
            new_species[name] = species_version(
                tx, s.record, (h1, h2), replace(s.columns, positions=positions, orientations=poses[name][1]),
                metrics=metrics, fsc=(freq, curve.numpy()), reconstructed_from=[refined[k] for k in used if k in refined],
                quarter_maps=quarters, denoiser=regularised[name].weights)
            before[name], after[name], counts[name] = s.resolution, float(res), len(s.columns.ids)
        new_pop = with_items(tx, replace(pop, species={**pop.species, **new_species}), refined, replace_existing=True)
        new_pop = without_marks(new_pop, items=list(refined), species=list(new_species))  # a merge's marks, now done
        params = {**asdict(opts), "run": {**run, "iteration": run["iteration"] + 1}, "resolution_before": before,
                  "resolution_after": after,
                  "regulariser": {**regulariser.parameters(),
                                  "species": {n: r.record for n, r in regularised.items()}},
                  "ncc": ncc_history, "reconstruction_box": rec_box, "registration_angstrom": registered,
                  "decisions": decisions}
        operation = Operation(kind="refine", parameters=params, software=software_version(),
                              inputs={"population": repo.get_commit(tip).population})
        summary = ", ".join(f"{n} {before[n]:.1f}→{after[n]:.1f} Å" for n in species)
        def on_refined_tip(base):  # the branch it was read from, and only if no one moved it meanwhile
            if base != pop:
                raise ConflictError("the branch moved while it was being refined: nothing was committed",
                                    field=ref_name, hint="refine again from the new tip")
            return new_pop
        commit = tx.commit(on_refined_tip, message=f"Refine iteration {run['iteration'] + 1}/{run['of']}: {summary}",
                           operation=operation, branch=ref_name, retries=0)
    return IterationReport(commit, run["iteration"] + 1, before, after, counts, ncc_history, decisions)


def refine_population(repo: Repository, options: RefineOptions, *, branch: str | None = None,
                      resume: bool = False, regulariser: Regulariser | None = None,
                      progress: ProgressFn | None = None, max_iterations: int | None = None,
                      runner=None) -> list[IterationReport]:
    """Run ``options.iterations`` refinement iterations on the branch (or resume an interrupted run).

    ``max_iterations`` stops early (the run stays resumable), so callers can report each commit as it lands.
    ``runner`` refines the items of an iteration: in this process (the default) or on Dask workers
    (``distributed.DaskRunner``); either way only this process writes, one commit per iteration.
    """
    device = pick_device(options.device)
    runner = runner or InProcess(device)
    ref_name = repo.branch_ref(branch)
    run = resume_point(repo, branch) if resume else None
    if run is not None:
        options = RefineOptions(**{k: (tuple(v) if isinstance(v, list) else v)
                                   for k, v in run["options"].items()})
    else:
        run = {"id": uuid.uuid4().hex, "iteration": 0, "of": options.iterations,
               "options": asdict(options)}
    regulariser = regulariser or make_regulariser(options.regulariser, denoiser_steps=options.denoiser_steps)
    tip = repo.refs.read(ref_name)
    if tip is not None and not options.allow_unmodelled:
        found = {key: what for key, _, item in iter_items(repo, repo.population(tip))
                 if (what := unmodelled_optics(repo, item))}
        if found:
            raise InvalidInputError("items hold optics the engine does not model: refining would ignore them",
                                    found="; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(found.items())),
                                    hint="--allow-unmodelled refines them anyway (recorded in the commit)")
    reports = []
    while run["iteration"] < run["of"] and (max_iterations is None or len(reports) < max_iterations):
        tip = repo.refs.read(ref_name)
        if tip is None:
            raise NotFoundError("nothing to refine: the branch has no commits", field=ref_name)
        report = _iteration(repo, tip, options, dict(run), device, regulariser, progress, runner, ref_name)
        reports.append(report)
        run = {**run, "iteration": run["iteration"] + 1}
    return reports
