"""What the store says about a campaign, in the pool's indices.

The campaign, the agent and the stop rules all read the same facts: which
candidates were measured and what they gave, which are taken or in flight, the
best feasible result, the job counts. :class:`Ledger` derives them from the
:class:`~loop.store.CampaignStore` (never from memory), so a resumed campaign
sees exactly what an uninterrupted one saw.

With fidelities (:mod:`loop.fidelity`), "measured" and "best" mean the highest
fidelity; the view also lists every fidelity's observations, the (candidate,
fidelity) pairs taken or in flight and the cost committed so far (in-flight jobs
included), which is also what the cost stop rule reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.base import EventKind, JobEvent, JobState, Measurement
from loop.agent import CampaignView, FidelityObservation
from loop.config import CampaignConfig
from loop.fidelity import output_names
from loop.stop_rules import LoopState
from loop.store import CREATED, PROPOSED, REJECTED, CampaignStore

__all__ = ["Best", "Counts", "Ledger"]

logger = logging.getLogger(__name__)
_ENDED = {
    EventKind.FAILED: JobState.FAILED,
    EventKind.TIMED_OUT: JobState.FAILED,
    EventKind.CANCELLED: JobState.CANCELLED,
    EventKind.LOST: JobState.LOST,
}

_OPEN = (CREATED, JobState.QUEUED.value, JobState.RUNNING.value)
_UNSUCCESSFUL = (JobState.FAILED.value, JobState.LOST.value, JobState.CANCELLED.value)


@dataclass(frozen=True)
class Counts:
    """Jobs by what matters to the loop."""

    n_jobs: int  # every job, failures and waiting proposals included, rejected ones not
    n_open: int  # CREATED, QUEUED or RUNNING
    n_failed: int  # FAILED, LOST or CANCELLED
    n_proposed: int = 0  # waiting at the approval gate (each holds a slot)
    n_rejected: int = 0  # refused at the gate: never run, no budget spent, not in the pool


@dataclass(frozen=True)
class Best:
    """The best feasible measurement so far."""

    score: float  # the objective's score (higher is better; negated for minimisation)
    value: float  # the objective target's own measured value
    candidate_id: str


class Ledger:
    """Reads a campaign's facts from its store.

    Args:
        store: the campaign's store.
        config: the campaign config (targets, objective, budget).
        candidate_ids: the pool; index ``i`` is ``candidate_ids[i]``.
    """

    def __init__(
        self, store: CampaignStore, config: CampaignConfig, candidate_ids: list[str]
    ) -> None:
        self.store = store
        self.config = config
        self.ids = candidate_ids
        self.index = {cid: i for i, cid in enumerate(candidate_ids)}
        self.spec = config.objective_spec()
        self.highest = config.highest_fidelity
        # fidelity -> {reported name: objective target}
        self._names = {
            f.name: {
                v: k
                for k, v in output_names(
                    f, config.targets, is_highest=f.name == self.highest
                ).items()
            }
            for f in config.fidelities
        }

    def counts(self) -> Counts:
        counts = self.store.job_counts()
        return Counts(
            n_jobs=sum(counts.values()) - counts.get(REJECTED, 0),
            n_open=sum(counts.get(s, 0) for s in _OPEN),
            n_failed=sum(counts.get(s, 0) for s in _UNSUCCESSFUL),
            n_proposed=counts.get(PROPOSED, 0),
            n_rejected=counts.get(REJECTED, 0),
        )

    def measured(self) -> tuple[Tensor, Tensor]:
        """Measured pool indices (``n``, sorted) and their ``n x m`` values (NaN if missing)."""
        rows: dict[int, list[float]] = {}
        for m, fidelity, _ in self.store.fidelity_measurements():
            if fidelity != self.highest:
                continue
            if (at := self.index.get(m.candidate_id)) is not None:
                rows[at] = self._values(m, fidelity)
        targets = self.config.targets
        order = sorted(rows)
        y = torch.tensor([rows[i] for i in order], dtype=torch.float64)
        return torch.tensor(order, dtype=torch.long), y.reshape(len(order), len(targets))

    def _values(self, m: Measurement, fidelity: str) -> list[float]:
        """The objective targets' values of a measurement at ``fidelity`` (NaN if missing)."""
        names = self._names.get(fidelity)
        values = (
            {names[k]: v.value for k, v in m.values.items() if k in names}
            if names is not None
            else {k: v.value for k, v in m.values.items()}
        )
        return [values.get(t, float("nan")) for t in self.config.targets]

    def observations(self) -> tuple[FidelityObservation, ...]:
        """Every measurement at every fidelity, in the order it was recorded."""
        out = []
        for m, fidelity, cost in self.store.fidelity_measurements():
            if (at := self.index.get(m.candidate_id)) is not None:
                out.append(
                    FidelityObservation(at, fidelity, tuple(self._values(m, fidelity)), cost)
                )
        return tuple(out)

    def best(self) -> Best | None:
        """The best feasible measured candidate, or None."""
        idx, y = self.measured()
        if idx.numel() == 0:
            return None
        score = self.spec.score(y)  # n
        i = int(torch.argmax(score))
        if not torch.isfinite(score[i]):
            return None
        return Best(float(score[i]), float(y[i, self.spec.primary]), self.ids[int(idx[i])])

    def view(self) -> CampaignView:
        """What the agent is shown."""
        jobs = self.store.jobs()
        idx, y = self.measured()
        live = [j for j in jobs if j.candidate_id in self.index and j.state != REJECTED]
        return CampaignView(
            measured_idx=idx,
            measured_y=y,
            taken=frozenset(
                self.index[j.candidate_id]
                for j in jobs
                if j.candidate_id in self.index and j.fidelity == self.highest
            ),
            pending=[
                self.index[j.candidate_id]
                for j in jobs
                if not j.is_terminal and j.candidate_id in self.index
            ],
            n_jobs=sum(j.state != REJECTED for j in jobs),
            decision_no=len(self.store.decisions()),
            observations=self.observations() if self.config.fidelities else (),
            taken_at=frozenset(
                (self.index[j.candidate_id], j.fidelity)
                for j in jobs
                if j.candidate_id in self.index
            ),
            pending_at=tuple(
                (self.index[j.candidate_id], j.fidelity) for j in live if not j.is_terminal
            ),
            cost_committed=self.store.committed_cost(),
        )

    def loop_state(self, *, elapsed_s: float, decisions_without_improvement: int) -> LoopState:
        """What the stop rules are shown."""
        c = self.counts()
        spent = sum(m.cost for m in self.store.measurements()) if self.config.budget.cost else 0.0
        pairs = len(self.ids) * len(self.config.fidelity_names)  # (candidate, fidelity) pairs
        if self.config.fidelities:  # the fidelities' costs, in-flight jobs included
            spent = self.store.committed_cost()
        return LoopState(
            n_jobs=c.n_jobs,
            n_failed=c.n_failed,
            pool_left=pairs - c.n_jobs - c.n_rejected,
            elapsed_s=elapsed_s,
            cost_spent=spent,
            decisions_without_improvement=decisions_without_improvement,
        )

    def record(self, event: JobEvent) -> None:
        """Store what an executor reported (REFUSED is the caller's to handle: not stored)."""
        store, key = self.store, event.idempotency_key
        if event.kind == EventKind.SUBMITTED:
            store.update_job(key, JobState.QUEUED, handle=event.handle)
        elif event.kind == EventKind.STATE and event.status is not None:
            store.update_job(key, event.status.state, handle=event.handle)
        elif event.kind == EventKind.SUCCEEDED and event.measurement is not None:
            if event.handle is not None:
                store.update_job(key, JobState.RUNNING, handle=event.handle)
            store.record_measurement(key, event.measurement)
        elif event.kind in _ENDED:
            reason = event.message or event.kind.value.lower()
            if event.kind == EventKind.TIMED_OUT:
                reason = f"timed out: {reason}"
            store.update_job(key, _ENDED[event.kind], handle=event.handle, message=reason)
            logger.debug("job %s ended %s: %s", key, event.kind.value, reason)

    def why_stuck(self) -> str:
        """Why no new decision can be made although budget is left."""
        c = self.counts()
        if len(self.ids) * len(self.config.fidelity_names) - c.n_jobs - c.n_rejected <= 0:
            return "pool exhausted"
        if self.config.fidelities and self.config.budget.cost is not None:
            left = self.config.budget.cost - self.store.committed_cost()
            if left < self.config.fidelity_cost(self.highest):  # see loop/mf_acquisition.py
                return (
                    f"cost budget reached ({left:g} left: no highest-fidelity measurement fits, "
                    "so no cheaper one is worth making)"
                )
        lost = (JobState.FAILED.value, JobState.LOST.value)
        failed = [j for j in self.store.jobs() if j.state in lost]
        if self.store.n_measurements() < 2 and failed:
            return (
                f"{len(failed)} jobs failed and fewer than 2 succeeded, so the surrogate cannot "
                f"learn; last failure: {failed[-1].message}"
            )
        return "nothing left to decide"
