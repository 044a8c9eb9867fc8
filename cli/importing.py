"""``cryopool import``: bring tilt series and species into the population."""

from __future__ import annotations

import click

from cryopool.repo.copick import import_copick
from cryopool.repo.importers import import_species, import_tilt_series
from cryopool.repo.formats.mrc import read_mrc, read_mrc_header
from cryopool.repo.relion import import_relion
from cryopool.repo.warp_io import import_warp

from .common import Context, emit_json, handle_errors, human_bytes, json_option, progress_bar, short

__all__ = ["COMMANDS"]


def commit_options(fn):
    """What every import shares: the branch and message of its commit, --json, the context, clear errors."""
    for decorate in (handle_errors, click.pass_obj, json_option, click.option("-m", "--message", help="Commit message."),
                     click.option("-b", "--branch", help="Commit to this branch [default: the checked-out one].")):
        fn = decorate(fn)
    return fn


def _committed(repo, commit: str, message: str) -> None:
    click.echo(f"[{short(commit)}] {message}")
    if repo.last_new_data_objects == 0:
        click.echo("  every image, map and file was already stored (deduplicated): only the records are new")


@click.group("import")
def import_group() -> None:
    """Import data into the current branch (one commit per import)."""


@import_group.command("tilt-series")
@click.argument("stack", type=click.Path(dir_okay=False))
@click.option("--source", required=True, help="Data source (e.g. your lab or session); namespaces item names.")
@click.option("--name", help="Item name [default: the stack's file name without extensions].")
@click.option("--tilt-angles", metavar="MIN:MAX:STEP", help="Tilt angles in stack order, e.g. -60:60:3.")
@click.option("--tlt", type=click.Path(dir_okay=False), help="IMOD .tlt file with one angle per line.")
@click.option("--mdoc", type=click.Path(dir_okay=False), help="SerialEM .mdoc with per-tilt metadata.")
@click.option("--dose-per-tilt", type=float, help="Exposure per tilt image in e-/Å² (if the mdoc has none).")
@click.option("--order", type=click.Choice(["dose-symmetric", "sequential", "file"]),
              help="Acquisition order [default: from the mdoc's DateTime, else dose-symmetric].")
@click.option("--group-size", default=2, show_default=True, help="Tilts per side in the dose-symmetric scheme.")
@click.option("--pixel-size", type=float, help="Å per pixel [default: mdoc, else MRC header].")
@click.option("--voltage", type=float, help="kV [default: mdoc, else 300].")
@click.option("--cs", "cs_mm", default=2.7, show_default=True, help="Spherical aberration in mm.")
@click.option("--amplitude-contrast", default=0.07, show_default=True)
@click.option("--tilt-axis", type=float, help="Tilt-axis angle in degrees [default: mdoc, else 0].")
@click.option("--defocus-um", type=float, help="Nominal defocus in µm, positive = underfocus.")
@click.option("--tomogram-size", nargs=3, type=int, metavar="X Y Z", help="Tomogram size in pixels.")
@click.option("--xf", type=click.Path(dir_okay=False),
              help="IMOD .xf alignment: per-tilt tilt-axis angle and shift (instead of --tilt-axis).")
@click.option("--handedness", type=click.Choice(["-1", "1"]), default="-1", show_default=True,
              help="Defocus handedness (RELION's rlnTomoHand); -1 is IMOD's convention for SerialEM/IMOD angles.")
@commit_options
def tilt_series(obj: Context, stack, source, name, tilt_angles, tlt, mdoc, dose_per_tilt, order, group_size,
                pixel_size, voltage, cs_mm, amplitude_contrast, tilt_axis, defocus_um, tomogram_size, xf, handedness,
                branch, message, as_json) -> None:
    """Import an MRC tilt-series STACK (.mrc/.st/.mrcs) with its per-tilt metadata."""
    repo = obj.repo()
    shape, _, dtype = read_mrc_header(stack)
    total = shape[0] * shape[1] * shape[2] * dtype.itemsize
    with progress_bar(total, f"importing {stack}", enabled=not as_json) as bar:
        commit = import_tilt_series(
            repo, stack, source=source, name=name, tilt_angles=tilt_angles, tlt=tlt, mdoc=mdoc,
            dose_per_tilt=dose_per_tilt, order=order, group_size=group_size, pixel_size_angstrom=pixel_size,
            voltage_kv=voltage, spherical_aberration_mm=cs_mm, amplitude_contrast=amplitude_contrast,
            tilt_axis_deg=tilt_axis, defocus_um=defocus_um, tomogram_size_px=tomogram_size, xf=xf,
            handedness=int(handedness), branch=branch,
            message=message, progress=bar.update)
    c = repo.get_commit(commit)
    params = c.operation.parameters
    if as_json:
        emit_json({"commit": commit, "item": f"{params['source']}/{params['item']}", "tilts": shape[0]})
    else:
        _committed(repo, commit, c.message)
        click.echo(f"  {shape[0]} tilts of {shape[2]}x{shape[1]} px at {params['pixel_size_angstrom']} Å/px "
                   f"({human_bytes(total)} of image data)")


