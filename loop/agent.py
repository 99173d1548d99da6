"""The agent: what to measure next.

Asked to fill ``n_free`` slots, the :class:`Agent` looks at what the campaign
knows (:class:`CampaignView`: measured candidates and values, candidates taken
or in flight, the decision number) and returns a :class:`Proposal`:

* **initial design** while fewer than ``initial_design.n_random + len(ids)``
  jobs exist (the given ids first, then seeded random picks, or with ``method:
  diverse`` max-min picks over the surrogate's pool features, :mod:`loop.design`),
  and always for a surrogate that does not learn (random);
* **refit policy**: the surrogate is refitted (measurements + prior data) when
  ``finetune.every_n_results`` new measurements arrived since the last fit; each
  fit becomes a version in the :class:`~loop.registry.ModelRegistry`;
* **acquisition** over the unmeasured pool with the in-flight jobs as
  ``X_pending`` (:func:`loop.acquisition.select_batch`).

Every random draw is seeded by the decision number and every fit by the number
of measurements, so the same store gives the same proposal.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from loop.acquisition import select_batch
from loop.config import CampaignConfig
from loop.design import max_min_design
from loop.records import Timings
from loop.registry import ModelRegistry
from loop.store import ChosenCandidate
from loop.surrogate import Surrogate

__all__ = ["Agent", "CampaignView", "FidelityObservation", "PoolAgent", "Proposal", "Proposer"]

logger = logging.getLogger(__name__)
_phase = logging.getLogger("cloudlab.progress")  # what a live display shows (loop/cli/live.py)


@dataclass(frozen=True)
class FidelityObservation:
    """One measurement at one fidelity (multi-fidelity campaigns, :mod:`loop.fidelity`).

    Attributes:
        index: the candidate's pool index.
        fidelity: the fidelity's name.
        values: the objective targets' values (``m``; NaN where missing).
        cost: what the experiment cost.
    """

    index: int
    fidelity: str
    values: tuple[float, ...]
    cost: float


@dataclass(frozen=True)
class CampaignView:
    """What the agent is shown when asked to fill free slots.

    Attributes:
        measured_idx: ``n`` pool indices with a measurement, sorted.
        measured_y: ``n x m`` their values (NaN where a target is missing).
        taken: pool indices that already have a job (any state).
        pending: pool indices of jobs still in flight.
        n_jobs: jobs so far, failures included.
        decision_no: decisions made so far (seeds this one).
        observations: with fidelities, every measurement at every fidelity.
        taken_at: (pool index, fidelity) of every job (any state).
        pending_at: (pool index, fidelity) of the jobs in flight.
        cost_committed: summed cost of every job so far, in-flight ones included.

    With fidelities, ``measured_*`` and ``taken`` are those of the highest fidelity.
    """

    measured_idx: Tensor
    measured_y: Tensor
    taken: frozenset[int]
    pending: list[int]
    n_jobs: int
    decision_no: int
    observations: tuple[FidelityObservation, ...] = ()
    taken_at: frozenset[tuple[int, str]] = frozenset()
    pending_at: tuple[tuple[int, str], ...] = ()
    cost_committed: float = 0.0


class Proposal(BaseModel):
    """One decision: the candidates chosen and what chose them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chosen: list[ChosenCandidate]
    model_version: int | None
    acquisition: str  # "initial_design" or the acquisition kind


class Proposer(Protocol):
    """What the campaign needs of an agent."""

    @property
    def model_version(self) -> int | None: ...

    def propose(self, view: CampaignView, n_free: int) -> Proposal: ...


class PoolAgent:
    """What every agent holds: the campaign config, the pool's ids, a surrogate, the
    registry of its fitted versions (the newest is restored on construction) and the
    timings its stages add to.

    Args:
        config: the campaign config.
        candidate_ids: the pool's ids; pool index ``i`` is ``candidate_ids[i]``.
        surrogate: the model.
        registry: where fitted versions go (and the newest is restored from).
        timings: where fit, scoring and acquisition seconds are added up.
        restore: restore the newest fitted version (False for a surrogate that does not learn).
    """

    def __init__(
        self,
        config: CampaignConfig,
        candidate_ids: list[str],
        surrogate: Surrogate,
        registry: ModelRegistry,
        timings: Timings,
        *,
        restore: bool = True,
    ) -> None:
        self.config = config
        self.ids = candidate_ids
        self.index = {cid: i for i, cid in enumerate(candidate_ids)}
        self.registry = registry
        self.timings = timings
        self._version: int | None = None
        self._n_fit = -1
        if restore and (restored := registry.restore(surrogate)) is not None:
            self._version, self._n_fit = restored.version, restored.n_train

    @property
    def model_version(self) -> int | None:
        return self._version


