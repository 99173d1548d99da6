"""Calibration of ensemble predictions: Gaussian NLL, interval coverage, miscalibration area.

An ensemble's members ``(K, n, m)`` define, for every candidate and target, a
Gaussian with the members' mean and standard deviation (``ddof=0``, as in deep
ensembles). The metrics here judge that Gaussian against held-out truth:

* **NLL**: mean of ``0.5 log(2 pi s^2) + (y - mu)^2 / (2 s^2)`` (nats, in target units);
* **coverage** of the central interval of probability ``p`` (0.9 by default);
* **miscalibration area**: ``int_0^1 |observed coverage(p) - p| dp`` over central
  intervals (0 for a perfectly calibrated model, at most 0.5);
* a **variance scale** ``c`` (``sigma -> c sigma``) fitted by maximum likelihood
  on a validation split: ``c^2 = mean((y - mu)^2 / sigma^2)``.

Missing targets (NaN) are ignored everywhere. Every function works on float64
internally and returns plain floats.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from cloud_model.errors import CloudlabError

__all__ = [
    "CalibrationError",
    "CalibrationReport",
    "calibration_report",
    "central_interval_coverage",
    "ensemble_mean_std",
    "fit_variance_scale",
    "gaussian_nll",
    "gaussian_report",
    "miscalibration_area",
]

_MIN_STD = 1e-12  # floor on sigma so a zero-spread ensemble gives a large but finite NLL


class CalibrationError(CloudlabError, ValueError):
    """Predictions and targets do not fit together (shapes, or no finite targets)."""


class CalibrationReport(BaseModel):
    """Accuracy and calibration of Gaussian predictions on held-out data (target units)."""

    model_config = ConfigDict(extra="forbid")
    n: int  # finite (candidate, target) pairs scored
    mae: float
    rmse: float
    mean_std: float  # average predicted sigma (after the variance scale)
    nll: float  # mean Gaussian negative log-likelihood, nats
    coverage_90: float  # fraction of truths inside the central 90 % interval
    miscalibration_area: float  # in [0, 0.5]; 0 = calibrated
    variance_scale: float = 1.0  # the sigma multiplier applied before scoring


def ensemble_mean_std(predictions: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (population) standard deviation over ensemble members.

    Args:
        predictions: ``(K, n, m)`` member predictions.

    Returns:
        ``mean (n, m)`` and ``std (n, m)``; ``std`` is zero for ``K = 1``.
    """
    if predictions.dim() != 3:
        raise CalibrationError(
            f"expected (K, n, m) predictions, got shape {tuple(predictions.shape)}"
        )
    preds = predictions.double()
    return preds.mean(0), preds.std(0, correction=0)


