"""Real DFT as an adapter: GPAW (plane waves, PBE) on small cells, one subprocess per job.

:class:`GpawAdapter` implements the adapter contract on this machine. Every job
runs in its own supervised subprocess (:mod:`adapters.local_jobs`) with its own
working directory and timeout, so a crash or hang of GPAW cannot take the
caller down, and its directory is named by the idempotency key, so a second
submit (from this or a restarted process) returns the first job. The worker
body is :mod:`adapters.dft_worker`.

Measured targets (``ExperimentRequest.targets``):

* ``total_energy`` (eV) of the submitted cell (= energy per atom x its atoms;
  the calculation itself may use the primitive cell);
* ``energy_per_atom`` (eV/atom);
* ``formation_energy_per_atom`` (eV/atom) against elemental references
  (:mod:`adapters.elemental_references`) computed with the same settings and
  cached in ``<work_dir>/references/gpaw.json``.

GPAW energies are relative to its PAW reference atoms (spherical, spin-paired
free atoms), not absolute like VASP's, so only differences (formation
energies) compare across codes.

``ExperimentRequest.parameters`` may override any physics setting of
:class:`GpawSettings` for one job (e.g. ``{"relax": true, "cutoff_ev": 500}``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

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
from adapters.local_jobs import JobSpec, SubprocessJobRunner, job_id_for_key
from cloud_model.errors import ConfigError

__all__ = ["GPAW_TARGET_UNITS", "GpawAdapter", "GpawJobResult", "GpawSettings", "default_work_dir"]

logger = logging.getLogger(__name__)

GPAW_TARGET_UNITS: dict[str, str] = {
    "total_energy": "eV",
    "energy_per_atom": "eV/atom",
    "formation_energy_per_atom": "eV/atom",
}
# Settings a request may not override (they belong to the adapter, not the calculation).
_ADAPTER_ONLY = frozenset({"work_dir", "max_parallel", "setup_path"})


def default_work_dir(code: str) -> Path:
    """``$CLOUDLAB_CACHE_DIR/<code>`` (default ``~/.cache/cloudlab/<code>``): jobs and references."""
    root = os.environ.get("CLOUDLAB_CACHE_DIR") or Path.home() / ".cache" / "cloudlab"
    return Path(root) / code


class GpawSettings(BaseModel):
    """How GPAW computes one structure. Physics defaults aim at ~10-20 meV/atom in
    formation energies of sp and 3d compounds; tests use lower cutoffs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- physics (part of the reference-energy cache key) ---
    cutoff_ev: float = Field(default=400.0, gt=0, description="plane-wave cutoff (eV)")
    kpoint_density: float = Field(
        default=3.5,
        gt=0,
        description="k-points per A^-1: n_i = max(1, ceil(2 pi |b_i| density)) (ASE's convention)",
    )
    gamma_centred: bool = Field(
        default=False,
        description="Gamma-centred grid (hexagonal cells); default: Monkhorst-Pack (shifted for even n)",
    )
    smearing_ev: float = Field(
        default=0.05, gt=0, description="Fermi-Dirac width; energies extrapolated to 0 K"
    )
    xc: Literal["PBE", "LDA", "RPBE", "revPBE"] = "PBE"
    spin: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="auto: spin-polarised iff a magnetic element (Cr Mn Fe Co Ni Gd) or O2",
    )
    setups: dict[str, str] = Field(
        default_factory=dict, description="GPAW setup names, e.g. {'Na': '1'}"
    )
    max_scf_iterations: int = Field(default=300, ge=10)
    primitive_cell: bool = Field(
        default=True, description="compute the primitive cell of the submitted structure"
    )
    relax_references: Literal["none", "volume", "full"] = Field(
        default="volume",
        description="elemental references: 'volume' fits a Birch-Murnaghan E(V) to 5 isotropic "
        "scalings (+-6 %) and recomputes at the minimum (energy only, so no Pulay-stress bias) "
        "and relaxes molecules' bonds; 'full' relaxes cell + positions (needs >~500 eV: Pulay "
        "stress); 'none' keeps ASE's experimental lattices (errors ~10-30 meV/atom for 4d/5d)",
    )
    reference_cifs: dict[str, str] = Field(
        default_factory=dict, description="element -> CIF override"
    )
    # --- relaxation of the submitted structure ---
    relax: bool = False
    relax_cell: bool = Field(
        default=True, description="with relax: also the cell (FrechetCellFilter)"
    )
    optimizer: Literal["BFGS", "FIRE"] = "BFGS"
    fmax_ev_per_a: float = Field(default=0.05, gt=0)
    max_relax_steps: int = Field(default=50, ge=1)
    # --- execution ---
    timeout_s: float = Field(
        default=3600.0, gt=0, description="per job, including any reference it computes"
    )
    threads: int = Field(default=1, ge=1, description="BLAS/OpenMP threads of each worker")
    max_parallel: int = Field(
        default=1, ge=1, description="workers running at once on this machine"
    )
    work_dir: Path = Field(default_factory=lambda: default_work_dir("gpaw"))
    setup_path: Path | None = Field(
        default=None, description="GPAW_SETUP_PATH; default: the gpaw-data wheel"
    )

    def reference_settings(self, gpaw_version: str, data_version: str) -> dict[str, Any]:
        """The settings that determine an elemental reference energy (its cache key's content)."""
        keys = (
            "cutoff_ev", "kpoint_density", "gamma_centred", "smearing_ev", "xc", "spin", "setups",
            "max_scf_iterations", "relax_references", "reference_cifs",
        )  # fmt: skip
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        if self.relax_references != "none":
            out.update(
                optimizer=self.optimizer, fmax=self.fmax_ev_per_a, steps=self.max_relax_steps
            )
        out.update(gpaw=gpaw_version, gpaw_data=data_version)
        return out


