"""The approval gate: proposals wait in the store, people (or a timeout) decide, the loop follows."""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud_model.errors import ConfigError
from loop.approval import ApprovalError, decide, expire, formula_from_scope, list_proposals
from loop.campaign import Campaign
from loop.config import ApprovalConfig, parse_config
from loop.store import PROPOSED, REJECTED, CampaignStore
from tests.loop.cv_data import cv_rows, write_cv_pool
from tests.loop.test_campaign_roles import FakeAgent, FakeExecutor

REPO = Path(__file__).resolve().parents[2]
SCOPE = "1 3 a E C C n O O O e O O O 0 | 3a 3b 18h | Ba 0.12 Ti 0.12 F 0.75"


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "scope", "y"])
        for i in range(30):
            w.writerow([f"c{i:02d}", SCOPE, float(i)])
    return path


def _config(pool: Path, **sections: object) -> object:
    data: dict[str, object] = {
        "name": "gate",
        "pool": {
            "file": str(pool),
            "id_column": "id",
            "structure_column": "scope",
            "structure_format": "scope",
        },  # fmt: skip
        "objective": {"target": "y", "sense": "maximize"},
        "acquisition": {"batch_size": 2},
        "budget": {"experiments": 6},
        "dispatch": {"mode": "inline", "concurrency": 4},
        "approval": {"mode": "required", "poll_interval_s": 0.02},
    }
    data.update(sections)
    return parse_config(data)


def _waiting(directory: Path) -> list[str]:
    if not (directory / "campaign.sqlite").is_file():
        return []
    with CampaignStore(directory, create=False) as store:
        return [p.candidate_id for p in list_proposals(store, status=PROPOSED)]


