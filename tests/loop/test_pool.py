from __future__ import annotations

from pathlib import Path

import pytest

from cloud_model.datasets import load_dataset
from cloud_model.errors import ConfigError
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
