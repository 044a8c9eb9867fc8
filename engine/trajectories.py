"""Particle pose trajectories over accumulated exposure (M's 1–3 temporal samples per particle).

Particles move under the beam, mostly early in the exposure. A trajectory of
``T`` control points sits at dose times ``τ_j = j / (T − 1)`` on [0, 1] (the
accumulated exposure normalised by the total, as ``TiltGeometry.dose_time``);
a tilt at dose time ``τ`` sees the polynomial through the control points
(Lagrange: constant, linear, quadratic for T = 1, 2, 3; defined with the
format in ``cryopool.repo.trajectory``). It interpolates, so
a control point *is* the pose at its dose time, and going to more control
points reproduces a trajectory exactly (a line is a quadratic): a refinement
can start from any stored number of samples.

Orientations: the rotation at ``τ`` is ``exp(Σ_j w_j(τ) ω_j) · A_0`` with
``ω_j = log(A_j A_0ᵀ)`` the rotation vector of sample ``j`` relative to the
first (small rotations: the beam tilts particles by degrees at most).
Positions are ``(n, T, 3)`` Å, orientations ``(n, T, 3, 3)``.
"""

from __future__ import annotations

import torch

from cryopool.repo import MAX_TEMPORAL_SAMPLES, trajectory_weights

from .geometry import matrix_to_rotvec, rotvec_to_matrix

__all__ = ["MAX_TEMPORAL_SAMPLES", "temporal_weights", "positions_at", "orientations_at", "resample_positions",
           "resample_orientations"]


def temporal_weights(times: torch.Tensor, samples: int) -> torch.Tensor:
    """Weights ``(t, T)`` of ``T`` control points for the dose ``times`` ``(t,)`` (the format's definition)."""
    w = trajectory_weights(times.detach().cpu().double().numpy(), samples)
    return torch.from_numpy(w).to(dtype=times.dtype, device=times.device)


def positions_at(control: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Positions ``(n, T, 3)`` → positions at each dose time ``(n, t, 3)``."""
    if control.shape[1] == 1:  # static: no weights to compute (and no host round trip on the hot path)
        return control.expand(control.shape[0], times.shape[0], control.shape[2])
    w = temporal_weights(times.to(control.dtype), control.shape[-2])
    return torch.einsum("tj,njc->ntc", w, control)


def _relative_rotvecs(control: torch.Tensor) -> torch.Tensor:
    """``ω_j = log(A_j A_0ᵀ)`` in degrees, ``(n, T, 3)``."""
    return matrix_to_rotvec(control @ control[:, :1].transpose(-1, -2))


def orientations_at(control: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Orientations ``(n, T, 3, 3)`` → orientations at each dose time ``(n, t, 3, 3)``."""
    n, samples = control.shape[:2]
    if samples == 1:
        return control.expand(n, times.shape[0], 3, 3)
    w = temporal_weights(times.to(control.dtype), samples)
    omega = torch.einsum("tj,njc->ntc", w, _relative_rotvecs(control))
    return rotvec_to_matrix(omega) @ control[:, :1]


def _nodes(samples: int, like: torch.Tensor) -> torch.Tensor:
    """Dose times of ``samples`` control points; a single one stands for mid-exposure."""
    if samples == 1:
        return torch.full((1,), 0.5, dtype=like.dtype, device=like.device)
    return torch.linspace(0, 1, samples, dtype=like.dtype, device=like.device)


def resample_positions(control: torch.Tensor, samples: int) -> torch.Tensor:
    """The same trajectory with ``samples`` control points (exact when adding points)."""
    return control if control.shape[1] == samples else positions_at(control, _nodes(samples, control))


def resample_orientations(control: torch.Tensor, samples: int) -> torch.Tensor:
    """Orientation trajectories with ``samples`` control points (exact in the rotation vectors when adding)."""
    return control if control.shape[1] == samples else orientations_at(control, _nodes(samples, control))
