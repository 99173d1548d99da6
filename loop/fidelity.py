"""Fidelities of a campaign: named ways of measuring the objective, each with a cost.

A campaign may declare ``fidelities:``. Each one is a named measurement of the
objective's target(s) through an adapter -- its own ``adapter`` (the same union
as the campaign's: CHGNet, GPAW, an HTTP lab...) or else the campaign's -- with a ``cost`` in the
budget's unit (``budget.cost``) and a mapping ``outputs`` of each objective target
to the quantity that fidelity reports. Exactly one fidelity is the *highest*
(the one the campaign optimises and reports): the one marked ``highest: true``, or
when none is marked, the one with the largest cost (a tie is an error).

Every job carries its fidelity: the request's ``targets`` are the fidelity's
output names and ``parameters`` holds ``{"fidelity": name, **parameters}``, so a
lab or a DFT cluster behind one adapter can route by fidelity. When fidelities
have adapters of their own, :class:`adapters.routing.FidelityRouter` sends each
job to its fidelity's adapter (wired by :mod:`loop.wiring`). In simulation
(``adapter.kind: simulated``) each lower fidelity reads its hidden values from
``simulated``: a column of the pool's dataset, a cached CHGNet table
(:mod:`loop.multifidelity`) or a CSV file of ``id,value``.

Without ``fidelities`` a campaign is single-fidelity, each experiment costing 1.
Validating this module imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # resolved by loop.config (FidelityConfig.model_rebuild): the union lives there
    from loop.config import AdapterConfig

__all__ = ["FidelityConfig", "SimulatedFidelity", "highest_fidelity", "output_names"]


class SimulatedFidelity(BaseModel):
    """Where a simulated lab finds this fidelity's hidden values (give exactly one source).

    Attributes:
        column: a target column of the pool's dataset (e.g. perov_5 ``heat_all``).
        chgnet: a CHGNet table of the pool's dataset, computed once and cached
            (:func:`loop.multifidelity.chgnet_table`).
        file: a CSV with ``id_column`` and ``value_column``.
    """

    model_config = ConfigDict(extra="forbid")

    column: str | None = None
    chgnet: Literal["energy_per_atom", "formation_energy_per_cell"] | None = None
    file: Path | None = None
    id_column: str = "material_id"
    value_column: str = "value"

    @model_validator(mode="after")
    def _one_source(self) -> SimulatedFidelity:
        given = [k for k in ("column", "chgnet", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of column, chgnet or file (got {given or 'none'})")
        return self


class FidelityConfig(BaseModel):
    """One fidelity (see the module docstring).

    Its ``adapter`` field is the campaign's ``AdapterConfig`` union, which lives in
    :mod:`loop.config`; that module completes this model when it is imported, so
    build fidelities through :class:`loop.config.CampaignConfig`.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    cost: float = Field(gt=0)  # per experiment, in the unit of budget.cost
    highest: bool = False  # the fidelity the campaign optimises (else: the most expensive)
    # objective target -> name the fidelity reports it under; missing targets: the highest
    # fidelity reports the target itself, a lower one "<target>@<fidelity name>"
    outputs: dict[str, str] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)  # passed to the adapter
    simulated: SimulatedFidelity | None = None  # the hidden values of a simulated lab
    # who measures this fidelity (e.g. chgnet, gpaw, http); None: the campaign's `adapter`
    adapter: AdapterConfig | None = None
    # jobs of this fidelity at its adapter at once (the job engine's group limit); None: its
    # own adapter's capacity when it has one (`max_parallel`, a lab's capacity), else only
    # `dispatch.concurrency` limits it. A job over the limit waits in the engine's queue
    # without holding a slot that another fidelity's job could use.
    max_in_flight: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _own_adapter(self) -> FidelityConfig:
        if self.adapter is None:
            return self
        kind = self.adapter.kind
        if kind == "simulated":
            raise ValueError(
                f"fidelity {self.name!r}: adapter kind simulated is not a fidelity's own adapter; "
                "leave `adapter` out and give `simulated` (the campaign's simulated lab measures "
                "every fidelity that has no adapter of its own)"
            )
        if self.simulated is not None:
            raise ValueError(
                f"fidelity {self.name!r}: `simulated` is read by a simulated lab only, but this "
                f"fidelity is measured by its own {kind} adapter; drop one of them"
            )
        return self


def highest_fidelity(fidelities: list[FidelityConfig]) -> int:
    """Index of the highest fidelity: the one marked ``highest``, else the unique most expensive.

    Raises:
        ValueError: two are marked, or none is and the largest cost is shared.
    """
    marked = [i for i, f in enumerate(fidelities) if f.highest]
    if len(marked) > 1:
        names = [fidelities[i].name for i in marked]
        raise ValueError(f"fidelities: only one may be marked highest, got {names}")
    if marked:
        return marked[0]
    top = max(f.cost for f in fidelities)
    at_top = [i for i, f in enumerate(fidelities) if f.cost == top]
    if len(at_top) > 1:
        names = [fidelities[i].name for i in at_top]
        raise ValueError(
            f"fidelities: no highest fidelity: none is marked `highest: true` and {names} share "
            f"the largest cost {top:g}; mark one"
        )
    return at_top[0]


def output_names(
    fidelity: FidelityConfig, targets: tuple[str, ...], *, is_highest: bool
) -> dict[str, str]:
    """Objective target -> the name ``fidelity`` reports it under (defaults filled in)."""
    return {
        t: fidelity.outputs.get(t, t if is_highest else f"{t}@{fidelity.name}") for t in targets
    }
