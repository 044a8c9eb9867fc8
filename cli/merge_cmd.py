"""``cryopool merge``: bring another branch's species and items into this one, resolving particle collisions."""

from __future__ import annotations

import sys

import click

from cryopool.repo.errors import ConflictError
from cryopool.repo.merge import (CONFLICT_CHOICES, POLICIES, clear_state, load_state, merge as run_merge,
                                 resolve as run_resolve)

from .common import Context, emit_json, handle_errors, json_option, short

__all__ = ["COMMANDS"]


@click.command()
@click.argument("rev")
@click.option("--policy", type=click.Choice(POLICIES), default="fail", show_default=True,
              help="Collisions: fail (report, change nothing), ours, theirs, score (keep the higher), keep-both.")
@click.option("--factor", default=0.8, show_default=True,
              help="Collision when centres are closer than FACTOR × (sum of the two radii).")
@click.option("--conflicts", type=click.Choice(CONFLICT_CHOICES), default="fail", show_default=True,
              help="Items, species fields, particles or metadata keys changed on both sides: fail, keep ours or "
                   "theirs, or re-refine (keep ours, mark for 'cryopool refine').")
@click.option("-m", "--message", help="Commit message.")
@json_option
@click.pass_obj
@handle_errors
def merge(obj: Context, rev: str, policy: str, factor: float, conflicts: str, message: str | None,
          as_json: bool) -> None:
    """Three-way merge of REV into the checked-out branch (a merge commit with two parents)."""
    repo = obj.repo()
    _finish(lambda: run_merge(repo, rev, policy=policy, factor=factor, message=message, conflicts=conflicts), rev,
            policy, as_json)


def _finish(action, rev: str, policy: str, as_json: bool, settled: int = 0) -> None:
    """Run a merge (or its continuation) and report; ``settled``: collisions the user just decided."""
    try:
        report = action()
    except ConflictError as exc:
        collisions = getattr(exc, "collisions", [])
        if as_json:
            emit_json({"merged": False, "error": exc.message, "collisions": [c.as_dict() for c in collisions]})
        else:
            head = (f"Settled {settled}; {len(collisions)} particle collision(s) still open:" if settled else
                    f"Merge of {rev} stopped: {len(collisions)} particle collision(s):")
            click.secho(f"error: {exc.message}" if not collisions else head, fg="red" if not settled else "yellow",
                        err=True)
            for c in collisions:
                click.echo(f"  {c}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            if collisions:
                click.echo("The unfinished merge is kept: 'cryopool resolve' continues it, "
                           "'cryopool resolve --abort' drops it.", err=True)
        sys.exit(1)
    if as_json:
        emit_json({"merged": True, "commit": report.commit, "fast_forward": report.fast_forward,
                   "base": report.base, "collisions": [c.as_dict() for c in report.collisions],
                   "needs_refinement": report.needs_refinement})
        return
    if report.commit is None:
        click.echo(f"Already up to date: {rev} is contained in this branch.")
    elif report.fast_forward:
        click.echo(f"Fast-forward to {short(report.commit)} ({rev}).")
    else:
        click.echo(f"[{short(report.commit)}] merged {rev}: {len(report.collisions)} collision(s), policy {policy}")
        for c in report.collisions:
            click.echo(f"  {c}; dropped: {({'a': c.species_a, 'b': c.species_b}.get(c.dropped, 'none'))}")
        marks = report.needs_refinement
        if marks:
            click.echo(f"Marked for re-refinement: {', '.join(marks)} (run 'cryopool refine')")


def _particle(text: str) -> tuple[str, int]:
    name, _, pid = text.rpartition(":")
    if not name or not pid.isdigit():
        raise click.BadParameter(f"{text!r}: expected SPECIES:PARTICLE_ID", param_hint="--drop")
    return name, int(pid)


@click.command()
@click.option("--drop", "drops", multiple=True, metavar="SPECIES:ID",
              help="Settle a collision by dropping this particle (repeatable).")
@click.option("--policy", type=click.Choice(POLICIES), default="fail", show_default=True,
              help="Settle every collision still open.")
@click.option("--abort", is_flag=True, help="Forget the unfinished merge; the branch is unchanged.")
@click.option("-m", "--message", help="Commit message.")
@json_option
@click.pass_obj
@handle_errors
def resolve(obj: Context, drops: tuple[str, ...], policy: str, abort: bool, message: str | None,
            as_json: bool) -> None:
    """Continue the unfinished merge: settle collisions one by one (--drop) or by --policy, then commit."""
    repo = obj.repo()
    state = load_state(repo)
    if state is None:
        raise click.UsageError("no unfinished merge")
    if abort:
        clear_state(repo)
        emit_json({"aborted": True}) if as_json else click.echo("Unfinished merge dropped; nothing changed.")
        return
    decided = {_particle(d) for d in drops}
    _finish(lambda: run_resolve(repo, policy=policy, drop=decided, message=message), state["theirs_rev"], policy,
            as_json, settled=len(decided))


COMMANDS = [merge, resolve]
