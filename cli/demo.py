"""``cryopool demo``: the whole repository walk on generated data, as a user would type it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from cryopool.engine.assess import compare_with_truth
from cryopool.repo import Population, Repository
from cryopool.repo.population import population_summary
from cryopool.repo.verify import verify as run_verify

from .common import handle_errors, human_bytes, table
from .demo_data import write_demo_files
from .plots import plot_fsc_vs_truth

__all__ = ["COMMANDS"]


def _run(args: list[str]) -> None:
    """Run a cryopool command line through the root group, exactly as typed."""
    root = click.get_current_context().find_root().command
    click.secho(f"\n$ cryopool {' '.join(args)}", fg="cyan", bold=True)
    root.main(args=args, prog_name="cryopool", standalone_mode=False)


def _store_size(repo: Repository) -> tuple[int, int]:
    files = [p for p in (repo.root / "objects").rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


@click.command()
@click.argument("directory", default="cryopool-demo", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it exists.")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated data.")
@click.option("--refine-iterations", default=2, show_default=True, help="Refinement iterations of part 2 (0 skips).")
@handle_errors
def demo(directory: str, force: bool, seed: int, refine_iterations: int) -> None:
    """Two labs pool tilt series: the repository walk, then a simulated population refined against its truth.

    Part 1: init → import (tilt series from two labs, a species) → tag →
    branch → import a second species → diff → log --graph → show → re-import
    (dedup) → merge the branch (collision check) → verify. Part 2: simulate two labs' tilt series with two species
    and ground truth → refine → verify, with a summary against the truth and
    FSC plots (DIRECTORY/fsc_vs_truth.png).
    """
    root = Path(directory).resolve()
    if root.exists():
        if not force:
            raise click.UsageError(f"{root} exists; pass --force to replace it")
        shutil.rmtree(root)
    t0 = time.perf_counter()
    click.secho(f"Generating input files in {root / 'inputs'} …", bold=True)
    files = write_demo_files(root / "inputs", seed=seed)
    pop = str(root / "population")
    _run(["init", pop])
    for lab, stacks in files.tilt_series.items():
        for stack in stacks:
            _run(["-C", pop, "import", "tilt-series", str(stack), "--source", lab, "--tilt-angles", "-60:60:3",
                  "--dose-per-tilt", "3.0", "--defocus-um", "4.0", "--tilt-axis", "0", "--tomogram-size", "128",
                  "128", "48"])
    ribo = files.species["ribosome"]
    _run(["-C", pop, "import", "species", "ribosome", "--half1", str(ribo["half1"]), "--half2", str(ribo["half2"]),
          "--mask", str(ribo["mask"]), "--particles", str(ribo["particles"]), "--diameter", str(ribo["diameter"])])
    _run(["-C", pop, "tag", "ribosome-v1"])
    _run(["-C", pop, "checkout", "-b", "lab-b/proteasome"])
    prot = files.species["proteasome"]
    _run(["-C", pop, "import", "species", "proteasome", "--half1", str(prot["half1"]), "--half2",
          str(prot["half2"]), "--mask", str(prot["mask"]), "--particles", str(prot["particles"]), "--symmetry", "D7",
          "--diameter", str(prot["diameter"])])
    _run(["-C", pop, "diff", "main", "lab-b/proteasome"])
    _run(["-C", pop, "log", "--graph", "--oneline"])
    _run(["-C", pop, "show", "HEAD:species/proteasome"])
    _run(["-C", pop, "show", "HEAD:lab_a/TS_01"])

    _run(["-C", pop, "checkout", "main"])
    repo = Repository.open(pop)
    n_before, bytes_before = _store_size(repo)
    _run(["-C", pop, "import", "tilt-series", str(files.tilt_series["lab_a"][0]), "--source", "lab_c", "--tilt-angles",
          "-60:60:3", "--dose-per-tilt", "3.0", "--defocus-um", "4.0", "--tilt-axis", "0", "--tomogram-size", "128",
          "128", "48", "-m", "Lab C pools the same tilt series"])
    n_after, bytes_after = _store_size(repo)
    click.echo(f"Re-importing identical image data wrote {n_after - n_before} new object(s), "
               f"{human_bytes(bytes_after - bytes_before)} (the image chunks were already stored).")
    _run(["-C", pop, "merge", "lab-b/proteasome", "--policy", "score", "-m", "Lab A merges lab B's proteasomes"])
    _run(["-C", pop, "log", "--graph", "--oneline", "-n", "4"])
    _run(["-C", pop, "status"])
    _run(["-C", pop, "verify"])

    report = run_verify(repo)
    summary = population_summary(repo, repo.population("main"))
    logical = sum(p.stat().st_size for p in (root / "inputs").glob("*.mrc"))
    click.secho("\nSummary", bold=True)
    rows = [[name, s["particles"], s["symmetry"], f"{s['box_px']} px @ {s['pixel_size_angstrom']:g} Å"]
            for name, s in summary["species"].items()]
    click.echo(table(rows, ["species", "particles", "symmetry", "half-maps"]))
    click.echo(f"Population on main, after the merge: {summary['data_sources']} data sources, {summary['items']} tilt "
               f"series, {summary['tilts']} tilt images")
    click.echo(f"Repository: {n_after} objects, {human_bytes(bytes_after)} on disk for "
               f"{human_bytes(logical)} of MRC input")
    click.echo(f"verify: {'OK' if report.ok else 'FAILED'} — {report.objects} objects, "
               f"{human_bytes(report.bytes_hashed)} re-hashed in {report.seconds:.2f} s")
    if not report.ok:
        raise SystemExit(1)
    if refine_iterations > 0:
        _simulated_part(root, seed, refine_iterations)
    click.echo(f"\nDemo finished in {time.perf_counter() - t0:.1f} s. Explore it: cryopool -C {pop} log --graph")


def _simulated_part(root: Path, seed: int, iterations: int) -> None:
    """Simulate, refine, verify; report what refinement recovered against the ground truth."""
    sim = str(root / "simulated")
    click.secho("\nPart 2: a simulated two-lab population with ground truth", bold=True)
    _run(["simulate", sim, "--species", "ribosome:250:6", "--species", "proteasome:120:12", "--sources", "2",
          "--items", "1", "--image-size", "192", "--seed", str(seed)])
    _run(["-C", sim, "refine", "-n", str(iterations), "--image-warp", "2x2", "--lbfgs-iterations", "10"])
    _run(["-C", sim, "log", "--oneline"])
    _run(["-C", sim, "verify"])
    repo = Repository.open(sim)
    start = [cid for cid, c in repo.log() if c.operation.kind == "simulate"][0]
    truth = repo.get_record(repo.get_commit(start).attachments["truth"], Population)
    before = compare_with_truth(repo, repo.population(start), truth)
    after = compare_with_truth(repo, repo.population("HEAD"), truth)
    click.secho("\nRefinement against the ground truth", bold=True)
    rows = [[label, f"{before[key]:.{digits}f} {unit}", f"{after[key]:.{digits}f} {unit}"]
            for label, key, unit, digits in (("projected particle positions (RMS)", "position_rms_angstrom", "Å", 1),
                                             ("particle orientations in the tilts (RMS)", "orientation_rms_deg", "°", 2),
                                             ("tilt angles, demeaned (RMS)", "tilt_angle_rms_deg", "°", 2),
                                             ("per-tilt shifts (RMS)", "shift_rms_angstrom", "Å", 1))]
    for name in sorted(after["species"]):
        rows.append([f"{name}: map vs true map (FSC 0.5)", f"{before['species'][name]['fsc_vs_truth_0.5_angstrom']:.1f} Å",
                     f"{after['species'][name]['fsc_vs_truth_0.5_angstrom']:.1f} Å"])
    click.echo(table(rows, ["measure", "start", f"after {iterations} iteration(s)"]))
    pixel = repo.get_record(truth.species[sorted(truth.species)[0]]).pixel_size_angstrom
    curves = {n: {"start": before["species"][n]["fsc_vs_truth"], "refined": after["species"][n]["fsc_vs_truth"]}
              for n in after["species"]}
    png = plot_fsc_vs_truth(root / "fsc_vs_truth.png", pixel, curves, "FSC against the true maps")
    click.echo(f"Plot: {png}")


COMMANDS = [demo]
