"""The refinement target's memory rule: exposure-dependent cropping (M) against an uncropped computation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cryopool.engine.projection import prepare_volume
from cryopool.engine.refine_item import RefineSettings, SpeciesInput, _Model, _Objective
from cryopool.engine.simulate import PRESETS, SpeciesSpec, simulate


@pytest.fixture(scope="module")
def scene():
    """4 Å/px, 8 e⁻/Å² per tilt (168 in all): late tilts lose their high frequencies to the exposure."""
    cfg = replace(PRESETS["test"], species=[SpeciesSpec("a", 100.0, 6)], items_per_source=1, pixel_size_angstrom=4.0,
                  image_size_px=(96, 96), tilt_step_deg=6.0, dose_per_tilt=8.0, defocus_um=3.0, seed=4)
    sim = simulate(cfg)
    it = sim.items[0]
    p = it.true_particles["a"]
    species = [SpeciesInput("a", prepare_volume(sim.maps["a"]), sim.boxes["a"], 100.0, p.positions[:, None],
                            p.orientations[:, None])]
    return it, species


def _objective(scene, **changes) -> _Objective:
    it, species = scene
    settings = RefineSettings(resolution_angstrom=8.0, **changes)
    return _Objective(_Model(it.true_geometry, it.true_imaging, species, settings), it.stack, it.pre_exposure,
                      it.exposure, settings)


def test_late_tilts_are_cropped_where_their_exposure_weight_falls_below_a_quarter(scene):
    it, species = scene
    obj = _objective(scene)
    groups = {id(g): g for _, _, g in obj.batches}.values()
    covered = torch.cat([g.tilts for g in groups]).sort().values
    assert covered.tolist() == list(range(it.stack.shape[0]))  # every tilt in exactly one group
    box, pixel = species[0].box, 4.0
    ky = torch.fft.fftfreq(box, d=pixel, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, d=pixel, dtype=torch.float64)
    k = torch.sqrt(ky[:, None] ** 2 + kx[None] ** 2)
    mid = (it.pre_exposure + 0.5 * it.exposure).tolist()
    cropped = 0
    for g in groups:
        for row, tilt in enumerate(g.tilts.tolist()):
            # the band edge, written out: min(1 / 8 Å, √(−4 ln 0.25 / (4 Å² · dose)))
            edge = min(1 / 8.0, math.sqrt(-4 * math.log(0.25) / (4.0 * mid[tilt])))
            used = k[g.weight[row] > 0]
            assert used.max() <= edge + 1e-9 and used.max() > edge - 1.5 / (box * pixel)
            cropped += edge < 1 / 8.0
    assert cropped >= 5
    # late tilts get smaller boxes: less work and memory than one box for all (measured 0.94; the particle's own
    # size sets a floor under the box, as it must hold the particle plus its delocalisation)
    sizes = {g.big: len(g.tilts) for g in groups}
    work = sum(n * b**2 for b, n in sizes.items())
    assert len(sizes) >= 2 and work <= 0.96 * len(covered) * max(sizes) ** 2, sizes


def test_smaller_boxes_for_cropped_tilts_lose_nothing_in_their_band(scene):
    obj = _objective(scene)
    cropped = obj.value()
    largest = max(g.big for _, _, g in obj.batches)
    for _, _, g in obj.batches:
        g.big = largest
    assert cropped == pytest.approx(obj.value(), rel=3e-3)
    # without the rule every tilt keeps the working band: a different target, so the rule is really applied
    assert _objective(scene, exposure_crop_weight=None).value() != pytest.approx(cropped, rel=1e-3)
