"""How the job engine reaches adapters: batches of calls over a transport.

The engine (:mod:`adapters.engine`) never calls an adapter directly. It sends
*batches* of :class:`AdapterOp` (submit / poll / cancel) to a *lane* of a
:class:`Transport` and later collects one :class:`OpOutcome` per op. A lane is one
adapter instance that runs one batch at a time (the adapter contract's "one
thread at a time"); jobs are routed to lanes by key, so a retried submit or a
poll always reaches the instance that holds the job.

Two transports implement the protocol:

* :class:`InProcessTransport` (here): one adapter in this process; ``send`` runs
  the batch at once. Benchmarks and tests drive it on a simulated lab's virtual
  clock; it may tell the engine when the adapter's state next changes
  (``wake_hint``), so the engine polls exactly then instead of every interval.
* :class:`adapters.dispatch.RayTransport`: adapters in Ray actors, calls in flight
  while the engine goes on.

:func:`run_op` is the one place that maps adapter exceptions to outcomes: both
transports use it, so an adapter behaves the same whichever runs it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, TypeAdapter

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
    TransientAdapterError,
)

__all__ = [
    "AdapterInfo",
    "AdapterOp",
    "ErrorKind",
    "InProcessTransport",
    "OpKind",
    "OpOutcome",
    "Transport",
    "decode_ops",
    "decode_outcomes",
    "encode_ops",
    "encode_outcomes",
    "run_op",
]

logger = logging.getLogger(__name__)


class OpKind(StrEnum):
    """An adapter call the engine can ask a lane to make."""

    SUBMIT = "submit"
    POLL = "poll"  # poll, then result() when SUCCEEDED
    CANCEL = "cancel"  # cancel, then result() when the job had SUCCEEDED anyway


class AdapterOp(BaseModel):
    """One adapter call of a batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op_id: int
    kind: OpKind
    idempotency_key: str
    request: ExperimentRequest | None = None  # SUBMIT
    handle: JobHandle | None = None  # POLL, CANCEL


ErrorKind = Literal["transient", "permanent", "not_found", "refused"]


class OpOutcome(BaseModel):
    """What one adapter call returned or raised."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op_id: int
    handle: JobHandle | None = None
    status: JobStatus | None = None
    measurement: Measurement | None = None
    error_kind: ErrorKind | None = None
    error: str | None = None


class AdapterInfo(BaseModel):
    """What a transport tells the engine about the adapters behind it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    capacity: int
    pids: tuple[int, ...] = ()


_OPS: TypeAdapter[list[AdapterOp]] = TypeAdapter(list[AdapterOp])
_OUTCOMES: TypeAdapter[list[OpOutcome]] = TypeAdapter(list[OpOutcome])


def encode_ops(ops: list[AdapterOp]) -> bytes:
    return _OPS.dump_json(ops, exclude_defaults=True)


def decode_ops(payload: bytes) -> list[AdapterOp]:
    return _OPS.validate_json(payload)


def encode_outcomes(outcomes: list[OpOutcome]) -> bytes:
    return _OUTCOMES.dump_json(outcomes, exclude_defaults=True)


def decode_outcomes(payload: bytes) -> list[OpOutcome]:
    return _OUTCOMES.validate_json(payload)


def run_op(adapter: LabAdapter, op: AdapterOp) -> OpOutcome:
    """Make one adapter call and turn what it returned or raised into an outcome.

    Transient errors (retry with the same key), an unknown job (``not_found``:
    the engine reports the job LOST), refused credentials (``refused``: not an
    experiment failure) and permanent errors are told apart; any
    other exception is an adapter bug and becomes a permanent error of this op
    only, so it cannot take the other ops of the batch down.
    """
    try:
        if op.kind is OpKind.SUBMIT:
            if op.request is None:
                raise PermanentAdapterError(f"submit op {op.op_id} has no request")
            return OpOutcome(op_id=op.op_id, handle=adapter.submit(op.request, op.idempotency_key))
        if op.handle is None:
            raise PermanentAdapterError(f"{op.kind} op {op.op_id} has no handle")
        status = adapter.poll(op.handle) if op.kind is OpKind.POLL else adapter.cancel(op.handle)
        measurement = adapter.result(op.handle) if status.state is JobState.SUCCEEDED else None
        return OpOutcome(op_id=op.op_id, status=status, measurement=measurement)
    except TransientAdapterError as exc:
        return OpOutcome(op_id=op.op_id, error_kind="transient", error=str(exc))
    except JobNotFoundError as exc:
        return OpOutcome(op_id=op.op_id, error_kind="not_found", error=str(exc))
    except AuthError as exc:  # credentials, not the experiment: the engine reports REFUSED
        return OpOutcome(op_id=op.op_id, error_kind="refused", error=str(exc))
    except PermanentAdapterError as exc:
        return OpOutcome(op_id=op.op_id, error_kind="permanent", error=str(exc))
    except Exception as exc:  # an adapter bug: recorded as this job's permanent failure
        logger.exception("adapter %s raised on %s %s", adapter.name, op.kind, op.idempotency_key)
        return OpOutcome(
            op_id=op.op_id, error_kind="permanent", error=f"{type(exc).__name__}: {exc}"
        )


class Transport(Protocol):
    """Carries batches of adapter calls to ``lanes`` adapter instances.

    A lane is busy from :meth:`send` until :meth:`collect` has returned its
    outcomes; the engine never sends to a busy lane.
    """

    @property
    def lanes(self) -> int:
        """Number of independent adapter instances."""
        ...

    @property
    def info(self) -> AdapterInfo:
        """Name and capacity of the adapter."""
        ...

    def send(self, lane: int, ops: list[AdapterOp]) -> None:
        """Start running ``ops`` on ``lane`` (in order)."""
        ...

    def collect(self, timeout: float) -> list[tuple[int, list[OpOutcome]]]:
        """Finished batches as ``(lane, outcomes)``; waits up to ``timeout`` s for the first."""
        ...

    def wake_hint(self) -> float | None:
        """Engine-clock time at which the adapter's jobs next change state, if known."""
        ...

    def close(self) -> None:
        """Close the adapters and release the lanes. Idempotent."""
        ...


class InProcessTransport:
    """One adapter in this process: a batch runs the moment it is sent.

    Args:
        adapter: the adapter, built in this process.
        wake_hint: returns the engine-clock time at which the adapter's state next
            changes (a simulated lab's next completion), or None when unknown.
    """

    def __init__(
        self, adapter: LabAdapter, *, wake_hint: Callable[[], float | None] | None = None
    ) -> None:
        self.adapter = adapter
        self._wake_hint = wake_hint
        self._done: deque[tuple[int, list[OpOutcome]]] = deque()
        self._closed = False

    @property
    def lanes(self) -> int:
        return 1

    @property
    def info(self) -> AdapterInfo:
        return AdapterInfo(
            name=self.adapter.name, capacity=self.adapter.capacity, pids=(os.getpid(),)
        )

    def send(self, lane: int, ops: list[AdapterOp]) -> None:
        self._done.append((lane, [run_op(self.adapter, op) for op in ops]))

    def collect(self, timeout: float) -> list[tuple[int, list[OpOutcome]]]:
        out = list(self._done)
        self._done.clear()
        return out

    def wake_hint(self) -> float | None:
        return None if self._wake_hint is None else self._wake_hint()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.adapter.close()
