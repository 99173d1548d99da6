"""Build the table of Wyckoff-letter permutations induced by each space group's affine normaliser.

spglib reports Wyckoff letters in its standard setting of a space group, but a
crystal has several standard settings (origin choices, axis relabelings) related
by the group's *affine normaliser*, and they permute the letters (rock salt: Na
on 4a or on 4b). :mod:`cloud_model.wyckoff` removes that freedom at encoding time
with the permutations computed here, once, from spglib's own symmetry database:

1. the Wyckoff positions of the default Hall setting (spglib's standard setting)
   are found as classes of points of a 1/24 grid: points with equal site-symmetry
   order, one of whose images lies in the other's site-symmetry fixed subspace;
2. the classes are named by running spglib once on a probe crystal that holds one
   orbit of every class (distinct species, generic lattice), which also checks that
   the classes match the multiplicity table;
3. normaliser elements ``x -> P x + t`` are searched with ``P`` an integer matrix of
   entries -1..1 and ``t`` on the 1/24 grid such that ``P G P^-1 = G``; each gives a
   permutation of the letters; a generating set of the permutation group is stored.

Run ``python -m cloud_model.wyckoff_build`` to rebuild ``cloud_model/data/wyckoff_normaliser.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import spglib

from cloud_model.errors import SymmetryError

if TYPE_CHECKING:
    from numpy.typing import NDArray

logger = logging.getLogger(__name__)
spglib.error.OLD_ERROR_HANDLING = False

GRID = 24  # denominators 2, 3, 4, 6, 8, 12 all divide it
TOL = 1e-6
_SHIFTS = np.array(list(itertools.product(range(-2, 3), repeat=3)), dtype=np.float64)  # (125, 3)


@lru_cache(maxsize=1)
def default_hall_numbers() -> dict[int, int]:
    """Space-group number -> the Hall number of spglib's standard setting (the first one)."""
    first: dict[int, int] = {}
    for hall in range(1, 531):
        sg_type = spglib.get_spacegroup_type(hall)
        if sg_type is None:
            raise SymmetryError(f"spglib has no space-group type for Hall number {hall}")
        first.setdefault(int(sg_type.number), hall)
    return first


@dataclass(frozen=True)
class GroupOps:
    """Operations of one Hall setting (centring translations included).

    Attributes:
        rotations: (n, 3, 3) integer matrices.
        translations: (n, 3) fractional translations in [0, 1).
    """

    rotations: NDArray[np.int64]
    translations: NDArray[np.float64]


def group_ops(hall: int) -> GroupOps:
    """The operations of Hall setting ``hall`` from spglib's database."""
    ops = spglib.get_symmetry_from_database(hall)
    if ops is None:
        raise SymmetryError(f"spglib has no operations for Hall number {hall}")
    return GroupOps(np.asarray(ops["rotations"], dtype=np.int64), np.mod(np.asarray(ops["translations"]), 1.0))


def _is_integer(x: NDArray[np.float64]) -> NDArray[np.bool_]:
    return np.all(np.abs(x - np.round(x)) < TOL, axis=-1)


@dataclass
class WyckoffClass:
    """A Wyckoff position found on the grid: a representative point and its site symmetry."""

    point: NDArray[np.float64]  # (3,)
    order: int  # site-symmetry order
    kernel: NDArray[np.float64]  # (k, 3) stacked R - I of the site-symmetry operations
    letter: str = ""

    def contains(self, ops: GroupOps, y: NDArray[np.float64], order: int) -> bool:
        """Whether point ``y`` (of site-symmetry order ``order``) lies in this Wyckoff position."""
        if order != self.order:
            return False
        images = np.mod(y @ ops.rotations.transpose(0, 2, 1) + ops.translations, 1.0)  # (n, 3)
        d = images - self.point
        d -= np.round(d)
        cand = d[:, None, :] - _SHIFTS[None, :, :]  # (n, 125, 3)
        return bool(np.any(np.all(np.abs(cand @ self.kernel.T) < TOL, axis=-1)))


