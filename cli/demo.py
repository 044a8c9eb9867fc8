"""``cryopool demo``: the whole repository walk on generated data, as a user would type it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from cryopool.repo import Repository
from cryopool.repo.population import population_summary
from cryopool.repo.verify import verify as run_verify

from .common import handle_errors, human_bytes, table
from .demo_data import write_demo_files

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
@handle_errors
def demo(directory: str, force: bool, seed: int) -> None:
    """Generate two labs' tilt series and two species, and walk through the repository.

    init → import (tilt series from two labs, a species) → tag → branch →
    import a second species → diff → log --graph → show → re-import (dedup) →
    verify, then a summary.
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

    repo = Repository.open(pop)
    n_before, bytes_before = _store_size(repo)
    _run(["-C", pop, "import", "tilt-series", str(files.tilt_series["lab_a"][0]), "--source", "lab_c", "--tilt-angles",
          "-60:60:3", "--dose-per-tilt", "3.0", "--defocus-um", "4.0", "--tilt-axis", "0", "--tomogram-size", "128",
          "128", "48", "-m", "Lab C pools the same tilt series"])
    n_after, bytes_after = _store_size(repo)
    click.echo(f"Re-importing identical image data wrote {n_after - n_before} new object(s), "
               f"{human_bytes(bytes_after - bytes_before)} (the image chunks were already stored).")
    _run(["-C", pop, "checkout", "main"])
    _run(["-C", pop, "status"])
    _run(["-C", pop, "verify"])

    report = run_verify(repo)
    summary = population_summary(repo, repo.population("lab-b/proteasome"))
    logical = sum(p.stat().st_size for p in (root / "inputs").glob("*.mrc"))
    click.secho("\nSummary", bold=True)
    rows = [[name, s["particles"], s["symmetry"], f"{s['box_px']} px @ {s['pixel_size_angstrom']:g} Å"]
            for name, s in summary["species"].items()]
    click.echo(table(rows, ["species", "particles", "symmetry", "half-maps"]))
    click.echo(f"Population on lab-b/proteasome: {summary['data_sources']} data sources, {summary['items']} tilt "
               f"series, {summary['tilts']} tilt images")
    click.echo(f"Repository: {n_after} objects, {human_bytes(bytes_after)} on disk for "
               f"{human_bytes(logical)} of MRC input")
    click.echo(f"verify: {'OK' if report.ok else 'FAILED'} — {report.objects} objects, "
               f"{human_bytes(report.bytes_hashed)} re-hashed in {report.seconds:.2f} s")
    click.echo(f"Demo finished in {time.perf_counter() - t0:.1f} s. Explore it: cryopool -C {pop} log --graph")
    if not report.ok:
        raise SystemExit(1)


COMMANDS = [demo]
