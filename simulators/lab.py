"""The simulated lab: a dataset-backed ground truth behind the adapter contract.

:class:`SimulatedLab` measures candidates whose true values it was handed at
construction (a table ``candidate id -> {target: value}``), the way a robotic
lab would: after a latency, with noise, sometimes failing, at most ``capacity``
experiments at a time, each costing something, optionally with a slow drift of
the instrument. Its only way to reveal a value is :meth:`SimulatedLab.result` of
a SUCCEEDED job, with noise; there is no method returning the table.

Time is simulated (see :mod:`simulators.clock`): the lab never sleeps, it works
out lazily which experiments have ended by the clock's ``now()``.

Every random draw of a job (latency, failure, reason, noise) comes from a
generator seeded by ``(config.seed, idempotency key, purpose)``, so a job's
outcome does not depend on the order of calls, and a job re-created after a
crash (same seed, same key) measures the same value. With drift or a finite
capacity, the measured value and the timing also depend on when the job ran.

A lab may be given a :class:`LabJournal` to which it appends every submission
and cancellation before applying it, and the ``history`` of a previous run to
replay: this is how the HTTP server survives restarts.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import random
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

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
    utcnow,
)
from simulators.clock import SimClock, WallClock
from simulators.config import (
    FailureConfig,
    LatencyConfig,
    NoiseConfig,
    SimulatedLabConfig,
)

__all__ = [
    "CancelEvent",
    "FailureConfig",
    "LabEvent",
    "LabJournal",
    "LatencyConfig",
    "NoiseConfig",
    "SimulatedLab",
    "SimulatedLabConfig",
    "SubmitEvent",
]

logger = logging.getLogger(__name__)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubmitEvent(_Event):
    """A journal entry: a job was created."""

    kind: Literal["submit"] = "submit"
    sim_time: float = Field(ge=0.0)
    job_id: str
    idempotency_key: str
    request: ExperimentRequest
    submitted_at: datetime


class CancelEvent(_Event):
    """A journal entry: a job was asked to stop."""

    kind: Literal["cancel"] = "cancel"
    sim_time: float = Field(ge=0.0)
    job_id: str


LabEvent = Annotated[SubmitEvent | CancelEvent, Field(discriminator="kind")]


class LabJournal(Protocol):
    """Durable log of a lab's events (see ``simulators.server.SqliteLabJournal``)."""

    def append(self, event: SubmitEvent | CancelEvent) -> None:
        """Store ``event`` durably before the lab applies it; raise to refuse it."""
        ...


@dataclass(slots=True)
class _Job:
    job_id: str
    key: str
    request: ExperimentRequest
    submitted_at: datetime
    t_submit: float
    duration: float
    fail_reason: str | None
    state: JobState = JobState.QUEUED
    t_start: float | None = None
    t_end: float | None = None  # scheduled end while RUNNING, actual end once terminal
    t_updated: float = 0.0
    message: str | None = None


