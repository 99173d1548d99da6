"""Einstein oscillators, and the Debye + Einstein model of a crystal's heat capacity.

A crystal with ``n`` atoms in its primitive cell has ``3 n`` phonon branches:
3 acoustic ones, whose frequencies go to zero at the zone centre, and ``3 n - 3``
optical ones, which are often flat. The Debye + Einstein model describes the
acoustic branches by a Debye spectrum (cut off at ``theta_D``) and the optical
branches by one or a few Einstein modes (single frequencies ``theta_E,k``, in K)
with weights ``w_k`` (``sum_k w_k = 1``). Per mole of atoms, with acoustic
fraction ``f``::

    Cv(T) = 3 R [ f D(theta_D / T) + (1 - f) sum_k w_k E(theta_E,k / T) ]         [J/(mol K)]
    E(x)  = x^2 e^x / (e^x - 1)^2                                   (one Einstein mode)
    D(x)  = 3 / x^3 int_0^x t^4 e^t / (e^t - 1)^2 dt                 (Debye, cloud_model.debye)
    U(T)  = 3 R [ f U_D + (1 - f) sum_k w_k theta_E,k (1 / (e^{x_k} - 1) + 1/2) ]  [J/mol]

with ``U_D`` the Debye energy per unit ``3 R`` (zero point ``3/8 theta_D``
included) and ``theta_E,k / 2`` each Einstein mode's zero-point energy.

Branch weights. Counting modes, ``f = 3 / (3 n) = 1 / n`` for ``n`` atoms in the
primitive cell: one atom per cell (a Bravais crystal such as Cu) is pure Debye,
a rock-salt pair is half Debye, a 10-atom perovskite-like cell is 1/10 Debye.
This is exact as a mode count (it is how the spectrum's 3R per atom is shared);
the model's approximation is the shape of each part. Where the atoms per
primitive cell are not known, ``f`` can be learned instead (a head option).
Whatever ``f`` and ``w``, every mode tends to ``k_B`` at high T, so
``Cv -> 3 R`` per atom (Dulong-Petit); at low T the Debye part gives
``Cv ~ T^3`` and the Einstein part is exponentially small, ``~ x^2 e^{-x}``.

Numerics. The Einstein functions are closed forms evaluated through
``expm1(-x)``, free of overflow and cancellation for ``x = theta / T`` from
``1e-6`` to ``1e3`` (for ``x > ~700`` they underflow to exactly 0, their value
being below ``1e-300``); the Debye part is :mod:`cloud_model.debye` (Gauss-Legendre,
exact to ``~1e-12`` relative). Everything is plain torch, differentiable in every
temperature, the weights and the fraction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cloud_model.debye import GAS_CONSTANT, DebyeInputError
from cloud_model.debye import heat_capacity as debye_heat_capacity
from cloud_model.debye import internal_energy as debye_internal_energy

__all__ = [
    "DebyeEinsteinInputError",
    "acoustic_fraction",
    "debye_einstein_heat_capacity",
    "debye_einstein_internal_energy",
    "einstein_heat_capacity",
    "einstein_internal_energy",
]

_WEIGHT_TOLERANCE = 1e-4  # |sum_k w_k - 1| allowed (float32 softmax outputs)


class DebyeEinsteinInputError(DebyeInputError):
    """A temperature, weight, fraction or atom count of the Debye + Einstein model is invalid,
    or the arrays' shapes do not fit together."""


def _check_positive(value: Tensor, what: str) -> None:
    with torch.no_grad():
        if not bool(torch.isfinite(value).all() and (value > 0).all()):
            raise DebyeEinsteinInputError(f"{what} must be finite and > 0 everywhere")


def _as_float(value: Tensor | float, like: Tensor | None = None) -> Tensor:
    if like is not None:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    out = torch.as_tensor(value)
    return out if out.is_floating_point() else out.to(torch.get_default_dtype())


def _einstein_cv(x: Tensor) -> Tensor:
    """``E(x) = x^2 e^x / (e^x - 1)^2`` for ``x > 0``, as ``(x e^{-x/2} / (1 - e^{-x}))^2``."""
    return (x * torch.exp(-0.5 * x) / (-torch.expm1(-x))) ** 2


def _bose(x: Tensor) -> Tensor:
    """The Bose occupation ``1 / (e^x - 1)`` for ``x > 0``, without overflow."""
    return torch.exp(-x) / (-torch.expm1(-x))


