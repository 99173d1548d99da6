"""SCOPE strings: a coordinate-free, symmetry-based text encoding of a crystal.

A SCOPE string has three parts joined by ``" | "``:

1. the encoded generators of the space group (Shmueli encoding, one character per
   token, from the ``cloud_generators`` table), e.g. Fm-3m:
   ``1 6 a O D D a D O D b O O O c O O O d O O O e O O O 0``;
2. the occupied Wyckoff orbits;
3. the composition: element symbol + atomic fraction rounded to 2 decimals
   (``numpy.round``), elements in order of increasing Pauling electronegativity
   (ties by atomic number; elements without one, such as He, last; a dummy ``X`` first).

Two variants share parts 1 and 3 and differ in part 2:

``cloud`` (the published CLOUD grammar)
    Wyckoff symbols (conventional-cell multiplicity + letter, from the
    ``cloud_wyckoff_multiplicities`` table), each listed once, in site order.
    The published strings follow the site order of their source files, which is
    arbitrary (``1b 3d 1a`` and ``1a 1b 3c`` both occur for cubic perovskites);
    here "site order" is made canonical: sites sorted by (element
    electronegativity rank, Wyckoff letter), so the string does not depend on
    the order of the input sites. Example (rock salt, any cell):
    ``1 6 a O D D ... 0 | 4a 4b | Na 0.5 Cl 0.5``.

``native`` (ours, coordinate-free and lossless about orbit occupation)
    one ``<symbol>:<element>`` token per crystallographic orbit (so orbits that
    share a letter are counted), sorted by (element electronegativity rank,
    Wyckoff letter), e.g. perovskite SrTiO3:
    ``... | 1a:Sr 1b:Ti 3c:O | Sr 0.2 Ti 0.2 O 0.6``. Space group 39 uses the
    corrected generator ``03aODDbOOOjODO0`` (the published table's ``c``, a
    two-fold axis along b, is not an operation of Aem2; the mirror ``j`` is).

Wyckoff letters depend on the choice of origin (rock salt may give Na on 4a or
on 4b). Both variants remove that freedom: among all settings related by the
affine normaliser of the space group (origin shifts and axis changes that map
the group onto itself, see :mod:`cloud_model.wyckoff`), the one whose sorted
``(element rank, letter)`` list is lexicographically smallest is used. The
result is the same for any cell (primitive, conventional, supercell), origin,
rotation, site order, and for noise below ``symprec``.

Example:
    >>> from pymatgen.core import Lattice, Structure
    >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
    ...                                  [[0, 0, 0], [0.5, 0.5, 0.5]])
    >>> encode_scope(nacl).split(" | ")[1:]
    ['4a 4b', 'Na 0.5 Cl 0.5']
    >>> encode_scope(nacl, variant="native").split(" | ")[1]
    '4a:Na 4b:Cl'
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import spglib

from cloud_model.errors import SymmetryError

if TYPE_CHECKING:
    from numpy.typing import NDArray

logger = logging.getLogger(__name__)
spglib.error.OLD_ERROR_HANDLING = False

Variant = Literal["cloud", "native"]
VARIANTS: tuple[Variant, ...] = ("cloud", "native")
# bump whenever an encoder change can change any output string (part of corpus cache keys)
ENCODER_VERSION = "2"
MIN_DISTANCE = 0.5  # Angstrom: closer atoms are "overlapping" and rejected
PART_SEPARATOR = " | "
CORRECTED_GENERATORS: dict[int, str] = {39: "03aODDbOOOjODO0"}


@dataclass(frozen=True)
class ScopeTables:
    """The published lookup tables, loaded once from the dataset registry.

    Attributes:
        generators: space-group number -> encoded generator string (as published).
        multiplicities: space-group number -> Wyckoff letter -> conventional multiplicity.
    """

    generators: dict[int, str]
    multiplicities: dict[int, dict[str, int]]

    def generator(self, number: int, variant: Variant) -> str:
        """Encoded generators of space group ``number``, one space between characters."""
        code = CORRECTED_GENERATORS.get(number) if variant == "native" else None
        return " ".join(code or self.generators[number])


@lru_cache(maxsize=1)
def scope_tables() -> ScopeTables:
    """The generator and Wyckoff-multiplicity tables (``cloud_generators``, ``cloud_wyckoff_multiplicities``)."""
    from cloud_model.datasets import resource_path

    with resource_path("cloud_generators").open(encoding="utf-8") as fh:
        generators = {int(k): str(v) for k, v in json.load(fh).items()}
    with resource_path("cloud_wyckoff_multiplicities").open(encoding="utf-8") as fh:
        raw = json.load(fh)
    multiplicities = {int(k): {letter: int(m) for letter, m in v.items()} for k, v in raw.items() if v}
    missing = [n for n in range(1, 231) if n not in generators or n not in multiplicities]
    if missing:
        raise SymmetryError(f"SCOPE tables lack space groups {missing[:10]}: the resource files are corrupt")
    return ScopeTables(generators, multiplicities)


def letter_rank(letter: str) -> int:
    """Order of Wyckoff letters: a..z, then the 27th position's ``A`` (space group 47)."""
    return ord(letter) - ord("a") if letter.islower() else 26 + ord(letter) - ord("A")


