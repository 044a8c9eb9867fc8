"""The regularisers a user can choose (``refine --regulariser``, ``cryopool regularise``), by name.

- ``fsc``: the FSC-weighted Wiener filter (``regularise.FSCWienerFilter``), the baseline.
- ``nu``: non-uniform refinement's cross-validated local filter, from each half's own quarter-maps.
- ``denoiser``: M's noise2noise U-net, trained on the species' half-maps and continued every iteration.
- ``prior``: the shipped Blush-style prior with frozen weights and spectral trailing.
- ``prior+denoiser``: the prior fine-tuned on the species' own half-maps with noise2noise.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch

from cryopool.repo import InvalidInputError

from .denoiser import DenoiserSettings, denoise_half_map, prepare, train_noise2noise
from .fourier import spatial_frequency_radius
from .fsc import fsc, masked_fsc, resolution_at
from .nonuniform import NonUniformSettings, nonuniform_filter
from .prior import PriorWeights, apply_prior, load_prior, to_prior_space
from .regularise import (FSCWienerFilter, HalfMaps, NetworkWeights, Regularised, Regulariser, low_pass_edge,
                         wiener_filter, working_resolution)
from .unet import UNet3D, network_from_arrays, weights_to_arrays

__all__ = ["REGULARISERS", "make_regulariser", "regularise_pair", "NonUniform", "Noise2NoiseDenoiser", "BlushStylePrior"]

REGULARISERS = ("fsc", "nu", "denoiser", "prior", "prior+denoiser")


def _wiener(maps: HalfMaps, half: torch.Tensor) -> torch.Tensor:
    return wiener_filter(half, maps.fsc, pixel_size_angstrom=maps.pixel_size_angstrom,
                         resolution_angstrom=maps.resolution_angstrom)


class NonUniform:
    name = "nu"
    needs_quarters = True

    def __init__(self, settings: NonUniformSettings = NonUniformSettings()) -> None:
        self.settings = settings

    def parameters(self) -> dict:
        return {"name": self.name, **asdict(self.settings)}

    def __call__(self, maps: HalfMaps) -> Regularised:
        if maps.quarters is None:  # a species version reconstructed without quarter-sets: the baseline, this once
            return Regularised(tuple(_wiener(maps, h) for h in maps.halves),
                               record={"fallback": "fsc: this species version has no quarter-maps yet"})
        refs, record = [], {}
        for i, (half, (qa, qb)) in enumerate(zip(maps.halves, maps.quarters), 1):
            out, levels = nonuniform_filter(half, qa, qb, self.settings)
            refs.append(out)
            record[f"half{i}_median_level"] = int(levels.median())
        return Regularised(tuple(refs), record=record)


def _seeded_network(width: int, depth: int, seed: int) -> UNet3D:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet3D(width, depth)


def _stored(maps: HalfMaps, kind: str, **must_match) -> tuple[UNet3D | None, dict, str]:
    """The species' network if it is of this kind (and matches), else None and why."""
    w = maps.weights
    if w is None:
        return None, {}, "no stored weights"
    if w.metadata.get("kind") != kind or any(w.metadata.get(k) != v for k, v in must_match.items()):
        return None, {}, f"stored weights are {w.metadata.get('kind')!r}, not {kind!r}"
    return network_from_arrays(w.arrays, w.metadata["architecture"], where="species denoiser"), w.metadata, "stored"


def _recent_loss(losses: list[float]) -> float | None:
    """The training loss over the last 20 steps (None after no steps)."""
    return round(sum(losses[-20:]) / len(losses[-20:]), 5) if losses else None


def _weights(net: UNet3D, metadata: dict) -> NetworkWeights:
    arrays, architecture = weights_to_arrays(net)
    return NetworkWeights(arrays, {**metadata, "architecture": architecture})


class Noise2NoiseDenoiser:
    name = "denoiser"
    needs_quarters = False

    def __init__(self, settings: DenoiserSettings = DenoiserSettings()) -> None:
        self.settings = settings

    def parameters(self) -> dict:
        return {"name": self.name, **asdict(self.settings)}

    def __call__(self, maps: HalfMaps) -> Regularised:
        s = self.settings
        net, meta, start = _stored(maps, "noise2noise")
        if net is None:
            net, meta = _seeded_network(s.width, s.depth, s.seed), {"kind": "noise2noise", "steps": 0}
        device = maps.halves[0].device
        net = net.to(device)
        white, unwhiten, scale = prepare(maps.halves, maps.pixel_size_angstrom, maps.resolution_angstrom)
        generator = torch.Generator().manual_seed(s.seed + int(meta["steps"]))  # new crops each time
        losses = train_noise2noise(net, white, s, generator=generator)
        refs = tuple(denoise_half_map(net, w, unwhiten, scale, s) for w in white)
        weights = _weights(net, {"kind": "noise2noise", "steps": int(meta["steps"]) + s.steps, "whitened": True})
        return Regularised(refs, weights, {"started_from": start, "steps": s.steps,
                                           "loss_first": round(losses[0], 5) if losses else None,
                                           "loss_last": _recent_loss(losses)})


