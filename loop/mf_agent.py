"""The multi-fidelity agent: initial design at every fidelity, refits, cost-aware acquisition.

Used by the campaign instead of :class:`loop.agent.Agent` when the config declares
``fidelities`` (:mod:`loop.fidelity`). Asked to fill free slots it proposes
(candidate, fidelity) pairs:

* **initial design**: ``initial_design.ids`` and then ``initial_design.n_random``
  seeded random candidates, each measured at *every* fidelity (the same candidates
  at every fidelity are what teaches the model how the fidelities relate), cheapest
  first, as far as the cost budget allows;
* **refit policy**: the ICM GP (:mod:`loop.mf_surrogate`) is refitted when
  ``finetune.every_n_results`` new measurements (any fidelity) arrived; each fit is a
  version in the model registry, restored on resume;
* **acquisition**: :func:`loop.mf_acquisition.select_pairs` with the jobs in flight
  at any fidelity conditioned on, and the cost budget left after every committed job
  (``acquisition.kind: random`` picks random pairs within the budget instead).

Every draw is seeded by the campaign seed and the decision number, so the same
store gives the same proposal.
"""

from __future__ import annotations

import logging
import time

import torch

from loop.agent import CampaignView, PoolAgent, Proposal
from loop.config import CampaignConfig
from loop.mf_acquisition import select_pairs
from loop.mf_surrogate import MultiFidelityGPSurrogate
from loop.records import Timings
from loop.registry import ModelRegistry
from loop.store import ChosenCandidate

__all__ = ["MultiFidelityAgent", "build_mf_agent"]

logger = logging.getLogger(__name__)
_phase = logging.getLogger("cloudlab.progress")


