"""Stop rules: small callables that look at the loop's state and may say "stop".

A rule returns ``None`` to go on, or the reason to stop (shown to the user and
stored as the campaign's ``stop_reason``). The campaign asks its rules before
every decision; jobs in flight still finish after a rule fired. Add a rule by
writing a function of :class:`LoopState` and listing it in :func:`rules_for`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loop.config import CampaignConfig

__all__ = ["LoopState", "StopRule", "rules_for"]


@dataclass(frozen=True)
class LoopState:
    """What the stop rules see.

    Attributes:
        n_jobs: jobs so far (failures included).
        n_failed: jobs that ended FAILED, LOST or CANCELLED.
        pool_left: candidates without a job.
        elapsed_s: wall seconds since this run (not the campaign) started.
        cost_spent: summed cost of the measurements, in the adapter's unit.
        decisions_without_improvement: decisions since the best value last improved.
    """

    n_jobs: int
    n_failed: int
    pool_left: int
    elapsed_s: float
    cost_spent: float
    decisions_without_improvement: int


StopRule = Callable[[LoopState], str | None]


def experiment_budget(limit: int) -> StopRule:
    return lambda s: "experiment budget reached" if s.n_jobs >= limit else None


def pool_exhausted(s: LoopState) -> str | None:
    return "pool exhausted" if s.pool_left <= 0 else None


def wall_time(limit_s: float) -> StopRule:
    return lambda s: "wall-time budget reached" if s.elapsed_s > limit_s else None


def cost_budget(limit: float) -> StopRule:
    return lambda s: "cost budget reached" if s.cost_spent >= limit else None


def no_improvement(rounds: int) -> StopRule:
    def rule(s: LoopState) -> str | None:
        n = s.decisions_without_improvement
        return f"no improvement in {n} decisions" if n >= rounds else None

    return rule


def failure_fraction(limit: float, *, min_jobs: int = 10) -> StopRule:
    def rule(s: LoopState) -> str | None:
        if s.n_jobs >= min_jobs and s.n_failed / s.n_jobs >= limit:
            return f"{s.n_failed} of {s.n_jobs} jobs failed"
        return None

    return rule


def rules_for(config: CampaignConfig) -> list[StopRule]:
    """The rules a config asks for, in the order they are checked."""
    rules: list[StopRule] = [experiment_budget(config.budget.experiments), pool_exhausted]
    if config.budget.wall_time_s is not None:
        rules.append(wall_time(config.budget.wall_time_s))
    if config.budget.cost is not None:
        rules.append(cost_budget(config.budget.cost))
    if config.stop.no_improvement_rounds is not None:
        rules.append(no_improvement(config.stop.no_improvement_rounds))
    rules.append(failure_fraction(config.stop.max_failure_fraction))
    return rules


def first_reason(rules: list[StopRule], state: LoopState) -> str | None:
    """The reason of the first rule that fires, or None."""
    for rule in rules:
        if (reason := rule(state)) is not None:
            return reason
    return None