class GpawJobResult(BaseModel):
    """What the worker writes to ``result.json``."""

    model_config = ConfigDict(extra="forbid")

    formula: str
    n_atoms_submitted: int
    n_atoms_computed: int
    total_energy: float = Field(description="eV, of the submitted cell")
    energy_per_atom: float = Field(description="eV/atom")
    formation_energy_per_atom: float | None = Field(default=None, description="eV/atom")
    references: dict[str, float] = Field(default_factory=dict, description="element -> eV/atom")
    reference_descriptions: dict[str, str] = Field(default_factory=dict)
    reference_settings_hash: str | None = None
    kpoint_grid: tuple[int, int, int]
    spin_polarized: bool
    magnetic_moment: float | None = Field(
        default=None, description="Bohr magnetons per computed cell"
    )
    relaxed: bool
    relax_steps: int = 0
    relax_converged: bool | None = None
    max_force: float | None = Field(default=None, description="eV/A after relaxation")
    final_structure_cif: str | None = None
    calculation_wall_s: float = Field(description="this structure's SCF (+ relaxation) only")
    reference_wall_s: float = Field(default=0.0, description="references computed by this job")
    gpaw_version: str
    gpaw_data_version: str
    settings: dict[str, Any]


class GpawAdapter(LabAdapter):
    """DFT with GPAW in supervised subprocesses; see the module docstring.

    Args:
        settings: defaults for every job, as settings or their JSON dict. A request's
            ``parameters`` may override any field but ``work_dir``, ``max_parallel`` and
            ``setup_path`` (e.g. ``{"relax": true, "cutoff_ev": 500}``).
    """

    name = "gpaw"

    def __init__(self, settings: GpawSettings | Mapping[str, Any] | None = None) -> None:
        if settings is None or isinstance(settings, GpawSettings):
            self.settings = settings or GpawSettings()
        else:  # a JSON dict, e.g. from a campaign config crossing into a Ray actor
            try:
                self.settings = GpawSettings.model_validate(dict(settings))
            except ValidationError as exc:
                raise ConfigError(f"invalid {self.name} adapter settings: {exc}") from exc
        self.capacity = self.settings.max_parallel
        self.runner = SubprocessJobRunner(
            self.settings.work_dir, max_parallel=self.settings.max_parallel
        )

    def job_settings(self, request: ExperimentRequest) -> GpawSettings:
        """The default settings updated by ``request.parameters``."""
        forbidden = _ADAPTER_ONLY & request.parameters.keys()
        if forbidden:
            raise PermanentAdapterError(f"request parameters may not set {sorted(forbidden)}")
        try:
            return GpawSettings.model_validate({**self.settings.model_dump(), **request.parameters})
        except ValidationError as exc:
            raise PermanentAdapterError(
                f"invalid GPAW parameters in request {request.candidate_id!r}: {exc}"
            ) from exc

    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        unknown = set(request.targets) - GPAW_TARGET_UNITS.keys()
        if unknown:
            raise PermanentAdapterError(
                f"GPAW cannot measure {sorted(unknown)}; known targets: {sorted(GPAW_TARGET_UNITS)}"
            )
        if not request.structure_cif:
            raise PermanentAdapterError(f"request {request.candidate_id!r} has no structure_cif")
        _check_cif(request.structure_cif, request.candidate_id)
        settings = self.job_settings(request)
        env = {
            "OMP_NUM_THREADS": str(settings.threads),
            "OPENBLAS_NUM_THREADS": str(settings.threads),
        }
        if settings.setup_path is not None:
            env["GPAW_SETUP_PATH"] = str(settings.setup_path)
        spec = JobSpec(
            job_id=job_id_for_key(idempotency_key),
            idempotency_key=idempotency_key,
            request=request,
            settings=settings.model_dump(mode="json"),
            worker_module="adapters.dft_worker",
            timeout_s=settings.timeout_s,
            env=env,
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
        store = self.runner.store
        spec = store.spec(handle.job_id)
        record = store.record(handle.job_id)
        out = store.read_result(handle.job_id, GpawJobResult)
        values: dict[str, MeasuredValue] = {}
        for target in spec.request.targets:
            value = getattr(out, target)
            if value is None:
                raise PermanentAdapterError(f"job {handle.job_id} did not compute {target}")
            values[target] = MeasuredValue(value=value, unit=GPAW_TARGET_UNITS[target])
        provenance = {
            "code": "GPAW",
            "energy_zero": "GPAW PAW reference atoms (only energy differences compare across codes)",
            **out.model_dump(mode="json", exclude=set(GPAW_TARGET_UNITS)),
            "job_dir": str(store.path(handle.job_id)),
        }
        return Measurement(
            job_id=handle.job_id,
            candidate_id=spec.request.candidate_id,
            values=values,
            cost=record.cpu_s or 0.0,
            started_at=record.started_at,
            finished_at=record.finished_at or record.updated_at,
            provenance=provenance,
        )

    def cancel(self, handle: JobHandle) -> JobStatus:
        return self.runner.cancel(handle.job_id)


def _check_cif(cif: str, candidate_id: str) -> None:
    """Parse ``cif`` once in the caller so that a bad request fails at submit, not in the worker."""
    import warnings

    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(cif, fmt="cif")
    except (ValueError, IndexError, KeyError) as exc:
        raise PermanentAdapterError(f"cannot parse the CIF of {candidate_id!r}: {exc}") from exc
    if len(structure) == 0:
        raise PermanentAdapterError(f"the CIF of {candidate_id!r} has no atoms")


def gpaw_versions() -> tuple[str, str]:
    """Installed (gpaw, gpaw-data) versions; "none" for a missing one."""
    versions = []
    for dist in ("gpaw", "gpaw-data"):
        try:
            versions.append(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            versions.append("none")
    return versions[0], versions[1]
