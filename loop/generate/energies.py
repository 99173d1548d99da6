"""CHGNet energies of many structures in this process, cached on disk by structure hash.

The relaxation and the elemental references are the CHGNet adapter's own
(:class:`adapters.mlip.ChgnetCalculator`, :class:`adapters.mlip.ChgnetSettings`), so a
hull built here uses exactly the method a campaign's CHGNet adapter measures with.
Screening thousands of small cells in one process avoids the adapter's ~3 s worker
start per job. Every result is appended to ``<cache_dir>/chgnet_energies.jsonl``
under a key hashing the structure and the settings; elemental references go to the
adapter's :class:`adapters.elemental_references.ReferenceCache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapters.elemental_references import ReferenceCache, settings_hash

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)


class EnergyConfig(BaseModel):
    """How every structure (candidates and competing phases alike) is evaluated."""

    model_config = ConfigDict(extra="forbid")

    model_version: Literal["0.3.0", "0.2.0"] = "0.3.0"
    relax: bool = True
    relax_cell: bool = True
    optimizer: Literal["FIRE", "BFGS"] = "FIRE"
    fmax_ev_per_a: float = Field(default=0.1, gt=0)
    max_relax_steps: int = Field(default=100, ge=1)
    threads: int | None = Field(default=1, ge=1, description="torch CPU threads")
    cache_dir: Path = Field(default=Path(".cloudlab/generate"), description="energy cache")


class EnergyRecord(BaseModel):
    """One cached evaluation."""

    model_config = ConfigDict(extra="forbid")

    key: str
    formula: str
    n_atoms: int
    energy_per_atom: float = Field(description="eV/atom, of the final structure")
    relax_steps: int
    final_cif: str
    wall_s: float


def structure_hash(structure: Structure) -> str:
    """A hash of the lattice, species and fractional coordinates (rounded to 1e-5)."""
    order = np.lexsort(np.round(structure.frac_coords % 1.0, 5).T[::-1])
    text = json.dumps(
        {
            "lattice": np.round(structure.lattice.matrix, 5).tolist(),
            "species": [str(structure[i].specie) for i in order],
            "frac": np.round(structure.frac_coords[order] % 1.0, 5).tolist(),
        }
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ChgnetEnergies:
    """CHGNet relaxations and energies with a disk cache (see the module docstring)."""

    def __init__(self, config: EnergyConfig) -> None:
        from adapters.mlip import ChgnetCalculator, ChgnetSettings, _chgnet_version

        self.config = config
        self.settings = ChgnetSettings(
            model_version=config.model_version,
            relax=config.relax,
            relax_cell=config.relax_cell,
            optimizer=config.optimizer,
            fmax_ev_per_a=config.fmax_ev_per_a,
            max_relax_steps=config.max_relax_steps,
            threads=config.threads,
            work_dir=config.cache_dir,
        )
        self.calculator = ChgnetCalculator(config.model_version, config.threads)
        self._settings_key = settings_hash(
            {
                "chgnet": _chgnet_version(),
                **config.model_dump(mode="json", exclude={"cache_dir", "threads"}),
            }
        )
        self._reference_key = settings_hash(self.settings.reference_settings(_chgnet_version()))
        config.cache_dir.mkdir(parents=True, exist_ok=True)
        self._path = config.cache_dir / "chgnet_energies.jsonl"
        self._cache: dict[str, EnergyRecord] = {}
        if self._path.exists():
            for line in self._path.read_text().splitlines():
                if line.strip():
                    record = EnergyRecord.model_validate_json(line)
                    self._cache[record.key] = record
        self.hits = 0
        self.computed = 0

    def evaluate(self, structure: Structure) -> EnergyRecord:
        """The (relaxed) structure and its energy per atom, from the cache when known."""
        from pymatgen.io.cif import CifWriter

        key = f"{structure_hash(structure)}:{self._settings_key}"
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        t0 = time.perf_counter()
        steps = 0
        final = structure
        if self.config.relax:
            final, steps = self.calculator.relax(
                structure, self.settings, relax_cell=self.config.relax_cell
            )
        energy = float(self.calculator.model().predict_structure(final, task="e")["e"])
        record = EnergyRecord(
            key=key,
            formula=final.composition.reduced_formula,
            n_atoms=len(final),
            energy_per_atom=energy,
            relax_steps=steps,
            final_cif=str(CifWriter(final)),
            wall_s=time.perf_counter() - t0,
        )
        self._cache[key] = record
        with self._path.open("a") as fh:
            fh.write(record.model_dump_json() + "\n")
        self.computed += 1
        return record

    def element_energy(self, element: str) -> float:
        """The element's CHGNet reference energy (eV/atom), the adapter's reference structure."""
        cache = ReferenceCache(self.config.cache_dir / "references" / "chgnet.json")
        key = self._reference_key
        ref = cache.get_or_compute(
            element, key, lambda: self.calculator.reference(element, self.settings, key)
        )
        return ref.energy_per_atom
