"""B-spline grids against torch-cubic-spline-grids; sub-pixel extraction against analytic spots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_cubic_spline_grids import CubicBSplineGrid1d, CubicBSplineGrid2d, CubicBSplineGrid3d

from cryopool.engine.extraction import angstrom_to_pixel, extract_boxes
from cryopool.engine.splines import interpolate_bspline_grid


@pytest.mark.parametrize("cls,shape", [(CubicBSplineGrid1d, (5,)), (CubicBSplineGrid2d, (3, 4)),
                                       (CubicBSplineGrid3d, (2, 3, 5)), (CubicBSplineGrid2d, (1, 4))])
def test_matches_torch_cubic_spline_grids(cls, shape):
    torch.manual_seed(0)
    ref = cls(resolution=shape, n_channels=2)
    ref.data = torch.randn(2, *shape)
    u = torch.rand(50, len(shape))
    u[:3] = torch.tensor([[0.0] * len(shape), [1.0] * len(shape), [0.5] * len(shape)])
    theirs = ref(u).detach()
    ours = interpolate_bspline_grid(ref.data.detach(), u)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)


def test_linear_functions_are_reproduced_and_gradients_flow():
    # a grid sampled from a linear function reproduces it exactly (B-splines with linear end extension)
    n = 6
    values = torch.linspace(-1, 2, n)[None]
    u = torch.linspace(0, 1, 37)[:, None]
    np.testing.assert_allclose(interpolate_bspline_grid(values, u)[:, 0].numpy(), (-1 + 3 * u[:, 0]).numpy(),
                               atol=1e-5)
    grid = torch.zeros(1, 3, 3, requires_grad=True)
    interpolate_bspline_grid(grid, torch.tensor([[0.3, 0.7]])).sum().backward()
    assert grid.grad.sum().item() == pytest.approx(1.0)  # partition of unity


def _spot(h, w, cx, cy, sigma=1.5):
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def test_subpixel_extraction_centres_the_particle():
    img = _spot(64, 80, 30.3, 40.7) + _spot(64, 80, 60.0, 10.5)
    pos = torch.tensor([[[30.3, 40.7]], [[60.0, 10.5]]], dtype=torch.float64)  # (n=2, t=1, 2)
    boxes = torch.fft.fftshift(torch.fft.irfft2(extract_boxes(img[None], pos, 16), s=(16, 16)), dim=(-2, -1))
    expect = _spot(16, 16, 8, 8)
    for b in boxes[:, 0]:
        assert (b - expect).abs().max() < 0.02


def test_extraction_outside_the_image_is_zero_and_gradient_is_finite():
    ones = torch.ones(1, 32, 32, dtype=torch.float64)
    corner = torch.tensor([[[1.0, 30.0]]], dtype=torch.float64)  # whole pixels: no phase ramp, values exact
    box = torch.fft.fftshift(torch.fft.irfft2(extract_boxes(ones, corner, 12), s=(12, 12)), dim=(-2, -1))[0, 0]
    x = 1 + torch.arange(12) - 6  # image columns the box covers: -5..6
    y = 30 + torch.arange(12) - 6  # rows 24..35
    inside = ((y >= 0) & (y < 32))[:, None] & ((x >= 0) & (x < 32))[None, :]
    np.testing.assert_allclose(box[~inside].numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(box[inside].numpy(), 1.0, atol=1e-12)
    assert (~inside).sum() == 12 * 12 - 7 * 8  # 7 columns and 8 rows of the box fall inside
    img = _spot(32, 32, 16, 16)
    pos = torch.tensor([[[1.2, 30.6]]], dtype=torch.float64, requires_grad=True)
    boxes = extract_boxes(img[None], pos, 12)
    real = torch.fft.irfft2(boxes, s=(12, 12))
    real.sum().backward()
    assert torch.isfinite(pos.grad).all()
    # finite-difference check of d(box)/d(position) through the phase ramp
    target = torch.fft.irfft2(extract_boxes(_spot(32, 32, 20.0, 15.0)[None],
                                            torch.tensor([[[20.0, 15.0]]], dtype=torch.float64), 12), s=(12, 12))
    def loss(p):
        b = torch.fft.irfft2(extract_boxes(_spot(32, 32, 20.0, 15.0)[None], p, 12), s=(12, 12))
        return ((b - target) ** 2).sum()
    p = torch.tensor([[[20.2, 15.1]]], dtype=torch.float64, requires_grad=True)
    loss(p).backward()
    eps = 1e-5
    for k in range(2):
        dp = torch.zeros_like(p)
        dp[..., k] = eps
        fd = (loss(p.detach() + dp) - loss(p.detach() - dp)) / (2 * eps)
        assert p.grad[..., k].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-8)


def test_angstrom_to_pixel():
    px = angstrom_to_pixel(torch.tensor([[0.0, 0.0], [10.0, -5.0]]), 2.5, (64, 80))
    np.testing.assert_allclose(px.numpy(), [[40.0, 32.0], [44.0, 30.0]])
    assert math.isclose(float(px[0, 0]), 40.0)
