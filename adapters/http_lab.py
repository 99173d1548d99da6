"""HTTP orchestrator client: the adapter for any lab that speaks the cloudlab lab protocol.

A robotic-lab orchestrator that implements the protocol of :mod:`adapters.protocol`
(or a thin bridge in front of it, see ``docs/lab_protocol.md``) plugs in through
:class:`HttpLabAdapter`:

* the bearer token comes from the environment variable named in the config
  (never from the config itself);
* every call has connect/read timeouts and is retried with exponential backoff
  on connection errors, timeouts, HTTP 429/500/502/503/504 and malformed or
  schema-invalid bodies. Retries are safe: a submission is retried with the
  same idempotency key, so the lab starts at most one experiment;
* 401/403 become :class:`AuthError`, 404 :class:`JobNotFoundError`, 409 on a
  result :class:`ResultNotReadyError`, other 4xx :class:`PermanentAdapterError`,
  and retries that run out a :class:`TransientAdapterError` saying what went wrong;
* every response body is validated with the protocol's pydantic models;
* TLS certificates are verified unless the config says otherwise;
* :meth:`HttpLabAdapter.probe` is one short authenticated request that tells an
  unreachable lab (:class:`LabUnreachableError`) or a refused token
  (:class:`AuthError`) apart in seconds, before anything is submitted.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapters.base import (
    AuthError,
    ExperimentRequest,
    JobHandle,
    JobNotFoundError,
    JobState,
    JobStatus,
    LabAdapter,
    Measurement,
    PermanentAdapterError,
    ResultNotReadyError,
    TransientAdapterError,
)
from adapters.protocol import (
    API_PREFIX,
    DEFAULT_TOKEN_ENV,
    ErrorResponse,
    HealthResponse,
    JobPage,
    JobResource,
    SubmitJobBody,
)

__all__ = ["HttpLabAdapter", "HttpLabConfig", "LabUnreachableError"]

logger = logging.getLogger(__name__)

_Model = TypeVar("_Model", bound=BaseModel)
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_PROBE_CONNECT_S = 3.0  # a lab that is up accepts a connection in well under this
_PROBE_READ_S = 10.0  # listing one job is the cheapest authenticated call


class LabUnreachableError(TransientAdapterError, ConnectionError):
    """The lab did not answer at all (connection refused, unknown host, timeout) or not sanely.

    Transient by nature (the lab may come back), but raised only by
    :meth:`HttpLabAdapter.probe`, before anything was submitted.
    """


class HttpLabConfig(BaseModel):
    """How to reach one lab over HTTP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["http"] = "http"
    name: str = Field(
        default="http-lab", min_length=1, description="adapter name stored with each job"
    )
    base_url: str = Field(description="the lab's root URL, without the /v1 prefix")
    token_env: str = Field(
        default=DEFAULT_TOKEN_ENV, min_length=1, description="env var holding the token"
    )
    capacity: int = Field(default=1, ge=1, description="jobs the lab runs at once (its robots)")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, description="tries per call, the first included")
    backoff_initial_s: float = Field(default=0.5, ge=0)  # wait after the first failed try
    backoff_multiplier: float = Field(default=2.0, ge=1.0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    backoff_jitter: float = Field(default=0.1, ge=0, le=1.0)  # +- fraction, de-synchronises clients
    verify_tls: bool = True
    ca_bundle: str | None = Field(default=None, description="CA file for a lab with a private CA")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"base_url must be an http(s) URL such as https://lab.example.org, got {url!r}"
            )
        return url.rstrip("/")


