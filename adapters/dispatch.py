"""Adapter calls in Ray actors: the Ray transport of the job engine.

:class:`RayTransport` owns Ray actors that each host an adapter built *inside*
the actor from an adapter factory (see :mod:`adapters.ray_runtime`); one actor
is one lane of the engine, and one Ray round trip carries a whole batch of
calls. :class:`Dispatcher` is the job engine (:mod:`adapters.engine`) over that
transport, driven by a background thread so that calls are in flight while the
caller works::

    spec = AdapterSpec(factory="simulators.lab:SimulatedLab",
                       kwargs={"truth": truth, "units": {"band_gap": "eV"}, "config": {"capacity": 8}})
    with Dispatcher(spec, DispatchConfig(job_timeout_s=3600)) as dispatcher:
        dispatcher.submit(request, idempotency_key="campaign-1/job-7")
        for event in dispatcher.events():  # as they happen, until no job is outstanding
            store.record(event)  # SUBMITTED carries the JobHandle, SUCCEEDED the Measurement

The rules (retries, timeouts, LOST, cancellation) are the engine's, the same as
in process. What is Ray's own: a dead or restarting actor is a transient error
(retried), an exception of the host itself is a permanent one. With
``ray_address`` set, the actors may run on other machines, which then need
cloudlab installed.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from adapters.base import DispatchEvent, EventKind
from adapters.engine import (
    DispatchConfig,
    DispatcherClosedError,
    DispatcherError,
    DuplicateJobError,
    JobEngine,
)
from adapters.ray_runtime import AdapterFactory, AdapterHost, ensure_ray
from adapters.transport import AdapterInfo, AdapterOp, OpOutcome, decode_outcomes, encode_ops

__all__ = [
    "DispatchConfig",
    "DispatchEvent",
    "Dispatcher",
    "DispatcherClosedError",
    "DispatcherError",
    "DuplicateJobError",
    "EventKind",
    "RayTransport",
]

logger = logging.getLogger(__name__)
_RemoteHost = ray.remote(AdapterHost)


class RayTransport:
    """Lanes that are Ray actors, each hosting one adapter.

    Args:
        factory: builds the adapter inside each actor (a picklable zero-argument
            callable or an :class:`~adapters.ray_runtime.AdapterSpec`).
        config: Ray settings (address, actors, CPUs, restarts, start timeout).

    Raises:
        DispatcherError: the actors could not build their adapters.
        RayRuntimeError: Ray could not be started or joined.
    """

    def __init__(self, factory: AdapterFactory, config: DispatchConfig) -> None:
        ensure_ray(config.ray_address)
        host = _RemoteHost.options(
            num_cpus=config.actor_num_cpus,
            max_restarts=config.max_actor_restarts,
            max_task_retries=0,
        )
        self._actors: list[Any] = [host.remote(factory) for _ in range(config.num_actors)]
        try:
            infos = ray.get(
                [a.describe.remote() for a in self._actors], timeout=config.start_timeout_s
            )
        except (RayError, GetTimeoutError) as exc:
            self._kill()
            raise DispatcherError(f"adapter actors failed to start: {exc}") from exc
        self._info = AdapterInfo(
            name=infos[0]["name"],
            capacity=int(infos[0]["capacity"]),
            pids=tuple(int(i["pid"]) for i in infos),
        )
        self._calls: dict[Any, tuple[int, list[int]]] = {}  # object ref -> (lane, op ids)
        self._closed = False

    @property
    def lanes(self) -> int:
        return len(self._actors)

    @property
    def info(self) -> AdapterInfo:
        return self._info

    def send(self, lane: int, ops: list[AdapterOp]) -> None:
        ref = self._actors[lane].run.remote(encode_ops(ops))
        self._calls[ref] = (lane, [op.op_id for op in ops])

    def collect(self, timeout: float) -> list[tuple[int, list[OpOutcome]]]:
        refs = list(self._calls)
        if not refs:
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = []
        for ref in ready:
            lane, op_ids = self._calls.pop(ref)
            try:
                outcomes = decode_outcomes(ray.get(ref))
            except RayTaskError as exc:  # the host itself raised: a bug, not worth retrying
                outcomes = [
                    OpOutcome(op_id=i, error_kind="permanent", error=f"adapter actor error: {exc}")
                    for i in op_ids
                ]
            except (RayActorError, RayError) as exc:  # actor died or restarting: retry
                outcomes = [
                    OpOutcome(
                        op_id=i,
                        error_kind="transient",
                        error=f"Ray actor unavailable: {type(exc).__name__}",
                    )
                    for i in op_ids
                ]
            done.append((lane, outcomes))
        return done

    def wake_hint(self) -> float | None:
        return None  # the adapters live in other processes, on the wall clock

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kill()

    def _kill(self) -> None:
        closing = [a.close.remote() for a in self._actors]
        try:
            ray.get(closing, timeout=10)
        except (RayError, GetTimeoutError) as exc:
            logger.warning("closing the adapters failed: %s", exc)
        for actor in self._actors:
            ray.kill(actor)


class Dispatcher(JobEngine):
    """The job engine over Ray actors, driven by a background thread.

    Args:
        factory: builds the adapter inside each actor.
        config: limits, retries, timeouts and Ray settings.

    Raises:
        DispatcherError: the actors could not build their adapters.
        RayRuntimeError: Ray could not be started or joined.
    """

    def __init__(self, factory: AdapterFactory, config: DispatchConfig | None = None) -> None:
        config = config or DispatchConfig()
        super().__init__(RayTransport(factory, config), config, background=True)