def _wait_for(predicate: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# ---------------------------------------------------------------- units
def test_formula_from_a_scope_strings_composition() -> None:
    assert formula_from_scope(SCOPE) == "BaTiF6"  # fractions rounded to 2 decimals: 1/8, 1/8, 3/4
    assert formula_from_scope("x | 4e 4c 2b | Ca 0.57 Sb 0.29 O 0.14") == "Ca4Sb2O"
    assert formula_from_scope("x | Fe 2 O 3") == "Fe2O3"
    assert formula_from_scope("225 | Fm-3m | 4a Na 4b Cl") == ""  # no composition part


def test_approval_config_is_validated_and_the_default_keeps_old_fingerprints(pool: Path) -> None:
    with pytest.raises(ConfigError, match=r"approval\.mode"):
        _config(pool, approval={"mode": "maybe"})
    with pytest.raises(ConfigError, match=r"approval\.timeout_s"):
        _config(pool, approval={"mode": "required", "timeout_s": -1})
    auto = _config(pool, approval={"mode": "auto"})
    absent = parse_config(
        {k: v for k, v in auto.model_dump(mode="json").items() if k != "approval"}
    )  # type: ignore[attr-defined]
    assert auto.fingerprint() == absent.fingerprint()  # type: ignore[attr-defined]
    assert auto.fingerprint() != _config(pool).fingerprint()  # type: ignore[attr-defined]


def _propose(tmp_path: Path, pool: Path, **sections: object) -> Path:
    """A gated campaign whose first decision is stored; it is then interrupted."""
    directory = tmp_path / "run"

    campaign = Campaign(_config(pool, **sections), directory)  # type: ignore[arg-type]

    def stop(progress: object) -> None:
        if getattr(progress, "n_awaiting_approval", 0) >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        campaign.run(agent=FakeAgent(), executor=FakeExecutor(), on_progress=stop)
    return directory


def test_decide_checks_ids_notes_and_double_decisions(pool: Path, tmp_path: Path) -> None:
    directory = _propose(tmp_path, pool)
    assert _waiting(directory) == ["c00", "c01", "c02", "c03"]  # two batches fill the 4 slots
    with CampaignStore(directory, create=False) as store:
        with pytest.raises(ApprovalError, match="nope is not a proposal"):
            decide(store, ["c00", "nope"], approve=True, actor="ann")
        with pytest.raises(ApprovalError, match="--note"):
            decide(store, ["c00"], approve=False, actor="ann", note=" ")
        with pytest.raises(ApprovalError, match=r"candidate ids\) or give --all"):
            decide(store, [], approve=True, actor="ann")
        assert _waiting(directory) == ["c00", "c01", "c02", "c03"]  # nothing changed
        done = decide(store, ["c00", "gate/c01"], approve=True, actor="ann", note="fine")
        assert [(p.candidate_id, p.status, p.decided_by, p.note) for p in done] == [
            ("c00", "APPROVED", "ann", "fine"),
            ("c01", "APPROVED", "ann", "fine"),
        ]
        with pytest.raises(ApprovalError, match="c00 was already approved by ann"):
            decide(store, ["c00"], approve=False, actor="bob", note="too late")
        rejected = decide(store, ["c02"], approve=False, actor="bob", note="toxic")
        assert rejected[0].status == REJECTED
        # what chose it travels with the proposal
        detail = rejected[0].detail
        assert (detail.formula, detail.scope, detail.model_version) == ("BaTiF6", SCOPE, 7)
        assert detail.acquisition == "fake" and detail.acquisition_value == 1.0
        # two deciders at once: the store lets only one of them win
        assert store.decide_proposals(["gate/c03"], approve=True, actor="x", note=None) == [
            "gate/c03"
        ]
        assert store.decide_proposals(["gate/c03"], approve=False, actor="y", note="n") == []
        states = {j.candidate_id: j.state for j in store.jobs()}
    assert states == {"c00": "CREATED", "c01": "CREATED", "c02": "REJECTED", "c03": "CREATED"}


def test_timeout_skips_or_approves_only_overdue_proposals(pool: Path, tmp_path: Path) -> None:
    directory = _propose(tmp_path, pool)
    later = datetime.now(UTC) + timedelta(seconds=60)
    with CampaignStore(directory, create=False) as store:
        assert expire(store, ApprovalConfig(mode="required")) == []  # no timeout: waits forever
        config = ApprovalConfig(mode="required", timeout_s=3600, on_timeout="skip")
        assert expire(store, config, now=later) == []  # not overdue yet
        decide(store, ["c00"], approve=True, actor="ann")
        config = ApprovalConfig(mode="required", timeout_s=30, on_timeout="skip")
        assert expire(store, config, now=later) == ["gate/c01", "gate/c02", "gate/c03"]
        audit = {p.candidate_id: (p.status, p.decided_by) for p in list_proposals(store)}
    assert audit == {
        "c00": ("APPROVED", "ann"),  # decided before the timeout: left alone
        "c01": ("REJECTED", "timeout"),
        "c02": ("REJECTED", "timeout"),
        "c03": ("REJECTED", "timeout"),
    }


# ---------------------------------------------------------------- the loop behind the gate
def test_campaign_waits_continues_after_approval_and_never_reproposes_a_rejection(
    pool: Path, tmp_path: Path
) -> None:
    """A person in another thread approves some proposals and rejects others while it runs."""
    directory, executor, agent = tmp_path / "run", FakeExecutor(), FakeAgent()
    campaign = Campaign(_config(pool), directory)  # type: ignore[arg-type]
    result: dict[str, object] = {}
    runner = threading.Thread(
        target=lambda: result.update(r=campaign.run(agent=agent, executor=executor)),
        daemon=True,
    )
    runner.start()
    try:
        _wait_for(lambda: len(_waiting(directory)) == 4)
        time.sleep(0.2)
        assert executor.submitted == [] and _waiting(directory) == ["c00", "c01", "c02", "c03"]
        with CampaignStore(directory) as store:  # a second connection, as another process has
            decide(store, ["c01", "c03"], approve=False, actor="ann", note="not this one")
            decide(store, ["c00"], approve=True, actor="ann")
        # c00 runs while the other proposals wait; the rejected slots are proposed again
        _wait_for(lambda: "gate/c00" in executor.submitted and "c05" in _waiting(directory))
        with CampaignStore(directory) as store:
            while runner.is_alive():
                if list_proposals(store, status=PROPOSED):
                    decide(store, [], approve=True, actor="bob", all_waiting=True)
                time.sleep(0.02)
    finally:
        runner.join(timeout=30)
    outcome = result["r"]
    assert outcome.stop_reason == "experiment budget reached"  # type: ignore[attr-defined]
    assert outcome.n_submitted == outcome.n_measured == 6  # type: ignore[attr-defined]
    assert "gate/c01" not in executor.submitted and "gate/c03" not in executor.submitted
    with CampaignStore(directory, create=False) as store:
        chosen = [c.candidate_id for d in store.decisions() for c in d["chosen"]]
        states = {j.candidate_id: j.state for j in store.jobs()}
    assert chosen.count("c01") == chosen.count("c03") == 1  # never proposed again
    assert states["c01"] == states["c03"] == "REJECTED"
    assert sorted(c for c, s in states.items() if s == "SUCCEEDED") == [
        "c00", "c02", "c04", "c05", "c06", "c07"
    ]  # fmt: skip
    assert all(len(view.taken) >= 4 for view, _ in agent.views[2:])  # rejections stay taken


def test_on_timeout_approve_runs_the_campaign_unattended(pool: Path, tmp_path: Path) -> None:
    config = _config(
        pool,
        approval={
            "mode": "required",
            "timeout_s": 0.05,
            "on_timeout": "approve",
            "poll_interval_s": 0.02,
        },  # fmt: skip
    )
    executor = FakeExecutor()
    result = Campaign(config, tmp_path / "run").run(agent=FakeAgent(), executor=executor)  # type: ignore[arg-type]
    assert result.n_measured == 6 and len(executor.submitted) == 6
    with CampaignStore(tmp_path / "run", create=False) as store:
        assert {p.decided_by for p in list_proposals(store)} == {"timeout"}


def test_cli_approve_and_reject_from_another_process(pool: Path, tmp_path: Path) -> None:
    directory = _propose(tmp_path, pool)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "loop", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    done = cli("approve", str(directory), "c00", "c02", "--note", "go", "--by", "ann")
    assert done.returncode == 0, done.stderr
    assert "approved 2: c00, c02" in done.stdout
    done = cli("reject", str(directory), "c01")  # no --note: typer refuses
    assert done.returncode != 0 and "--note" in done.stderr
    done = cli("reject", str(directory), "c00", "--note", "changed my mind")
    assert done.returncode == 2 and "already approved by ann" in done.stderr
    assert "Traceback" not in done.stderr
    done = cli("reject", str(directory), "c01", "--note", "toxic", "--by", "bob")
    assert done.returncode == 0 and "rejected 1: c01" in done.stdout
    listing = cli("proposals", str(directory), "--all")
    assert listing.returncode == 0 and "toxic" in listing.stdout and "BaTiF6" in listing.stdout
    done = cli("approve", str(directory), "--all")
    assert done.returncode == 0 and "approved 1: c03" in done.stdout
    with CampaignStore(directory, create=False) as store:
        audit = [(p.candidate_id, p.status, p.decided_by, p.note) for p in list_proposals(store)]
    assert audit[:3] == [
        ("c00", "APPROVED", "ann", "go"),
        ("c01", "REJECTED", "bob", "toxic"),
        ("c02", "APPROVED", "ann", "go"),
    ]
    assert audit[3][1] == "APPROVED" and "@" in (audit[3][2] or "")  # user@host by default


# ---------------------------------------------------------------- a real campaign behind the gate
@pytest.fixture(scope="module")
def cv_pool(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """60 crystals of cloud_cv (SCOPE strings + heat capacity at 300 K) as a CSV pool."""
    return write_cv_pool(tmp_path_factory.mktemp("pool") / "cv_pool.csv", cv_rows(data_dir, 60))


def _real(pool: Path) -> dict[str, object]:
    """The real agent (a GP), the simulated lab inline on a virtual clock, the gate required."""
    return {
        "name": "gated",
        "seed": 2,
        "pool": {
            "file": str(pool),
            "id_column": "id",
            "structure_column": "scope",
            "structure_format": "scope",
        },  # fmt: skip
        "objective": {"target": "cv", "sense": "maximize"},
        "surrogate": {"kind": "gp", "checkpoint": None},
        "acquisition": {"kind": "qlogei", "batch_size": 2},
        "initial_design": {"n_random": 4},
        "budget": {"experiments": 10},
        "adapter": {
            "kind": "simulated",
            "seed": 1,
            "capacity": 4,
            "latency": {"distribution": "exponential", "mean_s": 600},
            "time_acceleration": 3600,
        },  # fmt: skip
        "dispatch": {"mode": "inline", "concurrency": 4},
        "finetune": {"every_n_results": 2},
        "approval": {"mode": "required", "poll_interval_s": 0.05},
    }


def _lab_keys(directory: Path) -> set[str]:
    """Idempotency keys the simulated lab's own journal says were submitted to it."""
    import json
    import sqlite3

    path = directory / "lab" / "lab_state.sqlite"
    if not path.is_file():
        return set()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT body FROM events WHERE kind = 'submit'").fetchall()
    return {json.loads(r[0])["idempotency_key"] for r in rows}


_KILL_WHEN_WAITING = """
import json, os, signal, sys
from loop.campaign import Campaign
from loop.config import parse_config
def hook(progress):
    if progress.n_awaiting_approval >= 4:  # every slot holds a waiting proposal
        os.kill(os.getpid(), signal.SIGKILL)
Campaign(parse_config(json.loads(sys.argv[1])), sys.argv[2]).run(on_progress=hook)
"""


def test_real_campaign_kill_9_while_proposals_wait_then_resume_and_decide(
    cv_pool: Path, tmp_path: Path
) -> None:
    import json

    out, data = tmp_path / "run", _real(cv_pool)
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_WHEN_WAITING, json.dumps(data), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = _waiting(out)
    assert len(before) == 4 and _lab_keys(out) == set()  # proposed, none reached the lab
    with CampaignStore(out, create=False) as store:
        assert {j.state for j in store.jobs()} == {PROPOSED} and not store.open_jobs()
        detail = list_proposals(store)[0].detail
    assert detail.acquisition == "initial_design" and detail.formula and detail.scope

    result: dict[str, object] = {}
    runner = threading.Thread(  # the store is opened in the thread that uses it
        target=lambda: result.update(r=Campaign.resume(out).run()), daemon=True
    )
    runner.start()
    time.sleep(1.0)  # resumed: still waiting, still nothing at the lab
    assert _waiting(out) == before and _lab_keys(out) == set() and runner.is_alive()
    rejected: list[str] = []
    with CampaignStore(out) as store:
        decide(store, before[:1], approve=False, actor="ann", note="no barium today")
        rejected += before[:1]
        deadline = time.monotonic() + 120
        while runner.is_alive() and time.monotonic() < deadline:
            waiting = _waiting(out)
            model_chosen = [p for p in waiting if p not in before]
            if len(rejected) < 2 and model_chosen:  # reject one the model chose, approve the rest
                decide(store, model_chosen[:1], approve=False, actor="ann", note="too costly")
                rejected += model_chosen[:1]
                waiting = _waiting(out)
            if waiting:
                decide(store, [], approve=True, actor="bob", all_waiting=True)
            time.sleep(0.05)
        audit = list_proposals(store)
        jobs = {j.candidate_id: j.state for j in store.jobs()}
        chosen = [c.candidate_id for d in store.decisions() for c in d["chosen"]]
    runner.join(timeout=10)
    outcome = result["r"]
    assert outcome.stop_reason == "experiment budget reached"  # type: ignore[attr-defined]
    assert outcome.n_submitted == 10 and len(rejected) == 2  # type: ignore[attr-defined]
    submitted = _lab_keys(out)
    assert len(submitted) == 10 and not {f"gated/{c}" for c in rejected} & submitted
    assert all(chosen.count(c) == 1 for c in rejected)  # never proposed again
    assert [jobs[c] for c in rejected] == [REJECTED, REJECTED]
    model_picks = [p for p in audit if p.detail.model_version is not None]
    assert model_picks and all(
        p.detail.predicted_mean and p.detail.predicted_std and p.detail.acquisition == "qlogei"
        for p in model_picks
    )
    assert {p.decided_by for p in audit} == {"ann", "bob"}
    from loop.report import write_report

    report = write_report(out).read_text()
    assert "## Approvals" in report and "no barium today" in report and "too costly" in report
