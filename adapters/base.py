"""The adapter contract: how cloudlab talks to anything that runs experiments.

An adapter turns an :class:`ExperimentRequest` into a job somewhere (a robotic
lab, a DFT code, an ML potential, the simulated lab) and reports on it:

* ``submit(request, idempotency_key) -> JobHandle`` starts at most one job per
  key: submitting the same key twice returns the first job's handle;
* ``poll(handle) -> JobStatus`` reads the job's state;
* ``result(handle) -> Measurement`` returns the values of a SUCCEEDED job;
* ``cancel(handle) -> JobStatus`` asks the job to stop.

Everything crossing the contract is a pydantic model that round-trips through
JSON, so it can cross processes (Ray), the network (HTTP) and the disk (the
campaign store). Errors are split into transient ones (:class:`TransientAdapterError`:
retry with the same idempotency key) and permanent ones
(:class:`PermanentAdapterError`: record and move on).

The loop does not call adapters itself. It drives an :class:`Executor` (the job
engine of :mod:`adapters.engine`, in process or over Ray) and reads
:class:`JobEvent` records from it; engines measure time with a :class:`Clock`
(the wall clock, or a simulated lab's virtual clock in benchmarks). This module
imports neither Ray nor torch.
"""

from __future__ import annotations

import abc
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cloud_model.errors import CloudlabError

__all__ = [
    "AdapterError",
    "AuthError",
    "Clock",
    "DispatchEvent",
    "EventKind",
    "Executor",
    "JobEvent",
    "ExperimentRequest",
    "JobHandle",
    "JobNotFoundError",
    "JobState",
    "JobStatus",
    "LabAdapter",
    "MeasuredValue",
    "Measurement",
    "PermanentAdapterError",
    "ResultNotReadyError",
    "TransientAdapterError",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (every timestamp in the contract is)."""
    return datetime.now(UTC)


class JobState(StrEnum):
    """Life cycle of one job. QUEUED -> RUNNING -> one of the terminal states."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LOST = "LOST"  # the executor no longer knows the job (e.g. a lab wiped its queue)

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.LOST})


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentRequest(_Record):
    """What to make or compute, and which quantities to measure.

    A request carries the candidate's identity and as much of its description as
    the executor may need: a CIF for DFT/ML potentials, a SCOPE string or formula
    for a lab that synthesises from a recipe. ``parameters`` holds executor
    settings (e.g. ``{"relax": true}``) and must be JSON-serialisable.
    """

    candidate_id: str = Field(min_length=1)
    targets: tuple[str, ...] = Field(min_length=1, description="names of the quantities to measure")
    structure_cif: str | None = None
    scope: str | None = None
    formula: str | None = None
    campaign: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class JobHandle(_Record):
    """Identifies one submitted job at one adapter."""

    adapter: str
    job_id: str
    idempotency_key: str
    candidate_id: str
    submitted_at: datetime = Field(default_factory=utcnow)


class JobStatus(_Record):
    """A job's state as last read from the executor."""

    job_id: str
    state: JobState
    message: str | None = None  # human-readable; for FAILED the reason (e.g. "failed synthesis")
    updated_at: datetime = Field(default_factory=utcnow)


class MeasuredValue(_Record):
    """One measured quantity with its unit and, when known, its 1-sigma uncertainty."""

    value: float
    unit: str
    uncertainty: float | None = Field(default=None, ge=0.0)


class Measurement(_Record):
    """The outcome of a SUCCEEDED job."""

    job_id: str
    candidate_id: str
    values: dict[str, MeasuredValue]
    cost: float = Field(
        default=0.0, ge=0.0, description="in the adapter's cost unit (e.g. robot-hours, CPU-s)"
    )
    started_at: datetime | None = None
    finished_at: datetime = Field(default_factory=utcnow)
    provenance: dict[str, Any] = Field(default_factory=dict)  # code, version, settings, instrument


class AdapterError(CloudlabError, RuntimeError):
    """Base of every error raised by an adapter."""


class TransientAdapterError(AdapterError):
    """A failure that may go away on retry (timeout, 5xx, dropped connection).

    Retrying with the *same* idempotency key is always safe.
    """


class PermanentAdapterError(AdapterError):
    """A failure that retrying will not fix (bad request, unknown job, refused auth)."""


class AuthError(PermanentAdapterError):
    """The executor refused our credentials."""


class JobNotFoundError(PermanentAdapterError):
    """The executor does not know the job id."""


class ResultNotReadyError(PermanentAdapterError):
    """``result`` was asked for a job that has not SUCCEEDED."""