def einstein_heat_capacity(
    theta_einstein: Tensor | float, temperature: Tensor | float, *, elementwise: bool = False
) -> Tensor:
    """Einstein heat capacity ``3 R E(theta_E / T)`` per mole of atoms, J/(mol K).

    Args:
        theta_einstein: Einstein temperatures ``hbar omega / k_B`` in K, shape ``S``, > 0.
        temperature: temperatures in K, > 0: a grid of shape ``G`` evaluated for every
            theta (default), or broadcast with ``theta_einstein`` when ``elementwise``.
        elementwise: broadcast instead of taking the outer product.

    Returns:
        ``Cv`` of shape ``S + G`` (or the broadcast shape); differentiable.

    Raises:
        DebyeEinsteinInputError: a temperature is not finite and positive.
    """
    theta = _as_float(theta_einstein)
    temp = _as_float(temperature, theta)
    _check_positive(theta, "theta_einstein (Einstein temperature, K)")
    _check_positive(temp, "temperature T (K)")
    if not elementwise:
        theta = theta.reshape(tuple(theta.shape) + (1,) * temp.dim())
    return 3.0 * GAS_CONSTANT * _einstein_cv(theta / temp)


def einstein_internal_energy(
    theta_einstein: Tensor | float,
    temperature: Tensor | float,
    *,
    elementwise: bool = False,
    zero_point: bool = True,
) -> Tensor:
    """Einstein energy ``3 R theta_E (1 / (e^{theta_E/T} - 1) + 1/2)`` per mole of atoms, J/mol.

    Arguments and shapes as :func:`einstein_heat_capacity`; ``zero_point=False``
    drops the ``3/2 R theta_E`` zero-point term. ``dU/dT`` is the heat capacity.
    """
    theta = _as_float(theta_einstein)
    temp = _as_float(temperature, theta)
    _check_positive(theta, "theta_einstein (Einstein temperature, K)")
    _check_positive(temp, "temperature T (K)")
    if not elementwise:
        theta = theta.reshape(tuple(theta.shape) + (1,) * temp.dim())
    occupation = _bose(theta / temp) + (0.5 if zero_point else 0.0)
    return 3.0 * GAS_CONSTANT * theta * occupation


def acoustic_fraction(n_atoms: Tensor | float) -> Tensor:
    """The share ``1 / n`` of the ``3 n`` branches that are acoustic, for ``n`` atoms per
    primitive cell (any shape, every ``n >= 1``).

    Raises:
        DebyeEinsteinInputError: an atom count below 1 or not finite.
    """
    n = _as_float(n_atoms)
    with torch.no_grad():
        if not bool(torch.isfinite(n).all() and (n >= 1).all()):
            raise DebyeEinsteinInputError("n_atoms (atoms per primitive cell) must be >= 1")
    return 1.0 / n


