"""Collaboration transfers: clone throughput vs a raw copy of the same bytes, and incremental pushes.

1. A repository holding a 41 x 1024 x 1024 float32 tilt series (172 MB) is cloned from a path on this
   machine; baseline: copying its object files with shutil in the same run.
2. A simulated population is pushed to a central repository, refined for one iteration, and pushed again:
   the bytes the second push sends against the repository's size (only changed objects may travel).
Both over a path and through `cryopool serve` on loopback.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np

from cryopool.engine.refine import RefineOptions, refine_population
from cryopool.engine.simulate import PRESETS, simulate, write_simulation
from cryopool.repo import Repository
from cryopool.repo.importers import import_tilt_series
from cryopool.repo.remote import add_remote, clone, push
from cryopool.repo.server import serve_in_thread as running_server


def _objects_bytes(repo: Repository) -> int:
    return sum(p.stat().st_size for p in (repo.root / "objects").rglob("*") if p.is_file())


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="cryopool-bench-remote-"))
    try:
        src = Repository.init(work / "src")
        data = np.random.default_rng(0).normal(size=(41, 1024, 1024)).astype(np.float32)
        with mrcfile.new(work / "stack.mrc") as m:
            m.set_data(data)
            m.voxel_size = 1.0
        import_tilt_series(src, work / "stack.mrc", source="bench", tilt_angles="-60:60:3", dose_per_tilt=3,
                           defocus_um=3)
        size = _objects_bytes(src)
        t0 = time.perf_counter()
        shutil.copytree(src.root / "objects", work / "rawcopy")
        raw = time.perf_counter() - t0
        t0 = time.perf_counter()
        clone(str(src.work_dir), str(work / "clone"))
        cloned = time.perf_counter() - t0
        print(f"clone of {size / 1e6:.0f} MB: {size / 1e6 / cloned:.0f} MB/s; raw copy {size / 1e6 / raw:.0f} MB/s; "
              f"ratio {raw / cloned:.2f} (clone re-hashes every object and fsyncs)")
        with running_server(src.work_dir, tokens={"t": ["read", "write"]}) as url:
            t0 = time.perf_counter()
            clone(url, str(work / "httpclone"), token="t")
            http_clone = time.perf_counter() - t0
            central = Repository.init(work / "httpcentral")
            with running_server(central.work_dir, tokens={"t": ["read", "write"]}) as url2:
                add_remote(src, "srv", url2, token="t")
                t0 = time.perf_counter()
                push(src, "srv")
                http_push = time.perf_counter() - t0
        print(f"over HTTP on loopback: clone {size / 1e6 / http_clone:.0f} MB/s, push {size / 1e6 / http_push:.0f} MB/s "
              f"(ratios to raw copy {raw / http_clone:.2f}, {raw / http_push:.2f})")

        lab = Repository.init(work / "lab")
        central = Repository.init(work / "central")
        cfg = replace(PRESETS["test"], items_per_source=1, tilt_step_deg=4.0)
        write_simulation(lab, simulate(cfg))
        add_remote(lab, "central", central.work_dir)
        first, _ = push(lab, "central")
        refine_population(lab, RefineOptions(iterations=1, image_warp_grid=(2, 2), lbfgs_iterations=10, rounds=1))
        second, _ = push(lab, "central")
        total = _objects_bytes(central)
        print(f"incremental push after one refinement iteration: {second.objects} objects, "
              f"{second.bytes / 1e6:.2f} MB of {total / 1e6:.1f} MB in the repository "
              f"({100 * second.bytes / total:.1f} %; the first push sent {first.bytes / 1e6:.1f} MB: "
              f"raw tilt images never travel again)")
        with running_server(central.work_dir, tokens={"t": ["read", "write"]}) as url:
            t0 = time.perf_counter()
            partial = clone(url, str(work / "partial"), token="t", partial=True)
            partial_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            full = clone(url, str(work / "full"), token="t")
            full_s = time.perf_counter() - t0
        print(f"partial clone (raw tilt series left on the server): {_objects_bytes(partial) / 1e6:.2f} MB in "
              f"{partial_s:.2f} s vs full clone {_objects_bytes(full) / 1e6:.1f} MB in {full_s:.2f} s "
              f"(ratio of bytes {_objects_bytes(partial) / _objects_bytes(full):.3f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
