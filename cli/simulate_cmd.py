"""``cryopool simulate``: a synthetic population with ground truth, committed like any imported data."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import click

from cryopool.engine.fsc import fsc, resolution_at
from cryopool.engine.simulate import (PRESETS, SpeciesSpec, WithheldSpecies, simulate as run_simulation,
                                      withheld_species, write_simulation)
from cryopool.repo import Repository
from cryopool.repo.formats.mrc import write_mrc
from cryopool.repo.formats.star import write_star

from .common import emit_json, handle_errors, json_option, progress_bar, short, table

__all__ = ["COMMANDS"]


def _species(text: str) -> SpeciesSpec:
    parts = text.split(":")
    if len(parts) < 3:
        raise click.BadParameter(f"{text!r}: expected NAME:DIAMETER_Å:COPIES_PER_ITEM[:SYMMETRY[:PDB]]")
    try:
        spec = SpeciesSpec(parts[0], float(parts[1]), int(parts[2]))
    except ValueError:
        raise click.BadParameter(f"{text!r}: diameter must be a number and copies an integer") from None
    if len(parts) > 3 and parts[3]:
        spec.symmetry = parts[3]
    if len(parts) > 4 and parts[4]:
        if not Path(parts[4]).is_file():
            raise click.BadParameter(f"{parts[4]}: no such PDB file")
        spec.pdb = parts[4]
    return spec


def _withheld(text: str) -> tuple[str, str]:
    name, _, folder = text.partition(":")
    if not name or not folder:
        raise click.BadParameter(f"{text!r}: expected NAME:FOLDER", param_hint="--withhold")
    if Path(folder).exists():
        raise click.BadParameter(f"{folder} exists; give a new folder", param_hint="--withhold")
    return name, folder


def _write_picks(w: WithheldSpecies, name: str, folder: Path) -> None:
    """Half-maps, mask and a RELION 5 particle STAR file (items named source/item), as a picker hands them over."""
    import pandas as pd  # only this option writes STAR files

    folder.mkdir(parents=True)
    for label, volume in (("half1", w.half_maps[0]), ("half2", w.half_maps[1]), ("mask", w.mask)):
        write_mrc(folder / f"{label}.mrc", volume, w.pixel_size_angstrom)
    p, e = w.positions_angstrom, w.euler_zyz_deg
    write_star(folder / "particles.star", {"particles": pd.DataFrame({
        "rlnTomoName": w.item_keys, "rlnCenteredCoordinateXAngst": p[:, 0], "rlnCenteredCoordinateYAngst": p[:, 1],
        "rlnCenteredCoordinateZAngst": p[:, 2], "rlnAngleRot": e[:, 0], "rlnAngleTilt": e[:, 1],
        "rlnAnglePsi": e[:, 2], "rlnRandomSubset": w.half_sets.astype(int)})})
    (folder / "species.txt").write_text(f"name {name}\ndiameter_angstrom {w.diameter_angstrom:g}\n"
                                        f"symmetry {w.symmetry}\npixel_size_angstrom {w.pixel_size_angstrom:g}\n")


@click.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="test", show_default=True,
              help="test: seconds on 2 cores; demo: two labs; realistic: hundreds of particles per tilt series.")
@click.option("--species", "species", multiple=True, metavar="NAME:DIAM:COPIES[:SYM[:PDB]]",
              help="Replace the preset's species (repeatable), e.g. ribosome:250:10 or prot:120:8:D7.")
@click.option("--sources", type=int, help="Data sources (labs).")
@click.option("--items", type=int, help="Tilt series per data source.")
@click.option("--pixel-size", type=float, help="Å per pixel.")
@click.option("--image-size", type=int, help="Tilt image width = height, pixels.")
@click.option("--snr", type=float, help="Signal-to-noise ratio (variance) of the tilt images; 'inf' for none.")
@click.option("--dose-per-tilt", type=float, help="e-/Å² per tilt.")
@click.option("--defocus-um", type=float, help="Mean defocus, µm.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--withhold", "withhold", multiple=True, metavar="NAME:FOLDER",
              help="Leave species NAME out of the population (it stays in the images and the truth) and write its "
                   "upstream-quality picks and half-maps to FOLDER, for another lab to import (repeatable).")
@click.option("-b", "--branch", help="Commit to this branch [default: the checked-out one].")
@json_option
@handle_errors
def simulate(directory, preset, species, sources, items, pixel_size, image_size, snr, dose_per_tilt, defocus_um,
             seed, withhold, branch, as_json) -> None:
    """Simulate a population with ground truth and commit it to the repository in DIRECTORY.

    The commit's population is the upstream-quality starting point (nominal
    tilts, no warp, noisy defocus, perturbed poses, half-maps reconstructed
    from that); the truth (geometry, imaging, poses, maps) is attached to the
    commit as a second population, hashed and verified but not what the
    engine sees. A repository is created if DIRECTORY has none.
    """
    cfg = PRESETS[preset]
    changes = {k: v for k, v in dict(n_sources=sources, items_per_source=items, pixel_size_angstrom=pixel_size,
                                     snr=snr, dose_per_tilt=dose_per_tilt, defocus_um=defocus_um).items()
               if v is not None}
    if image_size:
        changes["image_size_px"] = (image_size, image_size)
    if species:
        changes["species"] = [_species(s) for s in species]
    cfg = replace(cfg, seed=seed, **changes)
    held = dict(_withheld(w) for w in withhold)
    unknown = sorted(set(held) - {s.name for s in cfg.species})
    if unknown:
        raise click.BadParameter(f"no species {unknown} in the simulation", param_hint="--withhold")
    root = Path(directory)
    repo = Repository.open(root) if (root / ".cryopool").is_dir() else Repository.init(root)
    if not as_json:
        n_items = cfg.n_sources * cfg.items_per_source
        click.echo(f"Simulating {n_items} tilt series ({len(cfg.tilt_angles)} tilts, {cfg.image_size_px[1]}x"
                   f"{cfg.image_size_px[0]} px at {cfg.pixel_size_angstrom:g} Å/px) with "
                   f"{', '.join(f'{s.copies_per_item} {s.name}' for s in cfg.species)} per tilt series …", err=True)
    with progress_bar(None, "simulating", enabled=not as_json) as bar:
        sim = run_simulation(cfg, progress=bar.update_to)
    commit = write_simulation(repo, sim, branch=branch, withhold=tuple(held))
    for name, folder in held.items():
        _write_picks(withheld_species(sim, name), name, Path(folder))
    rows, out = [], {}
    for spec in cfg.species:
        h1, h2 = sim.initial_maps[spec.name]
        truth = sim.maps[spec.name]
        res = resolution_at(fsc(0.5 * (h1 + h2), truth), cfg.pixel_size_angstrom, 0.5)
        n = sum(len(it.true_particles[spec.name]) for it in sim.items)
        out[spec.name] = {"particles": n, "box_px": sim.boxes[spec.name],
                          "initial_fsc_vs_truth_0.5_angstrom": round(res, 2), "withheld_to": held.get(spec.name)}
        rows.append([spec.name, n, spec.symmetry, f"{sim.boxes[spec.name]} px", f"{res:.1f} Å"])
    if as_json:
        emit_json({"commit": commit, "repository": str(repo.root), "species": out,
                   "nyquist_angstrom": 2 * cfg.pixel_size_angstrom})
        return
    click.echo(f"[{short(commit)}] {repo.get_commit(commit).message}")
    click.echo(table(rows, ["species", "particles", "sym", "box", "initial map vs truth (FSC 0.5)"]))
    nyq = 2 * cfg.pixel_size_angstrom
    click.echo(f"Nyquist: {nyq:g} Å. Ground truth: the commit's attachment 'truth' "
               f"(cryopool show --raw {short(commit)}).")
    if math.isinf(cfg.snr):
        click.echo("Noise-free images (--snr inf).")
    for name, folder in held.items():
        click.echo(f"{name}: in the images and the truth, not in the population; its picks and half-maps are in "
                   f"{folder} (cryopool import species {name} --half1 {folder}/half1.mrc … "
                   f"--particles {folder}/particles.star)")


COMMANDS = [simulate]
