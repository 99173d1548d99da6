"""The campaign alone: a fake agent and a fake executor, no model, no Ray, no lab."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from adapters.base import (
    EventKind,
    ExperimentRequest,
    JobEvent,
    JobHandle,
    MeasuredValue,
    Measurement,
)
from cloud_model.errors import ConfigError
from loop.agent import CampaignView, Proposal
from loop.campaign import Campaign
from loop.config import parse_config
from loop.store import CampaignStore, ChosenCandidate

SCOPE = "225 | Fm-3m | 4a Na 4b Cl"  # any string: the fake agent never reads it


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "scope", "y"])
        for i in range(30):
            w.writerow([f"c{i:02d}", SCOPE, float(i)])
    return path


def _config(pool: Path, **sections: dict) -> object:
    data = {
        "name": "roles",
        "pool": {
            "file": str(pool),
            "id_column": "id",
            "structure_column": "scope",
            "structure_format": "scope",
        },
        "objective": {"target": "y", "sense": "maximize"},
        "acquisition": {"batch_size": 3},
        "budget": {"experiments": 12},
        "dispatch": {"mode": "inline", "concurrency": 3},
    }
    data.update(sections)
    return parse_config(data)


class FakeAgent:
    """Proposes the lowest free indices; remembers what it was shown."""

    def __init__(self) -> None:
        self.views: list[tuple[CampaignView, int]] = []
        self.model_version: int | None = 7

    def propose(self, view: CampaignView, n_free: int) -> Proposal:
        self.views.append((view, n_free))
        free = [i for i in range(30) if i not in view.taken][:n_free]
        return Proposal(
            chosen=[ChosenCandidate(candidate_id=f"c{i:02d}", acquisition_value=1.0) for i in free],
            model_version=self.model_version,
            acquisition="fake",
        )


class FakeExecutor:
    """Accepts every job at once; finishes the oldest one per call (or fails it)."""

    def __init__(self, fail: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.fail = fail
        self.submitted: list[str] = []
        self.tracked: list[str] = []
        self.open: list[JobHandle] = []
        self.events: list[JobEvent] = []
        self.closed = False

    def submit(self, request: ExperimentRequest, idempotency_key: str) -> None:
        self.submitted.append(idempotency_key)
        handle = JobHandle(
            adapter="fake",
            job_id=idempotency_key,
            idempotency_key=idempotency_key,
            candidate_id=request.candidate_id,
        )
        self.open.append(handle)
        self.events.append(
            JobEvent(
                kind=EventKind.SUBMITTED,
                idempotency_key=idempotency_key,
                candidate_id=request.candidate_id,
                handle=handle,
            )
        )

    def track(self, handle: JobHandle) -> None:
        self.tracked.append(handle.idempotency_key)
        self.open.append(handle)

    def cancel(self, idempotency_key: str) -> bool:
        return False

    def next_events(self, timeout: float | None = None) -> list[JobEvent]:
        out, self.events = self.events, []
        if not out and self.open:
            h = self.open.pop(0)
            if h.candidate_id in self.fail:
                out.append(
                    JobEvent(
                        kind=EventKind.FAILED,
                        idempotency_key=h.idempotency_key,
                        candidate_id=h.candidate_id,
                        handle=h,
                        message="no crystals",
                    )
                )
            else:
                value = float(h.candidate_id[1:])
                m = Measurement(
                    job_id=h.job_id,
                    candidate_id=h.candidate_id,
                    values={"y": MeasuredValue(value=value, unit="eV")},
                )
                out.append(
                    JobEvent(
                        kind=EventKind.SUCCEEDED,
                        idempotency_key=h.idempotency_key,
                        candidate_id=h.candidate_id,
                        handle=h,
                        measurement=m,
                    )
                )
        return out

    def outstanding(self) -> int:
        return len(self.open)

    def shutdown(self, graceful: bool = True, cancel_in_flight: bool = False) -> list[JobHandle]:
        self.closed = True
        return list(self.open)


def test_fills_free_slots_records_decisions_and_stops_at_the_budget(
    pool: Path, tmp_path: Path
) -> None:
    agent, executor = FakeAgent(), FakeExecutor()
    result = Campaign(_config(pool), tmp_path / "run").run(agent=agent, executor=executor)
    assert result.stop_reason == "experiment budget reached"
    assert result.n_submitted == result.n_measured == 12
    assert result.best_value == 11.0 and result.best_id == "c11"
    assert executor.submitted == [f"roles/c{i:02d}" for i in range(12)] and executor.closed
    # asked only with a whole batch free (concurrency 3 = batch 3), never over the concurrency
    assert all(n_free == 3 for _, n_free in agent.views)
    assert all(len(view.pending) == 0 for view, _ in agent.views)
    with CampaignStore(tmp_path / "run", create=False) as store:
        decisions = store.decisions()
    assert [d["acquisition"] for d in decisions] == ["fake"] * 4
    assert {d["model_version"] for d in decisions} == {7}


def test_wait_for_any_refills_as_soon_as_slots_free(pool: Path, tmp_path: Path) -> None:
    config = _config(
        pool, acquisition={"batch_size": 1}, dispatch={"mode": "inline", "concurrency": 3}
    )
    agent = FakeAgent()
    Campaign(config, tmp_path / "run").run(agent=agent, executor=FakeExecutor())
    assert [n for _, n in agent.views][:4] == [1, 1, 1, 1]
    assert max(len(view.pending) for view, _ in agent.views) == 2  # others still in flight


def test_failures_are_recorded_and_the_failure_rule_stops_the_loop(
    pool: Path, tmp_path: Path
) -> None:
    config = _config(pool, stop={"max_failure_fraction": 0.5}, budget={"experiments": 30})
    executor = FakeExecutor(fail={f"c{i:02d}" for i in range(30) if i % 3})  # 2 of 3 fail
    result = Campaign(config, tmp_path / "run").run(agent=FakeAgent(), executor=executor)
    assert result.stop_reason.endswith("jobs failed") and result.n_submitted < 30
    with CampaignStore(tmp_path / "run", create=False) as store:
        assert {j.message for j in store.jobs(states=["FAILED"])} == {"no crystals"}


def test_resume_resubmits_unaccepted_jobs_by_key_and_tracks_the_others(
    pool: Path, tmp_path: Path
) -> None:
    campaign = Campaign(_config(pool), tmp_path / "run")

    class Stop(FakeExecutor):  # accepts the first batch, then "crashes" before any result
        def next_events(self, timeout: float | None = None) -> list[JobEvent]:
            if self.events:
                out = self.events[:2]  # only two SUBMITTED events reach the store
                self.events = []
                return out
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        campaign.run(agent=FakeAgent(), executor=Stop())
    executor = FakeExecutor()
    result = Campaign.resume(tmp_path / "run").run(agent=FakeAgent(), executor=executor)
    assert executor.tracked == [
        "roles/c00",
        "roles/c01",
    ]  # accepted before: polled, not resubmitted
    assert executor.submitted[0] == "roles/c02"  # never accepted: submitted again with its key
    assert result.n_submitted == result.n_measured == 12


def test_unknown_initial_design_ids_are_an_error_before_anything_is_created(
    pool: Path, tmp_path: Path
) -> None:
    config = _config(pool, initial_design={"ids": ["c01", "nope-1", "nope-2"]})
    with pytest.raises(ConfigError, match=r"initial_design.ids: 2 id\(s\).*nope-1"):
        Campaign(config, tmp_path / "run").run(agent=FakeAgent(), executor=FakeExecutor())
    assert not (tmp_path / "run").exists()


def test_best_is_the_targets_own_value_for_a_minimisation(pool: Path, tmp_path: Path) -> None:
    config = _config(pool, objective={"target": "y", "sense": "minimize"})
    result = Campaign(config, tmp_path / "run").run(agent=FakeAgent(), executor=FakeExecutor())
    assert (result.best_value, result.best_id) == (0.0, "c00")  # not the negated score
    executor = FakeExecutor()
    config = _config(pool, objective={"target": "y", "sense": "minimize"})
    campaign = Campaign(config, tmp_path / "other")
    campaign.run(agent=FakeAgent(), executor=executor)
    assert campaign.best() == (0.0, "c00") and campaign.unit() == ""


_RESUME_SCRIPT = """
import sys
from loop.cli import main
sys.argv = ["cloudlab", "resume", sys.argv[1], "--no-report"]
try:
    main()
finally:
    print("modules:", sorted(m for m in ("ray",) if m in sys.modules))
"""


def test_resume_of_a_finished_campaign_does_nothing_and_starts_no_ray(
    pool: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    Campaign(_config(pool), tmp_path / "run").run(agent=FakeAgent(), executor=FakeExecutor())
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, str(tmp_path / "run")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already complete (experiment budget reached)" in done.stderr
    assert "modules: []" in done.stdout


def test_report_and_status_of_a_directory_without_a_campaign_are_one_line_errors(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    for command in ("report", "status"):
        done = subprocess.run(
            [sys.executable, "-m", "loop", command, str(tmp_path / "nope")],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and "not a campaign directory" in done.stderr
        assert not (tmp_path / "nope").exists()
