"""The GPAW job body: ``python -m adapters.dft_worker <job_dir>`` (started by the supervisor).

Reads ``spec.json``, computes the structure (and the elemental references it
needs for a formation energy, through the shared cache) and writes
``result.json``; any failure goes to ``error.json``. GPAW's own log is
``gpaw.txt`` in the job directory, the references' logs sit beside their cache.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from adapters.base import PermanentAdapterError
from adapters.dft import GpawJobResult, GpawSettings, gpaw_versions
from adapters.elemental_references import (
    INITIAL_MAGNETIC_MOMENTS,
    ReferenceCache,
    ReferenceEnergy,
    formation_energy_per_atom,
    reference_structure,
    settings_hash,
)
from adapters.local_jobs import JobSpec, worker_main

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalculationOutcome:
    """One GPAW calculation (SCF, or a relaxation ending in one)."""

    atoms: Atoms
    energy: float  # eV, extrapolated to zero smearing
    kpoint_grid: tuple[int, int, int]
    spin_polarized: bool
    magnetic_moment: float | None
    relax_steps: int
    relax_converged: bool | None
    max_force: float | None
    wall_s: float


def kpoint_grid(atoms: Atoms, density: float, *, molecule: bool = False) -> tuple[int, int, int]:
    """Monkhorst-Pack sizes n_i = max(1, ceil(2 pi |b_i| density)); (1, 1, 1) for a molecule."""
    if molecule:
        return (1, 1, 1)
    from ase.calculators.calculator import kptdensity2monkhorstpack

    sizes = kptdensity2monkhorstpack(atoms, kptdensity=density, even=False)
    return (max(1, int(sizes[0])), max(1, int(sizes[1])), max(1, int(sizes[2])))


def check_setups(elements: set[str], settings: GpawSettings) -> None:
    """Fail clearly when GPAW cannot find a PAW setup for an element."""
    import gpaw

    paths = [Path(p) for p in gpaw.setup_paths]
    if not paths:
        raise PermanentAdapterError(
            "GPAW has no PAW setup directory: install the gpaw-data wheel (pip install gpaw-data) "
            "or set GPAW_SETUP_PATH / the adapter's setup_path"
        )
    for element in sorted(elements):
        name = settings.setups.get(element)
        stem = (
            f"{element}.{name}.{settings.xc}"
            if name and name != "paw"
            else f"{element}.{settings.xc}"
        )
        if not any((p / f"{stem}.gz").exists() or (p / stem).exists() for p in paths):
            raise PermanentAdapterError(f"no GPAW setup {stem} in {', '.join(map(str, paths))}")


def calculate(
    atoms: Atoms,
    settings: GpawSettings,
    *,
    txt: Path,
    molecule: bool = False,
    relax: bool = False,
    relax_cell: bool = True,
) -> CalculationOutcome:
    """Run GPAW on ``atoms`` (modified in place when relaxing).

    Args:
        atoms: the structure; its initial magnetic moments seed a spin-polarised run.
        settings: physics and relaxation settings.
        txt: GPAW's log file.
        molecule: Gamma point only (a molecule in a box).
        relax: relax positions (and the cell if ``relax_cell``) before the final energy.
        relax_cell: relax the cell too (FrechetCellFilter).
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE
    from gpaw import GPAW, PW, FermiDirac

    grid = kpoint_grid(atoms, settings.kpoint_density, molecule=molecule)
    moments = atoms.get_initial_magnetic_moments()
    if settings.spin == "off":
        spin = False
        atoms.set_initial_magnetic_moments(None)
    else:
        spin = settings.spin == "on" or bool(np.any(moments != 0.0))
    setups: dict[str | int | None, str] | None = None
    if settings.setups:
        setups = {element: name for element, name in settings.setups.items()}
    atoms.calc = GPAW(
        mode=PW(settings.cutoff_ev),
        xc=settings.xc,
        kpts={"size": grid, "gamma": True} if settings.gamma_centred else {"size": grid},
        occupations=FermiDirac(settings.smearing_ev),
        spinpol=spin,
        maxiter=settings.max_scf_iterations,
        txt=str(txt),
        setups=setups,
    )
    start = time.perf_counter()
    steps, converged, max_force = 0, None, None
    if relax:
        target = FrechetCellFilter(atoms) if relax_cell and not molecule else atoms
        optimizer = {"BFGS": BFGS, "FIRE": FIRE}[settings.optimizer](
            target, logfile=str(txt.with_suffix(".relax.log"))
        )
        converged = bool(optimizer.run(fmax=settings.fmax_ev_per_a, steps=settings.max_relax_steps))
        steps = int(optimizer.get_number_of_steps())
        max_force = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
        if not converged:
            logger.warning(
                "relaxation stopped after %d steps with max force %.3f eV/A", steps, max_force
            )
    energy = float(atoms.get_potential_energy())
    magmom = float(atoms.calc.get_magnetic_moment()) if spin else None
    return CalculationOutcome(
        atoms, energy, grid, spin, magmom, steps, converged, max_force, time.perf_counter() - start
    )


