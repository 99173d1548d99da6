"""End-to-end campaigns on a real pool (published CLOUD strings with their Cv labels)."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cloud_model.errors import CloudlabError
from loop.campaign import Campaign, LabRefusedError
from loop.config import parse_config
from loop.store import CampaignStore
from tests.loop.cv_data import cv_rows, write_cv_pool

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cv_pool(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """120 crystals of cloud_cv (SCOPE strings + heat capacity at 300 K) as a CSV pool."""
    return write_cv_pool(tmp_path_factory.mktemp("pool") / "cv_pool.csv", cv_rows(data_dir, 120))


def _config(pool: Path, **overrides: object) -> dict:
    data = {
        "name": "cvtest",
        "seed": 3,
        "pool": {
            "file": str(pool),
            "id_column": "id",
            "structure_column": "scope",
            "structure_format": "scope",
        },
        "objective": {"target": "cv", "sense": "maximize"},
        "surrogate": {
            "kind": "cloud_ensemble",
            "checkpoint": None,
            "n_members": 3,
            "ensemble": {
                "n_trainable_blocks": 0,
                "model_size": "tiny",
                "epochs": 20,
                "warm_start_epochs": 5,
            },
        },
        "acquisition": {"kind": "qlogei", "batch_size": 4},
        "initial_design": {"n_random": 8},
        "budget": {"experiments": 24},
        "adapter": {
            "kind": "simulated",
            "seed": 1,
            "capacity": 4,
            "noise": {"sigma": 2.0},
            "failure": {"probability": 0.15},
            "latency": {"distribution": "exponential", "mean_s": 3600},
            "time_acceleration": 7200,
        },
        "dispatch": {"mode": "inline", "wait_for": "all", "poll_interval_s": 0.05},
        "finetune": {"every_n_results": 4},
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value  # type: ignore[dict-item]
    return data


def _outcome(directory: Path) -> tuple[list[str], dict[str, float], dict[str, int]]:
    with CampaignStore(directory, create=False) as store:
        jobs = [j.candidate_id for j in store.jobs()]
        values = {m.candidate_id: m.values["cv"].value for m in store.measurements()}
        return jobs, values, store.job_counts()


def test_campaign_finds_high_heat_capacity_and_fails_cleanly(cv_pool: Path, tmp_path: Path) -> None:
    config = parse_config(_config(cv_pool))
    result = Campaign(config, tmp_path / "run").run()
    jobs, values, counts = _outcome(tmp_path / "run")
    assert len(jobs) == 24 and len(set(jobs)) == 24  # budget used, nobody twice
    assert counts.get("FAILED", 0) >= 1  # 15 % failures: recorded with reasons, campaign went on
    assert result.n_measured == len(values) == counts["SUCCEEDED"]
    assert result.stop_reason == "experiment budget reached"
    truth = {row["id"]: float(row["cv"]) for row in csv.DictReader(cv_pool.open())}
    # values are measured with noise sigma 2 J/(mol K), never copied from the truth
    assert all(abs(values[c] - truth[c]) < 10 for c in values)
    assert any(values[c] != truth[c] for c in values)
    # the model-chosen half beats the random half of the pool on average
    model_chosen = [truth[c] for c in jobs[8:]]
    assert sum(model_chosen) / len(model_chosen) > sum(truth.values()) / len(truth)
    with CampaignStore(tmp_path / "run", create=False) as store:
        decisions = store.decisions()
        kinds = [d["acquisition"] for d in decisions]
        assert kinds[:2] == ["initial_design"] * 2  # 8 random candidates in batches of 4
        assert set(kinds[2:]) == {"qlogei"}
        assert all(c.predicted_mean is not None for d in decisions[2:] for c in d["chosen"])
        assert store.latest_model_version() is not None


def test_debye_einstein_head_drives_a_campaign_on_heat_capacities(
    cv_pool: Path, tmp_path: Path
) -> None:
    """surrogate.head debye_einstein: Cv(300 K) through Debye + Einstein temperatures."""
    ensemble = {"n_trainable_blocks": 0, "model_size": "tiny", "epochs": 10, "warm_start_epochs": 3,
                "debye_output": "heat_capacity", "temperatures": [300.0]}  # fmt: skip
    surrogate = {"head": "debye_einstein", "n_members": 2, "ensemble": ensemble}
    config = parse_config(_config(cv_pool, surrogate=surrogate, budget={"experiments": 16}))
    result = Campaign(config, tmp_path / "run").run()
    assert result.stop_reason == "experiment budget reached"
    with CampaignStore(tmp_path / "run", create=False) as store:
        decisions = store.decisions()
        model = [
            c.predicted_mean[0] for d in decisions[2:] for c in d["chosen"] if c.predicted_mean
        ]
    assert model and all(0.0 < m < 400.0 for m in model)  # J/(mol K) per cell, finite
    specs = [p.read_text() for p in (tmp_path / "run").rglob("*.json") if "ensemble" in p.name]
    assert specs and all('"debye_einstein"' in text for text in specs)  # the head that was saved
    theta_only = {**ensemble, "debye_output": "theta"}
    with pytest.raises(CloudlabError, match="debye_einstein.*debye_output: heat_capacity"):
        parse_config(_config(cv_pool, surrogate={**surrogate, "ensemble": theta_only}))


def test_same_directory_refuses_a_different_config(cv_pool: Path, tmp_path: Path) -> None:
    from cloud_model.errors import ConfigError

    Campaign(parse_config(_config(cv_pool)), tmp_path).prepare()  # the pool is stored
    with pytest.raises(ConfigError, match="different config"):
        Campaign(parse_config(_config(cv_pool, seed=4)), tmp_path)


def _start(config: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "loop", "run", str(config), "--out", str(out), "--no-report"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for_jobs_in_flight(out: Path, proc: subprocess.Popen[bytes], n_done: int) -> bool:
    """Wait until the store shows >= n_done measured and a job at the lab; False if it ended."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "campaign.sqlite").exists():
            try:
                with CampaignStore(out, create=False) as store:
                    counts = store.job_counts()
            except (sqlite3.Error, CloudlabError):  # the store is being created
                counts = {}
            at_lab = counts.get("QUEUED", 0) + counts.get("RUNNING", 0)
            if at_lab and counts.get("SUCCEEDED", 0) + counts.get("FAILED", 0) >= n_done:
                return True
        time.sleep(0.05)
    return False


