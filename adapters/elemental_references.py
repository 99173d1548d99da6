"""Elemental reference states for formation energies, and a durable cache of their energies.

The formation energy per atom of a compound with ``n_e`` atoms of element ``e``
(``N`` atoms in all) is

    E_f = (E_total - sum_e n_e * mu_e) / N,

where ``mu_e`` is the energy per atom of the element's ground-state structure
computed with *the same* code and settings. This module decides those
structures and caches their energies; the GPAW and CHGNet workers compute them.

Structures (:func:`reference_structure`):

* solids: ASE's ``bulk(symbol)`` reference state (``ase.data.reference_states``:
  the experimental low-temperature structure and lattice constants, e.g. Al fcc,
  Mg hcp, Na bcc, As A7), except alpha-Sn (diamond; ASE gives beta-Sn, but
  alpha-Sn is the 0 K ground state);
* H, N, O, F, Cl, Br, I: the diatomic molecule (experimental bond length) alone
  in an 8.0 x 8.5 x 9.0 A box (asymmetric so that degenerate orbitals split), O2
  as a triplet. For the halogens this neglects the molecular crystal's
  sublimation energy, which semi-local DFT barely captures anyway;
* anything else (B, P, S, Ga, Mn, ...: complex ground states) must be given as a
  CIF by the caller.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.base import PermanentAdapterError, utcnow

if TYPE_CHECKING:
    from ase import Atoms

__all__ = [
    "DIATOMIC_BOND_LENGTHS_A",
    "INITIAL_MAGNETIC_MOMENTS",
    "ReferenceCache",
    "ReferenceEnergy",
    "ReferenceStructure",
    "formation_energy_per_atom",
    "reference_structure",
    "settings_hash",
]

logger = logging.getLogger(__name__)

# Experimental bond lengths (A), NIST CCCBDB.
DIATOMIC_BOND_LENGTHS_A: dict[str, float] = {
    "H": 0.741,
    "N": 1.098,
    "O": 1.208,
    "F": 1.412,
    "Cl": 1.988,
    "Br": 2.281,
    "I": 2.666,
}
# Spin multiplicity - 1 per atom of the diatomic ground state (O2 is a triplet).
_DIATOMIC_MOMENT = {"O": 1.0}
_MOLECULE_BOX_A = (8.0, 8.5, 9.0)
# Overrides of ASE's reference state: (crystal structure, a in A).
_BULK_OVERRIDES: dict[str, tuple[str, float]] = {"Sn": ("diamond", 6.489)}
# Initial (ferromagnetic) moments in Bohr magnetons for elements whose compounds are
# commonly magnetic; a spin-polarised calculation starts from these.
INITIAL_MAGNETIC_MOMENTS: dict[str, float] = {
    "Cr": 2.0,
    "Mn": 3.0,
    "Fe": 2.5,
    "Co": 1.7,
    "Ni": 0.7,
    "Gd": 7.0,
}


@dataclass(frozen=True)
class ReferenceStructure:
    """An element's reference structure.

    Attributes:
        element: chemical symbol.
        atoms: the structure (periodic; a molecule sits in a box).
        kind: ``bulk`` (relax cell and positions) or ``molecule`` (relax positions, Gamma only).
        description: human-readable origin, stored in provenance.
    """

    element: str
    atoms: Atoms
    kind: Literal["bulk", "molecule"]
    description: str


def reference_structure(element: str, *, custom_cif: str | None = None) -> ReferenceStructure:
    """The reference structure of ``element`` (see the module docstring for the choices).

    Args:
        element: chemical symbol, e.g. ``"Na"``.
        custom_cif: a CIF of the element's structure to use instead of the built-in choice.

    Raises:
        PermanentAdapterError: no built-in reference for ``element`` and no CIF given.
    """
    from ase import Atoms
    from ase.build import bulk

    atoms: Atoms
    if custom_cif is not None:
        from pymatgen.core import Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        structure = Structure.from_str(custom_cif, fmt="cif")
        if {el.symbol for el in structure.composition.elements} != {element}:
            raise PermanentAdapterError(
                f"the reference CIF given for {element} contains other elements"
            )
        atoms = AseAtomsAdaptor.get_atoms(structure)
        return ReferenceStructure(element, atoms, "bulk", f"{element}: user-supplied CIF")
    if element in DIATOMIC_BOND_LENGTHS_A:
        d = DIATOMIC_BOND_LENGTHS_A[element]
        atoms = Atoms(
            f"{element}2", positions=[(0, 0, 0), (0, 0, d)], cell=_MOLECULE_BOX_A, pbc=True
        )
        atoms.center()
        atoms.set_initial_magnetic_moments([_DIATOMIC_MOMENT.get(element, 0.0)] * 2)
        desc = f"{element}2 molecule (d = {d} A) in a {'x'.join(map(str, _MOLECULE_BOX_A))} A box"
        return ReferenceStructure(element, atoms, "molecule", desc)
    if element in _BULK_OVERRIDES:
        crystal, a = _BULK_OVERRIDES[element]
        atoms = bulk(element, crystal, a=a)
        desc = f"{element} {crystal} a = {a} A"
    else:
        try:
            atoms = bulk(element)
        except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
            raise PermanentAdapterError(
                f"no built-in elemental reference structure for {element} ({exc}); "
                f"pass its ground-state structure as a CIF in the settings' reference_cifs"
            ) from exc
        from ase.data import atomic_numbers, reference_states

        state = reference_states[atomic_numbers[element]] or {}
        desc = f"{element} {state.get('symmetry', '?')} (ASE reference state, experimental lattice)"
    if element in INITIAL_MAGNETIC_MOMENTS:
        atoms.set_initial_magnetic_moments([INITIAL_MAGNETIC_MOMENTS[element]] * len(atoms))
    return ReferenceStructure(element, atoms, "bulk", desc)


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short stable hash of the settings that change computed energies (16 hex digits)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def formation_energy_per_atom(
    energy_per_atom: float, composition: Mapping[str, float], references: Mapping[str, float]
) -> float:
    """Formation energy per atom (eV/atom) from the compound's and the elements' energies per atom.

    Args:
        energy_per_atom: the compound's energy (eV/atom).
        composition: element -> number of atoms (any multiple of the formula).
        references: element -> reference energy (eV/atom), same code and settings.
    """
    n = sum(composition.values())
    reference = sum(count * references[el] for el, count in composition.items()) / n
    return energy_per_atom - reference


class ReferenceEnergy(BaseModel):
    """One cached elemental reference energy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    element: str
    energy_per_atom: float = Field(description="eV/atom")
    kind: Literal["bulk", "molecule"]
    description: str
    settings_hash: str
    n_atoms: int
    volume_per_atom: float = Field(description="A^3/atom, after any relaxation")
    relaxed: bool
    code: str = Field(description="code and version, e.g. 'gpaw 26.7.0'")
    wall_s: float
    created_at: datetime = Field(default_factory=utcnow)


