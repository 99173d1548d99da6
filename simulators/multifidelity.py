"""A simulated multi-fidelity lab: one hidden table holding every fidelity's values.

The simulated lab measures whatever names a request lists in ``targets``
(:class:`simulators.lab.SimulatedLab`), so a lab with several fidelities is the
ordinary lab over a wider table: the highest fidelity's values under the objective
targets' names, every lower fidelity's under the names it reports
(``energy_per_atom@chgnet``). Who builds the lab (:func:`loop.wiring.ground_truth`)
computes the columns -- e.g. CHGNet energies of the pool's structures -- and hands
them here; this module imports nothing but the ground-truth model.
"""

from __future__ import annotations

from collections.abc import Mapping

from simulators.ground_truth import GroundTruth

__all__ = ["with_fidelity_columns"]


def with_fidelity_columns(
    truth: GroundTruth,
    columns: Mapping[str, Mapping[str, float]],
    units: Mapping[str, str],
) -> GroundTruth:
    """``truth`` with the extra hidden columns ``columns`` (name -> {candidate id -> value}).

    A candidate without a value in a column cannot be measured at that fidelity (the
    lab fails such a job permanently, as for any missing target).

    Raises:
        ValueError: a column has no unit, or would replace one of ``truth``'s targets.
    """
    clash = sorted(set(columns) & set(truth.units))
    if clash:
        raise ValueError(f"fidelity columns {clash} would replace targets of the truth table")
    missing = sorted(set(columns) - set(units))
    if missing:
        raise ValueError(f"fidelity columns {missing} have no unit")
    values = {cid: dict(row) for cid, row in truth.values.items()}
    for name, column in columns.items():
        for cid, value in column.items():
            values.setdefault(cid, {})[name] = float(value)
    return GroundTruth(
        units={**truth.units, **{k: units[k] for k in columns}},
        values=values,
        source=f"{truth.source} + fidelities {', '.join(sorted(columns))}",
    )
