"""Projection and back-projection: an analytic Gaussian, torch-fourier-slice, adjointness, round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_fourier_slice import project_3d_to_2d

from cryopool.engine.geometry import euler_zyz_to_matrix
from cryopool.engine.grids import trilinear_sample
from cryopool.engine.projection import (FourierAccumulator, crop_transform, extract_points, extract_slices,
                                       gridding_correction, insert_slices, prepare_volume)

D = 32


def _gaussian_volume(center_xyz, sigma, d=D, dtype=torch.float64):
    g = torch.arange(d, dtype=dtype) - d // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    cx, cy, cz = center_xyz
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))


def _random_rotations(n, seed=0, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    angles = np.stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                       rng.uniform(-180, 180, n)], 1)
    return euler_zyz_to_matrix(torch.tensor(angles, dtype=dtype))


def test_gaussian_blob_projects_to_its_rotated_position():
    """A map point r appears at (A r)_xy: an off-centre Gaussian lands where the geometry says."""
    sigma, r0 = 2.0, torch.tensor([5.0, -3.0, 4.0], dtype=torch.float64)
    vt = prepare_volume(_gaussian_volume(r0.tolist(), sigma))
    rotations = _random_rotations(6)
    images = torch.fft.irfft2(extract_slices(vt, rotations), s=(D, D))
    g = torch.arange(D, dtype=torch.float64) - D // 2
    y, x = torch.meshgrid(g, g, indexing="ij")
    for a, img in zip(rotations, images):
        cx, cy, _ = (a @ r0).tolist()
        expect = sigma * math.sqrt(2 * math.pi) * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        # the image is the DFT-periodic projection, centred on pixel D // 2
        img = torch.fft.fftshift(img)
        assert (img - expect).abs().max() < 0.02 * expect.max()


def test_matches_torch_fourier_slice():
    rng = np.random.default_rng(5)
    vol = sum(_gaussian_volume(rng.uniform(-8, 8, 3).tolist(), rng.uniform(1.0, 2.5)) for _ in range(12)).float()
    rotations = _random_rotations(5, seed=1, dtype=torch.float32)
    ours = torch.fft.fftshift(torch.fft.irfft2(extract_slices(prepare_volume(vol), rotations), s=(D, D)),
                              dim=(-2, -1))
    theirs = project_3d_to_2d(vol, rotations.transpose(-1, -2), pad_factor=2.0)
    corr = torch.nn.functional.cosine_similarity(ours.flatten(1), theirs.flatten(1), dim=1)
    assert corr.min() > 0.995
    assert (ours.std(dim=(-2, -1)) / theirs.std(dim=(-2, -1)) - 1).abs().max() < 0.02


def test_insertion_is_the_adjoint_of_extraction():
    torch.manual_seed(0)
    vt = prepare_volume(torch.randn(16, 16, 16, dtype=torch.float64))
    x = torch.randn_like(vt.ft)  # any complex grid
    x_vt = type(vt)(values=torch.view_as_real(x).contiguous(), box=vt.box, pad=vt.pad)
    rotations = _random_rotations(4, seed=2)
    y = torch.randn(4, 16, 9, dtype=torch.complex128)
    px = extract_slices(x_vt, rotations)
    pty = torch.zeros_like(x)
    insert_slices(pty, None, y, None, rotations, pad=2)
    lhs = torch.sum(px.conj() * y).real
    rhs = torch.sum(x.conj() * pty).real
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-10)


def test_project_then_reconstruct_round_trip():
    vol = _gaussian_volume([3.0, 0.0, -2.0], 1.5) + 0.5 * _gaussian_volume([-4.0, 2.0, 3.0], 2.5)
    vol = vol.float()
    rotations = _random_rotations(1500, seed=3, dtype=torch.float32)
    slices = extract_slices(prepare_volume(vol), rotations)
    acc = FourierAccumulator(D)
    acc.insert(slices, torch.ones(slices.shape, dtype=torch.float32), rotations)
    rec = acc.finalise(1e-4)
    err = (rec - vol).norm() / vol.norm()
    assert err < 0.05


def test_symmetry_operators_multiply_the_views():
    vol = _gaussian_volume([4.0, 0.0, 0.0], 1.5).float()
    rotations = _random_rotations(300, seed=4, dtype=torch.float32)
    slices = extract_slices(prepare_volume(vol), rotations)
    c2 = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1]], [[-1.0, 0, 0], [0, -1, 0], [0, 0, 1]]])
    acc = FourierAccumulator(D)
    acc.insert(slices, torch.ones(slices.shape), rotations, symmetry=c2)
    rec = acc.finalise(1e-3)
    # C2 about z puts the average of the blob and its copy at (-4, 0, 0)
    expect = 0.5 * (vol + _gaussian_volume([-4.0, 0.0, 0.0], 1.5).float())
    assert torch.nn.functional.cosine_similarity(rec.flatten(), expect.flatten(), dim=0) > 0.98


def test_gradient_with_respect_to_orientation():
    vol = _gaussian_volume([5.0, 0.0, 0.0], 2.0).float()
    vt = prepare_volume(vol)
    angles = torch.tensor([[10.0, 30.0, 20.0]], requires_grad=True)
    target = extract_slices(vt, euler_zyz_to_matrix(torch.tensor([[12.0, 30.0, 20.0]]))).detach()
    loss = (extract_slices(vt, euler_zyz_to_matrix(angles)) - target).abs().pow(2).sum()
    loss.backward()
    assert angles.grad[0, 0] < 0  # moving rot towards 12° reduces the loss


def test_trilinear_sampling_equals_grid_sample_with_both_gradients():
    """``grids.trilinear_sample`` against torch's ``grid_sample`` (zeros padding, aligned corners), values and the
    gradients in the coordinates and in the grid, points inside, on the edges and outside."""
    torch.manual_seed(0)
    D = 9
    values = torch.randn(D, D, D, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.cat([torch.rand(200, 3, dtype=torch.float64) * (D - 1),  # inside
                     torch.rand(20, 3, dtype=torch.float64) * (D + 4) - 2])  # some outside
    idx[:3, 0] = torch.tensor([0.0, D - 1.0, D - 1.0]) + torch.tensor([0.3, -0.2, -1e-9])  # near the edges
    idx.requires_grad_(True)
    weights = torch.randn(len(idx), 2, dtype=torch.float64)
    ours = trilinear_sample(values, idx)
    grad_ours = torch.autograd.grad((ours * weights).sum(), (values, idx))
    grid = idx / (D - 1) * 2 - 1
    theirs = torch.nn.functional.grid_sample(values.permute(3, 0, 1, 2)[None], grid[None, :, None, None],
                                             mode="bilinear", padding_mode="zeros", align_corners=True)[0, :, :, 0, 0].T
    grad_theirs = torch.autograd.grad((theirs * weights).sum(), (values, idx))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_ours[0], grad_theirs[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_ours[1], grad_theirs[1], rtol=0, atol=1e-10)


def test_a_band_cropped_transform_samples_like_the_whole_one_and_crops_to_itself():
    """The refine plan keeps only the band of each reference's transform (``crop_transform``); the alignment
    target crops it again to the same band. Inside the band the slices equal the whole transform's; cropping a
    cropped transform to its own band changes nothing (so the plan's crop cannot change a refinement)."""
    torch.manual_seed(3)
    vt = prepare_volume(torch.randn(32, 32, 32, dtype=torch.float64))
    radius = 32 * 6.0 / 20.0 + 1  # box · pixel / resolution + 1, as refine and the alignment target compute it
    band = crop_transform(vt, radius)
    assert band.values.shape[0] < vt.values.shape[0]
    again = crop_transform(band, radius)
    assert torch.equal(again.values, band.values)
    k = torch.stack(torch.meshgrid(torch.arange(-9.0, 10.0), torch.arange(-9.0, 10.0), indexing="ij"), -1)
    k = k[(k ** 2).sum(-1).sqrt() < radius - 1].reshape(-1, 2)
    rot = torch.eye(3, dtype=torch.float64)[None, None]
    k = k.to(torch.float64)
    torch.testing.assert_close(extract_points(band, rot, k), extract_points(vt, rot, k))


def test_a_band_reaching_nyquist_gets_a_margin_of_zeros_and_samples_like_the_whole_transform():
    """At Nyquist the band's interpolation neighbours lie beyond the padded grid: the cropped transform grows a
    margin of zeros instead (what trilinear sampling's zeros padding reads there), so every corner is on the grid.
    Slices through the band's edge, at random orientations, equal the whole transform's."""
    torch.manual_seed(4)
    vt = prepare_volume(torch.randn(32, 32, 32, dtype=torch.float64))
    radius = 32 / 2 + 1  # a 2-pixel resolution: the band reaches Nyquist
    band = crop_transform(vt, radius)
    m = (band.values.shape[0] - vt.values.shape[0]) // 2
    assert m > 0 and band.values.shape[0] % 2 == vt.values.shape[0] % 2
    inner = band.values[m:-m, m:-m, m:-m]
    margin = torch.ones(band.values.shape, dtype=torch.bool)
    margin[m:-m, m:-m, m:-m] = False
    assert torch.equal(inner, vt.values) and not band.values[margin].any()
    angle = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
    k = 16.0 * torch.stack([torch.cos(angle), torch.sin(angle)], -1)  # on the Nyquist circle
    rot = _random_rotations(5, seed=2)
    torch.testing.assert_close(extract_points(band, rot, k), extract_points(vt, rot, k))
    idx = (torch.einsum("nji,kj->nki", rot, torch.cat([k, torch.zeros_like(k[:, :1])], -1)) * band.pad
           + band.values.shape[0] // 2)
    assert idx.min() >= 0 and idx.max() < band.values.shape[0] - 1  # every corner on the grid


def test_finalising_on_the_half_grid_equals_the_whole_grid_formula():
    """``finalise`` forms only the Hermitian half of the symmetrised grid and inverts it with irfftn (half-grid
    temporaries); written out here on the whole grid: g(k) + g(−k) with g(−k) at index (D − i) mod D on each
    axis, Wiener constant from the mean positive weight, ifftn, real part, centred crop."""
    torch.manual_seed(5)
    vol = torch.randn(D, D, D, dtype=torch.float64)
    rotations = _random_rotations(400, seed=6, dtype=torch.float64)
    slices = extract_slices(prepare_volume(vol), rotations)
    acc = FourierAccumulator(D, dtype=torch.float64)
    acc.insert(slices, torch.rand(slices.shape, dtype=torch.float64), rotations)

    def mirrored(g):
        neg = (-torch.arange(g.shape[0])) % g.shape[0]
        return g[neg][:, neg][:, :, neg]
    data = acc.data + mirrored(acc.data).conj()
    weights = acc.weights + mirrored(acc.weights)
    c = 1e-3 * weights[weights > 0].mean()
    full = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(data / (weights + c)))).real
    n = 2 * D
    expected = full[n // 2 - D // 2:n // 2 + D // 2, n // 2 - D // 2:n // 2 + D // 2, n // 2 - D // 2:n // 2 + D // 2]
    expected = expected / gridding_correction(D, n, dtype=torch.float64)
    torch.testing.assert_close(acc.finalise(1e-3), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype, box", [(torch.float64, 32), (torch.float32, 40)])
def test_a_band_transform_computed_axis_by_axis_equals_the_cropped_whole_one(dtype, box):
    """``prepare_volume(..., radius=)`` never forms the whole padded transform (one axis at a time, cropped after
    each); it must equal the whole transform cropped to the band, with and without gradients."""
    torch.manual_seed(7)
    vol = torch.randn(box, box, box, dtype=dtype)
    radius = box * 6.0 / 18.0 + 1
    expected = crop_transform(prepare_volume(vol), radius).values
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    scale = float(expected.abs().max())
    with torch.no_grad():
        torch.testing.assert_close(prepare_volume(vol, radius=radius).values, expected, rtol=0, atol=tol * scale)
    graded = prepare_volume(vol.clone().requires_grad_(True), radius=radius).values
    torch.testing.assert_close(graded.detach(), expected, rtol=0, atol=tol * scale)
