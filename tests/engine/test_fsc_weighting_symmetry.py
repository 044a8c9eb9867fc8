"""FSC against torch-fourier-shell-correlation and analytic cases; weighting; symmetry groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_fourier_shell_correlation import fourier_shell_correlation

from cryopool.engine.fourier import rfft_frequencies_2d
from cryopool.engine.fsc import fsc, masked_fsc, resolution_at, spectral_snr
from cryopool.engine.regularise import filtered_map, low_pass, low_pass_edge
from cryopool.engine.symmetry import symmetry_operators
from cryopool.engine.weighting import (anisotropic_bfactor_weights, dose_tilt_weights, exposure_crop_frequency)


def _lowpass(x, shells):
    d = x.shape[-1]
    f = torch.fft.fftfreq(d) * d
    fr = torch.fft.rfftfreq(d) * d
    kz, ky, kx = torch.meshgrid(f, f, fr, indexing="ij")
    return torch.fft.irfftn(torch.fft.rfftn(x) * (torch.sqrt(kz**2 + ky**2 + kx**2) <= shells), s=x.shape)


def test_fsc_matches_torch_fourier_shell_correlation():
    torch.manual_seed(0)
    s = _lowpass(torch.randn(32, 32, 32, dtype=torch.float64), 12)
    a, b = s + 0.3 * torch.randn_like(s), s + 0.3 * torch.randn_like(s)
    ours = fsc(a, b)
    theirs = fourier_shell_correlation(a, b)
    n = min(len(ours), len(theirs))
    # shell binning differs at the edges of bins; the curves agree closely
    assert np.abs(ours[1:n - 1].numpy() - theirs[1:n - 1].numpy()).max() < 0.05


def test_fsc_analytic_cases():
    torch.manual_seed(1)
    a = torch.randn(24, 24, 24, dtype=torch.float64)
    assert torch.allclose(fsc(a, a), torch.ones(13, dtype=torch.float64))
    assert torch.allclose(fsc(a, -a), -torch.ones(13, dtype=torch.float64))
    b = torch.randn_like(a)
    c = fsc(a, b)
    assert c[3:].abs().max() < 0.25  # independent noise: |FSC| ~ 1/sqrt(n voxels in shell)


def test_resolution_and_ssnr():
    curve = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0, -0.05, 0.0])  # d = 16
    assert resolution_at(curve, 2.0, 0.5) == pytest.approx(16 * 2.0 / 3.0)
    r = resolution_at(curve, 2.0, 0.143)
    assert 16 * 2.0 / 5.0 < r < 16 * 2.0 / 4.0  # between shells 4 and 5
    assert resolution_at(torch.ones(9), 2.0) == 4.0  # never drops: Nyquist
    assert spectral_snr(torch.tensor([0.5]))[0] == pytest.approx(2.0)


def test_masked_fsc_correction_removes_mask_induced_correlation():
    torch.manual_seed(2)
    d = 32
    signal = _lowpass(torch.randn(d, d, d, dtype=torch.float64), 5) * 5
    a, b = signal + torch.randn(d, d, d, dtype=torch.float64), signal + torch.randn(d, d, d, dtype=torch.float64)
    g = torch.arange(d, dtype=torch.float64) - d // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    mask = ((x**2 + y**2 + z**2) < 8**2).double()  # sharp mask: convolution spreads correlation outwards
    out = masked_fsc(a, b, mask)
    beyond = slice(7, 10)  # just beyond the signal (shell 5): the truth is FSC = 0
    assert out["masked"][beyond].mean() > 0.1  # the sharp mask spreads correlation outwards
    assert out["corrected"][beyond].mean().abs() < out["masked"][beyond].mean() / 2


def test_dose_weights_analytic():
    pre = torch.tensor([0.0, 10.0], dtype=torch.float64)
    exposure = torch.tensor([2.0, 2.0], dtype=torch.float64)
    tilts = torch.tensor([0.0, 60.0], dtype=torch.float64)
    w = dose_tilt_weights(pre, exposure, tilts, size=64, pixel_size_angstrom=2.0)
    assert w[0, 0, 0] == pytest.approx(1.0) and w[1, 0, 0] == pytest.approx(0.5)  # cos 60°
    ky, kx = rfft_frequencies_2d(64, 2.0, dtype=torch.float64)
    k2 = kx[0, 10] ** 2
    assert w[1, 0, 10].item() == pytest.approx(0.5 * math.exp(-4 * 11.0 * k2 / 4))  # B = 4 * (10 + 1)
    f = exposure_crop_frequency(11.0)
    assert math.exp(-4 * 11.0 * f**2 / 4) == pytest.approx(0.25)
    iso = anisotropic_bfactor_weights(torch.tensor([40.0]), torch.tensor([40.0]), torch.tensor([30.0]),
                                      torch.tensor([1.0]), size=32, pixel_size_angstrom=2.0)
    ky, kx = rfft_frequencies_2d(32, 2.0)
    assert torch.allclose(iso[0], torch.exp(-40 * (kx**2 + ky**2) / 4), atol=1e-6)


@pytest.mark.parametrize("sym,order", [("C1", 1), ("C4", 4), ("D3", 6), ("T", 12), ("O", 24), ("I", 60), ("D7", 14)])
def test_symmetry_groups(sym, order):
    ops = symmetry_operators(sym, dtype=torch.float64)
    assert ops.shape == (order, 3, 3)
    assert torch.allclose(ops[0], torch.eye(3, dtype=torch.float64))
    # closure: every product is in the group
    prods = (ops[:, None] @ ops[None]).reshape(-1, 9)
    dist = torch.cdist(prods, ops.reshape(-1, 9))
    assert dist.min(dim=1).values.max() < 1e-6


def test_cn_axis_along_z_and_dn_twofold_along_x():
    c4 = symmetry_operators("C4", dtype=torch.float64)
    assert torch.allclose(c4 @ torch.tensor([0, 0, 1.0], dtype=torch.float64), torch.tensor([0, 0, 1.0],
                                                                                          dtype=torch.float64))
    d2 = symmetry_operators("D2", dtype=torch.float64)
    flip_x = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    assert (d2 - flip_x).abs().sum(dim=(-2, -1)).min() < 1e-9
    with pytest.raises(ValueError):
        symmetry_operators("Q3")


def test_filtered_map_is_closer_to_the_truth_than_the_plain_average():
    """Two half-maps = a smooth truth + independent noise: the FSC-weighted, low-passed average recovers more of it."""
    g = torch.Generator().manual_seed(5)
    d = 48
    x = torch.arange(d, dtype=torch.float32) - d / 2
    r2 = x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2
    truth = torch.exp(-r2 / 60) + 0.6 * torch.exp(-((x[:, None, None] - 6) ** 2 + x[None, :, None] ** 2
                                                     + (x[None, None, :] + 5) ** 2) / 15)
    halves = [truth + 0.3 * torch.randn(truth.shape, generator=g) for _ in range(2)]
    mask = (r2 < (d / 2 - 4) ** 2).float()
    average = (halves[0] + halves[1]) / 2
    for m in (None, mask):
        out = filtered_map(halves[0], halves[1], 2.0, m)
        assert ((out - truth) ** 2).mean() < 0.2 * ((average - truth) ** 2).mean()
        # beyond the resolution nothing is left (the noise there is not signal)
        spectrum = torch.fft.rfftn(out).abs()
        shells = torch.sqrt(sum(k ** 2 for k in torch.meshgrid(torch.fft.fftfreq(d), torch.fft.fftfreq(d),
                                                                 torch.fft.rfftfreq(d), indexing="ij"))) * d
        assert spectrum[shells > d / 2 - 1].abs().max() < 1e-3 * spectrum.max()


def test_a_projection_of_the_low_passed_map_is_the_projection_low_passed_in_2d():
    """The CTF fit filters its data in 2D with ``low_pass_edge``; its reference is ``low_pass`` of the half-map.
    Fourier slice theorem (the z-sum's 2D transform is the kz = 0 slice): both must agree exactly."""
    rng = np.random.default_rng(0)
    d, px, res = 24, 5.0, 14.0
    half_map = rng.normal(size=(d, d, d))
    projected = np.fft.rfft2(low_pass(torch.tensor(half_map), pixel_size_angstrom=px, resolution_angstrom=res)
                             .numpy().sum(axis=0))
    ky, kx = np.meshgrid(np.fft.fftfreq(d) * d, np.fft.rfftfreq(d) * d, indexing="ij")
    edge = low_pass_edge(torch.tensor(np.sqrt(ky**2 + kx**2)), d, px, res).numpy()
    assert 0 < edge.mean() < 1  # the edge falls inside the box
    np.testing.assert_allclose(projected, np.fft.rfft2(half_map.sum(axis=0)) * edge, atol=1e-9)
