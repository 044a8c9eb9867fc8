"""``cryopool tomogram`` and ``cryopool match``: see a tilt series as a volume, and find a new species in it."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from cryopool.engine.picking import pick_species
from cryopool.engine.records_io import load_item, to_device
from cryopool.engine.refine import pick_device
from cryopool.engine.template_match import MatchSettings
from cryopool.engine.tomogram import CTF_MODES, TomogramSettings, reconstruct_tomogram
from cryopool.repo import Operation, software_version
from cryopool.repo.formats.mrc import write_mrc
from cryopool.repo.population import find_item, iter_items

from .common import Context, emit_json, handle_errors, json_option, progress_bar, short, table
from .regularise_cmd import cubic_map

__all__ = ["COMMANDS"]

DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                      help="Where to compute (auto: CUDA when present).")


@click.command()
@click.argument("item")
@click.option("-r", "--rev", default="HEAD", show_default=True, help="Commit, branch or tag whose models to use.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the tomogram here (MRC) [default: ITEM's name with .mrc, in this folder].")
@click.option("--binning", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Voxel = binning × the tilt series' pixel size.")
@click.option("--ctf", type=click.Choice(CTF_MODES), default="phase-flip", show_default=True,
              help="Correct each tilt's CTF by phase flipping, or not at all.")
@click.option("--no-exposure-weighting", is_flag=True, help="Do not weight the tilts by their exposure.")
@click.option("--store", is_flag=True,
              help="Also store the tomogram in the repository: a commit (operation 'tomogram') that names the item "
                   "version it came from and holds the volume as an attachment.")
@click.option("--memory-budget", "memory_gb", default=0.5, show_default=True, type=float,
              help="GiB for the back-projection's working arrays (slabs of z are sized to fit).")
@DEVICE
@json_option
@click.pass_obj
@handle_errors
def tomogram(obj: Context, item: str, rev: str, output: Path | None, binning: int, ctf: str,
             no_exposure_weighting: bool, store: bool, memory_gb: float, device: str, as_json: bool) -> None:
    """Reconstruct ITEM's tomogram (weighted back-projection) with its current deformation and imaging models."""
    repo = obj.repo()
    cid = repo.resolve(rev)
    key, ref = find_item(repo, repo.population(cid), item)
    ts = repo.get_record(ref)
    settings = TomogramSettings(binning=binning, ctf=ctf, exposure_weighting=not no_exposure_weighting,
                                memory_budget_bytes=int(memory_gb * 1024**3))
    with progress_bar(None, f"tomogram {key}", enabled=not as_json) as bar:
        volume, voxel = reconstruct_tomogram(to_device(load_item(repo, ts), pick_device(device)),
                                             ts.tomogram_size_px, settings, progress=bar.update_to)
    volume = volume.cpu()
    out = output or Path(f"{ts.name}.mrc")
    write_mrc(out, volume.numpy(), voxel)
    commit = None
    if store:
        params = {"item": key, "binning": binning, "ctf": ctf, "exposure_weighting": not no_exposure_weighting,
                  "voxel_angstrom": voxel, "shape_zyx": list(volume.shape), "from_commit": cid}
        with repo.transaction() as tx:
            array = tx.put_array(volume.numpy(), attributes={"voxel_angstrom": voxel, "item": key})
            commit = tx.commit(repo.population(cid), message=f"Tomogram of {key} (binning {binning})",
                               operation=Operation(kind="tomogram", parameters=params, software=software_version(),
                                                   inputs={"item": ref}),
                               attachments={f"tomogram {key}": array}, allow_empty=True, retries=0)
    if as_json:
        emit_json({"item": key, "output": str(out.resolve()), "shape_zyx": list(volume.shape), "voxel_angstrom": voxel,
                   "commit": commit})
        return
    z, y, x = volume.shape
    click.echo(f"{key}: {x} x {y} x {z} voxels of {voxel:g} Å → {out}")
    if commit:
        click.echo(f"[{short(commit)}] stored as the attachment 'tomogram {key}' (item version {short(ref.id)})")


@click.command()
@click.argument("items", nargs=-1)
@click.option("--template", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The map to search for (MRC, cubic, with its voxel size in the header).")
@click.option("--species", "name", required=True, help="Name of the new species the picks become.")
@click.option("--diameter", required=True, type=float, help="Particle diameter in Å (mask, exclusion, collisions).")
@click.option("--symmetry", default="C1", show_default=True)
@click.option("--angular-step", default=20.0, show_default=True, type=click.FloatRange(2, 90),
              help="Spacing of the orientation search, degrees.")
@click.option("--binning", type=click.IntRange(1, 64),
              help="Tomogram voxel = binning × the tilt series' pixel size [default: the largest that keeps the "
                   "particle 16 voxels across].")
@click.option("--lowpass", type=float, help="Low-pass the template to this resolution (Å) [default: 2.5 voxels].")
@click.option("--threshold", type=float,
              help="Keep peaks above this many σ of the search's noise [default: where one false peak is expected "
                   "in the whole search].")
@click.option("--max-picks", type=click.IntRange(1), help="At most this many picks per tilt series.")
@click.option("--scores", "scores_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each tilt series' score volume (σ) here as MRC.")
@click.option("-b", "--branch", help="Commit to this branch [default: the checked-out one].")
@click.option("-m", "--message", help="Commit message.")
@DEVICE
@json_option
@click.pass_obj
@handle_errors
def match(obj: Context, items, template, name, diameter, symmetry, angular_step, binning, lowpass, threshold,
          max_picks, scores_dir, branch, message, device, as_json) -> None:
    """Find a new species in ITEMS (default: every tilt series) by template matching, and commit its picks."""
    repo = obj.repo()
    volume, pixel = cubic_map(template)
    if scores_dir:
        scores_dir.mkdir(parents=True, exist_ok=True)

    def save_scores(key: str, scores: torch.Tensor, voxel: float) -> None:
        if scores_dir:
            write_mrc(scores_dir / f"{key.replace('/', '_')}_scores.mrc", scores.numpy(), voxel)

    settings = MatchSettings(angular_step_deg=angular_step, symmetry=symmetry, lowpass_angstrom=lowpass)
    if binning is None:
        pixel_items = {repo.get_record(ref).pixel_size_angstrom for _, ref, _ in iter_items(repo, repo.population())}
        binning = max(1, int(diameter / 16 / max(pixel_items or {pixel})))
    with progress_bar(None, "matching", enabled=not as_json) as bar:
        report = pick_species(repo, name, torch.from_numpy(volume), pixel, diameter_angstrom=diameter,
                              symmetry=symmetry, items=list(items) or None, branch=branch, settings=settings,
                              binning=binning, threshold_sigma=threshold, max_picks=max_picks, message=message,
                              template_attributes={"voxel_angstrom": pixel, "file": template.name},
                              device=pick_device(device),
                              progress=lambda what, done, total: bar.step(what),
                              scores=save_scores)
    if as_json:
        emit_json({"commit": report.commit, "species": name, "picks": report.picks, "items": report.items})
        return
    rows = [[k, v["picks"], f"{v['best_sigma']:.1f} σ", f"{v['threshold_sigma']:.1f} σ", v["orientations"],
             f"{v['seconds']:.0f} s"] for k, v in report.items.items()]
    click.echo(table(rows, ["tilt series", "picks", "best peak", "threshold", "orientations", "time"]))
    click.echo(f"[{short(report.commit)}] {report.picks} {name} picked; none within reach of a particle already "
               f"there. Next: cryopool refine, then push.")


COMMANDS = [tomogram, match]
