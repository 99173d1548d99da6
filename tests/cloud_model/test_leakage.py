"""The leakage guard: planted duplicates are caught under the right reason; formulas are exact."""

from __future__ import annotations

from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

from cloud_model.composition import formula_from_cloud, formula_from_native, parse_formula
from cloud_model.errors import ConfigError, DataError
from cloud_model.leakage import (
    GUARD_REASONS,
    LeakageGuard,
    PoolIndex,
    RowKeys,
    build_pool_index,
    cloud_key,
    guard_summary,
    read_guard_report,
    structure_row_keys,
    write_guard_report,
)
from cloud_model.multitask_data import GuardReport
from cloud_model.scope import encode_scope


def _rock_salt(a: str = "Na", b: str = "Cl", lattice: float = 5.64) -> Structure:
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(lattice), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )


def _cesium_chloride(a: str = "Na", b: str = "Cl") -> Structure:
    return Structure.from_spacegroup(
        "Pm-3m", Lattice.cubic(3.4), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )


def _perovskite() -> Structure:
    return Structure.from_spacegroup(
        "Pm-3m", Lattice.cubic(3.9), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]]
    )


def _keys(rid: str, structure: Structure) -> RowKeys:
    native = encode_scope(structure, variant="native")
    return RowKeys(rid, native, cloud_key(encode_scope(structure)), formula_from_native(native))


def test_formula_from_native_is_exact_on_hand_built_crystals() -> None:
    supercell = _perovskite().make_supercell([2, 1, 1], in_place=False)
    assert formula_from_native(encode_scope(supercell, variant="native")) == "SrTiO3"
    spinel = Structure.from_spacegroup(
        "Fd-3m", Lattice.cubic(8.08), ["Mg", "Al", "O"],
        [[0, 0, 0], [0.625, 0.625, 0.625], [0.3875, 0.3875, 0.3875]],
    )  # fmt: skip
    assert formula_from_native(encode_scope(spinel, variant="native")) == "MgAl2O4"
    with pytest.raises(DataError, match="native SCOPE orbit"):
        formula_from_native(
            encode_scope(spinel)
        )  # a cloud-variant string has no elements in part 2


def test_formula_from_cloud_recovers_every_cloud_cv_formula() -> None:
    from cloud_model.datasets import load_dataset

    assert formula_from_cloud("0 | 3a 3b 18h | Ba 0.12 Ti 0.12 F 0.75", 8.0) == "BaTiF6"
    assert (
        formula_from_cloud("0 | 1a | Na 0.33 Cl 0.67", None) == "NaCl2"
    )  # smallest cell that fits
    assert formula_from_cloud("0 | 1a | Na 0.5 Cl 0.5", 3.0) == "NaCl"  # 3 atoms cannot: searched
    assert formula_from_cloud("0 | 1a | Na", None) is None
    records = load_dataset("cloud_cv").records
    for r in records:
        formula = formula_from_cloud(r.scope or "", r.extra["n_atoms"])
        assert formula is not None, r.scope
        written = cloud_key(r.scope or "").split(" | ")[2]  # (element, fraction) pairs, sorted
        assert cloud_key(parse_formula(formula)[1]).split(" | ")[2] == written, (formula, r.scope)


def test_cloud_key_ignores_the_published_site_order() -> None:
    a = "1 4 b O O O c O O O d O O O e O O O 0 | 1b 3d 1a | Sr 0.2 Ti 0.2 O 0.6"
    b = "1 4 b O O O c O O O d O O O e O O O 0 | 1a 1b 3d | Sr 0.2 Ti 0.2 O 0.6"
    c = "1 4 b O O O c O O O d O O O e O O O 0 | 1a 1b 3c | Sr 0.2 Ti 0.2 O 0.6"
    assert cloud_key(a) == cloud_key(b) != cloud_key(c)


