"""The job engine: one state machine for every job, whatever carries the calls.

A :class:`JobEngine` takes jobs (``submit`` with an idempotency key, or
``track`` of a handle stored before a crash), keeps at most ``concurrency`` of
them at the adapter (the rest wait in its queue), sends each lane of its
:class:`~adapters.transport.Transport` one batch of submit/poll/cancel calls at a
time, and emits :class:`~adapters.base.JobEvent` records in the order things
happen. The rules are the same for every transport:

* transient errors are retried with exponential backoff and the *same* key;
  after ``max_retries`` consecutive ones the job FAILS;
* a permanent error FAILS the job at once (``permanent=True``), and so does an
  exception the adapter was not supposed to raise (an adapter bug);
* a poll or cancel of a job the adapter does not know makes it LOST;
* refused credentials (:class:`~adapters.base.AuthError`) end the job here as
  REFUSED: not an experiment outcome, the caller decides (the campaign stops);
* a job running longer than its timeout is cancelled at the adapter and ends
  TIMED_OUT; a job cancelled before the adapter accepted it ends CANCELLED;
* ``group_concurrency`` caps the jobs of one group at the adapter (a job's group
  is its fidelity: ``request.parameters["fidelity"]``, or for a tracked handle the
  ``@<fidelity>`` suffix a :class:`~adapters.routing.FidelityRouter` gave it). A
  job whose group is full waits in the queue without holding a slot, and jobs
  behind it that belong to other groups go first.

Each job moves through phases::

    WAITING (queued here, no slot) -> READY (slot held, submit due) -> SUBMITTING
        -> ACTIVE (at the adapter, poll due) <-> BUSY (poll/cancel on its way) -> DONE

The engine runs in one of two ways. With ``background=True`` (the Ray
dispatcher) a worker thread drives it and the caller reads events as they
arrive. With ``background=False`` (inline mode) :meth:`JobEngine.next_events`
drives it in the caller's thread; on a virtual :class:`~adapters.base.Clock`
(a simulated lab in a benchmark) idle time is skipped, not slept, and when the
transport knows when the adapter's state next changes (``wake_hint``) the
engine polls exactly then. Time is in the clock's seconds throughout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.base import (
    EventKind,
    ExperimentRequest,
    JobEvent,
    JobHandle,
    JobState,
    JobStatus,
    Measurement,
)
from adapters.routing import FIDELITY_PARAMETER, routed_fidelity
from adapters.transport import AdapterOp, OpKind, OpOutcome, Transport
from cloud_model.errors import CloudlabError

__all__ = [
    "DispatchConfig",
    "DispatcherClosedError",
    "DispatcherError",
    "DuplicateJobError",
    "JobEngine",
    "SystemClock",
    "job_group",
]

logger = logging.getLogger(__name__)
_MAX_WAIT_S = 0.05  # longest a background worker blocks on its transport between looks at commands


class DispatcherError(CloudlabError, RuntimeError):
    """The engine cannot go on (its adapters failed to start, or its worker crashed)."""


class DispatcherClosedError(DispatcherError):
    """``submit`` or ``track`` was called after ``shutdown``."""


class DuplicateJobError(CloudlabError, ValueError):
    """A job with this idempotency key is already outstanding in this engine."""


class DispatchConfig(BaseModel):
    """How the engine runs jobs. Times are in seconds of the engine's clock.

    Attributes:
        concurrency: jobs at the adapter at once; None = the adapter's capacity.
        job_timeout_s: per job, counted from acceptance by the adapter (or from
            :meth:`JobEngine.track`); None = no limit.
        max_retries: consecutive transient errors tolerated per job.
        backoff_base_s: first retry delay; doubles at each retry up to ``backoff_max_s``.
        poll_interval_s: between two polls of one job (0 = every round).
        ray_address: Ray cluster to join; None = a local Ray started on demand (Ray only).
        num_actors: Ray actors, each with its own adapter instance; jobs are routed
            by key, so >1 suits adapters whose jobs live outside the process.
        max_batch: adapter calls per lane round trip.
        actor_num_cpus: CPUs Ray reserves per actor (adapter calls mostly wait).
        max_actor_restarts: Ray restarts of a crashed actor (-1 = unlimited).
        start_timeout_s: for the actors to build their adapters.
        group_concurrency: group (fidelity) name -> the most jobs of that group at
            the adapter at once, within ``concurrency``; groups not named are
            limited by ``concurrency`` only.
    """

    model_config = ConfigDict(extra="forbid")

    concurrency: int | None = Field(default=None, ge=1)
    job_timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int = Field(default=5, ge=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    poll_interval_s: float = Field(default=1.0, ge=0)
    ray_address: str | None = None
    num_actors: int = Field(default=1, ge=1, le=256)
    max_batch: int = Field(default=512, ge=1)
    actor_num_cpus: float = Field(default=0.0, ge=0)
    max_actor_restarts: int = Field(default=3, ge=-1)
    start_timeout_s: float = Field(default=120.0, gt=0)
    group_concurrency: dict[str, int] = Field(default_factory=dict)

    @field_validator("group_concurrency")
    @classmethod
    def _positive_limits(cls, limits: dict[str, int]) -> dict[str, int]:
        bad = {g: n for g, n in limits.items() if n < 1}
        if bad:
            raise ValueError(f"group_concurrency {bad}: every limit must be at least 1")
        return limits


def job_group(request: ExperimentRequest | None, handle: JobHandle | None) -> str | None:
    """A job's group for ``group_concurrency``: the fidelity it is routed to, or None."""
    if request is not None:
        fidelity = request.parameters.get(FIDELITY_PARAMETER)
        return fidelity if isinstance(fidelity, str) and fidelity else None
    route = None if handle is None else routed_fidelity(handle)
    return None if route is None else route[1]


