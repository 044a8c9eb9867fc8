"""How the shipped Blush-style prior is trained: a data recipe, a seed and a step count, rebuildable by anyone.

``python -m cryopool.engine.prior_training [--steps N] [--out DIR]`` trains the U-net from scratch and
writes ``blush_style_prior.npz`` (the weights, named arrays) and ``.json`` (architecture, voxel size,
this recipe, seed, torch version, threads, time, loss and the weights' BLAKE3). On the same torch build
and thread count the result is bit-identical (tested on a short run).

The recipe (Blush's augmentations, eqs. 1–2, adapted to simulated data): each example is a pseudo-atomic
phantom (``phantoms.pseudo_atomic_model``: helices and sheets in a lumpy globule) of a random diameter,
rendered at the prior's voxel size in a periodic box, shifted anywhere in it and turned into any of the
cube's orientations, blurred by a random anisotropic Gaussian (a B-factor per axis, so resolutions from
~10 to ~40 Å and uneven orientation coverage), plus coloured Gaussian noise of a random spectrum and
signal-to-noise ratio; some examples are noise alone, with a flat target. The input is that noisy map,
the target the same blurred map without noise (never sharper than the input's signal: a deblurring
network would invent detail), both standardised by the input's statistics. One step in four feeds the
network its own output once more (Blush's recycling), so repeated use across iterations does not build up
artefacts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .phantoms import pseudo_atomic_model, render_map
from .prior import PRIOR_FILE, weights_digest
from .unet import UNet3D, weights_to_arrays

__all__ = ["RECIPE", "training_pair", "train_prior", "write_prior"]

RECIPE = {
    "voxel_size_angstrom": 5.0,
    "map_box": 32,  # 160 Å, periodic: every example is a whole box, shifted at random (no crops, no centre)
    "structures": 64,  # phantoms rendered once, reused with new shifts, blur and noise
    "diameter_angstrom": [50.0, 150.0],
    "empty_probability": 0.15,  # pure-noise examples whose target is flat: noise must not become protein
    "bfactor_angstrom2": [200.0, 4000.0],  # per axis, log-uniform: ~12 Å to ~50 Å
    "noise_bfactor_angstrom2": [0.0, 400.0],  # the noise's own colour, uniform
    "snr": [0.03, 3.0],  # signal variance / noise variance, log-uniform
    "batch": 4,
    "learning_rate": 1e-3,
    "recycle_probability": 0.25,
    "width": 8,
    "depth": 2,
    "window": 48,
    "overlap": 16,
}


def _radius(box: int, voxel: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f = torch.fft.fftfreq(box, d=voxel)
    fr = torch.fft.rfftfreq(box, d=voxel)
    return torch.meshgrid(f, f, fr, indexing="ij")


def training_pair(truth: torch.Tensor, rng: np.random.Generator, recipe: dict = RECIPE) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy input, clean target) for one phantom, both standardised by the input's mean and std."""
    box, voxel = truth.shape[-1], recipe["voxel_size_angstrom"]
    kz, ky, kx = _radius(box, voxel)
    b = np.exp(rng.uniform(*np.log(recipe["bfactor_angstrom2"]), size=3))
    blur = torch.exp(-(b[0] * kz**2 + b[1] * ky**2 + b[2] * kx**2) / 4).float()
    signal = torch.fft.irfftn(torch.fft.rfftn(truth) * blur, s=truth.shape)
    colour = torch.exp(-rng.uniform(*recipe["noise_bfactor_angstrom2"]) * (kz**2 + ky**2 + kx**2) / 4).float()
    white = torch.from_numpy(rng.standard_normal(truth.shape).astype(np.float32))
    noise = torch.fft.irfftn(torch.fft.rfftn(white) * colour, s=truth.shape)
    snr = np.exp(rng.uniform(*np.log(recipe["snr"])))
    if float(signal.std()) > 0:  # an empty example keeps unit noise
        noise = noise * float(signal.std() / (noise.std() * np.sqrt(snr)))
    noisy = signal + noise
    mean, std = noisy.mean(), noisy.std()
    return (noisy - mean) / std, (signal - mean) / std


def _phantoms(recipe: dict, rng: np.random.Generator) -> list[torch.Tensor]:
    out = []
    for _ in range(recipe["structures"]):
        atoms, weights = pseudo_atomic_model(float(rng.uniform(*recipe["diameter_angstrom"])), rng)
        out.append(render_map(atoms, weights, recipe["map_box"], recipe["voxel_size_angstrom"], bfactor=0.0))
    return out


def _example(phantoms: list[torch.Tensor], rng: np.random.Generator, recipe: dict) -> tuple[torch.Tensor, torch.Tensor]:
    truth = phantoms[int(rng.integers(len(phantoms)))]
    if rng.random() < recipe["empty_probability"]:
        truth = torch.zeros_like(truth)
    else:  # anywhere in the periodic box, in any of the cube's 48 orientations
        truth = torch.roll(truth, tuple(int(v) for v in rng.integers(0, truth.shape[-1], 3)), dims=(0, 1, 2))
        truth = truth.permute(*rng.permutation(3).tolist())
        flips = [i for i in range(3) if rng.random() < 0.5]
        truth = truth.flip(flips) if flips else truth
    noisy, clean = training_pair(truth, rng, recipe)
    return noisy[None, None], clean[None, None]


def train_prior(steps: int, *, seed: int = 0, recipe: dict = RECIPE, progress=None) -> tuple[UNet3D, dict]:
    """The trained network and its training record."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    phantoms = _phantoms(recipe, rng)
    net = UNet3D(recipe["width"], recipe["depth"])
    opt = torch.optim.Adam(net.parameters(), lr=recipe["learning_rate"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    start, losses = time.time(), []
    for step in range(steps):
        pairs = [_example(phantoms, rng, recipe) for _ in range(recipe["batch"])]
        x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        if rng.random() < recipe["recycle_probability"]:
            with torch.no_grad():
                x = net(x)
        loss = torch.mean((net(x) - y) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % 50 == 0 or step == steps - 1):
            progress(step + 1, steps, float(np.mean(losses[-50:])))
    net.eval()
    record = {"script": "python -m cryopool.engine.prior_training", "recipe": recipe, "seed": seed, "steps": steps,
              "final_loss": float(np.mean(losses[-100:])) if losses else None, "seconds": round(time.time() - start, 1),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    return net, record


def write_prior(net: UNet3D, record: dict, out: Path, recipe: dict = RECIPE) -> dict:
    arrays, architecture = weights_to_arrays(net)
    manifest = {"name": "cryopool Blush-style prior", "architecture": architecture,
                "voxel_size_angstrom": recipe["voxel_size_angstrom"], "window": recipe["window"],
                "overlap": recipe["overlap"], "training": record, "blake3": weights_digest(arrays),
                "caveat": "trained on simulated pseudo-atomic maps, not experimental half-maps: it can hallucinate "
                          "protein-like features (the reason Blush's authors trained on EMDB half-maps instead)"}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"{PRIOR_FILE}.npz", **arrays)
    (out / f"{PRIOR_FILE}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    args = parser.parse_args(argv)
    net, record = train_prior(args.steps, seed=args.seed,
                              progress=lambda s, n, loss: print(f"step {s}/{n}  loss {loss:.4f}", flush=True))
    manifest = write_prior(net, record, args.out)
    print(f"wrote {args.out / PRIOR_FILE}.npz  blake3 {manifest['blake3']}  in {record['seconds']} s")


if __name__ == "__main__":
    main()
