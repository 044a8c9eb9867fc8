"""The engine on a GPU against the CPU of the same machine (issue 21 §2, issue 18's speed): throughput of the
refinement target, its projection to one M-scale iteration, and each regulariser's time per species.

Run where CUDA exists (``bench/device_check.sh`` on a lent GPU machine); ``--device cpu`` runs the same on the CPU
only (a smoke run). Baselines are measured in the same run.

M-scale projection, with its assumptions: one iteration evaluates every particle-tilt of every item-half
``EVALUATIONS`` times (``rounds`` × L-BFGS iterations × ~1.25 line-search evaluations, the defaults: 2 × 40),
plus one extraction per round; 17,890 particles in 65 tomograms of 41 tilts (the M paper's dataset), at the
throughput measured here for a 64-px and a 128-px box. Reconstruction, the CTF fit and I/O are not included (they
were a small share of the CPU profile, docs/physics.md §8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_refine  # noqa: E402  (the same system the CPU benchmark measures)

from cryopool.engine.fsc import fsc  # noqa: E402
from cryopool.engine.phantoms import noisy_quarter_maps, pseudo_atomic_model, render_map  # noqa: E402
from cryopool.engine.regularise import HalfMaps, working_resolution  # noqa: E402
from cryopool.engine.regularisers import REGULARISERS, make_regulariser  # noqa: E402

M_PARTICLES, M_TILTS = 17_890, 41
EVALUATIONS = 2 * 40 * 1.25
ROUNDS = 2


def _regulariser_seconds(name: str, device: str, steps: int, box: int = 64) -> float:
    atoms, weights = pseudo_atomic_model(150.0, np.random.default_rng(0))
    truth = render_map(atoms, weights, box, 5.0, bfactor=100.0)
    q = [x.to(device) for x in noisy_quarter_maps(truth, 2.0, 1)]
    halves = ((q[0] + q[1]) / 2, (q[2] + q[3]) / 2)
    curve = fsc(*halves)
    maps = HalfMaps(halves, curve, 5.0, working_resolution(curve, 5.0), ((q[0], q[1]), (q[2], q[3])))
    regulariser = make_regulariser(name, denoiser_steps=steps)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    regulariser(maps)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=200, help="noise2noise steps for the denoiser rows")
    ap.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}")
    counts = {64: (8, 32) if args.quick else (32, 128, 512), 128: (4,) if args.quick else (16, 64, 256)}
    print("box  particles  images   cpu images/s  device images/s  ratio   device extraction(s)")
    rates = {}
    for box, ns in counts.items():
        for n in ns:
            d = bench_refine.evaluate(box, n, device=device)
            c = bench_refine.evaluate(box, n) if device != "cpu" else d
            rates[box] = d["images_per_s"]
            print(f"{box:4d} {n:9d} {d['images']:7d} {c['images_per_s']:14.0f} {d['images_per_s']:16.0f} "
                  f"{d['images_per_s'] / c['images_per_s']:6.1f}x {d['prepare_seconds']:12.2f}")
    images = M_PARTICLES * M_TILTS
    for box, rate in rates.items():
        hours = images * EVALUATIONS / rate / 3600
        print(f"M-scale iteration at {box} px ({M_PARTICLES} particles x {M_TILTS} tilts, {EVALUATIONS:.0f} "
              f"evaluations each, at {rate:.0f} images/s): {hours:.2f} h on this {device} (goal < 1 h on one GPU)")
    print("regulariser  seconds per species (64³, both halves)")
    for name in REGULARISERS:
        if args.quick and "denoiser" in name:
            continue
        print(f"  {name:15s} {_regulariser_seconds(name, device, args.steps):8.2f}")


if __name__ == "__main__":
    main()