class SystemClock:
    """The wall clock: ``time.monotonic`` and real sleeps."""

    is_virtual = False

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _Phase(Enum):
    WAITING = "waiting"  # in the engine's queue, no slot
    READY = "ready"  # holds a slot; a submit is due at ``due``
    SUBMITTING = "submitting"  # a submit is on its way
    ACTIVE = "active"  # at the adapter; a poll (or cancel) is due at ``due``
    BUSY = "busy"  # a poll or cancel is on its way
    DONE = "done"


@dataclass(eq=False)
class _Job:
    key: str
    candidate_id: str
    lane: int
    request: ExperimentRequest | None
    timeout_s: float | None
    handle: JobHandle | None = None
    phase: _Phase = _Phase.WAITING
    due: float = 0.0  # clock time of the next call
    deadline: float | None = None
    failures: int = 0  # consecutive transient errors
    submit_sent: bool = False  # a submit may have reached the adapter
    cancel: str | None = None  # why it must be cancelled: "user", "timeout", "shutdown"
    cancel_sent: bool = False
    last_state: JobState | None = None
    hinted: bool = False  # the next poll waits for the transport's wake hint
    group: str | None = None  # see DispatchConfig.group_concurrency


class JobEngine:
    """Runs jobs through a transport and streams :class:`~adapters.base.JobEvent` records.

    Args:
        transport: carries the adapter calls (in process or to Ray actors).
        config: limits, retries, timeouts.
        clock: the engine's time (default: the wall clock).
        background: drive the engine from a worker thread (calls in flight while
            the caller works); False drives it inside :meth:`next_events`.
    """

    def __init__(
        self,
        transport: Transport,
        config: DispatchConfig | None = None,
        *,
        clock: Any = None,
        background: bool = False,
    ) -> None:
        self.config = config or DispatchConfig()
        self.transport = transport
        self.clock = clock if clock is not None else SystemClock()
        info = transport.info
        self.adapter_name: str = info.name
        self.capacity: int = int(info.capacity)
        self.actor_pids: list[int] = list(info.pids)
        self.concurrency: int = self.config.concurrency or self.capacity
        if self.concurrency > self.capacity:
            logger.debug(
                "concurrency %d exceeds adapter %s capacity %d: the adapter queues the rest",
                self.concurrency,
                self.adapter_name,
                self.capacity,
            )
        self._lock = threading.Lock()
        self._outstanding: set[str] = set()  # keys without a terminal event yet
        self._closed = False
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._events: queue.SimpleQueue[JobEvent] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._abandoned: list[JobHandle] = []
        # state owned by whoever drives the engine (the worker thread, or next_events)
        self._jobs: dict[str, _Job] = {}
        self._waiting: deque[_Job] = deque()
        self._slots: list[dict[str, _Job]] = [{} for _ in range(transport.lanes)]
        self._n_slotted = 0
        self._group_slotted: dict[str, int] = {}  # group -> jobs of it holding a slot
        self._calls: dict[int, dict[int, tuple[_Job, OpKind]]] = {}  # lane -> ops in flight
        self._op_seq = 0
        self._closing = False
        self._stop = False
        self._drain_deadline: float | None = None
        self._at_hint = False  # the clock reached the transport's wake hint (see _idle)
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="cloudlab-engine", daemon=True)
            self._thread.start()
        logger.debug(
            "job engine: %d lane(s) for %s, concurrency %d",
            transport.lanes,
            self.adapter_name,
            self.concurrency,
        )

    # ------------------------------------------------------------------ caller API
    def submit(
        self, request: ExperimentRequest, idempotency_key: str, *, timeout_s: float | None = None
    ) -> None:
        """Queue a job; a SUBMITTED event follows once the adapter accepted it.

        Args:
            request: what to run.
            idempotency_key: the job's key at the adapter, reused by every retry.
            timeout_s: overrides ``config.job_timeout_s`` for this job.

        Raises:
            DuplicateJobError: a job with this key is still outstanding here.
            DispatcherClosedError: after :meth:`shutdown`.
        """
        self._admit(idempotency_key)
        job = _Job(
            idempotency_key,
            request.candidate_id,
            self._lane_of(idempotency_key),
            request,
            timeout_s,
            group=job_group(request, None),
        )
        self._inbox.put(("submit", job))

    def track(self, handle: JobHandle, *, timeout_s: float | None = None) -> None:
        """Resume polling a job submitted earlier (e.g. before a crash); never resubmits it.

        The job's timeout, if any, counts from this call.
        """
        self._admit(handle.idempotency_key)
        job = _Job(
            handle.idempotency_key,
            handle.candidate_id,
            self._lane_of(handle.idempotency_key),
            None,
            timeout_s,
            group=job_group(None, handle),
        )
        job.handle, job.phase, job.submit_sent = handle, _Phase.ACTIVE, True
        self._inbox.put(("track", job))

    def cancel(self, idempotency_key: str) -> bool:
        """Ask for a job to be cancelled (at the adapter if it got there).

        Returns:
            True if the job was outstanding: a terminal event follows (CANCELLED,
            or SUCCEEDED/FAILED if it ended first). False if unknown or ended.
        """
        with self._lock:
            known = idempotency_key in self._outstanding
        if known:
            self._inbox.put(("cancel", idempotency_key, "user"))
        return known

    def next_events(self, timeout: float | None = None, max_events: int = 4096) -> list[JobEvent]:
        """Events that happened since the last call, oldest first.

        Blocks until at least one event is there, ``timeout`` seconds pass (wall
        clocks only: a virtual clock has no reason to give up), or no job is
        outstanding (then returns ``[]``).

        Raises:
            DispatcherError: the worker thread crashed.
        """
        if self._thread is None:
            self._pump(timeout)
            return self._drain(max_events)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = (
                _MAX_WAIT_S * 4
                if end is None
                else max(0.0, min(end - time.monotonic(), _MAX_WAIT_S * 4))
            )
            try:
                events = [self._events.get(timeout=wait) if wait > 0 else self._events.get_nowait()]
                break
            except queue.Empty:
                self._raise_if_failed()
                if self.outstanding() == 0 and self._events.empty():
                    return []
                if end is not None and time.monotonic() >= end:
                    return []
        return events + self._drain(max_events - 1)

    def events(self) -> Iterator[JobEvent]:
        """Yield events as they happen until no job is outstanding."""
        while batch := self.next_events():
            yield from batch

    def in_flight(self) -> int:
        """Jobs holding a slot at the adapter (submitted or being submitted, not ended)."""
        return self._n_slotted

    def outstanding(self) -> int:
        """Jobs submitted or tracked here whose terminal event has not been emitted."""
        with self._lock:
            return len(self._outstanding)

    def shutdown(
        self, graceful: bool = True, cancel_in_flight: bool = False, timeout_s: float | None = None
    ) -> list[JobHandle]:
        """Stop: jobs still in the engine's queue are CANCELLED (they never reached the adapter).

        Args:
            graceful: wait for the jobs at the adapter to end (their events are
                delivered) before closing the transport; False leaves them running.
            cancel_in_flight: with ``graceful``, cancel the jobs at the adapter first.
            timeout_s: the longest a graceful shutdown waits (None = no limit).

        Returns:
            Handles of jobs left running at the adapter; :meth:`track` resumes them.
            Events emitted before or during shutdown stay readable.
        """
        with self._lock:
            if self._closed:
                return list(self._abandoned)
            self._closed = True
        self._inbox.put(("shutdown", graceful, cancel_in_flight, timeout_s))
        if self._thread is not None:
            self._thread.join()
        else:
            self._run()
        self.transport.close()
        return list(self._abandoned)

    def __enter__(self) -> JobEngine:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.shutdown(graceful=exc_type is None)

    # ------------------------------------------------------------------ caller-side helpers
    def _admit(self, key: str) -> None:
        with self._lock:
            if self._closed:
                raise DispatcherClosedError("the job engine was shut down; create a new one")
            if self._failure is not None:
                raise DispatcherError(f"job engine worker crashed: {self._failure!r}")
            if key in self._outstanding:
                raise DuplicateJobError(
                    f"a job with idempotency key {key!r} is already outstanding"
                )
            self._outstanding.add(key)

    def _lane_of(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.transport.lanes

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise DispatcherError(
                f"job engine worker crashed: {self._failure!r}"
            ) from self._failure

    def _drain(self, max_events: int) -> list[JobEvent]:
        out: list[JobEvent] = []
        while len(out) < max_events:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                break
        return out

    # ------------------------------------------------------------------ driving
    def _run(self) -> None:
        """Drive the engine until it stops (the worker thread, or a foreground shutdown)."""
        try:
            while True:
                self._take_commands(block=self._thread is not None and not self._calls)
                if self._finished():
                    break
                self._step()
                if self._thread is None and not self._calls and not self._finished():
                    self._idle(None)
        except BaseException as exc:  # surfaced to the caller by next_events()
            self._failure = exc
            logger.exception("job engine worker crashed")
            if self._thread is None:
                raise
        finally:
            self._abandon()

    def _pump(self, timeout: float | None) -> None:
        """Foreground driving: run rounds until an event is emitted, time is up, or all is idle."""
        self._raise_if_failed()
        end = None if timeout is None or self.clock.is_virtual else self.clock.monotonic() + timeout
        stalled = 0  # rounds on a virtual clock in which neither time nor any job moved
        while self._events.empty():
            self._take_commands(block=False)
            if not self._jobs:
                return
            before = (self.clock.monotonic(), self._op_seq)
            self._step()
            if not self._events.empty() or self._calls:
                continue
            if end is not None and self.clock.monotonic() >= end:
                return
            self._idle(end)
            stalled = stalled + 1 if (self.clock.monotonic(), self._op_seq) == before else 0
            if stalled > 1000:
                raise DispatcherError(
                    f"the job engine made no progress on its virtual clock at t={before[0]!r} "
                    f"with {len(self._jobs)} job(s) outstanding (a clock that cannot reach its "
                    "deadline)"
                )

    def _step(self) -> None:
        now = self.clock.monotonic()
        self._fill_slots(now)
        self._send(now)
        if self._calls:
            wait = (
                0.0 if self._thread is None else max(0.0, min(self._next_due() - now, _MAX_WAIT_S))
            )
            self._collect(wait)

    def _idle(self, end: float | None) -> None:
        hint = self.transport.wake_hint()
        due = self._next_due()
        if end is not None:
            due = min(due, end)
        self.clock.sleep_until(due)
        # woken at the adapter's announced change: the jobs waiting for it are due now (the
        # hint itself has moved on to the change after this one)
        self._at_hint = hint is not None and due >= hint

    def _finished(self) -> bool:
        now = self.clock.monotonic()
        return self._stop or (
            self._closing
            and (
                self._n_slotted == 0
                or (self._drain_deadline is not None and now >= self._drain_deadline)
            )
        )

    def _abandon(self) -> None:
        self._abandoned = [job.handle for job in self._jobs.values() if job.handle is not None]
        unsure = [job.key for job in self._jobs.values() if job.handle is None and job.submit_sent]
        if unsure:
            logger.warning(
                "left %d job(s) whose submit was not confirmed: %s", len(unsure), unsure[:10]
            )
        if self._closing or self._failure is not None:
            with self._lock:
                self._outstanding.clear()

    def _take_commands(self, block: bool) -> None:
        timeout = self._next_due() - self.clock.monotonic() if block else 0.0
        try:
            command = (
                self._inbox.get(timeout=min(max(timeout, 0.0), 1.0))
                if timeout > 0
                else self._inbox.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            self._apply_command(command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply_command(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "submit":
            job = command[1]
            self._jobs[job.key] = job
            self._waiting.append(job)
        elif kind == "track":
            job = command[1]
            self._jobs[job.key] = job
            self._take_slot(job)
            job.due = self.clock.monotonic()
            timeout = job.timeout_s or self.config.job_timeout_s
            job.deadline = None if timeout is None else job.due + timeout
        elif kind == "cancel":
            if (job := self._jobs.get(command[1])) is not None:
                self._request_cancel(job, command[2])
        elif kind == "shutdown":
            _, graceful, cancel_in_flight, timeout_s = command
            self._closing = True
            self._stop = not graceful
            now = self.clock.monotonic()
            self._drain_deadline = None if timeout_s is None else now + timeout_s
            for job in list(self._jobs.values()):
                if job.phase in (_Phase.WAITING, _Phase.READY) and not job.submit_sent:
                    self._finish(job, EventKind.CANCELLED, message="shut down before submission")
                elif cancel_in_flight:
                    self._request_cancel(job, "shutdown")

    def _request_cancel(self, job: _Job, reason: str) -> None:
        job.cancel = job.cancel or reason
        if job.phase in (_Phase.WAITING, _Phase.READY):
            note = (
                ""
                if not job.submit_sent
                else "; a failed submit may have left a job at the adapter under this key"
            )
            self._finish(
                job, EventKind.CANCELLED, message=f"cancelled before the adapter accepted it{note}"
            )
        elif job.phase is _Phase.ACTIVE:
            job.due, job.hinted = self.clock.monotonic(), False

    def _due(self, job: _Job, hint: float | None) -> float:
        if job.hinted and hint is not None:
            return self.clock.monotonic() if self._at_hint else hint
        return job.due

    def _next_due(self) -> float:
        """When the next call falls due on an idle lane (at most 1 s ahead on a wall clock)."""
        now = self.clock.monotonic()
        if self._can_fill():
            return now  # a free slot to fill
        due = (
            float("inf") if self.clock.is_virtual else now + (_MAX_WAIT_S if self._closing else 1.0)
        )
        hint = self.transport.wake_hint()
        for lane, slots in enumerate(self._slots):
            if lane in self._calls:
                continue
            for job in slots.values():
                if job.phase in (_Phase.READY, _Phase.ACTIVE):
                    due = min(due, self._due(job, hint))
                    if (
                        job.phase is _Phase.ACTIVE
                        and job.cancel is None
                        and job.deadline is not None
                    ):
                        due = min(due, job.deadline)
        if due == float("inf"):  # nothing scheduled on a virtual clock: move on by one interval
            due = now + max(self.config.poll_interval_s, 1e-3)
        return max(due, now)

    def _group_full(self, job: _Job) -> bool:
        limit = None if job.group is None else self.config.group_concurrency.get(job.group)
        return limit is not None and self._group_slotted.get(job.group or "", 0) >= limit

    def _can_fill(self) -> bool:
        """A waiting job could take a slot now."""
        if not self._waiting or self._n_slotted >= self.concurrency or self._closing:
            return False
        if not self.config.group_concurrency:
            return True
        return any(j.phase is _Phase.WAITING and not self._group_full(j) for j in self._waiting)

    def _take_slot(self, job: _Job) -> None:
        self._slots[job.lane][job.key] = job
        self._n_slotted += 1
        if job.group is not None:
            self._group_slotted[job.group] = self._group_slotted.get(job.group, 0) + 1

    def _fill_slots(self, now: float) -> None:
        if self._closing:
            return
        held: deque[_Job] = deque()  # their group is full: they keep their place in the queue
        while self._waiting and self._n_slotted < self.concurrency:
            job = self._waiting.popleft()
            if job.phase is not _Phase.WAITING:
                continue
            if self._group_full(job):
                held.append(job)
                continue
            job.phase, job.due = _Phase.READY, now
            self._take_slot(job)
        if held:
            held.extend(self._waiting)
            self._waiting = held

    def _send(self, now: float) -> None:
        hint = self.transport.wake_hint()
        for lane, slots in enumerate(self._slots):
            if lane in self._calls:
                continue
            ops: dict[int, tuple[_Job, OpKind]] = {}
            wire: list[AdapterOp] = []
            for job in slots.values():
                if len(wire) >= self.config.max_batch:
                    break
                if (
                    job.phase is _Phase.ACTIVE
                    and job.cancel is None
                    and job.deadline is not None
                    and job.deadline <= now
                ):
                    job.cancel, job.due, job.hinted = "timeout", now, False
                if self._due(job, hint) > now or job.phase not in (_Phase.READY, _Phase.ACTIVE):
                    continue
                self._op_seq += 1
                if job.phase is _Phase.READY:
                    kind, job.phase, job.submit_sent = OpKind.SUBMIT, _Phase.SUBMITTING, True
                else:
                    kind, job.phase = (
                        (OpKind.CANCEL if job.cancel and not job.cancel_sent else OpKind.POLL),
                        _Phase.BUSY,
                    )
                ops[self._op_seq] = (job, kind)
                wire.append(
                    AdapterOp(
                        op_id=self._op_seq,
                        kind=kind,
                        idempotency_key=job.key,
                        request=job.request if kind is OpKind.SUBMIT else None,
                        handle=job.handle,
                    )
                )
            if wire:
                self._calls[lane] = ops
                self.transport.send(lane, wire)
        self._at_hint = False

    def _collect(self, wait: float) -> None:
        for lane, outcomes in self.transport.collect(wait):
            ops = self._calls.pop(lane)
            for outcome in outcomes:
                job, kind = ops[outcome.op_id]
                if job.phase is not _Phase.DONE:
                    self._apply_outcome(job, kind, outcome)

    def _schedule_poll(self, job: _Job, now: float) -> None:
        job.phase = _Phase.ACTIVE
        if job.cancel and not job.cancel_sent:
            job.due, job.hinted = now, False
        else:
            job.due = now + self.config.poll_interval_s
            job.hinted = self.transport.wake_hint() is not None

    def _apply_outcome(self, job: _Job, kind: OpKind, outcome: OpOutcome) -> None:
        now = self.clock.monotonic()
        cfg = self.config
        if outcome.error_kind is None:
            job.failures = 0
            if kind is OpKind.SUBMIT and outcome.handle is not None:
                job.handle = outcome.handle
                timeout = job.timeout_s or cfg.job_timeout_s
                job.deadline = None if timeout is None else now + timeout
                self._schedule_poll(job, now)
                self._emit(job, EventKind.SUBMITTED)
                return
            status = outcome.status
            if status is None:
                raise DispatcherError(f"adapter returned no status for {kind} of {job.key}")
            job.cancel_sent = job.cancel_sent or kind is OpKind.CANCEL
            if status.state.is_terminal:
                self._finish_with_status(job, status, outcome.measurement)
                return
            if status.state is not job.last_state:
                job.last_state = status.state
                self._emit(job, EventKind.STATE, status=status)
            self._schedule_poll(job, now)
            return
        what = f"{kind} of {job.key!r} at {self.adapter_name}: {outcome.error}"
        if outcome.error_kind == "transient":
            job.failures += 1
            job.hinted = False
            if kind is OpKind.SUBMIT and job.cancel is not None:  # cancelled: do not resubmit
                job.phase = _Phase.READY
                self._request_cancel(job, job.cancel)
            elif job.failures <= cfg.max_retries:
                delay = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (job.failures - 1))
                job.phase = _Phase.READY if kind is OpKind.SUBMIT else _Phase.ACTIVE
                job.due = now + delay
                self._emit(
                    job,
                    EventKind.RETRYING,
                    message=f"{what}; retry {job.failures}/{cfg.max_retries} in {delay:.2f} s",
                    attempt=job.failures,
                )
            else:
                self._finish(
                    job,
                    self._ending_kind(job, EventKind.FAILED),
                    message=f"gave up after {job.failures} transient errors: {what}",
                    attempt=job.failures,  # > 0 on a FAILED event: retries ran out
                )
        elif outcome.error_kind == "not_found" and kind is not OpKind.SUBMIT:
            self._finish(job, EventKind.LOST, message=what)
        elif outcome.error_kind == "refused":
            self._finish(job, EventKind.REFUSED, message=what)
        else:
            self._finish(
                job, self._ending_kind(job, EventKind.FAILED), message=what, permanent=True
            )

    def _ending_kind(self, job: _Job, default: EventKind) -> EventKind:
        if job.cancel is None:
            return default
        return EventKind.TIMED_OUT if job.cancel == "timeout" else EventKind.CANCELLED

    def _finish_with_status(
        self, job: _Job, status: JobStatus, measurement: Measurement | None
    ) -> None:
        if status.state is JobState.SUCCEEDED and measurement is not None:
            self._finish(job, EventKind.SUCCEEDED, status=status, measurement=measurement)
        elif status.state is JobState.CANCELLED:
            self._finish(
                job,
                self._ending_kind(job, EventKind.CANCELLED),
                status=status,
                message=status.message,
            )
        elif status.state is JobState.LOST:
            self._finish(job, EventKind.LOST, status=status, message=status.message)
        else:
            self._finish(
                job,
                EventKind.FAILED,
                status=status,
                message=status.message or f"job ended {status.state}",
            )

    def _finish(self, job: _Job, kind: EventKind, **fields: Any) -> None:
        job.phase = _Phase.DONE
        self._jobs.pop(job.key, None)
        if self._slots[job.lane].pop(job.key, None) is not None:
            self._n_slotted -= 1
            if job.group is not None:
                self._group_slotted[job.group] -= 1
        self._emit(job, kind, **fields)

    def _emit(self, job: _Job, kind: EventKind, **fields: Any) -> None:
        self._events.put(
            JobEvent(
                kind=kind,
                idempotency_key=job.key,
                candidate_id=job.candidate_id,
                handle=job.handle,
                **fields,
            )
        )
        if kind.is_terminal:
            with self._lock:
                self._outstanding.discard(job.key)