@lru_cache(maxsize=256)
def element_rank(symbol: str) -> tuple[float, int]:
    """Sort key of an element in part 3: (Pauling electronegativity or +inf, atomic number).

    The dummy element ``X`` comes first (electronegativity 0, as in the published strings).
    """
    from pymatgen.core.periodic_table import Element

    if symbol == "X":
        return (0.0, 0)
    element = Element(symbol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns for elements without an electronegativity
        x = element.X
    return (x if math.isfinite(x) else math.inf, element.Z)


def format_fraction(value: float) -> str:
    """An atomic fraction as written in part 3: ``numpy.round(value, 2)`` as a float string."""
    return repr(float(np.round(value, 2)))


@dataclass(frozen=True)
class CellArrays:
    """A periodic cell as plain arrays, ready for spglib.

    Attributes:
        lattice: (3, 3) lattice vectors as rows, Angstrom.
        frac_coords: (N, 3) fractional coordinates.
        symbols: length-N element symbols (``X`` for a dummy species).
    """

    lattice: NDArray[np.float64]
    frac_coords: NDArray[np.float64]
    symbols: tuple[str, ...]


def cell_arrays(structure: Any) -> CellArrays:
    """Validate a pymatgen ``Structure`` and extract its arrays.

    Raises:
        SymmetryError: not a periodic structure (e.g. a ``Molecule``), no sites, or a
            disordered site (several species or an occupancy below 1).
    """
    from pymatgen.core import IStructure, Structure

    if not isinstance(structure, Structure | IStructure):
        kind = type(structure).__name__
        raise SymmetryError(f"SCOPE needs a periodic pymatgen Structure, got a non-periodic/unknown {kind}")
    if len(structure) == 0:
        raise SymmetryError("cannot encode an empty structure (no sites)")
    symbols: list[str] = []
    for index, site in enumerate(structure):
        species = site.species
        if len(species) != 1:
            raise SymmetryError(
                f"site {index} is disordered ({species.formula}): SCOPE needs an ordered structure; "
                "order it first (e.g. pymatgen OrderDisorderedStructureTransformation)"
            )
        (specie, occupancy), = species.items()
        if abs(occupancy - 1.0) > 1e-6:
            raise SymmetryError(
                f"site {index} has partial occupancy {occupancy:g} of {specie}: SCOPE needs full occupancy"
            )
        symbol = getattr(specie, "symbol", str(specie))
        symbols.append("X" if not getattr(specie, "Z", 0) else _element_symbol(symbol))
    lattice = np.asarray(structure.lattice.matrix, dtype=np.float64)
    frac = np.asarray(structure.frac_coords, dtype=np.float64)
    return CellArrays(lattice, frac, tuple(symbols))


@lru_cache(maxsize=512)
def _element_symbol(symbol: str) -> str:
    from pymatgen.core.periodic_table import Element

    return str(Element(symbol).symbol) if Element.is_valid_symbol(symbol) else "X"


_IMAGES = np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij")).reshape(3, -1).T  # (27, 3)


def _check_overlaps(cell: CellArrays, min_distance: float = MIN_DISTANCE) -> None:
    """Raise :class:`SymmetryError` if two atoms (or an atom and its own image) are closer than ``min_distance``.

    Images in the 27 neighbouring cells are compared (exact for reduced, not too skewed cells);
    rows are processed in blocks so that memory stays O(64 N) for large cells.
    """
    n = len(cell.symbols)
    self_images = np.linalg.norm(_IMAGES[_IMAGES.any(axis=1)] @ cell.lattice, axis=1)  # (26,)
    if self_images.min() < min_distance:
        raise SymmetryError(
            f"overlapping atoms: a lattice translation is only {self_images.min():.3f} A long (< {min_distance} A)"
        )
    for lo in range(0, n, 64):
        block = cell.frac_coords[lo : lo + 64]
        diff = block[:, None, :] - cell.frac_coords[None, :, :]  # (b, N, 3)
        diff -= np.round(diff)
        cart = (diff[:, :, None, :] + _IMAGES[None, None, :, :]) @ cell.lattice  # (b, N, 27, 3)
        dist = np.sqrt(np.einsum("ijkl,ijkl->ijk", cart, cart)).min(axis=2)  # (b, N)
        dist[np.arange(len(block)), np.arange(lo, lo + len(block))] = np.inf  # an atom and itself
        i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
        if dist[i, j] < min_distance:
            a, b = sorted((lo + int(i), int(j)))
            raise SymmetryError(
                f"overlapping atoms: sites {a} ({cell.symbols[a]}) and {b} ({cell.symbols[b]}) "
                f"are {dist[i, j]:.3f} A apart (< {min_distance} A)"
            )


def symmetry_dataset(cell: CellArrays, *, symprec: float, angle_tolerance: float) -> Any:
    """Run ``spglib.get_symmetry_dataset`` once; :class:`SymmetryError` when spglib fails."""
    species = sorted(set(cell.symbols))
    types = [species.index(s) + 1 for s in cell.symbols]
    try:
        dataset = spglib.get_symmetry_dataset(
            (cell.lattice, cell.frac_coords, types),  # type: ignore[arg-type]  # spglib accepts arrays
            symprec=symprec,
            angle_tolerance=angle_tolerance,
        )
    except spglib.error.SpglibError as exc:
        raise SymmetryError(
            f"spglib found no space group at symprec={symprec} A, angle_tolerance={angle_tolerance} deg: "
            f"{exc}; try another symprec (0.01-0.1 A is usual) or check the structure"
        ) from exc
    if dataset is None:  # older spglib error convention
        raise SymmetryError(f"spglib found no space group at symprec={symprec} A: {spglib.get_error_message()}")
    return dataset


@dataclass(frozen=True)
class Orbit:
    """One occupied crystallographic orbit.

    Attributes:
        element: element symbol.
        letter: Wyckoff letter in the canonical setting.
        multiplicity: conventional-cell multiplicity of the Wyckoff position.
        first_site: index of its first site in the input structure.
    """

    element: str
    letter: str
    multiplicity: int
    first_site: int

    @property
    def symbol(self) -> str:
        """Wyckoff symbol, e.g. ``4a``."""
        return f"{self.multiplicity}{self.letter}"


@dataclass(frozen=True)
class ScopeAnalysis:
    """What the encoder knows about a structure, before it is written as a string.

    Attributes:
        number: space-group number (1-230).
        hall_number: spglib Hall number of the standard setting used.
        orbits: occupied orbits in canonical order (element rank, letter).
        composition: element -> atomic fraction (unrounded), in electronegativity order.
    """

    number: int
    hall_number: int
    orbits: tuple[Orbit, ...]
    composition: dict[str, float]


def analyse(
    structure: Any, *, symprec: float = 0.1, angle_tolerance: float = 5.0
) -> ScopeAnalysis:
    """Validate, symmetrise and canonicalise a structure (the work behind :func:`encode_scope`).

    Args:
        structure: an ordered pymatgen ``Structure``.
        symprec: spglib distance tolerance in Angstrom (atoms displaced less than this are
            treated as on their symmetric positions).
        angle_tolerance: spglib angle tolerance in degrees.

    Raises:
        SymmetryError: empty, non-periodic, disordered or overlapping structure, or spglib failure.
    """
    if not (math.isfinite(symprec) and symprec > 0):
        raise SymmetryError(f"symprec must be a positive length in Angstrom, got {symprec}")
    cell = cell_arrays(structure)
    _check_overlaps(cell)
    dataset = symmetry_dataset(cell, symprec=symprec, angle_tolerance=angle_tolerance)
    return _analysis_from_dataset(cell, dataset)


def _analysis_from_dataset(cell: CellArrays, dataset: Any) -> ScopeAnalysis:
    from cloud_model.wyckoff import canonical_letters

    tables = scope_tables()
    number = int(dataset.number)
    multiplicity = tables.multiplicities[number]
    orbit_ids = np.asarray(dataset.crystallographic_orbits)
    _, first = np.unique(orbit_ids, return_index=True)
    first_sites = [int(i) for i in sorted(first)]
    elements = [cell.symbols[i] for i in first_sites]
    for site, orbit in enumerate(orbit_ids):
        if cell.symbols[site] != cell.symbols[int(orbit)]:
            raise SymmetryError(
                f"spglib put sites {int(orbit)} ({cell.symbols[int(orbit)]}) and {site} ({cell.symbols[site]}) "
                "in one orbit: the tolerance is too large for this structure; use a smaller symprec"
            )
    letters = canonical_letters(dataset, first_sites, [element_rank(e) for e in elements])
    unknown = [letter for letter in letters if letter not in multiplicity]
    if unknown:
        raise SymmetryError(f"Wyckoff letters {unknown} unknown for space group {number} in the multiplicity table")
    orbits = sorted(
        (Orbit(e, letter, multiplicity[letter], i) for e, letter, i in zip(elements, letters, first_sites, strict=True)),
        key=lambda o: (element_rank(o.element), letter_rank(o.letter), o.first_site),
    )
    counts: dict[str, int] = {}
    for symbol in cell.symbols:
        counts[symbol] = counts.get(symbol, 0) + 1
    total = len(cell.symbols)
    composition = {e: counts[e] / total for e in sorted(counts, key=element_rank)}
    return ScopeAnalysis(number, int(dataset.hall_number), tuple(orbits), composition)


def format_scope(analysis: ScopeAnalysis, variant: Variant = "cloud") -> str:
    """Write a :class:`ScopeAnalysis` in the grammar of ``variant`` (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SCOPE variant {variant!r}; choose one of {VARIANTS}")
    generators = scope_tables().generator(analysis.number, variant)
    if variant == "cloud":
        symbols: list[str] = []
        for orbit in analysis.orbits:
            if orbit.symbol not in symbols:
                symbols.append(orbit.symbol)
        wyckoff = " ".join(symbols)
    else:
        wyckoff = " ".join(f"{o.symbol}:{o.element}" for o in analysis.orbits)
    composition = " ".join(f"{e} {format_fraction(f)}" for e, f in analysis.composition.items())
    return PART_SEPARATOR.join((generators, wyckoff, composition))


def encode_scope(
    structure: Any,
    *,
    symprec: float = 0.1,
    angle_tolerance: float = 5.0,
    variant: Variant = "cloud",
) -> str:
    """Encode a crystal as a SCOPE string.

    Args:
        structure: an ordered, periodic pymatgen ``Structure`` (any cell, origin, site order).
        symprec: spglib distance tolerance in Angstrom.
        angle_tolerance: spglib angle tolerance in degrees.
        variant: ``"cloud"`` (the published CLOUD grammar) or ``"native"`` (orbits bound to
            elements, counted; corrected generators), see the module docstring.

    Returns:
        The SCOPE string, three parts joined by ``" | "``.

    Raises:
        SymmetryError: empty or non-periodic input, partial occupancy/disorder, atoms closer
            than 0.5 A, or no space group found by spglib at this tolerance.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SCOPE variant {variant!r}; choose one of {VARIANTS}")
    return format_scope(analyse(structure, symprec=symprec, angle_tolerance=angle_tolerance), variant)
