"""How well the surrogate knew what it chose: predictions made at decision time vs measurements.

Every model decision stores, per chosen candidate, the predicted mean and standard
deviation the acquisition saw (:class:`~loop.store.ChosenCandidate`) and the
model version that made them. Once those candidates are measured this module
scores the predictions, per model version (the batch each refit chose) and over
the whole campaign: Gaussian negative log-likelihood, the share of measurements
inside the 90 % interval, the mean absolute error and the mean predicted std.
Only the first target is scored (the objective's). In a multi-fidelity campaign only
the picks made at the highest fidelity are scored, against that fidelity's
measurements: the prediction stored with a pick is the highest fidelity's, and a
cheap fidelity's value (CHGNet's energy for a DFT target) is not what it predicted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["Calibration", "calibration_by_version", "pick_calibration"]

_Z90 = 1.6448536269514722


class Calibration(BaseModel):
    """Scores of predictions made before measuring (one model version, or all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int | None  # None: all model-chosen picks of the campaign
    surrogate: str | None  # the model that chose them, when one did
    n: int
    nll: float  # mean Gaussian negative log-likelihood per measurement
    coverage90: float  # share of measurements inside mean +- 1.645 std
    mae: float
    mean_std: float


def _score(
    rows: list[tuple[float, float, float]], version: int | None, surrogate: str | None
) -> Calibration:
    nll, inside, err, sds = 0.0, 0, 0.0, 0.0
    for mean, sd, y in rows:
        sd_eff = max(sd, 1e-12)
        z = (y - mean) / sd_eff
        nll += 0.5 * z * z + math.log(sd_eff) + 0.5 * math.log(2 * math.pi)
        inside += abs(z) <= _Z90
        err += abs(y - mean)
        sds += sd
    n = len(rows)
    return Calibration(
        version=version,
        surrogate=surrogate,
        n=n,
        nll=nll / n,
        coverage90=inside / n,
        mae=err / n,
        mean_std=sds / n,
    )


def _rows(
    decisions: Iterable[Mapping[str, Any]],
    measured: Mapping[str, float],
    fidelity: str | None,
) -> list[tuple[int | None, str | None, float, float, float]]:
    out = []
    for d in decisions:
        for c in d["chosen"]:
            if c.predicted_mean is None or c.predicted_std is None:
                continue
            if fidelity is not None and c.fidelity != fidelity:
                continue
            y = measured.get(c.candidate_id)
            if y is None or not math.isfinite(y):
                continue
            mean, sd = float(c.predicted_mean[0]), float(c.predicted_std[0])
            if not (math.isfinite(mean) and math.isfinite(sd)):
                continue
            out.append((d["model_version"], c.surrogate, mean, sd, y))
    return out


def calibration_by_version(
    decisions: Iterable[Mapping[str, Any]],
    measured: Mapping[str, float],
    fidelity: str | None = None,
) -> list[Calibration]:
    """One :class:`Calibration` per model version that chose measured candidates.

    Args:
        decisions: the store's decisions (``model_version`` and ``chosen``).
        measured: candidate id -> measured value of the first target (at ``fidelity``).
        fidelity: score only the picks made at this fidelity (the campaign's highest;
            ``""`` in a single-fidelity campaign); None scores every pick.
    """
    groups: dict[int | None, list[tuple[float, float, float]]] = {}
    names: dict[int | None, str | None] = {}
    for version, surrogate, mean, sd, y in _rows(decisions, measured, fidelity):
        groups.setdefault(version, []).append((mean, sd, y))
        names[version] = surrogate
    return [
        _score(rows, v, names[v])
        for v, rows in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
    ]


def pick_calibration(
    decisions: Iterable[Mapping[str, Any]],
    measured: Mapping[str, float],
    fidelity: str | None = None,
) -> Calibration | None:
    """All model-chosen measured picks (at ``fidelity``) scored together; None if none."""
    rows = [(m, s, y) for _, _, m, s, y in _rows(decisions, measured, fidelity)]
    return _score(rows, None, None) if rows else None
