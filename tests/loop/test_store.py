from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from adapters.base import JobHandle, JobState, MeasuredValue, Measurement
from loop.store import CREATED, CampaignStore, ChosenCandidate, StoreError


def _decide(store: CampaignStore, *ids: str) -> int:
    return store.record_decision(
        keys=[f"c/{i}" for i in ids],
        chosen=[
            ChosenCandidate(candidate_id=i, acquisition_value=1.0, predicted_mean=[0.5])
            for i in ids
        ],
        model_version=None,
        acquisition="initial_design",
        n_pending=0,
        seconds=0.01,
    )


def test_job_lifecycle_is_durable(tmp_path: Path) -> None:
    store = CampaignStore(tmp_path)
    store.add_candidates([("a", "s1"), ("b", "s2"), ("c", "s3")])
    _decide(store, "a", "b")
    assert [j.state for j in store.open_jobs()] == [CREATED, CREATED]
    handle = JobHandle(adapter="sim", job_id="j1", idempotency_key="c/a", candidate_id="a")
    store.update_job("c/a", JobState.QUEUED, handle=handle)
    store.record_measurement(
        "c/a",
        Measurement(
            job_id="j1", candidate_id="a", values={"y": MeasuredValue(value=2.0, unit="eV")}
        ),
    )
    store.update_job("c/b", JobState.FAILED, message="failed synthesis")
    store.close()

    reopened = CampaignStore(tmp_path, create=False)
    assert reopened.n_candidates() == 3
    assert reopened.job_counts() == {"SUCCEEDED": 1, "FAILED": 1}
    assert reopened.open_jobs() == []
    (m,) = reopened.measurements()
    assert m.values["y"].value == 2.0
    assert [s for s, _ in reopened.job_events("c/a")] == [CREATED, "QUEUED", "SUCCEEDED"]
    (job_b,) = [j for j in reopened.jobs() if j.key == "c/b"]
    assert job_b.message == "failed synthesis"
    # a terminal job does not move again
    reopened.update_job("c/b", JobState.RUNNING)
    assert reopened.job_counts()["FAILED"] == 1
    (d,) = reopened.decisions()
    assert [c.candidate_id for c in d["chosen"]] == ["a", "b"]


def test_candidate_is_never_measured_twice(tmp_path: Path) -> None:
    store = CampaignStore(tmp_path)
    store.add_candidates([("a", "s1"), ("b", "s2")])
    _decide(store, "a")
    with pytest.raises(StoreError, match="measure twice"):
        _decide(store, "b", "a")
    # the failed decision left nothing behind
    assert [j.candidate_id for j in store.jobs()] == ["a"]
    assert len(store.decisions()) == 1


def test_measurement_recorded_once(tmp_path: Path) -> None:
    store = CampaignStore(tmp_path)
    store.add_candidates([("a", "s1")])
    _decide(store, "a")
    m = Measurement(job_id="j", candidate_id="a", values={"y": MeasuredValue(value=1.0, unit="eV")})
    store.record_measurement("c/a", m)
    store.record_measurement("c/a", m)  # a resumed campaign re-reading the result
    assert store.n_measurements() == 1


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no campaign store"):
        CampaignStore(tmp_path / "nowhere", create=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "campaign.sqlite").write_text("this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a valid SQLite"):
        CampaignStore(bad)
    store = CampaignStore(tmp_path / "ok")
    with pytest.raises(StoreError, match="unknown job"):
        store.update_job("nope", JobState.RUNNING)


def test_wal_mode_allows_a_reader_while_writing(tmp_path: Path) -> None:
    store = CampaignStore(tmp_path)
    store.add_candidates([("a", "s")])
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    with store.transaction() as db:
        db.execute("INSERT INTO meta(key, value) VALUES ('x', '1')")
        reader = CampaignStore(tmp_path, create=False)
        assert reader.n_candidates() == 1  # readers are not blocked by the open write
        assert reader.get_meta("x") is None  # and do not see uncommitted data
