"""The ``cryopool`` command: a thin click layer over ``cryopool.repo``.

Each command parses its arguments, calls one library function and renders
the result: for people by default, as versioned JSON with ``--json``.
Errors from the library are shown once, in one place (``common.handle_errors``),
with their hint; exit codes are 0 (success), 1 (operational error or failed
verify), 2 (usage).
"""

from __future__ import annotations

import importlib

import click

from cryopool.repo import Repository
from cryopool.repo.version import __version__

from .common import Context, emit_json, handle_errors, json_option

__all__ = ["cli", "main", "COMMANDS"]

# command → (module in cryopool.cli, attribute, one-line help): a command's module (and with it torch,
# pandas, scipy, matplotlib or fastapi) is imported only when that command runs
COMMANDS: dict[str, tuple[str, str, str]] = {
    "import": ("importing", "import_group", "Import data into the current branch (one commit per import)."),
    "export": ("export_cmd", "export_group", "Write the population at a commit in another program's formats."),
    "config": ("config_cmd", "config", "Show all settings, show KEY, or set KEY to VALUE (keys: user.name, user.email)."),
    "status": ("history", "status", "Where HEAD is, and what the population holds."),
    "log": ("history", "log", "History of REV (default HEAD), newest first."),
    "show": ("history", "show", "Show a commit, or REV:species/NAME, or REV:SOURCE/ITEM (or an object id with --raw)."),
    "diff": ("history", "diff", "What changed in the population from REV_A to REV_B (default HEAD)."),
    "branch": ("refs_cmds", "branch", "List branches, create NAME at START, or delete NAME."),
    "checkout": ("refs_cmds", "checkout",
        "Point HEAD at branch REV (later commits go there), or detach it at a commit."),
    "tag": ("refs_cmds", "tag", "List tags, tag REV as NAME (tags never move), or delete NAME."),
    "merge": ("merge_cmd", "merge",
        "Three-way merge of REV into the checked-out branch (a merge commit with two parents)."),
    "resolve": ("merge_cmd", "resolve",
        "Continue the unfinished merge: settle collisions one by one (--drop) or by --policy, then commit."),
    "remote": ("remote_cmds", "remote",
        "Name other repositories: shared-filesystem paths, `cryopool serve` URLs, S3 (fsspec) URLs."),
    "clone": ("remote_cmds", "clone",
        "Copy the repository at URL (path, server or s3://…) into DIRECTORY (remote 'origin'), checking out its HEAD."),
    "fetch": ("remote_cmds", "fetch",
        "Bring NAME's branches into refs/remotes/NAME/* (only missing objects travel, each re-hashed)."),
    "push": ("remote_cmds", "push",
        "Send BRANCH (default: the checked-out one) to remote NAME; refused unless a fast-forward."),
    "pull": ("remote_cmds", "pull",
        "Fetch NAME and merge NAME/BRANCH (default: the checked-out branch's name) into the checked-out branch."),
    "serve": ("serve_cmd", "serve",
        "Serve the repository as a shared population (push needs a token with the write scope), with a web view."),
    "rm": ("undo_cmds", "rm",
        "Remove species NAME or item SOURCE/ITEM from the population, in a new commit (history keeps it)."),
    "revert": ("undo_cmds", "revert",
        "Undo what commit REV changed, in a new commit on top of everything since (history keeps both)."),
    "reset": ("undo_cmds", "reset",
        "Move the branch to REV; the commits it leaves stay reachable through 'cryopool reflog' until gc."),
    "reflog": ("undo_cmds", "reflog", "Where REF (default: the checked-out branch) has pointed, newest first."),
    "verify": ("maintenance", "verify", "Recompute every reachable object's hash and check the version DAG."),
    "gc": ("maintenance", "gc", "Remove objects that no ref, reflog entry or unfinished operation can reach."),
    "simulate": ("simulate_cmd", "simulate",
        "Simulate a population with ground truth and commit it to the repository in DIRECTORY."),
    "refine": ("refine_cmd", "refine", "Refine all species jointly in every tilt series and commit each iteration."),
    "regularise": ("regularise_cmd", "regularise",
        "Regularise HALF_MAP_1 and HALF_MAP_2 (MRC) and write both, their average and the FSC to --output."),
    "train-denoiser": ("regularise_cmd", "train_denoiser",
        "Train each SPECIES' denoiser (default: every species) on its half-maps and store its weights, one commit."),
    "tomogram": ("picking_cmds", "tomogram",
        "Reconstruct ITEM's tomogram (weighted back-projection) with its current deformation and imaging models."),
    "match": ("picking_cmds", "match",
        "Find a new species in ITEMS (default: every tilt series) by template matching, and commit its picks."),
    "report": ("report_cmd", "report",
        "Write an HTML report of REV: population, species (FSC, history, maps, provenance), tilt series, merges."),
    "demo": ("demo", "demo",
        "Two labs pool tilt series: lab A serves a population, lab B adds a species, lab A merges, refines, reports."),
}


class LazyGroup(click.Group):
    """Commands resolved from :data:`COMMANDS` on first use; ``--help`` lists them without importing them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*self.commands, *COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands or name not in COMMANDS:
            return self.commands.get(name)
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"{__package__}.{module}"), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.commands[name].get_short_help_str() if name in self.commands else COMMANDS[name][2])
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


def main() -> None:
    cli(prog_name="cryopool")


if __name__ == "__main__":
    main()
