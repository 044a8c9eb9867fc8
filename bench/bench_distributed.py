"""Refinement on Dask workers: the speed-up of one iteration from one worker to two on this machine.

The population is the `test` preset with four tilt series (two species); each run refines one iteration on a
fresh copy. Rows: in this process (no Dask), a LocalCluster of 1 worker process with all cores, and of 2 worker
processes with half the cores each; the cluster's start is timed apart from the iteration. Ratios are against
the 1-worker run of the same invocation. On a 2-core machine two workers cannot beat one by much: the engine
already uses both cores through torch's threads; the benchmark says how much splitting by item adds or costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from cryopool.engine.distributed import DaskRunner, dask_client
from cryopool.engine.refine import RefineOptions, refine_population
from cryopool.engine.simulate import PRESETS, simulate, write_simulation
from cryopool.repo import Repository

OPTIONS = dict(iterations=1, image_warp_grid=(2, 2), lbfgs_iterations=20, rounds=1)


def _copy(sim, root: Path, name: str) -> Repository:
    repo = Repository.init(root / name)
    write_simulation(repo, sim)
    return repo


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=4, help="tilt series in the population")
    args = ap.parse_args(argv)
    sim = simulate(replace(PRESETS["test"], items_per_source=args.items, tilt_step_deg=4.0, seed=0))
    root = Path(tempfile.mkdtemp(prefix="cryopool-bench-dask-"))
    rows = {}
    try:
        repo = _copy(sim, root, "local")
        t = time.perf_counter()
        refine_population(repo, RefineOptions(**OPTIONS))
        rows["in process"] = (0.0, time.perf_counter() - t)
        for workers in (1, 2):
            repo = _copy(sim, root, f"dask{workers}")
            t = time.perf_counter()
            with dask_client(workers=workers) as client:
                client.wait_for_workers(workers)
                started = time.perf_counter() - t
                t = time.perf_counter()
                refine_population(repo, RefineOptions(**OPTIONS), runner=DaskRunner(client))
                rows[f"dask, {workers} worker(s)"] = (started, time.perf_counter() - t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    one = rows["dask, 1 worker(s)"][1]
    print(f"one iteration, {args.items} tilt series, {os.cpu_count()} cores")
    print(f"{'runner':<20} {'cluster start s':>16} {'iteration s':>12} {'speed-up vs 1 worker':>22}")
    for name, (started, wall) in rows.items():
        print(f"{name:<20} {started:>16.1f} {wall:>12.1f} {one / wall:>22.2f}")
    return rows


if __name__ == "__main__":
    main()
