"""Test-only fault injection for the lab server: a fixed schedule of bad answers.

Enabled only when a schedule is given (``--faults`` or ``$CLOUDLAB_LAB_FAULTS``);
each request under ``/v1/jobs`` takes the next entry, requests after the end of
the schedule are served normally, and ``/v1/health`` is never touched. Entries,
comma-separated, each optionally repeated with ``*N``:

* ``ok``: serve normally;
* ``500`` / ``502`` / ``503`` / ``504`` (any 4xx/5xx code): answer that status
  without touching the lab;
* ``delay:S``: wait S seconds, then serve (the client has usually timed out;
  a POST still creates its job, as a slow real server would);
* ``drop``: serve, then send the headers and half the body and close the
  connection (the lab did the work, the answer is lost);
* ``malformed``: serve, but answer truncated JSON;
* ``invalid``: serve, but answer valid JSON that does not fit the schema.

Example: ``CLOUDLAB_LAB_FAULTS="503*3,ok,drop,malformed,invalid,delay:2"``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cloud_model.errors import ConfigError

__all__ = ["FAULTS_ENV", "Fault", "FaultInjector", "parse_faults"]

logger = logging.getLogger(__name__)

FAULTS_ENV = "CLOUDLAB_LAB_FAULTS"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled answer."""

    kind: Literal["ok", "status", "delay", "drop", "malformed", "invalid"]
    status: int = 0
    delay_s: float = 0.0


def parse_faults(spec: str) -> list[Fault]:
    """Parse a schedule such as ``"503*3,ok,drop,delay:1.5"`` (see the module docstring).

    Raises:
        ConfigError: an entry is not understood.
    """
    out: list[Fault] = []
    for raw in filter(None, (part.strip() for part in spec.split(","))):
        entry, _, times = raw.partition("*")
        try:
            count = int(times) if times else 1
            if entry in ("ok", "drop", "malformed", "invalid"):
                fault = Fault(kind=entry)  # type: ignore[arg-type]
            elif entry.startswith("delay:"):
                fault = Fault(kind="delay", delay_s=float(entry.removeprefix("delay:")))
            elif entry.isdigit() and 400 <= int(entry) <= 599:
                fault = Fault(kind="status", status=int(entry))
            else:
                raise ValueError(entry)
        except ValueError as exc:
            raise ConfigError(
                f"fault schedule entry {raw!r} not understood; use ok, drop, malformed, invalid, "
                "delay:SECONDS or an HTTP status 400-599, each optionally followed by *N"
            ) from exc
        out.extend([fault] * count)
    return out


class _InjectedDrop(ConnectionAbortedError):
    """Raised after a partial answer so that the server closes the connection."""


class FaultInjector:
    """ASGI middleware answering requests under ``prefix`` according to ``schedule``."""

    def __init__(self, app: ASGIApp, schedule: Sequence[Fault], prefix: str = "/v1/jobs") -> None:
        self.app = app
        self.prefix = prefix
        self._schedule = list(schedule)
        self._next = 0
        self._lock = threading.Lock()

    def _take(self) -> Fault:
        with self._lock:
            if self._next >= len(self._schedule):
                return Fault(kind="ok")
            self._next += 1
            return self._schedule[self._next - 1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        fault = self._take()
        if fault.kind != "ok":
            logger.warning("injecting fault %s into %s %s", fault, scope["method"], scope["path"])
        if fault.kind == "ok":
            await self.app(scope, receive, send)
        elif fault.kind == "status":
            code = "unavailable" if fault.status in (502, 503, 504) else "internal_error"
            body = json.dumps(
                {"code": code, "message": f"injected fault: HTTP {fault.status}"}
            ).encode()
            await _send_body(send, fault.status, [(b"content-type", b"application/json")], body)
        elif fault.kind == "delay":
            await asyncio.sleep(fault.delay_s)
            await self.app(scope, receive, send)
        else:
            status, headers, body = await _capture(self.app, scope, receive)
            if fault.kind == "drop":
                headers.append((b"content-length", str(len(body)).encode()))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send(
                    {
                        "type": "http.response.body",
                        "body": body[: len(body) // 2],
                        "more_body": True,
                    }
                )
                raise _InjectedDrop("injected fault: connection dropped mid-answer")
            bad = (
                body[: len(body) // 2] if fault.kind == "malformed" else b'{"unexpected": "schema"}'
            )
            await _send_body(send, status, headers, bad)


async def _capture(
    app: ASGIApp, scope: Scope, receive: Receive
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run ``app`` and return its answer (status, headers without content-length, body)."""
    messages: list[Message] = []

    async def keep(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, keep)
    start = next(m for m in messages if m["type"] == "http.response.start")
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return int(start["status"]), headers, body


async def _send_body(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
