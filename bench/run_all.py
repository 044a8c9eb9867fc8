"""Run every benchmark in bench/ and print its report (ratios against baselines measured in the same run)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_distributed  # noqa: E402
import bench_match  # noqa: E402
import bench_projection  # noqa: E402
import bench_refine  # noqa: E402
import bench_regulariser_refine  # noqa: E402
import bench_regularisers  # noqa: E402
import bench_remote  # noqa: E402
import bench_startup  # noqa: E402
import bench_store  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    print("== repository store: ingest, re-ingest, verify ==")
    bench_store.main(args)
    print("\n== engine: projection and back-projection ==")
    bench_projection.main([])
    print("\n== engine: refinement throughput and memory ==")
    bench_refine.main()
    print("\n== engine: one iteration on 1 and 2 Dask workers ==")
    bench_distributed.main([])
    print("\n== regularisers on simulated half-maps: FSC against the truth, time, leak, hallucination ==")
    bench_regularisers.main([])
    print("\n== regularisers inside refinement ==")
    bench_regulariser_refine.main([])
    print("\n== template matching: a withheld species found again, against the truth ==")
    bench_match.main([])
    print("\n== collaboration: clone and incremental push ==")
    bench_remote.main()
    print("\n== command start-up: status, log, show, diff, branch ==")
    bench_startup.main()


if __name__ == "__main__":
    main()
