"""Bluesky queueserver adapter: experiments as items of an RE Manager's plan queue.

A beamline or self-driving lab that runs Bluesky through ``bluesky-queueserver``
plugs in through :class:`QueueServerAdapter`, which talks to the RE Manager over its
0MQ control channel (``bluesky-queueserver-api``):

* **submit** adds one plan item, ``<plan>(candidate_id=..., targets=[...], key=...)``,
  with the idempotency key in the item's ``meta`` (``{"cloudlab_key": key}``). Before
  adding, and again before retrying an add that timed out, the queue, the running item
  and the history are searched for that key: a retried submit finds the existing item
  instead of adding a second one;
* **poll** reads the item's place: queued, running (or paused), or in the history
  with its ``exit_status``. An item found nowhere is LOST;
* **result** runs ``<result_function>(key)`` in the worker environment (the
  queueserver's ``function_execute``, in the background so a running plan is not
  disturbed). Why a function: the queueserver keeps no return value of a plan in its
  history, and the run's documents go to whatever store the beamline's RunEngine is
  subscribed to, which only the worker's startup code knows. The reference profile
  (``adapters/queueserver_profile``) keeps one JSON record per key on disk, so a
  measurement taken just before an RE Manager restart is still found;
* **cancel** removes a queued item, or pauses the running plan immediately and aborts it;
* the queue: the RE Manager puts a failed or aborted item back at the front of the
  queue (with a new uid) and stops the queue. The adapter removes such copies of
  finished keys before the queue runs again, so one key never runs twice, and then,
  per ``queue_control``, re-enables autostart (``autostart``), starts the queue when
  it is idle (``start``) or leaves the queue to an operator (``none``). It opens the
  worker environment when it is closed (``open_environment``), e.g. after a restart.

Exit statuses: ``completed`` -> SUCCEEDED; ``failed`` -> FAILED (the plan's error);
``aborted``/``halted`` -> CANCELLED; ``stopped`` -> SUCCEEDED if the worker has the
measurement, CANCELLED otherwise; ``unknown`` (the RE Manager restarted while the plan
ran) -> SUCCEEDED if the worker has the measurement, LOST otherwise.

Errors: no answer within ``request_timeout_s`` (RE Manager down or restarting, or an
encryption key mismatch: an encrypted RE Manager silently drops plain requests) is
retried, then :class:`TransientAdapterError`; a refused request
(``RequestFailedError``: unknown plan, forbidden for ``user_group``, ...) is a
:class:`PermanentAdapterError` naming the setting to check.

``bluesky_queueserver_api`` is imported only when an adapter is built, so configs
validate without it (``pip install 'cloudlab[orchestrators]'``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapters.base import (
    AuthError,
    ExperimentRequest,
    JobHandle,
    JobState,
    JobStatus,
    LabAdapter,
    MeasuredValue,
    Measurement,
    PermanentAdapterError,
    ResultNotReadyError,
    TransientAdapterError,
)

__all__ = ["QueueServerAdapter", "QueueServerConfig", "KEY_FIELD"]

logger = logging.getLogger(__name__)

KEY_FIELD = "cloudlab_key"  # the item-meta field that holds the idempotency key
_T = TypeVar("_T")
_RESTARTED = "unknown"  # exit status of an item that ran while the RE Manager restarted


class QueueServerConfig(BaseModel):
    """How to reach one RE Manager and what to queue there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["queueserver"] = "queueserver"
    name: str = Field(default="queueserver", min_length=1, description="stored with each job")
    control_address: str = Field(
        default="tcp://localhost:60615", description="the RE Manager's 0MQ control address"
    )
    public_key_env: str | None = Field(
        default=None,
        description="env var holding the RE Manager's CurveZMQ public key (encrypted channel)",
    )
    user: str = Field(default="cloudlab", min_length=1, description="item owner in the queue")
    user_group: str = Field(default="primary", min_length=1, description="permission group")
    plan: str = Field(default="cloudlab_measure", min_length=1)
    result_function: str = Field(default="cloudlab_result", min_length=1)
    # autostart: keep the server's queue autostart on; start: start the queue when it is
    # idle with items; none: an operator runs the queue
    queue_control: Literal["autostart", "start", "none"] = "autostart"
    open_environment: bool = True  # open the worker environment when it is closed
    capacity: int = Field(default=1, ge=1, description="items queued at once")
    cost_per_experiment: float = Field(default=1.0, ge=0)
    request_timeout_s: float = Field(default=5.0, gt=0, description="for one 0MQ answer")
    result_timeout_s: float = Field(default=30.0, gt=0, description="for the result function")
    cancel_timeout_s: float = Field(default=30.0, gt=0, description="for a running plan to stop")
    max_attempts: int = Field(default=3, ge=1, description="tries per call, the first included")
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=10.0, ge=0)

    @field_validator("control_address")
    @classmethod
    def _zmq_address(cls, address: str) -> str:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        if not address.startswith("tcp://") or not host or not port.isdigit():
            raise ValueError(f"control_address must look like tcp://host:60615, got {address!r}")
        return address