def _site_orders(ops: GroupOps, points: NDArray[np.float64]) -> NDArray[np.int64]:
    images = np.einsum("nij,pj->pni", ops.rotations, points) + ops.translations  # (P, n, 3)
    return np.asarray(_is_integer(images - points[:, None, :]).sum(axis=1), dtype=np.int64)


def _grid() -> NDArray[np.float64]:
    return np.array(list(itertools.product(range(GRID), repeat=3)), dtype=np.float64) / GRID  # (G^3, 3)


def _grid_index(points: NDArray[np.float64]) -> NDArray[np.int64]:
    idx = np.round(np.mod(points, 1.0) * GRID).astype(np.int64) % GRID
    return np.asarray((idx[..., 0] * GRID + idx[..., 1]) * GRID + idx[..., 2], dtype=np.int64)


@dataclass
class WyckoffTable:
    """The Wyckoff positions of one Hall setting and the class of every grid point."""

    ops: GroupOps
    classes: list[WyckoffClass]
    grid_class: NDArray[np.int64]  # (GRID**3,) class index of each grid point


def wyckoff_classes(hall: int) -> WyckoffTable:
    """Wyckoff positions (unnamed) of Hall setting ``hall``, highest site symmetry first."""
    ops = group_ops(hall)
    grid = _grid()
    images = np.einsum("nij,pj->pni", ops.rotations, grid) + ops.translations  # (P, n, 3)
    orbit_of = _grid_index(images).min(axis=1)  # (P,) smallest grid index in each point's orbit
    reps = np.unique(orbit_of)
    orders = _site_orders(ops, grid[reps])
    classes: list[WyckoffClass] = []
    grid_class = np.full(len(grid), -1, dtype=np.int64)
    rep_class = {}
    for i in np.argsort(-orders, kind="stable"):
        y, order = grid[reps[i]], int(orders[i])
        found = next((k for k, c in enumerate(classes) if c.contains(ops, y, order)), None)
        if found is None:
            fixing = _is_integer(np.einsum("nij,j->ni", ops.rotations, y) + ops.translations - y)
            kernel = (ops.rotations[fixing] - np.eye(3, dtype=np.int64)).reshape(-1, 3).astype(np.float64)
            classes.append(WyckoffClass(y, order, kernel))
            found = len(classes) - 1
        rep_class[int(reps[i])] = found
    grid_class[:] = [rep_class[int(o)] for o in orbit_of]
    return WyckoffTable(ops, classes, grid_class)


def _probe_lattice(number: int) -> NDArray[np.float64]:
    from pymatgen.core import Lattice

    if number <= 2:
        lat = Lattice.from_parameters(7.1, 8.3, 9.7, 81.0, 77.0, 69.0)
    elif number <= 15:
        lat = Lattice.from_parameters(7.1, 8.3, 9.7, 90.0, 104.0, 90.0)
    elif number <= 74:
        lat = Lattice.orthorhombic(7.1, 8.3, 9.7)
    elif number <= 142:
        lat = Lattice.tetragonal(7.1, 9.7)
    elif number <= 194:
        lat = Lattice.hexagonal(7.1, 9.7)
    else:
        lat = Lattice.cubic(8.3)
    return np.asarray(lat.matrix)


def _classify(table: WyckoffTable, y: NDArray[np.float64]) -> int:
    order = int(_site_orders(table.ops, y[None, :])[0])
    found = [k for k, c in enumerate(table.classes) if c.contains(table.ops, y, order)]
    if len(found) != 1:
        raise SymmetryError(f"point {y} falls in {len(found)} Wyckoff classes")
    return found[0]


def _free_directions(kernel: NDArray[np.float64]) -> NDArray[np.float64]:
    """(k, 3) basis of the directions along which a point keeps its site symmetry."""
    if not len(kernel):
        return np.eye(3)
    _, sing, vt = np.linalg.svd(kernel)
    rank = int(np.sum(sing > 1e-8))
    return np.asarray(vt[rank:])