class HttpLabAdapter(LabAdapter):
    """A :class:`LabAdapter` over the cloudlab lab protocol.

    Args:
        config: where the lab is and how to talk to it.
        transport: an httpx transport to use instead of the network (tests).

    Raises:
        AuthError: the token variable ``config.token_env`` is unset or empty.
    """

    def __init__(
        self, config: HttpLabConfig, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.capacity = config.capacity
        token = os.environ.get(config.token_env, "")
        if not token:
            raise AuthError(
                f"environment variable {config.token_env} is not set: export the bearer token of the "
                f"lab at {config.base_url} in it"
            )
        host = urlsplit(config.base_url).hostname or ""
        if urlsplit(config.base_url).scheme == "http" and host not in _LOOPBACK:
            logger.warning("lab %s is plain http: the token travels unencrypted", config.base_url)
        verify: bool | str = (
            config.ca_bundle if (config.verify_tls and config.ca_bundle) else config.verify_tls
        )
        self._client = httpx.Client(
            base_url=config.base_url + API_PREFIX,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            verify=verify,
            transport=transport,
        )
        self._jitter = random.Random()

    # ------------------------------------------------------------------ contract
    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        body = SubmitJobBody(request=request, idempotency_key=idempotency_key)
        job = self._call(
            "POST", "/jobs", JobResource, ok=(200, 201), json=body.model_dump(mode="json")
        )
        if job.idempotency_key != idempotency_key or job.candidate_id != request.candidate_id:
            raise PermanentAdapterError(
                f"lab at {self.config.base_url} answered a submission of key {idempotency_key!r} "
                f"(candidate {request.candidate_id!r}) with job {job.job_id} of key "
                f"{job.idempotency_key!r} (candidate {job.candidate_id!r}): protocol violation"
            )
        return job.to_handle(self.name)

    def poll(self, handle: JobHandle) -> JobStatus:
        return self._job(handle.job_id).to_status()

    def result(self, handle: JobHandle) -> Measurement:
        measurement = self._call(
            "GET", f"/jobs/{quote(handle.job_id, safe='')}/result", Measurement
        )
        self._check_job_id(handle.job_id, measurement.job_id)
        return measurement

    def cancel(self, handle: JobHandle) -> JobStatus:
        job = self._call("POST", f"/jobs/{quote(handle.job_id, safe='')}/cancel", JobResource)
        self._check_job_id(handle.job_id, job.job_id)
        return job.to_status()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpLabAdapter:
        return self

    # -------------------------------------------------------------------- extras
    def probe(self) -> None:
        """Check that the lab answers and accepts our token: one request, no retries.

        ``GET /v1/jobs?limit=1`` (``/v1/health`` needs no token, so it cannot
        check one), with at most 3 s to connect and 10 s to answer (less when the
        config's timeouts are shorter).

        Raises:
            LabUnreachableError: no connection (refused, unknown host), a timeout, or
                HTTP 429/5xx; the message names the URL and what to check.
            AuthError: the lab refused the token (HTTP 401/403).
            PermanentAdapterError: HTTP 404 or a body that is not a job page (base_url is
                not a lab's root), or any other refusal.
        """
        cfg = self.config
        url = f"{cfg.base_url}{API_PREFIX}/jobs?limit=1"
        timeout = httpx.Timeout(
            min(cfg.read_timeout_s, _PROBE_READ_S),
            connect=min(cfg.connect_timeout_s, _PROBE_CONNECT_S),
        )
        check = (
            f"check that the lab is running and that base_url ({cfg.base_url}) is its root "
            "(host, port, http or https, no /v1)"
        )
        try:
            response = self._client.get("/jobs", params={"limit": 1}, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise LabUnreachableError(
                f"lab at {cfg.base_url} did not answer GET {url} within {timeout.connect:g} s "
                f"to connect and {timeout.read:g} s to reply ({type(exc).__name__}); {check}, "
                "and that no firewall or proxy drops the connection"
            ) from exc
        except httpx.TransportError as exc:
            raise LabUnreachableError(
                f"lab at {cfg.base_url} is unreachable: GET {url} failed "
                f"({type(exc).__name__}: {exc}); {check}"
            ) from exc
        status = response.status_code
        if status in _RETRY_STATUSES:
            raise LabUnreachableError(
                f"lab at {cfg.base_url} is up but not serving: GET {url} answered HTTP {status} "
                f"({_message(response)}); check the lab's own logs, then run again"
            )
        if status == 404:
            raise PermanentAdapterError(
                f"lab at {cfg.base_url}: GET {url} answered HTTP 404 ({_message(response)}); "
                f"{check}"
            )
        if status != 200:
            raise self._refusal(f"GET {url}", response)
        try:
            JobPage.model_validate_json(response.content)
        except ValidationError as exc:
            raise PermanentAdapterError(
                f"{url} answered HTTP 200 with a body that is not a job page ({_summary(exc)}): "
                f"base_url ({cfg.base_url}) does not look like a cloudlab lab protocol server"
            ) from exc
        logger.info("lab at %s answered the probe", cfg.base_url)

    def health(self) -> HealthResponse:
        """The lab's liveness answer (name, capacity, protocol version)."""
        return self._call("GET", "/health", HealthResponse)

    def find(self, idempotency_key: str) -> JobHandle | None:
        """The lab's job for ``idempotency_key``, if it has one (for reconciliation)."""
        page = self._call("GET", "/jobs", JobPage, params={"idempotency_key": idempotency_key})
        return page.items[0].to_handle(self.name) if page.items else None

    def list_jobs(
        self, state: JobState | None = None, page_size: int = 100
    ) -> Iterator[JobResource]:
        """Every job the lab knows, in submission order, fetched page by page."""
        offset: int | None = 0
        while offset is not None:
            params: dict[str, Any] = {"offset": offset, "limit": page_size}
            if state is not None:
                params["state"] = state.value
            page = self._call("GET", "/jobs", JobPage, params=params)
            yield from page.items
            offset = page.next_offset

    # ------------------------------------------------------------------ internals
    def _job(self, job_id: str) -> JobResource:
        job = self._call("GET", f"/jobs/{quote(job_id, safe='')}", JobResource)
        self._check_job_id(job_id, job.job_id)
        return job

    def _check_job_id(self, asked: str, got: str) -> None:
        if asked != got:
            raise PermanentAdapterError(
                f"lab at {self.config.base_url} answered about job {got!r} when asked about {asked!r}"
            )

    def _call(
        self,
        method: str,
        path: str,
        model: type[_Model],
        *,
        ok: tuple[int, ...] = (200,),
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> _Model:
        """One protocol call with retries; returns the validated body.

        Raises:
            AuthError, JobNotFoundError, ResultNotReadyError, PermanentAdapterError:
                the lab refused the call.
            TransientAdapterError: no valid answer after ``max_attempts`` tries.
        """
        cfg = self.config
        where = f"{method} {cfg.base_url}{API_PREFIX}{path}"
        last = "no attempt made"
        for attempt in range(1, cfg.max_attempts + 1):
            retry_after: float | None = None
            try:
                response = self._client.request(method, path, json=json, params=params)
            except httpx.TimeoutException as exc:
                last = f"timed out ({type(exc).__name__}; read timeout {cfg.read_timeout_s} s)"
            except httpx.TransportError as exc:
                last = f"connection failed ({type(exc).__name__}: {exc})"
            else:
                status = response.status_code
                if status in ok:
                    try:
                        return model.model_validate_json(response.content)
                    except ValidationError as exc:
                        last = (
                            f"HTTP {status} with an invalid {model.__name__} body ({_summary(exc)})"
                        )
                elif status in _RETRY_STATUSES:
                    last = f"HTTP {status}: {_message(response)}"
                    retry_after = _retry_after(response)
                else:
                    raise self._refusal(where, response)
            if attempt < cfg.max_attempts:
                wait = self._backoff(attempt, retry_after)
                logger.warning(
                    "%s: %s; retry %d/%d in %.2f s",
                    where,
                    last,
                    attempt,
                    cfg.max_attempts - 1,
                    wait,
                )
                time.sleep(wait)
        raise TransientAdapterError(
            f"{where}: no valid answer after {cfg.max_attempts} attempts; last: {last}"
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        wait = min(
            cfg.backoff_max_s, cfg.backoff_initial_s * cfg.backoff_multiplier ** (attempt - 1)
        )
        wait *= 1.0 + cfg.backoff_jitter * (2.0 * self._jitter.random() - 1.0)
        if retry_after is not None:
            wait = max(wait, min(retry_after, cfg.backoff_max_s))
        return wait

    def _refusal(self, where: str, response: httpx.Response) -> PermanentAdapterError:
        status, message = response.status_code, _message(response)
        if status in (401, 403):
            return AuthError(
                f"{where}: the lab refused our credentials (HTTP {status}: {message}); check that "
                f"${self.config.token_env} holds this lab's token"
            )
        if status == 404:
            return JobNotFoundError(f"{where}: not found (HTTP 404: {message})")
        if status == 409 and _is_result(where):
            return ResultNotReadyError(f"{where}: {message}")
        return PermanentAdapterError(f"{where}: refused (HTTP {status}: {message})")


def _is_result(where: str) -> bool:
    """Whether a ``"METHOD URL"`` string is a result request."""
    return where.endswith("/result")


def _message(response: httpx.Response) -> str:
    try:
        error = ErrorResponse.model_validate_json(response.content)
    except ValidationError:
        text = response.text.strip().replace("\n", " ")
        return (text[:200] + "...") if len(text) > 200 else (text or "empty body")
    return f"{error.code}: {error.message}"


def _summary(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return f"{exc.error_count()} error(s), first at {loc}: {first.get('msg', '')}"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
