"""An ML interatomic potential as an adapter: CHGNet (pretrained weights ship in its wheel).

:class:`ChgnetAdapter` measures energies, forces and stresses, optionally after a
relaxation (CHGNet's ``StructOptimizer``: FIRE or BFGS, FrechetCellFilter), and
formation energies against its own elemental references (the structures of
:mod:`adapters.elemental_references`, relaxed with CHGNet, cached in
``<work_dir>/references/chgnet.json``).

It fills in the local-job template (:class:`adapters.local_adapter.LocalJobAdapter`)
as GPAW's adapter does: each job runs in its own supervised worker process,
``python -m adapters.mlip <job_dir>`` (:func:`main`), which loads torch and the
model (~4 s of CPU), computes and writes ``result.json``; by default
(``warm_start``) the worker is instead forked from a server that did those
imports once (:func:`preload`, :mod:`adapters.warm_workers`). Timeout and cancel kill
that process, so they stop the work (see the template's docstring for why one
process per job). Jobs are durable and idempotent: each key gets a job
directory (:class:`adapters.local_jobs.JobDirectory`) holding its spec, state
and result, so a restarted caller reads finished jobs back, and a job whose
supervisor died mid-run is reported LOST rather than silently rerun.

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
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapters.elemental_references import (
    ReferenceCache,
    ReferenceEnergy,
    formation_energy_per_atom,
    reference_structure,
    settings_hash,
)
from adapters.local_adapter import LocalJobAdapter, LocalJobSettings, default_work_dir, parse_cif
from adapters.local_jobs import JobSpec, worker_main

__all__ = ["CHGNET_TARGET_UNITS", "ChgnetAdapter", "ChgnetJobResult", "ChgnetSettings"]

logger = logging.getLogger(__name__)

CHGNET_TARGET_UNITS: dict[str, str] = {
    "total_energy": "eV",
    "energy_per_atom": "eV/atom",
    "formation_energy_per_atom": "eV/atom",
    "max_force": "eV/A",
    "pressure": "GPa",
}


class ChgnetSettings(LocalJobSettings):
    """How CHGNet computes one structure."""

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
    timeout_s: float = Field(
        default=600.0, gt=0, description="per job, including the worker's start (~3 s)"
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None: torch's")
    warm_start: bool = Field(
        default=True,
        description="fork workers from a server that imported torch and CHGNet once (saves ~4 s "
        "of CPU per job; adapters.warm_workers)",
    )
    # max_parallel: see LocalJobSettings
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


class ChgnetAdapter(LocalJobAdapter[ChgnetSettings, ChgnetJobResult]):
    """CHGNet in supervised worker processes; see the module docstring.

    Args:
        settings: defaults for every job, as settings or their JSON dict. A request's
            ``parameters`` may override any field but ``work_dir``, ``max_parallel``,
            ``warm_start``, ``model_version`` and ``threads`` (e.g. ``{"relax": true}``).
    """

    name = "chgnet"
    code = "CHGNet"
    settings_model = ChgnetSettings
    result_model = ChgnetJobResult
    target_units = CHGNET_TARGET_UNITS
    worker_module = "adapters.mlip"
    adapter_only = frozenset({"model_version", "threads"})

    def job_env(self, settings: ChgnetSettings) -> dict[str, str]:
        if settings.threads is None:
            return {}
        n = str(settings.threads)
        return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}


# --------------------------------------------------------------------------- worker process


class ChgnetCalculator:
    """The CHGNet model and its optimizers in a worker process, loaded on first use."""

    def __init__(self, model_version: str, threads: int | None) -> None:
        self.model_version = model_version
        self.threads = threads
        self._model: Any = None
        self._optimizers: dict[str, Any] = {}  # optimizer name -> chgnet StructOptimizer

    def model(self) -> Any:
        """The CHGNet model (~0.1 s to load once torch is imported)."""
        if self._model is None:
            from chgnet.model import CHGNet

            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            if self.threads is not None:
                import torch

                torch.set_num_threads(self.threads)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()) as captured:  # CHGNet prints its banner
                self._model = CHGNet.load(
                    model_name=self.model_version, use_device="cpu", verbose=False
                )
            logger.info("loaded CHGNet %s in %.1f s (%s)", self.model_version,
                        time.perf_counter() - t0, captured.getvalue().strip())  # fmt: skip
        return self._model

    def compute(self, spec: JobSpec) -> ChgnetJobResult:
        """One job: the (relaxed) structure's energy, forces, stress and formation energy."""
        from pymatgen.io.cif import CifWriter

        settings = ChgnetSettings.model_validate(spec.settings)
        structure = parse_cif(spec.request.structure_cif or "", spec.request.candidate_id)
        self.model()  # loaded before the clock starts: calculation_wall_s is this structure's
        t0 = time.perf_counter()
        steps = 0
        if settings.relax:
            structure, steps = self.relax(structure, settings, relax_cell=settings.relax_cell)
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
            cache = ReferenceCache(settings.work_dir / "references" / "chgnet.json")
            for element in sorted(composition):

                def compute_this(el: str = element) -> ReferenceEnergy:
                    return self.reference(el, settings, ref_key)

                references[element] = cache.get_or_compute(element, ref_key, compute_this)
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

    def relax(
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

    def reference(self, element: str, settings: ChgnetSettings, key: str) -> ReferenceEnergy:
        from pymatgen.io.ase import AseAtomsAdaptor

        ref = reference_structure(element, custom_cif=settings.reference_cifs.get(element))
        structure = AseAtomsAdaptor.get_structure(ref.atoms)
        t0 = time.perf_counter()
        if settings.relax_references:
            structure, _ = self.relax(structure, settings, relax_cell=ref.kind == "bulk")
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


def _chgnet_version() -> str:
    try:
        return importlib.metadata.version("chgnet")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def preload() -> None:
    """What a warm server imports once for all its workers (no torch kernel runs here)."""
    import chgnet.model  # noqa: F401  torch, pymatgen and CHGNet: ~4 s
    import pymatgen.io.cif  # noqa: F401


def compute(spec: JobSpec, job_dir: Path) -> ChgnetJobResult:
    """The worker's job body (see :func:`adapters.local_jobs.run_worker`)."""
    settings = ChgnetSettings.model_validate(spec.settings)
    return ChgnetCalculator(settings.model_version, settings.threads).compute(spec)


def main(argv: list[str] | None = None) -> int:
    return worker_main("adapters.mlip", compute, argv)


if __name__ == "__main__":
    raise SystemExit(main())
