"""Run adapter calls in Ray actors: concurrency limit, timeouts, retries, streaming results.

A :class:`Dispatcher` owns Ray actors that each host an adapter built *inside*
the actor from an adapter factory (see :mod:`adapters.ray_runtime`). The caller
submits requests with idempotency keys and reads :class:`DispatchEvent` records
as they happen::

    spec = AdapterSpec(factory="simulators.lab:SimulatedLab",
                       kwargs={"truth": truth, "units": {"band_gap": "eV"}, "config": {"capacity": 8}})
    with Dispatcher(spec, DispatchConfig(job_timeout_s=3600)) as dispatcher:
        dispatcher.submit(request, idempotency_key="campaign-1/job-7")
        for event in dispatcher.events():  # as they happen, until no job is outstanding
            store.record(event)  # SUBMITTED carries the JobHandle, SUCCEEDED the Measurement

After a crash, :meth:`Dispatcher.track` resumes polling jobs whose handle was
stored (no resubmission); a job stored without a handle is submitted again with
its key, which the adapter contract makes safe. With ``ray_address`` set, the
actors may run on other machines, which then need cloudlab installed.

A background thread runs the state machine: it keeps at most ``concurrency``
jobs at the adapter (the rest wait in the dispatcher's queue), sends each actor
one *batch* of submit/poll/cancel calls per round trip, retries transient errors
(:class:`~adapters.base.TransientAdapterError`, a dead Ray actor) with
exponential backoff and the same idempotency key, cancels jobs that exceed their
timeout at the adapter, and emits events in the order they happen. A job is
routed to an actor by a hash of its key, so a retried submit or a poll always
reaches the adapter instance that holds the job.
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
from datetime import datetime
from enum import Enum, StrEnum
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from adapters.base import ExperimentRequest, JobHandle, JobState, JobStatus, Measurement, utcnow
from adapters.ray_runtime import (
    AdapterFactory,
    AdapterHost,
    AdapterOp,
    OpKind,
    OpOutcome,
    decode_outcomes,
    encode_ops,
    ensure_ray,
)
from cloud_model.errors import CloudlabError

__all__ = [
    "DispatchConfig",
    "DispatchEvent",
    "Dispatcher",
    "DispatcherClosedError",
    "DispatcherError",
    "DuplicateJobError",
    "EventKind",
]

logger = logging.getLogger(__name__)
_RemoteHost = ray.remote(AdapterHost)
_MAX_WAIT_S = 0.05  # longest the worker blocks on Ray before looking at new commands


class DispatcherError(CloudlabError, RuntimeError):
    """The dispatcher cannot go on (its actors failed to start, or its worker thread crashed)."""


class DispatcherClosedError(DispatcherError):
    """``submit`` or ``track`` was called after ``shutdown``."""


class DuplicateJobError(CloudlabError, ValueError):
    """A job with this idempotency key is already outstanding in this dispatcher."""


class DispatchConfig(BaseModel):
    """How the dispatcher runs jobs. Times are in seconds.

    Attributes:
        concurrency: jobs at the adapter at once; None = the adapter's capacity.
        job_timeout_s: per job, counted from acceptance by the adapter (or from
            :meth:`Dispatcher.track`); None = no limit.
        max_retries: consecutive transient errors tolerated per job.
        backoff_base_s: first retry delay; doubles at each retry up to ``backoff_max_s``.
        poll_interval_s: between two polls of one job (0 = every round trip).
        ray_address: Ray cluster to join; None = a local Ray started on demand.
        num_actors: actors, each with its own adapter instance; jobs are routed
            by key, so >1 suits adapters whose jobs live outside the process.
        max_batch: adapter calls per actor round trip.
        actor_num_cpus: CPUs Ray reserves per actor (adapter calls mostly wait).
        max_actor_restarts: Ray restarts of a crashed actor (-1 = unlimited).
        start_timeout_s: for the actors to build their adapters.
    """

    model_config = ConfigDict(extra="forbid")

    concurrency: int | None = Field(default=None, ge=1)
    job_timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int = Field(default=5, ge=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    poll_interval_s: float = Field(default=1.0, ge=0)
    ray_address: str | None = None
    num_actors: int = Field(default=1, ge=1)
    max_batch: int = Field(default=512, ge=1)
    actor_num_cpus: float = Field(default=0.0, ge=0)
    max_actor_restarts: int = Field(default=3, ge=-1)
    start_timeout_s: float = Field(default=120.0, gt=0)


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

    @property
    def is_terminal(self) -> bool:
        return self not in (EventKind.SUBMITTED, EventKind.STATE, EventKind.RETRYING)


class DispatchEvent(BaseModel):
    """One thing that happened to one job; round-trips through JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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


