"""The CTF fit's target (engine/ctf_fit.py): its parts against independent computations, and the fit on
noise-free images, where it must land on the simulator's true defocus and astigmatism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cryopool.engine.ctf import ctf_2d
from cryopool.engine.ctf_fit import circular_mask, comparison_box, mask_images, pad_projections
from cryopool.engine.fourier import crop_center, pad_center, rfft_frequencies_2d
from cryopool.engine.geometry import euler_zyz_to_matrix
from cryopool.engine.phantoms import pseudo_atomic_model, render_map
from cryopool.engine.projection import extract_slices, prepare_volume
from cryopool.engine.refine_item import RefineSettings, SpeciesInput, refine_item_half
from cryopool.engine.simulate import PRESETS, SpeciesSpec, simulate


def _particle(box: int, px: float, seed: int) -> torch.Tensor:
    atoms, weights = pseudo_atomic_model(0.5 * box * px, np.random.default_rng(seed))
    return render_map(atoms, weights, box, px)


def test_padded_projections_are_projections_of_the_padded_map():
    """Zero-padding a projection in real space = projecting the map zero-padded to that box (independent path)."""
    d, big = 24, 40
    volume = _particle(d, 5.0, seed=3)
    rot = euler_zyz_to_matrix(torch.tensor([[10.0, 50.0, -30.0], [0.0, 0.0, 0.0]]))
    ours = pad_projections(extract_slices(prepare_volume(volume), rot), big)
    theirs = extract_slices(prepare_volume(pad_center(volume, big, dims=3)), rot)
    err = (ours - theirs).abs().pow(2).sum() / theirs.abs().pow(2).sum()
    assert err < 1e-3, float(err)


def test_nothing_wraps_into_the_mask_in_the_comparison_box():
    """The model image D·CTF·P in the comparison box matches, inside the mask, the same image in a box twice as
    large (no wrap-around), at the largest defocus the box was made for."""
    px, diameter, defocus, res = 5.0, 100.0, 53000.0, 12.0
    optics = dict(voltage_kv=300.0, spherical_aberration_mm=2.7)
    box, radius = comparison_box(diameter, defocus, res, px, **optics)
    d = int(2 * diameter / px)
    volume = _particle(d, px, seed=5)
    slices = extract_slices(prepare_volume(volume), torch.eye(3)[None])
    images = {}
    for b in (box, 2 * box):
        ctf = ctf_2d(torch.tensor(defocus), torch.tensor(defocus), torch.tensor(0.0), amplitude_contrast=0.07,
                     pixel_size_angstrom=px, size=b, **optics)
        real = torch.fft.fftshift(torch.fft.irfft2(ctf * pad_projections(slices, b), s=(b, b)), dim=(-2, -1))
        images[b] = crop_center(real, box) * circular_mask(box, radius)
    err = (images[box] - images[2 * box]).pow(2).sum() / images[2 * box].pow(2).sum()
    assert err < 1e-3, float(err)
    # and the mask really holds the delocalised image: the model's energy beyond it is small
    ctf = ctf_2d(torch.tensor(defocus), torch.tensor(defocus), torch.tensor(0.0), amplitude_contrast=0.07,
                 pixel_size_angstrom=px, size=2 * box, **optics)
    ky, kx = rfft_frequencies_2d(2 * box, px)
    band = (torch.sqrt(kx**2 + ky**2) <= 1 / res).float()
    full = torch.fft.fftshift(torch.fft.irfft2(band * ctf * pad_projections(slices, 2 * box), s=(2 * box,) * 2))
    inside = mask_images(torch.fft.rfft2(torch.fft.ifftshift(full)), circular_mask(2 * box, radius))
    assert inside.abs().pow(2).sum() / torch.fft.rfft2(torch.fft.ifftshift(full)).abs().pow(2).sum() > 0.95


@pytest.fixture(scope="module")
def isolated():
    """Three 100 Å particles far apart, no noise, 5 Å/px, 5 µm: the data are exactly the model at the truth."""
    cfg = replace(PRESETS["test"], species=[SpeciesSpec("small", 100.0, 3)], items_per_source=1,
                  pixel_size_angstrom=5.0, image_size_px=(192, 192), tilt_step_deg=6.0, snr=1e6, seed=2)
    sim = simulate(cfg)
    it = sim.items[0]
    s = cfg.species[0]
    species = [SpeciesInput(s.name, prepare_volume(sim.maps[s.name]), sim.boxes[s.name], s.diameter_angstrom,
                            it.true_particles[s.name].positions[:, None],
                            it.true_particles[s.name].orientations[:, None])]
    return it, species


def test_noise_free_images_give_the_true_defocus(isolated):
    """Measured: 306 → 6 Å RMS (three 100 Å particles alone: the premultiplied, particle-masked refinement
    target put a similar case 1400 Å off)."""
    it, species = isolated
    state = refine_item_half(it.stack, it.true_geometry, it.initial_imaging, it.pre_exposure, it.exposure, species,
                             RefineSettings(groups=("defocus",), resolution_angstrom=12.0, lbfgs_iterations=20))
    rms = lambda im: float((im.defocus_u_angstrom - it.true_imaging.defocus_u_angstrom).pow(2).mean().sqrt())  # noqa
    assert rms(it.initial_imaging) > 200 and rms(state.imaging) < 15, (rms(it.initial_imaging), rms(state.imaging))


def test_noise_free_images_give_the_true_astigmatism(isolated):
    """Each tilt's astigmatism (U − V) started 150 Å RMS off, the mean defocus right: the fit finds U and V."""
    it, species = isolated
    off = 75.0 * torch.randn(it.true_imaging.defocus_u_angstrom.shape, generator=torch.Generator().manual_seed(0),
                             dtype=it.true_imaging.defocus_u_angstrom.dtype)
    start = replace(it.true_imaging, defocus_u_angstrom=it.true_imaging.defocus_u_angstrom + off,
                    defocus_v_angstrom=it.true_imaging.defocus_v_angstrom - off)
    state = refine_item_half(it.stack, it.true_geometry, start, it.pre_exposure, it.exposure, species,
                             RefineSettings(groups=("astigmatism",), resolution_angstrom=12.0, lbfgs_iterations=30))

    def astig_rms(im):
        diff = (im.defocus_u_angstrom - im.defocus_v_angstrom) - (it.true_imaging.defocus_u_angstrom
                                                                 - it.true_imaging.defocus_v_angstrom)
        return float(diff.pow(2).mean().sqrt())
    assert astig_rms(start) > 100 and astig_rms(state.imaging) < 0.25 * astig_rms(start), \
        (astig_rms(start), astig_rms(state.imaging))
