"""The Debye model against scipy quadrature, its limits, and its derivatives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from cloud_model.debye import (
    GAS_CONSTANT,
    DebyeInputError,
    heat_capacity,
    heat_capacity_per_atom,
    internal_energy,
    internal_energy_per_atom,
)

R = GAS_CONSTANT  # J/(mol K)
RATIOS = np.logspace(-3, 3, 121)  # T / theta


def _cv_quad(theta: float, temp: float, n: float) -> float:
    x_d = theta / temp

    def f(x: float) -> float:
        return x**4 * math.exp(-x) / (-math.expm1(-x)) ** 2

    integral = quad(f, 0.0, x_d, epsabs=0.0, epsrel=1e-13, limit=500)[0]
    return 9.0 * n * R * integral / x_d**3


def _u_quad(theta: float, temp: float, n: float) -> float:
    x_d = theta / temp

    def f(x: float) -> float:
        return x**3 * math.exp(-x) / (-math.expm1(-x))

    integral = quad(f, 0.0, x_d, epsabs=0.0, epsrel=1e-13, limit=500)[0]
    return 9.0 * n * R * temp * integral / x_d**3 + 9.0 / 8.0 * n * R * theta


def test_heat_capacity_matches_quad_over_six_decades() -> None:
    theta = torch.tensor([150.0, 420.0], dtype=torch.float64)
    temps = torch.tensor(RATIOS, dtype=torch.float64)
    for i, th in enumerate(theta.tolist()):
        cv = heat_capacity(theta[i : i + 1], temps * th, 5.0)[0]  # (K,)
        ref = torch.tensor([_cv_quad(th, float(t) * th, 5.0) for t in RATIOS], dtype=torch.float64)
        rel = ((cv - ref) / ref).abs().max().item()
        assert rel < 1e-6, rel
        assert rel < 1e-10  # what the 64-point rule actually reaches


def test_internal_energy_matches_quad_and_includes_zero_point() -> None:
    th = 300.0
    temps = torch.tensor(RATIOS * th, dtype=torch.float64)
    u = internal_energy(torch.tensor(th, dtype=torch.float64), temps, 2.0)  # (K,)
    ref = torch.tensor([_u_quad(th, float(t), 2.0) for t in temps], dtype=torch.float64)
    assert ((u - ref) / ref).abs().max().item() < 1e-10
    # at T -> 0 only the zero-point energy 9/8 n R theta is left
    zpe = 9.0 / 8.0 * 2.0 * R * th
    assert internal_energy(th, 1e-3, 2.0).item() == pytest.approx(zpe, rel=1e-6)
    no_zpe = internal_energy(torch.tensor(th, dtype=torch.float64), temps, 2.0, zero_point=False)
    assert torch.allclose(u - no_zpe, torch.full_like(u, zpe), rtol=1e-12)


def test_low_temperature_t_cubed_law() -> None:
    theta = torch.tensor([200.0, 800.0], dtype=torch.float64)
    temps = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)  # T/theta <= 0.015
    cv = heat_capacity(theta, temps, 3.0)  # (2, 3)
    debye_t3 = 12.0 * math.pi**4 / 5.0 * 3.0 * R * (temps / theta[:, None]) ** 3
    assert torch.allclose(cv, debye_t3, rtol=1e-12)
    # and it is the true limit: the quadrature below the cut-off agrees at T/theta = 0.021
    theta_hi = torch.tensor(1000.0, dtype=torch.float64)
    cv_21 = heat_capacity(theta_hi, 21.0, 3.0).item()
    assert cv_21 == pytest.approx(_cv_quad(1000.0, 21.0, 3.0), rel=1e-9)


def test_high_temperature_dulong_petit() -> None:
    theta = torch.tensor([100.0, 1000.0], dtype=torch.float64)
    cv = heat_capacity(theta, torch.tensor([1e5, 1e6], dtype=torch.float64), 4.0)
    x = theta[:, None] / torch.tensor([1e5, 1e6], dtype=torch.float64)
    # Cv / 3nR = 1 - x^2/20 + x^4/560 - ...
    assert torch.allclose(cv / (3 * 4.0 * R), 1 - x**2 / 20 + x**4 / 560, rtol=1e-12)
    assert heat_capacity_per_atom(300.0, 3e5).item() == pytest.approx(3 * R, rel=1e-6)


def test_shapes_grid_elementwise_and_per_atom() -> None:
    theta = torch.tensor([100.0, 200.0, 300.0])
    grid = torch.linspace(10.0, 600.0, 7)
    n = torch.tensor([1.0, 2.0, 5.0])
    assert heat_capacity(theta, grid, n).shape == (3, 7)
    assert internal_energy(theta, grid, n).shape == (3, 7)
    assert heat_capacity(theta, torch.ones(4, 2) * 300.0).shape == (3, 4, 2)
    labels = torch.tensor([50.0, 300.0, 900.0])
    point = heat_capacity(theta, labels, n, elementwise=True)  # (3,)
    full = heat_capacity(theta, labels, n)  # (3, 3)
    assert point.shape == (3,)
    assert torch.allclose(point, full.diagonal())
    # extensive in n: per-atom values times n
    assert torch.allclose(full, heat_capacity_per_atom(theta, labels) * n[:, None])
    assert torch.allclose(
        internal_energy(theta, labels, n), internal_energy_per_atom(theta, labels) * n[:, None]
    )


def test_float32_is_accurate_to_single_precision() -> None:
    temps64 = torch.logspace(-3, 3, 61, dtype=torch.float64) * 350.0
    c64 = heat_capacity(torch.tensor([350.0], dtype=torch.float64), temps64)
    c32 = heat_capacity(torch.tensor([350.0]), temps64.float())
    assert c32.dtype == torch.float32
    assert ((c32.double() - c64) / c64).abs().max().item() < 2e-6


def test_internal_energy_derivative_in_temperature_is_heat_capacity() -> None:
    theta = torch.tensor([120.0, 450.0], dtype=torch.float64)
    temps = torch.tensor(RATIOS[::4] * 300.0, dtype=torch.float64, requires_grad=True)
    u = internal_energy(theta, temps, 3.0)  # (2, K)
    (du_dt,) = torch.autograd.grad(u.sum(), temps)  # sums over theta rows
    cv = heat_capacity(theta, temps.detach(), 3.0).sum(0)
    assert torch.allclose(du_dt, cv, rtol=1e-9, atol=1e-12)


def test_gradient_in_theta_is_finite_and_correct() -> None:
    temps = torch.tensor([1.0, 30.0, 300.0, 3000.0, 3e5], dtype=torch.float64)
    theta = torch.tensor([80.0, 400.0, 1200.0], dtype=torch.float64, requires_grad=True)

    def cv_fn(th: torch.Tensor) -> torch.Tensor:
        return heat_capacity(th, temps, 2.0)

    def u_fn(th: torch.Tensor) -> torch.Tensor:
        # U ~ 3nRT is large at high T: finite differences lose the digits there, so stop at 1000 K
        return internal_energy(th, temps[:4].clamp(max=1000.0), 2.0)

    assert torch.autograd.gradcheck(cv_fn, (theta,))
    assert torch.autograd.gradcheck(u_fn, (theta,))
    # against the analytic derivative dCv/dtheta = (9nR/T) (g(x)/x^3 - 3 I(x)/x^4), x = theta/T
    (grad,) = torch.autograd.grad(heat_capacity(theta, temps, 2.0).sum(), theta)
    for i, th in enumerate(theta.tolist()):
        expected = 0.0
        for t in temps.tolist():
            x = th / t
            g = x**4 * math.exp(-x) / (-math.expm1(-x)) ** 2
            integral = _cv_quad(th, t, 1.0) * x**3 / (9 * R)
            expected += 9 * 2.0 * R / t * (g / x**3 - 3 * integral / x**4)
        assert grad[i].item() == pytest.approx(expected, rel=1e-8)
    assert torch.isfinite(grad).all()


def test_invalid_inputs_raise() -> None:
    with pytest.raises(DebyeInputError, match="theta"):
        heat_capacity(torch.tensor([300.0, -1.0]), 300.0)
    with pytest.raises(DebyeInputError, match="temperature"):
        heat_capacity(300.0, torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError):
        internal_energy(float("nan"), 10.0)
