"""The physics runs unchanged on every available device and gives the same numbers as on the CPU."""

from __future__ import annotations

import pytest
import torch

from cryopool.engine.ctf import ctf_2d
from cryopool.engine.geometry import euler_zyz_to_matrix
from cryopool.engine.projection import FourierAccumulator, extract_slices, prepare_volume
from cryopool.engine.splines import interpolate_bspline_grid

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_projection_ctf_splines_on_device(device):
    torch.manual_seed(0)
    vol = torch.randn(24, 24, 24)
    rot = euler_zyz_to_matrix(torch.tensor([[10.0, 40.0, -30.0], [100.0, 90.0, 5.0]]))
    ref = extract_slices(prepare_volume(vol), rot)
    out = extract_slices(prepare_volume(vol.to(device)), rot.to(device))
    assert device in str(out.device)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-3)
    acc = FourierAccumulator(24, device=device)
    acc.insert(out, torch.ones(out.shape, device=device), rot.to(device))
    assert device in str(acc.finalise().device)
    c = ctf_2d(torch.tensor([2e4], device=device), torch.tensor([1.8e4], device=device),
               torch.tensor([30.0], device=device), voltage_kv=300, spherical_aberration_mm=2.7,
               amplitude_contrast=0.07, pixel_size_angstrom=2.0, size=32)
    assert device in str(c.device)
    g = interpolate_bspline_grid(torch.randn(2, 3, 4, device=device), torch.rand(5, 2, device=device))
    assert device in str(g.device)
