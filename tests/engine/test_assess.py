"""The truth comparisons' gauge-free measures, on perturbations whose size is known by construction."""

from __future__ import annotations

from dataclasses import replace

import torch

from cryopool.engine.assess import _centre_displacement_error, _rotation_angle_deg
from cryopool.engine.geometry import rotation_z, rotvec_to_matrix
from cryopool.engine.tilt_model import TiltGeometry


def _geometry(t: int = 41) -> TiltGeometry:
    g = torch.Generator().manual_seed(0)
    return TiltGeometry(torch.linspace(-60, 60, t, dtype=torch.float64), 85.0,
                        torch.randn(t, 2, generator=g, dtype=torch.float64) * 10,
                        torch.randn(t, 3, generator=g, dtype=torch.float64) * 0.2, (512, 512), (3072.0, 3072.0, 900.0),
                        6.0, torch.linspace(0, 1, t, dtype=torch.float64))


def test_rotation_angle_is_the_angle_of_the_relative_rotation():
    a = rotvec_to_matrix(torch.randn(5, 3, dtype=torch.float64) * 40)
    turn = rotation_z(torch.full((5,), 2.5, dtype=torch.float64))
    assert torch.allclose(_rotation_angle_deg(turn @ a, a), torch.full((5,), 2.5, dtype=torch.float64), atol=1e-6)
    assert _rotation_angle_deg(a, a).abs().max() < 1e-4


def test_shift_error_ignores_a_specimen_translation_and_sees_per_tilt_errors():
    truth = _geometry()
    t = torch.tensor([30.0, -12.0, 50.0], dtype=torch.float64)
    gauge = replace(truth, shifts_angstrom=truth.shifts_angstrom + (truth.rotations() @ t)[:, :2])
    assert _centre_displacement_error(gauge, truth).abs().max() < 1e-9
    noise = torch.randn(41, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3.0
    moved = replace(truth, shifts_angstrom=truth.shifts_angstrom + noise)
    rms = float(_centre_displacement_error(moved, truth).pow(2).sum(-1).mean().sqrt())
    expected = float(noise.pow(2).sum(-1).mean().sqrt())
    assert 0.9 * expected < rms <= expected  # 3 of 82 degrees of freedom go to the translation