def _flatten(mean: Tensor, std: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The finite entries of ``target`` and the matching ``mean``/``std``, as 1-D float64."""
    if mean.shape != target.shape or std.shape != target.shape:
        raise CalibrationError(
            f"shapes differ: mean {tuple(mean.shape)}, std {tuple(std.shape)}, "
            f"target {tuple(target.shape)}"
        )
    target = target.double()
    finite = torch.isfinite(target)
    if not bool(finite.any()):
        raise CalibrationError("no finite targets to score")
    return mean.double()[finite], std.double()[finite].clamp_min(_MIN_STD), target[finite]


def gaussian_nll(mean: Tensor, std: Tensor, target: Tensor) -> float:
    """Mean Gaussian negative log-likelihood in nats (NaN targets ignored).

    Args:
        mean: ``(n, m)`` predictive means; std: ``(n, m)`` predictive sigmas;
        target: ``(n, m)`` truth, NaN where missing.
    """
    mu, sigma, y = _flatten(mean, std, target)
    nll = 0.5 * math.log(2 * math.pi) + sigma.log() + 0.5 * ((y - mu) / sigma) ** 2
    return float(nll.mean())


def _normal_quantile(p: Tensor) -> Tensor:
    """Standard normal quantile ``Phi^-1(p)``."""
    return math.sqrt(2.0) * torch.special.erfinv(2.0 * p - 1.0)


def central_interval_coverage(
    mean: Tensor, std: Tensor, target: Tensor, level: float | Tensor = 0.9
) -> Tensor:
    """Fraction of truths inside the central ``level`` interval ``mu +- z sigma``.

    Args:
        mean, std, target: ``(n, m)``; NaN targets ignored.
        level: one probability or a ``(L,)`` tensor of them, each in ``(0, 1)``.

    Returns:
        A 0-d tensor (one level) or ``(L,)`` coverages.
    """
    mu, sigma, y = _flatten(mean, std, target)
    levels = torch.as_tensor(level, dtype=torch.float64)
    if bool(((levels <= 0) | (levels >= 1)).any()):
        raise CalibrationError(f"interval levels must lie in (0, 1), got {levels.tolist()}")
    z = _normal_quantile(0.5 + 0.5 * levels)  # (L,) or ()
    scaled = ((y - mu).abs() / sigma).unsqueeze(-1)  # (N, 1)
    inside = scaled <= z.reshape(-1)  # (N, L)
    coverage = inside.double().mean(0)  # (L,)
    return coverage.reshape(levels.shape)


def miscalibration_area(mean: Tensor, std: Tensor, target: Tensor, n_levels: int = 99) -> float:
    """Area between observed and expected coverage of central intervals, ``p`` in (0, 1).

    Trapezoid rule on ``n_levels`` evenly spaced levels plus the exact end points
    (coverage 0 at ``p = 0`` and 1 at ``p = 1``). A calibrated model scores ~0, a
    model that is always far off or infinitely sure scores up to 0.5.
    """
    levels = torch.linspace(0.0, 1.0, n_levels + 2, dtype=torch.float64)[1:-1]
    observed = central_interval_coverage(mean, std, target, levels)  # (L,)
    p = torch.cat([levels.new_zeros(1), levels, levels.new_ones(1)])
    gap = torch.cat([observed.new_zeros(1), (observed - levels).abs(), observed.new_zeros(1)])
    return float(torch.trapezoid(gap, p))


def fit_variance_scale(mean: Tensor, std: Tensor, target: Tensor) -> float:
    """Maximum-likelihood factor ``c`` for ``sigma -> c sigma`` on validation data.

    ``c^2 = mean((y - mu)^2 / sigma^2)`` minimises the Gaussian NLL of the scaled
    predictions. Returns 1.0 when the ensemble has no spread at all.
    """
    mu, sigma, y = _flatten(mean, std, target)
    if bool((sigma <= _MIN_STD).all()):
        return 1.0
    keep = sigma > _MIN_STD
    return float((((y - mu)[keep] / sigma[keep]) ** 2).mean().sqrt())


def calibration_report(
    predictions: Tensor, target: Tensor, *, variance_scale: float = 1.0
) -> CalibrationReport:
    """Accuracy and calibration of ensemble predictions on held-out data.

    Args:
        predictions: ``(K, n, m)`` member predictions in target units.
        target: ``(n, m)`` truth, NaN where missing.
        variance_scale: multiply the ensemble sigma by this first (from
            :func:`fit_variance_scale` on a validation split).

    Returns:
        A :class:`CalibrationReport` over every finite (candidate, target) pair.
    """
    mean, std = ensemble_mean_std(predictions)
    return gaussian_report(mean, std, target, variance_scale=variance_scale)


def gaussian_report(
    mean: Tensor, std: Tensor, target: Tensor, *, variance_scale: float = 1.0
) -> CalibrationReport:
    """:func:`calibration_report` for Gaussian predictions given by ``mean``/``std`` ``(n, m)``."""
    std = std.double() * variance_scale
    mu, sigma, y = _flatten(mean, std, target)
    err = y - mu
    return CalibrationReport(
        n=int(y.numel()),
        mae=float(err.abs().mean()),
        rmse=float((err**2).mean().sqrt()),
        mean_std=float(sigma.mean()),
        nll=gaussian_nll(mean, std, target),
        coverage_90=float(central_interval_coverage(mean, std, target, 0.9)),
        miscalibration_area=miscalibration_area(mean, std, target),
        variance_scale=variance_scale,
    )
