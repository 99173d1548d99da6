"""The dataset registry against the real offline mirror and a real local HTTP server."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from cloud_model import datasets
from cloud_model.datasets import (
    REGISTRY,
    DatasetFile,
    get_spec,
    load_dataset,
    read_csv,
    resolve,
    resource_path,
)
from cloud_model.errors import DataError, DatasetNotFoundError

# rows per split, as counted in ../shared/data (SOURCES.md; thermal_expansion has 9 fewer rows)
EXPECTED_ROWS: dict[str, dict[str, int]] = {
    "perov_5": {"val": 3787, "test": 3785},
    "carbon_24": {"val": 2032, "test": 2030},
    "mp_20_biternary": {"val": 7140, "test": 7118},
    "mp_20_pilot": {"train": 1000, "val": 1000, "test": 1000},
    "mpts_52": {"val": 5000, "test": 8096},
    "aflow_debye_temperature": {"train": 3433, "val": 735, "test": 736},
    "aflow_bulk_modulus": {"train": 3433, "val": 735, "test": 736},
    "aflow_shear_modulus": {"train": 3433, "val": 735, "test": 736},
    "aflow_thermal_expansion": {"train": 3426, "val": 734, "test": 735},
    "cloud_cv": {"train_and_val": 1213, "test": 299},
    "cloud_pretrain_10k": {"train": 10000},
    # formula sets (SOURCES.md, "Composition-only label sets"); one-file sets are split "train"
    "crabnet_mp_e_form": {"train": 132752},
    "crabnet_mp_gap": {"train": 106113},
    "crabnet_expt_gap": {"train": 4604},
    "crabnet_log10_gvrh": {"train": 10987},
    "crabnet_log10_kvrh": {"train": 10987},
    "crabnet_mp_e_hull": {"train": 39663, "val": 8499, "test": 8500},
    "crabnet_mp_bulk_modulus": {"train": 4414, "val": 946, "test": 947},
    "crabnet_mp_shear_modulus": {"train": 4328, "val": 928, "test": 928},
    "crabnet_aflow_egap": {"train": 19330, "val": 4125, "test": 4122},
    "crabnet_aflow_energy_atom": {"train": 19346, "val": 4118, "test": 4115},
    "crabnet_oqmd_bandgap": {"train": 239125, "val": 51241, "test": 51242},
    "crabnet_oqmd_formation_enthalpy": {"val": 51255, "test": 51255},
    "crabnet_oqmd_volume_per_atom": {"val": 51255, "test": 51255},
}
TABLES = [name for name, spec in REGISTRY.items() if spec.kind != "resource"]
FORMULA_SETS = [name for name, spec in REGISTRY.items() if spec.kind == "formula"]
# mirrored files that SHA256SUMS does not list; their registered hash is checked on the file
UNLISTED_IN_SHA256SUMS = {"crabnet/LICENSE.md"}


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 (ephemeral port) in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _copy_from_mirror(mirror: Path, dest_root: Path, relpaths: list[str]) -> None:
    for rel in relpaths:
        (dest_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mirror / rel, dest_root / rel)


@pytest.fixture()
def offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No mirror, an empty temp cache; returns the cache root (files land in <root>/data)."""
    monkeypatch.setenv(datasets.DATA_DIR_ENV, "")  # mirror off
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def served(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp copy of the CLOUD part of the mirror served over HTTP; $CLOUDLAB_DATA_URL points at it."""
    root = tmp_path / "served"
    _copy_from_mirror(
        data_dir,
        root,
        [f.relpath for n in ("cloud_cv", "cloud_generators") for f in REGISTRY[n].files],
    )
    with serve_directory(root) as url:
        monkeypatch.setenv(datasets.DATA_URL_ENV, url)
        yield root


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ---------------------------------------------------------------- the registry table


def test_registry_holds_every_mirrored_file_with_its_sha256(data_dir: Path) -> None:
    sums = {}
    for line in (data_dir / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split()
        sums[rel.removeprefix("./")] = digest
    registered = {f.relpath: f.sha256 for spec in REGISTRY.values() for f in spec.files}
    assert {rel: sha for rel, sha in registered.items() if rel in sums} == sums
    assert set(registered) - set(sums) == UNLISTED_IN_SHA256SUMS
    for rel in UNLISTED_IN_SHA256SUMS:
        assert hashlib.sha256((data_dir / rel).read_bytes()).hexdigest() == registered[rel]
    assert set(EXPECTED_ROWS) == set(TABLES)


def test_urls_are_raw_github_at_the_documented_commits() -> None:
    # the path may carry percent-encoded characters ('(' -> %28), never raw parentheses or spaces
    pattern = re.compile(
        r"^https://raw\.githubusercontent\.com/([\w.-]+/[\w.-]+)/(\w+)/([\w./%-]+)$"
    )
    crabnet = "457b4d4835737ecbe4dd33e53174bd818bd82143"
    # mirror path -> upstream file name, where the mirror renamed the file
    renamed = {
        "crabnet/matbench/log10_gvrh.csv": "elasticity_log10(G_VRH).csv",
        "crabnet/matbench/log10_kvrh.csv": "elasticity_log10(K_VRH).csv",
    }
    commits = {
        "mp_20_pilot": "85bd47b3",
        "aflow_debye_temperature": "1b7d0d13",
        "cloud_cv": "043de9e",
        "cloud_generators": "043de9e",
        "perov_5": "main",
        "mp_20_biternary": "main",
    }
    for spec in REGISTRY.values():
        for f in spec.files:
            match = pattern.match(f.url)
            assert match is not None, f.url
            assert unquote(match.group(3)).endswith(renamed.get(f.relpath, Path(f.relpath).name))
            if spec.name in commits:
                assert match.group(2) == commits[spec.name]
            if spec.name.startswith("crabnet_"):
                assert match.group(1) == "anthony-wang/CrabNet" and match.group(2) == crabnet
    assert set(renamed) <= {f.relpath for s in REGISTRY.values() for f in s.files}
    assert REGISTRY["crabnet_log10_gvrh"].files[0].url == (
        f"https://raw.githubusercontent.com/anthony-wang/CrabNet/{crabnet}/data/matbench/"
        "elasticity_log10%28G_VRH%29.csv"
    )
    assert REGISTRY["crabnet_aflow_egap"].file("val").url == (
        f"https://raw.githubusercontent.com/anthony-wang/CrabNet/{crabnet}/data/benchmark_data/"
        "aflow__Egap/val.csv"
    )
    assert REGISTRY["crabnet_licence"].files[0].url.endswith(f"/{crabnet}/LICENSE.md")
    assert REGISTRY["carbon_24"].files[0].url == (
        "https://raw.githubusercontent.com/txie-93/cdvae/main/data/carbon_24/val.csv"
    )


def test_targets_carry_units_and_specs_round_trip_through_json() -> None:
    assert {n: t.unit for n, t in REGISTRY["perov_5"].targets.items()} == {
        "heat_ref": "eV",
        "dir_gap": "eV",
        "ind_gap": "eV",
    }
    assert REGISTRY["cloud_cv"].targets["cv"].unit == "J/(mol K)"
    assert REGISTRY["aflow_thermal_expansion"].targets["thermal_expansion"].unit == "1/K"
    assert {
        n: {t: (s.column, s.unit) for t, s in REGISTRY[n].targets.items()}
        for n in ("crabnet_mp_e_form", "crabnet_log10_kvrh", "crabnet_oqmd_volume_per_atom")
    } == {
        "crabnet_mp_e_form": {"formation_energy_per_atom": ("target", "eV/atom")},
        "crabnet_log10_kvrh": {"log10_bulk_modulus": ("target", "log10(GPa)")},
        "crabnet_oqmd_volume_per_atom": {"volume_per_atom": ("target", "A^3/atom")},
    }
    for name in FORMULA_SETS:
        spec = REGISTRY[name]
        assert spec.formula_column == "formula" and spec.structure_column is None
        assert len(spec.targets) == 1
        assert spec.splits in (("train",), ("train", "val", "test"), ("val", "test"))
        assert spec.licence.startswith("MIT (CrabNet repo") and "Wang, A. Y.-T." in spec.citation
    assert "Zhuo, Y." in REGISTRY["crabnet_expt_gap"].citation
    assert "OQMD" in REGISTRY["crabnet_oqmd_bandgap"].citation
    assert "Curtarolo" in REGISTRY["crabnet_aflow_egap"].citation
    for spec in REGISTRY.values():
        assert spec.licence and spec.citation
        assert type(spec).model_validate_json(spec.model_dump_json()) == spec


def test_a_formula_set_has_a_formula_column_and_no_structure_column() -> None:
    spec = REGISTRY["crabnet_expt_gap"].model_dump()
    with pytest.raises(ValueError, match="no structure_column"):
        type(REGISTRY["crabnet_expt_gap"]).model_validate({**spec, "structure_column": "cif"})
    with pytest.raises(ValueError, match="formula_column is set exactly for formula sets"):
        type(REGISTRY["crabnet_expt_gap"]).model_validate({**spec, "formula_column": None})
    with pytest.raises(ValueError, match="formula_column is set exactly for formula sets"):
        type(REGISTRY["perov_5"]).model_validate(
            {**REGISTRY["perov_5"].model_dump(), "formula_column": "formula"}
        )


def test_unknown_names_and_splits_are_clear_errors() -> None:
    with pytest.raises(DatasetNotFoundError, match=r"unknown dataset 'perov5'.*perov_5") as info:
        get_spec("perov5")
    assert isinstance(info.value, KeyError) and "\n" not in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="aflow_bulk_modulus"):
        load_dataset("bulk_modulus")
    with pytest.raises(DatasetNotFoundError, match="did you mean"):
        resolve("mpts52")
    with pytest.raises(DataError, match=r"no split 'train'.*\['val', 'test'\]"):
        load_dataset("perov_5", ["train"])
    with pytest.raises(DataError, match="resource_path"):
        load_dataset("cloud_generators")
    with pytest.raises(DataError, match="not a single-file resource"):
        resource_path("perov_5")


# ---------------------------------------------------------------- the real mirror


@pytest.mark.parametrize("name", TABLES)
def test_every_dataset_resolves_from_the_mirror_and_loads(name: str, data_dir: Path) -> None:
    spec = REGISTRY[name]
    paths = resolve(name, download=False)
    for f in spec.files:
        assert paths[f.split] == data_dir / f.relpath
        assert hashlib.sha256(paths[f.split].read_bytes()).hexdigest() == f.sha256
    result = load_dataset(name)
    assert result.invalid == []
    assert dict(Counter(r.split for r in result.records)) == EXPECTED_ROWS[name]
    assert len({r.id for r in result.records}) == len(result.records)
    for record in result.records:
        assert set(record.targets) == set(spec.targets)
        assert not any(math.isnan(v) for v in record.targets.values()), record.id
        if spec.kind == "cif":
            assert record.cif is not None and record.cif.startswith("# generated using pymatgen")
            assert record.scope is None and record.formula is None
        elif spec.kind == "formula":
            assert record.cif is None and record.scope is None and record.formula
        else:
            assert (
                record.cif is None and record.scope is not None and record.scope.count(" | ") == 2
            )
            assert record.formula is None


def test_records_are_typed(data_dir: Path) -> None:
    val = load_dataset("perov_5", ["val"]).records
    assert load_dataset("perov_5", "val").records == val  # a bare split name is one split
    assert len(set(val)) == 3787  # records hash by (id, split)
    perov = val[0]
    assert perov.id == "18517" and perov.split == "val"
    assert perov.extra == {"formula": "CuCdN3", "heat_all": 2.76}
    assert perov.targets["heat_ref"] == pytest.approx(2.709152583232041)
    structure = perov.structure()
    assert len(structure) == 5 and structure.composition.reduced_formula == "CdCuN3"
    mp = load_dataset("mp_20_biternary", ["val"]).records[0]
    assert mp.extra == {
        "formula": "TmMgHg2",
        "elements": ("Hg", "Mg", "Tm"),
        "spacegroup.number": 225,
    }
    years = {r.extra["year"] for r in load_dataset("mpts_52").records}
    assert all(isinstance(y, int) for y in years) and min(years) >= 1950
    cv = load_dataset("cloud_cv", ["test"]).records
    assert cv[0].id == "cloud_cv:test:0" and isinstance(cv[0].extra["n_atoms"], int)
    with pytest.raises(DataError, match="no CIF"):
        cv[0].structure()
    # AFLOW ids are the row index of the shared AFLOW table: the same structure in every task
    debye = {r.id: r.cif for r in load_dataset("aflow_debye_temperature").records}
    bulk = {r.id: r.cif for r in load_dataset("aflow_bulk_modulus").records}
    assert debye == bulk


def test_formula_records_carry_the_formula_as_written_and_the_target() -> None:
    from pymatgen.core import Composition

    records = load_dataset("crabnet_expt_gap").records
    first = records[0]
    assert (first.id, first.split, first.formula) == (
        "crabnet_expt_gap:train:0",
        "train",
        "Ag(AuS)2",
    )
    assert first.targets == {"band_gap": 0.0} and first.extra == {}
    assert first.cif is None and first.scope is None
    assert Composition(first.formula).as_dict() == {"Ag": 1.0, "Au": 2.0, "S": 2.0}
    assert max(r.targets["band_gap"] for r in records) == pytest.approx(11.7)
    with pytest.raises(DataError, match="formula record, no structure"):
        first.structure()
    hull = load_dataset("crabnet_mp_e_hull", ["test"]).records[0]
    assert (hull.id, hull.formula) == ("crabnet_mp_e_hull:test:0", "LiMg6Co")
    assert hull.targets["e_above_hull"] == pytest.approx(0.14129024796875012)
    # the matbench files list one row per structure: polymorphs repeat a formula
    gvrh = [r.formula for r in load_dataset("crabnet_log10_gvrh").records]
    assert len(gvrh) == 10987 and len(set(gvrh)) == 10432
    assert load_dataset("crabnet_expt_gap", validate=True).invalid == []


def test_formula_sets_are_refused_where_structures_are_needed() -> None:
    from cloud_model.corpus import encode_dataset_full
    from cloud_model.labelled_data import DataSource, load_labelled
    from loop.config import PoolConfig
    from loop.pool import load_pool

    message = r"dataset 'crabnet_expt_gap' has formulas only, no structures"
    with pytest.raises(DataError, match=message + "; SCOPE encoding needs a CIF or SCOPE"):
        encode_dataset_full("crabnet_expt_gap")
    with pytest.raises(DataError, match=message):
        load_labelled(DataSource(dataset="crabnet_expt_gap", targets=("band_gap",)))
    with pytest.raises(DataError, match=message):  # also a small selection, encoded on its own
        load_labelled(
            DataSource(dataset="crabnet_expt_gap", targets=("band_gap",)),
            only_ids=["crabnet_expt_gap:train:0"],
        )
    with pytest.raises(DataError, match=message):
        load_pool(PoolConfig(dataset="crabnet_expt_gap"), ("band_gap",))


def test_resources_resolve_to_the_published_tables() -> None:
    generators = json.loads(resource_path("cloud_generators").read_text())
    assert len(generators) == 230 and generators["1"] == "000"
    multiplicities = json.loads(resource_path("cloud_wyckoff_multiplicities").read_text())
    assert multiplicities["225"]["a"] == "4"
    licence = resource_path("crabnet_licence").read_text()
    assert licence.startswith("MIT License") and "Anthony Yu-Tung Wang" in licence


def test_load_is_cached_and_returns_fresh_lists() -> None:
    datasets._LOADED.clear()
    start = time.perf_counter()
    first = load_dataset("perov_5")
    cold = time.perf_counter() - start
    start = time.perf_counter()
    second = load_dataset("perov_5")
    warm = time.perf_counter() - start
    assert second.records == first.records and second.records is not first.records
    assert cold < 10.0 and warm < cold  # validate=False parses no CIF: ~0.15 s for 7,572 rows here


# ---------------------------------------------------------------- invalid rows


def _write_perov_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(
            fh,
            fieldnames=[
                "",
                "material_id",
                "cif",
                "formula",
                "heat_all",
                "heat_ref",
                "dir_gap",
                "ind_gap",
            ],
        )
        writer.writeheader()
        writer.writerows(rows)


def test_broken_rows_are_reported_not_dropped_silently(tmp_path: Path) -> None:
    good = load_dataset("perov_5", ["val"]).records[:3]
    rows = [
        {
            "": str(i),
            "material_id": r.id,
            "cif": r.cif or "",
            "formula": r.extra["formula"],
            "heat_all": "1.0",
            "heat_ref": str(r.targets["heat_ref"]),
            "dir_gap": "0.0",
            "ind_gap": "",
        }
        for i, r in enumerate(good)
    ]
    broken_cif = (good[2].cif or "").replace("_cell_length_a", "_cell_length_q")
    rows[2] = {**rows[2], "material_id": "broken-1", "cif": broken_cif}
    rows.append({**rows[0], "material_id": "no-cif", "cif": ""})
    rows.append({**rows[0], "material_id": "bad-target", "heat_ref": "n/a"})
    rows.append({**rows[1]})  # duplicate id
    path = tmp_path / "perov_like.csv"
    _write_perov_csv(path, rows)
    spec = REGISTRY["perov_5"]

    fast = read_csv(spec, "val", path, validate=False)
    assert [r.id for r in fast.records] == [good[0].id, good[1].id, "broken-1"]
    assert {i for i, _ in fast.invalid} == {"no-cif", "bad-target", good[1].id}
    assert math.isnan(fast.records[0].targets["ind_gap"])  # empty target -> NaN

    checked = read_csv(spec, "val", path, validate=True)
    assert [r.id for r in checked.records] == [good[0].id, good[1].id]
    reasons = dict(checked.invalid)
    assert len(checked.invalid) == 4 and "CIF does not parse" in reasons["broken-1"]
    assert "not a number" in reasons["bad-target"] and "empty 'cif'" in reasons["no-cif"]
    with pytest.raises(DataError, match="broken-1"):
        fast.records[2].structure()


def test_missing_columns_are_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("material_id,cif\n1,x\n")
    with pytest.raises(DataError, match=r"missing columns \['heat_ref'"):
        read_csv(REGISTRY["perov_5"], "val", path)
    path.write_text("composition,target\nNaCl,1.0\n")
    with pytest.raises(DataError, match=r"missing columns \['formula'\]"):
        read_csv(REGISTRY["crabnet_expt_gap"], "train", path)


def test_broken_formula_rows_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "formulas.csv"
    path.write_text("formula,target\nNaCl,8.5\n,1.0\nSr(AlH)2,\nQq3,2.0\nKBr,n/a\nNa(Cl,0\n")
    spec = REGISTRY["crabnet_expt_gap"]
    fast = read_csv(spec, "train", path)
    assert [r.formula for r in fast.records] == ["NaCl", "Sr(AlH)2", "Qq3", "Na(Cl"]
    assert math.isnan(fast.records[1].targets["band_gap"])  # empty target -> NaN
    reasons = dict(fast.invalid)
    assert set(reasons) == {"crabnet_expt_gap:train:1", "crabnet_expt_gap:train:4"}
    assert "empty 'formula'" in reasons["crabnet_expt_gap:train:1"]
    assert "not a number" in reasons["crabnet_expt_gap:train:4"]
    checked = read_csv(spec, "train", path, validate=True)
    assert [r.formula for r in checked.records] == ["NaCl", "Sr(AlH)2"]
    reasons = dict(checked.invalid)
    assert "not elements: ['Qq']" in reasons["crabnet_expt_gap:train:3"]
    assert "formula does not parse" in reasons["crabnet_expt_gap:train:5"]


@pytest.mark.slow
def test_validate_parses_every_perov_cif() -> None:
    result = load_dataset("perov_5", validate=True)
    assert len(result.records) == 7572 and result.invalid == []


# ---------------------------------------------------------------- download path (real HTTP server)


def test_download_verifies_and_caches(offline_env: Path, served: Path) -> None:
    seen: list[tuple[str, int, int | None]] = []

    def progress(f: DatasetFile, done: int, total: int | None) -> None:
        seen.append((f.relpath, done, total))

    paths = resolve("cloud_cv", progress=progress)
    cache = offline_env / "data"
    for f in REGISTRY["cloud_cv"].files:
        assert paths[f.split] == cache / f.relpath
        assert hashlib.sha256(paths[f.split].read_bytes()).hexdigest() == f.sha256
        size = paths[f.split].stat().st_size
        assert (f.relpath, size, size) in seen  # the last callback reports every byte
    assert _files_under(cache) == sorted(paths.values())  # no .part files left
    assert sum(Counter(r.split for r in load_dataset("cloud_cv").records).values()) == 1512
    # a second resolve reads the cache, even with the server gone
    shutil.rmtree(served)
    assert resolve("cloud_cv", download=False) == paths


def test_corrupted_download_raises_and_leaves_nothing(offline_env: Path, served: Path) -> None:
    target = served / "cloud" / "generator.json"
    target.write_bytes(target.read_bytes().replace(b'"1": "000"', b'"1": "001"'))
    actual = hashlib.sha256(target.read_bytes()).hexdigest()
    spec = REGISTRY["cloud_generators"]
    with pytest.raises(DataError) as info:
        resource_path("cloud_generators")
    message = str(info.value)
    for part in (
        "cloud_generators",
        "cloud/generator.json",
        spec.files[0].sha256,
        actual,
        "deleted",
    ):
        assert part in message
    assert _files_under(offline_env) == []


def test_http_error_is_a_data_error(offline_env: Path, served: Path) -> None:
    (served / "cloud" / "generator.json").unlink()
    with pytest.raises(DataError, match="HTTP 404"):
        resource_path("cloud_generators")
    assert _files_under(offline_env) == []


def test_missing_mirror_file_falls_back_to_the_cache(
    data_dir: Path, offline_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = REGISTRY["cloud_cv"]
    mirror = tmp_path / "mirror"
    _copy_from_mirror(data_dir, mirror, [spec.file("train_and_val").relpath])
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(mirror))
    monkeypatch.setenv(datasets.DATA_URL_ENV, "http://127.0.0.1:9")  # would fail if it were tried
    with pytest.raises(
        DataError, match=r"cloud_cv.*cloud/cloud_cv_test.csv.*cloudlab data fetch cloud_cv"
    ):
        resolve("cloud_cv", download=False)
    with pytest.raises(
        DataError, match="download from http://127.0.0.1:9/cloud/cloud_cv_test.csv failed"
    ):
        resolve("cloud_cv")
    _copy_from_mirror(data_dir, offline_env / "data", [spec.file("test").relpath])
    paths = resolve("cloud_cv", download=False)
    assert paths == {
        "train_and_val": mirror / spec.file("train_and_val").relpath,
        "test": offline_env / "data" / spec.file("test").relpath,
    }
    assert [loc.source for loc in datasets.locate("cloud_cv")] == ["mirror", "cache"]


def test_corrupt_mirror_is_an_error_and_corrupt_cache_is_refetched(
    data_dir: Path, offline_env: Path, served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rel = REGISTRY["cloud_generators"].files[0].relpath
    mirror = tmp_path / "mirror"
    _copy_from_mirror(data_dir, mirror, [rel])
    (mirror / rel).write_text("{}")
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(mirror))
    with pytest.raises(DataError, match=r"mirror .*does not match the registered"):
        resource_path("cloud_generators")
    monkeypatch.setenv(datasets.DATA_DIR_ENV, "")  # mirror off
    cached = offline_env / "data" / rel
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")
    with pytest.raises(DataError, match="cloudlab data fetch cloud_generators"):
        resolve("cloud_generators", download=False)
    assert resource_path("cloud_generators") == cached  # re-downloaded from the local server
    assert len(json.loads(cached.read_text())) == 230


def test_the_mirror_beside_the_checkout_is_found_without_the_variable(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    """A new user who never set CLOUDLAB_DATA_DIR gets the README's default, ../shared/data."""
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    beside = Path(datasets.__file__).resolve().parents[2] / "shared" / "data"
    if not beside.is_dir():
        pytest.skip("no shared/data beside this checkout")
    assert datasets.mirror_dir() == beside
    assert {loc.source for loc in datasets.locate("perov_5")} == {"mirror"}
    monkeypatch.setenv(datasets.DATA_DIR_ENV, "")
    assert datasets.mirror_dir() is None
