"""What a particle table's temporal samples mean: pose trajectories over the accumulated exposure.

A ``ParticleTable`` with ``temporal_samples = T`` stores ``T`` control points
per particle (``position_angstrom`` and ``orientation_deg`` are ``(n, T, 3)``)
at dose times ``τ_j = j / (T − 1)`` (``T = 1``: one pose for the whole
exposure). The pose at dose time ``τ`` — a tilt's accumulated exposure up to
the middle of its own, divided by the series' total (:func:`dose_times`) — is
the polynomial through the control points (Lagrange; T ≤ 3, so constant,
linear or quadratic). Orientations interpolate the rotation vectors of each
sample relative to the first. The definition lives here, with the format,
so that readers and writers (the engine, RELION export) agree on it.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidInputError

__all__ = ["MAX_TEMPORAL_SAMPLES", "trajectory_weights", "dose_times"]

MAX_TEMPORAL_SAMPLES = 3


def trajectory_weights(times: np.ndarray, samples: int) -> np.ndarray:
    """Weights ``(t, T)`` of ``T`` control points for poses at dose ``times`` ``(t,)`` in [0, 1]."""
    if not 1 <= samples <= MAX_TEMPORAL_SAMPLES:
        raise InvalidInputError("temporal samples out of range", field="temporal_samples",
                                expected=f"1..{MAX_TEMPORAL_SAMPLES}", found=samples)
    times = np.asarray(times, dtype=np.float64)
    if samples == 1:
        return np.ones((len(times), 1))
    nodes = np.linspace(0, 1, samples)
    w = np.ones((len(times), samples))
    for j in range(samples):
        for m in range(samples):
            if m != j:
                w[:, j] *= (times - nodes[m]) / (nodes[j] - nodes[m])
    return w


def dose_times(pre_exposure: np.ndarray, exposure: np.ndarray) -> np.ndarray:
    """Each tilt's dose time: exposure up to the middle of its own, over the series' total, ``(t,)``."""
    pre, exp = np.asarray(pre_exposure, dtype=np.float64), np.asarray(exposure, dtype=np.float64)
    return (pre + 0.5 * exp) / max(float((pre + exp).max()), 1e-9)
