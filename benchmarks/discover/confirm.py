"""Stage 4 of the discovery driver: GPAW on the new candidates lowest on the CHGNet hull."""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.discover.campaign import campaign_config
from benchmarks.discover.common import REPO, log


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
