"""Projection and back-projection throughput of the engine, side by side with torch-fourier-slice, same run.

For 64³ and 128³ maps: real-space projection images per second (map → N images, the map's transform
prepared once per call for both) and back-projection images per second (N images → map, finalised),
on the CPU (and CUDA when available). torch-projectors is not measured: its wheel does not load with
torch 2.13 and a source build is not part of our install.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch_fourier_slice import backproject_2d_to_3d, project_3d_to_2d

from cryopool.engine.geometry import euler_zyz_to_matrix
from cryopool.engine.projection import FourierAccumulator, extract_slices, prepare_volume


def _rotations(n: int, device) -> torch.Tensor:
    rng = np.random.default_rng(0)
    a = np.stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)], 1)
    return euler_zyz_to_matrix(torch.tensor(a, dtype=torch.float32)).to(device)


def _best(fn, repeat=3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def ours_project(vol, rot):
    d = vol.shape[-1]
    return torch.fft.irfft2(extract_slices(prepare_volume(vol), rot), s=(d, d))


def ours_backproject(images, rot):
    d = images.shape[-1]
    acc = FourierAccumulator(d, device=images.device)
    ft = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
    acc.insert(ft, torch.ones(ft.shape, device=images.device), rot)
    return acc.finalise()


def run(device: str = "cpu") -> list[dict]:
    results = []
    for d, n in ((64, 512), (128, 128)):
        vol = torch.randn(d, d, d, device=device)
        rot = _rotations(n, device)
        images = torch.randn(n, d, d, device=device)
        row = {"device": device, "box": d, "n": n}
        row["ours_project_s"] = _best(lambda: ours_project(vol, rot))
        row["tfs_project_s"] = _best(lambda: project_3d_to_2d(vol, rot.transpose(-1, -2)))
        row["ours_backproject_s"] = _best(lambda: ours_backproject(images, rot))
        row["tfs_backproject_s"] = _best(lambda: backproject_2d_to_3d(images, rot.transpose(-1, -2)))
        results.append(row)
    return results


def report(rows: list[dict]) -> list[str]:
    lines = [f"{'device':6s} {'box':>4s} {'n':>4s} {'project/s ours':>15s} {'tfs':>8s} {'ratio':>6s}   "
             f"{'backproject/s ours':>18s} {'tfs':>8s} {'ratio':>6s}"]
    for r in rows:
        po, pt = r["n"] / r["ours_project_s"], r["n"] / r["tfs_project_s"]
        bo, bt = r["n"] / r["ours_backproject_s"], r["n"] / r["tfs_backproject_s"]
        lines.append(f"{r['device']:6s} {r['box']:4d} {r['n']:4d} {po:15.0f} {pt:8.0f} {po / pt:6.2f}   "
                     f"{bo:18.0f} {bt:8.0f} {bo / bt:6.2f}")
    return lines


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run("cpu")
    if torch.cuda.is_available():
        rows += run("cuda")
    print("\n".join(report(rows)))


if __name__ == "__main__":
    sys.exit(main())
