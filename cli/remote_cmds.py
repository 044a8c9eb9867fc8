"""``remote``, ``clone``, ``fetch``, ``push``, ``pull``: sharing a population between labs."""

from __future__ import annotations

import click

from cryopool.repo.merge import CONFLICT_CHOICES, POLICIES, merge as run_merge
from cryopool.repo.errors import InvalidInputError
from cryopool.repo.remote import (add_remote, clone as run_clone, fetch as run_fetch, fetch_deferred, push as run_push,
                                  remove_remote)

from .common import Context, emit_json, handle_errors, human_bytes, json_option, progress_bar, short

__all__ = ["COMMANDS"]


def _options(pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` storage options for fsspec (e.g. ``endpoint_url=http://…`` for S3-compatible storage)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError("a storage option is KEY=VALUE", field="--option", found=pair)
        out[key] = value
    return out


option_option = click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
                             help="fsspec storage option for s3://… and other URLs (repeatable), "
                                  "e.g. endpoint_url=http://minio:9000; credentials come from the environment.")


@click.group()
def remote() -> None:
    """Name other repositories: shared-filesystem paths, `cryopool serve` URLs, S3 (fsspec) URLs."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--token", help="Bearer token for a server (or set CRYOPOOL_TOKEN); stored in .cryopool/config.")
@option_option
@click.pass_obj
@handle_errors
def remote_add(obj: Context, name: str, url: str, token: str | None, options: tuple[str, ...]) -> None:
    """Name a repository: a path on a shared filesystem, a `cryopool serve` URL, or s3://bucket/prefix."""
    add_remote(obj.repo(), name, url, token, _options(options))
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
@option_option
@click.option("--partial", is_flag=True,
              help="Leave raw tilt-series data on the remote; it is fetched the first time it is read.")
@json_option
@handle_errors
def clone(url: str, directory: str, token: str | None, options: tuple[str, ...], partial: bool,
          as_json: bool) -> None:
    """Copy the repository at URL (path, server or s3://…) into DIRECTORY (remote 'origin'), checking out its HEAD."""
    with progress_bar(None, "receiving", enabled=not as_json) as bar:
        repo = run_clone(url, directory, progress=bar.tick, token=token, options=_options(options), partial=partial)
    head = repo.head()
    if as_json:
        emit_json({"repository": str(repo.root), "branch": head.branch, "commit": head.commit, "partial": partial})
    else:
        click.echo(f"Cloned {url} into {repo.work_dir} (branch {head.branch} at {short(head.commit)})"
                   + ("; raw tilt-series data stays on the remote until first read" if partial else ""))


@click.command()
@click.argument("name", default="origin")
@click.option("--deferred", is_flag=True,
              help="Also fetch all raw data this partial clone left on its remote (the one it was cloned from).")
@json_option
@click.pass_obj
@handle_errors
def fetch(obj: Context, name: str, deferred: bool, as_json: bool) -> None:
    """Bring NAME's branches into refs/remotes/NAME/* (only missing objects travel, each re-hashed)."""
    repo = obj.repo()
    with progress_bar(None, "receiving", enabled=not as_json) as bar:
        stats, refs = run_fetch(repo, name, progress=bar.tick)
        if deferred:
            more = fetch_deferred(repo, progress=bar.tick)
            stats.objects, stats.bytes = stats.objects + more.objects, stats.bytes + more.bytes
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
              help="Items, species fields, particles or metadata keys changed on both sides: fail, keep ours or "
                   "theirs, or re-refine (keep ours, mark for 'cryopool refine').")
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
