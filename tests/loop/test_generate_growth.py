"""Candidates added while a campaign runs: growth from the hits, durable across SIGKILL.

A real campaign: six binaries of ``mp_20_biternary``, CHGNet (static, the real model)
measuring the formation energy, a GP surrogate, and ``pool.generators.grow`` substituting
into the best measured candidate after every round.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud_model.errors import CloudlabError
from loop.campaign import Campaign
from loop.config import parse_config
from loop.store import CampaignStore

REPO = Path(__file__).resolve().parents[2]
IDS = ["mp-23703", "mp-1138", "mp-22862", "mp-23193", "mp-2472", "mp-11718"]  # LiH LiF NaCl..


def _config(tmp: Path, **dispatch: Any) -> dict[str, Any]:
    return {
        "name": "growth",
        "seed": 0,
        "pool": {
            "dataset": "mp_20_biternary",
            "include_ids": IDS,
            "generators": {
                "substitution": {"threshold": 5e-3, "max_per_parent": 4},
                "energies": {"relax": False, "cache_dir": str(tmp / "gen-cache")},
                "grow": {"every": 1, "from_top": 1, "max_new": 3},
            },
        },
        "objective": {"target": "formation_energy_per_atom", "sense": "minimize"},
        "surrogate": {"kind": "gp"},
        "acquisition": {"kind": "qlogei", "batch_size": 1},
        "initial_design": {"n_random": 2},
        "budget": {"experiments": 5},
        "adapter": {"kind": "chgnet", "settings": {"relax": False, "threads": 1}},
        "dispatch": {"mode": "inline", "concurrency": 1, "wait_for": "all", **dispatch},
        "finetune": {"every_n_results": 1},
        "threads": 1,
    }


@pytest.mark.slow
def test_the_pool_grows_from_the_hits_and_the_agent_sees_the_new_candidates(
    tmp_path: Path,
) -> None:
    campaign = Campaign(parse_config(_config(tmp_path)), tmp_path / "run")
    result = campaign.run()
    assert result.n_submitted == 5
    with CampaignStore(tmp_path / "run", create=False) as store:
        generated = store.generated()
        growths = store.growths()
        candidates = [cid for cid, _ in store.candidates()]
    assert generated, growths
    assert set(candidates[: len(IDS)]) == set(IDS)  # the configured pool first
    assert [g["id"] for g in generated] == candidates[len(IDS) :]  # appended, in order
    measured_parents = {p for g in growths for p in g["parents"]}
    for g in generated:
        prov = g["provenance"]
        assert prov["generator"] == "substitution" and prov["parent_id"] in measured_parents
        assert prov["round"] >= 1 and g["scope"] and "data_" in g["cif"]
    assert all(g["n_added"] <= 3 for g in growths)
    rounds = [g["round"] for g in growths]
    assert rounds == sorted(set(rounds))  # at most one growth step per round
    # the agent acquires over the grown pool, and CIFs reach the adapter's requests
    assert campaign.pool is not None and campaign.pool.ids == candidates
    agent = campaign.build_agent()
    assert agent.ids == candidates


def _generated(out: Path) -> list[dict[str, Any]]:
    try:
        with CampaignStore(out, create=False) as store:
            return store.generated()
    except (sqlite3.Error, CloudlabError):  # the store is being created
        return []


@pytest.mark.slow
def test_sigkill_then_resume_keeps_generated_candidates_and_provenance(tmp_path: Path) -> None:
    path = tmp_path / "growth.yaml"
    data = _config(tmp_path)
    data["budget"]["experiments"] = 6
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loop", "run", str(path), "--out", str(out), "--no-report"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline, before = time.monotonic() + 400, []
    while proc.poll() is None and time.monotonic() < deadline:
        before = _generated(out)
        if before:
            break
        time.sleep(0.1)
    assert before, "no candidate was generated before the campaign ended"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        [sys.executable, "-m", "loop", "resume", str(out), "--no-report"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _generated(out)
    kept = {g["id"]: g for g in after}
    for g in before:  # every candidate generated before the kill, with the same provenance
        assert g["id"] in kept and kept[g["id"]]["provenance"] == g["provenance"]
        assert kept[g["id"]]["cif"] == g["cif"] and kept[g["id"]]["scope"] == g["scope"]
    with CampaignStore(out, create=False) as store:
        assert store.get_meta("stop_reason") == "experiment budget reached"
        assert sum(store.job_counts().values()) == 6
        ids = [cid for cid, _ in store.candidates()]
    assert len(ids) == len(set(ids)) == len(IDS) + len(after)
    reopened = Campaign.resume(out)
    reopened.prepare()
    assert reopened.pool is not None and reopened.pool.ids == ids
    assert all(reopened.pool.cifs[g["id"]] == g["cif"] for g in after)
