"""Composition features for the GP baseline surrogate.

The GP baseline sees only the composition, the way classic composition-based
screening does: the fractional amounts of a fixed element list plus the
composition-weighted mean and spread of a few elemental properties
(electronegativity, atomic number, row, group, atomic radius, mass). The
composition is read from the last part of a SCOPE string (``El x El y ...``),
which both SCOPE variants share.
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.typing import NDArray

from cloud_model.errors import DataError

_PROPERTIES = ("X", "Z", "row", "group", "atomic_radius", "atomic_mass")


def composition_from_scope(scope: str) -> dict[str, float]:
    """Element -> fractional amount, from the composition part of a SCOPE string.

    Raises:
        DataError: the string has no ``El amount`` composition part.
    """
    tail = scope.rsplit("|", 1)[-1].split()
    if len(tail) < 2 or len(tail) % 2:
        raise DataError(f"SCOPE string {scope!r} has no 'Element amount ...' composition part")
    comp: dict[str, float] = {}
    for symbol, amount in zip(tail[::2], tail[1::2], strict=True):
        try:
            comp[symbol] = comp.get(symbol, 0.0) + float(amount)
        except ValueError as exc:
            raise DataError(
                f"SCOPE string {scope!r}: amount {amount!r} of {symbol} is not a number"
            ) from exc
    total = sum(comp.values())
    if total <= 0:
        raise DataError(f"SCOPE string {scope!r}: composition sums to zero")
    return {el: x / total for el, x in comp.items()}


@functools.lru_cache(maxsize=256)
def _element_properties(symbol: str) -> tuple[float, ...]:
    from pymatgen.core import Element

    try:
        el = Element(symbol)
    except ValueError:
        return tuple(float("nan") for _ in _PROPERTIES)
    values = []
    for name in _PROPERTIES:
        value = getattr(el, name, None)
        values.append(float(value) if value is not None else float("nan"))
    return tuple(values)


def composition_features(scopes: list[str]) -> NDArray[np.float64]:
    """Feature matrix for a list of SCOPE strings.

    Returns:
        ``n x d`` array: fractions over the elements present anywhere in ``scopes`` (sorted),
        then weighted mean and weighted std of each elemental property. Missing
        property values are imputed with the column mean.
    """
    comps = [composition_from_scope(s) for s in scopes]
    elements = sorted({el for c in comps for el in c})
    col = {el: i for i, el in enumerate(elements)}
    fractions = np.zeros((len(comps), len(elements)))
    stats = np.zeros((len(comps), 2 * len(_PROPERTIES)))
    for i, comp in enumerate(comps):
        props = np.array([_element_properties(el) for el in comp])  # (n_el, p)
        weights = np.array(list(comp.values()))[:, None]  # (n_el, 1)
        for el, x in comp.items():
            fractions[i, col[el]] = x
        with np.errstate(invalid="ignore"):
            mean = np.nansum(props * weights, axis=0) / np.maximum(
                np.sum(weights * ~np.isnan(props), axis=0), 1e-12
            )
            var = np.nansum(weights * (props - mean) ** 2, axis=0)
        stats[i] = np.concatenate([mean, np.sqrt(np.maximum(var, 0.0))])
    col_mean = np.nanmean(np.where(np.isfinite(stats), stats, np.nan), axis=0)
    stats = np.where(np.isfinite(stats), stats, np.nan_to_num(col_mean))
    return np.concatenate([fractions, stats], axis=1)
