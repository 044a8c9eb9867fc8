"""CTF against torch-ctf, literature constants, analytic zeros; M's aliasing rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_ctf import calculate_ctf_2d

from cryopool.engine.ctf import (aliasing_free_box, band_limited_ctf2, ctf_2d, delocalisation_angstrom,
                                 electron_wavelength_angstrom, premultiply_and_crop, reconstruction_box)
from cryopool.engine.fourier import rfft_frequencies_2d


def test_wavelength_literature_value():
    assert electron_wavelength_angstrom(300) == pytest.approx(0.019687, abs=2e-6)  # 1.969 pm (De Graef 2003)
    assert electron_wavelength_angstrom(200) == pytest.approx(0.025079, abs=2e-6)


@pytest.mark.parametrize("u,v,angle,phase", [(15000, 15000, 0, 0), (20000, 16000, 0, 0), (20000, 16000, 35, 0),
                                             (8000, 7000, -70, 90)])
def test_matches_torch_ctf(u, v, angle, phase):
    ours = ctf_2d(torch.tensor(float(u)), torch.tensor(float(v)), torch.tensor(float(angle)), voltage_kv=300,
                  spherical_aberration_mm=2.7, amplitude_contrast=0.07, pixel_size_angstrom=1.5, size=128,
                  phase_shift_deg=phase)
    # torch-ctf: defocus/astigmatism in µm as mean and half-difference; its angle 0 puts the larger
    # defocus along x (measured), the same as our angle 0 -> no offset
    theirs = calculate_ctf_2d(defocus=(u + v) / 2e4, astigmatism=(u - v) / 2e4, astigmatism_angle=float(angle),
                              voltage=300.0, spherical_aberration=2.7, amplitude_contrast=0.07,
                              phase_shift=float(phase), pixel_size=1.5, image_shape=(128, 128), rfft=True,
                              fftshift=False)
    np.testing.assert_allclose(ours.numpy(), theirs.squeeze().numpy(), atol=2e-4)


def test_defocus_u_lies_along_the_angle():
    c = ctf_2d(torch.tensor(30000.0), torch.tensor(10000.0), torch.tensor(0.0), voltage_kv=300,
               spherical_aberration_mm=0.0, amplitude_contrast=0.0, pixel_size_angstrom=2.0, size=256)
    # more defocus -> faster oscillation: along x (U) the first zero comes earlier than along y (V)
    along_x, along_y = c[0, :], c[:128, 0]

    def first_zero(prof):
        return int(np.argmax(np.sign(prof.numpy()[1:]) != np.sign(prof.numpy()[1])))
    assert first_zero(along_x) < first_zero(along_y)


def test_zeros_at_analytic_frequencies():
    lam, df = electron_wavelength_angstrom(300), 20000.0
    pixel, size = 1.0, 512
    c = ctf_2d(torch.tensor(df, dtype=torch.float64), torch.tensor(df, dtype=torch.float64),
               torch.tensor(0.0, dtype=torch.float64), voltage_kv=300, spherical_aberration_mm=0.0,
               amplitude_contrast=0.0, pixel_size_angstrom=pixel, size=size)
    assert c[0, 0] == pytest.approx(0.0, abs=1e-12)
    for n in (1, 2, 5):
        k = math.sqrt(n / (lam * df))  # sin(pi lam df k^2) = 0
        idx = k * pixel * size
        lo, hi = c[0, int(math.floor(idx))].item(), c[0, int(math.ceil(idx))].item()
        assert lo * hi <= 0  # a sign change brackets the zero
    c0 = ctf_2d(torch.tensor(df), torch.tensor(df), torch.tensor(0.0), voltage_kv=300, spherical_aberration_mm=2.7,
                amplitude_contrast=0.1, pixel_size_angstrom=pixel, size=size)
    assert c0[0, 0].item() == pytest.approx(0.1, abs=1e-6)  # CTF(0) = amplitude contrast


def test_gradients_in_defocus():
    d = torch.tensor([15000.0, 25000.0], requires_grad=True)
    ctf_2d(d, d, torch.zeros(2), voltage_kv=300, spherical_aberration_mm=2.7, amplitude_contrast=0.07,
           pixel_size_angstrom=2.0, size=32).pow(2).sum().backward()
    assert torch.isfinite(d.grad).all() and (d.grad != 0).all()


@pytest.mark.parametrize("defocus,res,pixel", [(40000, 4.0, 1.0), (20000, 8.0, 2.0), (5000, 3.0, 0.8)])
def test_aliasing_free_box_is_minimal(defocus, res, pixel):
    box = aliasing_free_box(defocus, res, pixel, voltage_kv=300, spherical_aberration_mm=2.7)
    assert box % 2 == 0

    def max_step_on_diagonal(n):  # phase change between neighbouring diagonal samples, brute force
        lam, cs = electron_wavelength_angstrom(300), 2.7e7
        k = np.arange(0, n // 2 + 1) * math.sqrt(2) / (n * pixel)
        k = k[k <= 1 / res + 1e-12]
        gamma = math.pi * lam * defocus * k**2 - 0.5 * math.pi * cs * lam**3 * k**4
        return np.abs(np.diff(gamma)).max()

    assert max_step_on_diagonal(box) <= math.pi * 1.01
    assert max_step_on_diagonal(int(0.8 * box) // 2 * 2) > math.pi  # not much larger than needed


def test_band_limited_ctf2_averages_to_one_half_without_aliasing():
    big, small = 256, 64
    ctf = ctf_2d(torch.tensor(30000.0), torch.tensor(30000.0), torch.tensor(0.0), voltage_kv=300,
                 spherical_aberration_mm=2.7, amplitude_contrast=0.07, pixel_size_angstrom=2.0, size=big)
    c2 = band_limited_ctf2(ctf, small)
    ky, kx = rfft_frequencies_2d(small, 2.0)
    ring = (torch.sqrt(kx**2 + ky**2) > 0.15) & (torch.sqrt(kx**2 + ky**2) < 0.24)
    assert c2[ring].mean().item() == pytest.approx(0.5, abs=0.05)  # aliasing-free average of sin²
    naive = ctf_2d(torch.tensor(30000.0), torch.tensor(30000.0), torch.tensor(0.0), voltage_kv=300,
                   spherical_aberration_mm=2.7, amplitude_contrast=0.07, pixel_size_angstrom=2.0, size=small) ** 2
    assert abs(naive[ring].mean().item() - 0.5) > abs(c2[ring].mean().item() - 0.5)  # naive CTF² aliases


def test_premultiplied_extraction_is_a_circular_convolution_then_a_central_box():
    """Independent of FFT conventions: the filter's kernel by an explicit DFT sum, the convolution summed
    directly at each pixel of the box around the origin (boxes carry their centre at pixel 0, as extraction
    leaves them), against premultiply_and_crop's box brought back to real space."""
    n, small, pixel, lam, df, amp = 48, 12, 2.0, electron_wavelength_angstrom(300), 20000.0, 0.07
    f = np.fft.fftfreq(n, d=pixel)  # frequencies of the full DFT grid, 1/Å
    k2 = f[:, None] ** 2 + f[None, :] ** 2
    h = np.sin(np.pi * lam * df * k2 - 0.5 * np.pi * 2.7e7 * lam**3 * k2**2 + math.atan(amp / math.sqrt(1 - amp**2)))
    m = np.arange(n)
    dft = np.exp(2j * np.pi * np.outer(m, m) / n)
    kernel = (dft @ h @ dft.T).real / n**2  # inverse DFT, summed
    img = np.random.default_rng(3).normal(size=(n, n))
    expect = np.empty((small, small))
    for i in range(small):
        for j in range(small):
            y, x = i - small // 2, j - small // 2  # box pixel (i, j) ↔ image pixel (y, x) mod n
            expect[i, j] = (img * kernel[(y - m)[:, None] % n, (x - m)[None, :] % n]).sum()
    out = premultiply_and_crop(torch.fft.rfft2(torch.from_numpy(img)), torch.from_numpy(h[:, :n // 2 + 1]), small)
    box = torch.fft.fftshift(torch.fft.irfft2(out, s=(small, small))).numpy()
    np.testing.assert_allclose(box, expect, atol=1e-10)


@pytest.mark.parametrize("defocus,res,pixel", [(50000, 10.0, 5.0), (30000, 4.0, 2.0)])
def test_delocalisation_is_where_the_point_spread_function_ends(defocus, res, pixel):
    """A point filtered by the band-limited CTF, in a box far larger than its image: its energy lies within the
    predicted radius and reaches close to it (brute force, not the formula)."""
    n = 512
    ctf = ctf_2d(torch.tensor(float(defocus)), torch.tensor(float(defocus)), torch.tensor(0.0), voltage_kv=300,
                 spherical_aberration_mm=2.7, amplitude_contrast=0.07, pixel_size_angstrom=pixel, size=n).double()
    ky, kx = rfft_frequencies_2d(n, pixel, dtype=torch.float64)
    band = torch.sqrt(kx**2 + ky**2) <= 1 / res
    ctf = ctf - 0.07 * (ky == 0) * (kx == 0)  # drop CTF(0) = A: a constant over the box, not a spread
    psf = torch.fft.fftshift(torch.fft.irfft2(ctf * band, s=(n, n))) ** 2
    g = (torch.arange(n, dtype=torch.float64) - n // 2) * pixel
    r = torch.sqrt(g[:, None] ** 2 + g[None] ** 2)
    spread = delocalisation_angstrom(defocus, res, voltage_kv=300, spherical_aberration_mm=2.7)
    assert psf[r > spread + 3 * res].sum() / psf.sum() < 0.03  # what is left: the band edge's ringing
    assert psf[r > 0.8 * spread].sum() / psf.sum() > 0.2
    box = reconstruction_box(100.0, defocus, res, pixel, voltage_kv=300, spherical_aberration_mm=2.7)
    assert box % 2 == 0 and (box - 2) * pixel < 100.0 + 2 * spread <= box * pixel