def _stream_seed(seed: int, key: str, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{purpose}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class SimulatedLab(LabAdapter):
    """An in-process lab over a hidden ground truth. Thread-safe.

    Args:
        truth: candidate id -> {target name: true value}; NaN marks a value the
            lab cannot measure. Copied; never returned by any method.
        units: target name -> unit, for every target the lab can measure.
        config: behaviour (noise, failures, latency, capacity, cost, drift, seed).
        clock: simulated time; default a :class:`WallClock` at
            ``config.time_acceleration``. Pass a :class:`VirtualClock` for benchmarks.
        journal: receives every event before it is applied (persistence).
        history: events of a previous run of this lab, replayed (not journaled).
    """

    def __init__(
        self,
        truth: Mapping[str, Mapping[str, float]],
        units: Mapping[str, str],
        config: SimulatedLabConfig | None = None,
        *,
        clock: SimClock | None = None,
        journal: LabJournal | None = None,
        history: Iterable[SubmitEvent | CancelEvent] = (),
    ) -> None:
        self.config = config if config is not None else SimulatedLabConfig()
        self.name = self.config.name
        self.capacity = self.config.capacity
        self.clock: SimClock = (
            clock if clock is not None else WallClock(self.config.time_acceleration)
        )
        self._truth = {
            str(c): {str(t): float(v) for t, v in row.items()} for c, row in truth.items()
        }
        self._units = dict(units)
        self._journal: LabJournal | None = None
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = {}
        self._by_key: dict[str, str] = {}
        self._queue: deque[str] = deque()
        self._running: list[tuple[float, int, str]] = []  # heap of (t_end, seq, job_id)
        self._seq = 0
        self._t_done = 0.0
        self._finished_runs = 0
        for event in history:
            self._apply(event)
        self._journal = journal

    # ------------------------------------------------------------------ contract
    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        """Create a job for ``request`` unless ``idempotency_key`` already has one.

        Raises:
            PermanentAdapterError: unknown candidate or target, a target without a
                true value, or a key reused with a different request.
        """
        return self.submit_or_get(request, idempotency_key)[0]

    def submit_or_get(
        self, request: ExperimentRequest, idempotency_key: str
    ) -> tuple[JobHandle, bool]:
        """Like :meth:`submit`, also telling whether the job was created by this call."""
        if not idempotency_key:
            raise PermanentAdapterError("idempotency_key must be a non-empty string")
        with self._lock:
            existing = self._by_key.get(idempotency_key)
            if existing is not None:
                job = self._jobs[existing]
                if job.request != request:
                    raise PermanentAdapterError(
                        f"idempotency key {idempotency_key!r} was already used for job {job.job_id} "
                        f"with a different request (candidate {job.request.candidate_id!r}); "
                        "use a new key for a new experiment"
                    )
                return self._handle(job), False
            self._validate(request)
            event = SubmitEvent(
                sim_time=self._now(),
                job_id=self._job_id(idempotency_key),
                idempotency_key=idempotency_key,
                request=request,
                submitted_at=utcnow(),
            )
            if self._journal is not None:
                self._journal.append(event)
            return self._handle(self._apply_submit(event)), True

    def poll(self, handle: JobHandle) -> JobStatus:
        return self.status(handle.job_id)

    def result(self, handle: JobHandle) -> Measurement:
        return self.measurement(handle.job_id)

    def cancel(self, handle: JobHandle) -> JobStatus:
        return self.cancel_job(handle.job_id)

    def close(self) -> None:
        """Close the journal, if it has a ``close`` method. Idempotent."""
        with self._lock:
            journal, self._journal = self._journal, None
        closer = getattr(journal, "close", None)
        if callable(closer):
            closer()

    def __enter__(self) -> SimulatedLab:
        return self

    # ------------------------------------------------------------ by job id (server)
    def handle(self, job_id: str) -> JobHandle:
        """The handle of job ``job_id`` (JobNotFoundError if unknown)."""
        with self._lock:
            return self._handle(self._job(job_id))

    def find(self, idempotency_key: str) -> JobHandle | None:
        """The handle of the job created for ``idempotency_key``, if any."""
        with self._lock:
            job_id = self._by_key.get(idempotency_key)
            return None if job_id is None else self._handle(self._jobs[job_id])

    def status(self, job_id: str) -> JobStatus:
        """Current state of job ``job_id``."""
        with self._lock:
            self._advance(self._now())
            return self._status(self._job(job_id))

    def measurement(self, job_id: str) -> Measurement:
        """The noisy measurement of a SUCCEEDED job (ResultNotReadyError otherwise)."""
        with self._lock:
            self._advance(self._now())
            job = self._job(job_id)
            if job.state is not JobState.SUCCEEDED:
                raise ResultNotReadyError(
                    f"job {job_id} is {job.state.value}, not SUCCEEDED: no result"
                )
            return self._measure(job)

    def cancel_job(self, job_id: str) -> JobStatus:
        """Stop job ``job_id`` if it has not ended; returns its state afterwards."""
        with self._lock:
            now = self._now()
            self._advance(now)
            job = self._job(job_id)
            if not job.state.is_terminal:
                event = CancelEvent(sim_time=now, job_id=job_id)
                if self._journal is not None:
                    self._journal.append(event)
                self._apply_cancel(event)
            return self._status(job)

    def list_jobs(
        self, state: JobState | None = None, offset: int = 0, limit: int = 100
    ) -> tuple[list[tuple[JobHandle, JobStatus]], int]:
        """Jobs in submission order, optionally only those in ``state``.

        Returns:
            (page of (handle, status) pairs, total number of matching jobs).
        """
        with self._lock:
            self._advance(self._now())
            jobs = [j for j in self._jobs.values() if state is None or j.state is state]
            page = jobs[offset : offset + limit]
            return [(self._handle(j), self._status(j)) for j in page], len(jobs)

    # ----------------------------------------------------------------- accounting
    @property
    def total_cost(self) -> float:
        """Cost of every run that has finished (succeeded or failed) so far."""
        with self._lock:
            self._advance(self._now())
            return self._finished_runs * self.config.cost_per_experiment

    def counts(self) -> dict[JobState, int]:
        """Number of jobs in each state."""
        with self._lock:
            self._advance(self._now())
            out = dict.fromkeys(JobState, 0)
            for job in self._jobs.values():
                out[job.state] += 1
            return out

    def next_completion_time(self) -> float | None:
        """Simulated time at which the next running job ends (None if none runs).

        With a :class:`VirtualClock`, ``clock.advance_to(lab.next_completion_time())``
        skips idle time in benchmarks.
        """
        with self._lock:
            self._advance(self._now())
            return self._running[0][0] if self._running else None

    def schedule(self, job_id: str) -> tuple[float | None, float | None]:
        """Progress of job ``job_id`` (0..1) and its remaining simulated seconds.

        ``(None, None)`` while it waits for a free slot; ``(1.0, 0.0)`` once it ended.
        """
        with self._lock:
            now = self._now()
            self._advance(now)
            job = self._job(job_id)
            if job.state.is_terminal:
                return 1.0, 0.0
            if job.state is not JobState.RUNNING or job.t_start is None or job.t_end is None:
                return None, None
            span = max(job.t_end - job.t_start, 1e-12)
            return min(1.0, max(0.0, (now - job.t_start) / span)), max(0.0, job.t_end - now)

    # ------------------------------------------------------------------ internals
    def _now(self) -> float:
        return max(self.clock.now(), self._t_done)

    def _job_id(self, key: str) -> str:
        job_id = "sim-" + hashlib.sha256(key.encode()).hexdigest()[:24]
        if job_id in self._jobs:  # a 96-bit collision between two keys
            raise PermanentAdapterError(f"job id collision for key {key!r}; use another key")
        return job_id

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(f"simulated lab {self.name!r} has no job {job_id!r}")
        return job

    def _validate(self, request: ExperimentRequest) -> None:
        row = self._truth.get(request.candidate_id)
        if row is None:
            raise PermanentAdapterError(
                f"unknown candidate {request.candidate_id!r}: not in the simulated lab's pool"
            )
        for target in request.targets:
            if target not in self._units:
                raise PermanentAdapterError(
                    f"unknown target {target!r}; this lab measures {sorted(self._units)}"
                )
            if not math.isfinite(row.get(target, math.nan)):
                raise PermanentAdapterError(
                    f"candidate {request.candidate_id!r} cannot be measured for {target!r}"
                )

    def _apply(self, event: SubmitEvent | CancelEvent) -> None:
        self._advance(event.sim_time)
        if isinstance(event, SubmitEvent):
            self._validate(event.request)
            self._apply_submit(event)
        else:
            self._apply_cancel(event)

    def _apply_submit(self, event: SubmitEvent) -> _Job:
        cfg, key = self.config, event.idempotency_key
        fail = random.Random(_stream_seed(cfg.seed, key, "failure"))
        failed = fail.random() < cfg.failure.probability
        job = _Job(
            job_id=event.job_id,
            key=key,
            request=event.request,
            submitted_at=event.submitted_at,
            t_submit=event.sim_time,
            duration=cfg.latency.draw(random.Random(_stream_seed(cfg.seed, key, "latency"))),
            fail_reason=fail.choice(cfg.failure.reasons) if failed else None,
            t_updated=event.sim_time,
        )
        self._jobs[job.job_id] = job
        self._by_key[key] = job.job_id
        self._queue.append(job.job_id)
        self._start_queued(event.sim_time)
        self._advance(event.sim_time)  # zero-latency jobs end at once
        logger.debug(
            "job %s (%s) submitted at t=%.3f s",
            job.job_id,
            job.request.candidate_id,
            event.sim_time,
        )
        return job

    def _apply_cancel(self, event: CancelEvent) -> None:
        job = self._jobs[event.job_id]
        if job.state is JobState.RUNNING:
            self._running = [e for e in self._running if e[2] != job.job_id]
            heapq.heapify(self._running)
        job.state, job.message, job.t_updated = (
            JobState.CANCELLED,
            "cancelled on request",
            event.sim_time,
        )
        job.t_end = event.sim_time
        self._start_queued(event.sim_time)  # a freed robot takes the next queued job

    def _start_queued(self, t: float) -> None:
        while self._queue and len(self._running) < self.capacity:
            job = self._jobs[self._queue.popleft()]
            if job.state is not JobState.QUEUED:
                continue  # cancelled while waiting
            job.state, job.t_start, job.t_updated = JobState.RUNNING, t, t
            job.t_end = t + job.duration
            self._seq += 1
            heapq.heappush(self._running, (job.t_end, self._seq, job.job_id))

    def _advance(self, t: float) -> None:
        """Finish every running job that ends by ``t``, starting queued ones in the freed slots."""
        while self._running and self._running[0][0] <= t:
            t_end, _, job_id = heapq.heappop(self._running)
            job = self._jobs[job_id]
            job.t_end = job.t_updated = t_end
            self._finished_runs += 1
            if job.fail_reason is None:
                job.state = JobState.SUCCEEDED
            else:
                job.state, job.message = JobState.FAILED, job.fail_reason
            self._start_queued(t_end)
        self._t_done = max(self._t_done, t)

    def _handle(self, job: _Job) -> JobHandle:
        return JobHandle(
            adapter=self.name,
            job_id=job.job_id,
            idempotency_key=job.key,
            candidate_id=job.request.candidate_id,
            submitted_at=job.submitted_at,
        )

    def _status(self, job: _Job) -> JobStatus:
        return JobStatus(
            job_id=job.job_id,
            state=job.state,
            message=job.message,
            updated_at=self.clock.to_datetime(job.t_updated),
        )

    def _measure(self, job: _Job) -> Measurement:
        cfg = self.config
        rng = random.Random(_stream_seed(cfg.seed, job.key, "noise"))
        t_end = job.t_end if job.t_end is not None else job.t_updated
        values: dict[str, MeasuredValue] = {}
        for target in job.request.targets:
            noise = cfg.noise_for(target)
            true = self._truth[job.request.candidate_id][target]
            drifted = true + cfg.drift_per_hour.get(target, 0.0) * t_end / 3600.0
            measured = drifted + rng.gauss(0.0, 1.0) * noise.sd(true)
            sd = noise.sd(measured)
            values[target] = MeasuredValue(
                value=measured, unit=self._units[target], uncertainty=sd if sd > 0 else None
            )
        t_start = job.t_start if job.t_start is not None else job.t_submit
        return Measurement(
            job_id=job.job_id,
            candidate_id=job.request.candidate_id,
            values=values,
            cost=cfg.cost_per_experiment,
            started_at=self.clock.to_datetime(t_start),
            finished_at=self.clock.to_datetime(t_end),
            provenance={
                "executor": "cloudlab simulated lab",
                "lab": self.name,
                "seed": cfg.seed,
                "sim_submitted_s": job.t_submit,
                "sim_started_s": t_start,
                "sim_finished_s": t_end,
                "cost_unit": cfg.cost_unit,
            },
        )
