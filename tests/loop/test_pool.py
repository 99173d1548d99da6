from __future__ import annotations

from pathlib import Path

import pytest

from cloud_model.datasets import load_dataset
from cloud_model.errors import ConfigError, DataError
from cloud_model.scope import encode_scope
from loop.config import PoolConfig
from loop.pool import load_pool


def test_a_hand_picked_pool_encodes_only_its_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    monkeypatch.setenv("CLOUDLAB_CACHE_DIR", str(tmp_path))  # nothing cached: encode for real
    records = load_dataset("mp_20_pilot", ["val"]).records[:3]
    ids = [r.id for r in records]
    config = PoolConfig.model_validate(
        {"dataset": "mp_20_pilot", "splits": ["val"], "include_ids": ids}
    )
    pool = load_pool(config, ("formation_energy_per_atom",))
    assert sorted(pool.ids) == sorted(ids)
    assert not list(tmp_path.rglob("*.json"))  # the split was not encoded and cached as a whole
    for rec in records:
        expected = encode_scope(rec.structure(), symprec=0.1, variant="cloud")
        assert pool.scopes[pool.ids.index(rec.id)] == expected
        assert (
            pool.truth[rec.id]["formation_energy_per_atom"]
            == rec.targets["formation_energy_per_atom"]
        )


def test_unknown_include_ids_are_a_config_error(data_dir: Path) -> None:
    config = PoolConfig.model_validate(
        {"dataset": "mp_20_pilot", "splits": ["val"], "include_ids": ["mp-does-not-exist"]}
    )
    with pytest.raises(ConfigError, match="include_ids not in the pool"):
        load_pool(config, ("formation_energy_per_atom",))


def test_a_csv_pool_keeps_exact_truth_and_lists_rows_left_out(
    tmp_path: Path, data_dir: Path
) -> None:
    records = load_dataset("cloud_cv", ["test"]).records[:6]
    path = tmp_path / "pool.csv"
    path.write_text(
        "cid,scope,cv\n"
        + "".join(f"{r.id},{r.scope},{r.targets['cv']!r}\n" for r in records[:4])
        + f"{records[4].id},{records[4].scope},\n"  # no truth for this candidate
        + f"{records[5].id}, ,1.0\n",  # no structure: left out
        encoding="utf-8",
    )
    config = PoolConfig.model_validate(
        {"file": str(path), "id_column": "cid", "structure_column": "scope",
         "structure_format": "scope"}
    )  # fmt: skip
    pool = load_pool(config, ("cv", "not_in_file"))
    assert pool.ids == [r.id for r in records[:5]]
    assert pool.scopes == [r.scope for r in records[:5]]
    assert pool.truth == {r.id: {"cv": r.targets["cv"]} for r in records[:4]}  # exact floats
    assert pool.units == {"cv": ""} and pool.cifs == {}
    assert pool.invalid == [(records[5].id, "empty 'scope' column")]
    with pytest.raises(DataError, match="pool.csv: no id column 'material_id'"):
        load_pool(config.model_copy(update={"id_column": "material_id"}), ("cv",))