class Agent(PoolAgent):
    """Initial design, refit policy and acquisition over one surrogate.

    Args: those of :class:`PoolAgent` (the surrogate's indices address the pool, then the
    prior rows), and ``prior_y``, the ``p x m`` labels of the prior rows (indices
    ``N .. N + p - 1``).
    """

    def __init__(
        self,
        config: CampaignConfig,
        candidate_ids: list[str],
        surrogate: Surrogate,
        registry: ModelRegistry,
        prior_y: Tensor,
        timings: Timings,
    ) -> None:
        self.surrogate = surrogate
        self.prior_y = prior_y
        self._design: Tensor | None = None
        self._design_done = False  # design features computed (they may be None)
        super().__init__(
            config, candidate_ids, surrogate, registry, timings, restore=surrogate.learns
        )

    def propose(self, view: CampaignView, n_free: int) -> Proposal:
        """Choose up to ``n_free`` candidates (none while the initial design is in flight)."""
        n_pool = len(self.ids)
        available = torch.tensor(
            [i for i in range(n_pool) if i not in view.taken], dtype=torch.long
        )
        if available.numel() == 0 or n_free <= 0:
            return Proposal(chosen=[], model_version=self._version, acquisition="none")
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + view.decision_no)
        design = self.config.initial_design
        n_initial = design.n_random + len(design.ids)
        if not self.surrogate.learns or view.n_jobs < n_initial:
            k = n_free if not self.surrogate.learns else min(n_free, n_initial - view.n_jobs)
            return self._initial(view, available, k, gen)
        if view.measured_idx.numel() + len(self.prior_y) < 2:
            return Proposal(chosen=[], model_version=self._version, acquisition="none")
        self._maybe_refit(view.measured_idx, view.measured_y)
        return self._acquire(view, available, n_free, gen)

    # ------------------------------------------------------------------ the three stages
    def _initial(
        self, view: CampaignView, available: Tensor, k: int, gen: torch.Generator
    ) -> Proposal:
        given = [
            self.index[c]
            for c in self.config.initial_design.ids
            if c in self.index and self.index[c] not in view.taken
        ]
        chosen = given[:k]
        rest = available[~torch.isin(available, torch.tensor(chosen, dtype=torch.long))]
        features = self._design_features()
        if features is None:
            order = torch.randperm(rest.numel(), generator=gen)[: k - len(chosen)]
            chosen += [int(rest[i]) for i in order]
        else:
            taken = torch.tensor(sorted(view.taken) + chosen, dtype=torch.long)
            chosen += max_min_design(features, rest, taken, k - len(chosen), gen)
        return Proposal(
            chosen=[ChosenCandidate(candidate_id=self.ids[i]) for i in chosen],
            model_version=self._version,
            acquisition="initial_design",
        )

    def _design_features(self) -> Tensor | None:
        """The surrogate's pool features for a diverse design (computed once), else None."""
        if self.config.initial_design.method != "diverse" or not self.surrogate.learns:
            return None
        if not self._design_done:
            self._design, self._design_done = self.surrogate.design_features(), True
            if self._design is None:
                logger.warning(
                    "initial_design.method diverse: surrogate %s has no label-free pool "
                    "features; the initial design is random",
                    self.surrogate.name,
                )
        return self._design

    def _maybe_refit(self, measured_idx: Tensor, measured_y: Tensor) -> None:
        n = int(measured_idx.numel())
        due = self._version is None or n - self._n_fit >= self.config.finetune.every_n_results
        if not due:
            return
        t0 = time.perf_counter()
        label = f"fitting model v{(self._version or 0) + 1} on {n} measurements"
        _phase.debug(label, extra={"phase": label})
        torch.manual_seed(self.config.seed * 100_003 + n)
        n_pool, n_prior = len(self.ids), len(self.prior_y)
        train_idx = torch.cat([measured_idx, torch.arange(n_pool, n_pool + n_prior)])
        train_y = torch.cat([measured_y, self.prior_y])
        keep = ~torch.isnan(train_y).all(-1)
        metrics = self.surrogate.fit(train_idx[keep], train_y[keep])
        scoring = metrics.get("score_seconds", 0.0)  # an ensemble scores the pool in fit()
        self.timings.fit += time.perf_counter() - t0 - scoring
        self.timings.score += scoring
        version = self.registry.save(self.surrogate, n_train=n, metrics=metrics)
        self._version, self._n_fit = version.version, n
        logger.debug("surrogate v%d fitted on %d measurements", version.version, n)

    def _acquire(
        self, view: CampaignView, available: Tensor, n_free: int, gen: torch.Generator
    ) -> Proposal:
        t0 = time.perf_counter()
        label = f"choosing {n_free} experiment(s)"
        _phase.debug(label, extra={"phase": label})
        acq = self.config.acquisition
        picks = select_batch(
            kind=acq.kind,
            surrogate=self.surrogate,
            spec=self.config.objective_spec(),
            q=n_free,
            available=available,
            pending=torch.tensor(view.pending, dtype=torch.long),
            measured_idx=view.measured_idx,
            measured_y=view.measured_y,
            generator=gen,
            beta=acq.beta,
            shortlist=acq.shortlist_for(self.surrogate.active_name),
            top_fraction=acq.top_fraction,
        )
        self.timings.acquisition += time.perf_counter() - t0
        chosen_idx = torch.tensor([p.index for p in picks], dtype=torch.long)
        mean, std = self.surrogate.outcome_mean_std(chosen_idx)  # of the measurement
        return Proposal(
            chosen=[
                ChosenCandidate(
                    candidate_id=self.ids[p.index],
                    acquisition_value=p.value,
                    predicted_mean=mean[k].tolist(),
                    predicted_std=std[k].tolist(),
                    surrogate=self.surrogate.active_name,
                )
                for k, p in enumerate(picks)
            ],
            model_version=self._version,
            acquisition=acq.kind if self._version else "initial_design",
        )
