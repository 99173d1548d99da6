"""The thread budget: settings, environment, cgroup quota, and what a campaign applies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cloud_model.errors import ConfigError
from cloud_model.threads import (
    _cgroup_quota,
    apply_thread_budget,
    resolve_threads,
    usable_cores,
)


@pytest.fixture(autouse=True)
def _restore(monkeypatch: pytest.MonkeyPatch) -> object:
    threads = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    monkeypatch.delenv("CLOUDLAB_THREADS", raising=False)
    yield
    torch.set_num_threads(threads)


def test_settings_environment_and_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert resolve_threads("auto") == cores
    assert resolve_threads(None, workers=cores * 4) == 1  # never below one
    assert resolve_threads(3) == 3
    monkeypatch.setenv("CLOUDLAB_THREADS", "5")
    assert resolve_threads("auto") == 5 and resolve_threads(None) == 5
    assert resolve_threads(2) == 2  # an explicit setting wins over the environment
    monkeypatch.setenv("CLOUDLAB_THREADS", "lots")
    with pytest.raises(ConfigError, match=r"\$CLOUDLAB_THREADS = 'lots'"):
        resolve_threads("auto")
    with pytest.raises(ConfigError, match="threads = 0"):
        resolve_threads(0)


def test_cgroup_quota_file(tmp_path: Path) -> None:
    path = tmp_path / "cpu.max"
    path.write_text("150000 100000\n")
    assert _cgroup_quota(path) == 1.5
    path.write_text("max 100000\n")
    assert _cgroup_quota(path) is None
    assert _cgroup_quota(tmp_path / "absent") is None


def test_apply_sets_torch_and_exports_for_children() -> None:
    apply_thread_budget(1)
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_campaign_config_threads_field() -> None:
    from pydantic import ValidationError

    from loop.config import parse_config

    base = {
        "name": "t",
        "pool": {"file": "x.csv", "structure_format": "scope"},
        "objective": {"target": "y", "sense": "maximize"},
    }
    assert parse_config(base).threads == "auto"
    assert parse_config({**base, "threads": 1}).threads == 1
    with pytest.raises((ConfigError, ValidationError), match="threads"):
        parse_config({**base, "threads": 0})