def test_kill_9_and_resume_gives_the_uninterrupted_result(cv_pool: Path, tmp_path: Path) -> None:
    """kill -9 the CLI at random points, resume, and compare with an uninterrupted run."""
    reference = parse_config(_config(cv_pool))
    Campaign(reference, tmp_path / "reference").run()
    ref_jobs, ref_values, _ = _outcome(tmp_path / "reference")

    # the same campaign through Ray actors, with a persistent simulated lab, killed twice
    killed = _config(cv_pool, dispatch={"mode": "ray", "wait_for": "all", "poll_interval_s": 0.05})
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(killed))
    out = tmp_path / "killed"
    kills = 0
    for n_done in (4, 12):  # kill once the store shows jobs at the lab, twice, later the 2nd time
        proc = _start(path, out)
        if _wait_for_jobs_in_flight(out, proc, n_done):
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    finished = subprocess.run(
        [sys.executable, "-m", "loop", "resume", str(out), "--no-report"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert kills == 2  # both kills landed with jobs at the lab
    jobs, values, counts = _outcome(out)
    assert len(jobs) == len(set(jobs)) == 24  # no candidate measured twice
    assert sorted(jobs) == sorted(ref_jobs)  # the same decisions
    assert values.keys() == ref_values.keys()  # no measurement lost
    assert all(abs(values[c] - ref_values[c]) < 1e-9 for c in values)  # the same measurements
    # the persistent lab ran each experiment once
    with CampaignStore(out, create=False) as store:
        assert store.get_meta("stop_reason") == "experiment budget reached"


def test_campaign_through_the_http_lab(
    cv_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same campaign against a real lab server on loopback (bearer auth, persisted jobs)."""
    from simulators.config import SimulatedLabConfig
    from simulators.ground_truth import GroundTruth
    from tests.simulators.lab_server import TOKEN, TOKEN_ENV, start_server

    rows = list(csv.DictReader(cv_pool.open()))
    truth = GroundTruth.from_rows(
        ((r["id"], {"cv": float(r["cv"])}) for r in rows), {"cv": "J/(mol K)"}
    )
    lab = SimulatedLabConfig(
        seed=1, capacity=4, noise={"sigma": 2.0}, failure={"probability": 0.15}
    )
    server = start_server(tmp_path, truth, lab, state_dir=tmp_path / "lab-state")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    try:
        data = _config(cv_pool, budget={"experiments": 12})
        data["adapter"] = {
            "kind": "http",
            "base_url": server.url,
            "token_env": TOKEN_ENV,
            "capacity": 4,
        }
        data["dispatch"] = {"mode": "inline", "wait_for": "all", "poll_interval_s": 0.05}
        result = Campaign(parse_config(data), tmp_path / "run").run()
    finally:
        server.stop()
    jobs, values, counts = _outcome(tmp_path / "run")
    assert len(set(jobs)) == 12
    assert result.n_measured == counts["SUCCEEDED"] == len(values) >= 8
    truth_cv = {r["id"]: float(r["cv"]) for r in rows}
    assert all(abs(values[c] - truth_cv[c]) < 10 for c in values)


def test_wrong_token_is_a_clear_error(
    cv_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulators.config import SimulatedLabConfig
    from simulators.ground_truth import GroundTruth
    from tests.simulators.lab_server import TOKEN, TOKEN_ENV, start_server

    rows = list(csv.DictReader(cv_pool.open()))
    truth = GroundTruth.from_rows(
        ((r["id"], {"cv": float(r["cv"])}) for r in rows), {"cv": "J/(mol K)"}
    )
    server = start_server(tmp_path, truth, SimulatedLabConfig(capacity=4))
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    try:
        data = _config(cv_pool)
        data["adapter"] = {"kind": "http", "base_url": server.url, "token_env": TOKEN_ENV}
        data["dispatch"] = {"mode": "inline", "wait_for": "all", "poll_interval_s": 0.05}
        with pytest.raises(LabRefusedError, match=TOKEN_ENV):
            Campaign(parse_config(data), tmp_path / "run").run()
        # an auth failure is not an experiment failure: the lab's probe refused the token
        # before any decision, so nothing was submitted, failed or counted
        _, values, counts = _outcome(tmp_path / "run")
        assert not values and not counts
        # with the token fixed, resume continues and spends the whole budget
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        result = Campaign.resume(tmp_path / "run").run()
    finally:
        server.stop()
    assert result.stop_reason == "experiment budget reached"
    assert result.n_submitted == 24 and result.n_measured > 0


def test_prior_data_trains_the_surrogate_from_the_first_decision(
    cv_pool: Path, tmp_path: Path
) -> None:
    """A time-split style campaign: labelled prior records are learned from, never selected."""
    rows = list(csv.DictReader(cv_pool.open()))
    prior_path, pool_path = tmp_path / "prior.csv", tmp_path / "pool.csv"
    for path, part in ((prior_path, rows[:60]), (pool_path, rows[60:])):
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["id", "scope", "cv"])
            w.writeheader()
            w.writerows(part)
    data = _config(pool_path, initial_design={"n_random": 0}, budget={"experiments": 8})
    data["prior"] = {**data["pool"], "file": str(prior_path)}
    Campaign(parse_config(data), tmp_path / "run").run()
    with CampaignStore(tmp_path / "run", create=False) as store:
        decisions = store.decisions()
        jobs = [j.candidate_id for j in store.jobs()]
    assert decisions[0]["acquisition"] == "qlogei"  # no random start needed
    assert decisions[0]["model_version"] == 1
    assert not {r["id"] for r in rows[:60]} & set(jobs)  # prior records are never proposed


def test_thirty_percent_failures_and_bad_pool_rows_do_not_stop_a_campaign(
    cv_pool: Path, tmp_path: Path
) -> None:
    rows = list(csv.DictReader(cv_pool.open()))
    rows += [
        {"id": "bad-empty", "scope": "", "cv": "10"},
        {"id": "bad-blank", "scope": "  ", "cv": "11"},
    ]
    pool = tmp_path / "pool_with_bad_rows.csv"
    with pool.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "scope", "cv"])
        writer.writeheader()
        writer.writerows(rows)
    lab = {"failure": {"probability": 0.3}}
    config = parse_config(_config(pool, adapter=lab, budget={"experiments": 32}))
    result = Campaign(config, tmp_path / "run").run()
    jobs, values, counts = _outcome(tmp_path / "run")
    assert len(jobs) == 32 and len(set(jobs)) == 32
    assert counts["FAILED"] >= 4 and counts["SUCCEEDED"] == len(values) == result.n_measured
    assert not {"bad-empty", "bad-blank"} & set(jobs)  # invalid rows left out, never proposed
    assert result.stop_reason == "experiment budget reached"
    with CampaignStore(tmp_path / "run", create=False) as store:
        reasons = [j.message for j in store.jobs(states=["FAILED"])]
    assert all(reasons)  # every failure recorded with its reason


def test_an_unknown_dataset_name_fails_before_anything_starts(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "configs" / "perovskite_water_splitting.yaml").read_text())
    data["pool"]["dataset"] = "perov_6"
    config = parse_config(data)
    with pytest.raises(CloudlabError, match="perov_6"):
        Campaign(config, tmp_path / "run").run()
    assert not (tmp_path / "run").exists()  # validated before anything was created on disk


class _InterruptWhenInFlight:
    """Progress hook: Ctrl-C (KeyboardInterrupt, what SIGINT raises) at the n-th step with jobs in flight."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.steps = at_step, 0

    def __call__(self, progress: object) -> None:
        if getattr(progress, "n_in_flight", 0) > 0:
            self.steps += 1
            if self.steps == self.at_step:
                raise KeyboardInterrupt


_KILL_SCRIPT = """
import json, os, signal, sys
from loop.campaign import Campaign
from loop.config import parse_config
config, out, at_step = parse_config(json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
steps = 0
def hook(progress):
    global steps
    if progress.n_in_flight > 0:
        steps += 1
        if steps == at_step:
            os.kill(os.getpid(), signal.SIGKILL)
Campaign(config, out).run(on_progress=hook)
"""


def _failed(directory: Path) -> set[str]:
    with CampaignStore(directory, create=False) as store:
        return {j.candidate_id for j in store.jobs(states=["FAILED", "LOST", "CANCELLED"])}


@pytest.mark.parametrize("wait_for", ["all", "any"])
def test_inline_sigint_and_sigkill_with_jobs_in_flight_then_resume(
    cv_pool: Path, tmp_path: Path, wait_for: str
) -> None:
    """Inline mode (the benchmarks' mode) loses nothing when stopped with jobs in flight."""
    data = _config(cv_pool, dispatch={"wait_for": wait_for})
    Campaign(parse_config(data), tmp_path / "reference").run()
    ref_jobs, ref_values, _ = _outcome(tmp_path / "reference")

    out = tmp_path / "stopped"
    for at_step in (3, 2):  # Ctrl-C twice, each time with jobs at the lab
        with pytest.raises(KeyboardInterrupt):
            Campaign(parse_config(data), out).run(on_progress=_InterruptWhenInFlight(at_step))
        with CampaignStore(out, create=False) as store:
            assert store.open_jobs(), "the interrupt should land with jobs in flight"
    killed = subprocess.run(  # then SIGKILL in another process, again with jobs in flight
        [sys.executable, "-c", _KILL_SCRIPT, json.dumps(data), str(out), "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with CampaignStore(out, create=False) as store:
        assert store.open_jobs()
    result = Campaign.resume(out).run()

    jobs, values, counts = _outcome(out)
    assert result.stop_reason == "experiment budget reached"
    assert jobs == ref_jobs  # the same decisions, in the same order
    assert values == ref_values  # the same measurements, none lost
    assert _failed(out) == _failed(tmp_path / "reference")  # nothing failed that had not failed
    with CampaignStore(out, create=False) as store:
        assert all("has no job" not in (j.message or "") for j in store.jobs())
