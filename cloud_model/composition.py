"""Composition-only rows in the SCOPE language, and reduced formulas of any row.

A formula has no space group and no Wyckoff orbits, so its SCOPE string keeps part 3
exactly as the encoder writes it (element symbols in order of increasing Pauling
electronegativity, atomic fractions rounded by :func:`cloud_model.scope.format_fraction`)
and replaces parts 1 and 2 by one placeholder token each (``[NOSYM]``, ``[NOWYCK]``,
appended to the vocabulary in ``scope-vocab-2``, see :mod:`cloud_model.tokenizer`):

    >>> composition_scope("NaCl")
    '[NOSYM] | [NOWYCK] | Na 0.5 Cl 0.5'

The trunk thus reads the same composition tokens from a formula as from a crystal of
that formula (``encode_scope(rock_salt)`` ends with ``| Na 0.5 Cl 0.5`` too) and learns
what symmetry adds from the rows that have it.

Reduced formulas (pymatgen ``Composition.reduced_formula``) are what the leakage guard
compares. :func:`formula_from_native` reads one exactly from a native SCOPE string
(its orbits carry element and conventional-cell multiplicity, so the counts are
exact); :func:`formula_from_cloud` recovers one from a published-format string and
the cell's atom count (its fractions are rounded to 2 decimals).
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache

from cloud_model.errors import DataError
from cloud_model.scope import PART_SEPARATOR, element_rank, format_fraction
from cloud_model.tokenizer import NO_SYMMETRY, NO_WYCKOFF

__all__ = [
    "COMPOSITION_PREFIX",
    "composition_scope",
    "formula_from_cloud",
    "formula_from_native",
    "is_composition_scope",
    "parse_formula",
    "reduced_formula",
]

# parts 1 and 2 of every composition-only string, separator included
COMPOSITION_PREFIX = f"{NO_SYMMETRY}{PART_SEPARATOR}{NO_WYCKOFF}{PART_SEPARATOR}"
_ORBIT = re.compile(r"^(\d+)[a-zA-Z]:([A-Z][a-z]*)$")  # a native orbit token, e.g. 4a:Na


@lru_cache(maxsize=1 << 20)
def parse_formula(formula: str) -> tuple[str, str]:
    """The reduced formula and the composition SCOPE string of a chemical formula.

    Memoised per formula text: the composition sets repeat formulas across sets.

    Args:
        formula: anything pymatgen ``Composition`` reads (``C1Pt1``, ``Sr(AlH)2``).

    Returns:
        ``(reduced_formula, composition_scope)``.

    Raises:
        DataError: pymatgen cannot parse it, it names a symbol that is not an element
            (a dummy species), or it has no atoms. The message names the formula.
    """
    from pymatgen.core import Composition, Element

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            composition = Composition(formula)
    except Exception as exc:  # pymatgen raises ValueError, KeyError, ... on bad formulas
        raise DataError(
            f"formula {formula[:60]!r} does not parse: {type(exc).__name__}: {exc}"
        ) from exc
    not_elements = [str(s) for s in composition if not isinstance(s, Element)]
    if not_elements:
        raise DataError(
            f"formula {formula[:60]!r} has symbols that are not elements: {not_elements}"
        )
    total = composition.num_atoms
    if not total > 0:
        raise DataError(f"formula {formula[:60]!r} has no atoms")
    amounts = {str(e): float(a) for e, a in composition.get_el_amt_dict().items() if a > 0}
    order = sorted(amounts, key=element_rank)
    part3 = " ".join(f"{e} {format_fraction(amounts[e] / total)}" for e in order)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about noble gases' electronegativity
        reduced = str(composition.reduced_formula)
    return reduced, COMPOSITION_PREFIX + part3


def composition_scope(formula: str) -> str:
    """The composition-only SCOPE string of ``formula``: ``[NOSYM] | [NOWYCK] | <part 3>``.

    Part 3 is written exactly as :func:`cloud_model.scope.encode_scope` writes the
    composition of a crystal of that formula.

    Raises:
        DataError: the formula does not parse or names a non-element (see :func:`parse_formula`).
    """
    return parse_formula(formula)[1]


def is_composition_scope(text: str) -> bool:
    """Whether ``text`` is a composition-only SCOPE string."""
    return text.startswith(COMPOSITION_PREFIX)


@lru_cache(maxsize=1 << 16)
def reduced_formula(counts: tuple[tuple[str, float], ...]) -> str:
    """pymatgen's reduced formula of element -> amount pairs (memoised).

    Raises:
        DataError: no positive amount.
    """
    from pymatgen.core import Composition

    amounts = {e: a for e, a in counts if a > 0}
    if not amounts:
        raise DataError(f"no atoms in {counts}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about noble gases' electronegativity
        return str(Composition(amounts).reduced_formula)


def formula_from_native(text: str) -> str:
    """The reduced formula of a native SCOPE string, exact: orbit multiplicities summed per element.

    Raises:
        DataError: part 2 is not a list of ``<multiplicity><letter>:<element>`` orbits.
    """
    parts = text.split(PART_SEPARATOR)
    if len(parts) != 3:
        raise DataError(f"not a SCOPE string (3 parts): {text[:80]!r}")
    counts: dict[str, int] = {}
    for word in parts[1].split():
        match = _ORBIT.match(word)
        if match is None:
            raise DataError(f"not a native SCOPE orbit {word!r} in {text[:80]!r}")
        counts[match.group(2)] = counts.get(match.group(2), 0) + int(match.group(1))
    return reduced_formula(tuple(sorted(counts.items())))


def formula_from_cloud(text: str, n_atoms: float | None, *, max_atoms: int = 200) -> str | None:
    """The reduced formula behind a published-format SCOPE string, or None if ambiguous.

    Part 3 lists atomic fractions rounded to 2 decimals. With the cell's atom count
    ``n_atoms`` the counts are ``round(fraction * n_atoms)``, accepted when they add up
    to ``n_atoms`` and reproduce every written fraction; otherwise (or without a count)
    the smallest cell of at most ``max_atoms`` atoms whose counts reproduce the written
    fractions is taken. None when neither works.
    """
    parts = text.split(PART_SEPARATOR)
    if len(parts) != 3:
        return None
    words = parts[2].split()
    if len(words) % 2 or not words:
        return None
    try:
        pairs = [(words[i], float(words[i + 1])) for i in range(0, len(words), 2)]
    except ValueError:
        return None
    sizes: list[int] = []
    if n_atoms is not None and n_atoms >= 1 and float(n_atoms).is_integer():
        sizes.append(int(n_atoms))
    sizes += range(1, max_atoms + 1)
    for size in sizes:
        counts = [(e, round(f * size)) for e, f in pairs]
        if sum(c for _, c in counts) != size or any(c <= 0 for _, c in counts):
            continue
        if all(
            format_fraction(c / size) == format_fraction(f)
            for (_, c), (_, f) in zip(counts, pairs, strict=True)
        ):
            merged: dict[str, float] = {}
            for e, c in counts:
                merged[e] = merged.get(e, 0) + c
            return reduced_formula(tuple(sorted(merged.items())))
    return None
