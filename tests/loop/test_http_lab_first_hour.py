"""A first hour with an HTTP lab: an unreachable lab fails fast, an outage shows on the console.

Real lab servers on loopback (``python -m simulators.server`` in a subprocess), real
campaigns, no mocks: a closed port makes ``python -m loop run`` exit 2 in seconds
with the URL in its one error line and no job in the store; a lab that goes away
mid-campaign turns the engine's RETRYING events into ``Progress.last_warning``, and
the campaign, stopped there, resumes once the lab is back on its state directory.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cloud_model.errors import CloudlabError
from loop.campaign import Campaign, LabRefusedError
from loop.config import parse_config
from loop.records import Progress
from loop.store import STORE_FILENAME, CampaignStore
from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth
from tests.loop import cv_data
from tests.simulators.lab_server import REPO, TOKEN, TOKEN_ENV, LabServer, free_port, start_server


@pytest.fixture(scope="module")
def cv_rows(data_dir: Path) -> list[dict[str, str]]:
    """40 crystals of cloud_cv: SCOPE strings with their heat capacity at 300 K."""
    return cv_data.cv_rows(data_dir, 40)


@pytest.fixture
def cv_pool(tmp_path: Path, cv_rows: list[dict[str, str]]) -> Path:
    return cv_data.write_cv_pool(tmp_path / "cv_pool.csv", cv_rows)


def _config(pool: Path, base_url: str) -> dict:
    """Two random batches of 4 at an HTTP lab; retries fast so that a test sees many."""
    return {
        "name": "firsthour",
        "seed": 3,
        "pool": {"file": str(pool), "id_column": "id", "structure_column": "scope",
                 "structure_format": "scope"},
        "objective": {"target": "cv", "sense": "maximize"},
        "surrogate": {"kind": "cloud_ensemble", "checkpoint": None, "n_members": 2,
                      "ensemble": {"n_trainable_blocks": 0, "model_size": "tiny", "epochs": 5}},
        "acquisition": {"kind": "qlogei", "batch_size": 4},
        "initial_design": {"n_random": 8},
        "budget": {"experiments": 8},
        "adapter": {"kind": "http", "base_url": base_url, "token_env": TOKEN_ENV, "capacity": 4,
                    "max_attempts": 1, "connect_timeout_s": 1.0, "read_timeout_s": 2.0},
        "dispatch": {"mode": "inline", "wait_for": "all", "poll_interval_s": 0.05,
                     "max_retries": 1000, "backoff_base_s": 0.05, "backoff_max_s": 0.2},
    }  # fmt: skip


def _truth(rows: list[dict[str, str]]) -> GroundTruth:
    return GroundTruth.from_rows(
        ((r["id"], {"cv": float(r["cv"])}) for r in rows), {"cv": "J/(mol K)"}
    )


def test_cli_run_against_a_closed_port_fails_in_seconds_with_the_url(
    cv_pool: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    config, out = tmp_path / "campaign.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(_config(cv_pool, url)))
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-m", "loop", "run", str(config), "--out", str(out), "--no-report"],
        cwd=REPO,
        env={**os.environ, TOKEN_ENV: TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert elapsed < 20.0, f"took {elapsed:.1f} s"
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, finished.stderr[-3000:]
    assert errors[0].startswith(f"error: lab at {url} is unreachable: GET {url}/v1/jobs?limit=1")
    assert "check that the lab is running" in errors[0]
    assert "Traceback" not in finished.stderr
    if (out / STORE_FILENAME).exists():  # the pool may be recorded; no decision, no job
        with CampaignStore(out, create=False) as store:
            assert store.jobs() == [] and store.decisions() == []
            assert store.get_meta("stop_reason") is None


class _StopTheLabThenInterrupt:
    """Progress hook: stop the lab once it holds the first batch, Ctrl-C once a warning shows."""

    def __init__(self, server: LabServer, deadline_s: float = 90.0) -> None:
        self.server, self.stopped = server, False
        self.warnings: list[str] = []
        self.deadline = time.monotonic() + deadline_s

    def __call__(self, progress: Progress) -> None:
        if time.monotonic() > self.deadline:
            raise AssertionError("no warning reached Progress.last_warning in time")
        if not self.stopped and progress.n_in_flight > 0 and self._lab_jobs() >= 4:
            self.server.stop()
            self.stopped = True
        elif self.stopped and progress.last_warning:
            self.warnings.append(progress.last_warning)
            raise KeyboardInterrupt

    def _lab_jobs(self) -> int:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        page = httpx.get(f"{self.server.url}/v1/jobs", headers=headers, timeout=5.0).json()
        return int(page["total"])


def test_a_lab_that_goes_away_shows_in_progress_then_the_campaign_resumes(
    cv_pool: Path, tmp_path: Path, cv_rows: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    truth, state = _truth(cv_rows), tmp_path / "lab-state"
    # 3 s of wall time per experiment: the lab goes away with the batch still running
    latency = {"distribution": "fixed", "mean_s": 3600}
    lab = SimulatedLabConfig(seed=1, capacity=4, latency=latency, time_acceleration=1200)  # type: ignore[arg-type]
    server = start_server(tmp_path / "lab", truth, lab, state_dir=state)
    out = tmp_path / "run"
    hook = _StopTheLabThenInterrupt(server)
    try:
        with pytest.raises(KeyboardInterrupt):
            Campaign(parse_config(_config(cv_pool, server.url)), out).run(on_progress=hook)
    finally:
        server.stop()
    assert hook.stopped and len(hook.warnings) == 1
    warning = hook.warnings[0]
    assert f"{server.url}/v1/jobs/" in warning and "connection failed (ConnectError" in warning
    assert "retry " in warning and "/1000 in " in warning
    with CampaignStore(out, create=False) as store:  # nothing failed, the batch is still open
        assert store.get_meta("stop_reason") == "interrupted"
        open_jobs = store.open_jobs()
        assert len(open_jobs) == len(store.jobs()) == 4 and all(j.handle for j in open_jobs)

    back = start_server(tmp_path / "lab", truth, lab, state_dir=state, port=server.port)
    seen: list[Progress] = []
    try:
        result = Campaign.resume(out).run(on_progress=seen.append)
        lab_keys = [j["idempotency_key"] for j in _all_lab_jobs(back)]
    finally:
        back.stop()
    assert result.stop_reason == "experiment budget reached"
    assert result.n_submitted == 8 and result.n_measured + result.n_failed == 8
    with CampaignStore(out, create=False) as store:
        keys = [j.key for j in store.jobs()]
    assert len(set(keys)) == 8 and sorted(lab_keys) == sorted(keys)  # each experiment ran once
    assert seen[-1].last_warning is None  # the lab answered again


def _all_lab_jobs(server: LabServer) -> list[dict]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    page = httpx.get(f"{server.url}/v1/jobs", params={"limit": 100}, headers=headers, timeout=5.0)
    return list(page.json()["items"])


def test_a_wrong_token_is_refused_before_any_job_then_resume_runs(
    cv_pool: Path, tmp_path: Path, cv_rows: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(tmp_path / "lab", _truth(cv_rows), SimulatedLabConfig(capacity=4))
    out = tmp_path / "run"
    try:
        monkeypatch.setenv(TOKEN_ENV, "not-the-token")
        with pytest.raises(
            LabRefusedError, match=f"HTTP 401.*\\${TOKEN_ENV}.*Nothing was submitted"
        ):
            Campaign(parse_config(_config(cv_pool, server.url)), out).run()
        with CampaignStore(out, create=False) as store:  # the probe came before any decision
            assert store.jobs() == [] and store.decisions() == []
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        result = Campaign.resume(out).run()
    finally:
        server.stop()
    assert result.stop_reason == "experiment budget reached" and result.n_submitted == 8


class _KillTheLab:
    """Progress hook: SIGKILL the lab server once it holds the first batch."""

    def __init__(self, server: LabServer) -> None:
        self.server = server
        self.killed_at: float | None = None
        self.deadline = time.monotonic() + 90.0

    def __call__(self, progress: Progress) -> None:
        if time.monotonic() > self.deadline:
            raise AssertionError("the campaign did not stop after the lab vanished")
        if self.killed_at is None and progress.n_in_flight > 0:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            page = httpx.get(f"{self.server.url}/v1/jobs", headers=headers, timeout=5.0).json()
            if int(page["total"]) >= 4:
                self.server.stop(crash=True)
                self.killed_at = time.monotonic()


def test_a_lab_that_vanishes_stops_the_campaign_at_the_deadline_then_resume_finishes(
    cv_pool: Path, tmp_path: Path, cv_rows: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from loop.campaign import LabGoneError

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    truth, state = _truth(cv_rows), tmp_path / "lab-state"
    latency = {"distribution": "fixed", "mean_s": 3600}  # 3 s per experiment: killed mid-batch
    lab = SimulatedLabConfig(seed=1, capacity=4, latency=latency, time_acceleration=1200)  # type: ignore[arg-type]
    server = start_server(tmp_path / "lab", truth, lab, state_dir=state)
    data = _config(cv_pool, server.url)
    data["dispatch"]["lab_deadline_s"] = 2.0  # retries (1000 of them) would go on for minutes
    out = tmp_path / "run"
    hook = _KillTheLab(server)
    try:
        with pytest.raises(LabGoneError, match=r"has not answered for \d+ s") as stopped:
            Campaign(parse_config(data), out).run(on_progress=hook)
    finally:
        server.stop()
    assert hook.killed_at is not None
    assert time.monotonic() - hook.killed_at < 30.0  # the deadline, not the 1000 retries
    message = str(stopped.value)
    assert server.url in message and f"cloudlab resume {out}" in message
    assert isinstance(stopped.value, CloudlabError)  # the CLI: one line, exit status 2
    with CampaignStore(out, create=False) as store:  # consistent; nothing counted as failed
        assert store.get_meta("stop_reason") == "lab unreachable"
        assert store.job_counts().get("FAILED", 0) == 0
        open_jobs = store.open_jobs()
        assert len(open_jobs) == len(store.jobs()) == 4 and all(j.handle for j in open_jobs)
    with sqlite3.connect(out / STORE_FILENAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    back = start_server(tmp_path / "lab", truth, lab, state_dir=state, port=server.port)
    try:
        result = Campaign.resume(out).run()
        lab_keys = [j["idempotency_key"] for j in _all_lab_jobs(back)]
    finally:
        back.stop()
    assert result.stop_reason == "experiment budget reached"
    with CampaignStore(out, create=False) as store:
        keys = [j.key for j in store.jobs()]
    assert len(set(keys)) == 8 and sorted(lab_keys) == sorted(keys)  # each experiment ran once
