"""The alignment target: its memory rule (exposure-dependent cropping, M) against an uncropped computation, and its
once-per-round extraction with phase-ramp moves against the target recomputed from scratch at every position."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cryopool.engine.alignment import MASK_RADIUS, AlignmentTarget, masked_reference
from cryopool.engine.ctf import band_limited_ctf2, ctf_2d, premultiply_and_crop
from cryopool.engine.ctf_fit import circular_mask
from cryopool.engine.extraction import angstrom_to_pixel, extract_boxes
from cryopool.engine.fourier import crop_center, pad_center
from cryopool.engine.projection import extract_slices
from cryopool.engine.tilt_model import particle_positions_in_tilts, particle_rotations_in_tilts
from cryopool.engine.refine_item import RefineSettings, SpeciesInput, alignment_target, item_parameters
from cryopool.engine.simulate import PRESETS, SpeciesSpec, simulate


@pytest.fixture(scope="module")
def scene():
    """4 Å/px, 8 e⁻/Å² per tilt (168 in all): late tilts lose their high frequencies to the exposure."""
    cfg = replace(PRESETS["test"], species=[SpeciesSpec("a", 100.0, 6)], items_per_source=1, pixel_size_angstrom=4.0,
                  image_size_px=(96, 96), tilt_step_deg=6.0, dose_per_tilt=8.0, defocus_um=3.0, seed=4)
    sim = simulate(cfg)
    it = sim.items[0]
    p = it.true_particles["a"]
    species = [SpeciesInput("a", masked_reference(sim.maps["a"], 100.0, 4.0), sim.boxes["a"], 100.0,
                            p.positions[:, None], p.orientations[:, None])]
    return it, species


def _objective(scene, **changes) -> AlignmentTarget:
    it, species = scene
    settings = RefineSettings(resolution_angstrom=8.0, **changes)
    return alignment_target(item_parameters(it.true_geometry, it.true_imaging, species, settings), it.stack,
                            it.pre_exposure, it.exposure, settings)


def test_late_tilts_are_cropped_where_their_exposure_weight_falls_below_a_quarter(scene):
    it, species = scene
    obj = _objective(scene)
    groups = {id(b.group): b.group for b in obj.batches}.values()
    covered = torch.cat([g.tilts for g in groups]).sort().values
    assert covered.tolist() == list(range(it.stack.shape[0]))  # every tilt in exactly one group
    pixel = 4.0
    mid = (it.pre_exposure + 0.5 * it.exposure).tolist()
    cropped = 0
    for g in groups:
        box = g.box  # the comparison grid: the masked particle (1.1 diameters) and its soft edge
        assert 1.1 * 100.0 / pixel < box <= species[0].box
        ky = torch.fft.fftfreq(box, d=pixel, dtype=torch.float64)
        kx = torch.fft.rfftfreq(box, d=pixel, dtype=torch.float64)
        k = torch.sqrt(ky[:, None] ** 2 + kx[None] ** 2)
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
    largest = max(b.group.big for b in obj.batches)
    for b in obj.batches:
        b.group.big = largest
    assert cropped == pytest.approx(obj.value(), rel=3e-3)
    # without the rule every tilt keeps the working band: a different target, so the rule is really applied
    assert _objective(scene, exposure_crop_weight=None).value() != pytest.approx(cropped, rel=1e-3)


@torch.no_grad()
def _from_scratch(obj: AlignmentTarget, it) -> float:
    """M written out directly: every particle re-extracted at its modelled position, premultiplied and masked
    there; the model a real-space projection of the map cropped to the comparison box (no band lists, no phase
    ramps, no round)."""
    params, s = obj.params, obj.params.species[0]
    geom, im = params.geometry(), params.imaging()
    px = geom.pixel_size_angstrom
    xy, z = particle_positions_in_tilts(geom, s.positions[:, 0])
    rot = particle_rotations_in_tilts(geom, s.orientations[:, 0])
    pix = angstrom_to_pixel(xy, px, geom.image_size_px)
    num = d1 = d2 = 0.0
    for b in obj.batches:
        g = b.group
        c, t = g.box, g.tilts
        boxes = extract_boxes(it.stack[t], pix[:, t].float(), g.big)
        ctf = ctf_2d((im.defocus_u_angstrom[t] + z[:, t]).float(), (im.defocus_v_angstrom[t] + z[:, t]).float(),
                     im.defocus_angle_deg[t].expand(len(z), -1).float(), voltage_kv=im.voltage_kv,
                     spherical_aberration_mm=im.spherical_aberration_mm, amplitude_contrast=im.amplitude_contrast,
                     pixel_size_angstrom=px, size=g.big)
        radius = MASK_RADIUS * s.diameter_angstrom / px
        mask = circular_mask(c, radius, edge_px=max(2.0, 0.1 * radius))

        def masked(ft):
            real = torch.fft.fftshift(torch.fft.irfft2(ft, s=(c, c)), dim=(-2, -1)) * mask
            return torch.fft.rfft2(torch.fft.ifftshift(real, dim=(-2, -1)))
        data_ctf, data = masked(premultiply_and_crop(boxes, ctf, c)), masked(premultiply_and_crop(boxes, 1.0, c))
        d = s.box
        projection = torch.fft.fftshift(torch.fft.irfft2(extract_slices(s.reference, rot[:, t].float()), s=(d, d)),
                                        dim=(-2, -1))
        model = torch.fft.rfft2(torch.fft.ifftshift(crop_center(projection, c) if c <= d else pad_center(projection, c),
                                                    dim=(-2, -1)))
        w, att = g.weight, g.attenuation
        num += float((w * att * (model.conj() * data_ctf).real).sum())
        d1 += float((w * att**2 * band_limited_ctf2(ctf, c) * model.abs() ** 2).sum())
        d2 += float((w * data.abs() ** 2).sum())
    return num / math.sqrt(d1 * d2)


def test_the_target_equals_its_direct_computation_where_the_round_starts(scene):
    it, _ = scene
    obj = _objective(scene, exposure_crop_weight=None)
    assert obj.value() == pytest.approx(_from_scratch(obj, it), rel=2e-3)


def test_within_a_round_phase_ramps_follow_the_particles_as_re_extraction_would(scene):
    """The round extracted ~0.75 px off the truth, then every particle moved back to the truth: the round's target
    sees the gain that re-extraction at the truth sees, and its gradient at the start points towards the truth."""
    it, _ = scene
    obj = _objective(scene, exposure_crop_weight=None)
    torch.manual_seed(1)
    step = torch.randn_like(obj.params.p["shifts"]) * 3.0  # Å, ~0.75 px per tilt
    with torch.no_grad():
        obj.params.p["shifts"] += step
    off = obj.value()  # the round starts here
    assert off == pytest.approx(_from_scratch(obj, it), rel=2e-3)
    obj.params.trainable(("shifts",))
    obj.loss_and_backward()
    assert float((obj.params.p["shifts"].grad * step).sum()) > 0  # −M grows further along the step
    with torch.no_grad():
        obj.params.p["shifts"] -= step
    in_round = -obj.loss_and_backward()  # the same round: no new extraction
    at_truth = _from_scratch(obj, it)
    assert at_truth - off > 0.02
    assert in_round == pytest.approx(at_truth, abs=0.1 * (at_truth - off)), (off, in_round, at_truth)
