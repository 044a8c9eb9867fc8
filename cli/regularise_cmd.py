"""``cryopool regularise``: a regulariser applied to two half-maps on disk, without the engine."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from cryopool.repo import InvalidInputError
from cryopool.repo.formats.mrc import read_mrc, write_mrc

from .common import Context, emit_json, handle_errors, json_option

__all__ = ["COMMANDS", "cubic_map"]

METHODS = ("fsc", "nu", "denoiser", "prior", "prior+denoiser")  # engine.regularisers.REGULARISERS, without torch


def cubic_map(path: Path, like: tuple[tuple[int, ...], float] | None = None) -> tuple[np.ndarray, float]:
    m = read_mrc(path)
    data, voxel = m.data, m.voxel_size_angstrom
    if data.ndim != 3 or len(set(data.shape)) != 1 or data.shape[0] % 2:
        raise InvalidInputError("a cubic map with an even edge expected", path=str(path), field="shape",
                                found=tuple(data.shape))
    if len({round(v, 4) for v in voxel}) != 1 or not voxel[0] > 0:
        raise InvalidInputError("isotropic voxels with a size in the header expected", path=str(path),
                                field="voxel size", found=voxel, hint="set it with --pixel-size")
    if like is not None and (data.shape != like[0] or abs(voxel[0] - like[1]) > 1e-3 * like[1]):
        raise InvalidInputError("every map must have the first half-map's shape and voxel size", path=str(path),
                                field="shape/voxel size", expected=(like[0], like[1]), found=(data.shape, voxel[0]))
    return np.array(data, dtype=np.float32), voxel[0]  # a writable copy


@click.command()
@click.argument("half_map_1", type=click.Path(path_type=Path))
@click.argument("half_map_2", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(METHODS), default="fsc", show_default=True,
              help="fsc: FSC-weighted Wiener filter; nu: non-uniform (cross-validated local) filter; denoiser: "
                   "M's noise2noise U-net trained on the two halves; prior: the shipped Blush-style prior; "
                   "prior+denoiser: the prior fine-tuned on the two halves.")
@click.option("--mask", type=click.Path(path_type=Path), help="Mask (MRC) for the mask-corrected FSC.")
@click.option("--quarters", nargs=4, type=click.Path(path_type=Path), metavar="Q1A Q1B Q2A Q2B",
              help="Each half's two quarter-maps (half 1 A, 1 B, half 2 A, 2 B), for --method nu: each half's "
                   "filter is then chosen from its own quarters and the halves stay independent.")
@click.option("--pixel-size", type=float, help="Voxel size in Å [default: from the MRC header].")
@click.option("--resolution", type=float, help="Working resolution in Å [default: where the FSC falls below 0.143].")
@click.option("--denoiser-steps", type=click.IntRange(0), help="Noise2noise training steps (denoiser, prior+denoiser).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Directory for the results.")
@json_option
@click.pass_obj
@handle_errors
def regularise(obj: Context, half_map_1, half_map_2, method, mask, quarters, pixel_size, resolution, denoiser_steps,
               output, as_json) -> None:
    """Regularise HALF_MAP_1 and HALF_MAP_2 (MRC) and write both, their average and the FSC to --output.

    Writes half_map_1.mrc, half_map_2.mrc, average.mrc and fsc.tsv (per shell: frequency, resolution, the
    half-maps' FSC and the regularised halves' FSC).
    """
    import torch

    from cryopool.engine.regularisers import regularise_pair

    h1, voxel = cubic_map(half_map_1)
    like = (h1.shape, voxel)
    h2, _ = cubic_map(half_map_2, like)
    m = torch.from_numpy(cubic_map(mask, like)[0]) if mask else None
    if quarters and method != "nu":
        raise click.UsageError("--quarters is for --method nu")
    q = None
    if quarters:
        qs = [torch.from_numpy(cubic_map(p, like)[0]) for p in quarters]
        q = ((qs[0], qs[1]), (qs[2], qs[3]))
    pixel = pixel_size or voxel
    result = regularise_pair(torch.from_numpy(h1), torch.from_numpy(h2), pixel, method=method, mask=m, quarters=q,
                             resolution_angstrom=resolution, denoiser_steps=denoiser_steps)
    output.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, vol in (("half_map_1", result["halves"][0]), ("half_map_2", result["halves"][1]),
                      ("average", result["average"])):
        files[name] = str(output / f"{name}.mrc")
        write_mrc(files[name], vol.numpy(), pixel)
    d = h1.shape[0]
    freq = np.arange(d // 2 + 1) / (d * pixel)
    rows = [f"{f:.6f}\t{(1 / f if f > 0 else float('inf')):.2f}\t{a:.4f}\t{b:.4f}"
            for f, a, b in zip(freq, result["fsc"].tolist(), result["fsc_regularised"].tolist())]
    files["fsc"] = str(output / "fsc.tsv")
    Path(files["fsc"]).write_text("frequency_per_angstrom\tresolution_angstrom\tfsc_half_maps\tfsc_regularised\n"
                                  + "\n".join(rows) + "\n")
    summary = {"method": method, "resolution_angstrom": result["resolution_angstrom"],
               "working_resolution_angstrom": result["working_resolution_angstrom"],
               "independent_halves": result["independent_halves"], "parameters": result["parameters"],
               "record": result["record"], "files": files}
    if as_json:
        emit_json(summary)
        return
    click.echo(f"{method}: FSC 0.143 at {result['resolution_angstrom']:.2f} Å "
               f"(working resolution {result['working_resolution_angstrom']:.2f} Å)")
    if not result["independent_halves"]:
        click.echo("note: the regularised halves are not independent (the filter or network saw both): "
                   "do not read a gold-standard FSC from them", err=True)
    for name, path in files.items():
        click.echo(f"  {name}: {path}")


@click.command("train-denoiser")
@click.argument("species", nargs=-1)
@click.option("--steps", type=click.IntRange(1), default=200, show_default=True,
              help="Noise2noise training steps per species (M: 800 on a GPU).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("-b", "--branch", help="Commit to this branch [default: the checked-out one].")
@click.option("-m", "--message", help="Commit message.")
@json_option
@click.pass_obj
@handle_errors
def train_denoiser(obj: Context, species, steps, device, branch, message, as_json) -> None:
    """Train each SPECIES' denoiser (default: every species) on its half-maps and store its weights, one commit.

    M trains a species' noise2noise denoiser when the species is created and continues at every refinement:
    run this after importing a species, and `refine --regulariser denoiser` continues from the stored
    weights (a species that has none starts from scratch there). The half-maps are not changed.
    """
    from cryopool.engine.refine import pick_device
    from cryopool.engine.species_denoiser import train_species_denoisers

    def say(name: str) -> None:
        if not as_json:
            click.echo(f"training the denoiser of {name} ({steps} steps) …", err=True)
    commit, done = train_species_denoisers(obj.repo(), list(species) or None, steps=steps, branch=branch,
                                           device=pick_device(device), message=message, progress=say)
    if as_json:
        emit_json({"commit": commit, "species": done})
        return
    for name, d in done.items():
        click.echo(f"{name}: {d['total_steps']} steps in all ({d['started_from']}), loss {d['loss_first']} → "
                   f"{d['loss_last']}, up to {d['resolution_angstrom']} Å")
    click.echo(f"[{commit[:12]}] weights stored with the species")


COMMANDS = [regularise, train_denoiser]
