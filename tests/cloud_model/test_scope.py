"""SCOPE encoder: published grammar, canonical strings, clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Molecule, Structure

from cloud_model.errors import SymmetryError
from cloud_model.scope import encode_scope, scope_tables

FM3M = "1 6 a O D D a D O D b O O O c O O O d O O O e O O O 0"


def rocksalt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_rocksalt_primitive_cell_uses_conventional_multiplicities() -> None:
    prim = rocksalt().get_primitive_structure()
    assert len(prim) == 2
    expected = f"{FM3M} | 4a 4b | Na 0.5 Cl 0.5"
    assert encode_scope(prim) == expected
    assert encode_scope(rocksalt()) == expected
    assert encode_scope(prim, variant="native") == f"{FM3M} | 4a:Na 4b:Cl | Na 0.5 Cl 0.5"


def test_tables_cover_all_groups() -> None:
    tables = scope_tables()
    assert len(tables.generators) == 230 and len(tables.multiplicities) == 230
    assert tables.generator(39, "cloud") == " ".join("03aODDbOOOcODO0")
    assert tables.generator(39, "native") == " ".join("03aODDbOOOjODO0")


def test_bad_inputs_raise_symmetry_error() -> None:
    with pytest.raises(SymmetryError, match="empty"):
        encode_scope(Structure(Lattice.cubic(3), [], []))
    with pytest.raises(SymmetryError, match="non-periodic"):
        encode_scope(Molecule(["H", "H"], [[0, 0, 0], [0, 0, 0.74]]))
    disordered = Structure(Lattice.cubic(3), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    with pytest.raises(SymmetryError, match="disordered"):
        encode_scope(disordered)
    partial = Structure(Lattice.cubic(3), [{"Fe": 0.7}], [[0, 0, 0]])
    with pytest.raises(SymmetryError, match="partial occupancy"):
        encode_scope(partial)
    overlapping = Structure(Lattice.cubic(4), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])
    with pytest.raises(SymmetryError, match=r"overlapping atoms: sites 0 \(Na\) and 1 \(Cl\) are 0.200 A"):
        encode_scope(overlapping)
    across_boundary = Structure(Lattice.cubic(4), ["Na", "Cl"], [[0.01, 0, 0], [0.98, 0, 0]])
    with pytest.raises(SymmetryError, match="overlapping"):
        encode_scope(across_boundary)
    with pytest.raises(ValueError, match="variant"):
        encode_scope(rocksalt(), variant="bert")  # type: ignore[arg-type]


def test_spglib_failure_is_a_symmetry_error() -> None:
    # a tolerance larger than the cell makes spglib's search fail
    structure = Structure(Lattice.cubic(4), ["Na", "Cl"], np.array([[0, 0, 0], [0.5, 0.5, 0.5]]))
    with pytest.raises(SymmetryError, match=r"spglib found no space group at symprec=10.0"):
        encode_scope(structure, symprec=10.0, angle_tolerance=-1.0)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(SymmetryError, match="positive"):
            encode_scope(structure, symprec=bad)
