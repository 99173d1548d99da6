"""Calibration metrics on synthetic Gaussians whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad
from scipy.stats import norm

from cloud_model.calibration import (
    CalibrationError,
    calibration_report,
    central_interval_coverage,
    ensemble_mean_std,
    fit_variance_scale,
    gaussian_nll,
    gaussian_report,
    miscalibration_area,
)

N = 40_000


def _gaussian_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(N, 2, generator=gen, dtype=torch.float64) * 3.0
    std = 0.5 + 1.5 * torch.rand(N, 2, generator=gen, dtype=torch.float64)
    target = mean + std * torch.randn(N, 2, generator=gen, dtype=torch.float64)
    return mean, std, target


def _members(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(5, n, m) members whose population mean/std are exactly ``mean``/``std``."""
    offsets = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64) / math.sqrt(2.0)
    return mean + offsets[:, None, None] * std


def test_ensemble_mean_std_is_population_statistics() -> None:
    mean, std, _ = _gaussian_problem()
    m, s = ensemble_mean_std(_members(mean[:100], std[:100]))
    assert torch.allclose(m, mean[:100]) and torch.allclose(s, std[:100])
    _, single = ensemble_mean_std(mean[None, :10])
    assert torch.equal(single, torch.zeros_like(single))


def test_calibrated_gaussian_scores_as_expected() -> None:
    mean, std, target = _gaussian_problem()
    tol = 4 * math.sqrt(0.9 * 0.1 / (2 * N))  # 4 binomial standard errors
    assert float(central_interval_coverage(mean, std, target, 0.9)) == pytest.approx(0.9, abs=tol)
    assert miscalibration_area(mean, std, target) < 0.01
    expected_nll = float((0.5 * math.log(2 * math.pi) + std.log()).mean()) + 0.5
    assert gaussian_nll(mean, std, target) == pytest.approx(expected_nll, abs=0.02)
    assert fit_variance_scale(mean, std, target) == pytest.approx(1.0, abs=0.01)
    report = calibration_report(_members(mean, std), target)
    direct = gaussian_report(mean, std, target)
    assert report.nll == pytest.approx(direct.nll) and report.mae == pytest.approx(direct.mae)
    assert report.n == 2 * N
    assert report.coverage_90 == pytest.approx(0.9, abs=tol)
    assert report.mae == pytest.approx(float((std * math.sqrt(2 / math.pi)).mean()), rel=0.02)


def test_overconfident_gaussian_has_known_coverage_area_and_scale() -> None:
    mean, std, target = _gaussian_problem(seed=1)
    half = std / 2.0  # the model claims half the true sigma
    z90 = norm.ppf(0.95)
    expected_cov = 2 * norm.cdf(z90 / 2) - 1  # 0.589
    assert float(central_interval_coverage(mean, half, target, 0.9)) == pytest.approx(
        expected_cov, abs=0.01
    )

    def gap(p: float) -> float:
        return abs(2 * norm.cdf(norm.ppf(0.5 + p / 2) / 2) - 1 - p)

    expected_area = quad(gap, 0.0, 1.0)[0]
    assert miscalibration_area(mean, half, target) == pytest.approx(expected_area, abs=0.01)
    scale = fit_variance_scale(mean, half, target)
    assert scale == pytest.approx(2.0, abs=0.03)
    fixed = calibration_report(_members(mean, half), target, variance_scale=scale)
    assert fixed.coverage_90 == pytest.approx(0.9, abs=0.01)
    raw = calibration_report(_members(mean, half), target)
    assert fixed.nll < raw.nll - 0.3  # E[NLL] gap is log(2)... minus (4-1)/2 in closed form
    assert raw.nll - fixed.nll == pytest.approx(1.5 - math.log(2.0), abs=0.05)


def test_nll_closed_form_and_zero_spread_is_finite() -> None:
    zero = torch.zeros(1, 1, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    assert gaussian_nll(zero, one, zero) == pytest.approx(0.5 * math.log(2 * math.pi))
    assert gaussian_nll(zero, 2 * one, 2 * one) == pytest.approx(
        0.5 * math.log(2 * math.pi) + math.log(2.0) + 0.5
    )
    report = calibration_report(torch.zeros(1, 3, 1), torch.ones(3, 1))  # K = 1: no spread
    assert math.isfinite(report.nll) and report.coverage_90 == 0.0
    assert report.miscalibration_area == pytest.approx(0.5, abs=0.01)


def test_nan_targets_are_ignored_and_bad_shapes_raise() -> None:
    mean, std, target = _gaussian_problem(seed=2)
    holey = target.clone()
    holey[::3, 0] = float("nan")
    keep = torch.isfinite(holey)
    full = calibration_report(_members(mean, std), holey)
    assert full.n == int(keep.sum())
    sub = gaussian_nll(mean[keep][:, None], std[keep][:, None], target[keep][:, None])
    assert full.nll == pytest.approx(sub)
    with pytest.raises(CalibrationError):
        gaussian_nll(mean, std, target[:10])
    with pytest.raises(CalibrationError):
        calibration_report(mean, target)  # not (K, n, m)
    with pytest.raises(CalibrationError):
        gaussian_nll(mean[:2], std[:2], torch.full((2, 2), float("nan")))
