"""Campaign objectives and constraints as functions of predicted or measured values.

Everything downstream (acquisition, best-so-far, benchmark metrics) works with a
single scalar "higher is better" objective plus feasibility constraints:

* ``maximize t``  -> objective ``y_t``;
* ``minimize t``  -> objective ``-y_t``;
* ``window t [lo, hi]`` as the objective -> ``-(distance of y_t to [lo, hi])`` (0 inside);
* constraints ``lower <= y_t <= upper`` -> BoTorch-style callables ``c(Y) <= 0`` when
  satisfied, so acquisition functions weigh candidates by their probability of
  feasibility instead of filtering after the fact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Sense = Literal["maximize", "minimize", "window"]


@dataclass(frozen=True)
class Bound:
    """``lower <= y[target] <= upper`` (either side may be None)."""

    target: int
    lower: float | None = None
    upper: float | None = None


@dataclass(frozen=True)
class Goal:
    """One further objective of a multi-objective campaign."""

    target: int
    sense: Sense
    window: tuple[float, float] | None = None


def _oriented(v: Tensor, sense: Sense, window: tuple[float, float] | None) -> Tensor:
    """``v`` as a higher-is-better objective."""
    if sense == "maximize":
        return v
    if sense == "minimize":
        return -v
    assert window is not None  # guaranteed by the config validator
    lo, hi = window
    return -((lo - v).clamp_min(0.0) + (v - hi).clamp_min(0.0))


@dataclass(frozen=True)
class ObjectiveSpec:
    """A scalarised objective over ``m`` targets with feasibility bounds.

    Attributes:
        targets: the target names, in the order of the last tensor dimension.
        primary: index of the target the objective is about.
        sense: maximise, minimise, or get into ``window``.
        window: ``(lo, hi)`` when ``sense == "window"``.
        constraints: bounds that a candidate must satisfy to count.
        others: further objectives; with any, the campaign searches their Pareto front
            together with the primary one (:meth:`objectives`), and :meth:`objective` /
            :meth:`score` still rank by the primary objective alone.
    """

    targets: tuple[str, ...]
    primary: int
    sense: Sense
    window: tuple[float, float] | None = None
    constraints: tuple[Bound, ...] = field(default_factory=tuple)
    others: tuple[Goal, ...] = field(default_factory=tuple)

    @property
    def is_multi(self) -> bool:
        return bool(self.others)

    def objective(self, y: Tensor) -> Tensor:
        """Scalar objective, higher is better. ``y``: ``... x m`` -> ``...``."""
        return _oriented(y[..., self.primary], self.sense, self.window)

    def objectives(self, y: Tensor) -> Tensor:
        """Every objective, higher is better: ``... x m`` -> ``... x k`` (primary first)."""
        cols = [self.objective(y)] + [
            _oriented(y[..., g.target], g.sense, g.window) for g in self.others
        ]
        return torch.stack(cols, dim=-1)

    def constraint_callables(self) -> list[Callable[[Tensor], Tensor]]:
        """BoTorch constraints: each maps ``... x m`` samples to ``...``, feasible when <= 0."""
        out: list[Callable[[Tensor], Tensor]] = []
        for b in self.constraints:
            if b.lower is not None:
                out.append(_LowerBound(b.target, b.lower))
            if b.upper is not None:
                out.append(_UpperBound(b.target, b.upper))
        return out

    def feasible(self, y: Tensor) -> Tensor:
        """Boolean feasibility of each ``... x m`` value (NaN counts as infeasible)."""
        ok = torch.ones(y.shape[:-1], dtype=torch.bool, device=y.device)
        for c in self.constraint_callables():
            ok &= c(y) <= 0
        return ok

    def score(self, y: Tensor) -> Tensor:
        """Objective where feasible, -inf elsewhere: the quantity best-so-far tracks."""
        value = self.objective(y)
        return torch.where(
            self.feasible(y) & ~torch.isnan(value), value, torch.full_like(value, -torch.inf)
        )

    def describe(self) -> str:
        t = self.targets[self.primary]
        head = f"{self.sense} {t}" + (
            f" in [{self.window[0]}, {self.window[1]}]" if self.window else ""
        )
        parts = [head]
        for g in self.others:
            parts.append(
                f"{g.sense} {self.targets[g.target]}"
                + (f" in [{g.window[0]}, {g.window[1]}]" if g.window else "")
            )
        for b in self.constraints:
            lo = "-inf" if b.lower is None else f"{b.lower:g}"
            hi = "inf" if b.upper is None else f"{b.upper:g}"
            parts.append(f"{lo} <= {self.targets[b.target]} <= {hi}")
        return "; ".join(parts)


@dataclass(frozen=True)
class _LowerBound:
    target: int
    bound: float

    def __call__(self, Y: Tensor) -> Tensor:
        return self.bound - Y[..., self.target]


@dataclass(frozen=True)
class _UpperBound:
    target: int
    bound: float

    def __call__(self, Y: Tensor) -> Tensor:
        return Y[..., self.target] - self.bound


def top_fraction_ids(
    ids: Sequence[str], truth: Tensor, spec: ObjectiveSpec, fraction: float
) -> set[str]:
    """The ids of the pool's top ``fraction`` by score (feasible candidates only).

    Args:
        ids: candidate ids, length ``n``.
        truth: ``n x m`` true values.
        fraction: e.g. 0.01 for the top 1 %; at least one candidate is returned if any is feasible.
    """
    score = spec.score(truth)
    n_feasible = int(torch.isfinite(score).sum())
    k = min(n_feasible, max(1, round(fraction * len(ids))))
    order = torch.argsort(score, descending=True)[:k]
    return {ids[int(i)] for i in order}
