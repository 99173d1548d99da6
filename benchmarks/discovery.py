"""The Li-Mg-Al-O discovery campaign of issue 13, as one resumable command.

Stages (each writes ``<out>/<stage>/stage.json`` when finished; a rerun skips finished stages
and the campaigns inside resume from their stores):

1. ``generate`` -- candidates that exist in no dataset, *unrelaxed*:
   symmetry-first structures (:func:`loop.generate.symmetry.propose_symmetric`: Wyckoff
   templates counted from ``mp_20_biternary``, decorated with Li/Mg/Al/O, built by pyxtal; run
   once per seed, so each template is built at several random free parameters), and
   substitutions into the space: the registry's oxides whose cations the lambda table
   (Hautier et al. 2011, the table :mod:`loop.generate.substitution` uses) lets Li+/Mg2+/Al3+
   replace, charge-balanced products only. Every product is checked
   (:func:`loop.generate.checks.check_structure`), deduplicated against the registry's structures
   of the space and against each other (pymatgen ``StructureMatcher``, within groups of equal
   formula, space group and cell size) and SCOPE-encoded into ``generate/pool.csv``;
2. ``campaign`` -- ``configs/discover_li_mg_al_o.yaml`` on that pool: a GP surrogate chooses,
   the CHGNet adapter relaxes and measures the formation energy, and the pool grows from the
   best hits (``pool.generators.grow``);
3. ``hull`` -- the energy above the hull of every measured candidate of the space against the
   registry's competing phases, all evaluated with the same CHGNet relaxation
   (:func:`loop.generate.hull.hull_stability`), and whether a registry structure matches it;
   measured candidates that relaxed into the same structure are merged;
4. ``confirm`` -- GPAW (``configs/discover_gpaw_confirm.yaml``: the settings of
   ``configs/gpaw_small.yaml``) computes the formation energy of the new candidates lowest on
   the CHGNet hull (one per formula, small cells), against GPAW elemental references;
5. ``report`` -- ``report.json``, ``report.md`` and one CIF per new candidate under ``--results``.

Usage::

    export CLOUDLAB_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
    python benchmarks/discovery.py --out runs/discover_li_mg_al_o \\
        --results benchmarks/results/discovery_li_mg_al_o
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from loop.generate.energies import ChgnetEnergies
    from loop.generate.substitution import Proposal

REPO = Path(__file__).resolve().parents[1]
SPACE = ("Al", "Li", "Mg", "O")
TARGET_SPECIES = ("Li+", "Mg2+", "Al3+")  # what the substitution generator puts on cation sites
HULL_DATASET = "mp_20_biternary"  # the substitution parents and Wyckoff statistics come from it
# every registry CIF set holding compounds of the space: novelty check and competing phases
REGISTRY_SETS = (
    HULL_DATASET, "mp_20_pilot", "mpts_52", "aflow_debye_temperature", "aflow_thermal_expansion",
    "perov_5",
)  # fmt: skip
_FORMULA_SUM = re.compile(r"^_chemical_formula_sum\s+(.+)$", re.MULTILINE)
MP_FORMULAS = "crabnet_mp_e_form"  # Materials Project formulas (no structures): an outside check
# cations the lambda table exchanges with Li+/Mg2+/Al3+ often enough to be worth a parent
PARENT_CATIONS = frozenset("Li Na K Be Mg Ca Sr Zn Cd Ni Co Fe Mn Cu Al Ga In Sc Cr Ti".split())


def log(message: str) -> None:
    """One progress line on stderr with the wall-clock time."""
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def run_stage(out: Path, name: str, body: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``body(stage_dir)`` once: its summary (with ``seconds``) is kept in ``stage.json``."""
    stage_dir = out / name
    done = stage_dir / "stage.json"
    if done.is_file():
        log(f"{name}: done before, skipped ({done})")
        return dict(json.loads(done.read_text()))
    stage_dir.mkdir(parents=True, exist_ok=True)
    log(f"{name}: started")
    t0 = time.perf_counter()
    summary = body(stage_dir)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    done.write_text(json.dumps(summary, indent=1) + "\n")
    log(f"{name}: finished in {summary['seconds']} s")
    return summary


