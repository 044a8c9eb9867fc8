"""``cryopool demo``: the mission end to end, as two labs would type it, on a simulated population with its truth."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd
import starfile

from cryopool.engine.assess import compare_with_truth
from cryopool.repo import ParticleTable, Population, Repository, Species
from cryopool.repo.formats.star import write_star
from cryopool.repo.server import serve_in_thread
from cryopool.repo.verify import verify as run_verify

from .common import handle_errors, human_bytes, table
from .demo_data import write_demo_files
from .figures import plot_fsc_vs_truth
from .web import web_pages

__all__ = ["COMMANDS"]

LAB_B_TOKEN = "lab-b-demo-token"
REFINE = ["--image-warp", "2x2", "--lbfgs-iterations", "10"]


def _run(args: list[str]) -> None:
    """Run a cryopool command line through the root group, exactly as typed."""
    root = click.get_current_context().find_root().command
    click.secho(f"\n$ cryopool {shlex.join(args)}", fg="cyan", bold=True)
    root.main(args=args, prog_name="cryopool", standalone_mode=False)


def _say(text: str) -> None:
    click.secho(f"\n{text}", bold=True)


def _false_picks(lab_b: Repository, picks: Path, n: int, offset_angstrom: float) -> list[tuple[str, list[float]]]:
    """Lab B's picker also fires on ``n`` of lab A's ribosomes (``offset_angstrom`` from their centres): picks the
    merge must catch. They join the STAR file with a low score; the true picks get a high one."""
    pop = lab_b.population()
    sp = lab_b.get_record(pop.species["ribosome"], Species)
    t = lab_b.get_record(sp.particles, ParticleTable)
    pos = lab_b.get_array(t.columns["position_angstrom"]).read().reshape(t.count, t.temporal_samples, 3)[:, 0]
    idx = lab_b.get_array(t.columns["item_index"]).read()
    rows = np.random.default_rng(7).choice(t.count, size=n, replace=False)
    table = starfile.read(picks, always_dict=True)["particles"]
    table["rlnMaxValueProbDistribution"] = 0.8
    extra = []
    for k, r in enumerate(rows):
        p = pos[r] + np.array([offset_angstrom, 0.0, 0.0])
        extra.append({"rlnTomoName": t.item_names[idx[r]], "rlnCenteredCoordinateXAngst": p[0],
                      "rlnCenteredCoordinateYAngst": p[1], "rlnCenteredCoordinateZAngst": p[2], "rlnAngleRot": 0.0,
                      "rlnAngleTilt": 90.0, "rlnAnglePsi": 0.0, "rlnRandomSubset": k % 2 + 1,
                      "rlnMaxValueProbDistribution": 0.2})
    write_star(picks, {"particles": pd.concat([table, pd.DataFrame(extra)], ignore_index=True)})
    return [(e["rlnTomoName"], [e["rlnCenteredCoordinateXAngst"], e["rlnCenteredCoordinateYAngst"],
                                e["rlnCenteredCoordinateZAngst"]]) for e in extra]


@click.command()
@click.argument("directory", default="cryopool-demo", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it exists.")
@click.option("--seed", default=0, show_default=True, help="Seed of the simulated population.")
@click.option("--refine-iterations", default=2, show_default=True,
              help="Iterations of lab A's refinement of the merged population.")
@click.option("--image-size", default=192, show_default=True, help="Tilt image size (px) of the simulation.")
@click.option("--inputs-only", is_flag=True,
              help="Only write example input files to DIRECTORY/inputs (MRC tilt series, half-maps, masks, RELION "
                   "STAR particles of two labs and two species), for the tutorial.")
@handle_errors
def demo(directory: str, force: bool, seed: int, refine_iterations: int, image_size: int, inputs_only: bool) -> None:
    """Two labs pool tilt series: lab A serves a population, lab B adds a species, lab A merges, refines, reports.

    Lab A simulates two tilt series with ribosomes (and, unknown to it,
    proteasomes) and serves them with tokens. Lab B clones (partially), imports
    its proteasome picks (three of which sit on lab A's ribosomes), refines
    them jointly with lab A's ribosomes and pushes a branch. Lab A merges it
    with a collision policy, refines the merged population, verifies it and
    writes the report (DIRECTORY/report/index.html); every step is checked
    against the simulation's truth.
    """
    root = Path(directory).resolve()
    if root.exists():
        if not force:
            raise click.UsageError(f"{root} exists; pass --force to replace it")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if inputs_only:
        files = write_demo_files(root / "inputs", seed=seed)
        click.echo(f"Example inputs in {root / 'inputs'}: {sum(len(v) for v in files.tilt_series.values())} tilt "
                   f"series, species {', '.join(sorted(files.species))}")
        return
    t0 = time.perf_counter()
    lab_a, lab_b, picks = root / "lab-a", root / "lab-b", root / "lab-b-picks"

    _say("Lab A: two tilt series with ribosomes, simulated with their ground truth. The images also hold "
         "proteasomes that lab A has not picked (withheld from its population; lab B's picker finds them).")
    _run(["simulate", str(lab_a), "--species", "ribosome:250:6", "--species", "proteasome:120:12", "--sources", "2",
          "--items", "1", "--image-size", str(image_size), "--seed", str(seed),
          "--withhold", f"proteasome:{picks}"])
    _run(["-C", str(lab_a), "tag", "published-v1"])
    repo_a = Repository.open(lab_a)
    start = repo_a.resolve("published-v1")
    with serve_in_thread(str(lab_a), tokens={LAB_B_TOKEN: ["read", "write"]}, pages=web_pages) as url:
        _say(f"Lab A serves its repository on {url} (API /docs, pages /web/), lab B's token has read and write.")

        _say("Lab B: a partial clone (raw tilt series stay on lab A's server until first read).")
        _run(["clone", url, str(lab_b), "--partial", "--token", LAB_B_TOKEN])
        _run(["-C", str(lab_b), "checkout", "-b", "lab-b/proteasome"])
        repo_b = Repository.open(lab_b)
        planted = _false_picks(repo_b, picks / "particles.star", 3, 40.0)
        _say(f"Lab B's picks: the proteasomes, and {len(planted)} false picks on lab A's ribosomes.")
        _run(["-C", str(lab_b), "import", "species", "proteasome", "--half1", str(picks / "half1.mrc"),
              "--half2", str(picks / "half2.mrc"), "--mask", str(picks / "mask.mrc"), "--particles",
              str(picks / "particles.star"), "--diameter", "120", "-m", "Lab B: proteasomes picked in lab A's "
              "tomograms"])
        picked = repo_b.resolve("HEAD")
        _say("Lab B refines its proteasomes jointly with lab A's ribosomes (reading the raw data from lab A).")
        _run(["-C", str(lab_b), "refine", "-n", "1", *REFINE])
        _run(["-C", str(lab_b), "push", "origin", "lab-b/proteasome"])

        _say("Lab A refined its ribosomes meanwhile.")
        _run(["-C", str(lab_a), "refine", "-n", "1", *REFINE])
        _say("Lab A sees lab B's branch, and merges it: lab A's particles win every collision (policy ours); "
             "tilt series both labs refined are marked for re-refinement.")
        _run(["-C", str(lab_a), "log", "--graph", "--oneline", "lab-b/proteasome"])
        _run(["-C", str(lab_a), "diff", "main", "lab-b/proteasome"])
        _run(["-C", str(lab_a), "merge", "lab-b/proteasome", "--policy", "ours", "--conflicts", "re-refine",
              "-m", "Lab A merges lab B's proteasomes"])
        merge_id = repo_a.resolve("HEAD")
        _run(["-C", str(lab_a), "refine", "-n", str(refine_iterations), *REFINE])
        _run(["-C", str(lab_a), "log", "--graph", "--oneline", "-n", "8"])
        _run(["-C", str(lab_a), "verify"])
        _run(["-C", str(lab_a), "report", "-o", str(root / "report")])
    _summary(root, repo_a, start, picked, merge_id, planted)
    click.echo(f"\nDemo finished in {time.perf_counter() - t0:.0f} s. Report: {root / 'report' / 'index.html'}\n"
               f"Browse it served: cryopool -C {lab_a} serve --token {LAB_B_TOKEN}:read, then open "
               f"http://127.0.0.1:8765/web/ (token {LAB_B_TOKEN}).")


def _summary(root: Path, repo: Repository, start: str, picked: str, merge_id: str, planted: list) -> None:
    """What each step proved: hashes, collisions, and the refinement against the simulation's truth."""
    report = run_verify(repo)
    collisions = repo.get_commit(merge_id).operation.parameters.get("collisions", [])
    truth = repo.get_record(repo.get_commit(start).attachments["truth"], Population)
    before = compare_with_truth(repo, repo.population(picked), truth)  # lab B's import: every species at its start
    after = compare_with_truth(repo, repo.population("HEAD"), truth)
    _say("What the demo proved")
    click.echo(f"verify: {'OK' if report.ok else 'FAILED'}: {report.objects} objects, "
               f"{human_bytes(report.bytes_hashed)} re-hashed from content in {report.seconds:.2f} s; every species "
               f"version traces to the raw tilt series (report: provenance).")
    dropped = [c for c in collisions if c["dropped"]]
    click.echo(f"merge: {len(collisions)} collision(s) between lab B's picks and lab A's particles, "
               f"{len(dropped)} resolved by dropping lab B's pick ({len(planted)} false picks were planted):")
    for c in collisions:
        loser = c[c["dropped"]] if c["dropped"] else None
        click.echo(f"  {c['item']}: {c['a']['species']} #{c['a']['particle_id']} vs {c['b']['species']} "
                   f"#{c['b']['particle_id']}, {c['distance_angstrom']:.0f} Å apart (< {c['threshold_angstrom']:.0f} "
                   f"Å): " + (f"dropped {loser['species']} #{loser['particle_id']}" if loser else "kept both"))
    rows = [[label, f"{before[key]:.{digits}f} {unit}", f"{after[key]:.{digits}f} {unit}"]
            for label, key, unit, digits in (("projected particle positions (RMS)", "position_rms_angstrom", "Å", 1),
                                             ("particle orientations in the tilts (RMS)", "orientation_rms_deg", "°", 2),
                                             ("tilt angles, demeaned (RMS)", "tilt_angle_rms_deg", "°", 2),
                                             ("per-tilt shifts (RMS)", "shift_rms_angstrom", "Å", 1))]
    for name in sorted(after["species"]):
        b, a = before["species"][name], after["species"][name]
        rows.append([f"{name}: map vs true map (FSC 0.5)", f"{b['fsc_vs_truth_0.5_angstrom']:.1f} Å",
                     f"{a['fsc_vs_truth_0.5_angstrom']:.1f} Å"])
        rows.append([f"{name}: picks with no true particle", str(b["false_picks"]), str(a["false_picks"])])
    click.echo(table(rows, ["against the truth", "at lab B's import", "after merge + refinement"]))
    pixel = repo.get_record(truth.species["ribosome"]).pixel_size_angstrom
    curves = {n: {"start": before["species"][n]["fsc_vs_truth"], "refined": after["species"][n]["fsc_vs_truth"]}
              for n in after["species"]}
    click.echo(f"Plot: {plot_fsc_vs_truth(root / 'fsc_vs_truth.png', pixel, curves, 'FSC against the true maps')}")


COMMANDS = [demo]
