"""The job engine against real adapters, over both transports.

Every scenario that does not depend on Ray itself runs twice, through the
in-process transport (inline mode) and through real Ray actors (the
``make_engine`` fixture), with the same assertions; one test also runs a mixed
scenario on both and compares the events job by job. Two executors: :class:`JournalLab` below, whose jobs live as JSON files in a
directory (so they survive an actor crash and the test can inspect what really
reached the executor: experiments started per key, peak jobs in flight,
cancellations), and the project's :class:`simulators.lab.SimulatedLab`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from adapters.base import (
    ExperimentRequest,
    JobHandle,
    JobNotFoundError,
    JobState,
    JobStatus,
    LabAdapter,
    MeasuredValue,
    Measurement,
    PermanentAdapterError,
    ResultNotReadyError,
    TransientAdapterError,
)
from adapters.dispatch import (
    DispatchConfig,
    Dispatcher,
    DispatcherClosedError,
    DispatcherError,
    DispatchEvent,
    DuplicateJobError,
    EventKind,
)
from adapters.engine import JobEngine
from adapters.ray_runtime import AdapterSpec
from adapters.transport import InProcessTransport

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors need not import tests/

TRUTH = {f"mp-{i}": 0.5 + 0.25 * i for i in range(40)}  # band gaps, eV
FAST = DispatchConfig(poll_interval_s=0.02, backoff_base_s=0.02, backoff_max_s=0.2)


class _JobFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    key: str
    request: ExperimentRequest
    started_at: float  # unix seconds
    duration_s: float
    cancelled_at: float | None = None
    submit_calls: int = 1
    poll_calls: int = 0
    created_by_pid: int = 0


class JournalLab(LabAdapter):
    """An executor whose jobs are JSON files in ``root``; a job runs for
    ``parameters["duration_s"]`` wall seconds, then SUCCEEDED with the true value
    (or FAILED if ``parameters["fail"]``). Fault injection through parameters:
    ``reject`` (permanent error on submit), ``lose_responses`` (the first n submits
    create/find the job, then raise a transient error as if the reply was lost),
    ``flaky_polls`` (the first n polls raise a transient error), ``crash_actor``
    (the first submit kills the hosting process after creating the job).
    """

    name = "journal"

    def __init__(self, root: str, truth: dict[str, float], capacity: int = 4) -> None:
        self.root = Path(root)
        self.truth = truth
        self.capacity = capacity

    # -- inspection, used by the tests from the driver process
    def jobs(self) -> list[_JobFile]:
        return [
            _JobFile.model_validate_json(p.read_text())
            for p in sorted(self.root.glob("job-*.json"))
        ]

    def peak_in_flight(self) -> int:
        path = self.root / "peak.json"
        return int(json.loads(path.read_text())["peak"]) if path.exists() else 0

    # -- the contract
    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        with (self.root / "lock").open("w") as lock:  # actors in other processes share root
            fcntl.flock(lock, fcntl.LOCK_EX)
            job = self._create_or_find(request, idempotency_key)
        params = request.parameters
        if job.submit_calls <= int(params.get("lose_responses", 0)):
            raise TransientAdapterError("reply lost on the way back")
        if params.get("crash_actor") and job.submit_calls == 1:
            os._exit(3)
        return self._handle(job)

    def _create_or_find(self, request: ExperimentRequest, idempotency_key: str) -> _JobFile:
        job = self._load(idempotency_key)
        params = request.parameters
        if job is None:
            if "reject" in params:
                raise PermanentAdapterError(f"refused: {params['reject']}")
            now = time.time()
            running = sum(not self._state(j, now).is_terminal for j in self.jobs())
            job = _JobFile(
                job_id="J" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:12],
                key=idempotency_key,
                request=request,
                started_at=now,
                duration_s=float(params.get("duration_s", 0.05)),
                created_by_pid=os.getpid(),
            )
            peak = max(self.peak_in_flight(), running + 1)
            (self.root / "peak.json").write_text(json.dumps({"peak": peak}))
        else:
            job.submit_calls += 1
        self._save(job)
        return job

    def poll(self, handle: JobHandle) -> JobStatus:
        job = self._get(handle)
        job.poll_calls += 1
        self._save(job)
        if job.poll_calls <= int(job.request.parameters.get("flaky_polls", 0)):
            raise TransientAdapterError("executor busy (503)")
        if job.request.parameters.get("buggy_poll"):
            raise ZeroDivisionError("an adapter bug, not an AdapterError")
        return self._status(job)

    def result(self, handle: JobHandle) -> Measurement:
        job = self._get(handle)
        if self._state(job, time.time()) is not JobState.SUCCEEDED:
            raise ResultNotReadyError(f"{job.job_id} has not succeeded")
        value = self.truth[job.request.candidate_id]
        values = {t: MeasuredValue(value=value, unit="eV") for t in job.request.targets}
        return Measurement(
            job_id=job.job_id, candidate_id=job.request.candidate_id, values=values, cost=1.0
        )

    def cancel(self, handle: JobHandle) -> JobStatus:
        job = self._get(handle)
        if not self._state(job, time.time()).is_terminal:
            job.cancelled_at = time.time()
            self._save(job)
        return self._status(job)

    # -- storage
    def _path(self, key: str) -> Path:
        return self.root / f"job-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def _load(self, key: str) -> _JobFile | None:
        path = self._path(key)
        return _JobFile.model_validate_json(path.read_text()) if path.exists() else None

    def _get(self, handle: JobHandle) -> _JobFile:
        job = self._load(handle.idempotency_key)
        if job is None or job.job_id != handle.job_id:
            raise JobNotFoundError(f"no job {handle.job_id}")
        return job

    def _save(self, job: _JobFile) -> None:
        tmp = self._path(job.key).with_suffix(".tmp")
        tmp.write_text(job.model_dump_json())
        os.replace(tmp, self._path(job.key))

    def _state(self, job: _JobFile, now: float) -> JobState:
        if job.cancelled_at is not None:
            return JobState.CANCELLED
        if now < job.started_at + job.duration_s:
            return JobState.RUNNING
        return JobState.FAILED if job.request.parameters.get("fail") else JobState.SUCCEEDED

    def _status(self, job: _JobFile) -> JobStatus:
        state = self._state(job, time.time())
        message = "failed synthesis" if state is JobState.FAILED else None
        return JobStatus(job_id=job.job_id, state=state, message=message)

    def _handle(self, job: _JobFile) -> JobHandle:
        return JobHandle(
            adapter=self.name,
            job_id=job.job_id,
            idempotency_key=job.key,
            candidate_id=job.request.candidate_id,
        )


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (and is not a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def request(i: int, **parameters: Any) -> ExperimentRequest:
    return ExperimentRequest(candidate_id=f"mp-{i}", targets=("band_gap",), parameters=parameters)


def journal(tmp_path: Path, capacity: int = 4) -> tuple[JournalLab, Callable[[], LabAdapter]]:
    return JournalLab(str(tmp_path), TRUTH, capacity), functools.partial(
        JournalLab, str(tmp_path), TRUTH, capacity
    )


MakeEngine = Callable[[Any, DispatchConfig], JobEngine]


@pytest.fixture(params=["inline", "ray"])
def make_engine(request: pytest.FixtureRequest) -> MakeEngine:
    """Builds the engine over the in-process transport, or over Ray actors."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")
        return Dispatcher
    return _inline_engine