# --------------------------------------------------------------------------- 1. generate


def registry_structures(elements: Sequence[str]) -> list[tuple[str, Structure]]:
    """(``dataset:id``, structure) of every registry compound whose elements lie in ``elements``.

    All of :data:`REGISTRY_SETS`: the novelty check and the hull's competing phases. Single
    elements are left out: the hull's elements are the adapter's own elemental references, the
    ones its formation energies are measured against.
    """
    from pymatgen.core import Composition, Structure

    from cloud_model.datasets import load_dataset

    wanted = set(elements)
    out = []
    for dataset in REGISTRY_SETS:
        for record in load_dataset(dataset).records:
            if record.cif is None:
                continue
            formula = record.extra.get("formula")
            if formula is None:
                match = _FORMULA_SUM.search(record.cif)
                if match is None:
                    continue
                formula = match.group(1).strip("'\" ")
            have = {el.symbol for el in Composition(str(formula)).elements}
            if len(have) >= 2 and have <= wanted:
                out.append((f"{dataset}:{record.id}", Structure.from_str(record.cif, fmt="cif")))
    return out


def substitution_parents() -> list[tuple[str, Structure]]:
    """Registry oxides whose other elements are all in :data:`PARENT_CATIONS`."""
    from pymatgen.core import Composition, Structure

    from cloud_model.datasets import load_dataset

    parents = []
    for record in load_dataset(HULL_DATASET).records:
        formula = record.extra.get("formula")
        if record.cif is None or formula is None:
            continue
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
    counts["proposed_symmetry"] = len(proposals)
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


# --------------------------------------------------------------------------- 2. campaign


def campaign_config(path: Path, updates: dict[str, Any]) -> Any:
    """The campaign config at ``path`` with top-level sections updated (``pool``: merged)."""
    from loop.config import parse_config

    data = yaml.safe_load(path.read_text())
    for key, value in updates.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return parse_config(data, source=str(path))


def campaign_stage(stage: Path, args: argparse.Namespace, pool_csv: Path) -> dict[str, Any]:
    from loop.campaign import Campaign

    updates: dict[str, Any] = {"pool": {"file": str(pool_csv.resolve())}}
    if args.budget is not None:
        updates["budget"] = {"experiments": args.budget}
    config = campaign_config(REPO / "configs" / "discover_li_mg_al_o.yaml", updates)
    directory = (stage / "run").resolve()  # absolute: the adapter's workers run in their job dirs
    campaign = Campaign(config, directory)
    campaign.prepare()
    assert campaign.pool is not None
    log(f"campaign: {len(campaign.pool)} candidates, budget {config.budget.experiments} "
        "CHGNet measurements")  # fmt: skip
    result = campaign.run()
    store = campaign.prepare().store
    measurements = store.measurements()
    wall = [float(m.provenance.get("calculation_wall_s", 0.0)) for m in measurements]
    return {
        "directory": str(directory),
        "pool_size": len(campaign.pool),
        "n_measured": result.n_measured,
        "n_failed": result.n_failed,
        "stop_reason": result.stop_reason,
        "best_id": result.best_id,
        "best_formation_energy_per_atom": result.best_value,
        "generated_during_campaign": len(store.generated()),
        "growth_steps": len(store.growths()),
        "timings_s": {
            "fit": round(result.timings.fit, 1),
            "score": round(result.timings.score, 1),
            "acquisition": round(result.timings.acquisition, 1),
            "waiting_on_jobs": round(result.timings.dispatch, 1),
        },
        "chgnet_calculation_s_total": round(sum(wall), 1),
        "chgnet_calculation_s_mean": round(sum(wall) / max(1, len(wall)), 2),
    }


# --------------------------------------------------------------------------- 3. hull


