"""Crash matrix over HTTP: ``cloudlab run`` killed (SIGKILL) or interrupted (SIGINT) with
jobs in flight at the real lab server (``python -m simulators.server`` on loopback, its
state on disk), inline and Ray modes, then ``cloudlab resume``.

Each case kills the CLI when the store shows a job at the lab (QUEUED or RUNNING), not
at a random time, and checks against an uninterrupted run on a fresh lab: the same
measurement set and values, as many lab submits as unique keys (no experiment ran
twice), and ``PRAGMA integrity_check`` ok. The in-process variant is
``tests/loop/test_campaign.py::test_kill_9_and_resume_gives_the_uninterrupted_result``.
The inline SIGKILL case runs by default; the other three are marked slow.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cloud_model.errors import CloudlabError
from loop.store import STORE_FILENAME, CampaignStore
from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth
from tests.loop import cv_data
from tests.simulators.lab_server import REPO, TOKEN, TOKEN_ENV, LabServer, start_server


@pytest.fixture(scope="module")
def cv_rows(data_dir: Path) -> list[dict[str, str]]:
    """40 crystals of cloud_cv: SCOPE strings with their heat capacity at 300 K."""
    return cv_data.cv_rows(data_dir, 40)


def _pool(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    return cv_data.write_cv_pool(tmp_path / "cv_pool.csv", rows)


def _budget(mode: str) -> int:
    return 8 if mode == "inline" else 12  # Ray: a third batch gives the second kill a chance


def _config(pool: Path, base_url: str, mode: str) -> dict:
    return {
        "name": "crashhttp",
        "seed": 3,
        "pool": {"file": str(pool), "id_column": "id", "structure_column": "scope",
                 "structure_format": "scope"},
        "objective": {"target": "cv", "sense": "maximize"},
        "surrogate": {"kind": "cloud_ensemble", "checkpoint": None, "n_members": 2,
                      "ensemble": {"n_trainable_blocks": 0, "model_size": "tiny", "epochs": 5}},
        "acquisition": {"kind": "qlogei", "batch_size": 4},
        "initial_design": {"n_random": 4},
        "budget": {"experiments": _budget(mode)},
        "adapter": {"kind": "http", "base_url": base_url, "token_env": TOKEN_ENV, "capacity": 4},
        "dispatch": {"mode": mode, "wait_for": "all", "poll_interval_s": 0.1},
        "finetune": {"every_n_results": 4},
    }  # fmt: skip


def _lab(tmp_path: Path, rows: list[dict[str, str]], name: str) -> LabServer:
    truth = GroundTruth.from_rows(
        ((r["id"], {"cv": float(r["cv"])}) for r in rows), {"cv": "J/(mol K)"}
    )
    # 1.5 s per experiment on the wall clock, 10 % failures, noise seeded per key
    lab = SimulatedLabConfig(
        seed=1, capacity=4, noise={"sigma": 2.0}, failure={"probability": 0.1},  # type: ignore[arg-type]
        latency={"distribution": "fixed", "mean_s": 1800}, time_acceleration=1200,  # type: ignore[arg-type]
    )  # fmt: skip
    return start_server(tmp_path / name, truth, lab, state_dir=tmp_path / name / "state")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "loop", *args, "--no-report"]


def _env() -> dict[str, str]:
    return {**os.environ, TOKEN_ENV: TOKEN, "PYTHONUNBUFFERED": "1"}


def _outcome(out: Path) -> tuple[list[str], dict[str, float], dict[str, int]]:
    with CampaignStore(out, create=False) as store:
        keys = [j.key for j in store.jobs()]
        values = {m.candidate_id: m.values["cv"].value for m in store.measurements()}
        return keys, values, store.job_counts()


def _lab_keys(server: LabServer) -> list[str]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    page = httpx.get(f"{server.url}/v1/jobs", params={"limit": 1000}, headers=headers, timeout=10)
    return [j["idempotency_key"] for j in page.json()["items"]]


def _wait_for_a_job_at_the_lab(out: Path, proc: subprocess.Popen[bytes], n_done: int) -> bool:
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / STORE_FILENAME).exists():
            try:
                with CampaignStore(out, create=False) as store:
                    counts = store.job_counts()
            except (sqlite3.Error, CloudlabError):
                counts = {}
            at_lab = counts.get("QUEUED", 0) + counts.get("RUNNING", 0)
            if at_lab and counts.get("SUCCEEDED", 0) + counts.get("FAILED", 0) >= n_done:
                return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("mode", "sig"),
    [
        ("inline", signal.SIGKILL),
        pytest.param("inline", signal.SIGINT, marks=pytest.mark.slow),
        pytest.param("ray", signal.SIGKILL, marks=pytest.mark.slow),
        pytest.param("ray", signal.SIGINT, marks=pytest.mark.slow),
    ],
)
def test_killed_with_jobs_at_the_http_lab_resumes_to_the_uninterrupted_result(
    tmp_path: Path, cv_rows: list[dict[str, str]], mode: str, sig: signal.Signals
) -> None:
    pool = _pool(tmp_path, cv_rows)
    reference_lab = _lab(tmp_path, cv_rows, "reference-lab")
    try:
        ref_config = tmp_path / "reference.yaml"
        ref_config.write_text(yaml.safe_dump(_config(pool, reference_lab.url, mode)))
        done = subprocess.run(
            _cli("run", str(ref_config), "--out", str(tmp_path / "reference")),
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        reference_lab.stop()
    ref_keys, ref_values, _ = _outcome(tmp_path / "reference")

    lab = _lab(tmp_path, cv_rows, "lab")
    out = tmp_path / "killed"
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(_config(pool, lab.url, mode)))
    try:
        kills = 0
        for n_done in (0, 4):  # at the first batch, then with a model-chosen batch at the lab
            command = (
                _cli("run", str(config), "--out", str(out))
                if kills == 0
                else _cli("resume", str(out))
            )
            proc = subprocess.Popen(
                command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
            if _wait_for_a_job_at_the_lab(out, proc, n_done):
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Ray processes
                else:
                    proc.send_signal(signal.SIGINT)  # Ctrl-C of the CLI
                kills += 1
            _, err = proc.communicate(timeout=120)
            if sig == signal.SIGINT:
                assert proc.returncode == 130, err.decode()[-3000:]
                assert b"Traceback" not in err
            if sig == signal.SIGKILL and mode == "ray":
                os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        finished = subprocess.run(
            _cli("resume", str(out)), cwd=REPO, env=_env(), capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert finished.returncode == 0, finished.stderr[-3000:]
        lab_keys = _lab_keys(lab)
    finally:
        lab.stop()
    assert kills == 2  # both landed with a job at the lab
    keys, values, counts = _outcome(out)
    assert len(keys) == len(set(keys)) == _budget(mode)
    assert sorted(keys) == sorted(ref_keys)  # the same decisions
    assert values.keys() == ref_values.keys()  # the same measurement set ...
    assert all(abs(values[c] - ref_values[c]) < 1e-9 for c in values)  # ... and values
    assert sorted(lab_keys) == sorted(set(keys))  # lab submits == unique keys
    with sqlite3.connect(out / STORE_FILENAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
