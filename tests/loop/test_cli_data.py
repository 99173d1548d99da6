"""``cloudlab data list | info | fetch`` through typer's CliRunner and the real entry point."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cloud_model import datasets
from cloud_model.datasets import REGISTRY
from cloud_model.errors import DatasetNotFoundError
from loop.cli.data import register
from tests.cloud_model.test_datasets import serve_directory

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def app() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def _root() -> None:  # a callback keeps `data` as a named sub-command
        pass

    register(root)
    return root


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No mirror and an empty cache; returns the cache's data folder."""
    monkeypatch.setenv(datasets.DATA_DIR_ENV, "")  # mirror off
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


@pytest.fixture()
def server(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    root = tmp_path / "served"
    for f in REGISTRY["cloud_cv"].files:
        (root / f.relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / f.relpath).write_bytes((data_dir / f.relpath).read_bytes())
    with serve_directory(root) as url:
        monkeypatch.setenv(datasets.DATA_URL_ENV, url)
        yield url


def test_list_shows_rows_targets_and_sources(app: typer.Typer) -> None:
    result = CliRunner().invoke(app, ["data", "list"])
    assert result.exit_code == 0, result.output
    lines = {
        line.split("│")[1].strip(): line
        for line in result.output.splitlines()
        if line.count("│") > 3
    }
    assert set(REGISTRY) <= set(lines)
    assert "3787 + 3785" in lines["perov_5"] and "heat_ref (eV)" in lines["perov_5"]
    assert "3426 + 734 + 735" in lines["aflow_thermal_expansion"]
    assert "cv (J/(mol K))" in lines["cloud_cv"] and "1213 + 299" in lines["cloud_cv"]
    assert all("mirror" in line for line in lines.values())
    kinds = {name: line.split("│")[2].strip() for name, line in lines.items() if name in REGISTRY}
    assert kinds == {name: spec.kind for name, spec in REGISTRY.items()}
    assert kinds["crabnet_expt_gap"] == "formula" and kinds["crabnet_licence"] == "resource"
    assert "4604" in lines["crabnet_expt_gap"] and "band_gap (eV)" in lines["crabnet_expt_gap"]
    assert "239125 + 51241 + 51242" in lines["crabnet_oqmd_bandgap"]
    assert "51255 + 51255" in lines["crabnet_oqmd_volume_per_atom"]
    assert "log10_shear_modulus (log10(GPa))" in lines["crabnet_log10_gvrh"]


def test_info_shows_files_urls_hashes_and_paths(app: typer.Typer, data_dir: Path) -> None:
    result = CliRunner().invoke(app, ["data", "info", "perov_5"])
    assert result.exit_code == 0, result.output
    for f in REGISTRY["perov_5"].files:
        assert f.url in result.output and f.sha256 in result.output
        assert f"mirror {data_dir / f.relpath}" in result.output
    assert "licence: MIT" in result.output and "Castelli" in result.output


def test_info_of_a_formula_set_says_it_has_no_structures(app: typer.Typer) -> None:
    result = CliRunner().invoke(app, ["data", "info", "crabnet_log10_gvrh"])
    assert result.exit_code == 0, result.output
    assert "crabnet_log10_gvrh (formula)" in result.output
    assert "formula column: formula (formulas only, no structures)" in result.output
    assert "elasticity_log10%28G_VRH%29.csv" in result.output
    assert "crabnet/matbench/log10_gvrh.csv" in result.output
    assert "licence: MIT (CrabNet repo" in result.output
    assert "citation: Wang, A. Y.-T., Kauwe, S. K." in result.output


def test_fetch_downloads_into_the_cache_then_list_reports_it(
    app: typer.Typer, offline: Path, server: str
) -> None:
    runner = CliRunner()
    before = runner.invoke(app, ["data", "list"])
    cv_line = next(line for line in before.output.splitlines() if "│ cloud_cv " in line)
    assert "not fetched" in cv_line and "missing" in cv_line
    result = runner.invoke(app, ["data", "fetch", "cloud_cv"])
    assert result.exit_code == 0, result.output
    for f in REGISTRY["cloud_cv"].files:
        local = offline / f.relpath
        assert hashlib.sha256(local.read_bytes()).hexdigest() == f.sha256
        assert f"{local} (sha256 ok)" in result.output
    after = runner.invoke(app, ["data", "list"])
    cv_line = next(line for line in after.output.splitlines() if "│ cloud_cv " in line)
    assert "1213 + 299" in cv_line and "cache" in cv_line
    info = runner.invoke(app, ["data", "info", "cloud_cv"])
    assert f"{server}/cloud/cloud_cv_test.csv" in info.output and f"cache {offline}" in info.output


def test_fetch_needs_a_name(app: typer.Typer) -> None:
    result = CliRunner().invoke(app, ["data", "fetch"])
    assert result.exit_code == 2


def test_unknown_name_raises_the_registry_error(app: typer.Typer) -> None:
    result = CliRunner().invoke(app, ["data", "info", "perovv"])
    assert isinstance(result.exception, DatasetNotFoundError)
    result = CliRunner().invoke(app, ["data", "fetch", "cloud_cv", "mp20"])
    assert isinstance(result.exception, DatasetNotFoundError) and "mp_20" in str(result.exception)


def test_entry_point_prints_one_line_and_exits_2_on_unknown_name() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loop", "data", "info", "carbon24"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown dataset 'carbon24'. did you mean carbon_24? (`cloudlab data list` shows all "
        f"{len(REGISTRY)})"
    ]
