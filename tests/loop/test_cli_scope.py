"""``cloudlab scope encode`` on files, directories and registry datasets."""

from __future__ import annotations

import csv
from pathlib import Path

from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from loop.cli import app

FM3M = "1 6 a O D D a D O D b O O O c O O O d O O O e O O O 0"


def _files(tmp_path: Path) -> Path:
    nacl = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    nacl.to(filename=str(tmp_path / "nacl.cif"))
    nacl.get_primitive_structure().to(filename=str(tmp_path / "POSCAR"))
    (tmp_path / "broken.cif").write_text("not a cif\n")
    return tmp_path


def test_encode_file_and_directory(tmp_path: Path) -> None:
    folder = _files(tmp_path)
    runner = CliRunner()
    single = runner.invoke(app, ["scope", "encode", str(folder / "nacl.cif")])
    assert single.exit_code == 0, single.output
    assert f"{FM3M} | 4a 4b | Na 0.5 Cl 0.5" in single.output
    out = tmp_path / "out" / "scope.csv"
    many = runner.invoke(
        app, ["scope", "encode", str(folder), "--variant", "native", "-j", "1", "--out", str(out)]
    )
    assert many.exit_code == 0, many.output
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["id"]: r["scope"] for r in rows} == {
        "POSCAR": f"{FM3M} | 4a:Na 4b:Cl | Na 0.5 Cl 0.5",
        "nacl.cif": f"{FM3M} | 4a:Na 4b:Cl | Na 0.5 Cl 0.5",
    }
    assert "1 not encoded" in many.output and "broken.cif" in many.output


def test_unreadable_inputs_are_one_line_errors(tmp_path: Path) -> None:
    folder = _files(tmp_path)
    runner = CliRunner()
    for args, message in (
        ([str(folder / "broken.cif")], "cannot read a structure"),
        ([str(tmp_path / "missing.cif")], "no such file"),
        (["perov_x"], "unknown dataset 'perov_x'"),
        ([str(folder / "nacl.cif"), "--variant", "bert"], "--variant"),
    ):
        result = runner.invoke(app, ["scope", "encode", *args])
        assert result.exit_code != 0
        text = result.output + (str(result.exception) if result.exception else "")
        assert message in text, (args, text)


def test_encode_scope_dataset_to_csv(tmp_path: Path) -> None:
    out = tmp_path / "cv.csv"
    result = CliRunner().invoke(app, ["scope", "encode", "cloud_cv", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1512 and rows[0]["scope"].count(" | ") == 2
