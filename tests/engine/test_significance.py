"""The significance rule that keeps or resets a refined item-half (issue 21 §5), against statistics worked out
independently: least-squares fits of random regressors to white noise."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from cryopool.engine.alignment import log_likelihood_gain
from cryopool.engine.refine_item import RefineSettings, _decide


def test_fitting_pure_noise_gains_half_a_unit_of_log_likelihood_per_parameter():
    """Wilks: twice the log-likelihood gain of P free parameters fitted to noise is χ²(P), mean P. The gain is
    computed from the normalised correlation alone, as the refinement does."""
    g = torch.Generator().manual_seed(0)
    n, p, trials = 2000, 40, 200
    gains = []
    for _ in range(trials):
        y = torch.randn(n, generator=g, dtype=torch.float64)
        x = torch.randn(n, p, generator=g, dtype=torch.float64)
        fit = x @ torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        rho = float(fit @ y / torch.sqrt((fit @ fit) * (y @ y)))
        gains.append(log_likelihood_gain(0.0, rho, n))
    mean = sum(gains) / trials
    assert abs(mean - p / 2) < 4 * math.sqrt(2 * p) / 2 / math.sqrt(trials), mean  # 4 σ of the mean
    assert sum(gain > p for gain in gains) / trials < 0.01  # AIC's bar: noise alone rarely clears it


def _target(samples: float, prior: float = 0.0):
    return SimpleNamespace(effective_samples=lambda: samples, prior_cost=lambda: prior)


def test_a_first_fit_must_clear_its_parameter_count_and_a_refit_must_not_get_worse():
    settings, n = RefineSettings(), 10_000.0
    small = [0.10, 0.11]  # a real but small gain: (N/2)·log((1−0.01)/(1−0.0121)) ≈ 10.6 for 50 parameters
    first = _decide(50, _target(n), small, settings, fitted_before=False)
    assert not first["accepted"] and not first["fitted"] and "AIC" in first["reason"]
    refit = _decide(50, _target(n), small, settings, fitted_before=True)
    assert refit["accepted"] and refit["fitted"] and refit["penalty"] == 0
    worse = _decide(50, _target(n), [0.11, 0.10], settings, fitted_before=True)
    assert not worse["accepted"] and worse["fitted"] and "worse" in worse["reason"]  # the kept start stays fitted
    large = _decide(50, _target(n), [0.10, 0.20], settings, fitted_before=False)
    assert large["accepted"] and large["fitted"]
    # the moves' cost under their priors is paid from the gain (the posterior decides): 153.9 − cost vs 50
    costly = _decide(50, _target(n, prior=110.0), [0.10, 0.20], settings, fitted_before=False)
    assert not costly["accepted"] and costly["prior_cost"] == 110.0
    assert _decide(50, _target(n, prior=100.0), [0.10, 0.20], settings, fitted_before=False)["accepted"]
