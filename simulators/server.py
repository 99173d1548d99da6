"""The simulated lab over HTTP: an ASGI app speaking the cloudlab lab protocol.

:func:`create_app` wraps a :class:`~simulators.lab.SimulatedLab` in a FastAPI
app serving the routes of :mod:`adapters.protocol` under ``/v1``, with bearer
token auth (``/v1/health`` excepted), a request body limit (413 above
``max_body_bytes``), pydantic-validated bodies with field limits (422) and
:class:`~adapters.protocol.ErrorResponse` bodies for every error.
:func:`serve` runs it with uvicorn on a lab opened by
:func:`simulators.journal.open_lab`, persisted in a state directory.

Run from the command line (the truth table is a :class:`GroundTruth` JSON file;
``cloudlab lab serve --dataset NAME --target COL`` builds one from the registry)::

    CLOUDLAB_LAB_TOKEN=secret python -m simulators.server --truth truth.json --port 8765
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from adapters.base import (
    AdapterError,
    AuthError,
    JobNotFoundError,
    JobState,
    Measurement,
    ResultNotReadyError,
    TransientAdapterError,
)
from adapters.protocol import (
    API_PREFIX,
    DEFAULT_TOKEN_ENV,
    MAX_BODY_BYTES,
    MAX_KEY_CHARS,
    MAX_PAGE_SIZE,
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorResponse,
    HealthResponse,
    JobPage,
    JobResource,
    SubmitJobBody,
)
from cloud_model.errors import ConfigError
from simulators.config import SimulatedLabConfig
from simulators.faults import FAULTS_ENV, Fault, FaultInjector, parse_faults
from simulators.ground_truth import GroundTruth
from simulators.journal import open_lab
from simulators.lab import SimulatedLab

__all__ = ["create_app", "openapi_document", "serve"]

logger = logging.getLogger(__name__)

_DESCRIPTION = (
    "The cloudlab lab protocol: submit an experiment with a client idempotency key, read its "
    "state, read its result, cancel it, list jobs. Bearer-token auth on every route but "
    "/v1/health. Errors are ErrorResponse bodies. See docs/lab_protocol.md."
)
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    413: {"model": ErrorResponse, "description": "request body over the server's size limit"},
    422: {"model": ErrorResponse, "description": "invalid body or query, or a field too long"},
    500: {"model": ErrorResponse, "description": "lab error; retry with the same key"},
    503: {"model": ErrorResponse, "description": "lab unavailable; retry later"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "unknown job id"}
}


_BEARER = HTTPBearer(
    auto_error=False, description="the token the server reads from its token variable"
)


class _Unauthorized(Exception):
    """Raised by the auth dependency; answered with 401."""


class _TokenCheck:
    """FastAPI dependency: the request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, token: str, token_env: str) -> None:
        self._expected = token.encode()
        self._env = token_env

    def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
    ) -> None:
        if credentials is None:
            raise _Unauthorized(
                f"missing bearer token: send 'Authorization: Bearer <token from ${self._env}>'"
            )
        if not secrets.compare_digest(credentials.credentials.encode(), self._expected):
            raise _Unauthorized(
                f"wrong bearer token: use the token the lab server reads from ${self._env}"
            )


def _error(
    status: int, code: ErrorCode, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(code=code, message=message).model_dump(mode="json")
    return JSONResponse(status_code=status, content=body, headers=headers)


_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[MutableMapping[str, Any], _Receive, _Send], Awaitable[None]]


