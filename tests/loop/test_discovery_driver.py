"""The discovery driver's generator pieces (benchmarks/discover/generate.py) on tiny real cases."""

from __future__ import annotations

from pymatgen.core import Composition, Lattice, Structure

from benchmarks.discover.common import SPACE
from benchmarks.discover.generate import substitute_into_space, unique_proposals


def _layered_naalo2() -> Structure:
    """alpha-NaFeO2-type NaAlO2 (R-3m): Na 3a, Al 3b, O 6c; an ordered rock salt."""
    return Structure.from_spacegroup(
        "R-3m",
        Lattice.hexagonal(2.87, 15.9),
        ["Na", "Al", "O"],
        [[0, 0, 0], [0, 0, 0.5], [0, 0, 0.24]],
    ).get_primitive_structure()


def _rocksalt(cation: str, a: float) -> Structure:
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(a), [cation, "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )


def test_substitution_into_the_space_keeps_charge_balanced_products_only() -> None:
    proposals, rejected = substitute_into_space(
        [("naalo2", _layered_naalo2())], threshold=1e-6, max_per_parent=10
    )
    # Na+ Al3+ -> (Li+, Al3+), (Mg2+, Mg2+) or (Al3+, Li+): +4 against O2 -4; the other six
    # maps of two sites onto {Li+, Mg2+, Al3+} are not charge balanced
    assert sorted(p.formula for p in proposals) == ["LiAlO2", "LiAlO2", "MgO"]
    assert rejected["not_charge_balanced"] == 6
    for p in proposals:
        assert {el.symbol for el in Composition(p.formula).elements} <= set(SPACE)
        assert p.parent_id == "naalo2" and p.generator == "substitution"
        assert p.substitutions["Na+"] in ("Li+", "Mg2+", "Al3+")
    probabilities = [p.probability for p in proposals]
    assert probabilities == sorted(probabilities, reverse=True)
    # Na+ -> Li+ is the commonest of the three in the lambda table
    assert proposals[0].substitutions == {"Na+": "Li+"}

    strict, why = substitute_into_space(
        [("naalo2", _layered_naalo2())], threshold=probabilities[0] * 1.01, max_per_parent=10
    )
    assert strict == [] and why["below_threshold"] == 3


def test_unique_proposals_drops_registry_and_repeated_structures() -> None:
    cao = _rocksalt("Ca", 4.81)
    proposals, _ = substitute_into_space([("cao-1", cao), ("cao-2", cao)], 1e-6, 5)
    assert [p.formula for p in proposals] == ["MgO", "MgO"]  # Ca2+ -> Mg2+ only
    pairs = [(p, Structure.from_str(p.cif, fmt="cif")) for p in proposals]
    keep, rejected = unique_proposals(pairs, known=[])
    assert keep == [0] and rejected == {"duplicate_of_generated": 1}
    # rock-salt MgO at its own lattice constant matches (StructureMatcher scales the volume)
    keep, rejected = unique_proposals(pairs, known=[("reg:mgo", _rocksalt("Mg", 4.21))])
    assert keep == [] and rejected == {"duplicate_of_pool": 2}
