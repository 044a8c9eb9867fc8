"""How fast the everyday commands answer: `status`, `log`, `show`, `diff`, `branch` on a small repository.

Each command runs as a fresh process (as a user types it), best of 5 wall times; baselines in the same run:
the bare interpreter (`python -c pass`) and `import cryopool.repo`. Target: under 0.3 s each.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

from cryopool.repo import Repository
from cryopool.repo.importers import import_tilt_series

COMMANDS = [["status"], ["log", "--oneline"], ["show", "HEAD"], ["diff", "HEAD~1", "HEAD"], ["branch"]]
TARGET_S = 0.3


def _best(argv: list[str], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cryopool-bench-startup-") as tmp:
        work = Path(tmp)
        repo = Repository.init(work / "pop")
        rng = np.random.default_rng(0)
        for i in range(10):  # a small repository: 10 commits, 10 tilt series
            with mrcfile.new(work / f"TS_{i:02d}.mrc") as m:
                m.set_data(rng.normal(size=(9, 64, 64)).astype(np.float32))
                m.voxel_size = 10.0
            import_tilt_series(repo, work / f"TS_{i:02d}.mrc", source="lab", tilt_angles="-12:12:3", dose_per_tilt=3,
                               defocus_um=3)
        python = _best([sys.executable, "-c", "pass"])
        library = _best([sys.executable, "-c", "import cryopool.repo"])
        print(f"baseline: python -c pass        {python * 1000:6.0f} ms")
        print(f"baseline: import cryopool.repo  {library * 1000:6.0f} ms")
        for argv in COMMANDS:
            t = _best([sys.executable, "-m", "cryopool.cli.main", "-C", str(work / "pop"), *argv])
            verdict = "ok" if t < TARGET_S else "over"
            print(f"cryopool {' '.join(argv):<16} {t * 1000:6.0f} ms  {t / python:5.1f}x python  "
                  f"(target < {TARGET_S * 1000:.0f} ms: {verdict})")


if __name__ == "__main__":
    main()
