"""``cloudlab lab truth``: the hidden table the orchestrator reference servers measure from."""

from __future__ import annotations

import stat
from pathlib import Path

import typer
from typer.testing import CliRunner

from loop.cli.lab import register
from simulators.ground_truth import GroundTruth


def test_lab_truth_writes_a_private_ground_truth_table(data_dir: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    out = tmp_path / "qs" / "truth.json"
    args = ["lab", "truth", "--dataset", "perov_5", "--target", "heat_ref", "--split", "val"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    truth = GroundTruth.from_file(out)
    assert truth.units == {"heat_ref": "eV"} and len(truth.values) > 100
    assert f"wrote {out}: {len(truth.values)} candidates" in result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it holds the hidden labels


def test_lab_truth_names_an_unknown_target(data_dir: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    args = ["lab", "truth", "--dataset", "perov_5", "--target", "nope"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "t.json")])
    assert result.exit_code != 0
    assert "nope" in str(result.exception) + result.output