class _Phase(Enum):
    WAITING = "waiting"  # in the dispatcher's queue, no slot
    READY = "ready"  # holds a slot; a submit is due at ``due``
    SUBMITTING = "submitting"  # a submit is on its way
    ACTIVE = "active"  # at the adapter; a poll (or cancel) is due at ``due``
    BUSY = "busy"  # a poll or cancel is on its way
    DONE = "done"


@dataclass(eq=False)
class _Job:
    key: str
    candidate_id: str
    actor: int
    request: ExperimentRequest | None
    timeout_s: float | None
    handle: JobHandle | None = None
    phase: _Phase = _Phase.WAITING
    due: float = 0.0  # time.monotonic() of the next call
    deadline: float | None = None
    failures: int = 0  # consecutive transient errors
    submit_sent: bool = False  # a submit may have reached the adapter
    cancel: str | None = None  # why it must be cancelled: "user", "timeout", "shutdown"
    cancel_sent: bool = False
    last_state: JobState | None = None


class Dispatcher:
    """Runs adapter calls in Ray actors and streams :class:`DispatchEvent` records.

    Args:
        factory: builds the adapter inside each actor (a picklable zero-argument
            callable or an :class:`~adapters.ray_runtime.AdapterSpec`).
        config: limits, retries, timeouts and Ray settings.

    Raises:
        DispatcherError: the actors could not build their adapters.
        RayRuntimeError: Ray could not be started or joined.
    """

    def __init__(self, factory: AdapterFactory, config: DispatchConfig | None = None) -> None:
        self.config = config or DispatchConfig()
        ensure_ray(self.config.ray_address)
        host = _RemoteHost.options(
            num_cpus=self.config.actor_num_cpus,
            max_restarts=self.config.max_actor_restarts,
            max_task_retries=0,
        )
        self._actors: list[Any] = [host.remote(factory) for _ in range(self.config.num_actors)]
        try:
            infos = ray.get(
                [a.describe.remote() for a in self._actors], timeout=self.config.start_timeout_s
            )
        except (RayError, GetTimeoutError) as exc:
            self._kill_actors()
            raise DispatcherError(f"adapter actors failed to start: {exc}") from exc
        self.adapter_name: str = infos[0]["name"]
        self.capacity: int = int(infos[0]["capacity"])
        self.actor_pids: list[int] = [int(info["pid"]) for info in infos]
        self.concurrency: int = self.config.concurrency or self.capacity
        if self.concurrency > self.capacity:
            logger.warning(
                "concurrency %d exceeds adapter %s capacity %d",
                self.concurrency,
                self.adapter_name,
                self.capacity,
            )

        self._lock = threading.Lock()
        self._outstanding: set[str] = set()  # keys without a terminal event yet
        self._closed = False
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._events: queue.SimpleQueue[DispatchEvent] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._abandoned: list[JobHandle] = []
        # state owned by the worker thread
        self._jobs: dict[str, _Job] = {}
        self._waiting: deque[_Job] = deque()
        self._slots: list[dict[str, _Job]] = [{} for _ in self._actors]
        self._n_slotted = 0
        self._calls: dict[Any, tuple[int, dict[int, tuple[_Job, OpKind]]]] = {}
        self._op_seq = 0
        self._closing = False
        self._stop = False
        self._drain_deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="cloudlab-dispatcher", daemon=True)
        self._thread.start()
        logger.info(
            "dispatcher: %d actor(s) for %s, concurrency %d",
            len(self._actors),
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
            self._actor_of(idempotency_key),
            request,
            timeout_s,
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
            self._actor_of(handle.idempotency_key),
            None,
            timeout_s,
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

    def next_events(
        self, timeout: float | None = None, max_events: int = 4096
    ) -> list[DispatchEvent]:
        """Events that happened since the last call, oldest first.

        Blocks until at least one event is there, ``timeout`` seconds pass, or no
        job is outstanding (then returns ``[]``).

        Raises:
            DispatcherError: the worker thread crashed.
        """
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
                if self._failure is not None:
                    raise DispatcherError(
                        f"dispatcher worker crashed: {self._failure!r}"
                    ) from self._failure
                if self.outstanding() == 0 and self._events.empty():
                    return []
                if end is not None and time.monotonic() >= end:
                    return []
        while len(events) < max_events:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return events

    def events(self) -> Iterator[DispatchEvent]:
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
        """Stop: jobs still in the dispatcher's queue are CANCELLED (they never reached the adapter).

        Args:
            graceful: wait for the jobs at the adapter to end (their events are
                delivered) before killing the actors; False leaves them running.
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
        self._thread.join()
        self._kill_actors()
        return list(self._abandoned)

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.shutdown(graceful=exc_type is None)

    # ------------------------------------------------------------------ helpers (caller side)
    def _admit(self, key: str) -> None:
        with self._lock:
            if self._closed:
                raise DispatcherClosedError("the dispatcher was shut down; create a new one")
            if self._failure is not None:
                raise DispatcherError(f"dispatcher worker crashed: {self._failure!r}")
            if key in self._outstanding:
                raise DuplicateJobError(
                    f"a job with idempotency key {key!r} is already outstanding"
                )
            self._outstanding.add(key)

    def _actor_of(self, key: str) -> int:
        return zlib.crc32(key.encode()) % len(self._actors)

    def _kill_actors(self) -> None:
        closing = [a.close.remote() for a in self._actors]
        try:
            ray.get(closing, timeout=10)
        except (RayError, GetTimeoutError) as exc:
            logger.warning("closing the adapters failed: %s", exc)
        for actor in self._actors:
            ray.kill(actor)

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        try:
            while True:
                self._take_commands(block=not self._calls)
                now = time.monotonic()
                if self._stop or (
                    self._closing and (self._n_slotted == 0 or self._drain_expired(now))
                ):
                    break
                self._fill_slots(now)
                self._send(now)
                if self._calls:
                    self._collect()
        except BaseException as exc:  # surfaced to the caller by next_events()
            self._failure = exc
            logger.exception("dispatcher worker crashed")
        finally:
            self._abandoned = [job.handle for job in self._jobs.values() if job.handle is not None]
            unsure = [
                job.key for job in self._jobs.values() if job.handle is None and job.submit_sent
            ]
            if unsure:
                logger.warning(
                    "left %d job(s) whose submit was not confirmed: %s", len(unsure), unsure[:10]
                )
            with self._lock:
                self._outstanding.clear()

    def _take_commands(self, block: bool) -> None:
        timeout = self._next_due() - time.monotonic() if block else 0.0
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
            self._slots[job.actor][job.key] = job
            self._n_slotted += 1
            job.due = time.monotonic()
            timeout = job.timeout_s or self.config.job_timeout_s
            job.deadline = None if timeout is None else job.due + timeout
        elif kind == "cancel":
            if (job := self._jobs.get(command[1])) is not None:
                self._request_cancel(job, command[2])
        elif kind == "shutdown":
            _, graceful, cancel_in_flight, timeout_s = command
            self._closing = True
            self._stop = not graceful
            self._drain_deadline = None if timeout_s is None else time.monotonic() + timeout_s
            for job in list(self._jobs.values()):
                if job.phase in (_Phase.WAITING, _Phase.READY) and not job.submit_sent:
                    self._finish(
                        job, EventKind.CANCELLED, message="dispatcher shut down before submission"
                    )
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
            job.due = time.monotonic()

    def _drain_expired(self, now: float) -> bool:
        return self._drain_deadline is not None and now >= self._drain_deadline

    def _next_due(self) -> float:
        """When the next call falls due on an idle actor (at most 1 s ahead)."""
        now = time.monotonic()
        if self._waiting and self._n_slotted < self.concurrency and not self._closing:
            return now  # a free slot to fill
        due = now + (_MAX_WAIT_S if self._closing else 1.0)
        busy = {actor for actor, _ in self._calls.values()}
        for actor, slots in enumerate(self._slots):
            if actor in busy:
                continue
            for job in slots.values():
                if job.phase in (_Phase.READY, _Phase.ACTIVE):
                    due = min(due, job.due)
                    if (
                        job.phase is _Phase.ACTIVE
                        and job.cancel is None
                        and job.deadline is not None
                    ):
                        due = min(due, job.deadline)
        return due

    def _fill_slots(self, now: float) -> None:
        while self._waiting and self._n_slotted < self.concurrency and not self._closing:
            job = self._waiting.popleft()
            if job.phase is _Phase.WAITING:
                job.phase, job.due = _Phase.READY, now
                self._slots[job.actor][job.key] = job
                self._n_slotted += 1

    def _send(self, now: float) -> None:
        busy = {actor for actor, _ in self._calls.values()}
        for actor, slots in enumerate(self._slots):
            if actor in busy:
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
                    job.cancel, job.due = "timeout", now
                if job.due > now or job.phase not in (_Phase.READY, _Phase.ACTIVE):
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
                self._calls[self._actors[actor].run.remote(encode_ops(wire))] = (actor, ops)

    def _collect(self) -> None:
        refs = list(self._calls)
        ready, _ = ray.wait(
            refs,
            num_returns=1,
            timeout=max(0.0, min(self._next_due() - time.monotonic(), _MAX_WAIT_S)),
        )
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            _, ops = self._calls.pop(ref)
            try:
                outcomes = decode_outcomes(ray.get(ref))
            except RayTaskError as exc:  # the host itself raised: a bug, not worth retrying
                outcomes = [
                    OpOutcome(
                        op_id=op_id, error_kind="permanent", error=f"adapter actor error: {exc}"
                    )
                    for op_id in ops
                ]
            except (RayActorError, RayError) as exc:  # actor died or restarting: retry
                outcomes = [
                    OpOutcome(
                        op_id=op_id,
                        error_kind="transient",
                        error=f"Ray actor unavailable: {type(exc).__name__}",
                    )
                    for op_id in ops
                ]
            for outcome in outcomes:
                job, kind = ops[outcome.op_id]
                if job.phase is not _Phase.DONE:
                    self._apply_outcome(job, kind, outcome)

    def _apply_outcome(self, job: _Job, kind: OpKind, outcome: OpOutcome) -> None:
        now = time.monotonic()
        cfg = self.config
        if outcome.error_kind is None:
            job.failures = 0
            if kind is OpKind.SUBMIT and outcome.handle is not None:
                job.handle, job.phase = outcome.handle, _Phase.ACTIVE
                timeout = job.timeout_s or cfg.job_timeout_s
                job.deadline = None if timeout is None else now + timeout
                job.due = now if job.cancel else now + cfg.poll_interval_s
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
            job.phase = _Phase.ACTIVE
            job.due = now if (job.cancel and not job.cancel_sent) else now + cfg.poll_interval_s
            return
        what = f"{kind} of {job.key!r} at {self.adapter_name}: {outcome.error}"
        if outcome.error_kind == "transient":
            job.failures += 1
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
                )
        elif outcome.error_kind == "not_found" and kind is not OpKind.SUBMIT:
            self._finish(job, EventKind.LOST, message=what)
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
        if self._slots[job.actor].pop(job.key, None) is not None:
            self._n_slotted -= 1
        self._emit(job, kind, **fields)

    def _emit(self, job: _Job, kind: EventKind, **fields: Any) -> None:
        self._events.put(
            DispatchEvent(
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
