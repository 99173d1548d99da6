"""Origin- and setting-independent Wyckoff letters.

spglib names the Wyckoff positions of a crystal in its standard setting, but a
crystal has several equally standard settings (other origins, relabelled axes),
related by the affine normaliser of its space group, and they permute the letters:
rock salt may come out with Na on 4a or on 4b depending on where the input cell's
origin was. This module picks one assignment canonically: among all letter
permutations of the normaliser (table ``data/wyckoff_normaliser.json``, built from
spglib's database by :mod:`cloud_model.wyckoff_build`), the one that makes the sorted
list of ``(element rank, letter)`` pairs of the occupied orbits lexicographically
smallest. Elements are ranked by electronegativity, so e.g. the most
electropositive element of rock salt goes to 4a, diamond's carbon to 8a, the A
cation of a cubic perovskite to 1a.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud_model.errors import SymmetryError

if TYPE_CHECKING:
    from numpy.typing import NDArray

NORMALISER_FILE = Path(__file__).resolve().parent / "data" / "wyckoff_normaliser.json"
NORMALISER_FORMAT = "cloudlab-wyckoff-normaliser-1"


@dataclass(frozen=True)
class LetterGroup:
    """The letter permutations of one space group's affine normaliser.

    Attributes:
        number: space-group number.
        hall: spglib Hall number of the standard setting the letters refer to.
        letters: the group's Wyckoff letters, ``a`` first.
        dof: free parameters of each Wyckoff position (0 for a fixed point).
        images: (n_perm, n_letters) index of the image of each letter under each permutation
            (identity first).
    """

    number: int
    hall: int
    letters: str
    dof: tuple[int, ...]
    images: NDArray[np.int64]

    def index(self, letter: str) -> int:
        """Position of ``letter`` in :attr:`letters`."""
        i = self.letters.find(letter)
        if i < 0:
            raise SymmetryError(f"space group {self.number} has no Wyckoff letter {letter!r}")
        return i


def _closure(generators: list[tuple[int, ...]], n: int) -> list[tuple[int, ...]]:
    identity = tuple(range(n))
    group = {identity}
    ordered = [identity]
    frontier = [identity]
    while frontier:
        nxt = []
        for a in frontier:
            for g in generators:
                c = tuple(g[i] for i in a)
                if c not in group:
                    group.add(c)
                    ordered.append(c)
                    nxt.append(c)
        frontier = nxt
    return ordered


@lru_cache(maxsize=1)
def _raw_table() -> dict[str, Any]:
    try:
        payload = json.loads(NORMALISER_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SymmetryError(
            f"cannot read {NORMALISER_FILE}: {exc}; rebuild it with `python -m cloud_model.wyckoff_build`"
        ) from exc
    if payload.get("format") != NORMALISER_FORMAT:
        raise SymmetryError(f"{NORMALISER_FILE} is not a {NORMALISER_FORMAT} table")
    groups: dict[str, Any] = payload["groups"]
    return groups


@lru_cache(maxsize=256)
def letter_group(number: int) -> LetterGroup:
    """The normaliser's letter permutations for space group ``number`` (closure of the stored generators)."""
    entry = _raw_table().get(str(number))
    if entry is None:
        raise SymmetryError(f"no Wyckoff normaliser entry for space group {number}")
    letters: str = entry["letters"]
    generators = [tuple(letters.index(c) for c in g) for g in entry["generators"]]
    images = np.array(_closure(generators, len(letters)), dtype=np.int64)
    return LetterGroup(number, int(entry["hall"]), letters, tuple(entry["dof"]), images)


def canonical_letters(dataset: Any, sites: Sequence[int], ranks: Sequence[Any]) -> list[str]:
    """Wyckoff letters of one site per orbit, in the canonical setting.

    Args:
        dataset: the spglib symmetry dataset of the structure.
        sites: one input-site index per crystallographic orbit.
        ranks: a sortable rank of each orbit's element (same length as ``sites``).

    Returns:
        The letter of each orbit, after the normaliser permutation that makes the
        sorted ``(rank, letter)`` list smallest.

    Raises:
        SymmetryError: spglib put two orbits on one fixed-point Wyckoff position (an
            inconsistent result, seen with tolerances larger than the structure allows).
    """
    group = letter_group(int(dataset.number))
    if int(dataset.hall_number) != group.hall:
        raise SymmetryError(
            f"spglib used Hall setting {dataset.hall_number} for space group {group.number}, "
            f"the Wyckoff table expects {group.hall}"
        )
    index = np.array([group.index(str(dataset.wyckoffs[i])) for i in sites], dtype=np.int64)
    fixed = [i for i in index.tolist() if group.dof[i] == 0]
    if len(fixed) != len(set(fixed)):
        raise SymmetryError(
            f"spglib placed two orbits on one fixed-point Wyckoff position of space group {group.number} "
            "(inconsistent symmetry at this tolerance); use a smaller symprec"
        )
    if len(group.images) == 1 or not len(index):
        return [group.letters[i] for i in index.tolist()]
    rank_ids = {r: k for k, r in enumerate(sorted(set(ranks)))}
    element = np.array([rank_ids[r] for r in ranks], dtype=np.int64)
    permuted = group.images[:, index]  # (n_perm, n_orbits)
    keys = np.sort(element[None, :] * 64 + permuted, axis=1)  # (n_perm, n_orbits), sorted per permutation
    best = int(np.lexsort(keys.T[::-1])[0])
    return [group.letters[i] for i in permuted[best].tolist()]
