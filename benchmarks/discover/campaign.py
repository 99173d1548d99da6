"""Stage 2 of the discovery driver: the CHGNet campaign on the generated pool and its results."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import yaml

from benchmarks.discover.common import REPO, log


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
