"""``rm``, ``revert``, ``reset`` and ``reflog``: correcting a population without losing anything.

``rm`` commits a population without an item or species (its versions stay in history); ``revert``
commits the undoing of one earlier commit; ``reset``
moves a branch to another commit (the old tip stays in the reflog until ``gc``); ``reflog`` shows
where each branch has been, so any of it can be reached again.
"""

from __future__ import annotations

import time

import click

from cryopool.repo.errors import InvalidInputError
from cryopool.repo.population import without_item, without_species
from cryopool.repo.records import Operation
from cryopool.repo.repository import software_version
from cryopool.repo.revert import revert as run_revert

from .common import Context, emit_json, handle_errors, json_option, short

__all__ = ["COMMANDS"]


@click.command()
@click.argument("what", type=click.Choice(["species", "item"]))
@click.argument("name")
@click.option("-m", "--message", help="Commit message.")
@click.option("-b", "--branch", help="Commit to this branch [default: the checked-out one].")
@json_option
@click.pass_obj
@handle_errors
def rm(obj: Context, what: str, name: str, message: str | None, branch: str | None, as_json: bool) -> None:
    """Remove species NAME or item SOURCE/ITEM from the population, in a new commit (history keeps it)."""
    repo = obj.repo()

    def update(population):
        if population is None:
            raise InvalidInputError("the branch has no commits yet")
        return without_species(population, name) if what == "species" else without_item(repo, population, name)
    commit = repo.commit(update, message=message or f"Remove {what} {name}", branch=branch,
                         operation=Operation(kind="edit", software=software_version(),
                                             parameters={"removed": {what: name}}))
    if as_json:
        emit_json({"commit": commit, "removed": {what: name}})
    else:
        click.echo(f"[{short(commit)}] removed {what} {name} (earlier commits still hold it; 'cryopool reset' or "
                   "'cryopool show REV:...' reach it)")


@click.command()
@click.argument("rev")
@click.option("-m", "--message", help="Commit message.")
@click.option("-b", "--branch", help="Commit to this branch [default: the checked-out one].")
@json_option
@click.pass_obj
@handle_errors
def revert(obj: Context, rev: str, message: str | None, branch: str | None, as_json: bool) -> None:
    """Undo what commit REV changed, in a new commit on top of everything since (history keeps both)."""
    repo = obj.repo()
    commit = run_revert(repo, rev, branch=branch, message=message)
    if as_json:
        emit_json({"commit": commit, "reverted": repo.resolve(rev)})
    else:
        click.echo(f"[{short(commit)}] {repo.get_commit(commit).message}")


@click.command()
@click.argument("rev")
@click.option("-b", "--branch", help="Move this branch [default: the checked-out one].")
@json_option
@click.pass_obj
@handle_errors
def reset(obj: Context, rev: str, branch: str | None, as_json: bool) -> None:
    """Move the branch to REV; the commits it leaves stay reachable through 'cryopool reflog' until gc."""
    repo = obj.repo()
    old, new = repo.reset(rev, branch=branch)
    if as_json:
        emit_json({"from": old, "to": new})
    else:
        click.echo(f"{repo.branch_ref(branch).removeprefix('refs/heads/')} is now at {short(new)} "
                   f"(was {short(old)}; 'cryopool reset {short(old)}' goes back)")


@click.command()
@click.argument("ref", default="HEAD")
@click.option("-n", "--max-count", type=int, help="Show at most N entries.")
@json_option
@click.pass_obj
@handle_errors
def reflog(obj: Context, ref: str, max_count: int | None, as_json: bool) -> None:
    """Where REF (default: the checked-out branch) has pointed, newest first."""
    repo = obj.repo()
    name = repo.branch_ref(None) if ref == "HEAD" else (ref if ref.startswith("refs/") else f"refs/heads/{ref}")
    entries = list(reversed(repo.refs.reflog(name)))[:max_count]
    if as_json:
        emit_json({"ref": name, "entries": [{"old": e.old, "new": e.new, "time": e.time, "author": e.author,
                                              "message": e.message} for e in entries]})
        return
    label = name.removeprefix("refs/heads/")
    for i, e in enumerate(entries):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.time))
        click.echo(f"{short(e.new)} {label}@{{{i}}}: {e.message} ({e.author}, {when} UTC)")


COMMANDS = [rm, revert, reset, reflog]
