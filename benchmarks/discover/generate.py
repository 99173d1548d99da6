"""Stage 1 of the discovery driver: unrelaxed candidates (symmetry-first and substitutions)."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.discover.common import (
    HULL_DATASET,
    PARENT_CATIONS,
    QUATERNARY_DATASET,
    SPACE,
    TARGET_SPECIES,
    log,
    registry_structures,
)

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from loop.generate.substitution import Proposal


def substitution_parents() -> list[tuple[str, Structure]]:
    """Registry oxides whose other elements are all in :data:`PARENT_CATIONS`.

    From :data:`HULL_DATASET` and :data:`QUATERNARY_DATASET` (whose oxides with three cations
    give quaternary products).
    """
    from pymatgen.core import Composition, Structure

    from cloud_model.datasets import load_dataset

    parents = []
    records = [*load_dataset(HULL_DATASET).records, *load_dataset(QUATERNARY_DATASET).records]
    seen: set[str] = set()
    for record in records:
        formula = record.extra.get("formula")
        if record.cif is None or formula is None or record.id in seen:
            continue
        seen.add(record.id)
        elements = {el.symbol for el in Composition(str(formula)).elements}
        if "O" in elements and len(elements) >= 2 and elements - {"O"} <= PARENT_CATIONS:
            parents.append((record.id, Structure.from_str(record.cif, fmt="cif")))
    return parents


def substitute_into_space(
    parents: Sequence[tuple[str, Structure]], threshold: float, max_per_parent: int
) -> tuple[list[Proposal], Counter[str]]:
    """Products of the parents with every cation replaced by Li+, Mg2+ or Al3+.

    The probability of a product is the product over the parent's cation species ``s`` of the
    lambda table's conditional probability that the new species ``t`` replaces ``s``; maps
    below ``threshold``, not charge-balanced, or leaving the parent unchanged are dropped.

    Returns:
        The proposals (most probable first within a parent, at most ``max_per_parent``) and
        the count of what was left out, by reason.
    """
    from pymatgen.core import Species
    from pymatgen.core.structure_prediction.substitution_probability import (
        SubstitutionProbability,
    )
    from pymatgen.io.cif import CifWriter

    from loop.generate.substitution import Proposal

    table = SubstitutionProbability()
    targets = [Species.from_str(t) for t in TARGET_SPECIES]
    rejected: Counter[str] = Counter()
    out: list[Proposal] = []
    for parent_id, structure in parents:
        guesses = structure.composition.oxi_state_guesses(max_sites=-len(structure))
        oxidation = next(
            (g for g in guesses if all(float(v).is_integer() for v in g.values())), None
        )
        if oxidation is None or oxidation.get("O") != -2:
            rejected["parent_no_oxide_oxidation_states"] += 1
            continue
        cations = [Species(el, int(ox)) for el, ox in sorted(oxidation.items()) if el != "O"]
        amounts = structure.composition.get_el_amt_dict()
        maps = []
        for new in itertools.product(targets, repeat=len(cations)):
            if all(old == t for old, t in zip(cations, new, strict=True)):
                continue  # the parent itself
            charge = sum(float(t.oxi_state or 0) * amounts[old.symbol] for old, t in
                         zip(cations, new, strict=True)) - 2 * amounts["O"]  # fmt: skip
            if abs(charge) > 1e-6:
                rejected["not_charge_balanced"] += 1
                continue
            probability = math.prod(
                table.cond_prob(t, old) for old, t in zip(cations, new, strict=True)
            )
            if probability < threshold:
                rejected["below_threshold"] += 1
                continue
            maps.append((probability, dict(zip(cations, new, strict=True))))
        maps.sort(key=lambda m: -m[0])
        for probability, mapping in maps[:max_per_parent]:
            product = structure.copy()
            product.replace_species({old.symbol: t.symbol for old, t in mapping.items()})
            out.append(
                Proposal(
                    parent_id=parent_id,
                    generator="substitution",
                    substitutions={str(o): str(t) for o, t in mapping.items() if o != t},
                    probability=probability,
                    formula=product.composition.reduced_formula,
                    cif=str(CifWriter(product)),
                )
            )
        rejected["over_max_per_parent"] += max(0, len(maps) - max_per_parent)
    return out, rejected


def unique_proposals(
    proposals: Sequence[tuple[Proposal, Structure]], known: list[tuple[str, Structure]]
) -> tuple[list[int], Counter[str]]:
    """Indices of the proposals matching no registry structure and no earlier proposal.

    ``StructureMatcher`` runs within groups of equal formula, spglib space group and number
    of sites (unrelaxed random builds of different groups practically never match), which keeps
    thousands of proposals affordable; the registry is compared against every group.
    """
    from loop.generate.checks import space_group
    from loop.generate.pipeline import KnownStructures, unique_structures

    groups: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    for i, (proposal, structure) in enumerate(proposals):
        sg = space_group(structure, 0.1, 5.0) or 0
        groups[(proposal.formula, sg, len(structure))].append(i)
    registry = KnownStructures(known)
    keep: list[int] = []
    rejected: Counter[str] = Counter()
    for members in groups.values():
        kept, why = unique_structures([(proposals[i][0].formula, proposals[i][1]) for i in members],
                                  registry)  # fmt: skip
        keep += [members[k] for k in kept]
        rejected.update(why)
    return sorted(keep), rejected


def generate_stage(stage: Path, args: argparse.Namespace) -> dict[str, Any]:
    from pymatgen.core import Structure

    from cloud_model.errors import SymmetryError
    from cloud_model.scope import encode_scope
    from loop.generate.checks import CheckConfig, check_structure, space_group
    from loop.generate.energies import structure_hash
    from loop.generate.symmetry import SymmetryConfig, propose_symmetric, wyckoff_templates

    timings: dict[str, float] = {}
    rejected: Counter[str] = Counter()
    counts: dict[str, int] = {}

    t0 = time.perf_counter()
    base = SymmetryConfig(elements=list(SPACE), require=["O"], n_proposals=args.symmetry_per_seed,
                          cache_dir=stage)  # fmt: skip
    templates = wyckoff_templates(base)
    timings["wyckoff_statistics"] = time.perf_counter() - t0
    log(f"generate: {len(templates)} Wyckoff templates ({timings['wyckoff_statistics']:.0f} s)")

    t0 = time.perf_counter()
    proposals: list[Proposal] = []
    for seed in range(args.symmetry_seeds):
        built, why = propose_symmetric(base.model_copy(update={"seed": seed}))
        proposals += built
        rejected.update({f"symmetry_{k}": v for k, v in why.items() if k != "repeated_decoration"})
        log(f"generate: symmetry seed {seed}: {len(built)} structures built by pyxtal")
    quaternary = base.model_copy(update={"statistics_dataset": QUATERNARY_DATASET, "min_species": 4,
                                         "max_species": 4, "n_proposals": args.quaternary_per_seed})  # fmt: skip
    n_ternary = len(proposals)
    for seed in range(args.symmetry_seeds if args.quaternary_per_seed > 0 else 0):
        built, why = propose_symmetric(quaternary.model_copy(update={"seed": seed}))
        proposals += built
        rejected.update({f"symmetry_quaternary_{k}": v for k, v in why.items()
                         if k != "repeated_decoration"})  # fmt: skip
        log(f"generate: quaternary seed {seed}: {len(built)} structures from {QUATERNARY_DATASET}")
    counts["proposed_symmetry"] = n_ternary
    counts["proposed_symmetry_quaternary"] = len(proposals) - n_ternary
    timings["propose_symmetry"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    parents = substitution_parents()
    substituted, why = substitute_into_space(parents, args.substitution_threshold,
                                             args.substitution_per_parent)  # fmt: skip
    rejected.update({f"substitution_{k}": v for k, v in why.items()})
    counts["substitution_parents"] = len(parents)
    counts["proposed_substitution"] = len(substituted)
    proposals += substituted
    timings["propose_substitution"] = time.perf_counter() - t0
    log(f"generate: {len(substituted)} substitutions into the space from {len(parents)} oxides")

    t0 = time.perf_counter()
    checks = CheckConfig()
    checked: list[tuple[Proposal, Structure]] = []
    for proposal in proposals:
        structure = Structure.from_str(proposal.cif, fmt="cif")
        reason = check_structure(structure, checks)
        if reason is None:
            checked.append((proposal, structure))
        else:
            rejected[reason] += 1
    counts["passed_checks"] = len(checked)
    timings["checks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    keep, dup = unique_proposals(checked, registry_structures(SPACE))
    rejected.update(dup)
    counts["unique"] = len(keep)
    timings["dedup"] = time.perf_counter() - t0
    log(f"generate: {len(checked)} passed the checks, {len(keep)} unique")

    t0 = time.perf_counter()
    rows = []
    seen: set[str] = set()
    for i in keep:
        proposal, structure = checked[i]
        try:
            scope = encode_scope(structure, symprec=checks.symprec)
        except SymmetryError:
            rejected["scope_failed"] += 1
            continue
        cid = f"gen-{structure_hash(structure)[:12]}"
        if cid in seen:
            rejected["duplicate_of_generated"] += 1
            continue
        seen.add(cid)
        provenance = proposal.model_dump(mode="json", exclude={"cif", "formula"})
        rows.append({
            "material_id": cid, "cif": proposal.cif, "scope": scope, "formula": proposal.formula,
            "space_group": space_group(structure, checks.symprec, checks.angle_tolerance) or 0,
            "generator": proposal.generator, "parent_id": proposal.parent_id,
            "provenance": json.dumps(provenance, sort_keys=True),
        })  # fmt: skip
    counts["encoded"] = len(rows)
    timings["encode"] = time.perf_counter() - t0
    with (stage / "pool.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    formulas = Counter(str(r["formula"]) for r in rows)
    return {
        "counts": counts,
        "rejected": dict(sorted(rejected.items())),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wyckoff_templates": len(templates),
        "by_generator": dict(Counter(str(r["generator"]) for r in rows)),
        "formulas": dict(formulas.most_common()),
        "pool": str(stage / "pool.csv"),
    }
