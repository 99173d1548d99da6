"""The template of the adapters that compute on this machine (GPAW, CHGNet).

:class:`LocalJobAdapter` implements the whole adapter contract once: settings
(given as a model or its JSON dict, overridable per request), request checks,
submit (a :class:`~adapters.local_jobs.JobSpec` in a job directory named by the
idempotency key), poll, result (the worker's ``result.json`` turned into a
:class:`~adapters.base.Measurement`), cancel and close. A subclass fills in

* ``settings_model`` (a :class:`LocalJobSettings`), ``result_model`` (what the
  worker writes), ``target_units`` (target -> unit), ``worker_module`` (run as
  ``python -m <worker_module> <job_dir>``, whose ``main`` calls
  :func:`adapters.local_jobs.run_worker` with the compute function);
* ``adapter_only``: settings a request may not override, besides ``work_dir``
  and ``max_parallel``;
* :meth:`~LocalJobAdapter.job_env` (the worker's extra environment) and
  :meth:`~LocalJobAdapter.provenance` (what the measurement records besides the
  values).

Timeouts: one mechanism for every local job. Each job runs in its own worker
process under a supervisor (:class:`adapters.local_jobs.SubprocessJobRunner`),
which measures wall-clock time from the worker's start and, past
``timeout_s``, kills the worker's process group (SIGTERM, then SIGKILL) and
records FAILED "timed out ...". Cancel goes the same way (CANCELLED, worker
killed). Only a process can be stopped from outside whatever it is doing: a
GPAW SCF step or a torch kernel never checks a flag, and a Python thread
cannot be killed, so a thread-based limit could only mark a job failed while
its work went on using the CPU. The price is a process start per job (for
CHGNet ~4 s of CPU importing torch and CHGNet, against ~0.05 s for a static
evaluation); ``warm_start`` forks the worker from a server that imported the
worker module once instead (:mod:`adapters.warm_workers`), still one process
per job, watched and killed by its supervisor. A job whose
supervisor vanished without a final state (kill -9, reboot) is reported LOST,
and a resubmit of its key returns the LOST job rather than computing again.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.base import (
    ExperimentRequest,
    JobHandle,
    JobState,
    JobStatus,
    LabAdapter,
    MeasuredValue,
    Measurement,
    PermanentAdapterError,
    ResultNotReadyError,
)
from adapters.local_jobs import JobDirectory, JobSpec, SubprocessJobRunner, job_id_for_key
from cloud_model.errors import ConfigError

__all__ = ["LocalJobAdapter", "LocalJobSettings", "default_work_dir", "parse_cif"]

logger = logging.getLogger(__name__)


def default_work_dir(code: str) -> Path:
    """``$CLOUDLAB_CACHE_DIR/<code>`` (default ``~/.cache/cloudlab/<code>``): jobs and references."""
    root = os.environ.get("CLOUDLAB_CACHE_DIR") or Path.home() / ".cache" / "cloudlab"
    return Path(root) / code


class LocalJobSettings(BaseModel):
    """The execution settings every local adapter has; subclasses add the physics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(
        default=600.0, gt=0, description="wall-clock limit of one job's worker process"
    )
    max_parallel: int = Field(
        default=1, ge=1, description="workers running at once on this machine"
    )
    work_dir: Path = Field(description="holds jobs/, slots/ and references/")
    warm_start: bool = Field(
        default=False,
        description="fork each worker from a server that imported the worker module once "
        "(adapters.warm_workers) instead of starting Python afresh",
    )


_S = TypeVar("_S", bound=LocalJobSettings)
_R = TypeVar("_R", bound=BaseModel)


def parse_cif(cif: str, candidate_id: str) -> Any:
    """The pymatgen ``Structure`` of ``cif``.

    Raises:
        PermanentAdapterError: the CIF does not parse or has no atoms.
    """
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(cif, fmt="cif")
    except (ValueError, IndexError, KeyError) as exc:
        raise PermanentAdapterError(f"cannot parse the CIF of {candidate_id!r}: {exc}") from exc
    if len(structure) == 0:
        raise PermanentAdapterError(f"the CIF of {candidate_id!r} has no atoms")
    return structure