@dataclass
class _Snapshot:
    """The queue as read at one moment."""

    status: dict[str, Any]
    queue: list[dict[str, Any]]
    running: dict[str, Any]
    history: list[dict[str, Any]]
    by_key: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # history, oldest first

    def __post_init__(self) -> None:
        for item in self.history:
            key = _key(item)
            if key:
                self.by_key.setdefault(key, []).append(item)


def _key(item: dict[str, Any] | None) -> str | None:
    if not item:
        return None
    meta = item.get("meta")
    value = meta.get(KEY_FIELD) if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


class QueueServerAdapter(LabAdapter):
    """A :class:`LabAdapter` over a Bluesky queueserver RE Manager.

    Args:
        config: where the RE Manager is and what to queue.

    Raises:
        AuthError: ``public_key_env`` names an unset variable.
        PermanentAdapterError: ``bluesky-queueserver-api`` is not installed.
    """

    def __init__(self, config: QueueServerConfig) -> None:
        self.config = config
        self.name = config.name
        self.capacity = config.capacity
        try:
            from bluesky_queueserver_api.zmq import REManagerAPI
        except ImportError as exc:
            raise PermanentAdapterError(
                "adapter kind queueserver needs bluesky-queueserver-api: "
                "pip install 'cloudlab[orchestrators]'"
            ) from exc
        public_key = None
        if config.public_key_env is not None:
            public_key = os.environ.get(config.public_key_env, "")
            if not public_key:
                raise AuthError(
                    f"environment variable {config.public_key_env} (adapter.public_key_env) is "
                    f"not set: export the public key of the RE Manager at {config.control_address}"
                )
        self._api = REManagerAPI(
            zmq_control_addr=config.control_address,
            zmq_public_key=public_key,
            timeout_recv=config.request_timeout_s,
            timeout_send=config.request_timeout_s,
        )
        self._records: dict[str, dict[str, Any]] = {}  # key -> the worker's measurement record
        self._cancelled: set[str] = set()

    # ------------------------------------------------------------------ contract
    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        item = {
            "item_type": "plan",
            "name": self.config.plan,
            "args": [],
            "kwargs": {
                "candidate_id": request.candidate_id,
                "targets": list(request.targets),
                "key": idempotency_key,
            },
            "meta": {KEY_FIELD: idempotency_key, "candidate_id": request.candidate_id},
        }

        def attempt() -> JobHandle:
            # searched before every try: an add that timed out may have reached the queue
            snap = self._snapshot(reload=True)
            existing = self._items_of(snap, idempotency_key)
            if existing:
                uid = str(existing[0]["item_uid"])
                logger.info("key %s is already item %s", idempotency_key, uid)
            else:
                self._ensure_environment(snap.status)
                answer = self._request(
                    "item_add",
                    self._api.item_add,
                    item,
                    user=self.config.user,
                    user_group=self.config.user_group,
                    env_exists=bool(snap.status.get("worker_environment_exists")),
                )
                uid = str(answer["item"]["item_uid"])
            self._run_queue(self._snapshot(reload=True))
            return JobHandle(
                adapter=self.name,
                job_id=uid,
                idempotency_key=idempotency_key,
                candidate_id=request.candidate_id,
            )

        return self._retrying(f"submit {idempotency_key}", attempt)

    def poll(self, handle: JobHandle) -> JobStatus:
        return self._retrying(f"poll {handle.job_id}", lambda: self._state(handle))

    def result(self, handle: JobHandle) -> Measurement:
        status = self.poll(handle)
        if status.state is not JobState.SUCCEEDED:
            raise ResultNotReadyError(
                f"item {handle.job_id} (key {handle.idempotency_key}) is {status.state.value}"
            )
        key = handle.idempotency_key
        try:
            record = self._retrying(f"result {handle.job_id}", lambda: self._record(key))
        except _EnvironmentClosed:  # e.g. after a restart: open it, and be asked again
            self._ensure_environment(self._request("status", self._api.status, reload=True))
            raise
        if record is None:
            raise PermanentAdapterError(
                f"item {handle.job_id} completed but {self.config.result_function}({key!r}) in "
                "the RE worker returned no measurement: check the profile's recorder"
            )
        snap = self._snapshot(reload=False)
        items = snap.by_key.get(key, [])
        try:
            values = {
                target: MeasuredValue.model_validate(value)
                for target, value in record["values"].items()
            }
            return Measurement(
                job_id=handle.job_id,
                candidate_id=handle.candidate_id,
                values=values,
                cost=self.config.cost_per_experiment,
                started_at=_time(record.get("started_at")),
                finished_at=_time(record.get("finished_at")) or datetime.now(UTC),
                provenance={
                    "orchestrator": "bluesky-queueserver",
                    "re_manager": self.config.control_address,
                    "plan": self.config.plan,
                    "item_uids": [str(i["item_uid"]) for i in items],
                    "run_uid": record.get("run_uid"),
                },
            )
        except (KeyError, TypeError, AttributeError, ValidationError) as exc:
            raise PermanentAdapterError(
                f"{self.config.result_function}({key!r}) returned a record that is not a "
                f"measurement ({type(exc).__name__}: {exc}); expected "
                '{"values": {target: {"value", "unit", "uncertainty"}}, ...}'
            ) from exc

    def cancel(self, handle: JobHandle) -> JobStatus:
        key = handle.idempotency_key

        def attempt() -> JobStatus:
            snap = self._snapshot(reload=True)
            if _key(snap.running) == key:
                self._cancelled.add(key)
                self._stop_running(str(snap.running["item_uid"]))
                snap = self._snapshot(reload=True)
            queued = [i for i in snap.queue if _key(i) == key]
            if queued and not snap.by_key.get(key):
                self._cancelled.add(key)
            self._remove(queued)
            status = self._state(handle)
            self._run_queue(self._snapshot(reload=True))
            return status

        return self._retrying(f"cancel {handle.job_id}", attempt)

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> QueueServerAdapter:
        return self

    # -------------------------------------------------------------------- extras
    def probe(self) -> None:
        """One status request, no retries, so that a wrong address fails in seconds.

        Raises:
            TransientAdapterError: the RE Manager did not answer; the message names the
                settings to check.
        """
        try:
            self._request("status", self._api.status, reload=True)
        except _NoAnswer as exc:
            raise TransientAdapterError(f"probe: {exc}; {self._unreachable_hint()}") from exc

    def items_for(self, idempotency_key: str) -> list[dict[str, Any]]:
        """Every queue, running and history item tagged with ``idempotency_key``."""
        return self._items_of(self._snapshot(reload=True), idempotency_key)

    # ------------------------------------------------------------------ internals
    def _state(self, handle: JobHandle) -> JobStatus:
        key, job_id = handle.idempotency_key, handle.job_id
        snap = self._snapshot(reload=False)
        done = snap.by_key.get(key, [])
        queued = [i for i in snap.queue if _key(i) == key]
        if done:
            status = self._history_status(job_id, key, done[-1], snap)
            if status.state.is_terminal:
                if queued:  # the RE Manager put a failed or aborted item back: never rerun it
                    self._remove(queued)
                return status
            if _key(snap.running) != key and not queued:
                return status  # outcome pending (the worker environment is being opened)
        if _key(snap.running) == key:
            paused = snap.status.get("manager_state") == "paused"
            return JobStatus(
                job_id=job_id, state=JobState.RUNNING, message="paused" if paused else None
            )
        if queued:
            self._run_queue(snap)
            position = next(n for n, i in enumerate(snap.queue) if _key(i) == key)
            return JobStatus(job_id=job_id, state=JobState.QUEUED, message=f"position {position}")
        snap = self._snapshot(reload=True)  # a cached view may predate the submission
        if self._items_of(snap, key):
            return self._state_fresh(handle, snap)
        if key in self._cancelled:  # the queueserver keeps no trace of a removed item
            return JobStatus(
                job_id=job_id, state=JobState.CANCELLED, message="removed from the queue"
            )
        return JobStatus(
            job_id=job_id,
            state=JobState.LOST,
            message=f"no item with {KEY_FIELD}={key} in the queue or history of "
            f"{self.config.control_address} (queue or history cleared?)",
        )

    def _state_fresh(self, handle: JobHandle, snap: _Snapshot) -> JobStatus:
        key = handle.idempotency_key
        if _key(snap.running) == key:
            return JobStatus(job_id=handle.job_id, state=JobState.RUNNING)
        if any(_key(i) == key for i in snap.queue) and not snap.by_key.get(key):
            return JobStatus(job_id=handle.job_id, state=JobState.QUEUED)
        return self._history_status(handle.job_id, key, snap.by_key[key][-1], snap)

    def _history_status(
        self, job_id: str, key: str, item: dict[str, Any], snap: _Snapshot
    ) -> JobStatus:
        result = item.get("result") or {}
        exit_status = str(result.get("exit_status", ""))
        message = str(result.get("msg") or "") or None
        if exit_status == "completed":
            return JobStatus(job_id=job_id, state=JobState.SUCCEEDED)
        if exit_status == "failed":
            return JobStatus(job_id=job_id, state=JobState.FAILED, message=message)
        if exit_status in ("aborted", "halted"):
            return JobStatus(job_id=job_id, state=JobState.CANCELLED, message=f"plan {exit_status}")
        if exit_status in ("stopped", _RESTARTED):
            if exit_status == "stopped" and key in self._cancelled:
                return JobStatus(job_id=job_id, state=JobState.CANCELLED, message="plan stopped")
            if not snap.status.get("worker_environment_exists"):
                self._ensure_environment(snap.status)
                return JobStatus(
                    job_id=job_id,
                    state=JobState.RUNNING,
                    message=f"exit status {exit_status}: waiting for the worker environment "
                    "to look up the measurement",
                )
            try:
                record = self._record(key)
            except _EnvironmentClosed:
                self._ensure_environment(self._request("status", self._api.status, reload=True))
                return JobStatus(
                    job_id=job_id,
                    state=JobState.RUNNING,
                    message=f"exit status {exit_status}: waiting for the worker environment",
                )
            if record is not None:
                return JobStatus(job_id=job_id, state=JobState.SUCCEEDED, message=exit_status)
            state = JobState.CANCELLED if exit_status == "stopped" else JobState.LOST
            return JobStatus(
                job_id=job_id,
                state=state,
                message=f"exit status {exit_status} ({message or 'no message'}) and no "
                "measurement recorded by the worker",
            )
        return JobStatus(
            job_id=job_id, state=JobState.FAILED, message=f"unknown exit status {exit_status!r}"
        )

    def _record(self, key: str) -> dict[str, Any] | None:
        """The worker's measurement record for ``key`` (cached once found)."""
        if key in self._records:
            return self._records[key]
        from bluesky_queueserver_api import BFunc

        cfg = self.config
        answer = self._request(
            "function_execute",
            self._api.function_execute,
            BFunc(cfg.result_function, key),
            run_in_background=True,
            user=cfg.user,
            user_group=cfg.user_group,
        )
        task_uid = answer["task_uid"]
        deadline = time.monotonic() + cfg.result_timeout_s
        while True:
            task = self._request("task_result", self._api.task_result, task_uid)
            if task.get("status") == "completed":
                break
            if time.monotonic() > deadline:
                raise TransientAdapterError(
                    f"{cfg.result_function}({key!r}) did not finish in the RE worker within "
                    f"{cfg.result_timeout_s:g} s (adapter.result_timeout_s)"
                )
            time.sleep(0.05)
        outcome = task.get("result") or {}
        if not outcome.get("success"):
            raise PermanentAdapterError(
                f"{cfg.result_function}({key!r}) failed in the RE worker: {outcome.get('msg')}"
            )
        record = outcome.get("return_value")
        if record is None:
            return None
        if not isinstance(record, dict):
            raise PermanentAdapterError(
                f"{cfg.result_function}({key!r}) returned {type(record).__name__}, not a dict"
            )
        self._records[key] = record
        return record

    def _snapshot(self, *, reload: bool) -> _Snapshot:
        # the status is always read afresh; the API client reuses its copy of the queue and
        # the history while the status says their uids did not change
        status = self._request("status", self._api.status, reload=True)
        queue = self._request("queue_get", self._api.queue_get, reload=reload)
        history = self._request("history_get", self._api.history_get, reload=reload)
        return _Snapshot(
            status=status,
            queue=list(queue.get("items", [])),
            running=dict(queue.get("running_item") or {}),
            history=list(history.get("items", [])),
        )

    def _items_of(self, snap: _Snapshot, key: str) -> list[dict[str, Any]]:
        running = [snap.running] if _key(snap.running) == key else []
        queued = [i for i in snap.queue if _key(i) == key]
        return snap.by_key.get(key, []) + running + queued

    def _remove(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            uid = str(item["item_uid"])
            try:
                self._request("item_remove", self._api.item_remove, uid=uid)
            except PermanentAdapterError as exc:  # removed meanwhile, or started running
                logger.warning("could not remove queue item %s: %s", uid, exc)
            else:
                logger.info("removed queue item %s (key %s)", uid, _key(item))

    def _ensure_environment(self, status: dict[str, Any]) -> None:
        if status.get("worker_environment_exists") or not self.config.open_environment:
            return
        if status.get("manager_state") == "idle":
            logger.info("opening the RE worker environment at %s", self.config.control_address)
            try:
                self._request("environment_open", self._api.environment_open)
            except PermanentAdapterError as exc:  # another client opened it first
                logger.info("environment_open refused: %s", exc)

    def _run_queue(self, snap: _Snapshot) -> None:
        """Remove copies of finished keys, then let the queue run per ``queue_control``."""
        status = snap.status
        self._ensure_environment(status)
        if not status.get("worker_environment_exists"):
            return
        mode = self.config.queue_control
        idle = status.get("manager_state") == "idle"
        restart = (mode == "autostart" and not status.get("queue_autostart_enabled")) or (
            mode == "start" and idle and status.get("items_in_queue", 0) > 0
        )
        if not restart:
            return
        # read after the status: a failure that stopped the queue is in this history
        fresh = self._snapshot(reload=True)
        self._remove([i for i in fresh.queue if _key(i) and _key(i) in fresh.by_key])
        try:
            if mode == "autostart":
                self._request("queue_autostart", self._api.queue_autostart, True)
            elif fresh.status.get("manager_state") == "idle" and any(_key(i) for i in fresh.queue):
                self._request("queue_start", self._api.queue_start)
        except PermanentAdapterError as exc:  # e.g. the queue started meanwhile
            logger.info("could not start the queue: %s", exc)

    def _stop_running(self, uid: str) -> None:
        """Pause the running plan now and abort it; the RE Manager puts it back (removed later)."""
        cfg = self.config
        self._request("re_pause", self._api.re_pause, "immediate")
        deadline = time.monotonic() + cfg.cancel_timeout_s
        while self._request("status", self._api.status, reload=True).get("manager_state") not in (
            "paused",
            "idle",
        ):
            if time.monotonic() > deadline:
                raise TransientAdapterError(
                    f"item {uid} did not pause within {cfg.cancel_timeout_s:g} s "
                    "(adapter.cancel_timeout_s)"
                )
            time.sleep(0.05)
        if self._request("status", self._api.status, reload=True).get("manager_state") == "paused":
            self._request("re_abort", self._api.re_abort)
        while self._request("status", self._api.status, reload=True).get("manager_state") != "idle":
            if time.monotonic() > deadline:
                raise TransientAdapterError(
                    f"item {uid} did not abort within {cfg.cancel_timeout_s:g} s"
                )
            time.sleep(0.05)

    def _request(
        self, what: str, call: Callable[..., _T], *args: Any, env_exists: bool = True, **kwargs: Any
    ) -> _T:
        """One API call; a refused request becomes a PermanentAdapterError naming the setting."""
        from bluesky_queueserver_api.comm_base import RequestFailedError, RequestTimeoutError

        try:
            return call(*args, **kwargs)
        except RequestTimeoutError as exc:
            raise _NoAnswer(
                f"{what}: no answer from the RE Manager at {self.config.control_address} within "
                f"{self.config.request_timeout_s:g} s"
            ) from exc
        except RequestFailedError as exc:
            text = str(exc)
            if "environment is not open" in text.lower() or "environment does not exist" in text:
                # closed, or being opened again after a restart: try again later
                raise _EnvironmentClosed(f"{what}: {text}") from exc
            if what == "item_add" and not env_exists and "allowed" in text:
                # the plan lists are loaded when the environment is first opened
                raise TransientAdapterError(
                    f"item_add: {text} (the worker environment is not open yet)"
                ) from exc
            raise PermanentAdapterError(
                f"{what} refused by {self.config.control_address}: {text}{_hint(what, self.config)}"
            ) from exc

    def _retrying(self, what: str, attempt: Callable[[], _T]) -> _T:
        cfg = self.config
        last = ""
        for n in range(1, cfg.max_attempts + 1):
            try:
                return attempt()
            except _NoAnswer as exc:
                last = str(exc)
            if n < cfg.max_attempts:
                wait = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (n - 1))
                logger.warning(
                    "%s: %s; retry %d/%d in %.2f s", what, last, n, cfg.max_attempts - 1, wait
                )
                time.sleep(wait)
        raise TransientAdapterError(
            f"{what}: {last} after {cfg.max_attempts} attempts; {self._unreachable_hint()}"
        )

    def _unreachable_hint(self) -> str:
        cfg = self.config
        key_hint = (
            f", and that ${cfg.public_key_env} (adapter.public_key_env) holds its public key"
            if cfg.public_key_env
            else " (an encrypted RE Manager also needs adapter.public_key_env)"
        )
        return f"check that an RE Manager runs at adapter.control_address{key_hint}"


class _NoAnswer(TransientAdapterError):
    """The RE Manager did not answer one request (retried by ``_retrying``)."""


class _EnvironmentClosed(TransientAdapterError):
    """The RE worker environment is closed or being opened (after a restart)."""


def _hint(what: str, config: QueueServerConfig) -> str:
    if what == "item_add":
        return (
            f"; check adapter.plan ({config.plan}) and that user group {config.user_group} "
            "(adapter.user_group) may run it"
        )
    if what == "function_execute":
        return (
            f"; check adapter.result_function ({config.result_function}) and that user group "
            f"{config.user_group} may execute it"
        )
    return ""


def _time(value: object) -> datetime | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), UTC)
    return None