class BlushStylePrior:
    """Frozen shipped weights, or (``fine_tune_steps``) those weights fine-tuned per species with noise2noise."""

    needs_quarters = False

    def __init__(self, prior: PriorWeights | None = None, *, fine_tune: DenoiserSettings | None = None) -> None:
        self.prior = prior or load_prior()
        self.fine_tune = fine_tune
        self.name = "prior+denoiser" if fine_tune else "prior"

    def parameters(self) -> dict:
        out = {"name": self.name, "prior_blake3": self.prior.digest, "trailing_shells": 2,
               "voxel_size_angstrom": self.prior.voxel_size_angstrom}
        if self.fine_tune:
            out["fine_tune"] = asdict(self.fine_tune)
        return out

    def __call__(self, maps: HalfMaps) -> Regularised:
        record, weights = {}, None
        if self.fine_tune:
            net, meta, start = _stored(maps, "prior-fine-tuned", initialised_from=self.prior.digest)
            if net is None:
                net, meta = self.prior.network(), {"steps": 0}
            net = net.to(maps.halves[0].device)
            halves = tuple(to_prior_space(h, maps.pixel_size_angstrom, self.prior.voxel_size_angstrom)[0]
                           for h in maps.halves)
            s = self.fine_tune
            generator = torch.Generator().manual_seed(s.seed + int(meta["steps"]))
            losses = train_noise2noise(net, halves, s, generator=generator)
            weights = _weights(net, {"kind": "prior-fine-tuned", "initialised_from": self.prior.digest,
                                     "steps": int(meta["steps"]) + s.steps, "whitened": False,
                                     "voxel_size_angstrom": self.prior.voxel_size_angstrom})
            record = {"started_from": start, "steps": s.steps, "loss_last": _recent_loss(losses)}
        else:
            net = self.prior.network().to(maps.halves[0].device)
        refs = tuple(self._trail(maps, h, apply_prior(net, h, maps.pixel_size_angstrom, self.prior.manifest))
                     for h in maps.halves)
        return Regularised(refs, weights, record)

    def _trail(self, maps: HalfMaps, half: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """Spectral trailing: the denoised map up to 2 shells below the working resolution (and no further than
        the prior's Nyquist), the FSC-filtered half-map beyond."""
        d = half.shape[-1]
        radius = spatial_frequency_radius(d, device=half.device, dtype=half.dtype)
        trail_res = d * maps.pixel_size_angstrom / max(d * maps.pixel_size_angstrom / maps.resolution_angstrom - 2, 1.0)
        trail_res = max(trail_res, 2 * self.prior.voxel_size_angstrom)
        edge = low_pass_edge(radius, d, maps.pixel_size_angstrom, trail_res)
        mixed = torch.fft.rfftn(denoised) * edge + torch.fft.rfftn(_wiener(maps, half)) * (1 - edge)
        return torch.fft.irfftn(mixed, s=half.shape[-3:])


def make_regulariser(name: str, *, denoiser_steps: int | None = None, prior: PriorWeights | None = None) -> Regulariser:
    """The regulariser of this name; ``denoiser_steps`` sets the noise2noise training per iteration."""
    settings = DenoiserSettings() if denoiser_steps is None else replace(DenoiserSettings(), steps=denoiser_steps)
    if name == "fsc":
        return FSCWienerFilter()
    if name == "nu":
        return NonUniform()
    if name == "denoiser":
        return Noise2NoiseDenoiser(settings)
    if name == "prior":
        return BlushStylePrior(prior)
    if name == "prior+denoiser":
        return BlushStylePrior(prior, fine_tune=settings)
    raise InvalidInputError("unknown regulariser", field="regulariser", expected=list(REGULARISERS), found=name)


def regularise_pair(half_1: torch.Tensor, half_2: torch.Tensor, pixel_size_angstrom: float, *, method: str = "fsc",
                    mask: torch.Tensor | None = None,
                    quarters: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                    resolution_angstrom: float | None = None, denoiser_steps: int | None = None) -> dict:
    """Two half-maps regularised outside the engine (``cryopool regularise``, as ``relion_postprocess`` is used).

    The FSC is the mask-corrected one with a mask; the working resolution is where it falls below 0.143
    unless given. Non-uniform filtering without quarter-maps cross-validates between the two halves and
    applies one choice to both (like a local-resolution filter): the outputs are then not independent.
    """
    curve = masked_fsc(half_1, half_2, mask)["corrected"] if mask is not None else fsc(half_1, half_2)
    res = resolution_angstrom or working_resolution(curve, pixel_size_angstrom)
    regulariser = make_regulariser(method, denoiser_steps=denoiser_steps)
    shared = method == "nu" and quarters is None
    if shared:
        quarters = ((half_1, half_2), (half_1, half_2))
    out = regulariser(HalfMaps((half_1, half_2), curve, pixel_size_angstrom, res, quarters))
    after = fsc(*out.references)
    return {"halves": out.references, "average": (out.references[0] + out.references[1]) / 2, "fsc": curve,
            "fsc_regularised": after, "resolution_angstrom": float(resolution_at(curve, pixel_size_angstrom)),
            "working_resolution_angstrom": float(res),
            "independent_halves": method not in ("denoiser", "prior+denoiser") and not shared,
            "parameters": regulariser.parameters(), "record": out.record}