def measured_candidates(campaign_dir: Path, pool_csv: Path) -> list[dict[str, Any]]:
    """Every CHGNet measurement with its relaxed structure, pool row and provenance."""
    from loop.store import CampaignStore

    with CampaignStore(campaign_dir, create=False) as store:
        measurements = store.measurements()
        generated = {g["id"]: g for g in store.generated()}
    pool_rows = {}
    with pool_csv.open() as fh:
        for row in csv.DictReader(fh):
            pool_rows[row["material_id"]] = row
    out = []
    for m in measurements:
        value = m.values.get("formation_energy_per_atom")
        cif = m.provenance.get("final_structure_cif")
        if value is None or cif is None:
            continue
        if m.candidate_id in pool_rows:
            row = pool_rows[m.candidate_id]
            provenance = json.loads(row["provenance"])
        else:  # joined the pool while the campaign ran (growth)
            provenance = {**generated[m.candidate_id]["provenance"], "joined": "growth"}
        out.append({
            "id": m.candidate_id, "formation_energy_per_atom": float(value.value),
            "relax_steps": int(m.provenance.get("relax_steps", 0)),
            "chgnet_wall_s": float(m.provenance.get("calculation_wall_s", 0.0)),
            "relaxed_cif": cif, "provenance": provenance,
        })  # fmt: skip
    return out


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
        "outside_space": [c["id"] for c in measured if c not in inside],
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


# --------------------------------------------------------------------------- 4. confirm


def choose_for_gpaw(rows: list[dict[str, Any]], n: int, max_atoms: int) -> list[dict[str, Any]]:
    """The ``n`` new unique candidates lowest on the CHGNet hull, one per formula."""
    from pymatgen.core import Structure

    chosen: list[dict[str, Any]] = []
    formulas: set[str] = set()
    for row in sorted(rows, key=lambda r: r["e_above_hull"]):
        if not (row["new"] and row["unique"]) or row["formula"] in formulas:
            continue
        primitive = Structure.from_str(row["relaxed_cif"], fmt="cif").get_primitive_structure()
        if len(primitive) > max_atoms:
            continue
        chosen.append(row)
        formulas.add(row["formula"])
        if len(chosen) == n:
            break
    return chosen


def decomposition_phases(
    row: dict[str, Any], known: list[dict[str, Any]]
) -> dict[str, dict[str, Any] | None]:
    """Formula -> the known phase a candidate decomposes into (None: an element)."""
    from pymatgen.core import Composition

    out: dict[str, dict[str, Any] | None] = {}
    for formula in row["decomposition"]:
        if Composition(formula).is_element:
            out[formula] = None
            continue
        same = [k for k in known if k["formula"] == formula]
        out[formula] = min(same, key=lambda k: k["chgnet_energy_per_atom"])
    return out


def confirm_stage(
    stage: Path, args: argparse.Namespace, candidates: Path, known_path: Path
) -> dict[str, Any]:
    """GPAW on the chosen new candidates and on the known phases they decompose into."""
    from loop.campaign import Campaign

    rows = json.loads(candidates.read_text())
    known = json.loads(known_path.read_text())
    chosen = choose_for_gpaw(rows, args.confirm, args.confirm_max_atoms)
    if not chosen:
        return {"chosen": [], "known": [], "note": "no new candidate to confirm"}
    need: Counter[str] = Counter()
    by_id = {k["id"]: k for k in known}
    for row in chosen:
        for phase in decomposition_phases(row, known).values():
            if phase is not None and phase["n_atoms_primitive"] <= args.confirm_max_atoms:
                need[phase["id"]] += 1
    references = [by_id[pid] for pid, _ in need.most_common(args.confirm_known)]
    pool_csv = stage / "candidates.csv"
    with pool_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["material_id", "cif"])
        writer.writeheader()
        writer.writerows({"material_id": r["id"], "cif": r["relaxed_cif"]}
                         for r in chosen + references)  # fmt: skip
    ids = [r["id"] for r in chosen + references]
    config = campaign_config(
        REPO / "configs" / "discover_gpaw_confirm.yaml",
        {
            "pool": {"file": str(pool_csv.resolve()), "include_ids": ids},
            "budget": {"experiments": len(ids)},
            "initial_design": {"n_random": len(ids)},
        },
    )
    directory = (stage / "run").resolve()
    names = ", ".join(f"{r['id']} ({r['formula']})" for r in chosen + references)
    log(f"confirm: GPAW on {names}")
    result = Campaign(config, directory).run()
    return {
        "chosen": [r["id"] for r in chosen],
        "known": [r["id"] for r in references],
        "directory": str(directory),
        "n_measured": result.n_measured,
        "n_failed": result.n_failed,
    }


