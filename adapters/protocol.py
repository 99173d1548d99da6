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

import json
import unicodedata
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from adapters.base import ExperimentRequest, JobHandle, JobState, JobStatus

__all__ = [
    "API_PREFIX",
    "DEFAULT_TOKEN_ENV",
    "MAX_BODY_BYTES",
    "MAX_FIELD_CHARS",
    "MAX_KEY_CHARS",
    "MAX_PARAMETERS_BYTES",
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

# Size limits (a lab persists every accepted request and replays it on each start, so an
# unbounded body would grow its state for good). The server answers 413 to a larger body and
# 422 to a longer field, naming the limit; nothing of a refused request is stored.
MAX_BODY_BYTES = 1024 * 1024  # default request body limit of the server (configurable there)
MAX_KEY_CHARS = 256  # idempotency key
MAX_PARAMETERS_BYTES = 64 * 1024  # ExperimentRequest.parameters, as compact JSON
MAX_TARGETS = 64  # targets per request
MAX_FIELD_CHARS: dict[str, int] = {  # string fields of ExperimentRequest
    "candidate_id": 256,
    "targets": 128,  # each name
    "structure_cif": 512 * 1024,  # a few hundred atoms in P1
    "scope": 64 * 1024,
    "formula": 1024,
    "campaign": 256,
}

ErrorCode = Literal[
    "unauthorized",  # 401: missing or wrong bearer token
    "not_found",  # 404: unknown job id or route
    "result_not_ready",  # 409: result asked of a job that has not SUCCEEDED
    "invalid_request",  # 422: body/query invalid, unknown candidate or target, key reused
    "method_not_allowed",  # 405
    "body_too_large",  # 413: request body over the server's limit
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
    idempotency_key: str = Field(
        min_length=1,
        max_length=MAX_KEY_CHARS,
        description="printable text, not only whitespace, no control characters",
    )

    @field_validator("idempotency_key")
    @classmethod
    def _printable_key(cls, key: str) -> str:
        if not key.strip():
            raise PydanticCustomError("blank_key", "the idempotency key is only whitespace")
        for position, char in enumerate(key):
            if unicodedata.category(char) in ("Cc", "Cs"):  # control chars, lone surrogates
                raise PydanticCustomError(
                    "control_character",
                    "the idempotency key holds control character U+{code} at position "
                    "{position}; use printable text",
                    {"code": f"{ord(char):04X}", "position": position},
                )
        return key

    @field_validator("request")
    @classmethod
    def _within_limits(cls, request: ExperimentRequest) -> ExperimentRequest:
        if len(request.targets) > MAX_TARGETS:
            raise _too_long("targets", len(request.targets), MAX_TARGETS, "names")
        for field, limit in MAX_FIELD_CHARS.items():
            value = getattr(request, field)
            for text in value if isinstance(value, tuple) else (value,):
                if text is not None and len(text) > limit:
                    raise _too_long(field, len(text), limit, "characters")
        try:
            size = len(json.dumps(request.parameters, separators=(",", ":")).encode())
        except (RecursionError, ValueError, TypeError):
            raise PydanticCustomError(
                "not_serialisable", "request.parameters is not JSON-serialisable or too deep"
            ) from None
        if size > MAX_PARAMETERS_BYTES:
            raise _too_long("parameters", size, MAX_PARAMETERS_BYTES, "bytes of JSON")
        return request


def _too_long(field: str, size: int, limit: int, unit: str) -> PydanticCustomError:
    return PydanticCustomError(
        "too_long",
        "request.{field} has {size} {unit}, more than the limit of {limit}",
        {"field": field, "size": size, "unit": unit, "limit": limit},
    )


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