class _BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before any route sees it.

    A declared ``Content-Length`` over the limit is refused without reading the body; a
    chunked body is read up to the limit and refused as soon as it passes it. Bodies within
    the limit are buffered (at most ``max_bytes``) and replayed to the app.
    """

    def __init__(self, app: _ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: _Receive, send: _Send
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, f"{int(declared):,} bytes")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, f"more than {self.max_bytes:,} bytes")
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        replayed = False

        async def replay() -> _Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: MutableMapping[str, Any], send: _Send, size: str) -> None:
        message = (
            f"request body of {size} is over this lab's limit of {self.max_bytes:,} bytes "
            f"({scope['method']} {scope['path']}); send a smaller request"
        )
        body = json.dumps(
            ErrorResponse(code="body_too_large", message=message).model_dump()
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the rest of the body is never read
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _describe(error: Mapping[str, Any]) -> str:
    """One validation problem as ``where: what``."""
    loc = [str(p) for p in error.get("loc", ())]
    if error.get("type") == "json_invalid":  # loc is ("body", character offset)
        reason = error.get("ctx", {}).get("error", "")
        return f"body: not valid JSON at character {loc[-1] if len(loc) > 1 else 0}: {reason}"
    return f"{'.'.join(loc)}: {error.get('msg', '')}"


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at ``request``'s path (for the ``Allow`` header of a 405)."""
    methods: set[str] = set()
    for route in request.app.state.routes:  # every Route, those of included routers too
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _install_error_handlers(app: FastAPI) -> None:
    async def unauthorized(request: Request, exc: Exception) -> JSONResponse:
        return _error(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"})

    async def adapter_error(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, JobNotFoundError):
            return _error(404, "not_found", str(exc))
        if isinstance(exc, ResultNotReadyError):
            return _error(409, "result_not_ready", str(exc))
        if isinstance(exc, AuthError):
            return _error(401, "unauthorized", str(exc))
        if isinstance(exc, TransientAdapterError):
            return _error(503, "unavailable", str(exc))
        return _error(422, "invalid_request", str(exc))

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        parts = [_describe(e) for e in errors]
        return _error(422, "invalid_request", "; ".join(parts) or str(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else str(exc)
        headers = exc.headers if isinstance(exc, StarletteHTTPException) else None
        if status == 405:  # Starlette names the methods of one route only; the path may have more
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        if status == 400:  # FastAPI could not parse the body (e.g. JSON nested too deeply)
            status, detail = (
                422,
                "the body could not be parsed as JSON (malformed or nested too deeply)",
            )
        codes: dict[int, ErrorCode] = {
            404: "not_found",
            405: "method_not_allowed",
            401: "unauthorized",
        }
        code = codes.get(status, "internal_error" if status >= 500 else "invalid_request")
        return _error(status, code, f"{detail} ({request.method} {request.url.path})", headers)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error in %s %s", request.method, request.url.path)
        return _error(
            500, "internal_error", f"internal error: {type(exc).__name__}; retry with the same key"
        )

    app.add_exception_handler(_Unauthorized, unauthorized)
    app.add_exception_handler(AdapterError, adapter_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)


def create_app(
    lab: SimulatedLab,
    token: str,
    *,
    token_env: str = DEFAULT_TOKEN_ENV,
    faults: Sequence[Fault] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``lab`` over the lab protocol.

    Args:
        lab: the lab behind the routes (thread-safe; handlers run in a thread pool).
        token: the bearer token every route but ``/v1/health`` requires.
        token_env: the variable the token came from, named in 401 messages.
        faults: a test-only schedule of injected faults (see :mod:`simulators.faults`).
        max_body_bytes: larger request bodies get 413 and never reach the lab.

    Raises:
        ConfigError: ``token`` is empty or ``max_body_bytes`` is not positive.
    """
    if not token:
        raise ConfigError(f"the lab server needs a non-empty bearer token (set ${token_env})")
    if max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be positive, got {max_body_bytes}")
    app = FastAPI(
        title="cloudlab lab protocol",
        version=PROTOCOL_VERSION,
        description=_DESCRIPTION,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
    )
    _install_error_handlers(app)
    jobs = APIRouter(
        prefix=f"{API_PREFIX}/jobs",
        tags=["jobs"],
        dependencies=[Depends(_TokenCheck(token, token_env))],
    )

    @jobs.post(
        "",
        status_code=201,
        response_model=JobResource,
        responses={200: {"model": JobResource, "description": "the key's existing job"}, **_ERRORS},
        summary="Submit an experiment (idempotent per key)",
    )
    def submit_job(body: SubmitJobBody, response: Response) -> JobResource:
        handle, created = lab.submit_or_get(body.request, body.idempotency_key)
        response.status_code = 201 if created else 200
        return JobResource.from_parts(handle, lab.status(handle.job_id))

    @jobs.get(
        "", response_model=JobPage, responses=_ERRORS, summary="List jobs in submission order"
    )
    def list_jobs(
        state: JobState | None = None,
        idempotency_key: Annotated[str | None, Query(max_length=MAX_KEY_CHARS)] = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 100,
    ) -> JobPage:
        if idempotency_key is not None:
            found = lab.find(idempotency_key)
            pairs = [] if found is None else [(found, lab.status(found.job_id))]
            pairs = [p for p in pairs if state is None or p[1].state is state]
            items, total = pairs[offset : offset + limit], len(pairs)
        else:
            items, total = lab.list_jobs(state, offset, limit)
        next_offset = offset + len(items) if offset + len(items) < total else None
        resources = [JobResource.from_parts(h, s) for h, s in items]
        return JobPage(items=resources, total=total, offset=offset, next_offset=next_offset)

    @jobs.get(
        "/{job_id}",
        response_model=JobResource,
        responses={**_NOT_FOUND, **_ERRORS},
        summary="Read a job",
    )
    def get_job(job_id: str) -> JobResource:
        return JobResource.from_parts(lab.handle(job_id), lab.status(job_id))

    @jobs.get(
        "/{job_id}/result",
        response_model=Measurement,
        responses={
            **_NOT_FOUND,
            409: {"model": ErrorResponse, "description": "the job has not SUCCEEDED"},
            **_ERRORS,
        },
        summary="Read the measurement of a SUCCEEDED job",
    )
    def get_result(job_id: str) -> Measurement:
        return lab.measurement(job_id)

    @jobs.post(
        "/{job_id}/cancel",
        response_model=JobResource,
        responses={**_NOT_FOUND, **_ERRORS},
        summary="Ask a job to stop (no effect on ended jobs)",
    )
    def cancel_job(job_id: str) -> JobResource:
        status = lab.cancel_job(job_id)
        return JobResource.from_parts(lab.handle(job_id), status)

    @app.get(
        f"{API_PREFIX}/health", response_model=HealthResponse, tags=["health"], summary="Liveness"
    )
    def health() -> HealthResponse:
        return HealthResponse(lab=lab.name, capacity=lab.capacity)

    app.include_router(jobs)
    app.state.routes = [r for r in (*app.routes, *jobs.routes) if isinstance(r, Route)]
    if faults:
        app.add_middleware(FaultInjector, schedule=list(faults))  # type: ignore[arg-type]
    app.add_middleware(_BodySizeLimit, max_bytes=max_body_bytes)  # type: ignore[arg-type]
    return app


def openapi_document() -> dict[str, Any]:
    """The protocol's OpenAPI document, as generated from the app (committed as docs/openapi.json)."""
    truth = {"example": {"y": 0.0}}
    lab = SimulatedLab(truth, {"y": "eV"}, SimulatedLabConfig())
    return create_app(lab, token="unused").openapi()


def serve(
    truth: GroundTruth,
    config: SimulatedLabConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    state_dir: Path | None = None,
    token_env: str = DEFAULT_TOKEN_ENV,
    faults: Sequence[Fault] = (),
    log_level: str = "info",
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """Serve a simulated lab with uvicorn until interrupted (bodies over ``max_body_bytes``: 413).

    Raises:
        ConfigError: ``$token_env`` is unset or empty, or ``state_dir`` belongs
            to another lab.
    """
    import uvicorn

    token = os.environ.get(token_env, "")
    if not token:
        raise ConfigError(
            f"environment variable {token_env} is not set: export the lab's bearer token in it"
        )
    lab = open_lab(truth, config, state_dir)
    try:
        app = create_app(
            lab, token, token_env=token_env, faults=faults, max_body_bytes=max_body_bytes
        )
        logger.info(
            "simulated lab %r on http://%s:%d%s (%d candidates, targets %s, state %s)",
            lab.name, host, port, API_PREFIX, len(truth.values), sorted(truth.units), state_dir,
        )  # fmt: skip
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        lab.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m simulators.server``: serve a truth table file."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--truth", type=Path, required=True, help="GroundTruth JSON file")
    parser.add_argument(
        "--config", type=Path, help="SimulatedLabConfig JSON file (default: defaults)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--token-env", default=DEFAULT_TOKEN_ENV)
    parser.add_argument(
        "--faults", default=os.environ.get(FAULTS_ENV, ""), help="test-only fault schedule"
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get 413"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = (
        SimulatedLabConfig.model_validate_json(args.config.read_bytes())
        if args.config
        else SimulatedLabConfig()
    )
    serve(
        GroundTruth.from_file(args.truth),
        config,
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        token_env=args.token_env,
        faults=parse_faults(args.faults),
        log_level=args.log_level,
        max_body_bytes=args.max_body_bytes,
    )


if __name__ == "__main__":
    main()
