"""Whole campaigns through real lab orchestrators on loopback, each restarted mid-campaign.

* Bluesky: a real Redis and RE Manager running the reference profile collection;
  the RE Manager is SIGKILLed (with its worker) mid-campaign and started again.
* SiLA 2: the reference ExperimentRunner server over TLS with login; SIGKILLed
  mid-campaign and started again on the same state directory.

The queueserver campaign runs through ``cloudlab run`` (``python -m loop run``). Each
asserts that the campaign spends its budget, that the orchestrator ran no key
twice (items in the queueserver history vs unique keys; jobs in the SiLA lab's
journal vs unique keys) and that the measured values are the truth's (+ noise).
"""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from loop.campaign import Campaign
from loop.config import parse_config
from loop.store import CampaignStore
from simulators.ground_truth import GroundTruth
from tests.loop.cv_data import cv_rows, write_cv_pool

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BUDGET = 24


@pytest.fixture(scope="module")
def cv_pool(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """60 crystals of cloud_cv (SCOPE strings + heat capacity at 300 K) as a CSV pool."""
    return write_cv_pool(tmp_path_factory.mktemp("pool") / "cv_pool.csv", cv_rows(data_dir, 60))


def _truth(pool: Path) -> GroundTruth:
    rows = list(csv.DictReader(pool.open()))
    return GroundTruth.from_rows(
        ((r["id"], {"cv": float(r["cv"])}) for r in rows), {"cv": "J/(mol K)"}
    )


def _config(pool: Path, adapter: dict[str, object], mode: str = "inline") -> dict[str, object]:
    return {
        "name": "orchestrated",
        "seed": 4,
        "pool": {
            "file": str(pool),
            "id_column": "id",
            "structure_column": "scope",
            "structure_format": "scope",
        },
        "objective": {"target": "cv", "sense": "maximize"},
        "surrogate": {"kind": "random"},
        "acquisition": {"kind": "random", "batch_size": 4},
        "initial_design": {"n_random": 4},
        "budget": {"experiments": BUDGET},
        "adapter": adapter,
        "dispatch": {
            "mode": mode,
            "wait_for": "any",
            "concurrency": 4,
            "poll_interval_s": 0.1,
            "max_retries": 8,
            "backoff_base_s": 0.5,
            "backoff_max_s": 4.0,
        },
    }


def _restart_when(
    measured: Callable[[], int], at: int, restart: Callable[[], None]
) -> tuple[threading.Thread, list[float]]:
    """A thread that calls ``restart`` once ``measured()`` reaches ``at``; records the time."""
    done: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if measured() >= at:
                restart()
                done.append(time.monotonic())
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, done


def _outcome(directory: Path) -> tuple[list[str], dict[str, float], dict[str, int], list[str]]:
    with CampaignStore(directory, create=False) as store:
        jobs = list(store.jobs())
        for job in jobs:
            if job.state != "SUCCEEDED":
                print(f"{job.key} ({job.candidate_id}): {job.state} {job.message}")
        values = {m.candidate_id: m.values["cv"].value for m in store.measurements()}
        return [j.candidate_id for j in jobs], values, store.job_counts(), [j.key for j in jobs]


@pytest.mark.parametrize("mode", ["inline", "ray"])
def test_campaign_through_the_bluesky_queueserver_survives_a_re_manager_restart(
    cv_pool: Path, tmp_path: Path, mode: str
) -> None:
    from tests.adapters.queueserver_server import require_queueserver, start_queueserver

    require_queueserver()
    from bluesky_queueserver_api.zmq import REManagerAPI

    truth = _truth(cv_pool)
    server = start_queueserver(tmp_path / "qs", truth, latency_s=0.3, noise_sigma=0.5)

    def history() -> list[dict[str, object]]:
        api = REManagerAPI(zmq_control_addr=server.control_address, timeout_recv=2)
        try:
            return list(api.history_get()["items"])
        except Exception:  # noqa: BLE001 - down while restarting
            return []
        finally:
            api.close()

    def restart() -> None:
        server.kill_manager()
        time.sleep(1.0)
        server.start_manager()

    try:
        adapter = {
            "kind": "queueserver",
            "control_address": server.control_address,
            "capacity": 4,
            "request_timeout_s": 2.0,
        }
        config = tmp_path / "queueserver_campaign.yaml"
        config.write_text(yaml.safe_dump(_config(cv_pool, adapter, mode)))
        watcher, restarted = _restart_when(lambda: len(history()), 8, restart)
        started = time.monotonic()
        run = subprocess.run(  # the real entry point: `cloudlab run`
            [sys.executable, "-m", "loop", "run", str(config), "--out", str(tmp_path / "run")],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
        wall = time.monotonic() - started
        watcher.join(timeout=5)
        items = history()
    finally:
        server.stop()
    jobs, values, counts, keys = _outcome(tmp_path / "run")
    per_key = Counter(str(i["meta"]["cloudlab_key"]) for i in items)  # type: ignore[index]
    duplicates = sum(n - 1 for n in per_key.values())
    print(  # the closing note's numbers (pytest -s)
        f"queueserver campaign ({mode}): {len(jobs)} experiments, {counts}, history items {len(items)}, "
        f"unique keys {len(per_key)}, duplicates {duplicates}, restarts {len(restarted)}, "
        f"wall {wall:.1f} s"
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert restarted, "the RE Manager was never restarted"
    with CampaignStore(tmp_path / "run", create=False) as store:
        assert store.get_meta("stop_reason") == "experiment budget reached"
    assert len(jobs) == BUDGET
    assert duplicates == 0 and set(per_key) == set(keys)  # every key ran once, none twice
    assert counts.get("SUCCEEDED", 0) >= BUDGET - 4  # at most the in-flight plans are LOST
    truth_cv = {cid: row["cv"] for cid, row in truth.values.items()}
    assert all(abs(values[c] - truth_cv[c]) < 3.0 for c in values)


def test_campaign_through_sila2_survives_a_server_restart(
    cv_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulators.config import SimulatedLabConfig
    from simulators.journal import open_lab
    from tests.adapters.sila_server import PASSWORD, PASSWORD_ENV, require_sila, start_sila_server

    require_sila()
    truth = _truth(cv_pool)
    lab = SimulatedLabConfig.model_validate(
        {
            "seed": 2,
            "capacity": 4,
            "noise": {"sigma": 0.5},
            "failure": {"probability": 0.1},
            "latency": {"distribution": "exponential", "mean_s": 60.0},
            "time_acceleration": 200.0,
        }
    )
    server = start_sila_server(tmp_path / "sila", truth, lab)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)

    def restart() -> None:
        server.stop(crash=True)
        time.sleep(1.0)
        server.start()

    run_dir = tmp_path / "run"

    def measured() -> int:
        if not (run_dir / "campaign.sqlite").exists():
            return 0
        try:
            with CampaignStore(run_dir, create=False) as store:
                return len(list(store.measurements()))
        except Exception:  # noqa: BLE001 - the store may be mid-write
            return 0

    try:
        adapter = {
            "kind": "sila",
            "port": server.port,
            "ca_file": str(server.certificate),
            "password_env": PASSWORD_ENV,
            "capacity": 4,
        }
        watcher, restarted = _restart_when(measured, 8, restart)
        started = time.monotonic()
        result = Campaign(parse_config(_config(cv_pool, adapter)), run_dir).run()
        wall = time.monotonic() - started
        watcher.join(timeout=5)
    finally:
        server.stop()
    jobs, values, counts, keys = _outcome(run_dir)
    journal = open_lab(truth, lab, server.state_dir / "lab")
    try:
        lab_jobs, total = journal.list_jobs(limit=10_000)
    finally:
        journal.close()
    per_key = Counter(h.idempotency_key for h, _ in lab_jobs)
    duplicates = sum(n - 1 for n in per_key.values())
    print(
        f"sila2 campaign: {len(jobs)} experiments, {counts}, lab jobs {total}, unique keys "
        f"{len(per_key)}, duplicates {duplicates}, restarts {len(restarted)}, wall {wall:.1f} s"
    )
    assert restarted, "the SiLA server was never restarted"
    assert result.stop_reason == "experiment budget reached" and len(jobs) == BUDGET
    assert duplicates == 0 and total == BUDGET and set(per_key) == set(keys)
    assert counts.get("SUCCEEDED", 0) + counts.get("FAILED", 0) == BUDGET
    truth_cv = {cid: row["cv"] for cid, row in truth.values.items()}
    assert all(abs(values[c] - truth_cv[c]) < 3.0 for c in values)
