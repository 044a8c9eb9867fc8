"""``branch``, ``checkout`` and ``tag``: naming commits."""

from __future__ import annotations

import click

from .common import Context, emit_json, handle_errors, json_option, short

__all__ = ["COMMANDS"]


@click.command()
@click.argument("name", required=False)
@click.argument("start", default="HEAD")
@click.option("-d", "--delete", is_flag=True, help="Delete branch NAME.")
@click.option("-f", "--force", is_flag=True, help="Move NAME to START even if it exists.")
@json_option
@click.pass_obj
@handle_errors
def branch(obj: Context, name: str | None, start: str, delete: bool, force: bool, as_json: bool) -> None:
    """List branches, create NAME at START, or delete NAME."""
    repo = obj.repo()
    if name is None:
        head = repo.head()
        branches = {k.removeprefix("refs/heads/"): v for k, v in repo.refs.list("refs/heads/").items()}
        if as_json:
            emit_json({"current": head.branch, "branches": branches})
            return
        for b, cid in branches.items():
            mark = "*" if b == head.branch else " "
            click.echo(f"{mark} {b:<24} {short(cid)} {repo.get_commit(cid).message.splitlines()[0]}")
        return
    if delete:
        repo.delete_ref(f"refs/heads/{name}")
        result = {"deleted": name}
        text = f"Deleted branch {name}"
    else:
        cid = repo.create_branch(name, start, force=force)
        result = {"branch": name, "commit": cid}
        text = f"Branch {name} at {short(cid)}"
    emit_json(result) if as_json else click.echo(text)


@click.command()
@click.argument("rev")
@click.option("-b", "create", is_flag=True, help="Create branch REV at HEAD first.")
@json_option
@click.pass_obj
@handle_errors
def checkout(obj: Context, rev: str, create: bool, as_json: bool) -> None:
    """Point HEAD at branch REV (later commits go there), or detach it at a commit."""
    repo = obj.repo()
    head = repo.checkout(rev, create=create)
    if as_json:
        emit_json({"branch": head.branch, "commit": head.commit})
    elif head.branch:
        click.echo(f"Switched to {'a new ' if create else ''}branch '{head.branch}' at {short(head.commit)}")
    else:
        click.echo(f"HEAD is now detached at {short(head.commit)}")


@click.command()
@click.argument("name", required=False)
@click.argument("rev", default="HEAD")
@click.option("-d", "--delete", is_flag=True, help="Delete tag NAME.")
@json_option
@click.pass_obj
@handle_errors
def tag(obj: Context, name: str | None, rev: str, delete: bool, as_json: bool) -> None:
    """List tags, tag REV as NAME (tags never move), or delete NAME."""
    repo = obj.repo()
    if name is None:
        tags = {k.removeprefix("refs/tags/"): v for k, v in repo.refs.list("refs/tags/").items()}
        if as_json:
            emit_json({"tags": tags})
        else:
            for t, cid in tags.items():
                click.echo(f"{t:<24} {short(cid)}")
        return
    if delete:
        repo.delete_ref(f"refs/tags/{name}")
        emit_json({"deleted": name}) if as_json else click.echo(f"Deleted tag {name}")
        return
    cid = repo.create_tag(name, rev)
    emit_json({"tag": name, "commit": cid}) if as_json else click.echo(f"Tagged {short(cid)} as {name}")


COMMANDS = [branch, checkout, tag]