@import_group.command("species")
@click.argument("name")
@click.option("--half1", "half_map_1", required=True, type=click.Path(dir_okay=False), help="Half-map 1 (MRC).")
@click.option("--half2", "half_map_2", required=True, type=click.Path(dir_okay=False), help="Half-map 2 (MRC).")
@click.option("--mask", type=click.Path(dir_okay=False), help="Mask (MRC, values in [0, 1]).")
@click.option("--particles", required=True, type=click.Path(dir_okay=False),
              help="RELION STAR particle table (rlnTomoName, rlnCenteredCoordinateX/Y/ZAngst, rlnAngleRot/Tilt/Psi).")
@click.option("--symmetry", default="C1", show_default=True)
@click.option("--diameter", "diameter_angstrom", required=True, type=float, help="Particle diameter in Å.")
@click.option("--pixel-size", type=float, help="Map pixel size in Å [default: MRC header].")
@commit_options
def species(obj: Context, name, half_map_1, half_map_2, mask, particles, symmetry, diameter_angstrom, pixel_size,
            branch, message, as_json) -> None:
    """Import species NAME from two half-maps, a mask and a particle table."""
    repo = obj.repo()
    commit = import_species(repo, name, half_map_1=half_map_1, half_map_2=half_map_2, mask=mask, particles=particles,
                            symmetry=symmetry, diameter_angstrom=diameter_angstrom, pixel_size_angstrom=pixel_size,
                            branch=branch, message=message)
    c = repo.get_commit(commit)
    n = c.operation.parameters["particles"]
    if as_json:
        emit_json({"commit": commit, "species": name, "particles": n})
    else:
        _committed(repo, commit, c.message)


@import_group.command("copick")
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("--object", "obj_name", required=True, help="The copick pickable object whose picks to import.")
@click.option("--species", "name",
              help="Species they become [default: the species a cryopool export named, else the object's name].")
@click.option("--user-id", help="Whose picks, where several users or tools picked the object.")
@click.option("--session-id", help="Which session's picks [default: 0, a tool's].")
@click.option("--half1", "half_map_1", type=click.Path(dir_okay=False), help="Half-map 1 (MRC), for a new species.")
@click.option("--half2", "half_map_2", type=click.Path(dir_okay=False), help="Half-map 2 (MRC), for a new species.")
@click.option("--mask", type=click.Path(dir_okay=False), help="Mask (MRC), for a new species.")
@click.option("--diameter", "diameter_angstrom", type=float, help="Particle diameter in Å, for a new species.")
@click.option("--symmetry", default="C1", show_default=True)
@commit_options
def copick(obj: Context, config, obj_name, name, user_id, session_id, half_map_1, half_map_2, mask,
           diameter_angstrom, symmetry, branch, message, as_json) -> None:
    """Import a copick project's picks of one object as a species (a new version of it, if it exists)."""
    repo = obj.repo()
    maps = [read_mrc(p) for p in (half_map_1, half_map_2) if p]
    if len(maps) == 1:
        raise click.UsageError("give both --half1 and --half2, or neither")
    commit = import_copick(repo, config, obj_name, name, half_maps=tuple(m.data for m in maps) or None,
                           mask=read_mrc(mask).data if mask else None,
                           pixel_size_angstrom=maps[0].voxel_size_angstrom[0] if maps else None,
                           diameter_angstrom=diameter_angstrom, symmetry=symmetry, user_id=user_id,
                           session_id=session_id, branch=branch, message=message)
    c = repo.get_commit(commit)
    if as_json:
        emit_json({"commit": commit, "species": c.operation.parameters["species"],
                   "particles": c.operation.parameters["particles"]})
    else:
        _committed(repo, commit, c.message)


