"""One snapshot of a campaign for the dashboard, read from its store.

Everything is read from the store on each call (never cached), with the best value
in the objective target's own unit and sign (:func:`loop.report.summarise`, as
``cloudlab status`` shows it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loop.approval import formula_from_scope, list_proposals
from loop.calibration import calibration_by_version
from loop.report import summarise
from loop.store import STORE_FILENAME, CampaignStore

__all__ = ["MAX_JOBS", "snapshot"]

MAX_JOBS = 500  # newest jobs listed (counts cover all of them)
_FAILED = ("FAILED", "LOST", "CANCELLED")


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def snapshot(directory: str | Path) -> dict[str, Any]:
    """The dashboard's view of the campaign in ``directory`` (JSON-serialisable).

    Raises:
        ConfigError: ``directory`` holds no campaign.
    """
    directory = Path(directory)
    summary = summarise(directory)
    with CampaignStore(directory / STORE_FILENAME, create=False) as store:
        scopes = dict(store.candidates())
        jobs = store.jobs()
        # one measurement per (candidate, fidelity); a multi-fidelity candidate has several
        measurements = {(m.candidate_id, f): m for m, f, _ in store.fidelity_measurements()}
        decisions = store.decisions()
        versions = store.model_versions()
        proposals = list_proposals(store)
    target = summary.target
    chosen_by: dict[tuple[str, str], tuple[int | None, str, Any]] = {}
    for d in decisions:
        for c in d["chosen"]:
            chosen_by[c.candidate_id, c.fidelity] = (d["model_version"], d["acquisition"], c)
    rows = []
    for j in jobs[-MAX_JOBS:]:
        key = (j.candidate_id, j.fidelity)
        version, acquisition, c = chosen_by.get(key, (None, "-", None))
        m = measurements.get(key)
        # a cheap fidelity reports the target under its own name (e.g. "cv@cheap")
        value = m.values.get(summary.reported.get(j.fidelity, target)) if m is not None else None
        rows.append(
            {
                "candidate_id": j.candidate_id,
                "fidelity": j.fidelity,
                "formula": formula_from_scope(scopes.get(j.candidate_id, "")),
                "state": j.state,
                "model_version": version,
                "acquisition": acquisition,
                "predicted_mean": None
                if c is None or not c.predicted_mean
                else c.predicted_mean[0],
                "predicted_std": None if c is None or not c.predicted_std else c.predicted_std[0],
                "measured": None if value is None else _finite(value.value),
                "unit": "" if value is None else value.unit,
                "message": j.message,
            }
        )
    # picks at the highest fidelity against its values (a cheap fidelity measures another thing)
    measured = {
        cid: m.values[target].value
        for (cid, f), m in measurements.items()
        if f == summary.fidelity and target in m.values
    }
    calibration = [
        c.model_dump()
        for c in calibration_by_version(decisions, measured, summary.fidelity)
        if c.version is not None
    ]
    return _json_safe(
        {
            "name": summary.name,
            "objective": summary.objective,
            "state": summary.stop_reason or "running or never run",
            "counts": summary.counts,
            "n_measured": summary.n_measured,
            "budget": summary.budget,
            "best": {
                "target": target,
                "value": summary.best_value,
                "unit": summary.unit,
                "candidate_id": summary.best_id,
            },
            "jobs": rows,
            "n_jobs": len(jobs),
            "failures": [
                {"candidate_id": j.candidate_id, "state": j.state, "reason": j.message or "-"}
                for j in jobs
                if j.state in _FAILED
            ],
            "model_versions": [
                {
                    "version": v["version"],
                    "n_train": v["n_train"],
                    "created_at": v["created_at"],
                    "metrics": {
                        k: x
                        for k, x in v["metrics"].items()
                        if isinstance(x, int | float) and math.isfinite(x)
                    },
                }
                for v in versions
            ],
            "calibration": calibration,
            "proposals": [p.model_dump(mode="json") for p in proposals],
        }
    )


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