def name_classes(number: int, hall: int, table: WyckoffTable) -> None:
    """Give each class its letter, from spglib run on a crystal holding one orbit per class.

    Each class's representative is moved by a small generic amount along its free
    directions so that the probe crystal has no symmetry beyond the group.
    """
    ops, rng = table.ops, np.random.default_rng(number)
    positions: list[NDArray[np.float64]] = []
    owner: list[int] = []
    for k, c in enumerate(table.classes):
        free = _free_directions(c.kernel)
        point = c.point + rng.uniform(0.004, 0.012, size=len(free)) @ free
        orbit = np.mod(np.einsum("nij,j->ni", ops.rotations, point) + ops.translations, 1.0)
        keep: list[NDArray[np.float64]] = []
        for x in orbit:
            if not any(_is_integer(np.array([x - q]))[0] for q in keep):
                keep.append(x)
        positions += keep
        owner += [k] * len(keep)
    frac = np.array(positions)
    data = spglib.get_symmetry_dataset((_probe_lattice(number), frac, [k + 1 for k in owner]),  # type: ignore[arg-type]
                                       symprec=1e-4)
    if data is None or int(data.number) != number or int(data.hall_number) != hall:
        found = None if data is None else (data.number, data.hall_number)
        raise SymmetryError(f"probe crystal of group {number} (Hall {hall}) came back as {found}")
    moved = np.mod(frac @ np.asarray(data.transformation_matrix).T + data.origin_shift, 1.0)
    for i, letter in enumerate(data.wyckoffs):
        k = _classify(table, moved[i])
        if table.classes[k].letter not in ("", letter):
            raise SymmetryError(f"group {number}: class {k} named both {table.classes[k].letter} and {letter}")
        table.classes[k].letter = str(letter)


def _code(matrices: NDArray[np.int64]) -> NDArray[np.int64]:
    """Integer code of (..., 3, 3) matrices with entries in -2..2 (-1 when out of range)."""
    flat = matrices.reshape(*matrices.shape[:-2], 9)
    code = ((flat + 2) * (5 ** np.arange(9))).sum(axis=-1)
    return np.where(np.all(np.abs(flat) <= 2, axis=-1), code, -1)


def _candidate_matrices(ops: GroupOps) -> list[NDArray[np.int64]]:
    """Integer matrices (entries -1..1, det +-1) normalising the point group, one per coset."""
    rots = np.unique(ops.rotations, axis=0)  # (r, 3, 3)
    rot_codes = _code(rots)
    entries = np.array(list(itertools.product((-1, 0, 1), repeat=9)), dtype=np.int64).reshape(-1, 3, 3)
    entries = entries[np.abs(np.round(np.linalg.det(entries))) == 1]
    inv = np.round(np.linalg.inv(entries)).astype(np.int64)
    conj = np.einsum("pij,rjk,pkl->pril", entries, rots, inv)  # (N, r, 3, 3)
    ok = np.isin(_code(conj), rot_codes).all(axis=1)
    out: list[NDArray[np.int64]] = []
    seen: set[int] = set()
    for p in entries[ok]:
        coset = set(_code(np.einsum("ij,rjk->rik", p, rots)).tolist())
        if not coset & seen:
            seen |= coset
            out.append(p)
    return out


def _valid_shifts(ops: GroupOps, p: NDArray[np.int64]) -> NDArray[np.float64]:
    """Shifts t (on the grid) such that x -> P x + t normalises the group."""
    p_inv = np.round(np.linalg.inv(p)).astype(np.int64)
    by_rotation: dict[int, list[NDArray[np.float64]]] = {}
    for code, tau in zip(_code(ops.rotations).tolist(), ops.translations, strict=True):
        by_rotation.setdefault(code, []).append(tau)
    t = _grid()
    for r, tau in zip(ops.rotations, ops.translations, strict=True):
        r2 = p @ r @ p_inv
        targets = np.array(by_rotation[int(_code(r2))])  # (m, 3)
        new_tau = p @ tau + t @ (np.eye(3) - r2).T  # (T, 3)
        t = t[np.any(_is_integer(new_tau[:, None, :] - targets[None, :, :]), axis=1)]
        if len(t) == 0:
            break
    return t


