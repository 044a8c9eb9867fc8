"""The synthetic population: physics against an independent forward model, reconstruction acceptance, repository."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch_ctf import calculate_ctf_2d
from torch_fourier_slice import project_3d_to_2d

from cryopool.engine.forward import species_reconstruction_box
from cryopool.engine.fsc import fsc
from cryopool.engine.geometry import degrees_between
from cryopool.engine.records_io import load_item, load_particles
from cryopool.engine.simulate import PRESETS, SpeciesSpec, reconstruct_species, simulate, write_simulation
from cryopool.engine.tilt_model import particle_defocus, particle_positions_in_tilts, particle_rotations_in_tilts
from cryopool.repo import Population, Repository, Species, TiltSeries, iter_items
from cryopool.repo.verify import verify


def test_one_particle_matches_an_independent_forward_model():
    """Projection (torch-fourier-slice), CTF (torch-ctf), dose weight and sub-pixel placement, built here."""
    cfg = replace(PRESETS["test"], species=[SpeciesSpec("one", 200.0, 1)], items_per_source=1, snr=math.inf,
                  image_size_px=(96, 96), seed=3)
    sim = simulate(cfg)
    it = sim.items[0]
    p = it.true_particles["one"]
    vol = sim.maps["one"].double()
    px, t_index = cfg.pixel_size_angstrom, 27
    xy, z = particle_positions_in_tilts(it.true_geometry, p.positions)
    rot = particle_rotations_in_tilts(it.true_geometry, p.orientations)[0, t_index]
    u, v, a = particle_defocus(it.true_imaging, z[0])
    big = 96
    d = vol.shape[-1]
    proj = project_3d_to_2d(vol.float(), rot.transpose(-1, -2).float(), pad_factor=2.0).double()  # (d, d), centred
    canvas = torch.zeros(big, big, dtype=torch.float64)
    canvas[big // 2 - d // 2: big // 2 + d // 2, big // 2 - d // 2: big // 2 + d // 2] = proj
    ctf = calculate_ctf_2d(defocus=float(u[t_index] + v[t_index]) / 2e4, astigmatism=float(u[t_index] - v[t_index]) / 2e4,
                           astigmatism_angle=float(a[t_index]), voltage=300.0, spherical_aberration=2.7,
                           amplitude_contrast=0.07, phase_shift=0.0, pixel_size=px, image_shape=(big, big),
                           rfft=True, fftshift=False).squeeze().double()
    k2 = torch.fft.fftfreq(big, d=px)[:, None] ** 2 + torch.fft.rfftfreq(big, d=px)[None] ** 2
    dose = float(it.pre_exposure[t_index] + it.exposure[t_index] / 2)
    ft = torch.fft.rfft2(torch.fft.ifftshift(canvas)) * ctf * torch.exp(-4 * dose * k2 / 4)
    pos = xy[0, t_index] / px + torch.tensor([48.0, 48.0])  # pixel position in the 96 x 96 tilt image
    shift = pos - 48.0  # move the box centre (48, 48) there
    ky, kx = torch.fft.fftfreq(big)[:, None], torch.fft.rfftfreq(big)[None]
    ft = ft * torch.exp(-2j * math.pi * (kx * shift[0] + ky * shift[1]))
    expect = torch.fft.fftshift(torch.fft.irfft2(ft, s=(big, big)))
    got = it.stack[t_index].double()
    corr = torch.corrcoef(torch.stack([got.flatten(), expect.flatten()]))[0, 1]
    assert corr > 0.99
    assert (got.std() / expect.std()).item() == pytest.approx(1.0, abs=0.03)


@pytest.fixture(scope="module")
def high_snr():
    cfg = replace(PRESETS["test"], snr=20.0, defocus_um=1.5, defocus_spread_um=0.2, seed=1)
    return simulate(cfg)


def test_truth_reconstruction_reaches_near_nyquist_and_perturbed_is_worse(high_snr):
    sim, cfg = high_snr, high_snr.config
    for spec in cfg.species:
        truth = reconstruct_species(sim.items, spec, sim.boxes[spec.name], truth=True,
                                    pixel=cfg.pixel_size_angstrom, voltage_kv=cfg.voltage_kv,
                                    cs_mm=cfg.spherical_aberration_mm)
        curve_true = fsc(truth[0], sim.maps[spec.name])
        curve_init = fsc(sim.initial_maps[spec.name][0], sim.maps[spec.name])
        nyquist = len(curve_true) - 1
        at = int(math.ceil(0.8 * nyquist))
        assert curve_true[1:at + 1].min() >= 0.5, (spec.name, curve_true.tolist())
        # the perturbed (upstream) state misses the bar and is clearly below the truth there
        assert curve_init[at] < 0.5 and curve_init[at] < curve_true[at] - 0.25, (spec.name, curve_init.tolist(),
                                                                               curve_true.tolist())


def test_small_particle_far_from_focus_reconstructs_exactly_from_noise_free_data():
    """A 100 Å particle at 5 µm and 5 Å/px: its image spreads ~100 Å beyond it, as far as its 200 Å box is wide.

    Premultiplied and cropped to that box (M's extraction) the map matched the truth with FSC 0.1–0.6
    at most shells; reconstructed in ``ctf.reconstruction_box`` and cropped afterwards, it is exact
    up to the interpolation near Nyquist.
    """
    spec = SpeciesSpec("small", 100.0, 6)
    cfg = replace(PRESETS["test"], species=[spec], pixel_size_angstrom=5.0, image_size_px=(384, 384),
                  defocus_um=5.0, snr=1e9, seed=0)
    sim = simulate(cfg)
    h1, h2 = reconstruct_species(sim.items, spec, sim.boxes["small"], truth=True, pixel=5.0, voltage_kv=300.0,
                                 cs_mm=2.7)
    curve = fsc(0.5 * (h1 + h2), sim.maps["small"])
    at = int(0.9 * (len(curve) - 1))
    assert curve[1:at + 1].min() > 0.97, curve.tolist()


def test_reconstruction_box_fits_the_memory_it_is_given():
    optics = dict(voltage_kv=300.0, spherical_aberration_mm=2.7)
    full = species_reconstruction_box(100.0, 40, 5.0, 5.5e4, **optics)
    assert full == 64  # (100 Å + 2 × λ·Δf / (2 × 5 Å) = 317 Å) / 5 Å, rounded up to even
    cap = 2 * 12 * (2 * 50.5) ** 3  # two accumulators of a 50 px box, padded 2×, and a little more
    assert species_reconstruction_box(100.0, 40, 5.0, 5.5e4, max_bytes=cap, **optics) == 50
    assert species_reconstruction_box(100.0, 40, 5.0, 5.5e4, max_bytes=1.0, **optics) == 40  # never below the map


def test_simulation_is_deterministic():
    cfg = replace(PRESETS["test"], species=[SpeciesSpec("one", 150.0, 2)], items_per_source=1,
                  image_size_px=(96, 96), seed=11)
    a, b = simulate(cfg), simulate(cfg)
    assert torch.equal(a.items[0].stack, b.items[0].stack)
    assert torch.equal(a.initial_maps["one"][0], b.initial_maps["one"][0])


def test_written_population_separates_truth_and_round_trips(tmp_path, high_snr):
    sim = high_snr
    repo = Repository.init(tmp_path / "pop")
    cid = write_simulation(repo, sim)
    commit = repo.get_commit(cid)
    assert commit.operation.kind == "simulate" and "truth" in commit.attachments
    pop = repo.population(cid)
    truth = repo.get_record(commit.attachments["truth"], Population)
    assert sorted(pop.species) == sorted(truth.species) == ["large", "small"]
    assert verify(repo).ok
    items = {k: ts for k, _, ts in iter_items(repo, pop)}
    true_items = {k: ts for k, _, ts in iter_items(repo, truth)}
    assert list(items) == [it.key for it in sim.items]
    for it in sim.items:
        ts, tts = items[it.key], true_items[it.key]
        assert ts.stack == tts.stack  # one stack, stored once
        loaded = load_item(repo, ts)
        assert torch.equal(loaded.stack, it.stack)
        assert torch.allclose(loaded.geometry.shifts_angstrom, it.initial_geometry.shifts_angstrom)
        assert loaded.geometry.image_warp is None
        true_loaded = load_item(repo, tts, with_stack=False)
        assert torch.allclose(true_loaded.geometry.angle_corrections_deg, it.true_geometry.angle_corrections_deg)
        assert torch.allclose(true_loaded.geometry.image_warp, it.true_geometry.image_warp)
        assert torch.allclose(true_loaded.imaging.defocus_u_angstrom, it.true_imaging.defocus_u_angstrom)
    sp = repo.get_record(pop.species["large"], Species)
    cols = load_particles(repo, sp.particles)
    true_cols = load_particles(repo, repo.get_record(truth.species["large"], Species).particles)
    assert (cols.ids == true_cols.ids).all()  # the same particles, by stable id
    mask = cols.select(sim.items[0].key)
    assert torch.allclose(true_cols.positions[mask][:, 0], sim.items[0].true_particles["large"].positions)
    err = degrees_between(cols.orientations, true_cols.orientations)
    assert 0.5 < err.mean().item() < 6.0  # perturbed like an upstream pipeline would leave them
    assert isinstance(items[sim.items[0].key], TiltSeries) and items[sim.items[0].key].n_tilts == 41


def test_volume_warp_moves_particles_and_survives_the_round_trip(tmp_path):
    cfg = replace(PRESETS["test"], species=[SpeciesSpec("one", 150.0, 3)], items_per_source=1,
                  image_size_px=(96, 96), volume_warp_grid=(2, 2, 2, 2), volume_warp_angstrom=20.0, seed=5)
    sim = simulate(cfg)
    it = sim.items[0]
    assert it.true_geometry.volume_warp is not None and it.initial_geometry.volume_warp is None
    parts = it.true_particles["one"]
    warped, _ = particle_positions_in_tilts(it.true_geometry, parts.positions)
    flat, _ = particle_positions_in_tilts(it.true_geometry.with_(volume_warp=None), parts.positions)
    assert (warped - flat).norm(dim=-1).mean() > 2.0  # Å
    repo = Repository.init(tmp_path / "pop")
    commit = repo.get_commit(write_simulation(repo, sim))
    truth = repo.get_record(commit.attachments["truth"], Population)
    (_, _, ts), = list(iter_items(repo, truth))
    loaded = load_item(repo, ts, with_stack=False)
    assert torch.allclose(loaded.geometry.volume_warp, it.true_geometry.volume_warp)
