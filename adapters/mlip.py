"""An ML interatomic potential as an adapter: CHGNet (pretrained weights ship in its wheel).

:class:`ChgnetAdapter` measures energies, forces and stresses, optionally after a
relaxation (CHGNet's ``StructOptimizer``: FIRE or BFGS, FrechetCellFilter), and
formation energies against its own elemental references (the structures of
:mod:`adapters.elemental_references`, relaxed with CHGNet, cached in
``<work_dir>/references/chgnet.json``).

Jobs run **in process, on one worker thread**, not in a subprocess as GPAW's do:
loading torch and the model costs ~4-6 s while a static CHGNet evaluation of a
small cell takes ~0.05 s and a relaxation ~1-5 s, so a process per job would
spend most of its time starting up. The dispatcher already runs each adapter
inside a Ray actor (its own process), which is the isolation boundary if CHGNet
ever crashes. Jobs are still durable and idempotent: each key gets a job
directory (:class:`adapters.local_jobs.JobDirectory`) holding its spec, state
and result, so a restarted caller reads finished jobs back, and a job whose
process died mid-run is reported LOST rather than silently rerun.

A thread cannot be killed: on timeout or cancel the job is marked FAILED or
CANCELLED at once and its late result is discarded.

Targets: ``total_energy`` (eV), ``energy_per_atom`` (eV/atom),
``formation_energy_per_atom`` (eV/atom), ``max_force`` (eV/A), ``pressure``
(GPa, -trace(stress)/3); forces (n x 3, eV/A), stress (3 x 3, GPa) and magnetic
moments go to the provenance.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
import threading
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
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
    utcnow,
)
from adapters.dft import default_work_dir
from adapters.elemental_references import (
    ReferenceCache,
    ReferenceEnergy,
    formation_energy_per_atom,
    reference_structure,
    settings_hash,
)
from adapters.local_jobs import JobDirectory, JobSpec, job_id_for_key
from cloud_model.errors import ConfigError

__all__ = ["CHGNET_TARGET_UNITS", "ChgnetAdapter", "ChgnetJobResult", "ChgnetSettings"]

logger = logging.getLogger(__name__)

CHGNET_TARGET_UNITS: dict[str, str] = {
    "total_energy": "eV",
    "energy_per_atom": "eV/atom",
    "formation_energy_per_atom": "eV/atom",
    "max_force": "eV/A",
    "pressure": "GPa",
}
_ADAPTER_ONLY = frozenset({"work_dir", "model_version", "threads"})


class ChgnetSettings(BaseModel):
    """How CHGNet computes one structure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_version: Literal["0.3.0", "0.2.0"] = Field(
        default="0.3.0", description="pretrained MPtrj weights shipped in the chgnet wheel"
    )
    relax: bool = False
    relax_cell: bool = Field(default=True, description="with relax: also the cell")
    optimizer: Literal["FIRE", "BFGS"] = "FIRE"
    fmax_ev_per_a: float = Field(default=0.05, gt=0)
    max_relax_steps: int = Field(default=500, ge=1)
    relax_references: bool = Field(
        default=True, description="relax elemental references (cheap; CHGNet stress is analytic)"
    )
    reference_cifs: dict[str, str] = Field(default_factory=dict, description="element -> CIF")
    timeout_s: float = Field(default=600.0, gt=0)
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None: torch's")
    work_dir: Path = Field(default_factory=lambda: default_work_dir("chgnet"))

    def reference_settings(self, chgnet_version: str) -> dict[str, Any]:
        """The settings that determine an elemental reference energy (cache key content)."""
        out: dict[str, Any] = {
            "model": self.model_version,
            "chgnet": chgnet_version,
            "relax_references": self.relax_references,
            "reference_cifs": self.reference_cifs,
        }
        if self.relax_references:
            out.update(
                optimizer=self.optimizer, fmax=self.fmax_ev_per_a, steps=self.max_relax_steps
            )
        return out