def _inline_engine(factory: Any, config: DispatchConfig) -> JobEngine:
    adapter = factory.build() if isinstance(factory, AdapterSpec) else factory()
    return JobEngine(InProcessTransport(adapter), config)


def collect(dispatcher: JobEngine, timeout: float = 15.0) -> list[tuple[float, DispatchEvent]]:
    """Every event until no job is outstanding, with its arrival time; checks the JSON round trip."""
    out: list[tuple[float, DispatchEvent]] = []
    end = time.monotonic() + timeout
    while dispatcher.outstanding() or out == []:
        if time.monotonic() > end:
            pytest.fail(f"jobs still outstanding after {timeout} s: {[e.kind for _, e in out]}")
        for event in dispatcher.next_events(timeout=0.1):
            assert DispatchEvent.model_validate_json(event.model_dump_json()) == event
            out.append((time.monotonic(), event))
    return out


def by_key(events: list[tuple[float, DispatchEvent]]) -> dict[str, list[DispatchEvent]]:
    out: dict[str, list[DispatchEvent]] = {}
    for _, event in events:
        out.setdefault(event.idempotency_key, []).append(event)
    return out


def test_results_stream_as_they_complete(make_engine: MakeEngine, tmp_path: Path) -> None:
    lab, factory = journal(tmp_path)
    with make_engine(factory, FAST) as dispatcher:
        t0 = time.monotonic()
        dispatcher.submit(request(1, duration_s=1.5), "slow")
        dispatcher.submit(request(2, duration_s=0.1), "fast")
        with pytest.raises(DuplicateJobError):
            dispatcher.submit(request(2), "fast")
        events = collect(dispatcher)
    done = [(t - t0, e) for t, e in events if e.kind.is_terminal]
    assert [e.idempotency_key for _, e in done] == ["fast", "slow"]
    assert done[0][0] < 1.0 <= 1.5 <= done[1][0]  # the fast result did not wait for the slow one
    for key, evs in by_key(events).items():
        assert [e.kind for e in evs] == [
            EventKind.SUBMITTED,
            EventKind.STATE,
            EventKind.SUCCEEDED,
        ], key
        assert evs[0].handle is not None and evs[0].handle.idempotency_key == key
        assert evs[1].status is not None and evs[1].status.state is JobState.RUNNING
    measured = {e.idempotency_key: e.measurement for _, e in done}
    assert (
        measured["fast"] is not None and measured["fast"].values["band_gap"].value == TRUTH["mp-2"]
    )
    assert [j.submit_calls for j in lab.jobs()] == [1, 1]