class LocalJobAdapter(LabAdapter, Generic[_S, _R]):
    """Jobs computed by supervised worker processes on this machine; see the module docstring.

    Args:
        settings: defaults for every job, as settings or their JSON dict (e.g. from a
            campaign config crossing into a Ray actor). A request's ``parameters`` may
            override any field but ``work_dir``, ``max_parallel``, ``warm_start`` and
            ``adapter_only``.

    Raises:
        ConfigError: ``settings`` is a dict that does not validate.
    """

    code: str  # the code's name in messages and provenance, e.g. "GPAW"
    settings_model: type[_S]
    result_model: type[_R]
    target_units: Mapping[str, str]
    worker_module: str
    adapter_only: frozenset[str] = frozenset()

    def __init__(self, settings: _S | Mapping[str, Any] | None = None) -> None:
        if settings is None:
            self.settings = self.settings_model.model_validate({})  # its defaults
        elif isinstance(settings, self.settings_model):
            self.settings = settings
        else:
            try:
                self.settings = self.settings_model.model_validate(dict(settings))
            except ValidationError as exc:
                raise ConfigError(f"invalid {self.name} adapter settings: {exc}") from exc
        self.capacity = self.settings.max_parallel
        self.runner = SubprocessJobRunner(
            self.settings.work_dir, max_parallel=self.settings.max_parallel
        )
        self._closed = False

    @property
    def store(self) -> JobDirectory:
        """The job directories under ``work_dir/jobs``."""
        return self.runner.store

    # ------------------------------------------------------------------ hooks

    def job_env(self, settings: _S) -> dict[str, str]:
        """Extra environment of the worker of a job with ``settings``."""
        return {}

    def provenance(self, result: _R, job_dir: Path) -> dict[str, Any]:
        """What a measurement records besides its values: the code and the worker's output."""
        return {"code": self.code, **result.model_dump(mode="json", exclude=set(self.target_units))}

    # ------------------------------------------------------------------ contract

    def job_settings(self, request: ExperimentRequest) -> _S:
        """The default settings updated by ``request.parameters``.

        Raises:
            PermanentAdapterError: a parameter is adapter-only or invalid.
        """
        fixed = {"work_dir", "max_parallel", "warm_start"} | self.adapter_only
        forbidden = fixed & request.parameters.keys()
        if forbidden:
            raise PermanentAdapterError(f"request parameters may not set {sorted(forbidden)}")
        try:
            return self.settings_model.model_validate(
                {**self.settings.model_dump(), **request.parameters}
            )
        except ValidationError as exc:
            raise PermanentAdapterError(
                f"invalid {self.code} parameters in request {request.candidate_id!r}: {exc}"
            ) from exc

    def check_request(self, request: ExperimentRequest) -> _S:
        """Fail at submit, not in the worker: known targets, a parseable CIF, valid parameters.

        Returns:
            The job's settings.
        """
        unknown = set(request.targets) - self.target_units.keys()
        if unknown:
            raise PermanentAdapterError(
                f"{self.code} cannot measure {sorted(unknown)}; "
                f"known targets: {sorted(self.target_units)}"
            )
        if not request.structure_cif:
            raise PermanentAdapterError(f"request {request.candidate_id!r} has no structure_cif")
        parse_cif(request.structure_cif, request.candidate_id)
        return self.job_settings(request)

    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        if self._closed:
            raise PermanentAdapterError(f"the {self.code} adapter is closed")
        settings = self.check_request(request)
        spec = JobSpec(
            job_id=job_id_for_key(idempotency_key),
            idempotency_key=idempotency_key,
            request=request,
            settings=settings.model_dump(mode="json"),
            worker_module=self.worker_module,
            timeout_s=settings.timeout_s,
            env=self.job_env(settings),
            warm_start=settings.warm_start,
        )
        stored, created = self.runner.submit(spec)
        if not created:
            logger.info(
                "key %r already has job %s; not starting another", idempotency_key, stored.job_id
            )
        return JobHandle(
            adapter=self.name,
            job_id=stored.job_id,
            idempotency_key=idempotency_key,
            candidate_id=stored.request.candidate_id,
            submitted_at=stored.submitted_at,
        )

    def poll(self, handle: JobHandle) -> JobStatus:
        return self.runner.status(handle.job_id)

    def result(self, handle: JobHandle) -> Measurement:
        status = self.poll(handle)
        if status.state is not JobState.SUCCEEDED:
            raise ResultNotReadyError(f"job {handle.job_id} is {status.state}: {status.message}")
        spec = self.store.spec(handle.job_id)
        record = self.store.record(handle.job_id)
        out = self.store.read_result(handle.job_id, self.result_model)
        values: dict[str, MeasuredValue] = {}
        for target in spec.request.targets:
            value = getattr(out, target)
            if value is None:
                raise PermanentAdapterError(f"job {handle.job_id} did not compute {target}")
            values[target] = MeasuredValue(value=value, unit=self.target_units[target])
        return Measurement(
            job_id=handle.job_id,
            candidate_id=spec.request.candidate_id,
            values=values,
            cost=record.cpu_s or 0.0,
            started_at=record.started_at,
            finished_at=record.finished_at or record.updated_at,
            provenance=self.provenance(out, self.store.path(handle.job_id)),
        )

    def cancel(self, handle: JobHandle) -> JobStatus:
        return self.runner.cancel(handle.job_id)

    def close(self) -> None:
        """Accept no more jobs. Submitted jobs go on under their supervisors (a restarted
        adapter on the same ``work_dir`` finds them); cancel them first to stop them."""
        self._closed = True