@import_group.command("relion")
@click.argument("star_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--source", required=True, help="Data source the tilt series go into (namespaces their names).")
@click.option("--species", multiple=True,
              help="Species name, once per optimisation set with particles, in order [default: the set's, if "
                   "cryopool wrote it].")
@click.option("--diameter", "diameter_angstrom", type=float, multiple=True,
              help="Particle diameter in Å, once per optimisation set with particles [default: from its mask].")
@click.option("--symmetry", help="Point group [default: the optimisation set's, else C1].")
@click.option("--half1", type=click.Path(dir_okay=False), help="Half-map 1 [default: _rlnTomoReferenceMap1File].")
@click.option("--half2", type=click.Path(dir_okay=False), help="Half-map 2 [default: _rlnTomoReferenceMap2File].")
@click.option("--mask", type=click.Path(dir_okay=False), help="Mask [default: _rlnTomoReferenceMaskFile].")
@click.option("--temporal-samples", type=click.IntRange(1, 3), default=3, show_default=True,
              help="Control points over the exposure for particle trajectories (motion.star), where there are any.")
@commit_options
def relion(obj: Context, star_files, source, species, diameter_angstrom, symmetry, half1, half2, mask,
           temporal_samples, branch, message, as_json) -> None:
    """Import a RELION 5 tomography project: optimisation sets (tilt series + one species each) or tomograms.star files.

    Paths inside the STAR files are found relative to each file's folder or its parents
    (RELION writes them relative to the project directory). One commit for everything.
    """
    if bool(half1) != bool(half2):
        raise click.UsageError("give both --half1 and --half2, or neither")
    repo = obj.repo()
    with progress_bar(None, "importing RELION project", enabled=not as_json) as bar:
        commit = import_relion(repo, list(star_files), source=source, species=list(species) or None,
                               diameter_angstrom=list(diameter_angstrom) or None, symmetry=symmetry,
                               half_maps=(half1, half2) if half1 else None, mask=mask,
                               temporal_samples=temporal_samples, branch=branch,
                               message=message, progress=bar.tick)
    c = repo.get_commit(commit)
    params = c.operation.parameters
    if as_json:
        emit_json({"commit": commit, "source": source, "tilt_series": params["tilt_series"],
                   "species": params["species"]})
    else:
        _committed(repo, commit, c.message)


@import_group.command("warp")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--source", required=True, help="Data source the tilt series go into (namespaces their names).")
@click.option("--stack", "stacks", multiple=True, type=click.Path(dir_okay=False),
              help="Tilt stack for each file, in order [default: tiltstack/NAME/NAME.st or NAME.st beside the XML].")
@click.option("--pixel-size", type=float, help="Å per pixel of the stacks [default: MRC header].")
@click.option("--tomogram-size", nargs=3, type=int, metavar="X Y Z",
              help="Tomogram size in pixels [default: VolumeDimensionsAngstrom, else the image size].")
@click.option("--defocus-um", type=float, help="Nominal defocus in µm (for a tomostar without its XML).")
@click.option("--voltage", type=float, help="kV (for a tomostar without its XML) [default: 300].")
@commit_options
def warp(obj: Context, files, source, stacks, pixel_size, tomogram_size, defocus_um, voltage, branch, message,
         as_json) -> None:
    """Import Warp/WarpTools tilt series: NAME.xml and/or NAME.tomostar files, with their tilt stacks.

    The XML is kept verbatim with the item, so nothing Warp recorded is lost;
    tilts with UseTilt = False are left out. One commit for everything.
    """
    if stacks and len(stacks) != len(files):
        raise click.UsageError("give --stack once per file, or not at all")
    repo = obj.repo()
    with progress_bar(None, "importing Warp tilt series", enabled=not as_json) as bar:
        commit = import_warp(repo, list(files), source=source, stacks=list(stacks) or None,
                             pixel_size_angstrom=pixel_size, tomogram_size_px=list(tomogram_size) if tomogram_size else None,
                             defocus_um=defocus_um, voltage_kv=voltage, branch=branch, message=message,
                             progress=bar.tick)
    c = repo.get_commit(commit)
    if as_json:
        emit_json({"commit": commit, "source": source, "tilt_series": c.operation.parameters["tilt_series"]})
    else:
        _committed(repo, commit, c.message)


COMMANDS = [import_group]