def test_planted_duplicates_are_removed_under_the_right_reason() -> None:
    index = PoolIndex()
    pool_salt = _keys("mp-22862", _rock_salt())
    published = "1 4 b O O O c O O O d O O O e O O O 0 | 1b 3d 1a | Ba 0.2 Ti 0.2 O 0.6"
    index.add(
        "pool:test", [pool_salt, RowKeys("cloud_cv:test:7", None, cloud_key(published), "BaTiO3")]
    )
    assert index.names == ["pool:test"] and index.rows == {"pool:test": 2}
    rows = [
        RowKeys("mp-22862", None, None, "KBr"),  # the pool's id, nothing else -> id
        _keys("mp-1", _rock_salt(lattice=5.70)),  # the same crystal, another cell size -> structure
        # a published string of a pool crystal known only by its published string -> structure
        RowKeys(
            "cloud_cv:train:3", None, cloud_key(published.replace("1b 3d 1a", "1a 3d 1b")), None
        ),
        _keys("mp-2", _cesium_chloride()),  # another polymorph of NaCl -> formula
        RowKeys(
            "crabnet_x:train:0", formula=parse_formula("Na2Cl2")[0]
        ),  # composition row -> formula
        _keys("mp-3", _rock_salt("K", "Cl")),  # clean
        RowKeys("crabnet_x:train:1", formula="BaTiO2"),  # clean
    ]
    assert [index.reason(r) for r in rows] == [
        "id", "structure", "structure", "formula", "formula", None, None,
    ]  # fmt: skip
    guard = LeakageGuard(index)
    keep = guard.filter("planted", rows)
    assert keep == [False] * 5 + [True] * 2
    guard.drop("planted", "unparsable_formula", 3)
    report = guard.report()
    assert report.pools == ["pool:test"]
    assert report.removed == {
        "planted": {"id": 1, "structure": 2, "formula": 2, "unparsable_formula": 3}
    }
    assert report.kept == {"planted": 2} and report.total_removed() == 8
    # each criterion on its own: the structure duplicate also shares the formula
    assert index.overlaps(rows) == {"id": 1, "structure": 2, "formula": 3}
    assert index.overlaps([r for r, k in zip(rows, keep, strict=True) if k]) == dict.fromkeys(
        GUARD_REASONS, 0
    )


def test_report_summary_and_json_round_trip(tmp_path: Path) -> None:
    report = GuardReport(
        pools=["perov_5:val", "perov_5:test"],
        removed={"a": {"formula": 5, "id": 1}, "b": {"structure": 2, "unknown_tokens": 4}},
        kept={"a": 10, "b": 20},
    )
    summary = guard_summary(report)
    assert summary["excluded_pools"] == ["perov_5:val", "perov_5:test"]
    assert summary["removed_by_reason"] == {
        "formula": 5,
        "id": 1,
        "structure": 2,
        "unknown_tokens": 4,
    }
    assert summary["removed_total"] == 8 and summary["dropped_invalid_total"] == 4
    assert summary["kept_total"] == 30
    path = write_guard_report(report, tmp_path / "guard.json", extra={"note": "x"})
    assert read_guard_report(path) == report
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a cloudlab-guard-report-1"):
        read_guard_report(tmp_path / "other.json")


def test_pool_index_of_a_published_set_and_bad_pools() -> None:
    index = build_pool_index({"cloud_cv": ["test"]})
    assert index.names == ["cloud_cv:test"] and index.rows == {"cloud_cv:test": 299}
    assert len(index.clouds_only) == len(index.clouds) > 250 and not index.natives
    assert not index.no_formula  # every published string gives its formula back
    with pytest.raises(ConfigError, match="'perov_6'"):
        build_pool_index({"perov_6": ["test"]})
    with pytest.raises(ConfigError, match="no split 'train'"):
        build_pool_index({"perov_5": ["train"]})
    with pytest.raises(ConfigError, match="crabnet_expt_gap"):
        build_pool_index({"crabnet_expt_gap": ["train"]})
    with pytest.raises(DataError, match="formula set"):
        structure_row_keys("crabnet_expt_gap")


@pytest.mark.slow
def test_native_formulas_match_the_files_formula_columns() -> None:
    """On the real perov_5 and mp_20_biternary crystals (native encodings cached per dataset)."""
    from cloud_model.datasets import load_dataset

    for name in ("perov_5", "mp_20_biternary"):
        keys = {k.id: k for k in structure_row_keys(name)}
        records = load_dataset(name).records
        assert len(keys) == len(records) > 7000
        for r in records:
            assert keys[r.id].formula == parse_formula(r.extra["formula"])[0], r.id
