"""Real DFT as an adapter: GPAW (plane waves, PBE) on small cells, one subprocess per job.

:class:`GpawAdapter` fills in the local-job template
(:class:`adapters.local_adapter.LocalJobAdapter`). Every job runs in its own
supervised subprocess (:mod:`adapters.local_jobs`) with its own working
directory and timeout, so a crash or hang of GPAW cannot take the
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
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.local_adapter import LocalJobAdapter, LocalJobSettings, default_work_dir

__all__ = ["GPAW_TARGET_UNITS", "GpawAdapter", "GpawJobResult", "GpawSettings", "default_work_dir"]

logger = logging.getLogger(__name__)

GPAW_TARGET_UNITS: dict[str, str] = {
    "total_energy": "eV",
    "energy_per_atom": "eV/atom",
    "formation_energy_per_atom": "eV/atom",
}


class GpawSettings(LocalJobSettings):
    """How GPAW computes one structure. Physics defaults aim at ~10-20 meV/atom in
    formation energies of sp and 3d compounds; tests use lower cutoffs."""

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
    # max_parallel: see LocalJobSettings
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


class GpawAdapter(LocalJobAdapter[GpawSettings, GpawJobResult]):
    """DFT with GPAW in supervised subprocesses; see the module docstring.

    Args:
        settings: defaults for every job, as settings or their JSON dict. A request's
            ``parameters`` may override any field but ``work_dir``, ``max_parallel`` and
            ``setup_path`` (e.g. ``{"relax": true, "cutoff_ev": 500}``).
    """

    name = "gpaw"
    code = "GPAW"
    settings_model = GpawSettings
    result_model = GpawJobResult
    target_units = GPAW_TARGET_UNITS
    worker_module = "adapters.dft_worker"
    adapter_only = frozenset({"setup_path"})

    def job_env(self, settings: GpawSettings) -> dict[str, str]:
        env = {
            "OMP_NUM_THREADS": str(settings.threads),
            "OPENBLAS_NUM_THREADS": str(settings.threads),
        }
        if settings.setup_path is not None:
            env["GPAW_SETUP_PATH"] = str(settings.setup_path)
        return env

    def provenance(self, result: GpawJobResult, job_dir: Path) -> dict[str, Any]:
        return {
            "code": self.code,
            "energy_zero": "GPAW PAW reference atoms (only energy differences compare across codes)",
            **result.model_dump(mode="json", exclude=set(self.target_units)),
            "job_dir": str(job_dir),
        }


def gpaw_versions() -> tuple[str, str]:
    """Installed (gpaw, gpaw-data) versions; "none" for a missing one."""
    versions = []
    for dist in ("gpaw", "gpaw-data"):
        try:
            versions.append(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            versions.append("none")
    return versions[0], versions[1]
