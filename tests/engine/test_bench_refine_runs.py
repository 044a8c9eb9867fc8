"""The refinement benchmark still builds and evaluates its system (it broke once, silently, when poses became
trajectories): one small point, no timing asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path


def test_the_refinement_benchmark_evaluates_a_small_system():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    try:
        import bench_refine
    finally:
        sys.path.pop(0)
    row = bench_refine.evaluate(64, 2, repeat=1)
    assert row["images"] == 2 * 41 and math.isfinite(row["seconds"]) and row["images_per_s"] > 0
