"""Ingest, re-ingest and verify throughput of the repository, against baselines measured in the same run.

A 41 x 1024 x 1024 float32 tilt series (172 MB of Gaussian noise: incompressible, the hard case) is
  * imported with `import_tilt_series` from an MRC file (cryopool, full path: read, hash, compress, write, commit);
  * hashed with raw BLAKE3 (one call over the same bytes, single thread, and multi-threaded);
  * written as a zarr v3 array (zarr-python, local store, zstd, same chunks);
  * written and committed with icechunk (a versioned-zarr peer), same chunks.
Then the same file is imported again (nothing new must be written) and the repository verified.

Targets (issue 2): import >= 1.0x icechunk and >= 0.5x raw BLAKE3; re-import writes nothing new and is
>= 5x faster than the first import; verify >= 0.5x raw BLAKE3 over its bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import blake3
import mrcfile
import numpy as np
import zarr

from cryopool.repo import Repository
from cryopool.repo.importers import import_tilt_series
from cryopool.repo.verify import verify


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _dir_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def run(shape=(41, 1024, 1024), workdir: Path | None = None) -> dict:
    work = Path(workdir or tempfile.mkdtemp(prefix="cryopool-bench-"))
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    nbytes = data.nbytes
    raw = memoryview(data).cast("B")
    stack = work / "stack.mrc"
    with mrcfile.new(stack, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = 1.0
    chunks = (1, shape[1], shape[2])
    res: dict = {"shape": list(shape), "bytes": nbytes}

    res["blake3_s"] = _time(lambda: blake3.blake3(raw).digest())
    res["blake3_mt_s"] = _time(lambda: blake3.blake3(raw, max_threads=blake3.blake3.AUTO).digest())

    def zarr_write():
        shutil.rmtree(work / "plain.zarr", ignore_errors=True)
        z = zarr.create_array(store=str(work / "plain.zarr"), shape=shape, chunks=chunks, dtype="float32")
        z[...] = data
    res["zarr_s"] = _time(zarr_write)

    try:
        import icechunk

        def icechunk_write():
            shutil.rmtree(work / "ice", ignore_errors=True)
            repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(work / "ice")))
            session = repo.writable_session("main")
            z = zarr.create_array(store=session.store, name="stack", shape=shape, chunks=chunks, dtype="float32")
            z[...] = data
            session.commit("import")
        res["icechunk_s"] = _time(icechunk_write)
    except ImportError:
        res["icechunk_s"] = None

    def first_import():
        shutil.rmtree(work / "pop", ignore_errors=True)
        repo = Repository.init(work / "pop")
        import_tilt_series(repo, stack, source="bench", tilt_angles="-60:60:3", dose_per_tilt=3, defocus_um=3)
    res["import_s"] = _time(first_import)

    os.environ["CRYOPOOL_FSYNC"] = "0"
    try:
        res["import_nofsync_s"] = _time(first_import)
    finally:
        del os.environ["CRYOPOOL_FSYNC"]
    first_import()

    repo = Repository.open(work / "pop")
    # the same pixels in a different file (another header label): the file-hash cache misses,
    # every chunk is hashed again, and nothing new is written
    copy = work / "stack-copy.mrc"
    with mrcfile.new(copy, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = 1.0
        m.header.label[0] = b"copied by another lab"
        m.header.nlabl = 1
    counter2 = iter(range(1000))
    before = _dir_bytes(repo.root / "objects")
    res["reimport_samedata_s"] = _time(lambda: import_tilt_series(
        repo, copy, source=f"copy{next(counter2)}", tilt_angles="-60:60:3", dose_per_tilt=3, defocus_um=3))
    after = _dir_bytes(repo.root / "objects")
    res["reimport_samedata_new_objects"] = (after[0] - before[0]) / 3
    before = _dir_bytes(repo.root / "objects")
    counter = iter(range(1000))
    res["reimport_s"] = _time(lambda: import_tilt_series(repo, stack, source=f"again{next(counter)}",
                                                         tilt_angles="-60:60:3", dose_per_tilt=3, defocus_um=3))
    after = _dir_bytes(repo.root / "objects")
    res["reimport_new_objects_per_import"] = (after[0] - before[0]) / 3
    res["reimport_new_bytes_per_import"] = (after[1] - before[1]) / 3

    report = verify(repo)
    assert report.ok, report.problems
    res["verify_s"] = report.seconds
    res["verify_bytes"] = report.bytes_hashed
    res["verify_blake3_s"] = _time(lambda: blake3.blake3(raw).digest()) * report.bytes_hashed / nbytes
    shutil.rmtree(work, ignore_errors=True)
    return res


def report(res: dict) -> list[str]:
    mb = res["bytes"] / 1e6
    def tput(s):
        return f"{mb / s:8.0f} MB/s"
    lines = [f"stack {res['shape']} float32, {mb:.0f} MB (best of 3)",
             f"  raw BLAKE3 (1 thread)     {tput(res['blake3_s'])}",
             f"  raw BLAKE3 (all threads)  {tput(res['blake3_mt_s'])}",
             f"  zarr v3 write (zstd)      {tput(res['zarr_s'])}"]
    if res["icechunk_s"]:
        lines.append(f"  icechunk write+commit     {tput(res['icechunk_s'])}")
    lines += [f"  cryopool import           {tput(res['import_s'])}",
              f"  cryopool import, no fsync {tput(res['import_nofsync_s'])}  (not durable: shows the cost of fsync)",
              f"  re-import, other file     {tput(res['reimport_samedata_s'])}  (same pixels, new file: every chunk "
              f"re-hashed, {res['reimport_samedata_new_objects']:.0f} new objects)",
              f"  cryopool re-import        {tput(res['reimport_s'])}  "
              f"({res['reimport_new_objects_per_import']:.0f} new objects, "
              f"{res['reimport_new_bytes_per_import']:.0f} new bytes per re-import: records only)",
              f"  cryopool verify           {res['verify_bytes'] / 1e6 / res['verify_s']:8.0f} MB/s over "
              f"{res['verify_bytes'] / 1e6:.0f} MB", "ratios (target):"]
    ratios = {
        "import / icechunk (>= 1.0)": res["icechunk_s"] / res["import_s"] if res["icechunk_s"] else float("nan"),
        "import / raw BLAKE3 1-thread (>= 0.5)": res["blake3_s"] / res["import_s"],
        "import / raw BLAKE3 all threads": res["blake3_mt_s"] / res["import_s"],
        "import / plain zarr": res["zarr_s"] / res["import_s"],
        "re-import speed-up over import (>= 5)": res["import_s"] / res["reimport_s"],
        "re-import of same pixels in another file, speed-up": res["import_s"] / res["reimport_samedata_s"],
        "import without fsync / raw BLAKE3 1-thread": res["blake3_s"] / res["import_nofsync_s"],
        "verify / raw BLAKE3 1-thread (>= 0.5)": res["verify_blake3_s"] / res["verify_s"],
    }
    lines += [f"  {k:52s} {v:6.2f}x" for k, v in ratios.items()]
    res["ratios"] = ratios
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="41 x 256 x 256 instead of 41 x 1024 x 1024")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    res = run((41, 256, 256) if args.small else (41, 1024, 1024))
    print("\n".join(report(res)))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
