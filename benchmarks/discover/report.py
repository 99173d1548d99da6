"""Stage 5 of the discovery driver: report.json, report.md and one CIF per new candidate."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from benchmarks.discover.common import MP_FORMULAS, SPACE
from benchmarks.discover.confirm import decomposition_phases, gpaw_results


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
