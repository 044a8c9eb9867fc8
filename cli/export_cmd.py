"""``cryopool export``: hand a population to other programs (RELION 5 today)."""

from __future__ import annotations

import click

from cryopool.repo.relion import export_relion

from .common import Context, emit_json, handle_errors, json_option

__all__ = ["COMMANDS"]


@click.group("export")
def export_group() -> None:
    """Write the population at a commit in another program's formats."""


@export_group.command("relion")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-r", "--rev", default="HEAD", show_default=True, help="Commit, branch or tag to export.")
@click.option("--species", "species", multiple=True, help="Export only these species (repeatable) [default: all].")
@json_option
@click.pass_obj
@handle_errors
def relion(obj: Context, folder, rev, species, as_json) -> None:
    """Write a RELION 5 tomography project into the new FOLDER: every data source, every species.

    FOLDER gets tomograms.star, tilt_series/, and per species particles.star, half-maps,
    mask and optimisation_set.star (give it to RELION with --ios, run from FOLDER).
    """
    repo = obj.repo()
    report = (lambda what: click.echo(f"writing {what}", err=True)) if not as_json else None
    summary = export_relion(repo, rev, folder, species=list(species) or None, progress=report)
    if as_json:
        emit_json(summary)
        return
    click.echo(f"exported {len(summary['tilt_series'])} tilt series and {len(summary['species'])} species "
               f"to {summary['folder']}")
    for name in summary["species"]:
        click.echo(f"  relion --ios {name}/optimisation_set.star   (run in {summary['folder']})")
    for note in summary["notes"]:
        click.echo(f"note: {note}")


COMMANDS = [export_group]
