"""Multi-particle refinement of one item (tilt series) for one half-set: the per-item driver.

All particles of all species in the item form one system (``refine_params``). Geometry and poses
are refined with L-BFGS on M's alignment target (``alignment``), in rounds: each round extracts
and premultiplies the data once, at the positions the round starts from. Trajectories start as
static poses; per-tilt defocus and astigmatism are fitted after the geometry and poses, with a
target of their own (``ctf_fit``: M's exhaustive search, then L-BFGS): premultiplication moves the
defocus-dependent half of the signal (CTF²'s cos 2χ) twice as far out as the CTF does, beyond a
particle-sized mask, so the alignment target, good for alignment, pins the defocus weakly and with
a bias (measured on noise-free images with the true maps and geometry: 60–1400 Å off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .alignment import AlignmentTarget, log_likelihood_gain
from .ctf import electron_wavelength_angstrom
from .ctf_fit import fit_ctf
from .refine_ctf import ctf_batches
from .refine_params import GROUPS, ItemParameters, SpeciesInput
from .tilt_model import Imaging, TiltGeometry

__all__ = ["GROUPS", "RefineSettings", "SpeciesInput", "ItemState", "refine_item_half", "ctf_zeros_in_band",
           "MIN_CTF_ZEROS_FOR_DEFOCUS"]


@dataclass
class RefineSettings:
    groups: tuple[str, ...] = ("tilt_angles", "shifts", "image_warp", "poses", "defocus")
    image_warp_grid: tuple[int, int] = (3, 3)  # (y, x) control points, one grid per tilt
    volume_warp_grid: tuple[int, int, int, int] = (2, 2, 2, 2)  # (time, z, y, x)
    lbfgs_iterations: int = 40
    rounds: int = 2
    defocus_search_angstrom: float = 3000.0  # ±300 nm
    defocus_step_angstrom: float = 100.0  # 10 nm
    defocus_halvings: int = 4
    resolution_angstrom: float = 20.0  # working resolution: the band's upper edge where a species has none
    low_resolution_angstrom: float | None = None  # band's lower edge (default: the particle diameter)
    memory_budget_bytes: int = 2 * 1024**3
    warp_regularisation: float = 1e-4  # per Å² of warp, relative to the NCC
    # Gaussian priors on each refinement's move of the per-tilt stage angles (°, each axis) and shifts (Å, each
    # axis): a direction the data barely constrain (a tilt's y angle, nearly a shift for particles near the
    # specimen's mid-plane) stays where it was instead of drifting with the noise (None or 0: no prior)
    tilt_angle_prior_deg: float | None = 0.2
    shift_prior_angstrom: float | None = 20.0
    exposure_crop_weight: float | None = 0.25  # a tilt's band ends where its exposure weight falls below this
    require_significance: bool = True  # keep a refinement only where the data support it (``refine_item_half``)


@dataclass
class ItemState:
    """The outcome: refined models and poses (same species order as the input)."""

    geometry: TiltGeometry
    imaging: Imaging
    positions: list[torch.Tensor]
    orientations: list[torch.Tensor]
    history: list[float] = field(default_factory=list)  # NCC after each stage
    decision: dict = field(default_factory=dict)  # whether the geometry and poses were kept, and why


def ctf_zeros_in_band(imaging: Imaging, resolution_angstrom: float) -> int:
    """How many CTF zeros (at the mean defocus, Cs neglected) lie below the working resolution."""
    from_defocus = float(imaging.defocus_u_angstrom.mean() + imaging.defocus_v_angstrom.mean()) / 2
    lam = electron_wavelength_angstrom(imaging.voltage_kv)
    return int(lam * max(from_defocus, 0.0) / resolution_angstrom**2)


# Measured with the true maps and geometry (ctf_fit's target; 5 Å/px, 5 µm, 16 particles of two species
# per tilt, per-tilt RMS error from 253 Å): 3.8 zeros in the band → 56 Å, 2.5 → 86 Å (seed 1: 282 → 66, 106 Å),
# 1.6 → 152 Å; at 10 Å/px, whose noise per unit of band is 4× higher: 2.5 zeros → 215 Å, 1.6 → 298 Å (worse).
MIN_CTF_ZEROS_FOR_DEFOCUS = 3

# L-BFGS iterations after the CTF search (whose last step is ~6 Å): the polish, and astigmatism, converge in
# fewer than the geometry needs; measured on tests/engine/test_defocus.py and test_ctf_fit.py
CTF_POLISH_ITERATIONS = 15


def _resolutions(species: list[SpeciesInput], settings: RefineSettings) -> list[float]:
    """Each species' band edge: its own working resolution (M crops each species to its own), or the settings'."""
    return [s.resolution_angstrom or settings.resolution_angstrom for s in species]


def alignment_target(params: ItemParameters, stack: torch.Tensor, pre: torch.Tensor, exposure: torch.Tensor,
                     settings: RefineSettings) -> AlignmentTarget:
    return AlignmentTarget(params, stack, pre, exposure, resolutions=_resolutions(params.species, settings),
                           low_resolution_angstrom=settings.low_resolution_angstrom,
                           defocus_search_angstrom=settings.defocus_search_angstrom,
                           exposure_crop_weight=settings.exposure_crop_weight,
                           memory_budget_bytes=settings.memory_budget_bytes,
                           warp_regularisation=settings.warp_regularisation,
                           priors={"tilt_angles": settings.tilt_angle_prior_deg,
                                   "shifts": settings.shift_prior_angstrom})


def item_parameters(geometry: TiltGeometry, imaging: Imaging, species: list[SpeciesInput], settings: RefineSettings,
                    *, static_poses: bool = False) -> ItemParameters:
    return ItemParameters(geometry, imaging, species, groups=settings.groups, image_warp_grid=settings.image_warp_grid,
                          volume_warp_grid=settings.volume_warp_grid, static_poses=static_poses)


def refine_item_half(stack: torch.Tensor, geometry: TiltGeometry, imaging: Imaging, pre_exposure: torch.Tensor,
                     exposure: torch.Tensor, species: list[SpeciesInput], settings: RefineSettings, *,
                     fitted_before: bool = False) -> ItemState:
    """Refine one half-set's system in one item; returns the refined models and poses.

    ``fitted_before``: the starting geometry and poses are a kept refinement of these same data (the previous
    refine commit's, ``refine._fitted_starts``), which changes what counts as a significant move (``_decide``).

    Per-tilt defocus (and astigmatism) are refined only when the working band holds at least
    ``MIN_CTF_ZEROS_FOR_DEFOCUS`` CTF zeros: below that the data constrain them weakly (a 300 Å
    error moves the CTF phase at the band edge by ~0.06 rad at 3 zeros and 18 Å) and the fit may
    follow the noise. They are held while the geometry and poses are refined (the alignment target
    barely depends on them), then fitted at the refined geometry with ``ctf_fit``'s target: a fit at
    the starting geometry, with particles ~14 Å off, put some tilts 900–2900 Å off in the first
    iteration the gate opened.
    """
    finest = min(_resolutions(species, settings))  # the band that carries the CTF's oscillations
    ctf_groups = [g for g in ("defocus", "astigmatism") if g in settings.groups
                  and ctf_zeros_in_band(imaging, finest) >= MIN_CTF_ZEROS_FOR_DEFOCUS]
    settings = replace(settings, groups=tuple(g for g in settings.groups if g not in ("defocus", "astigmatism")))
    # trajectories start as static poses: fitting 3 samples per particle from a pose ~1 px off finds
    # worse local optima (measured: 7.2 vs 5.4 Å per-tilt error on particles drifting ~20 Å)
    trajectories = "poses" in settings.groups and any(s.positions.shape[1] > 1 for s in species)
    params = item_parameters(geometry, imaging, species, settings, static_poses=trajectories)
    target = alignment_target(params, stack, pre_exposure, exposure, settings)
    history = [target.value()]
    trainable: list[torch.Tensor] = []
    for stage in (["static"] if trajectories else []) + ["full"] * settings.rounds:
        trainable = params.trainable(settings.groups)
        if not trainable:
            break
        _balance_species(params, target)
        opt = torch.optim.LBFGS(trainable, max_iter=settings.lbfgs_iterations, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-12, history_size=20)

        def closure():
            opt.zero_grad()
            return target.loss_and_backward()

        opt.step(closure)
        if stage == "static":
            params.release()
        history.append(target.value())  # and the next round's extraction
    decision = _decide(sum(p.numel() for p in trainable), target, history, settings, fitted_before)
    if not decision["accepted"]:
        params = item_parameters(geometry, imaging, species, settings)
        target = alignment_target(params, stack, pre_exposure, exposure, settings)
    if ctf_groups:
        defocus, astigmatism = fit_ctf(
            ctf_batches(params, stack, pre_exposure, exposure, resolutions=_resolutions(species, settings),
                        low_resolution_angstrom=settings.low_resolution_angstrom,
                        defocus_search_angstrom=settings.defocus_search_angstrom,
                        exposure_crop_weight=settings.exposure_crop_weight,
                        memory_budget_bytes=settings.memory_budget_bytes),
            params.imaging(), geometry.pixel_size_angstrom,
            search_angstrom=settings.defocus_search_angstrom if "defocus" in ctf_groups else 0.0,
            step_angstrom=settings.defocus_step_angstrom, halvings=settings.defocus_halvings,
            astigmatism="astigmatism" in ctf_groups,
            lbfgs_iterations=min(settings.lbfgs_iterations, CTF_POLISH_ITERATIONS))
        with torch.no_grad():
            params.p["defocus"] += defocus
            params.p["astigmatism"] += astigmatism
        history.append(target.value())
    geom, im, positions, orientations = params.detached()
    return ItemState(geom, im, positions, orientations, history, decision)


# the probe of the position curvature: small against a particle's position error, large against rounding
POSITION_PROBE_ANGSTROM = 0.5


def _balance_species(params: ItemParameters, target: AlignmentTarget) -> None:
    """Precondition the positions of a multi-species system so that L-BFGS moves every species alike.

    A particle's share of the target, and so the curvature in its position, grows with its signal: a small or
    weak species' positions are many times softer than an abundant large one's, and L-BFGS, whose steps follow
    the stiffest directions, barely moves them in a round's iterations. With the geometry held, particles are
    independent, so one probe of all position coordinates at once (a finite difference of the gradient) gives
    each species' mean curvature; each species is then optimised in units that make its curvature the
    stiffest species'. Two extra evaluations per round; a single species is left as it is. Orientations are
    not balanced: measured, it made the weak species' orientations worse (docs/physics.md §8)."""
    names = [n for n, p in params.p.items() if n.startswith("pos") and p.requires_grad]
    if len(names) < 2:
        return
    params.set_scales({n: 1.0 for n in names})

    def gradients() -> dict[str, torch.Tensor]:
        for p in params.p.values():
            p.grad = None
        target.loss_and_backward()
        return {n: params.p[n].grad.detach().clone() for n in names}

    def move_all(step: float) -> None:
        with torch.no_grad():
            for n in names:
                params.p[n] += step

    before = gradients()
    move_all(POSITION_PROBE_ANGSTROM)
    after = gradients()
    move_all(-POSITION_PROBE_ANGSTROM)
    for p in params.p.values():
        p.grad = None
    curvature = {n: float((after[n] - before[n]).mean()) / POSITION_PROBE_ANGSTROM for n in names}
    stiffest = max(curvature.values())
    scales = {}
    for n in names:
        # a soft or non-convex species gets at most 10× (its curvature taken as ≥ 1 % of the stiffest); in
        # quarter octaves, so that the order of a float sum (threads, Dask workers) cannot change the path
        scale = math.sqrt(stiffest / max(curvature[n], stiffest / 100)) if stiffest > 0 else 1.0
        scales[n] = 2.0 ** (round(4 * math.log2(scale)) / 4)
    params.set_scales(scales)


def _decide(fitted: int, target: AlignmentTarget, history: list[float], settings: RefineSettings,
            fitted_before: bool) -> dict:
    """Keep the refined geometry and poses only if the data support the move: Akaike's criterion, a log-likelihood
    gain larger than the number of parameters fitted (fitting P parameters to pure noise gains P / 2 on average,
    and more than P with a probability that falls fast with P). Without it, a species too small or too noisy to
    constrain anything walks its own geometry into the noise (issue 21 §5: 3-D positions 9 → 14 Å, tilt angles
    0.24° → 3.3°, maps decorrelated).

    A start that is itself a kept fit of the same parameters to the same data (``fitted_before``) has already
    paid that price: the two fits have equally many free parameters and the criterion becomes "no worse than
    before" (gain > 0). Charging P again in every iteration froze converging systems whose later gains are
    real but smaller than P (measured: a two-species system rejected its last two of five iterations, the rare
    species' orientations stayed 2.0° off instead of reaching 1.7°)."""
    samples = target.effective_samples()
    prior = float(target.prior_cost())  # the moves' cost under their priors: the gain is the posterior's
    gain = (log_likelihood_gain(history[0], history[-1], samples) if len(history) > 1 else 0.0) - prior
    penalty = 0 if fitted_before else fitted
    accepted = not settings.require_significance or fitted == 0 or gain > penalty
    if accepted:
        reason = ""
    elif fitted_before:
        reason = f"log-likelihood gain {gain:.1f} <= 0: the refinement fitted the data worse; kept as it was"
    else:
        reason = (f"log-likelihood gain {gain:.1f} <= {fitted} parameters (AIC): the data do not support the move; "
                  "kept as it was")
    return {"accepted": accepted, "log_likelihood_gain": round(gain, 1), "prior_cost": round(prior, 1),
            "parameters": fitted, "penalty": penalty,
            "samples": round(samples), "fitted": fitted_before or (accepted and fitted > 0), "reason": reason}