@pytest.mark.parametrize(("concurrency", "num_actors", "expected_peak"), [(None, 1, 3), (2, 2, 2)])
def test_concurrency_limit_is_respected(
    make_engine: MakeEngine,
    tmp_path: Path,
    concurrency: int | None,
    num_actors: int,
    expected_peak: int,
) -> None:
    if num_actors > 1 and make_engine is _inline_engine:
        pytest.skip("the in-process transport has one lane")
    lab, factory = journal(tmp_path, capacity=3)
    config = FAST.model_copy(update={"concurrency": concurrency, "num_actors": num_actors})
    with make_engine(factory, config) as dispatcher:
        assert dispatcher.concurrency == expected_peak
        for i in range(9):
            dispatcher.submit(request(i, duration_s=0.15), f"job-{i}")
        peak_seen = 0
        while dispatcher.outstanding():
            peak_seen = max(peak_seen, dispatcher.in_flight())
            dispatcher.next_events(timeout=0.01)
    assert lab.peak_in_flight() == expected_peak  # measured by the executor itself
    assert peak_seen <= expected_peak
    jobs = lab.jobs()
    assert len(jobs) == 9
    assert {j.created_by_pid for j in jobs} == set(dispatcher.actor_pids)  # every actor worked
    assert len(dispatcher.actor_pids) == num_actors


