"""The shared loader of labelled crystals: CSV rules (ids, labels, errors) and a registry set."""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import pytest
import torch

from cloud_model.datasets import load_dataset
from cloud_model.errors import DataError, DatasetNotFoundError
from cloud_model.labelled_data import DataSource, load_labelled


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def scopes(data_dir: Path) -> list[str]:
    """Five real CLOUD-format SCOPE strings."""
    return [r.scope or "" for r in load_dataset("cloud_cv", ["test"]).records[:5]]


def test_csv_labels_missing_cells_are_nan_and_reported(tmp_path: Path, scopes: list[str]) -> None:
    path = _write(
        tmp_path / "set.csv",
        ["material_id", "cloud", "a", "b"],
        [
            ["m-0", scopes[0], "1.5", "2"],
            ["m-1", f"  {scopes[1]} ", "", "3"],  # empty label; padded SCOPE string
            ["m-2", scopes[2], "abc", "inf"],  # not a number, not finite
            ["m-3", scopes[3], "-4e-1", "5"],
        ],
    )
    data = load_labelled(DataSource(csv=path, targets=("a", "b")))
    assert data.ids == ["m-0", "m-1", "m-2", "m-3"]  # every row with a structure is kept
    assert data.scopes[1] == scopes[1]
    assert data.y.dtype == torch.float32 and data.y.shape == (4, 2)
    assert data.y[0].tolist() == [1.5, 2.0] and data.y[3].tolist() == pytest.approx([-0.4, 5.0])
    assert math.isnan(data.y[1, 0]) and math.isnan(data.y[2, 0]) and math.isnan(data.y[2, 1])
    assert data.invalid == []
    reasons = dict(data.invalid_labels)
    assert sorted(reasons) == ["m-1", "m-2"]  # counted once per row
    assert reasons["m-1"] == "column 'a' is empty"
    assert "column 'a' is not a number: 'abc'" in reasons["m-2"]
    assert "column 'b' is not a finite number: 'inf'" in reasons["m-2"]
    assert data.units == {"a": "", "b": ""} and data.splits == [""] * 4
    assert data.labels_of(1) == {"b": 3.0}


def test_csv_ids_one_default_rule_and_bad_rows_left_out(tmp_path: Path, scopes: list[str]) -> None:
    rows = [
        ["x-0", scopes[0], "1"],
        ["", scopes[1], "2"],
        ["x-0", scopes[2], "3"],
        ["x-3", " ", "4"],
    ]
    for column in ("material_id", "id"):  # the first of material_id / id present
        data = load_labelled(
            DataSource(csv=_write(tmp_path / "a.csv", [column, "scope", "y"], rows))
        )
        assert data.ids == ["x-0"]
        assert [i for i, _ in data.invalid] == ["a:1", "x-0", "x-3"]
        reasons = [r for _, r in data.invalid]
        assert reasons[0] == f"empty id column {column!r}"
        assert reasons[1] == f"duplicate id in column {column!r} (first at row 0)"
        assert reasons[2] == "empty 'scope' column"
    # no id column: <file stem>:<row>
    plain = _write(tmp_path / "plain.csv", ["cloud"], [[s] for s in scopes[:3]])
    assert load_labelled(DataSource(csv=plain)).ids == ["plain:0", "plain:1", "plain:2"]
    # a named id column must exist
    with pytest.raises(DataError, match=r"plain.csv: no id column 'cid'"):
        load_labelled(DataSource(csv=plain, id_column="cid"))


def test_csv_problems_are_data_errors_naming_file_and_column(
    tmp_path: Path, scopes: list[str]
) -> None:
    with pytest.raises(DataError, match="missing.csv: CSV file not found"):
        load_labelled(DataSource(csv=tmp_path / "missing.csv"))
    path = _write(tmp_path / "t.csv", ["id", "cloud", "y"], [["a", scopes[0], "1"]])
    with pytest.raises(DataError, match=r"t.csv: target columns \['z'\] not found"):
        load_labelled(DataSource(csv=path, targets=("y", "z")))
    kept = load_labelled(DataSource(csv=path, targets=("y", "z")), require_targets=False)
    assert kept.target_names == ("y",)
    with pytest.raises(DataError, match="t.csv: no structure column 'cif'"):
        load_labelled(DataSource(csv=path, structure_column="cif"))
    with pytest.raises(DataError, match="t.csv: no split column 'part'"):
        load_labelled(DataSource(csv=path, split_column="part"))
    nothing = _write(tmp_path / "n.csv", ["id", "y"], [["a", "1"]])
    with pytest.raises(DataError, match="n.csv: no structure column"):
        load_labelled(DataSource(csv=nothing))
    empty = _write(tmp_path / "e.csv", ["id", "cloud"], [["a", ""]])
    with pytest.raises(DataError, match="e.csv: no usable rows .*a: empty 'cloud' column"):
        load_labelled(DataSource(csv=empty))
    assert len(load_labelled(DataSource(csv=empty), allow_empty=True)) == 0


def test_gzipped_cif_csv_is_encoded_and_keeps_structures(tmp_path: Path, data_dir: Path) -> None:
    records = load_dataset("perov_5", ["val"]).records[:4]
    path = tmp_path / "cifs.csv.gz"
    with gzip.open(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["material_id", "cif", "heat_ref", "part"])
        writer.writerows([r.id, r.cif, repr(r.targets["heat_ref"]), "test"] for r in records)
        writer.writerow(["broken", "not a cif", "0.0", "test"])
    data = load_labelled(
        DataSource(csv=path, targets=("heat_ref",), split_column="part"), dtype=torch.float64
    )
    assert data.ids == [r.id for r in records] and data.splits == ["test"] * 4
    assert data.invalid[0][0] == "broken" and "CIF" in data.invalid[0][1]
    assert data.cifs == {r.id: r.cif for r in records}
    assert all(s.count(" | ") == 2 for s in data.scopes)
    assert data.y[:, 0].tolist() == [r.targets["heat_ref"] for r in records]  # float64: exact


def test_registry_dataset_rows_splits_units_and_atoms(data_dir: Path) -> None:
    source = DataSource(dataset="cloud_cv", splits=("test",), targets=("cv",))
    data = load_labelled(source)
    expected = load_dataset("cloud_cv", ["test"]).records
    assert data.ids == [r.id for r in expected]
    assert data.scopes == [r.scope for r in expected]
    assert set(data.splits) == {"test"} and data.units == {"cv": "J/(mol K)"}
    assert torch.equal(data.y[:, 0], torch.tensor([r.targets["cv"] for r in expected]))
    assert data.n_atoms is not None and data.n_atoms.shape == (len(expected),)
    assert data.cifs == {} and data.invalid == [] and data.invalid_labels == []
    few = load_labelled(source, only_ids={expected[3].id, expected[1].id})
    assert few.ids == [expected[1].id, expected[3].id]  # source order, not the selection's
    with pytest.raises(DataError, match=r"dataset 'cloud_cv' has no target\(s\) \['heat'\]"):
        load_labelled(DataSource(dataset="cloud_cv", targets=("heat",)))
    with pytest.raises(DatasetNotFoundError):
        load_labelled(DataSource(dataset="no_such_dataset"))
