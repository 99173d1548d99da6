"""Wire models of the cloudlab lab HTTP protocol (version 1).

The server (``simulators.server``, or any orchestrator bridge) and the client
(:mod:`adapters.http_lab`) share these models, so both sides validate every
body against the same schema. Routes, all under :data:`API_PREFIX`:

=======  ===========================  ==========================================
method   path                         body in -> body out
=======  ===========================  ==========================================
POST     ``/jobs``                    :class:`SubmitJobBody` -> :class:`JobResource`
                                      (201 created, 200 existing job of the key)
GET      ``/jobs``                    query ``state, idempotency_key, offset, limit``
                                      -> :class:`JobPage`
GET      ``/jobs/{job_id}``           -> :class:`JobResource`
GET      ``/jobs/{job_id}/result``    -> :class:`~adapters.base.Measurement` (409 if not SUCCEEDED)
POST     ``/jobs/{job_id}/cancel``    -> :class:`JobResource`
GET      ``/health``                  -> :class:`HealthResponse` (no auth)
=======  ===========================  ==========================================

Every other answer is an :class:`ErrorResponse`. See ``docs/lab_protocol.md``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.base import ExperimentRequest, JobHandle, JobState, JobStatus

__all__ = [
    "API_PREFIX",
    "DEFAULT_TOKEN_ENV",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "ErrorResponse",
    "HealthResponse",
    "JobPage",
    "JobResource",
    "SubmitJobBody",
]

PROTOCOL_VERSION = "1.0"
API_PREFIX = "/v1"
DEFAULT_TOKEN_ENV = "CLOUDLAB_LAB_TOKEN"
MAX_PAGE_SIZE = 1000

ErrorCode = Literal[
    "unauthorized",  # 401: missing or wrong bearer token
    "not_found",  # 404: unknown job id or route
    "result_not_ready",  # 409: result asked of a job that has not SUCCEEDED
    "invalid_request",  # 422: body/query invalid, unknown candidate or target, key reused
    "method_not_allowed",  # 405
    "internal_error",  # 500
    "unavailable",  # 503: the lab cannot take requests now; retry later
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubmitJobBody(_Wire):
    """Body of ``POST /v1/jobs``: what to measure, and the client's idempotency key.

    The key identifies the experiment: posting the same key again returns the
    existing job (HTTP 200) and never starts a second one; posting it with a
    different request is refused (422).
    """

    request: ExperimentRequest
    idempotency_key: str = Field(min_length=1, max_length=256)


class JobResource(_Wire):
    """One job as the lab reports it."""

    job_id: str
    idempotency_key: str
    candidate_id: str
    state: JobState
    message: str | None = None  # e.g. the failure reason
    submitted_at: datetime
    updated_at: datetime

    @classmethod
    def from_parts(cls, handle: JobHandle, status: JobStatus) -> JobResource:
        """Build the wire form from the adapter contract's handle and status."""
        return cls(
            job_id=handle.job_id,
            idempotency_key=handle.idempotency_key,
            candidate_id=handle.candidate_id,
            state=status.state,
            message=status.message,
            submitted_at=handle.submitted_at,
            updated_at=status.updated_at,
        )

    def to_handle(self, adapter: str) -> JobHandle:
        """The contract's handle, stamped with the client-side adapter name."""
        return JobHandle(
            adapter=adapter,
            job_id=self.job_id,
            idempotency_key=self.idempotency_key,
            candidate_id=self.candidate_id,
            submitted_at=self.submitted_at,
        )

    def to_status(self) -> JobStatus:
        """The contract's status."""
        return JobStatus(
            job_id=self.job_id, state=self.state, message=self.message, updated_at=self.updated_at
        )


class JobPage(_Wire):
    """One page of ``GET /v1/jobs``, in submission order."""

    items: list[JobResource]
    total: int = Field(ge=0, description="number of jobs matching the filter")
    offset: int = Field(ge=0)
    next_offset: int | None = Field(
        default=None, description="offset of the next page; null on the last"
    )


class HealthResponse(_Wire):
    """Body of ``GET /v1/health`` (the only route without auth)."""

    status: Literal["ok"] = "ok"
    protocol_version: str = PROTOCOL_VERSION
    lab: str = Field(description="the lab's name")
    capacity: int = Field(ge=1, description="experiments the lab runs at once")


class ErrorResponse(_Wire):
    """Body of every non-2xx answer."""

    code: ErrorCode
    message: str = Field(description="what was wrong and what to do, for humans")