def test_transient_errors_are_retried_with_the_same_key(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    lab, factory = journal(tmp_path)
    with make_engine(factory, FAST) as dispatcher:
        dispatcher.submit(request(1, lose_responses=2), "lost-replies")
        dispatcher.submit(request(2, flaky_polls=2), "flaky-polls")
        events = by_key(collect(dispatcher))
    kinds = {key: [e.kind for e in evs] for key, evs in events.items()}
    assert kinds["lost-replies"][:3] == [
        EventKind.RETRYING,
        EventKind.RETRYING,
        EventKind.SUBMITTED,
    ]
    assert kinds["flaky-polls"][:3] == [EventKind.SUBMITTED, EventKind.RETRYING, EventKind.RETRYING]
    assert [evs[-1].kind for evs in events.values()] == [EventKind.SUCCEEDED] * 2
    assert [e.attempt for e in events["lost-replies"][:2]] == [1, 2]
    jobs = {j.key: j for j in lab.jobs()}
    assert len(jobs) == 2  # one experiment per key, whatever the retries
    assert jobs["lost-replies"].submit_calls == 3
    assert jobs["flaky-polls"].poll_calls >= 3


@pytest.mark.usefixtures("ray_session")
def test_actor_death_is_retried_without_a_second_experiment(tmp_path: Path) -> None:
    lab, factory = journal(tmp_path)
    config = FAST.model_copy(update={"max_retries": 10, "backoff_max_s": 0.5})
    with Dispatcher(factory, config) as dispatcher:
        pid_before = dispatcher.actor_pids[0]
        dispatcher.submit(request(1, crash_actor=True), "crash")
        events = by_key(collect(dispatcher, timeout=30))
    kinds = [e.kind for e in events["crash"]]
    assert kinds[0] is EventKind.RETRYING and kinds[-1] is EventKind.SUCCEEDED
    assert "Ray actor" in (events["crash"][0].message or "")
    assert not alive(pid_before)  # the first actor process really died
    [job] = lab.jobs()
    assert job.submit_calls == 2  # the retry found the job the dead actor had created


def test_permanent_failures_and_exhausted_retries_are_reported(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    lab, factory = journal(tmp_path)
    with make_engine(factory, FAST.model_copy(update={"max_retries": 1})) as dispatcher:
        dispatcher.submit(request(1, reject="unsafe precursor"), "rejected")
        dispatcher.submit(request(2, fail=True), "failed")
        dispatcher.submit(request(3, lose_responses=5), "hopeless")
        events = {k: evs[-1] for k, evs in by_key(collect(dispatcher)).items()}
    assert events["rejected"].kind is EventKind.FAILED and events["rejected"].permanent
    assert "unsafe precursor" in (events["rejected"].message or "")
    assert events["failed"].kind is EventKind.FAILED and not events["failed"].permanent
    assert events["failed"].message == "failed synthesis"
    assert events["failed"].status is not None and events["failed"].status.state is JobState.FAILED
    assert events["hopeless"].kind is EventKind.FAILED
    assert "gave up after 2 transient errors" in (events["hopeless"].message or "")
    assert sorted(j.key for j in lab.jobs()) == [
        "failed",
        "hopeless",
    ]  # a refused job never existed


def test_timeout_cancels_the_job_at_the_adapter(make_engine: MakeEngine, tmp_path: Path) -> None:
    lab, factory = journal(tmp_path)
    with make_engine(factory, FAST.model_copy(update={"job_timeout_s": 0.3})) as dispatcher:
        t0 = time.monotonic()
        dispatcher.submit(request(1, duration_s=30), "too-slow")
        dispatcher.submit(request(2, duration_s=0.05), "quick")
        events = by_key(collect(dispatcher))
        elapsed = time.monotonic() - t0
    timed_out = events["too-slow"][-1]
    assert timed_out.kind is EventKind.TIMED_OUT
    assert timed_out.status is not None and timed_out.status.state is JobState.CANCELLED
    assert events["quick"][-1].kind is EventKind.SUCCEEDED
    assert 0.3 <= elapsed < 3.0
    jobs = {j.key: j for j in lab.jobs()}
    assert jobs["too-slow"].cancelled_at is not None and jobs["quick"].cancelled_at is None


def test_cancel_running_retrying_and_queued_jobs(make_engine: MakeEngine, tmp_path: Path) -> None:
    lab, factory = journal(tmp_path, capacity=2)
    with make_engine(factory, FAST.model_copy(update={"backoff_base_s": 1.0})) as dispatcher:
        dispatcher.submit(request(1, duration_s=30), "running")
        dispatcher.submit(request(2, lose_responses=100), "retrying")
        dispatcher.submit(request(3, duration_s=30), "queued")  # waits: capacity 2
        seen: set[EventKind] = set()
        while not {EventKind.SUBMITTED, EventKind.RETRYING} <= seen:
            seen |= {e.kind for e in dispatcher.next_events(timeout=5)}
        assert dispatcher.in_flight() == 2 and dispatcher.outstanding() == 3
        assert all(dispatcher.cancel(key) for key in ("queued", "retrying", "running"))
        assert not dispatcher.cancel("never-submitted")
        events = {k: evs[-1] for k, evs in by_key(collect(dispatcher)).items()}
    assert {k: e.kind for k, e in events.items()} == dict.fromkeys(events, EventKind.CANCELLED)
    assert events["queued"].handle is None
    assert "may have left a job" in (events["retrying"].message or "")
    status = events["running"].status
    assert status is not None and status.state is JobState.CANCELLED
    jobs = {j.key: j for j in lab.jobs()}
    assert sorted(jobs) == ["retrying", "running"]  # the queued job never reached the executor
    assert jobs["retrying"].submit_calls == 1  # cancelled during backoff: not submitted again
    assert jobs["running"].cancelled_at is not None


def test_an_unknown_job_is_lost_and_an_adapter_bug_is_a_permanent_failure(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    lab, factory = journal(tmp_path)
    ghost = JobHandle(
        adapter="journal", job_id="J-gone", idempotency_key="ghost", candidate_id="mp-9"
    )
    with make_engine(factory, FAST) as engine:
        engine.track(ghost)  # e.g. the lab wiped its queue while the campaign was down
        engine.submit(request(3, buggy_poll=True), "buggy")
        events = {k: evs[-1] for k, evs in by_key(collect(engine)).items()}
    assert events["ghost"].kind is EventKind.LOST and "J-gone" in (events["ghost"].message or "")
    assert events["buggy"].kind is EventKind.FAILED and events["buggy"].permanent
    assert "ZeroDivisionError" in (events["buggy"].message or "")


def _mixed_scenario(engine: JobEngine) -> dict[str, list[str]]:
    """Retries, a timeout, LOST, permanent and adapter-bug failures, a cancellation."""
    engine.submit(request(1, lose_responses=2), "lost-replies")
    engine.submit(request(2, flaky_polls=2), "flaky-polls")
    engine.submit(request(3, duration_s=30), "too-slow")
    engine.submit(request(4, reject="unsafe"), "rejected")
    engine.submit(request(5, buggy_poll=True), "buggy")
    engine.submit(request(6, duration_s=30), "cancelled")
    engine.track(
        JobHandle(adapter="journal", job_id="J-gone", idempotency_key="ghost", candidate_id="mp-9")
    )
    events: list[tuple[float, DispatchEvent]] = []
    while not any(e.idempotency_key == "cancelled" for _, e in events):
        events += [(0.0, e) for e in engine.next_events(timeout=5)]
    assert engine.cancel("cancelled")
    events += collect(engine)
    kinds: dict[str, list[str]] = {}
    for key, evs in by_key(events).items():  # STATE events depend on poll timing: left out
        kinds[key] = [e.kind.value for e in evs if e.kind is not EventKind.STATE]
    return kinds


@pytest.mark.usefixtures("ray_session")
def test_both_transports_give_the_same_events(tmp_path: Path) -> None:
    config = FAST.model_copy(update={"job_timeout_s": 0.5, "max_retries": 3})
    results = []
    for name, make in (("inline", _inline_engine), ("ray", Dispatcher)):
        (tmp_path / name).mkdir()
        _, factory = journal(tmp_path / name)
        with make(factory, config) as engine:
            results.append(_mixed_scenario(engine))
    inline, ray_events = results
    assert inline == ray_events
    assert inline["lost-replies"] == ["RETRYING", "RETRYING", "SUBMITTED", "SUCCEEDED"]
    assert inline["flaky-polls"] == ["SUBMITTED", "RETRYING", "RETRYING", "SUCCEEDED"]
    assert inline["too-slow"] == ["SUBMITTED", "TIMED_OUT"]
    assert inline["rejected"] == ["FAILED"] and inline["buggy"] == ["SUBMITTED", "FAILED"]
    assert inline["cancelled"] == ["SUBMITTED", "CANCELLED"] and inline["ghost"] == ["LOST"]


@pytest.mark.usefixtures("ray_session")
def test_graceful_shutdown_finishes_in_flight_and_drops_queued(tmp_path: Path) -> None:
    lab, factory = journal(tmp_path, capacity=2)
    dispatcher = Dispatcher(factory, FAST)
    for i in range(4):
        dispatcher.submit(request(i, duration_s=1.0), f"job-{i}")
    while dispatcher.in_flight() < 2 or len(lab.jobs()) < 2:
        time.sleep(0.01)
    assert dispatcher.shutdown(graceful=True) == []
    events = {k: evs[-1].kind for k, evs in by_key(collect(dispatcher)).items()}
    reached = {j.key for j in lab.jobs()}
    assert len(events) == 4 and {"job-0", "job-1"} <= reached and len(reached) < 4
    for key, kind in events.items():  # waited for the jobs at the lab; dropped the others
        assert kind is (EventKind.SUCCEEDED if key in reached else EventKind.CANCELLED), key
    with pytest.raises(DispatcherClosedError):
        dispatcher.submit(request(9), "late")
    deadline = time.monotonic() + 10
    while alive(dispatcher.actor_pids[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(dispatcher.actor_pids[0])  # the actor was killed


def test_shutdown_can_cancel_in_flight_jobs(make_engine: MakeEngine, tmp_path: Path) -> None:
    lab, factory = journal(tmp_path, capacity=2)
    dispatcher = make_engine(factory, FAST)
    dispatcher.submit(request(1, duration_s=30), "long")
    assert dispatcher.next_events(timeout=5)[0].kind is EventKind.SUBMITTED
    assert dispatcher.shutdown(graceful=True, cancel_in_flight=True, timeout_s=10) == []
    [(_, event)] = collect(dispatcher)
    assert event.kind is EventKind.CANCELLED
    assert lab.jobs()[0].cancelled_at is not None


def test_track_resumes_jobs_without_resubmitting(make_engine: MakeEngine, tmp_path: Path) -> None:
    lab, factory = journal(tmp_path)
    # a job started before "the crash", by another process
    old = lab.submit(request(5, duration_s=0.2), "from-before")
    # a job whose dispatcher died abruptly
    first = make_engine(factory, FAST)
    first.submit(request(6, duration_s=0.6), "orphan")
    submitted = first.next_events(timeout=5)[0]
    assert submitted.kind is EventKind.SUBMITTED and submitted.handle is not None
    assert first.shutdown(graceful=False) == [submitted.handle]
    with make_engine(factory, FAST) as second:
        second.track(old)
        second.track(submitted.handle)
        events = {k: evs for k, evs in by_key(collect(second)).items()}
    for key, candidate in (("from-before", "mp-5"), ("orphan", "mp-6")):
        assert events[key][-1].kind is EventKind.SUCCEEDED
        assert EventKind.SUBMITTED not in [e.kind for e in events[key]]
        measurement = events[key][-1].measurement
        assert measurement is not None and measurement.values["band_gap"].value == TRUTH[candidate]
    assert [j.submit_calls for j in lab.jobs()] == [1, 1]


def _simulated_spec(capacity: int, **config: Any) -> AdapterSpec:
    truth = {cid: {"band_gap": value} for cid, value in TRUTH.items()}
    config = {"capacity": capacity, "latency": {"mean_s": 0.2}, **config}
    return AdapterSpec(
        factory="simulators.lab:SimulatedLab",
        kwargs={"truth": truth, "units": {"band_gap": "eV"}, "config": config},
    )


@pytest.mark.parametrize(("concurrency", "queued_at_lab"), [(None, False), (8, True)])
def test_simulated_lab_gets_no_more_than_its_capacity(
    make_engine: MakeEngine, concurrency: int | None, queued_at_lab: bool
) -> None:
    config = FAST.model_copy(update={"concurrency": concurrency})
    with make_engine(_simulated_spec(capacity=4), config) as dispatcher:
        for i in range(16):
            dispatcher.submit(request(i), f"sim-{i}")
        events = collect(dispatcher)
    states = [e.status.state for _, e in events if e.kind is EventKind.STATE and e.status]
    assert (JobState.QUEUED in states) is queued_at_lab  # beyond capacity the lab makes jobs wait
    done = [e for _, e in events if e.kind is EventKind.SUCCEEDED]
    assert len(done) == 16
    for event in done:
        assert event.measurement is not None
        assert event.measurement.values["band_gap"].value == TRUTH[event.candidate_id]
        assert event.measurement.values["band_gap"].unit == "eV"


def test_simulated_lab_failures_and_bad_requests(
    make_engine: MakeEngine,
) -> None:
    spec = _simulated_spec(capacity=8, failure={"probability": 1.0})
    with make_engine(spec, FAST) as dispatcher:
        assert (dispatcher.adapter_name, dispatcher.capacity) == ("simulated", 8)
        dispatcher.submit(request(1), "fails")
        dispatcher.submit(
            ExperimentRequest(candidate_id="not-in-pool", targets=("band_gap",)), "unknown"
        )
        events = {k: evs[-1] for k, evs in by_key(collect(dispatcher)).items()}
    assert events["fails"].kind is EventKind.FAILED and not events["fails"].permanent
    assert events["fails"].message in ("failed synthesis", "instrument fault")
    assert events["unknown"].kind is EventKind.FAILED and events["unknown"].permanent
    assert "not-in-pool" in (events["unknown"].message or "")


@pytest.mark.usefixtures("ray_session")
def test_a_factory_that_cannot_build_is_a_clear_error() -> None:
    with pytest.raises(DispatcherError, match="no_such_lab"):
        Dispatcher(AdapterSpec(factory="simulators.lab:no_such_lab"), FAST)


_FRESH_MACHINE_SCRIPT = """
import json
from adapters.base import ExperimentRequest
from adapters.dispatch import DispatchConfig, Dispatcher
from adapters.ray_runtime import AdapterSpec
spec = AdapterSpec(factory="simulators.lab:SimulatedLab",
                   kwargs={"truth": {"mp-1": {"band_gap": 1.5}}, "units": {"band_gap": "eV"}})
with Dispatcher(spec, DispatchConfig(poll_interval_s=0.05)) as dispatcher:
    dispatcher.submit(ExperimentRequest(candidate_id="mp-1", targets=("band_gap",)), "k1")
    events = [e.kind.value for e in dispatcher.events()]
print(json.dumps(events))
"""


@pytest.mark.slow
def test_local_ray_starts_on_demand_without_user_action(tmp_path: Path) -> None:
    """A new user (empty home, no Ray token, no RAY_* settings) gets a working local Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_MACHINE_SCRIPT],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["SUBMITTED", "SUCCEEDED"]
    assert (tmp_path / ".ray" / "auth_token").exists()  # Ray >= 2.60 made its own token


def test_a_full_fidelity_waits_without_holding_a_slot_another_fidelity_could_use(
    tmp_path: Path,
) -> None:
    """Per-fidelity limits (``group_concurrency``): slow jobs of a fidelity whose adapter runs
    one at a time queue in the engine while the cheap fidelity's jobs reach their adapter."""
    from adapters.routing import FidelityRouter

    (tmp_path / "dft").mkdir()
    (tmp_path / "ml").mkdir()
    dft, ml = (
        JournalLab(str(tmp_path / "dft"), TRUTH, 1),
        JournalLab(str(tmp_path / "ml"), TRUTH, 4),
    )
    router = FidelityRouter({"dft": dft, "ml": ml})
    config = FAST.model_copy(update={"concurrency": 4, "group_concurrency": {"dft": 1}})
    engine = JobEngine(InProcessTransport(router), config)
    for i in range(3):  # three slow DFT jobs first, then four quick ML ones (16x shorter)
        engine.submit(request(i, fidelity="dft", duration_s=0.8), f"dft-{i}")
    for i in range(3, 7):
        engine.submit(request(i, fidelity="ml", duration_s=0.05), f"ml-{i}")
    ml_done_at, dft_done_at = [], []
    peak = 0
    start = time.monotonic()
    while engine.outstanding():
        peak = max(peak, engine.in_flight())
        for event in engine.next_events(timeout=0.01):
            if event.kind is EventKind.SUCCEEDED:
                done = ml_done_at if event.idempotency_key.startswith("ml") else dft_done_at
                done.append(time.monotonic() - start)
    engine.shutdown()
    assert dft.peak_in_flight() == 1  # the limit held at the DFT adapter
    assert len(dft.jobs()) == 3 and len(ml.jobs()) == 4
    assert peak <= 4
    # the ML jobs did not wait behind the queued DFT jobs: all four ended before the 1st DFT one
    assert len(ml_done_at) == 4 and max(ml_done_at) < min(dft_done_at)
    assert len(dft_done_at) == 3


def test_group_limits_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="at least 1"):
        DispatchConfig(group_concurrency={"dft": 0})
