"""``cryopool refine``: multi-particle refinement of the population on the current branch."""

from __future__ import annotations

import contextlib
import sys
import time

import click

from cryopool.engine.refine import RefineOptions, refine_population, resume_point
from cryopool.engine.refine_item import GROUPS
from cryopool.engine.regularisers import REGULARISERS

from .common import Context, emit_json, handle_errors, json_option, progress_bar, short, table

__all__ = ["COMMANDS"]

DEFAULTS = RefineOptions()  # the one place the defaults live: every option below is derived from it


def _grid(text: str, n: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != n or any(v < 1 for v in values):
        raise click.BadParameter(f"{text!r}: expected {n} positive integers joined by 'x'")
    return values


@click.command()
@click.option("-n", "--iterations", default=DEFAULTS.iterations, show_default=True,
              help="Refinement iterations (one commit each).")
@click.option("--groups", default=",".join(DEFAULTS.groups), show_default=True,
              help=f"Parameter groups to refine, comma-separated, from: {', '.join(GROUPS)}.")
@click.option("--image-warp", "image_warp", default="x".join(map(str, DEFAULTS.image_warp_grid)), show_default=True,
              metavar="YxX", help="Image-warp control points per tilt (M: 3–8 per axis, more with more particles).")
@click.option("--volume-warp", "volume_warp", default="x".join(map(str, DEFAULTS.volume_warp_grid)),
              show_default=True, metavar="TxZxYxX", help="Volume-warp control points (time × z × y × x).")
@click.option("--start-resolution", type=float, help="Working resolution of the first iteration, Å "
                                                     "[default: from the species' FSC].")
@click.option("--lbfgs-iterations", default=DEFAULTS.lbfgs_iterations, show_default=True,
              help="L-BFGS iterations per round.")
@click.option("--rounds", default=DEFAULTS.rounds, show_default=True,
              help="Rounds per item and half-set: each extracts the particles' images afresh, then runs L-BFGS.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=DEFAULTS.device, show_default=True)
@click.option("--memory-budget", "memory_gb", default=DEFAULTS.memory_budget_gb, show_default=True,
              help="GiB for particle batches; half of it bounds the reconstruction accumulators.")
@click.option("--warp-regularisation", default=DEFAULTS.warp_regularisation, show_default=True,
              help="L2 weight per Å² of warp grids.")
@click.option("--tilt-angle-prior", default=DEFAULTS.tilt_angle_prior_deg, show_default=True, type=click.FloatRange(0),
              help="σ (°) of a Gaussian prior on each iteration's move of every tilt's stage angles (0: none): "
                   "what the data barely constrain stays put.")
@click.option("--shift-prior", default=DEFAULTS.shift_prior_angstrom, show_default=True, type=click.FloatRange(0),
              help="σ (Å) of a Gaussian prior on each iteration's move of every tilt's shift (0: none).")
@click.option("--temporal-samples", type=click.IntRange(1, 3), default=DEFAULTS.temporal_samples, show_default=True,
              help="Control points of each particle's pose trajectory over the exposure (M: 1–3).")
@click.option("--allow-unmodelled", is_flag=True,
              help="Refine items whose records hold optics the engine does not model (phase shift, magnification "
                   "anisotropy, beam tilt, CTF/movie grids): they are ignored, and the commit records that.")
@click.option("--accept-all", is_flag=True,
              help="Keep every item's refined geometry and poses, even where the gain is no larger than fitting "
                   "that many parameters to noise would give (default: such items are left as they were, and the "
                   "commit says why).")
@click.option("--regulariser", type=click.Choice(REGULARISERS), default=DEFAULTS.regulariser, show_default=True,
              help="How each half-map becomes the next iteration's reference: fsc (FSC-weighted Wiener filter), nu "
                   "(non-uniform: a local filter cross-validated inside each half), denoiser (M's noise2noise U-net, "
                   "its weights stored with the species), prior (the shipped Blush-style prior), prior+denoiser "
                   "(the prior fine-tuned on the species' half-maps). docs/physics.md says how each works.")
@click.option("--denoiser-steps", type=click.IntRange(0), default=DEFAULTS.denoiser_steps, show_default=True,
              help="Noise2noise training steps per species per iteration (denoiser, prior+denoiser; M: 800 on GPU).")
@click.option("--scheduler", metavar="ADDRESS",
              help="Refine the items on the Dask cluster whose scheduler is at ADDRESS (e.g. tcp://host:8786); "
                   "only this process commits (docs/distributed.md).")
@click.option("--workers", type=click.IntRange(1), metavar="N",
              help="Refine the items on a local Dask cluster of N worker processes.")
@click.option("--worker-repository", metavar="PATH|URL",
              help="Where Dask workers read the repository from: a path they all share, or a URL (cryopool serve, "
                   "s3://...) [default: this repository's path].")
@click.option("--resume", is_flag=True, help="Continue the interrupted run at the branch tip.")
@click.option("-b", "--branch", help="Refine this branch [default: the checked-out one].")
@json_option
@click.pass_obj
@handle_errors
def refine(obj: Context, iterations, groups, image_warp, volume_warp, start_resolution, lbfgs_iterations, rounds,
           device, memory_gb, warp_regularisation, tilt_angle_prior, shift_prior, temporal_samples, allow_unmodelled,
           accept_all, regulariser,
           denoiser_steps, scheduler, workers, worker_repository, resume, branch, as_json) -> None:
    """Refine all species jointly in every tilt series and commit each iteration.

    For each item, all particles of all species form one system: per-tilt
    stage angles and shifts, warp grids, particle poses (or pose trajectories
    over the exposure, --temporal-samples) and per-tilt defocus are refined by L-BFGS on exact gradients of the normalised
    cross-correlation with each particle's own half-map (half-sets never
    mix); the half-maps are then reconstructed from the original tilt images
    and their FSC recorded. Each iteration is a commit; --resume continues an
    interrupted run.
    """
    repo = obj.repo()
    chosen = tuple(g.strip() for g in groups.split(",") if g.strip())
    bad = sorted(set(chosen) - set(GROUPS))
    if bad:
        raise click.BadParameter(f"unknown group(s) {bad}; choose from {list(GROUPS)}", param_hint="--groups")
    options = RefineOptions(iterations=iterations, groups=chosen, image_warp_grid=_grid(image_warp, 2),
                            volume_warp_grid=_grid(volume_warp, 4), start_resolution_angstrom=start_resolution,
                            lbfgs_iterations=lbfgs_iterations, rounds=rounds, device=device, memory_budget_gb=memory_gb,
                            warp_regularisation=warp_regularisation, tilt_angle_prior_deg=tilt_angle_prior,
                            shift_prior_angstrom=shift_prior, temporal_samples=temporal_samples,
                            allow_unmodelled=allow_unmodelled, require_significance=not accept_all,
                            regulariser=regulariser, denoiser_steps=denoiser_steps)
    if resume and resume_point(repo, branch) is None:
        raise click.UsageError("nothing to resume: the branch tip is not an unfinished refine run")
    started = time.perf_counter()
    state = {"iteration": 0, "since": started, "bar": None}

    def progress(message: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 0:
            state["since"] = now
        if as_json:
            return
        if sys.stderr.isatty():  # a redrawn line with rate and ETA per iteration; plain lines elsewhere (logs)
            if state["bar"] is None:
                state["bar"] = progress_bar(total, f"iteration {state['iteration'] + 1}")
            state["bar"].show(done, total, message)
            if done >= total:
                state["bar"].close()
                state["bar"] = None
            return
        eta = ""
        if 0 < done < total:  # items take similar times: the rest at this iteration's pace so far
            left = (now - state["since"]) / done * (total - done)
            eta = f", ~{left:.0f} s left in this iteration"
        click.echo(f"  [{now - started:6.0f} s] iteration {state['iteration'] + 1}: "
                   f"{message} ({done}/{total} done{eta})", err=True)

    if scheduler and workers:
        raise click.UsageError("--scheduler and --workers exclude each other: a cluster of your own, or a local one")
    if worker_repository and not (scheduler or workers):
        raise click.UsageError("--worker-repository needs --scheduler or --workers")
    with contextlib.ExitStack() as stack:
        runner = None
        if scheduler or workers:
            try:
                from cryopool.engine.distributed import DaskRunner, dask_client  # Dask only for runs that use it
            except ImportError as exc:
                raise click.UsageError(f"--scheduler and --workers need Dask ({exc}): "
                                       "pip install 'cryopool[distributed]'") from None
            runner = DaskRunner(stack.enter_context(dask_client(scheduler, workers)), worker_repository,
                                device=device)
        reports = _report(repo, options, branch, resume, progress, state, runner, as_json)
    if as_json:
        emit_json({"iterations": [{"commit": r.commit, "iteration": r.iteration,
                                   "resolution_before": r.resolution_before,
                                   "resolution_after": r.resolution_after, "particles": r.particles,
                                   "decisions": r.decisions}
                                  for r in reports]})
        return
    if reports:
        first, last = reports[0], reports[-1]
        rows = [[n, last.particles[n], f"{first.resolution_before[n]:.2f} Å", f"{last.resolution_after[n]:.2f} Å"]
                for n in last.resolution_after]
        click.echo(table(rows, ["species", "particles", "resolution before", "after (FSC 0.143)"]))
        click.echo(f"{len(reports)} iteration(s) in {time.perf_counter() - started:.0f} s")


def _report(repo, options, branch, resume, progress, state, runner, as_json) -> list:
    """Each iteration's line as soon as its commit exists."""
    reports = []
    for report in _iterate(repo, options, branch, resume, progress, state, runner):
        reports.append(report)
        if not as_json:
            click.echo(f"[{short(report.commit)}] iteration {report.iteration}: " + ", ".join(
                f"{n} {report.resolution_before[n]:.1f} → {report.resolution_after[n]:.1f} Å"
                for n in report.resolution_after))
            for half, d in sorted(report.decisions.items()):
                if not d["accepted"]:
                    click.echo(f"  {half}: left as it was ({d['reason']})", err=True)
    return reports


def _iterate(repo, options, branch, resume, progress, state, runner):
    """One iteration at a time, so each commit is reported as soon as it exists."""
    first = True
    while True:
        if not first or resume:
            run = resume_point(repo, branch)
            if run is None:
                return
            state["iteration"] = run["iteration"]
            reports = refine_population(repo, options, branch=branch, resume=True, progress=progress,
                                        max_iterations=1, runner=runner)
        else:
            reports = refine_population(repo, options, branch=branch, progress=progress, max_iterations=1,
                                        runner=runner)
        first = False
        yield from reports
        state["iteration"] += 1
        if not reports:
            return


COMMANDS = [refine]
