"""``cryopool export``: hand a population to other programs (RELION 5, Warp, copick)."""

from __future__ import annotations

import click

from cryopool.engine.records_io import load_item, load_map
from cryopool.engine.regularise import filtered_map
from cryopool.engine.tomogram import TomogramSettings, reconstruct_tomogram
from cryopool.repo import Species
from cryopool.repo.copick import export_copick
from cryopool.repo.population import iter_items
from cryopool.repo.relion import export_relion
from cryopool.repo.warp_io import export_warp

from .common import Context, emit_json, handle_errors, json_option

__all__ = ["COMMANDS"]


@click.group("export")
def export_group() -> None:
    """Write the population at a commit in another program's formats."""


@export_group.command("relion")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-r", "--rev", default="HEAD", show_default=True, help="Commit, branch or tag to export.")
@click.option("--species", "species", multiple=True, help="Export only these species (repeatable) [default: all].")
@click.option("--filtered/--no-filtered", default=True, show_default=True,
              help="Also write filtered.mrc per species: the half-maps' average, FSC-weighted and low-passed.")
@json_option
@click.pass_obj
@handle_errors
def relion(obj: Context, folder, rev, species, filtered, as_json) -> None:
    """Write a RELION 5 tomography project into the new FOLDER: every data source, every species.

    FOLDER gets tomograms.star, tilt_series/, and per species particles.star, half-maps,
    mask, filtered map and optimisation_set.star (give it to RELION with --ios, run from FOLDER).
    """
    repo = obj.repo()
    report = (lambda what: click.echo(f"writing {what}", err=True)) if not as_json else None

    def maps(sp: Species) -> dict:
        mask = load_map(repo, sp, "mask") if sp.mask is not None else None
        volume = filtered_map(load_map(repo, sp, "half_map_1"), load_map(repo, sp, "half_map_2"),
                              sp.pixel_size_angstrom, mask)
        return {"filtered": volume.numpy()}
    summary = export_relion(repo, rev, folder, species=list(species) or None, progress=report,
                            extra_maps=maps if filtered else None)
    if as_json:
        emit_json(summary)
        return
    click.echo(f"exported {len(summary['tilt_series'])} tilt series and {len(summary['species'])} species "
               f"to {summary['folder']}")
    for name in summary["species"]:
        click.echo(f"  {name}: {summary['folder']}/{name}/optimisation_set.star (the input optimisation set of "
                   "RELION 5's subtomogram jobs)")
    for note in summary["notes"]:
        click.echo(f"note: {note}")


@export_group.command("warp")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-r", "--rev", default="HEAD", show_default=True, help="Commit, branch or tag to export.")
@json_option
@click.pass_obj
@handle_errors
def warp(obj: Context, folder, rev, as_json) -> None:
    """Write every tilt series in WarpTools' layout into the new FOLDER.

    FOLDER gets tomostar/NAME.tomostar, warp_tiltseries/NAME.xml and
    warp_tiltseries/tiltstack/NAME/NAME.st. Items imported from Warp and not
    refined since get their original XML back, byte for byte.
    """
    repo = obj.repo()
    report = (lambda what: click.echo(f"writing {what}", err=True)) if not as_json else None
    summary = export_warp(repo, rev, folder, progress=report)
    if as_json:
        emit_json(summary)
        return
    click.echo(f"exported {len(summary['tilt_series'])} tilt series to {summary['folder']}")
    for note in summary["notes"]:
        click.echo(f"note: {note}")


@export_group.command("copick")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-r", "--rev", default="HEAD", show_default=True, help="Commit, branch or tag to export.")
@click.option("--species", "species", multiple=True, help="Export only these species (repeatable) [default: all].")
@click.option("--tomograms", "binning", type=click.IntRange(1, 64),
              help="Also reconstruct every tilt series' tomogram at this binning (OME-Zarr).")
@json_option
@click.pass_obj
@handle_errors
def copick(obj: Context, folder, rev, species, binning, as_json) -> None:
    """Write a copick project into the new FOLDER: each species' particles as picks, and optionally tomograms.

    FOLDER gets copick_config.json (one pickable object per species), the overlay with
    ExperimentRuns/RUN/Picks/cryopool_0_OBJECT.json per tilt series, and cryopool.json (the commit and the
    run → tilt series, object → species maps that `import copick` reads back).
    """
    repo = obj.repo()
    volumes = {}
    if binning:
        population = repo.population(rev)
        for key, _, ts in iter_items(repo, population):
            if not as_json:
                click.echo(f"reconstructing {key} (binning {binning})", err=True)
            volume, voxel = reconstruct_tomogram(load_item(repo, ts), ts.tomogram_size_px,
                                                 TomogramSettings(binning=binning))
            volumes[key] = (volume.numpy(), voxel)
    summary = export_copick(repo, rev, folder, species=list(species) or None, tomograms=volumes)
    if as_json:
        emit_json(summary)
        return
    click.echo(f"exported {len(summary['objects'])} species as copick picks in {len(summary['runs'])} run(s)"
               f"{f' with {len(volumes)} tomogram(s)' if volumes else ''} to {summary['folder']} "
               f"(config: {summary['folder']}/copick_config.json)")


COMMANDS = [export_group]
