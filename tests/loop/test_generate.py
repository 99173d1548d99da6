"""Substitution generator and structure checks on rock salt; the CLI's bad-input error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pymatgen.core import Lattice, Structure

from loop.generate.checks import CheckConfig, check_structure
from loop.generate.substitution import SubstitutionConfig, propose_substitutions

REPO = Path(__file__).resolve().parents[2]


def _rock_salt(a: float = 5.64) -> Structure:
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )


def test_substitutions_into_rock_salt_are_charge_balanced_with_provenance() -> None:
    proposals, rejected = propose_substitutions(
        [("nacl", _rock_salt().get_primitive_structure())], SubstitutionConfig(threshold=5e-3)
    )
    assert proposals, "no substitution proposed for NaCl"
    for p in proposals:
        s = Structure.from_str(p.cif, fmt="cif")
        assert check_structure(s, CheckConfig(min_distance_a=0.5)) in (None, "too_close")
        assert p.parent_id == "nacl" and p.substitutions and 0 < p.probability <= 1
        assert s.composition.oxi_state_guesses(), f"{p.formula} is not charge balanced"
    assert sum(rejected.values()) > 0  # unbalanced maps are counted, not silently dropped


def test_a_squeezed_cell_fails_the_distance_check() -> None:
    ok = _rock_salt().get_primitive_structure()
    assert check_structure(ok, CheckConfig()) is None
    squeezed = _rock_salt(1.2).get_primitive_structure()
    assert check_structure(squeezed, CheckConfig()) == "too_close"


def test_cli_bad_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "loop", "generate", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 2
    assert "nope" in run.stderr and len(run.stderr.strip().splitlines()) == 1