def equilibrium_volume(
    atoms: Atoms, settings: GpawSettings, *, txt: Path, strain: float = 0.06, points: int = 5
) -> float:
    """The volume minimising E(V) over isotropic scalings (Birch-Murnaghan fit), A^3 per cell.

    Energies only, at a fixed cutoff: unlike a stress-driven cell relaxation this is
    free of Pulay stress. Falls back to the lowest sampled volume if the fit's minimum
    lies outside the sampled range.
    """
    from ase.eos import EquationOfState

    v_start = float(atoms.get_volume())
    volumes, energies = [], []
    for i, factor in enumerate(np.linspace(1.0 - strain, 1.0 + strain, points)):
        trial = atoms.copy()
        trial.set_cell(atoms.cell * factor ** (1.0 / 3.0), scale_atoms=True)
        energies.append(calculate(trial, settings, txt=txt.with_suffix(f".eos{i}.txt")).energy)
        volumes.append(v_start * factor)
    try:
        v0, _, _ = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    except (ValueError, RuntimeError) as exc:
        logger.warning("E(V) fit failed (%s); using the lowest sampled point", exc)
        v0 = volumes[int(np.argmin(energies))]
    if not min(volumes) <= v0 <= max(volumes):
        logger.warning(
            "E(V) minimum %.2f A^3 outside the sampled range; using the lowest point", v0
        )
        v0 = volumes[int(np.argmin(energies))]
    return float(v0)


def compute_reference(
    element: str, settings: GpawSettings, key: str, log_dir: Path
) -> ReferenceEnergy:
    """The energy per atom of ``element``'s reference structure with ``settings``."""
    ref = reference_structure(element, custom_cif=settings.reference_cifs.get(element))
    molecule = ref.kind == "molecule"
    atoms = ref.atoms.copy()
    if settings.spin != "off" and not molecule and element in INITIAL_MAGNETIC_MOMENTS:
        atoms.set_initial_magnetic_moments([INITIAL_MAGNETIC_MOMENTS[element]] * len(atoms))
    txt = log_dir / f"{element}-{key}.txt"
    start = time.perf_counter()
    mode = settings.relax_references
    if mode == "volume" and not molecule:
        v0 = equilibrium_volume(atoms, settings, txt=txt)
        atoms.set_cell(atoms.cell * (v0 / atoms.get_volume()) ** (1.0 / 3.0), scale_atoms=True)
    outcome = calculate(
        atoms,
        settings,
        txt=txt,
        molecule=molecule,
        relax=mode == "full" or (mode == "volume" and molecule),
        relax_cell=True,
    )
    gpaw_version, _ = gpaw_versions()
    return ReferenceEnergy(
        element=element,
        energy_per_atom=outcome.energy / len(atoms),
        kind=ref.kind,
        description=f"{ref.description}; relaxation: {mode}",
        settings_hash=key,
        n_atoms=len(atoms),
        volume_per_atom=float(atoms.get_volume()) / len(atoms),
        relaxed=mode != "none",
        code=f"gpaw {gpaw_version}",
        wall_s=time.perf_counter() - start,
    )


def compute(spec: JobSpec, job_dir: Path) -> GpawJobResult:
    """Compute one job (see the module docstring)."""
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    settings = GpawSettings.model_validate(spec.settings)
    if spec.request.structure_cif is None:
        raise PermanentAdapterError("the request has no structure_cif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        submitted = Structure.from_str(spec.request.structure_cif, fmt="cif")
    structure = submitted.get_primitive_structure() if settings.primitive_cell else submitted
    composition = {el.symbol: amount for el, amount in structure.composition.items()}
    check_setups(set(composition), settings)
    atoms = AseAtomsAdaptor.get_atoms(structure)
    if settings.spin != "off":
        atoms.set_initial_magnetic_moments(
            [INITIAL_MAGNETIC_MOMENTS.get(s, 0.0) for s in atoms.get_chemical_symbols()]
        )
    outcome = calculate(
        atoms,
        settings,
        txt=job_dir / "gpaw.txt",
        relax=settings.relax,
        relax_cell=settings.relax_cell,
    )
    energy_per_atom = outcome.energy / len(atoms)
    gpaw_version, data_version = gpaw_versions()

    references: dict[str, ReferenceEnergy] = {}
    key: str | None = None
    reference_wall = 0.0
    if "formation_energy_per_atom" in spec.request.targets:
        ref_key = key = settings_hash(settings.reference_settings(gpaw_version, data_version))
        cache = ReferenceCache(settings.work_dir / "references" / "gpaw.json")
        for element in sorted(composition):
            t0 = time.perf_counter()

            def compute_this(el: str = element) -> ReferenceEnergy:
                return compute_reference(el, settings, ref_key, cache.path.parent)

            references[element] = cache.get_or_compute(element, ref_key, compute_this)
            reference_wall += time.perf_counter() - t0
    formation = (
        formation_energy_per_atom(
            energy_per_atom, composition, {e: r.energy_per_atom for e, r in references.items()}
        )
        if references
        else None
    )
    final_cif = None
    if settings.relax:
        final_cif = str(CifWriter(AseAtomsAdaptor.get_structure(outcome.atoms)))
    return GpawJobResult(
        formula=structure.composition.reduced_formula,
        n_atoms_submitted=len(submitted),
        n_atoms_computed=len(atoms),
        total_energy=energy_per_atom * len(submitted),
        energy_per_atom=energy_per_atom,
        formation_energy_per_atom=formation,
        references={e: r.energy_per_atom for e, r in references.items()},
        reference_descriptions={e: r.description for e, r in references.items()},
        reference_settings_hash=key,
        kpoint_grid=outcome.kpoint_grid,
        spin_polarized=outcome.spin_polarized,
        magnetic_moment=outcome.magnetic_moment,
        relaxed=settings.relax,
        relax_steps=outcome.relax_steps,
        relax_converged=outcome.relax_converged,
        max_force=outcome.max_force,
        final_structure_cif=final_cif,
        calculation_wall_s=outcome.wall_s,
        reference_wall_s=reference_wall,
        gpaw_version=gpaw_version,
        gpaw_data_version=data_version,
        settings=settings.model_dump(mode="json"),
    )


def main(argv: list[str] | None = None) -> int:
    return worker_main("adapters.dft_worker", compute, argv)


if __name__ == "__main__":
    raise SystemExit(main())