def gpaw_results(directory: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per candidate: GPAW formation energy and its cost; and the elemental references."""
    from loop.store import CampaignStore

    with CampaignStore(directory, create=False) as store:
        measurements = store.measurements()
    out = {}
    for m in measurements:
        value = m.values.get("formation_energy_per_atom")
        out[m.candidate_id] = {
            "formation_energy_per_atom": None if value is None else float(value.value),
            "n_atoms_computed": m.provenance.get("n_atoms_computed"),
            "kpoint_grid": m.provenance.get("kpoint_grid"),
            "calculation_wall_s": m.provenance.get("calculation_wall_s"),
            "reference_wall_s": m.provenance.get("reference_wall_s"),
        }
    references = []
    cache = directory / "gpaw" / "references" / "gpaw.json"
    if cache.is_file():
        for ref in json.loads(cache.read_text()).values():
            references.append({k: ref.get(k) for k in
                               ("element", "energy_per_atom", "description", "wall_s")})  # fmt: skip
    return out, references


# --------------------------------------------------------------------------- 5. report


def mp_formulas() -> dict[str, float]:
    """Reduced formula -> lowest Materials Project formation energy per atom (formulas only)."""
    from pymatgen.core import Composition

    from cloud_model.datasets import load_dataset

    out: dict[str, float] = {}
    for record in load_dataset(MP_FORMULAS).records:
        formula = Composition(str(record.formula)).reduced_formula
        value = float(record.targets["formation_energy_per_atom"])
        out[formula] = min(value, out.get(formula, math.inf))
    return out


def report_stage(out: Path, results: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = json.loads(Path(stages["hull"]["candidates"]).read_text())
    gpaw: dict[str, dict[str, Any]] = {}
    references: list[dict[str, Any]] = []
    if stages["confirm"].get("directory"):
        gpaw, references = gpaw_results(Path(stages["confirm"]["directory"]))
    mp = mp_formulas()
    phases = json.loads(Path(stages["hull"]["known_phases"]).read_text())
    registry_formulas = {k["formula"] for k in phases}
    calibration = [
        {"id": k["id"], "formula": k["formula"], "n_atoms_primitive": k["n_atoms_primitive"],
         "chgnet_formation_energy_per_atom": round(k["chgnet_formation_energy_per_atom"], 4),
         "gpaw_formation_energy_per_atom": round(gpaw[k["id"]]["formation_energy_per_atom"], 4),
         "mp_formula_formation_energy_per_atom": mp.get(k["formula"])}
        for k in phases if k["id"] in gpaw and gpaw[k["id"]]["formation_energy_per_atom"] is not None
    ]  # fmt: skip
    gpaw_ef = {c["id"]: c["gpaw_formation_energy_per_atom"] for c in calibration}
    (results / "cifs").mkdir(parents=True, exist_ok=True)
    table = []
    for row in sorted(rows, key=lambda r: r["e_above_hull"]):
        if not (row["new"] and row["unique"]):
            continue
        cif_path = results / "cifs" / f"{row['id']}.cif"
        cif_path.write_text(row["relaxed_cif"])
        g = gpaw.get(row["id"], {})
        provenance = row["provenance"]
        reaction = None  # GPAW: E_f(candidate) - sum of fraction x E_f(CHGNet's decomposition)
        if g.get("formation_energy_per_atom") is not None:
            products = decomposition_phases(row, phases)
            if all(k is None or k["id"] in gpaw_ef for k in products.values()):
                reaction = g["formation_energy_per_atom"] - sum(
                    x * (0.0 if products[f] is None else gpaw_ef[products[f]["id"]])  # type: ignore[index]
                    for f, x in row["decomposition"].items()
                )
        table.append({
            "id": row["id"], "formula": row["formula"], "space_group": row["space_group"],
            "n_atoms": row["n_atoms"], "scope": row["scope"],
            "chgnet_formation_energy_per_atom": round(row["formation_energy_per_atom"], 4),
            "chgnet_e_above_hull": round(row["e_above_hull"], 4),
            "hull_decomposition": row["decomposition"],
            "gpaw_formation_energy_per_atom": None if g.get("formation_energy_per_atom") is None
            else round(g["formation_energy_per_atom"], 4),
            "gpaw_energy_vs_chgnet_decomposition": None if reaction is None else round(reaction, 4),
            "generator": provenance.get("generator"), "parent_id": provenance.get("parent_id"),
            "substitutions": provenance.get("substitutions") or None,
            "template": provenance.get("parameters", {}).get("wyckoff"),
            "formula_in_registry": row["formula"] in registry_formulas,
            "mp_formula_formation_energy_per_atom": mp.get(row["formula"]),
            "cif": str(cif_path.relative_to(results)),
        })  # fmt: skip
    confirmed = [r for r in table if r["gpaw_formation_energy_per_atom"] is not None]
    diffs = [r["gpaw_formation_energy_per_atom"] - r["chgnet_formation_energy_per_atom"]
             for r in confirmed]  # fmt: skip
    gen, camp, hull, conf = (stages[k] for k in ("generate", "campaign", "hull", "confirm"))
    total = sum(float(s["seconds"]) for s in (gen, camp, hull, conf))
    report = {
        "chemical_space": "-".join(SPACE),
        "command": " ".join(["python benchmarks/discovery.py", *sys.argv[1:]]),
        "machine": "2 shared CPU cores; heavy work on one thread (CHGNet threads 1, GPAW serial)",
        "counts": {
            **gen["counts"],
            "rejected": gen["rejected"],
            "campaign_pool": camp["pool_size"],
            "campaign_measured_chgnet": camp["n_measured"],
            "campaign_failed": camp["n_failed"],
            "generated_during_campaign": camp["generated_during_campaign"],
            "measured_in_space": hull["in_space"],
            "measured_outside_space": len(hull["outside_space"]),
            "unique_after_relaxation": hull["unique_after_relaxation"],
            "matched_a_registry_structure": hull["matched_registry"],
            "new_unique": hull["new_unique"],
            "gpaw_computed": len(confirmed),
        },
        "seconds": {"generate": gen["seconds"], "campaign": camp["seconds"],
                    "hull": hull["seconds"], "confirm": conf["seconds"], "total": round(total, 1)},
        "share_of_total": {k: round(float(stages[k]["seconds"]) / total, 3)
                           for k in ("generate", "campaign", "hull", "confirm")},
        "generate_timings_s": gen["timings_s"],
        "campaign_timings_s": camp["timings_s"],
        "chgnet_s_per_measurement": camp["chgnet_calculation_s_mean"],
        "gpaw": {cid: g for cid, g in gpaw.items()},
        "gpaw_references": references,
        "gpaw_minus_chgnet_formation_energy": {
            "n": len(diffs),
            "mean": None if not diffs else round(sum(diffs) / len(diffs), 4),
            "max_abs": None if not diffs else round(max(abs(d) for d in diffs), 4),
        },
        "known_phases_gpaw": calibration,
        "known_on_chgnet_hull": hull["known_on_hull"],
        "candidates": table,
        "stages": stages,
    }  # fmt: skip
    (results / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / "report.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report's table and counts as Markdown."""
    c, s = report["counts"], report["seconds"]
    lines = [
        f"# Discovery in {report['chemical_space']}", "",
        f"`{report['command']}` ({report['machine']})", "",
        "## Counts", "",
        f"* proposed: {c['proposed_symmetry']} symmetry-first (pyxtal), "
        f"{c['proposed_substitution']} substitutions into the space "
        f"(from {c['substitution_parents']} registry oxides)",
        f"* passed the checks: {c['passed_checks']}; unique (no registry or earlier match): "
        f"{c['unique']}; SCOPE-encoded pool: {c['encoded']}",
        f"* left out: {', '.join(f'{k} {v}' for k, v in c['rejected'].items())}",
        f"* campaign: pool {c['campaign_pool']}, CHGNet-measured {c['campaign_measured_chgnet']} "
        f"(failed {c['campaign_failed']}), joined during the campaign "
        f"{c['generated_during_campaign']}",
        f"* measured in the space {c['measured_in_space']} (outside, from growth: "
        f"{c['measured_outside_space']}); distinct after relaxation {c['unique_after_relaxation']}"
        f"; matching a registry structure {c['matched_a_registry_structure']}; "
        f"new {c['new_unique']}; computed with GPAW {c['gpaw_computed']}", "",
        "## Where the time goes", "",
        "| stage | s | share |", "|---|---:|---:|",
    ]  # fmt: skip
    for stage in ("generate", "campaign", "hull", "confirm"):
        lines.append(f"| {stage} | {s[stage]} | {report['share_of_total'][stage]:.0%} |")
    lines += [f"| total | {s['total']} | |", "",
              f"generate: {report['generate_timings_s']}", "",
              f"CHGNet per measurement (relaxation + energy, worker start excluded): "
              f"{report['chgnet_s_per_measurement']} s", ""]  # fmt: skip
    if report["gpaw"]:
        lines.append("GPAW per candidate: " + ", ".join(
            f"{cid} {g['calculation_wall_s']:.0f} s ({g['n_atoms_computed']} atoms, "
            f"k {g['kpoint_grid']})" for cid, g in report["gpaw"].items()))  # fmt: skip
        lines.append("")
        lines.append("GPAW references: " + ", ".join(
            f"{r['element']} {r['wall_s']:.0f} s" for r in report["gpaw_references"]))  # fmt: skip
        d = report["gpaw_minus_chgnet_formation_energy"]
        lines += ["", f"GPAW - CHGNet formation energy over the {d['n']} computed: mean "
                  f"{d['mean']} eV/atom, largest |difference| {d['max_abs']} eV/atom", ""]  # fmt: skip
    if report["known_phases_gpaw"]:
        lines += ["Known registry phases computed the same way (what the confirmed decompose "
                  "into on the CHGNet hull):", "",
                  "| id | formula | CHGNet E_f | GPAW E_f | MP E_f |", "|---|---|---:|---:|---:|"]  # fmt: skip
        for k in report["known_phases_gpaw"]:
            mp = k["mp_formula_formation_energy_per_atom"]
            lines.append(f"| {k['id']} | {k['formula']} | {k['chgnet_formation_energy_per_atom']:.3f}"
                         f" | {k['gpaw_formation_energy_per_atom']:.3f} | "
                         f"{'-' if mp is None else f'{mp:.3f}'} |")  # fmt: skip
        lines.append("")
        pairs = [
            r for r in report["candidates"] if r["gpaw_energy_vs_chgnet_decomposition"] is not None
        ]
        if pairs:
            lines += ["At fixed composition, where the offset above cancels (energy above CHGNet's "
                      "decomposition products, eV/atom): " + ", ".join(
                          f"{r['id']} ({r['formula']}) CHGNet {r['chgnet_e_above_hull']:+.3f}, "
                          f"GPAW {r['gpaw_energy_vs_chgnet_decomposition']:+.3f}" for r in pairs), ""]  # fmt: skip
    lines += [
        "## New candidates (no registry structure matches; lowest CHGNet hull distance first)", "",
        "E_f: formation energy per atom (eV/atom); E_hull: CHGNet energy above the hull of the "
        "registry's phases (eV/atom, negative = below it); MP E_f: Materials Project's lowest "
        "formation energy for this formula (formula only, from crabnet_mp_e_form; - = formula "
        "not in MP)", "",
        "GPAW dE: GPAW formation energy minus that of CHGNet's decomposition products, all "
        "computed with GPAW (negative: GPAW too puts it below them)", "",
        "| id | formula | SG | atoms | CHGNet E_f | CHGNet E_hull | GPAW E_f | GPAW dE | MP E_f |"
        " generator (parent) | CIF | SCOPE |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]  # fmt: skip
    for r in report["candidates"]:
        gpaw = "" if r["gpaw_formation_energy_per_atom"] is None else (
            f"{r['gpaw_formation_energy_per_atom']:.3f}")  # fmt: skip
        mp = r["mp_formula_formation_energy_per_atom"]
        de = r["gpaw_energy_vs_chgnet_decomposition"]
        lines.append(
            f"| {r['id']} | {r['formula']} | {r['space_group']} | {r['n_atoms']} | "
            f"{r['chgnet_formation_energy_per_atom']:.3f} | {r['chgnet_e_above_hull']:.3f} | "
            f"{gpaw} | {'' if de is None else f'{de:.3f}'} | {'-' if mp is None else f'{mp:.3f}'}"
            f" | {r['generator']} "
            f"({r['parent_id']}) | {r['cif']} | `{r['scope']}` |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/discover_li_mg_al_o"))
    parser.add_argument(
        "--results", type=Path, default=REPO / "benchmarks" / "results" / "discovery_li_mg_al_o"
    )
    parser.add_argument("--symmetry-seeds", type=int, default=5,
                        help="runs of the symmetry generator, each at its own random free parameters")  # fmt: skip
    parser.add_argument("--symmetry-per-seed", type=int, default=1000,
                        help="structures each run builds at most (distinct template + decoration)")  # fmt: skip
    parser.add_argument("--substitution-threshold", type=float, default=1e-4)
    parser.add_argument("--substitution-per-parent", type=int, default=5)
    parser.add_argument("--budget", type=int, default=None,
                        help="override the campaign's budget.experiments (CHGNet measurements)")  # fmt: skip
    parser.add_argument("--confirm", type=int, default=4, help="candidates confirmed with GPAW")
    parser.add_argument("--confirm-known", type=int, default=3,
                        help="known phases (what the confirmed decompose into) also run with GPAW")  # fmt: skip
    parser.add_argument("--confirm-max-atoms", type=int, default=12,
                        help="largest primitive cell given to GPAW")  # fmt: skip
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # pymatgen's CIF rounding notes, spglib deprecations
    out = args.out.resolve()
    stages: dict[str, dict[str, Any]] = {}
    stages["generate"] = run_stage(out, "generate", lambda d: generate_stage(d, args))
    pool_csv = Path(stages["generate"]["pool"])
    stages["campaign"] = run_stage(out, "campaign", lambda d: campaign_stage(d, args, pool_csv))
    campaign_dir = Path(stages["campaign"]["directory"])
    stages["hull"] = run_stage(out, "hull", lambda d: hull_stage(d, campaign_dir, pool_csv))
    candidates = Path(stages["hull"]["candidates"])
    known = Path(stages["hull"]["known_phases"])
    stages["confirm"] = run_stage(
        out, "confirm", lambda d: confirm_stage(d, args, candidates, known)
    )
    args.results.mkdir(parents=True, exist_ok=True)
    report = report_stage(out, args.results, stages)
    log(f"report: {args.results / 'report.md'} ({len(report['candidates'])} new candidates, "
        f"{report['counts']['gpaw_computed']} computed with GPAW)")  # fmt: skip


if __name__ == "__main__":
    main()