def _prepare(
    theta_debye: Tensor | float,
    theta_einstein: Tensor | float,
    temperature: Tensor | float,
    fraction: Tensor | float,
    weights: Tensor | None,
    elementwise: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Validate and lay out the inputs; returns theta_D, theta_E, T, f, w with
    theta_E and w carrying the mode axis last (see :func:`debye_einstein_heat_capacity`)."""
    theta_d = _as_float(theta_debye)
    theta_e = _as_float(theta_einstein, theta_d)
    temp = _as_float(temperature, theta_d)
    frac = _as_float(fraction, theta_d)
    _check_positive(theta_d, "theta_debye (Debye temperature of the acoustic branches, K)")
    _check_positive(theta_e, "theta_einstein (Einstein temperatures, K)")
    _check_positive(temp, "temperature T (K)")
    if theta_e.dim() == 0:
        theta_e = theta_e.reshape(1)
    if theta_e.dim() < theta_d.dim() + 1 and theta_d.dim() > 0:
        raise DebyeEinsteinInputError(
            f"theta_einstein needs shape S + (K,) with S = theta_debye's shape "
            f"{tuple(theta_d.shape)}; got {tuple(theta_e.shape)}"
        )
    n_modes = theta_e.shape[-1]
    if weights is None:
        w = torch.full_like(theta_e, 1.0 / n_modes)
    else:
        w = _as_float(weights, theta_d)
        if w.shape != theta_e.shape:
            raise DebyeEinsteinInputError(
                f"weights have shape {tuple(w.shape)}, expected theta_einstein's "
                f"{tuple(theta_e.shape)}"
            )
        with torch.no_grad():
            total = w.sum(-1)
            if not bool(
                torch.isfinite(w).all()
                and (w >= 0).all()
                and ((total - 1).abs() <= _WEIGHT_TOLERANCE).all()
            ):
                raise DebyeEinsteinInputError(
                    "weights of the Einstein modes must be >= 0 and sum to 1 over the last axis"
                )
    with torch.no_grad():
        if not bool(torch.isfinite(frac).all() and (frac >= 0).all() and (frac <= 1).all()):
            raise DebyeEinsteinInputError("acoustic fraction must lie in [0, 1]")
    try:
        torch.broadcast_shapes(theta_d.shape, theta_e.shape[:-1], frac.shape)
    except RuntimeError as exc:
        raise DebyeEinsteinInputError(
            f"theta_debye {tuple(theta_d.shape)}, theta_einstein {tuple(theta_e.shape)} (last "
            f"axis = modes) and acoustic fraction {tuple(frac.shape)} do not broadcast"
        ) from exc
    if not elementwise:
        grid = (1,) * temp.dim()
        theta_d = theta_d.reshape(tuple(theta_d.shape) + grid)
        frac = frac.reshape(tuple(frac.shape) + grid)
        theta_e = theta_e.reshape(tuple(theta_e.shape[:-1]) + grid + (n_modes,))
        w = w.reshape(theta_e.shape)
    return theta_d, theta_e, temp, frac, w


def debye_einstein_heat_capacity(
    theta_debye: Tensor | float,
    theta_einstein: Tensor | float,
    temperature: Tensor | float,
    *,
    fraction: Tensor | float,
    weights: Tensor | None = None,
    n_atoms: Tensor | float = 1.0,
    elementwise: bool = False,
) -> Tensor:
    """Debye (acoustic) + Einstein (optical) heat capacity, J/(mol K) per mole of cells.

    Args:
        theta_debye: Debye temperature of the acoustic branches in K, shape ``S``
            (e.g. ``(B,)``), > 0.
        theta_einstein: Einstein temperatures of the optical modes in K, shape
            ``S + (K,)`` (K modes per crystal; ``(K,)`` or a scalar for one crystal), > 0.
        temperature: temperatures in K, > 0: a grid ``G`` (e.g. ``(T,)``) for every crystal,
            or broadcast with ``S`` when ``elementwise``.
        fraction: acoustic share ``f`` of the modes in [0, 1], broadcastable to ``S``;
            ``acoustic_fraction(n_primitive)`` gives the mode count ``1 / n``.
        weights: ``S + (K,)`` shares of the optical modes (>= 0, summing to 1 over K);
            None = equal.
        n_atoms: atoms per cell, broadcastable to ``S``; the result is per mole of such
            cells (1 = per mole of atoms).
        elementwise: broadcast ``S`` with the temperatures instead of an outer product.

    Returns:
        ``Cv`` of shape ``S + G`` (``(B, T)``), or the broadcast shape when ``elementwise``.

    Raises:
        DebyeEinsteinInputError: non-positive temperatures, a fraction outside [0, 1],
            weights that are negative or do not sum to 1, or shapes that do not fit.
    """
    theta_d, theta_e, temp, frac, w = _prepare(
        theta_debye, theta_einstein, temperature, fraction, weights, elementwise
    )
    n = _as_float(n_atoms, theta_d)
    if not elementwise:
        n = n.reshape(tuple(n.shape) + (1,) * temp.dim())
    acoustic = debye_heat_capacity(theta_d, temp, 1.0, elementwise=True)  # S + G
    optical = 3.0 * GAS_CONSTANT * (w * _einstein_cv(theta_e / temp.unsqueeze(-1))).sum(-1)
    return n * (frac * acoustic + (1.0 - frac) * optical)  # S + G


def debye_einstein_internal_energy(
    theta_debye: Tensor | float,
    theta_einstein: Tensor | float,
    temperature: Tensor | float,
    *,
    fraction: Tensor | float,
    weights: Tensor | None = None,
    n_atoms: Tensor | float = 1.0,
    elementwise: bool = False,
    zero_point: bool = True,
) -> Tensor:
    """Debye + Einstein vibrational energy, J/mol per mole of cells; ``dU/dT`` is
    :func:`debye_einstein_heat_capacity`.

    Arguments and shapes as :func:`debye_einstein_heat_capacity`; ``zero_point``
    includes ``3 R (f 3/8 theta_D + (1 - f) sum_k w_k theta_E,k / 2)`` per atom.
    """
    theta_d, theta_e, temp, frac, w = _prepare(
        theta_debye, theta_einstein, temperature, fraction, weights, elementwise
    )
    n = _as_float(n_atoms, theta_d)
    if not elementwise:
        n = n.reshape(tuple(n.shape) + (1,) * temp.dim())
    acoustic = debye_internal_energy(theta_d, temp, 1.0, elementwise=True, zero_point=zero_point)
    occupation = _bose(theta_e / temp.unsqueeze(-1)) + (0.5 if zero_point else 0.0)
    optical = 3.0 * GAS_CONSTANT * (w * theta_e * occupation).sum(-1)  # S + G
    return n * (frac * acoustic + (1.0 - frac) * optical)
