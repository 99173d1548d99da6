"""How a campaign reaches its adapter: Ray dispatch, or inline on a virtual clock.

:func:`build_executor` returns an object with the :class:`~adapters.dispatch.Dispatcher`
surface the loop uses (``submit``, ``track``, ``next_events``, ``outstanding``,
``shutdown``):

* ``mode: ray`` — the real thing: adapter calls in Ray actors with concurrency limits,
  retries and timeouts (:mod:`adapters.dispatch`);
* ``mode: inline`` — the adapter lives in this process and is called directly; a
  simulated lab runs on a :class:`~simulators.clock.VirtualClock` that jumps to the
  next completion instead of waiting, so benchmark loops take no wall time beyond
  compute and are exactly reproducible.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from adapters.base import (
    ExperimentRequest,
    JobHandle,
    JobState,
    LabAdapter,
    PermanentAdapterError,
    TransientAdapterError,
)
from adapters.dispatch import Dispatcher, DispatchEvent, EventKind
from adapters.ray_runtime import AdapterSpec
from loop.config import CampaignConfig, ChgnetAdapterConfig, GpawAdapterConfig
from loop.pool import Pool
from simulators.config import SimulatedLabConfig

logger = logging.getLogger(__name__)


class Executor(Protocol):
    def submit(self, request: ExperimentRequest, idempotency_key: str) -> None: ...

    def track(self, handle: JobHandle) -> None: ...

    def next_events(self, timeout: float | None = None) -> list[DispatchEvent]: ...

    def outstanding(self) -> int: ...

    def shutdown(self, graceful: bool = True, cancel_in_flight: bool = False) -> Any: ...


_TERMINAL_KIND = {
    JobState.FAILED: EventKind.FAILED,
    JobState.CANCELLED: EventKind.CANCELLED,
    JobState.LOST: EventKind.LOST,
}


class InlineExecutor:
    """Calls the adapter directly, polling every outstanding job per round.

    Args:
        adapter: the adapter (built in this process).
        clock: when it has ``advance_to`` and the adapter has ``next_completion_time``
            (the simulated lab on a virtual clock), time jumps instead of sleeping.
        poll_interval_s: sleep between rounds otherwise.
        max_retries: transient errors tolerated per call before the job FAILS.
    """

    def __init__(
        self,
        adapter: LabAdapter,
        *,
        clock: Any = None,
        poll_interval_s: float = 0.5,
        max_retries: int = 3,
    ) -> None:
        self.adapter = adapter
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        self.max_retries = max_retries
        self._jobs: OrderedDict[str, JobHandle] = OrderedDict()
        self._events: list[DispatchEvent] = []

    def submit(self, request: ExperimentRequest, idempotency_key: str) -> None:
        for attempt in range(self.max_retries + 1):
            try:
                handle = self.adapter.submit(request, idempotency_key)
                break
            except TransientAdapterError as exc:
                if attempt == self.max_retries:
                    self._events.append(
                        self._failed(idempotency_key, request.candidate_id, str(exc))
                    )
                    return
            except PermanentAdapterError as exc:
                self._events.append(
                    self._failed(idempotency_key, request.candidate_id, str(exc), permanent=True)
                )
                return
        self._jobs[idempotency_key] = handle
        self._events.append(
            DispatchEvent(
                kind=EventKind.SUBMITTED,
                idempotency_key=idempotency_key,
                candidate_id=request.candidate_id,
                handle=handle,
            )
        )

    def track(self, handle: JobHandle) -> None:
        self._jobs[handle.idempotency_key] = handle

    def outstanding(self) -> int:
        return len(self._jobs)

    def next_events(self, timeout: float | None = None) -> list[DispatchEvent]:
        if self._events:
            out, self._events = self._events, []
            return out
        if not self._jobs:
            return []
        while True:
            out = self._poll_all()
            if out or not self._jobs:
                return out
            next_time = getattr(self.adapter, "next_completion_time", None)
            t = next_time() if callable(next_time) else None
            if t is not None and hasattr(self.clock, "advance_to"):
                self.clock.advance_to(t)
            else:
                time.sleep(self.poll_interval_s)
                if timeout is not None:
                    return []

    def shutdown(self, graceful: bool = True, cancel_in_flight: bool = False) -> list[JobHandle]:
        left = list(self._jobs.values())
        if cancel_in_flight:
            for handle in left:
                self.adapter.cancel(handle)
        self.adapter.close()
        return left

    def _poll_all(self) -> list[DispatchEvent]:
        out: list[DispatchEvent] = []
        for key, handle in list(self._jobs.items()):
            try:
                status = self.adapter.poll(handle)
                if status.state == JobState.SUCCEEDED:
                    measurement = self.adapter.result(handle)
                    out.append(
                        DispatchEvent(
                            kind=EventKind.SUCCEEDED,
                            idempotency_key=key,
                            candidate_id=handle.candidate_id,
                            handle=handle,
                            measurement=measurement,
                        )
                    )
                elif status.state in _TERMINAL_KIND:
                    out.append(
                        DispatchEvent(
                            kind=_TERMINAL_KIND[status.state],
                            idempotency_key=key,
                            candidate_id=handle.candidate_id,
                            handle=handle,
                            status=status,
                            message=status.message,
                        )
                    )
                else:
                    continue
            except TransientAdapterError as exc:
                logger.warning("transient error polling %s: %s (will retry)", key, exc)
                continue
            except PermanentAdapterError as exc:
                out.append(self._failed(key, handle.candidate_id, str(exc), permanent=True))
            del self._jobs[key]
        return out

    @staticmethod
    def _failed(
        key: str, candidate_id: str, message: str, *, permanent: bool = False
    ) -> DispatchEvent:
        return DispatchEvent(
            kind=EventKind.FAILED,
            idempotency_key=key,
            candidate_id=candidate_id,
            message=message,
            permanent=permanent,
        )


def adapter_spec(config: CampaignConfig, pool: Pool, directory: Path) -> AdapterSpec:
    """The JSON-friendly factory that builds the campaign's adapter (in a Ray actor or here)."""
    adapter = config.adapter
    if isinstance(adapter, SimulatedLabConfig):
        truth = {
            "units": pool.units,
            "values": {cid: v for cid, v in pool.truth.items()},
            "source": f"{config.pool.dataset or config.pool.file}",
        }
        return AdapterSpec(
            factory="simulators.journal:open_lab",
            kwargs={
                "truth": truth,
                "config": adapter.model_dump(mode="json"),
                "state_dir": str(directory / "lab"),
            },
        )
    if isinstance(adapter, GpawAdapterConfig):
        work_dir = str(adapter.work_dir or directory / "gpaw")
        return AdapterSpec(
            factory="adapters.dft:GpawAdapter",
            kwargs={"settings": {"work_dir": work_dir, **adapter.settings}},
        )
    if isinstance(adapter, ChgnetAdapterConfig):
        work_dir = str(adapter.work_dir or directory / "chgnet")
        return AdapterSpec(
            factory="adapters.mlip:ChgnetAdapter",
            kwargs={"settings": {"work_dir": work_dir, **adapter.settings}},
        )
    return AdapterSpec(
        factory="adapters.http_lab:HttpLabAdapter",
        kwargs={"config": adapter.model_dump(mode="json")},
    )


def build_executor(config: CampaignConfig, pool: Pool, directory: Path) -> Executor:
    """The Ray dispatcher, or an inline executor (simulated lab on a virtual clock)."""
    if config.dispatch.mode == "inline":
        if isinstance(config.adapter, SimulatedLabConfig):
            from simulators.clock import VirtualClock
            from simulators.lab import SimulatedLab

            clock = VirtualClock()
            lab = SimulatedLab(pool.truth, pool.units, config.adapter, clock=clock)
            return InlineExecutor(lab, clock=clock, max_retries=config.dispatch.max_retries)
        built = adapter_spec(config, pool, directory).build()
        return InlineExecutor(
            built,
            poll_interval_s=max(config.dispatch.poll_interval_s, 0.05),
            max_retries=config.dispatch.max_retries,
        )
    dispatch = config.dispatch.model_dump(exclude={"mode", "wait_for"})
    from adapters.dispatch import DispatchConfig

    return Dispatcher(adapter_spec(config, pool, directory), DispatchConfig(**dispatch))