def _closure(perms: list[tuple[int, ...]], n: int) -> set[tuple[int, ...]]:
    group = {tuple(range(n))}
    frontier = list(group)
    while frontier:
        nxt = []
        for a in frontier:
            for g in perms:
                c = tuple(g[i] for i in a)
                if c not in group:
                    group.add(c)
                    nxt.append(c)
        frontier = nxt
    return group


def letter_permutations(table: WyckoffTable) -> list[tuple[int, ...]]:
    """A generating set of the class permutations induced by the affine normaliser."""
    grid = _grid()
    reps = np.array([int(_grid_index(c.point)) for c in table.classes])  # each class's grid point
    generators: list[tuple[int, ...]] = []
    group: set[tuple[int, ...]] = {tuple(range(len(table.classes)))}
    if len(table.classes) == 1:
        return generators
    for p in _candidate_matrices(table.ops):
        shifts = _valid_shifts(table.ops, p)  # (T, 3)
        moved = grid[reps] @ p.T  # (C, 3)
        perms = np.unique(table.grid_class[_grid_index(moved[None, :, :] + shifts[:, None, :])], axis=0)  # (T', C)
        for row in perms:
            perm = tuple(int(k) for k in row)
            if perm not in group:
                generators.append(perm)
                group = _closure(generators, len(table.classes))
    return generators


def _letter_key(letter: str) -> int:
    return ord(letter) - ord("a") if letter.islower() else 26 + ord(letter) - ord("A")


def build_group(number: int, multiplicities: dict[str, int]) -> dict[str, object]:
    """The table entry of one space group, checked against the published multiplicities.

    Returns:
        ``{"hall": int, "letters": "ab...", "dof": [int per letter], "generators": ["ba...", ...]}``
        where each generator string gives the image of every letter of ``letters``.
    """
    hall = default_hall_numbers()[number]
    table = wyckoff_classes(hall)
    if len(table.classes) == 1:
        table.classes[0].letter = "a"
    else:
        name_classes(number, hall, table)
    n_ops = len(table.ops.rotations)
    found = {c.letter: n_ops // c.order for c in table.classes}
    if found != multiplicities:
        raise SymmetryError(f"group {number}: Wyckoff positions {found} differ from the table {multiplicities}")
    order = sorted(range(len(table.classes)), key=lambda k: _letter_key(table.classes[k].letter))
    letters = "".join(table.classes[k].letter for k in order)
    generators = []
    for perm in letter_permutations(table):
        generators.append("".join(table.classes[perm[k]].letter for k in order))
    dof = [len(_free_directions(table.classes[k].kernel)) for k in order]
    return {"hall": hall, "letters": letters, "dof": dof, "generators": generators}


def main(out: Path | None = None) -> None:
    """Rebuild ``cloud_model/data/wyckoff_normaliser.json`` for all 230 space groups."""
    from cloud_model.scope import scope_tables
    from cloud_model.wyckoff import NORMALISER_FILE, NORMALISER_FORMAT

    logging.basicConfig(level=logging.INFO)
    out = out or NORMALISER_FILE
    tables = scope_tables()
    groups = {}
    for number in range(1, 231):
        groups[str(number)] = build_group(number, tables.multiplicities[number])
        logger.info("space group %d: %s", number, groups[str(number)])
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": NORMALISER_FORMAT, "grid": GRID, "groups": groups}
    out.write_text(json.dumps(payload, indent=0, sort_keys=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
