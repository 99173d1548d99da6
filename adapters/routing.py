"""One adapter per fidelity: :class:`FidelityRouter` sends each job to its fidelity's adapter.

A multi-fidelity campaign may measure its cheap fidelity with CHGNet, the
expensive one with GPAW and the most expensive one in a robot lab over HTTP.
The job engine drives one adapter, so the router *is* that adapter: it holds
``{fidelity name: LabAdapter}`` (several fidelities may share one adapter
instance) and implements the contract by delegation:

* ``submit`` reads the fidelity from ``request.parameters["fidelity"]`` (the
  campaign puts it there) and submits to that fidelity's adapter. A request
  without a fidelity, or with one the router does not serve, is refused with a
  :class:`~adapters.base.PermanentAdapterError`. The routing key is forwarded
  only to adapters listed in ``send_fidelity`` (by default: an adapter that
  serves two or more fidelities, which needs it to tell them apart); an adapter
  that serves one fidelity receives that fidelity's own ``parameters`` only, so
  GPAW and CHGNet, whose settings refuse unknown parameters, work unchanged.
* The returned :class:`~adapters.base.JobHandle` is the sub-adapter's with its
  ``adapter`` field set to ``"<sub-adapter name>@<fidelity>"``. The campaign
  store keeps the handle as JSON, so after a restart a new router (built from
  the same config) reads the route back from the stored handle: ``poll``,
  ``result`` and ``cancel`` go to the adapter that owns the job, with the
  sub-adapter's own handle. Job ids and idempotency keys are the sub-adapter's,
  untouched. A handle that names no fidelity of this router is unknown here
  (:class:`~adapters.base.JobNotFoundError`: the engine reports it LOST).
* ``result`` adds ``fidelity`` and ``adapter`` to the measurement's provenance
  (keys the sub-adapter set itself are kept).
* ``capacity`` is the sum of the distinct sub-adapters' capacities; each
  sub-adapter runs at most its own capacity and queues the rest itself (local
  jobs in their job directories, labs in their queues). ``close`` closes each
  distinct sub-adapter once.

This module imports only the adapter contract.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from adapters.base import (
    ExperimentRequest,
    JobHandle,
    JobNotFoundError,
    JobStatus,
    LabAdapter,
    Measurement,
    PermanentAdapterError,
)

__all__ = ["FIDELITY_PARAMETER", "FidelityRouter", "routed_fidelity"]

logger = logging.getLogger(__name__)

FIDELITY_PARAMETER = "fidelity"  # the request parameter that names a job's fidelity


def routed_fidelity(handle: JobHandle) -> tuple[str, str] | None:
    """(sub-adapter name, fidelity) of a handle the router returned; None for any other."""
    name, at, fidelity = handle.adapter.rpartition("@")
    return (name, fidelity) if at and fidelity else None


class FidelityRouter(LabAdapter):
    """Routes every job to the adapter of its fidelity (see the module docstring).

    Args:
        adapters: fidelity name -> the adapter that measures it; one instance may
            serve several fidelities.
        send_fidelity: fidelities whose adapter receives ``parameters["fidelity"]``;
            None: those whose adapter serves two or more fidelities.

    Raises:
        ValueError: no fidelity, a fidelity name with ``@``, or ``send_fidelity``
            naming a fidelity the router does not serve.
    """

    def __init__(
        self,
        adapters: Mapping[str, LabAdapter],
        *,
        send_fidelity: Collection[str] | None = None,
    ) -> None:
        if not adapters:
            raise ValueError("a fidelity router needs at least one fidelity")
        bad = sorted(f for f in adapters if not f or "@" in f)
        if bad:
            raise ValueError(f"fidelity names {bad} cannot be routed (empty or containing '@')")
        self.routes: dict[str, LabAdapter] = dict(adapters)
        self.distinct: list[LabAdapter] = list({id(a): a for a in self.routes.values()}.values())
        served = {id(a): sum(b is a for b in self.routes.values()) for a in self.distinct}
        if send_fidelity is None:
            send_fidelity = [f for f, a in self.routes.items() if served[id(a)] > 1]
        unknown = sorted(set(send_fidelity) - set(self.routes))
        if unknown:
            raise ValueError(f"send_fidelity names {unknown}, not fidelities of this router")
        self.send_fidelity = frozenset(send_fidelity)
        self.name = "+".join(dict.fromkeys(a.name for a in self.distinct))
        self.capacity = sum(max(1, int(a.capacity)) for a in self.distinct)
        self._closed = False
        logger.debug(
            "fidelity router: %s (capacity %d)",
            ", ".join(f"{f} -> {a.name}" for f, a in self.routes.items()),
            self.capacity,
        )

    # ------------------------------------------------------------------ routes
    def capacity_of(self, fidelity: str) -> int:
        """How many jobs the adapter of ``fidelity`` runs at once (shared with the other
        fidelities it serves)."""
        return int(self._adapter(fidelity).capacity)

    def _adapter(self, fidelity: str) -> LabAdapter:
        adapter = self.routes.get(fidelity)
        if adapter is None:
            raise PermanentAdapterError(
                f"fidelity {fidelity!r} has no adapter here; this router serves "
                f"{sorted(self.routes)}"
            )
        return adapter

    def _route(self, handle: JobHandle) -> tuple[str, LabAdapter, JobHandle]:
        """The fidelity, its adapter and the adapter's own handle of a routed ``handle``."""
        route = routed_fidelity(handle)
        adapter = None if route is None else self.routes.get(route[1])
        if route is None or adapter is None:
            raise JobNotFoundError(
                f"job {handle.job_id} (adapter {handle.adapter!r}) was not routed by this "
                f"router, which serves {sorted(self.routes)}"
            )
        name, fidelity = route
        return fidelity, adapter, handle.model_copy(update={"adapter": name})

    # ------------------------------------------------------------------ contract
    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        """Submit to the adapter of ``request.parameters["fidelity"]``.

        Raises:
            PermanentAdapterError: the request names no fidelity, or one not served here.
        """
        if self._closed:
            raise PermanentAdapterError("the fidelity router is closed")
        fidelity = request.parameters.get(FIDELITY_PARAMETER)
        if not isinstance(fidelity, str) or not fidelity:
            raise PermanentAdapterError(
                f"request {request.candidate_id!r} names no fidelity (parameters"
                f"[{FIDELITY_PARAMETER!r}] is {fidelity!r}); this router serves "
                f"{sorted(self.routes)}"
            )
        adapter = self._adapter(fidelity)
        if fidelity not in self.send_fidelity:
            parameters = {k: v for k, v in request.parameters.items() if k != FIDELITY_PARAMETER}
            request = request.model_copy(update={"parameters": parameters})
        handle = adapter.submit(request, idempotency_key)
        return handle.model_copy(update={"adapter": f"{handle.adapter}@{fidelity}"})

    def poll(self, handle: JobHandle) -> JobStatus:
        _, adapter, own = self._route(handle)
        return adapter.poll(own)

    def result(self, handle: JobHandle) -> Measurement:
        fidelity, adapter, own = self._route(handle)
        measurement = adapter.result(own)
        provenance = {"fidelity": fidelity, "adapter": own.adapter, **measurement.provenance}
        return measurement.model_copy(update={"provenance": provenance})

    def cancel(self, handle: JobHandle) -> JobStatus:
        _, adapter, own = self._route(handle)
        return adapter.cancel(own)

    def close(self) -> None:
        """Close every distinct sub-adapter once (each close is attempted). Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for adapter in self.distinct:
            try:
                adapter.close()
            except Exception as exc:  # close the others; raise the first afterwards
                logger.warning("closing adapter %s failed: %s", adapter.name, exc)
                errors.append(exc)
        if errors:
            raise errors[0]
