"""``remote``, ``clone``, ``fetch``, ``push``, ``pull``: sharing a population between labs."""

from __future__ import annotations

import click

from cryopool.repo.merge import CONFLICT_CHOICES, POLICIES, merge as run_merge
from cryopool.repo.remote import add_remote, clone as run_clone, fetch as run_fetch, push as run_push, remove_remote

from .common import Context, emit_json, handle_errors, human_bytes, json_option, progress_bar, short

__all__ = ["COMMANDS"]


@click.group()
def remote() -> None:
    """Name other repositories (paths on a shared filesystem)."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--token", help="Bearer token for a server (or set CRYOPOOL_TOKEN); stored in .cryopool/config.")
@click.pass_obj
@handle_errors
def remote_add(obj: Context, name: str, url: str, token: str | None) -> None:
    """Name a repository: a path on a shared filesystem or a `cryopool serve` URL."""
    add_remote(obj.repo(), name, url, token)
    click.echo(f"Added remote {name} → {url}")


@remote.command("remove")
@click.argument("name")
@click.pass_obj
@handle_errors
def remote_remove(obj: Context, name: str) -> None:
    remove_remote(obj.repo(), name)
    click.echo(f"Removed remote {name}")


@remote.command("list")
@json_option
@click.pass_obj
@handle_errors
def remote_list(obj: Context, as_json: bool) -> None:
    remotes = obj.repo().config.get("remotes", {})
    if as_json:
        emit_json({"remotes": {k: v["url"] for k, v in remotes.items()}})
    else:
        for name, cfg in sorted(remotes.items()):
            click.echo(f"{name}\t{cfg['url']}")


@click.command()
@click.argument("url")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--token", help="Bearer token for a server (or set CRYOPOOL_TOKEN).")
@json_option
@handle_errors
def clone(url: str, directory: str, token: str | None, as_json: bool) -> None:
    """Copy the repository at URL (path or server) into DIRECTORY (remote 'origin'), checking out its HEAD branch."""
    with progress_bar(None, "receiving", enabled=not as_json) as bar:
        repo = run_clone(url, directory, progress=bar.tick, token=token)
    head = repo.head()
    if as_json:
        emit_json({"repository": str(repo.root), "branch": head.branch, "commit": head.commit})
    else:
        click.echo(f"Cloned {url} into {repo.work_dir} (branch {head.branch} at {short(head.commit)})")


@click.command()
@click.argument("name", default="origin")
@json_option
@click.pass_obj
@handle_errors
def fetch(obj: Context, name: str, as_json: bool) -> None:
    """Bring NAME's branches into refs/remotes/NAME/* (only missing objects travel, each re-hashed)."""
    with progress_bar(None, "receiving", enabled=not as_json) as bar:
        stats, refs = run_fetch(obj.repo(), name, progress=bar.tick)
    if as_json:
        emit_json({"objects": stats.objects, "bytes": stats.bytes, "updated": refs})
        return
    click.echo(f"Fetched {stats.objects} object(s), {human_bytes(stats.bytes)} from {name}")
    for ref, cid in refs.items():
        click.echo(f"  {ref.removeprefix('refs/remotes/')} → {short(cid)}")


@click.command()
@click.argument("name", default="origin")
@click.argument("branch", required=False)
@click.option("--force", is_flag=True, help="Move the remote branch even if it is not a fast-forward.")
@json_option
@click.pass_obj
@handle_errors
def push(obj: Context, name: str, branch: str | None, force: bool, as_json: bool) -> None:
    """Send BRANCH (default: the checked-out one) to remote NAME; refused unless a fast-forward."""
    with progress_bar(None, "sending", enabled=not as_json) as bar:
        stats, cid = run_push(obj.repo(), name, branch, force=force, progress=bar.tick)
    if as_json:
        emit_json({"commit": cid, "objects": stats.objects, "bytes": stats.bytes})
    else:
        click.echo(f"Pushed {short(cid)} to {name}: {stats.objects} object(s), {human_bytes(stats.bytes)} sent")


@click.command()
@click.argument("name", default="origin")
@click.argument("branch", required=False)
@click.option("--policy", type=click.Choice(POLICIES), default="fail", show_default=True,
              help="Particle-collision policy for the merge.")
@click.option("--conflicts", type=click.Choice(CONFLICT_CHOICES), default="fail", show_default=True,
              help="Items, species or metadata keys changed on both sides: fail, or keep ours or theirs.")
@json_option
@click.pass_obj
@handle_errors
def pull(obj: Context, name: str, branch: str | None, policy: str, conflicts: str, as_json: bool) -> None:
    """Fetch NAME and merge NAME/BRANCH (default: the checked-out branch's name) into the checked-out branch."""
    repo = obj.repo()
    branch = branch or repo.head().branch
    stats, _ = run_fetch(repo, name)
    report = run_merge(repo, f"refs/remotes/{name}/{branch}", policy=policy, conflicts=conflicts)
    if as_json:
        emit_json({"objects": stats.objects, "commit": report.commit, "fast_forward": report.fast_forward,
                   "collisions": [c.as_dict() for c in report.collisions]})
    else:
        how = "fast-forward" if report.fast_forward else ("up to date" if report.commit is None else "merge")
        click.echo(f"Pulled {name}/{branch}: {stats.objects} object(s); {how}"
                   + (f" ({len(report.collisions)} collision(s))" if report.collisions else ""))


COMMANDS = [remote, clone, fetch, push, pull]