class LabAdapter(abc.ABC):
    """Abstract executor of experiments. Implementations must be safe to call
    from one thread at a time; concurrency comes from the dispatcher.

    Attributes:
        name: short identifier stored with every job (e.g. ``"simulated"``).
        capacity: how many jobs the executor runs at once (robots, nodes);
            the dispatcher never keeps more than this many in flight.
    """

    name: str = "adapter"
    capacity: int = 1

    @abc.abstractmethod
    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        """Start a job for ``request`` unless one already exists for ``idempotency_key``.

        Returns the handle of the (new or existing) job. Never starts two jobs for one key.
        """

    @abc.abstractmethod
    def poll(self, handle: JobHandle) -> JobStatus:
        """Read the job's current state."""

    @abc.abstractmethod
    def result(self, handle: JobHandle) -> Measurement:
        """Return the measurement of a SUCCEEDED job (ResultNotReadyError otherwise)."""

    @abc.abstractmethod
    def cancel(self, handle: JobHandle) -> JobStatus:
        """Ask the job to stop; returns the state after the request."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (connections, worker processes). Idempotent."""

    def __enter__(self) -> LabAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- what an executor reports


class EventKind(StrEnum):
    """What happened to a job."""

    SUBMITTED = "SUBMITTED"  # the adapter accepted the job: ``handle`` is set
    STATE = "STATE"  # a polled non-terminal state changed (e.g. QUEUED -> RUNNING): ``status``
    RETRYING = "RETRYING"  # a transient error; the call is retried with the same key
    SUCCEEDED = "SUCCEEDED"  # ``measurement`` is set
    FAILED = "FAILED"  # the job failed, a permanent error (``permanent``) or retries ran out
    TIMED_OUT = "TIMED_OUT"  # exceeded its timeout and was cancelled at the adapter
    CANCELLED = "CANCELLED"
    LOST = "LOST"  # the adapter no longer knows the job
    # the executor refused our credentials: not an experiment outcome; the job stays as the
    # store knows it (never reached the lab, or still there) and the campaign stops until fixed
    REFUSED = "REFUSED"

    @property
    def is_terminal(self) -> bool:
        return self not in (EventKind.SUBMITTED, EventKind.STATE, EventKind.RETRYING)


class JobEvent(_Record):
    """One thing that happened to one job; round-trips through JSON."""

    kind: EventKind
    idempotency_key: str
    candidate_id: str
    handle: JobHandle | None = None
    status: JobStatus | None = None
    measurement: Measurement | None = None
    message: str | None = None
    permanent: bool = False  # FAILED by a PermanentAdapterError: retrying will not help
    attempt: int = Field(default=0, ge=0)  # RETRYING: the number of the retry
    at: datetime = Field(default_factory=utcnow)


DispatchEvent = JobEvent  # the name the Ray dispatcher's users know


class Executor(Protocol):
    """What the campaign loop drives: it submits jobs and reads their events.

    Implementations keep the job state machine (retries, timeouts, LOST,
    cancellation): :class:`adapters.engine.JobEngine`, over an in-process or a Ray
    transport.
    """

    def submit(self, request: ExperimentRequest, idempotency_key: str) -> None:
        """Queue a job; a SUBMITTED event follows once the adapter accepted it."""
        ...

    def track(self, handle: JobHandle) -> None:
        """Resume polling a job submitted before (e.g. before a crash); never resubmits it."""
        ...

    def cancel(self, idempotency_key: str) -> bool:
        """Ask for an outstanding job to be cancelled; False if it is not outstanding."""
        ...

    def next_events(self, timeout: float | None = None) -> list[JobEvent]:
        """Events since the last call (oldest first); ``[]`` after ``timeout`` or when idle."""
        ...

    def outstanding(self) -> int:
        """Jobs submitted or tracked whose terminal event has not been emitted."""
        ...

    def shutdown(self, graceful: bool = True, cancel_in_flight: bool = False) -> list[JobHandle]:
        """Stop; returns the handles of jobs left running at the adapter."""
        ...


class Clock(Protocol):
    """The time an executor runs on, in seconds.

    The wall clock (``time.monotonic``, real sleeps) for real labs; a simulated
    lab's virtual clock in benchmarks, where sleeping jumps time forward.
    """

    def monotonic(self) -> float:
        """Seconds since an arbitrary origin; never decreases."""
        ...

    def sleep_until(self, deadline: float) -> None:
        """Return once ``monotonic() >= deadline`` (a virtual clock jumps there)."""
        ...

    @property
    def is_virtual(self) -> bool:
        """True when sleeping costs no wall time (the engine then never blocks on it)."""
        ...
