"""The ``cryopool`` command: a thin click layer over ``cryopool.repo``.

Each command parses its arguments, calls one library function and renders
the result: for people by default, as versioned JSON with ``--json``.
Errors from the library are shown once, in one place (``common.handle_errors``),
with their hint; exit codes are 0 (success), 1 (operational error or failed
verify), 2 (usage).
"""

from __future__ import annotations

import click

from cryopool.repo import Repository
from cryopool.repo.version import __version__

from . import demo, export_cmd, history, importing, maintenance, merge_cmd, refine_cmd, refs_cmds, remote_cmds, serve_cmd, simulate_cmd
from .common import Context, emit_json, handle_errors, json_option

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-C", "--repo", "repo_path", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Run as if started in this directory.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="cryopool")
@click.pass_context
def cli(ctx: click.Context, repo_path: str, debug: bool) -> None:
    """cryopool: a content-addressed, git-like repository for cryo-ET populations.

    A population holds data sources (tilt series with their deformation and
    imaging models) and species (half-maps, mask, particles, metrics). Every
    change is a commit with an operation record; `verify` recomputes every
    hash from content.
    """
    ctx.obj = Context(repo_path, debug)


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("-b", "--initial-branch", default="main", show_default=True)
@click.option("--compression-level", default=3, show_default=True, type=click.IntRange(-5, 22),
              help="zstd level for objects on disk (ids never depend on it).")
@json_option
@handle_errors
def init(directory: str, initial_branch: str, compression_level: int, as_json: bool) -> None:
    """Create an empty repository in DIRECTORY."""
    repo = Repository.init(directory, initial_branch=initial_branch, compression_level=compression_level)
    if as_json:
        emit_json({"repository": str(repo.root), "branch": initial_branch})
    else:
        click.echo(f"Initialised empty cryopool repository in {repo.root} (branch '{initial_branch}')")


for _module in (importing, export_cmd, history, refs_cmds, merge_cmd, remote_cmds, serve_cmd, maintenance, simulate_cmd, refine_cmd,
                demo):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    cli(prog_name="cryopool")


if __name__ == "__main__":
    main()