class MultiFidelityAgent(PoolAgent):
    """Cost-aware proposals of (candidate, fidelity) pairs (see the module docstring).

    Args:
        config: the campaign config (with ``fidelities``).
        candidate_ids: the pool's ids; pool index ``i`` is ``candidate_ids[i]``.
        surrogate: the multi-fidelity GP over the pool's rows.
        registry: where fitted versions go (and the newest is restored from).
        timings: where fit and acquisition seconds are added up.
    """

    def __init__(
        self,
        config: CampaignConfig,
        candidate_ids: list[str],
        surrogate: MultiFidelityGPSurrogate,
        registry: ModelRegistry,
        timings: Timings,
    ) -> None:
        self.surrogate = surrogate
        highest = config.highest_fidelity
        # fidelity 0 of the surrogate is the highest; the others keep the config's order
        self.order = [highest] + [f.name for f in config.fidelities if f.name != highest]
        self.fid_index = {name: k for k, name in enumerate(self.order)}
        self.costs = [config.fidelity_cost(name) for name in self.order]
        super().__init__(config, candidate_ids, surrogate, registry, timings)

    def propose(self, view: CampaignView, n_free: int) -> Proposal:
        """Up to ``n_free`` (candidate, fidelity) pairs whose costs fit the budget left."""
        budget = self.config.budget.cost
        left = (budget if budget is not None else float("inf")) - view.cost_committed
        none = Proposal(chosen=[], model_version=self._version, acquisition="none")
        if n_free <= 0 or left < min(self.costs) - 1e-9:
            return none
        design = self._design()
        todo = [(i, f) for f in reversed(self._by_cost()) for i in design]
        todo = [(i, f) for i, f in todo if (i, f) not in view.taken_at]
        if todo:
            return self._pairs(todo, n_free, left, "initial_design")
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + view.decision_no)
        free = [
            (i, f) for f in self.order for i in range(len(self.ids)) if (i, f) not in view.taken_at
        ]
        if not free:
            return none
        if self.config.acquisition.kind == "random":
            order = torch.randperm(len(free), generator=gen).tolist()
            return self._pairs([free[k] for k in order], n_free, left, "random")
        n_obs = len(view.observations)
        if n_obs < 2:
            return none
        self._maybe_refit(view)
        return self._acquire(view, free, n_free, left)

    # ------------------------------------------------------------------ stages
    def _by_cost(self) -> list[str]:
        """Fidelity names, most expensive first."""
        return sorted(self.order, key=lambda f: -self.config.fidelity_cost(f))

    def _design(self) -> list[int]:
        """The initial design's candidates: the given ids, then seeded random ones."""
        design = self.config.initial_design
        given = [self.index[c] for c in design.ids if c in self.index]
        gen = torch.Generator().manual_seed(self.config.seed * 7_919 + 17)
        rest = [i for i in torch.randperm(len(self.ids), generator=gen).tolist() if i not in given]
        return given + rest[: design.n_random]

    def _pairs(
        self, pairs: list[tuple[int, str]], n_free: int, left: float, acquisition: str
    ) -> Proposal:
        chosen: list[ChosenCandidate] = []
        for i, f in pairs:
            cost = self.config.fidelity_cost(f)
            if len(chosen) == n_free:
                break
            if cost <= left + 1e-9:
                chosen.append(ChosenCandidate(candidate_id=self.ids[i], fidelity=f, cost=cost))
                left -= cost
        return Proposal(chosen=chosen, model_version=self._version, acquisition=acquisition)

    def _maybe_refit(self, view: CampaignView) -> None:
        n = len(view.observations)
        if self._version is not None and n - self._n_fit < self.config.finetune.every_n_results:
            return
        t0 = time.perf_counter()
        label = f"fitting multi-fidelity model v{(self._version or 0) + 1} on {n} measurements"
        _phase.debug(label, extra={"phase": label})
        torch.manual_seed(self.config.seed * 100_003 + n)
        rows = torch.tensor([o.index for o in view.observations], dtype=torch.long)
        fids = torch.tensor([self.fid_index[o.fidelity] for o in view.observations])
        y = torch.tensor([[o.values[0]] for o in view.observations], dtype=torch.float64)
        metrics = self.surrogate.fit(self.surrogate.combine(rows, fids), y)
        self.timings.fit += time.perf_counter() - t0
        version = self.registry.save(self.surrogate, n_train=n, metrics=metrics)
        self._version, self._n_fit = version.version, n
        logger.debug("multi-fidelity GP v%d fitted on %d measurements: %s", version.version, n,
                     metrics)  # fmt: skip

    def _acquire(
        self, view: CampaignView, free: list[tuple[int, str]], n_free: int, left: float
    ) -> Proposal:
        t0 = time.perf_counter()
        sign = 1.0 if self.config.objective.sense == "maximize" else -1.0
        best = None
        if view.measured_idx.numel():
            y = view.measured_y[:, 0]
            y = y[torch.isfinite(y)]
            if y.numel():
                best = float(y.max() if sign > 0 else y.min())
        available = torch.tensor([(i, self.fid_index[f]) for i, f in free], dtype=torch.long)
        pending = torch.tensor(
            [(i, self.fid_index[f]) for i, f in view.pending_at], dtype=torch.long
        ).reshape(-1, 2)
        picks = select_pairs(
            self.surrogate,
            q=n_free,
            available=available,
            pending=pending,
            best=best,
            sign=sign,
            costs=self.costs,
            budget_left=left,
            shortlist=self.config.acquisition.shortlist or 256,
        )
        self.timings.acquisition += time.perf_counter() - t0
        if not picks:
            return Proposal(chosen=[], model_version=self._version, acquisition="none")
        rows = torch.tensor([p.row for p in picks], dtype=torch.long)
        mean, std = self.surrogate.outcome_mean_std(rows)  # of the DFT result
        chosen = [
            ChosenCandidate(
                candidate_id=self.ids[p.row],
                acquisition_value=p.log_value_per_cost,
                predicted_mean=mean[k].tolist(),
                predicted_std=std[k].tolist(),
                surrogate=self.surrogate.name,
                fidelity=self.order[p.fidelity],
                cost=self.costs[p.fidelity],
            )
            for k, p in enumerate(picks)
        ]
        return Proposal(chosen=chosen, model_version=self._version, acquisition="mf_cost_ei")


def build_mf_agent(
    config: CampaignConfig,
    candidate_ids: list[str],
    scopes: list[str],
    registry: ModelRegistry,
    timings: Timings,
    cifs: list[str | None] | None = None,
) -> MultiFidelityAgent:
    """The agent over an unfitted multi-fidelity GP on the configured features.

    The features are the GP surrogate's: composition features, with the CLOUD block
    for ``surrogate.kind: gp_cloud``, the transfer block for ``gp_transfer``, CHGNet's
    crystal features of ``cifs`` (the pool's structures) for ``gp_chgnet``, and the transfer
    and CHGNet blocks for ``gp_transfer_chgnet``. The fidelities share one ARD kernel over
    the features side by side (not the single-fidelity GP's one kernel per block).

    Raises:
        ConfigError: ``gp_chgnet`` or ``gp_transfer_chgnet`` on a pool without every
            candidate's structure.
    """
    from loop.surrogate import gp_feature_blocks

    feats = torch.cat(
        gp_feature_blocks(config.surrogate.kind, config, scopes, len(candidate_ids), cifs), -1
    )
    surrogate = MultiFidelityGPSurrogate(
        feats[: len(candidate_ids)],
        len(config.fidelities),
        seed=config.seed,
        max_train=config.surrogate.gp_max_train,
        sense=config.objective.sense if config.objective.sense != "window" else None,
        kernel=config.surrogate.mf_kernel,
    )
    return MultiFidelityAgent(config, candidate_ids, surrogate, registry, timings)
