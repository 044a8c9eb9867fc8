"""A species' frame: shifting maps, registering them, and moving the particles so the images do not change."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cryopool.engine.assess import compare_with_truth
from cryopool.engine.forward import ParticleSet, render_tilt_series
from cryopool.engine.projection import prepare_volume
from cryopool.engine.records_io import load_map, load_particles
from cryopool.engine.register import register_shift, shift_map, shift_poses, symmetric_part
from cryopool.engine.simulate import write_simulation
from cryopool.engine.symmetry import symmetry_operators
from cryopool.engine.writer import species_version
from cryopool.repo import Metrics, Population, Repository, Species


def _blobs(d: int, centres: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Gaussian blobs at ``centres`` ``(n, 3)`` (x, y, z, px from voxel d // 2): a map whose shifted copy is known
    exactly, not computed by the code under test."""
    c = torch.arange(d, dtype=torch.float64) - d // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    u = torch.stack([x, y, z], -1)
    return sum(torch.exp(-((u - cj) ** 2).sum(-1) / (2 * sigma**2)) for cj in centres)


@pytest.mark.parametrize("d", [30, 31])
def test_shift_map_moves_a_map_by_a_fraction_of_a_pixel(d):
    centres = torch.from_numpy(np.random.default_rng(0).normal(size=(12, 3)) * 3.5)
    s = torch.tensor([1.7, -0.4, 0.9], dtype=torch.float64)
    expected = _blobs(d, centres + s)
    assert float((shift_map(_blobs(d, centres), s) - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("noise", [0.0, 1.0, 3.0])
def test_register_shift_finds_the_shift_through_noise(noise):
    d, s = 30, torch.tensor([1.7, -0.4, 0.9], dtype=torch.float64)
    centres = torch.from_numpy(np.random.default_rng(1).normal(size=(12, 3)) * 3.5)
    fixed, moved = _blobs(d, centres), _blobs(d, centres + s)
    noisy = moved + noise * moved.std() * torch.randn(moved.shape, generator=torch.Generator().manual_seed(2),
                                                      dtype=torch.float64)
    found = register_shift(noisy, fixed, pixel_size_angstrom=10.0, resolution_angstrom=25.0)
    assert torch.allclose(found, -s, atol=0.02 + 0.05 * noise), found  # moving(u − found) = fixed(u)


def test_shifted_poses_give_the_same_tilt_images_with_the_shifted_map(small_sim):
    """The gauge, through the engine's own forward model: map shifted by s, particles by −A s, same images (to
    the slice interpolation, and the defocus of a particle whose height moved by a few Å)."""
    name = "a"
    item = small_sim.items[0]
    geom, imaging, parts = item.true_geometry, item.true_imaging, item.true_particles[name]
    half = small_sim.maps[name].to(torch.float64)
    s = torch.tensor([0.8, -1.3, 0.5], dtype=torch.float64)
    px = geom.pixel_size_angstrom
    moved = ParticleSet(shift_poses(parts.positions, parts.orientations, s, px), parts.orientations)
    kw = dict(pre_exposure=item.pre_exposure, exposure=item.exposure, box=96, dtype=torch.float64)
    before = render_tilt_series([(prepare_volume(half), parts)], geom, imaging, **kw)
    after = render_tilt_series([(prepare_volume(shift_map(half, s)), moved)], geom, imaging, **kw)
    unmoved = render_tilt_series([(prepare_volume(shift_map(half, s)), parts)], geom, imaging, **kw)
    err = float((after - before).norm() / before.norm())
    assert err < 0.05 and float((unmoved - before).norm() / before.norm()) > 20 * err  # measured 0.026 and 0.94


def test_the_truth_in_another_frame_compares_as_the_truth(small_sim, tmp_path):
    """A species whose map is the true map shifted and whose particles moved alike is the truth in another
    frame: no position error, an FSC of 1 against the true map, and the offset reported; moving only the
    particles is seen as the error it is."""
    repo = Repository.init(tmp_path / "r")
    start = write_simulation(repo, small_sim)
    truth = repo.get_record(repo.get_commit(start).attachments["truth"], Population)
    name, s = "a", torch.tensor([1.0, -0.6, 0.4], dtype=torch.float64)
    sp = repo.get_record(truth.species[name], Species)
    px = sp.pixel_size_angstrom
    true_map, cols = load_map(repo, sp), load_particles(repo, sp.particles)
    moved = replace(cols, positions=shift_poses(cols.positions, cols.orientations, s, px))
    shifted = species_version(repo, sp, (shift_map(true_map, s),) * 2, moved, metrics=Metrics(), reconstructed_from=[])
    posed_only = species_version(repo, sp, (true_map,) * 2, moved, metrics=Metrics(), reconstructed_from=[])
    same = compare_with_truth(repo, replace(truth, species={name: shifted}), truth)
    assert same["position_rms_angstrom"] < 0.01
    assert min(same["species"][name]["fsc_vs_truth"][1:]) > 0.99
    assert abs(same["species"][name]["frame_offset_angstrom"] - float(s.norm()) * px) < 0.05 * px
    wrong = compare_with_truth(repo, replace(truth, species={name: posed_only}), truth)
    assert wrong["position_rms_angstrom"] > 0.5 * float(s.norm()) * px


def test_a_symmetric_species_frame_moves_only_along_its_axes():
    """A symmetrised reconstruction is centred on the box's axes: a Cn map may slide along its axis (z), a Dn map
    not at all; an asymmetric one anywhere."""
    s = torch.tensor([0.7, -0.4, 0.9], dtype=torch.float64)
    assert torch.allclose(symmetric_part(s, symmetry_operators("C1")), s)
    assert torch.allclose(symmetric_part(s, symmetry_operators("C7")), torch.tensor([0, 0, 0.9], dtype=torch.float64),
                          atol=1e-6)
    for group in ("D7", "T", "O", "I"):
        assert symmetric_part(s, symmetry_operators(group)).abs().max() < 1e-6