class ReferenceCache:
    """Reference energies in one JSON file, keyed by ``"<element>:<settings hash>"``.

    Safe across processes: each element+settings is computed under its own
    ``flock`` (a second process waits, then reads the first one's value), and the
    file is rewritten atomically under a global lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with open(self.path.with_name(f".{self.path.name}.{name}.lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _load(self) -> dict[str, ReferenceEnergy]:
        if not self.path.exists():
            return {}
        raw = json.loads(self.path.read_text())
        return {key: ReferenceEnergy.model_validate(value) for key, value in raw.items()}

    def get(self, element: str, settings_key: str) -> ReferenceEnergy | None:
        return self._load().get(f"{element}:{settings_key}")

    def get_or_compute(
        self, element: str, settings_key: str, compute: Callable[[], ReferenceEnergy]
    ) -> ReferenceEnergy:
        """The cached reference, computing and storing it first if absent."""
        with self._lock(f"{element}-{settings_key}"):
            cached = self.get(element, settings_key)
            if cached is not None:
                return cached
            logger.info("computing the %s reference (settings %s)", element, settings_key)
            value = compute()
            with self._lock("file"):
                entries = self._load()
                entries[f"{element}:{settings_key}"] = value
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(
                    json.dumps({k: v.model_dump(mode="json") for k, v in entries.items()}, indent=1)
                )
                os.replace(tmp, self.path)
            return value
