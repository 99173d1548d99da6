"""Energy above the convex hull of generated candidates, and whether they are new.

The competing phases are a registry dataset's structures in the candidate's chemical
system (every element subset), plus the elements as the adapter's elemental reference
structures. Candidates and competing phases are all evaluated by the same
:class:`loop.generate.energies.ChgnetEnergies` (same model, same relaxation), so the
hull compares like with like. A candidate is *new* when no registry structure of its
reduced formula matches it (pymatgen ``StructureMatcher``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from loop.generate.energies import ChgnetEnergies

logger = logging.getLogger(__name__)


class HullResult(BaseModel):
    """One candidate's stability against the competing phases."""

    model_config = ConfigDict(extra="forbid")

    candidate_id: str
    formula: str
    energy_per_atom: float = Field(description="eV/atom, CHGNet")
    e_above_hull: float = Field(description="eV/atom; negative: below the known hull")
    decomposition: dict[str, float] = Field(description="competing phase -> fraction")
    n_competing: int = Field(
        description="competing phases in the chemical system, elements included"
    )
    new: bool = Field(description="no registry structure of this formula matches")
    matched_id: str | None = None
    final_cif: str | None = Field(
        default=None, description="the structure the energy is of (relaxed when configured)"
    )
    relax_steps: int | None = None


def competing_phases(
    dataset: str, elements: Sequence[str], *, max_atoms: int | None = None
) -> list[tuple[str, Structure]]:
    """The dataset's structures whose elements all lie in ``elements``.

    Args:
        dataset: a registered CIF dataset (e.g. ``mp_20_biternary``).
        elements: the chemical system.
        max_atoms: leave out larger cells (cost of the CHGNet evaluation).

    Raises:
        DataError: the dataset is unknown or has no structures.
    """
    from pymatgen.core import Composition, Structure

    from cloud_model.datasets import get_spec, load_dataset

    get_spec(dataset).require_structures("competing phases of a convex hull")
    wanted = set(elements)
    out: list[tuple[str, Structure]] = []
    for record in load_dataset(dataset).records:
        if record.cif is None:
            continue
        have = record.extra.get("elements")
        if have is None:
            formula = record.extra.get("formula")
            if formula is None:
                continue
            have = [el.symbol for el in Composition(str(formula)).elements]
        if not set(have) <= wanted:
            continue
        structure = Structure.from_str(record.cif, fmt="cif")
        if max_atoms is not None and len(structure) > max_atoms:
            continue
        out.append((record.id, structure))
    return out


def hull_stability(
    candidates: Sequence[tuple[str, Structure]],
    competing: Sequence[tuple[str, Structure]],
    energies: ChgnetEnergies,
) -> list[HullResult]:
    """Energy above the hull (eV/atom) of each candidate, and whether it is new.

    Args:
        candidates: (id, structure); evaluated (relaxed when configured) by ``energies``.
        competing: (id, structure) of the known phases, e.g. from :func:`competing_phases`;
            only those in a candidate's chemical system enter its hull.
        energies: one evaluator for candidates and competing phases alike.

    Returns:
        One :class:`HullResult` per candidate, in order.
    """
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Composition, Structure

    matcher = StructureMatcher()
    known: dict[str, tuple[str, Composition, float]] = {}  # id -> (id, composition, energy)
    results: list[HullResult] = []
    for cid, structure in candidates:
        elements = sorted(el.symbol for el in structure.composition.elements)
        record = energies.evaluate(structure)
        # novelty and hull are judged on what was evaluated: a relaxation can move far
        final = Structure.from_str(record.final_cif, fmt="cif")
        entries = [
            PDEntry(Composition(el), energies.element_energy(el), name=f"{el} (reference)")
            for el in elements
        ]
        matched: str | None = None
        formula = final.composition.reduced_formula
        for pid, phase in competing:
            if not {el.symbol for el in phase.composition.elements} <= set(elements):
                continue
            if pid not in known:
                e = energies.evaluate(phase).energy_per_atom
                known[pid] = (pid, phase.composition, e * len(phase))
            _, comp, total = known[pid]
            entries.append(PDEntry(comp, total, name=pid))
            if matched is None and phase.composition.reduced_formula == formula:
                if matcher.fit(final, phase):
                    matched = pid
        diagram = PhaseDiagram(entries)
        entry = PDEntry(final.composition, record.energy_per_atom * len(final), name=cid)
        decomposition, e_hull = diagram.get_decomp_and_e_above_hull(entry, allow_negative=True)
        results.append(
            HullResult(
                candidate_id=cid,
                formula=formula,
                energy_per_atom=record.energy_per_atom,
                e_above_hull=float(e_hull or 0.0),
                decomposition={
                    str(e.composition.reduced_formula): float(f)
                    for e, f in (decomposition or {}).items()
                },
                n_competing=len(entries),
                new=matched is None,
                matched_id=matched,
                final_cif=record.final_cif,
                relax_steps=record.relax_steps,
            )
        )
    return results
