"""Generators end to end on real data: substitution and symmetry outputs, hull, cache, CLI pool.

CHGNet is the real pretrained model (static energies on 2-atom cells keep these fast);
the symmetry statistics are counted from the first structures of ``mp_20_pilot``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from loop.generate import EnergyConfig, GenerateConfig, generate_candidates
from loop.generate.checks import is_charge_balanced, space_group
from loop.generate.energies import ChgnetEnergies
from loop.generate.hull import competing_phases, hull_stability
from loop.generate.substitution import SubstitutionConfig
from loop.generate.symmetry import SymmetryConfig, propose_symmetric, wyckoff_templates

REPO = Path(__file__).resolve().parents[2]


def _rock_salt(a: float, cation: str = "Na", anion: str = "Cl") -> Structure:
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]]
    ).get_primitive_structure()


@pytest.fixture(scope="module")
def energies(tmp_path_factory: pytest.TempPathFactory) -> ChgnetEnergies:
    """Static CHGNet energies (no relaxation), cached in a fresh directory."""
    cache = tmp_path_factory.mktemp("chgnet")
    return ChgnetEnergies(EnergyConfig(relax=False, cache_dir=cache))


def test_rock_salt_substitution_balanced_unique_encoded_with_provenance(
    energies: ChgnetEnergies,
) -> None:
    parents = [("nacl", _rock_salt(5.64)), ("kcl", _rock_salt(6.29, "K"))]
    config = GenerateConfig(
        substitution=SubstitutionConfig(threshold=5e-3, max_per_parent=8),
        energies=energies.config,
    )
    result = generate_candidates(parents, config, energies=energies)
    out = result.candidates
    assert out, result.summary
    # NaCl -> KCl reproduces the KCl parent (a pool structure): never kept
    assert "KCl" not in {c.formula for c in out} and "NaCl" not in {c.formula for c in out}
    assert result.summary.rejected.get("duplicate_of_pool", 0) >= 1
    structures = [Structure.from_str(c.cif, fmt="cif") for c in out]
    matcher = StructureMatcher()
    for i, (c, s) in enumerate(zip(out, structures, strict=True)):
        assert is_charge_balanced(s), c.formula
        assert c.scope and "|" in c.scope  # a SCOPE string
        assert c.provenance["generator"] == "substitution"
        assert c.provenance["parent_id"] in {"nacl", "kcl"} and c.provenance["substitutions"]
        assert c.provenance["relaxation"]["method"].startswith("chgnet")
        for other in structures[:i]:  # no two outputs are the same crystal
            assert not matcher.fit(s, other)
    assert len({c.id for c in out}) == len(out)


def test_the_chemical_space_keeps_substitutions_inside_it(energies: ChgnetEnergies) -> None:
    parents = [("nacl", _rock_salt(5.64)), ("kcl", _rock_salt(6.29, "K"))]
    sub = SubstitutionConfig(threshold=5e-3, max_per_parent=8)
    free = generate_candidates(
        parents, GenerateConfig(substitution=sub, energies=energies.config), energies=energies
    )
    space = ["Br", "Cl", "K", "Li", "Na"]
    inside = generate_candidates(
        parents,
        GenerateConfig(substitution=sub, energies=energies.config, elements=space),
        energies=energies,
    )

    def elements(candidates: list) -> set[str]:
        return {e.symbol for c in candidates for e in Structure.from_str(c.cif, fmt="cif").species}

    assert elements(free.candidates) - set(space)  # unconstrained, products leave the space
    assert inside.candidates and elements(inside.candidates) <= set(space)
    assert inside.summary.rejected["outside_space"] > 0
    assert {c.formula for c in inside.candidates} == {
        c.formula for c in free.candidates if elements([c]) <= set(space)
    }
    with pytest.raises(ValueError, match="not element symbols: Xx"):
        GenerateConfig(elements=["Na", "Xx"])


def test_chgnet_energy_cache_hits_and_misses(tmp_path: Path) -> None:
    config = EnergyConfig(relax=False, cache_dir=tmp_path)
    first = ChgnetEnergies(config)
    a = first.evaluate(_rock_salt(5.64))
    again = first.evaluate(_rock_salt(5.64))
    assert (first.computed, first.hits) == (1, 1) and again.energy_per_atom == a.energy_per_atom
    changed = first.evaluate(_rock_salt(5.80))  # another lattice: another key
    assert first.computed == 2 and changed.energy_per_atom != a.energy_per_atom
    reopened = ChgnetEnergies(config)  # the cache is on disk
    assert reopened.evaluate(_rock_salt(5.64)).energy_per_atom == a.energy_per_atom
    assert (reopened.computed, reopened.hits) == (0, 1)


def test_hull_of_stable_rock_salt_is_near_zero_and_a_distorted_copy_above(
    energies: ChgnetEnergies,
) -> None:
    competing = competing_phases("mp_20_biternary", ["Na", "Cl"], max_atoms=8)
    assert any(s.composition.reduced_formula == "NaCl" for _, s in competing)
    stable = _rock_salt(5.69)  # close to the PBE lattice constant the registry's NaCl has
    distorted = stable.copy()
    distorted.apply_strain([0.08, -0.05, 0.03])
    distorted.translate_sites([0], [0.07, 0.02, -0.04], frac_coords=True)
    results = hull_stability([("stable", stable), ("distorted", distorted)], competing, energies)
    by_id = {r.candidate_id: r for r in results}
    assert abs(by_id["stable"].e_above_hull) < 0.02, by_id["stable"]
    assert not by_id["stable"].new and by_id["stable"].matched_id is not None
    assert by_id["distorted"].e_above_hull > 0.02, by_id["distorted"]
    assert by_id["distorted"].e_above_hull > by_id["stable"].e_above_hull + 0.02


def test_symmetry_generator_builds_observed_wyckoff_sets(
    tmp_path: Path, energies: ChgnetEnergies
) -> None:
    config = SymmetryConfig(
        elements=["Li", "Na", "Mg", "O"],
        require=["O"],
        n_proposals=6,
        max_atoms=12,
        statistics_dataset="mp_20_pilot",
        statistics_splits=["train"],
        statistics_max_structures=250,
        cache_dir=tmp_path,
    )
    templates = wyckoff_templates(config)
    assert templates and templates[0].count >= templates[-1].count
    assert sum(t.count for t in templates) <= 250
    proposals, rejected = propose_symmetric(config)
    assert len(proposals) == 6
    for p in proposals:
        s = Structure.from_str(p.cif, fmt="cif")
        assert "O" in {el.symbol for el in s.composition.elements}
        assert is_charge_balanced(s), p.formula
        assert p.generator == "symmetry" and p.parameters["space_group"] >= 1
        assert set(p.parameters["wyckoff"]) <= {"Li", "Na", "Mg", "O"}
        # spglib recovers the sampled space group from the built crystal
        assert space_group(s, 1e-3, 5.0) == p.parameters["space_group"], p.parameters
    assert rejected["not_charge_balanced"] > 0  # counted, not silently dropped
    # the same seed gives the same structures (provenance is enough to rebuild them)
    again, _ = propose_symmetric(config)
    assert [p.cif for p in again] == [p.cif for p in proposals]
    # through the pipeline: unrelaxed (static energies), checked, deduplicated, encoded
    result = generate_candidates(
        [],
        GenerateConfig(substitution=None, symmetry=config, energies=energies.config),
        energies=energies,
    )
    assert result.candidates
    for c in result.candidates:
        assert c.scope and c.provenance["generator"] == "symmetry"
        assert c.provenance["parent_id"] and "pyxtal_seed" in c.provenance["parameters"]


def test_cli_pool_csv_loads_as_a_campaign_pool(tmp_path: Path) -> None:
    from loop.config import parse_config
    from loop.pool import load_pool

    parents = tmp_path / "parents"
    parents.mkdir()
    _rock_salt(5.64).to(filename=str(parents / "NaCl.cif"))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "loop", "generate", str(parents), "--out", str(out),
         "--no-relax", "--max-per-parent", "4", "--hull-dataset", "none",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    with (out / "pool.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(json.loads(r["provenance"])["parent_id"] == "NaCl" for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["encoded"] == len(rows)
    config = parse_config(
        {
            "name": "generated_pool",
            "pool": {"file": str(out / "pool.csv"), "structure_format": "cif"},
            "objective": {"target": "formation_energy_per_atom", "sense": "minimize"},
            "adapter": {"kind": "chgnet"},
        }
    )
    pool = load_pool(config.pool, config.targets)
    assert pool.ids == [r["material_id"] for r in rows]
    assert pool.scopes == [r["scope"] for r in rows]  # re-encoded from the CIF: same string
    assert set(pool.cifs) == set(pool.ids) and not pool.invalid
