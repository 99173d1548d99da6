"""Stage 3 of the discovery driver: the CHGNet hull of the measured candidates and known phases."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.discover.campaign import campaign_config, measured_candidates
from benchmarks.discover.common import REPO, SPACE, registry_structures

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from loop.generate.energies import ChgnetEnergies


def hull_stage(stage: Path, campaign_dir: Path, pool_csv: Path) -> dict[str, Any]:
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

    from cloud_model.scope import encode_scope
    from loop.generate.checks import space_group
    from loop.generate.energies import ChgnetEnergies
    from loop.generate.hull import hull_stability

    config = campaign_config(REPO / "configs" / "discover_li_mg_al_o.yaml", {})
    assert config.pool.generators is not None
    # pool.generators.energies relax as the adapter does (FIRE, fmax 0.1 eV/A, 100 steps)
    energies = ChgnetEnergies(
        config.pool.generators.energies.model_copy(update={"cache_dir": stage / "chgnet"})
    )
    measured = measured_candidates(campaign_dir, pool_csv)
    inside = [c for c in measured
              if {el.symbol for el in Structure.from_str(c["relaxed_cif"], fmt="cif")
                  .composition.elements} <= set(SPACE)]  # fmt: skip
    t0 = time.perf_counter()
    competing = registry_structures(SPACE)
    results = hull_stability(
        [(c["id"], Structure.from_str(c["relaxed_cif"], fmt="cif")) for c in inside],
        competing,
        energies,
    )
    hull_s = time.perf_counter() - t0
    # from here on a candidate is the structure the hull stage evaluated: its relaxation
    # continues the campaign's (100 more FIRE steps), and a campaign relaxation that ran out
    # of steps far from a minimum (max force 36 eV/A in one run) must not reach GPAW or the table
    refs = {el: energies.element_energy(el) for el in SPACE}
    inside = [_as_evaluated(c, r, refs) for c, r in zip(inside, results, strict=True)]
    # candidates that relaxed into the same structure: keep the lowest in energy
    matcher = StructureMatcher()
    order = sorted(range(len(inside)), key=lambda i: results[i].energy_per_atom)
    kept: list[int] = []
    same_as: dict[str, str] = {}
    for i in order:
        s = Structure.from_str(inside[i]["relaxed_cif"], fmt="cif")
        twin = next((k for k in kept if results[k].formula == results[i].formula and
                     matcher.fit(s, Structure.from_str(inside[k]["relaxed_cif"], fmt="cif"))),
                    None)  # fmt: skip
        if twin is None:
            kept.append(i)
        else:
            same_as[inside[i]["id"]] = inside[twin]["id"]
    rows = []
    for i, (c, r) in enumerate(zip(inside, results, strict=True)):
        s = Structure.from_str(c["relaxed_cif"], fmt="cif")
        rows.append({
            **c, "formula": r.formula, "n_atoms": len(s),
            "space_group": space_group(s, 0.1, 5.0) or 0,
            "scope": encode_scope(s, symprec=0.1),
            "e_above_hull": r.e_above_hull, "hull_energy_per_atom": r.energy_per_atom,
            "decomposition": r.decomposition, "new": r.new, "matched_id": r.matched_id,
            "same_as": same_as.get(c["id"]), "unique": i in kept,
        })  # fmt: skip
    (stage / "candidates.json").write_text(json.dumps(rows, indent=1) + "\n")
    known = known_phases(competing, energies)
    (stage / "known_phases.json").write_text(json.dumps(known, indent=1) + "\n")
    return {
        "measured": len(measured),
        "in_space": len(inside),
        "outside_space": [c["id"] for c in measured if c["id"] not in {i["id"] for i in inside}],
        "unique_after_relaxation": len(kept),
        "new_unique": sum(1 for r in rows if r["new"] and r["unique"]),
        "matched_registry": sum(1 for r in rows if not r["new"]),
        "competing_phases": len(competing),
        "chgnet_computed": energies.computed,
        "hull_s": round(hull_s, 1),
        "candidates": str(stage / "candidates.json"),
        "known_phases": str(stage / "known_phases.json"),
        "known_on_hull": sorted(k["formula"] for k in known if k["e_above_hull"] < 1e-6),
    }


def _as_evaluated(candidate: dict[str, Any], result: Any, refs: dict[str, float]) -> dict[str, Any]:
    """The candidate with the hull stage's structure and CHGNet formation energy; the
    campaign's kept as ``campaign_*``."""
    from pymatgen.core import Structure

    final = Structure.from_str(result.final_cif, fmt="cif")
    composition = final.composition.fractional_composition
    formation = result.energy_per_atom - sum(
        float(x) * refs[el.symbol] for el, x in composition.items()
    )
    return {
        **candidate,
        "campaign_relaxed_cif": candidate["relaxed_cif"],
        "campaign_formation_energy_per_atom": candidate["formation_energy_per_atom"],
        "relaxed_cif": result.final_cif,
        "formation_energy_per_atom": formation,
        "hull_relax_steps": result.relax_steps,
    }


def known_phases(
    competing: Sequence[tuple[str, Structure]], energies: ChgnetEnergies
) -> list[dict[str, Any]]:
    """The registry's phases of the space with their CHGNet formation energy and hull distance.

    Their hull is the known one (the phases and the elemental references); the phases on it
    are what the candidates decompose into, and what GPAW computes too for a GPAW reaction
    energy of the confirmed candidates.
    """
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition, Structure

    refs = {el: energies.element_energy(el) for el in SPACE}
    entries = [PDEntry(Composition(el), e, name=el) for el, e in refs.items()]
    rows = []
    for pid, phase in competing:
        record = energies.evaluate(phase)
        composition = phase.composition.fractional_composition
        formation = record.energy_per_atom - sum(
            float(x) * refs[el.symbol] for el, x in composition.items()
        )
        entries.append(PDEntry(phase.composition, record.energy_per_atom * len(phase), name=pid))
        relaxed = Structure.from_str(record.final_cif, fmt="cif")
        rows.append({
            "id": pid, "formula": phase.composition.reduced_formula, "n_atoms": len(phase),
            "n_atoms_primitive": len(relaxed.get_primitive_structure()),
            "chgnet_energy_per_atom": record.energy_per_atom,
            "chgnet_formation_energy_per_atom": formation, "relaxed_cif": record.final_cif,
        })  # fmt: skip
    diagram = PhaseDiagram(entries)
    for row, entry in zip(rows, entries[len(refs) :], strict=True):
        row["e_above_hull"] = float(diagram.get_e_above_hull(entry) or 0.0)
    return rows
