"""Refinement throughput: particle-tilt images evaluated per second (target value + exact gradient), and the
once-per-round extraction that evaluations start from (``alignment.AlignmentTarget.prepare``).

At 64 px and 128 px boxes on this CPU (CUDA too where available): throughput, its scaling with the number of
particles per tilt series (the fitted exponent of time vs particles; 1 is linear) and with the number of
species, and the peak memory of one evaluation against the size of the extracted particle stack (measured in a
fresh process per point). Baselines come from the same run: the ratio rows compare each size with the smallest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import torch

from cryopool.engine.geometry import euler_zyz_to_matrix
from cryopool.engine.projection import prepare_volume
from cryopool.engine.records_io import geometry_to, imaging_to
from cryopool.engine.refine_item import RefineSettings, SpeciesInput, alignment_target, item_parameters
from cryopool.engine.tilt_model import Imaging, TiltGeometry

PIXEL = 8.0


def _system(box: int, n: int, n_species: int, tilts: int = 41, device="cpu", budget_gib: float = 8.0):
    rng = np.random.default_rng(0)
    size = 384 if box <= 64 else 640  # fixed field of view: only the particle count changes
    t = torch.linspace(-60, 60, tilts, dtype=torch.float64)
    geom = TiltGeometry(t, 0.0, torch.zeros(tilts, 2, dtype=torch.float64), torch.zeros(tilts, 3, dtype=torch.float64),
                        (size, size), (size * PIXEL, size * PIXEL, 1000.0), PIXEL, torch.linspace(0, 1, tilts,
                                                                                                     dtype=torch.float64))
    im = Imaging(torch.full((tilts,), 30000.0, dtype=torch.float64), torch.full((tilts,), 30000.0, dtype=torch.float64),
                 torch.zeros(tilts, dtype=torch.float64), 300.0, 2.7, 0.07)
    species = []
    per = max(1, n // n_species)
    for s in range(n_species):
        pos = torch.tensor(np.stack([rng.uniform(-0.4, 0.4, per) * size * PIXEL, rng.uniform(-0.4, 0.4, per) * size * PIXEL,
                                     rng.uniform(-100, 100, per)], 1))
        ori = euler_zyz_to_matrix(torch.tensor(rng.uniform(0, 180, (per, 3))))
        vol = torch.randn(box, box, box)
        # the band's part only, as refine prepares its references (refine.py, masked_reference)
        species.append(SpeciesInput(f"s{s}", prepare_volume(vol.to(device), radius=box / 2 + 1), box, box * PIXEL / 2,
                                    pos[:, None].to(device), ori[:, None].to(device)))  # static poses: T = 1
    stack = torch.randn(tilts, size, size, device=device)
    pre = torch.arange(tilts, dtype=torch.float64, device=device) * 3
    settings = RefineSettings(resolution_angstrom=2 * PIXEL, memory_budget_bytes=int(budget_gib * 1024**3))
    params = item_parameters(geometry_to(geom, device), imaging_to(im, device), species, settings)
    params.trainable(settings.groups)
    obj = alignment_target(params, stack, pre, torch.full((tilts,), 3.0, dtype=torch.float64, device=device), settings)
    obj.prepare()
    return obj, per * n_species * tilts


def evaluate(box: int, n: int, n_species: int = 1, device="cpu", repeat: int = 2) -> dict:
    obj, images = _system(box, n, n_species, device=device)
    obj.loss_and_backward()  # warm-up
    best = prepare = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        obj.loss_and_backward()
        best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        obj.prepare()
        prepare = min(prepare, time.perf_counter() - t0)
    return {"box": box, "particles": n, "species": n_species, "images": images, "seconds": best,
            "prepare_seconds": prepare, "images_per_s": images / best, "stack_bytes": images * box * box * 4}


def _high_water_kib() -> int:
    # VmHWM belongs to this address space (getrusage's ru_maxrss survives exec and would include the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def peak_report(box: int, n: int, budget_gib: float = 8.0) -> None:
    """Run in a fresh process: print the peak RSS growth of building the system and one value+gradient."""
    r0 = _high_water_kib()
    obj, images = _system(box, n, 1, budget_gib=budget_gib)
    t0 = time.perf_counter()
    obj.loss_and_backward()
    seconds = time.perf_counter() - t0
    r2 = _high_water_kib()
    print(json.dumps({"box": box, "particles": n, "peak_kib": r2 - r0, "stack_bytes": images * box * box * 4,
                      "batches": len(obj.batches), "seconds": seconds}))


def _memory_point(box: int, n: int, budget_gib: float = 8.0) -> dict:
    code = (f"import sys; sys.path.insert(0, 'bench'); import bench_refine as b; "
            f"b.peak_report({box}, {n}, {budget_gib})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_line(box: int, n: int, budget: float, m: dict) -> str:
    return (f"memory box {box} particles {n} budget {budget:g} GiB ({m['batches']} batches, {m['seconds']:.2f} s): "
            f"peak growth {m['peak_kib'] / 1024:.0f} MiB (tilt images, maps and one value+gradient) for a "
            f"{m['stack_bytes'] / 2**20:.0f} MiB particle stack (ratio {m['peak_kib'] * 1024 / m['stack_bytes']:.1f})")


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = ["box  particles species  images   time(s)  images/s  round's extraction(s)"]
    for box in (64, 128):
        rows = [evaluate(box, n) for n in ((8, 16, 32, 64) if box == 64 else (4, 8, 16, 32))]
        for r in rows:
            lines.append(f"{r['box']:4d} {r['particles']:9d} {r['species']:7d} {r['images']:7d} {r['seconds']:9.2f} "
                         f"{r['images_per_s']:9.0f}  {r['prepare_seconds']:9.2f}")
        x = np.log([r["particles"] for r in rows])
        y = np.log([r["seconds"] for r in rows])
        lines.append(f"     scaling exponent (time ∝ particles^k): k = {np.polyfit(x, y, 1)[0]:.2f}")
    sp = [evaluate(64, 24, k) for k in (1, 2, 3)]
    for r in sp:
        lines.append(f"{r['box']:4d} {r['particles']:9d} {r['species']:7d} {r['images']:7d} {r['seconds']:9.2f} "
                     f"{r['images_per_s']:9.0f}")
    lines.append(f"     species 3 vs 1, same particle count: time ratio {sp[2]['seconds'] / sp[0]['seconds']:.2f}")
    for box, counts in ((64, (16, 32, 64)), (128, (8, 16, 32, 40))):  # 40: the large particles per series
        points = []
        for n in counts:
            m = _memory_point(box, n)
            points.append(m)
            lines.append(_memory_line(box, n, 8.0, m))
        stack = [m["stack_bytes"] / 2**20 for m in points]
        slope, fixed = np.polyfit(stack, [m["peak_kib"] / 1024 for m in points], 1)
        lines.append(f"     box {box}: peak ≈ {fixed:.0f} MiB that do not grow with the particles (tilt images, the "
                     f"map's transform) + {slope:.1f} × the particle stack")
    for box, n, budget in ((64, 32, 0.125), (128, 8, 0.125)):
        lines.append(_memory_line(box, n, budget, _memory_point(box, n, budget)))
    if torch.cuda.is_available():
        g = evaluate(64, 32, device="cuda")
        c = evaluate(64, 32)
        lines.append(f"cuda vs cpu at box 64, 32 particles: {c['seconds'] / g['seconds']:.1f}x")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
