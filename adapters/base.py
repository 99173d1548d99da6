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
"""

from __future__ import annotations

import abc
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cloud_model.errors import CloudlabError

__all__ = [
    "AdapterError",
    "AuthError",
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
    cost: float = Field(default=0.0, ge=0.0, description="in the adapter's cost unit (e.g. robot-hours, CPU-s)")
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