class ChgnetJobResult(BaseModel):
    """One CHGNet job's output (``result.json``)."""

    model_config = ConfigDict(extra="forbid")

    formula: str
    n_atoms: int
    total_energy: float = Field(description="eV")
    energy_per_atom: float = Field(description="eV/atom")
    formation_energy_per_atom: float | None = Field(default=None, description="eV/atom")
    max_force: float = Field(description="eV/A, largest per-atom force norm")
    pressure: float = Field(description="GPa, -trace(stress)/3")
    forces: list[list[float]] = Field(description="n_atoms x 3, eV/A")
    stress: list[list[float]] = Field(description="3 x 3, GPa (ASE sign: positive = tensile)")
    magnetic_moments: list[float] = Field(description="n_atoms, Bohr magnetons")
    references: dict[str, float] = Field(default_factory=dict, description="element -> eV/atom")
    reference_descriptions: dict[str, str] = Field(default_factory=dict)
    reference_settings_hash: str | None = None
    relaxed: bool
    relax_steps: int = 0
    final_structure_cif: str | None = None
    calculation_wall_s: float
    reference_wall_s: float = 0.0
    chgnet_version: str
    model_version: str
    settings: dict[str, Any]


class ChgnetAdapter(LabAdapter):
    """CHGNet on a worker thread of this process; see the module docstring.

    Args:
        settings: defaults for every job, as settings or their JSON dict. A request's
            ``parameters`` may override any field but ``work_dir``, ``model_version`` and
            ``threads`` (e.g. ``{"relax": true}``).
    """

    name = "chgnet"
    capacity = 1

    def __init__(self, settings: ChgnetSettings | Mapping[str, Any] | None = None) -> None:
        if settings is None or isinstance(settings, ChgnetSettings):
            self.settings = settings or ChgnetSettings()
        else:  # a JSON dict, e.g. from a campaign config crossing into a Ray actor
            try:
                self.settings = ChgnetSettings.model_validate(dict(settings))
            except ValidationError as exc:
                raise ConfigError(f"invalid {self.name} adapter settings: {exc}") from exc
        self.store = JobDirectory(self.settings.work_dir)
        self.references = ReferenceCache(self.settings.work_dir / "references" / "chgnet.json")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chgnet")
        self._futures: dict[str, Future[None]] = {}
        self._lock = threading.Lock()  # guards state transitions between caller and worker thread
        self._model: Any = None
        self._optimizers: dict[str, Any] = {}  # optimizer name -> chgnet StructOptimizer
        self._closed = False

    # ------------------------------------------------------------------ contract

    def job_settings(self, request: ExperimentRequest) -> ChgnetSettings:
        """The default settings updated by ``request.parameters``."""
        forbidden = _ADAPTER_ONLY & request.parameters.keys()
        if forbidden:
            raise PermanentAdapterError(f"request parameters may not set {sorted(forbidden)}")
        try:
            return ChgnetSettings.model_validate(
                {**self.settings.model_dump(), **request.parameters}
            )
        except ValidationError as exc:
            raise PermanentAdapterError(
                f"invalid CHGNet parameters in request {request.candidate_id!r}: {exc}"
            ) from exc

    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        if self._closed:
            raise PermanentAdapterError("the CHGNet adapter is closed")
        unknown = set(request.targets) - CHGNET_TARGET_UNITS.keys()
        if unknown:
            raise PermanentAdapterError(
                f"CHGNet cannot measure {sorted(unknown)}; known targets: {sorted(CHGNET_TARGET_UNITS)}"
            )
        if not request.structure_cif:
            raise PermanentAdapterError(f"request {request.candidate_id!r} has no structure_cif")
        _parse_cif(request.structure_cif, request.candidate_id)
        settings = self.job_settings(request)
        spec = JobSpec(
            job_id=job_id_for_key(idempotency_key),
            idempotency_key=idempotency_key,
            request=request,
            settings=settings.model_dump(mode="json"),
            worker_module="adapters.mlip",
            timeout_s=settings.timeout_s,
        )
        with self._lock:
            stored, created = self.store.create(spec)
            if created:
                self.store.adopt(spec.job_id, os.getpid())
                self._futures[spec.job_id] = self._executor.submit(self._run, spec.job_id)
            else:
                logger.info(
                    "key %r already has job %s; not starting another",
                    idempotency_key,
                    stored.job_id,
                )
        return JobHandle(
            adapter=self.name,
            job_id=stored.job_id,
            idempotency_key=idempotency_key,
            candidate_id=stored.request.candidate_id,
            submitted_at=stored.submitted_at,
        )

    def poll(self, handle: JobHandle) -> JobStatus:
        job_id = handle.job_id
        with self._lock:
            status = self.store.status(job_id)
            if status.state is JobState.RUNNING:
                record = self.store.record(job_id)
                spec = self.store.spec(job_id)
                started = record.started_at or record.updated_at
                elapsed = (utcnow() - started).total_seconds()
                if elapsed > spec.timeout_s:
                    self.store.update(
                        job_id,
                        JobState.FAILED,
                        f"timed out after {elapsed:.1f} s (limit {spec.timeout_s:g} s); result discarded",
                    )
                    status = self.store.status(job_id)
        return status

    def result(self, handle: JobHandle) -> Measurement:
        status = self.poll(handle)
        if status.state is not JobState.SUCCEEDED:
            raise ResultNotReadyError(f"job {handle.job_id} is {status.state}: {status.message}")
        spec = self.store.spec(handle.job_id)
        record = self.store.record(handle.job_id)
        out = self.store.read_result(handle.job_id, ChgnetJobResult)
        values: dict[str, MeasuredValue] = {}
        for target in spec.request.targets:
            value = getattr(out, target)
            if value is None:
                raise PermanentAdapterError(f"job {handle.job_id} did not compute {target}")
            values[target] = MeasuredValue(value=value, unit=CHGNET_TARGET_UNITS[target])
        return Measurement(
            job_id=handle.job_id,
            candidate_id=spec.request.candidate_id,
            values=values,
            cost=record.cpu_s or 0.0,
            started_at=record.started_at,
            finished_at=record.finished_at or record.updated_at,
            provenance={
                "code": "CHGNet",
                **out.model_dump(mode="json", exclude=set(CHGNET_TARGET_UNITS)),
            },
        )

    def cancel(self, handle: JobHandle) -> JobStatus:
        with self._lock:
            future = self._futures.get(handle.job_id)
            if future is not None and future.cancel():
                self.store.update(handle.job_id, JobState.CANCELLED, "cancelled while queued")
            else:
                self.store.update(
                    handle.job_id, JobState.CANCELLED, "cancelled; a running result is discarded"
                )
            return self.store.status(handle.job_id)

    def close(self) -> None:
        """Stop accepting jobs, cancel queued ones and wait for the running one."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for job_id, future in self._futures.items():
                if future.cancel():
                    self.store.update(
                        job_id, JobState.CANCELLED, "adapter closed before the job ran"
                    )
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ worker thread

    @property
    def model_loaded(self) -> bool:
        """Whether this adapter has loaded the CHGNet weights (it does so on its first job)."""
        return self._model is not None

    def model(self) -> Any:
        """The CHGNet model, loaded on first use (~3 s) and kept."""
        if self._model is None:
            from chgnet.model import CHGNet

            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            if self.settings.threads is not None:
                import torch

                torch.set_num_threads(self.settings.threads)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()) as captured:  # CHGNet prints its banner
                self._model = CHGNet.load(
                    model_name=self.settings.model_version, use_device="cpu", verbose=False
                )
            logger.info("loaded CHGNet %s in %.1f s (%s)", self.settings.model_version,
                        time.perf_counter() - t0, captured.getvalue().strip())  # fmt: skip
        return self._model

    def _run(self, job_id: str) -> None:
        with self._lock:
            record = self.store.update(job_id, JobState.RUNNING, "computing", started_at=utcnow())
        if record.state is not JobState.RUNNING:
            return
        cpu0 = time.thread_time()
        try:
            result = self._compute(self.store.spec(job_id))
        except Exception as exc:  # thread boundary: every failure must reach the job's state
            logger.exception("CHGNet job %s failed", job_id)
            with self._lock:
                self.store.update(job_id, JobState.FAILED, f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            if not self.store.record(job_id).state.is_terminal:
                self.store.write_result(job_id, result)
                self.store.update(
                    job_id, JobState.SUCCEEDED, "done", cpu_s=time.thread_time() - cpu0
                )

    def _compute(self, spec: JobSpec) -> ChgnetJobResult:
        from pymatgen.io.cif import CifWriter

        settings = ChgnetSettings.model_validate(spec.settings)
        structure = _parse_cif(spec.request.structure_cif or "", spec.request.candidate_id)
        t0 = time.perf_counter()
        steps = 0
        if settings.relax:
            structure, steps = self._relax(structure, settings, relax_cell=settings.relax_cell)
        prediction = self.model().predict_structure(structure, task="efsm")
        wall = time.perf_counter() - t0
        energy_per_atom = float(prediction["e"])
        forces = np.asarray(prediction["f"], dtype=float)  # (n_atoms, 3)
        stress = np.asarray(prediction["s"], dtype=float)  # (3, 3), GPa
        composition = {el.symbol: amount for el, amount in structure.composition.items()}

        references: dict[str, ReferenceEnergy] = {}
        key: str | None = None
        t1 = time.perf_counter()
        if "formation_energy_per_atom" in spec.request.targets:
            ref_key = key = settings_hash(settings.reference_settings(_chgnet_version()))
            for element in sorted(composition):

                def compute_this(el: str = element) -> ReferenceEnergy:
                    return self._reference(el, settings, ref_key)

                references[element] = self.references.get_or_compute(element, ref_key, compute_this)
        formation = None
        if references:
            formation = formation_energy_per_atom(
                energy_per_atom, composition, {e: r.energy_per_atom for e, r in references.items()}
            )
        return ChgnetJobResult(
            formula=structure.composition.reduced_formula,
            n_atoms=len(structure),
            total_energy=energy_per_atom * len(structure),
            energy_per_atom=energy_per_atom,
            formation_energy_per_atom=formation,
            max_force=float(np.linalg.norm(forces, axis=1).max()),
            pressure=float(-np.trace(stress) / 3.0),
            forces=forces.tolist(),
            stress=stress.tolist(),
            magnetic_moments=np.asarray(prediction["m"], dtype=float).ravel().tolist(),
            references={e: r.energy_per_atom for e, r in references.items()},
            reference_descriptions={e: r.description for e, r in references.items()},
            reference_settings_hash=key,
            relaxed=settings.relax,
            relax_steps=steps,
            final_structure_cif=str(CifWriter(structure)) if settings.relax else None,
            calculation_wall_s=wall,
            reference_wall_s=time.perf_counter() - t1,
            chgnet_version=_chgnet_version(),
            model_version=settings.model_version,
            settings=settings.model_dump(mode="json"),
        )

    def _relax(
        self, structure: Any, settings: ChgnetSettings, *, relax_cell: bool
    ) -> tuple[Any, int]:
        from chgnet.model import StructOptimizer

        optimizer = self._optimizers.get(settings.optimizer)
        if optimizer is None:
            model = self.model()
            with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints the device it uses
                optimizer = StructOptimizer(model=model, optimizer_class=settings.optimizer)
            self._optimizers[settings.optimizer] = optimizer
        out = optimizer.relax(
            structure,
            fmax=settings.fmax_ev_per_a,
            steps=settings.max_relax_steps,
            relax_cell=relax_cell,
            verbose=False,
        )
        trajectory: Any = out["trajectory"]
        return out["final_structure"], len(trajectory.energies)

    def _reference(self, element: str, settings: ChgnetSettings, key: str) -> ReferenceEnergy:
        from pymatgen.io.ase import AseAtomsAdaptor

        ref = reference_structure(element, custom_cif=settings.reference_cifs.get(element))
        structure = AseAtomsAdaptor.get_structure(ref.atoms)
        t0 = time.perf_counter()
        if settings.relax_references:
            structure, _ = self._relax(structure, settings, relax_cell=ref.kind == "bulk")
        energy = float(self.model().predict_structure(structure, task="e")["e"])
        return ReferenceEnergy(
            element=element,
            energy_per_atom=energy,
            kind=ref.kind,
            description=ref.description,
            settings_hash=key,
            n_atoms=len(structure),
            volume_per_atom=structure.volume / len(structure),
            relaxed=settings.relax_references,
            code=f"chgnet {_chgnet_version()} model {settings.model_version}",
            wall_s=time.perf_counter() - t0,
        )


def _parse_cif(cif: str, candidate_id: str) -> Any:
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


def _chgnet_version() -> str:
    try:
        return importlib.metadata.version("chgnet")
    except importlib.metadata.PackageNotFoundError:
        return "none"
