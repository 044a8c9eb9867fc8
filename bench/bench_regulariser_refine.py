"""Each regulariser inside refinement: the same simulated population and iterations, against the FSC baseline.

The `test` preset (2 tilt series, a 250 Å and a 100 Å species) is refined for N iterations from the same start
with each regulariser; the final half-maps' average is compared with each species' true map (mean FSC over all
shells, and where it falls below 0.5), and the recovered geometry with the truth (projected particle positions,
orientations, stage angles). Ratios are against the `fsc` run of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cryopool.engine.assess import compare_with_truth
from cryopool.engine.refine import RefineOptions, refine_population
from cryopool.engine.regularisers import REGULARISERS
from cryopool.engine.simulate import PRESETS, simulate, write_simulation
from cryopool.repo import Population, Repository


def run(name: str, sim, root: Path, iterations: int, steps: int) -> dict:
    repo = Repository.init(root / name.replace("+", "_"))
    first = write_simulation(repo, sim)
    start = time.perf_counter()
    refine_population(repo, RefineOptions(iterations=iterations, regulariser=name, denoiser_steps=steps))
    seconds = time.perf_counter() - start
    truth = repo.get_record(repo.get_commit(first).attachments["truth"], Population)
    c = compare_with_truth(repo, repo.population(), truth)
    species = {n: {"mean_fsc": sum(v["fsc_vs_truth"][1:]) / (len(v["fsc_vs_truth"]) - 1),
                   "fsc_t_0.5_angstrom": v["fsc_vs_truth_0.5_angstrom"]} for n, v in c["species"].items()}
    return {"seconds": seconds, "species": species, "position_rms_angstrom": c["position_rms_angstrom"],
            "orientation_rms_deg": c["orientation_rms_deg"], "tilt_angle_rms_deg": c["tilt_angle_rms_deg"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--steps", type=int, default=RefineOptions.denoiser_steps)
    parser.add_argument("--only", nargs="*", default=list(REGULARISERS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sim = simulate(PRESETS["test"])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in dict.fromkeys(["fsc", *args.only]):
            results[name] = run(name, sim, Path(tmp), args.iterations, args.steps)
            r, base = results[name], results["fsc"]
            fscs = ", ".join(f"{n} {v['mean_fsc']:.3f} ({v['mean_fsc'] / base['species'][n]['mean_fsc']:.2f}x) "
                             f"FSC_t 0.5 {v['fsc_t_0.5_angstrom']:.1f} Å" for n, v in r["species"].items())
            print(f"{name:15s} {r['seconds']:6.0f} s ({r['seconds'] / base['seconds']:.2f}x)  {fscs}  positions "
                  f"{r['position_rms_angstrom']:.2f} Å, orientations {r['orientation_rms_deg']:.2f}°, stage angles "
                  f"{r['tilt_angle_rms_deg']:.3f}°", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
