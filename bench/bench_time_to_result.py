"""Time to result: refine a simulated population for N iterations; wall time, peak memory and accuracy against the
truth, for this code and for the engine before issue 21 (commit 6e8f683), on the same population in the same run.

The population is the issue's: 3 tilt series of 512² px at 6 Å/px, 41 tilts, 40 large (320 Å) and 15 small (50 Å)
particles per tilt series, started ~1.5 px off in projected position, ~2.5° in orientation, ~0.25° in the tilt
angle, ~3 Å in the per-tilt shifts and ~100 nm in defocus. Each engine runs in a fresh process on its own copy of
the committed population (peak memory is that process's high-water mark); the comparison with the truth is made
here, by this checkout's ``assess``, for both.

The engine before issue 21 needs hours for the whole run on 2 cores, so by default the baseline refines a smaller
population (``--baseline-items``, one tilt series, one iteration) and this code refines the same one too: that is
the ratio. ``--full-baseline`` runs the baseline on the full population as well.

    .venv/bin/python bench/bench_time_to_result.py [--iterations 3] [--baseline-items 1] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "6e8f683"

_CHILD = """
import json, sys, time
from cryopool.repo import Repository
from cryopool.engine.refine import RefineOptions, refine_population
repo = Repository.open(sys.argv[1])
t0 = time.perf_counter()
refine_population(repo, RefineOptions(iterations=int(sys.argv[2]), device=sys.argv[3]))
seconds = time.perf_counter() - t0
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
import torch
gpu = torch.cuda.max_memory_allocated() / 2**20 if sys.argv[3] == "cuda" else 0.0
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "gpu_peak_mib": gpu}))
"""


def population(items: int, seed: int = 0):
    from cryopool.engine.simulate import SimulationConfig, SpeciesSpec
    return SimulationConfig(
        species=[SpeciesSpec("large", 320.0, 40), SpeciesSpec("small", 50.0, 15)], n_sources=1,
        items_per_source=items, pixel_size_angstrom=6.0, image_size_px=(512, 512), tilt_step_deg=3.0,
        stage_angle_error_deg=(0.1, 0.25, 0.1), initial_shift_error_angstrom=3.0,
        initial_position_error_angstrom=6.5,  # per axis: ~9 Å (1.5 px) projected
        initial_angle_error_deg=2.5, initial_defocus_error_angstrom=1000.0, seed=seed)


def _shim(commit: str, into: Path) -> Path:
    """A checkout of ``commit`` importable as ``cryopool`` (PYTHONPATH), beside this one."""
    tree = into / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), commit], check=True,
                   capture_output=True)
    pkg = into / "pkg" / "cryopool"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for part in ("repo", "engine", "cli"):
        (pkg / part).symlink_to(tree / part)
    return into / "pkg"


def _run(repo: Path, iterations: int, pythonpath: Path | None, device: str = "cpu") -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(repo), str(iterations), device], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"refine failed ({repo}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _accuracy(path: Path) -> dict:
    from cryopool.engine.assess import compare_with_truth
    from cryopool.repo import Population, Repository
    repo = Repository.open(path)
    log = [cid for cid, _ in repo.log()]
    first = log[-1]  # the simulated start
    truth = repo.get_record(repo.get_commit(first).attachments["truth"], Population)
    out = {}
    for label, commit in (("start", first), ("end", log[0])):
        c = compare_with_truth(repo, repo.population(commit), truth)
        out[label] = {k: c[k] for k in ("position_rms_angstrom", "orientation_rms_deg", "tilt_angle_rms_deg",
                                        "shift_rms_angstrom", "defocus_rms_angstrom")}
        out[label].update({f"fsc0.5 {n}": v["fsc_vs_truth_0.5_angstrom"] for n, v in c["species"].items()})
    return out


def _simulated(items: int, where: Path) -> Path:
    from cryopool.engine.simulate import simulate, write_simulation
    from cryopool.repo import Repository
    t0 = time.perf_counter()
    repo = Repository.init(where)
    write_simulation(repo, simulate(population(items)))
    print(f"simulated {items} tilt series in {time.perf_counter() - t0:.0f} s", flush=True)
    return where


def _compare(label: str, start: Path, iterations: int, baseline: Path | None, work: Path,
             device: str = "cpu") -> list[str]:
    runs = {}
    for who, path in (("this code", None), (f"before ({BASELINE})", baseline)):
        if who != "this code" and baseline is None:
            continue
        copy = Path(tempfile.mkdtemp(prefix="run-", dir=work))
        shutil.copytree(start, copy, dirs_exist_ok=True)
        where = device if path is None else "cpu"  # the baseline always runs on the CPU
        runs[who] = {**_run(copy, iterations, path, where), **_accuracy(copy)}
        gpu = f", GPU peak {runs[who]['gpu_peak_mib']:.0f} MiB" if runs[who].get("gpu_peak_mib") else ""
        print(f"  {label}: {who} {runs[who]['seconds']:.0f} s on {where}{gpu}", flush=True)
    lines = [f"{label}, {iterations} iteration(s):"]
    keys = list(next(iter(runs.values()))["start"])
    lines.append(f"  {'':24s} {'wall s':>8s} {'peak MiB':>9s} " + " ".join(f"{k[:16]:>16s}" for k in keys))
    first = next(iter(runs.values()))
    lines.append(f"  {'start':24s} {'':8s} {'':9s} " + " ".join(f"{first['start'][k]:16.3f}" for k in keys))
    for who, r in runs.items():
        lines.append(f"  {who:24s} {r['seconds']:8.0f} {r['peak_mib']:9.0f} " +
                     " ".join(f"{r['end'][k]:16.3f}" for k in keys))
    if len(runs) == 2:
        new, old = runs["this code"], runs[f"before ({BASELINE})"]
        lines.append(f"  wall-time ratio before / now: {old['seconds'] / new['seconds']:.1f}x (target >= 10x)")
        worse = [k for k in keys if new["end"][k] > old["end"][k] * 1.05 + 1e-3]
        lines.append("  accuracy: " + ("equal or better on every measure (5 % tolerance)" if not worse
                                       else "worse on " + ", ".join(worse)))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--items", type=int, default=3)
    ap.add_argument("--baseline-items", type=int, default=1)
    ap.add_argument("--baseline-iterations", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--device", default="cpu", help="where this code refines the full population (cpu, cuda); the baseline "
                    "comparison runs on the CPU")
    ap.add_argument("--full-baseline", action="store_true", help="also run the baseline on the full population")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cryopool-ttr-") as tmp:
        work = Path(tmp)
        baseline = None if args.no_baseline else _shim(BASELINE, work / "baseline")
        try:
            lines = []
            if baseline is not None and not args.full_baseline:
                small = _simulated(args.baseline_items, work / "small")
                lines += _compare(f"{args.baseline_items} tilt series", small, args.baseline_iterations, baseline, work)
                print("\n".join(lines), flush=True)
            full = _simulated(args.items, work / "full")
            lines += _compare(f"{args.items} tilt series", full, args.iterations,
                              baseline if args.full_baseline else None, work, args.device)
            print("\n".join(lines))
        finally:
            if baseline is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "baseline/tree")],
                               capture_output=True)


if __name__ == "__main__":
    main()
