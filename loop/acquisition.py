"""Batch selection over a discrete pool with BoTorch, pending-aware.

One entry point, :func:`select_batch`, picks ``q`` candidates among the
``available`` indices given the surrogate, the objective (with constraints) and the
indices of jobs still in flight (``X_pending``). The strategies:

* ``qlogei``   — ``qLogExpectedImprovement`` with constraints (probability of feasibility
  enters the acquisition value; nothing is filtered after the fact);
* ``qlognei``  — ``qLogNoisyExpectedImprovement`` with the measured candidates as baseline;
* ``qucb``     — ``qUpperConfidenceBound`` on a ``ConstrainedMCObjective``;
* ``qlognehvi`` — ``qLogNoisyExpectedHypervolumeImprovement`` over two or more objectives
  (the campaign's ``objectives``), with constraints and the measured candidates as
  baseline; the reference point is inferred from the measured Pareto front;
* ``thompson`` — per batch slot, one draw of the belief (one ensemble member, or one GP
  draw per candidate), argmax of its constrained objective;
* ``greedy``   — top-q by the posterior mean of the constrained objective;
* ``hits``     — top-q by the probability of being a hit: feasible and among the pool's
  best ``top_fraction`` (measured values included), estimated on the belief's draws
  (:func:`_hits`); the expected number of hits in a batch is the sum of its members'
  probabilities, so the batch is the top q;
* ``random``   — uniform, seeded.

The MC strategies use ``optimize_acqf_discrete`` (sequential greedy for q > 1, each pick
added to ``X_pending``) over the available indices in chunks, so pools of 1e5
candidates stay cheap once the ensemble predictions are cached.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from botorch.acquisition import (
    qLogExpectedImprovement,
    qLogNoisyExpectedImprovement,
    qUpperConfidenceBound,
)
from botorch.acquisition.acquisition import AcquisitionFunction
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
from botorch.acquisition.objective import ConstrainedMCObjective, GenericMCObjective
from botorch.models.model import Model
from botorch.optim.optimize import optimize_acqf_discrete
from botorch.posteriors import Posterior
from botorch.sampling.base import MCSampler
from torch import Tensor

from loop.config import AcquisitionKind
from loop.objective import ObjectiveSpec
from loop.surrogate import LookupEnsembleModel, Surrogate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pick:
    """One selected candidate and the acquisition value that chose it (None for random)."""

    index: int
    value: float | None


def select_batch(
    *,
    kind: AcquisitionKind,
    surrogate: Surrogate,
    spec: ObjectiveSpec,
    q: int,
    available: Tensor,
    pending: Tensor,
    measured_idx: Tensor,
    measured_y: Tensor,
    generator: torch.Generator,
    beta: float = 2.0,
    max_batch_size: int = 8192,
    shortlist: int = 2048,
    top_fraction: float = 0.01,
) -> list[Pick]:
    """Choose up to ``q`` of the ``available`` candidates.

    Args:
        kind: the strategy.
        surrogate: a fitted surrogate (ignored by ``random``).
        spec: objective and constraints.
        q: batch size; fewer are returned when fewer are available.
        available: ``n_avail`` candidate indices that may be chosen (not measured, not in flight).
        pending: ``n_pend`` indices of jobs in flight (used as ``X_pending``).
        measured_idx: ``n_meas`` indices with measurements.
        measured_y: ``n_meas x m`` measured values (NaN where a target was not measured).
        generator: seeded RNG for random and Thompson draws.
        beta: UCB exploration weight.
        top_fraction: ``hits``: the share of the pool that counts as a hit.
        max_batch_size: candidates evaluated per acquisition call.
        shortlist: for pools larger than this, the pending-aware sequential batch
            optimisation runs over the ``shortlist`` candidates with the best standalone
            acquisition value (one cheap ``q = 1`` pass over the pool). Pools up to this
            size are optimised exactly over every candidate.

    Returns:
        The picks, best first.
    """
    q = min(q, int(available.numel()))
    if q <= 0:
        return []
    if kind == "random":
        order = torch.randperm(int(available.numel()), generator=generator)[:q]
        return [Pick(int(available[i]), None) for i in order]
    if kind == "thompson":
        return _thompson(surrogate, spec, q, available, generator)
    if kind == "greedy":
        return _greedy(surrogate, spec, q, available)
    if kind == "hits":
        return _hits(surrogate, spec, q, available, pending, measured_y, top_fraction, generator)

    model = surrogate.model()
    if model is None:
        raise ValueError(
            f"acquisition {kind!r} needs a model; the {surrogate.name} surrogate has none"
        )
    sampler = (
        EnsembleMemberSampler(int(model.predictions.shape[0]))
        if isinstance(model, LookupEnsembleModel)
        else None
    )
    x_pending = pending.to(torch.float64).view(-1, 1) if pending.numel() else None
    acqf = _build_acqf(kind, model, spec, measured_idx, measured_y, x_pending, beta, sampler)
    choices = available.to(torch.float64).view(-1, 1)
    with torch.no_grad():
        if choices.shape[0] > shortlist:
            # pre-screen by the candidate's own value (no pending): pending-aware batch values
            # never exceed a candidate's standalone improvement for EI-type criteria
            alone = _standalone_values(
                kind,
                surrogate,
                model,
                spec,
                available,
                measured_idx,
                measured_y,
                beta,
                max_batch_size,
                generator,
            )
            choices = choices[torch.topk(alone, shortlist).indices]
        cand, values = optimize_acqf_discrete(
            acqf, q=q, choices=choices, max_batch_size=max_batch_size, unique=True
        )
    vals = [float(v) for v in values.reshape(-1)]
    vals += [float("nan")] * (q - len(vals))
    return [Pick(int(c), v) for c, v in zip(cand.view(-1).tolist(), vals, strict=False)]


def _build_acqf(
    kind: AcquisitionKind,
    model: Model,
    spec: ObjectiveSpec,
    measured_idx: Tensor,
    measured_y: Tensor,
    x_pending: Tensor | None,
    beta: float,
    sampler: MCSampler | None,
) -> AcquisitionFunction:
    """The BoTorch acquisition function of ``kind`` over index inputs."""
    objective = GenericMCObjective(_ScalarObjective(spec))
    constraints = spec.constraint_callables()
    if kind == "qlogei":
        return qLogExpectedImprovement(
            model,
            best_f=_best_feasible(spec, measured_y),
            objective=objective,
            constraints=constraints or None,
            X_pending=x_pending,
            sampler=sampler,
        )
    if kind == "qlognei":
        if measured_idx.numel() == 0:
            raise ValueError("qlognei needs at least one measured candidate as its baseline")
        return qLogNoisyExpectedImprovement(
            model,
            X_baseline=measured_idx.to(torch.float64).view(-1, 1),
            objective=objective,
            constraints=constraints or None,
            X_pending=x_pending,
            prune_baseline=False,
            sampler=sampler,
            cache_root=False,
        )
    if kind == "qlognehvi":
        if measured_idx.numel() == 0:
            raise ValueError("qlognehvi needs at least one measured candidate as its baseline")
        return qLogNoisyExpectedHypervolumeImprovement(
            model,
            ref_point=reference_point(spec, measured_y).tolist(),
            X_baseline=measured_idx.to(torch.float64).view(-1, 1),
            objective=GenericMCMultiOutputObjective(_VectorObjective(spec)),
            constraints=constraints or None,
            X_pending=x_pending,
            prune_baseline=False,
            sampler=sampler,
            cache_root=False,
        )
    if kind == "qucb":
        mc_objective = (
            ConstrainedMCObjective(objective=_ScalarObjective(spec), constraints=constraints)
            if constraints
            else objective
        )
        return qUpperConfidenceBound(
            model, beta=beta, objective=mc_objective, X_pending=x_pending, sampler=sampler
        )
    raise ValueError(f"unknown acquisition {kind!r}")


def _standalone_values(
    kind: AcquisitionKind,
    surrogate: Surrogate,
    model: Model,
    spec: ObjectiveSpec,
    available: Tensor,
    measured_idx: Tensor,
    measured_y: Tensor,
    beta: float,
    max_batch_size: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ``q = 1`` acquisition value of every available candidate, ignoring pending jobs.

    Ensembles are scored exactly on their cached member predictions. Other models (the
    GP) are scored on ``surrogate.samples`` draws, which are independent per candidate
    and all a ``q = 1`` value depends on: a batched exact-GP posterior would rebuild
    the training covariance once per candidate (8,000 candidates x 300 training rows
    took 11.5-22 s; a whole decision with the draws takes 2.4 s).
    """
    if isinstance(model, LookupEnsembleModel):
        screen, choices, baseline = model, available, measured_idx
    elif (
        analytic := _analytic_screen(kind, surrogate, spec, available, measured_y, beta, generator)
    ) is not None:
        return analytic
    else:
        ids = torch.cat([available.long(), measured_idx.long()])
        screen = LookupEnsembleModel(surrogate.samples(ids).to(torch.float64))
        choices = torch.arange(len(available))
        baseline = torch.arange(len(available), len(ids))
    n_draws = int(screen.predictions.shape[0])
    acqf = _build_acqf(
        kind, screen, spec, baseline, measured_y, None, beta, EnsembleMemberSampler(n_draws)
    )
    x = choices.to(torch.float64).view(-1, 1, 1)
    return torch.cat([acqf(c) for c in x.split(max_batch_size)])


def _analytic_screen(
    kind: AcquisitionKind,
    surrogate: Surrogate,
    spec: ObjectiveSpec,
    available: Tensor,
    measured_y: Tensor,
    beta: float,
    generator: torch.Generator | None = None,
) -> Tensor | None:
    """Closed-form ``q = 1`` values from per-candidate Gaussian marginals, or None.

    For a maximised or minimised target (no Pareto objectives): log expected
    improvement over the best feasible measurement plus the log-probability of
    meeting each bound (the GP's outputs are independent), or the UCB value
    ``mean + sqrt(beta) std`` that qUCB's expectation is at ``q = 1`` (without
    bounds). It only ranks candidates for the shortlist: the pending-aware batch
    is then chosen on the model's joint posterior. Over 1M candidates it replaces
    64 draws per candidate by two vectors (``benchmarks/decision_scale.py``).
    """
    if spec.is_multi or spec.sense == "window" or kind not in ("qlogei", "qlognei", "qucb"):
        return None
    if kind == "qucb" and spec.constraints:
        return None
    mean, std = surrogate.decision_mean_std(available.long())  # n x m, the belief acted on
    sign = 1.0 if spec.sense == "maximize" else -1.0
    mu, sigma = sign * mean[:, spec.primary], std[:, spec.primary].clamp_min(1e-12)  # (n,)
    if kind == "qucb":
        return _break_ties(mu + beta**0.5 * sigma, generator)  # E[mu + sqrt(beta pi/2)|f - mu|]
    u = (mu - _best_feasible(spec, measured_y)) / sigma
    value = sigma.log() + _log_h(u)  # log EI
    normal = torch.distributions.Normal(0.0, 1.0)
    for b in spec.constraints:
        m_b, s_b = mean[:, b.target], std[:, b.target].clamp_min(1e-12)
        hi = 1.0 if b.upper is None else normal.cdf((b.upper - m_b) / s_b)
        lo = 0.0 if b.lower is None else normal.cdf((b.lower - m_b) / s_b)
        value = value + torch.as_tensor(hi - lo).clamp_min(1e-300).log()
    return _break_ties(value, generator)


def _break_ties(value: Tensor, generator: torch.Generator | None) -> Tensor:
    """Order exactly tied values at random (a GP on identical features, e.g. carbon_24's
    constant composition, ties every candidate; top-k would take the pool's first rows)."""
    noise = torch.rand(value.shape, generator=generator, dtype=value.dtype)
    return value + 1e-9 * value.abs().clamp_min(1.0) * noise


def _log_h(u: Tensor) -> Tensor:
    """``log(phi(u) + u Phi(u))``, stable for very negative ``u`` (there ~ ``log phi(u) - 2 log|u|``)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    direct = (normal.log_prob(u).exp() + u * normal.cdf(u)).clamp_min(1e-300).log()
    tail = normal.log_prob(u) - 2.0 * torch.log(u.abs().clamp_min(1.0))
    return torch.where(u > -5.0, direct, tail)


class EnsembleMemberSampler(MCSampler):
    """Exact "sampler" for ensembles: one sample per member, every member once.

    BoTorch's ``IndexSampler`` draws members at random (512 draws by default);
    with K = 5 members that is 100x the work for a noisier estimate.
    """

    def __init__(self, n_members: int) -> None:
        super().__init__(sample_shape=torch.Size([n_members]))

    def forward(self, posterior: Posterior) -> Tensor:
        values = posterior.values  # type: ignore[attr-defined]  # batch x S x q x m
        return values.movedim(-3, 0)  # S x batch x q x m

    def _update_base_samples(self, posterior: Posterior, base_sampler: MCSampler) -> None:
        """Nothing to share: every member is used, in order (NEHVI's baseline reuse)."""


@dataclass(frozen=True)
class _ScalarObjective:
    """BoTorch MC objective callable: ``sample x batch x q x m`` -> ``sample x batch x q``."""

    spec: ObjectiveSpec

    def __call__(self, Y: Tensor, X: Tensor | None = None) -> Tensor:
        return self.spec.objective(Y)


@dataclass(frozen=True)
class _VectorObjective:
    """BoTorch multi-output objective: ``sample x batch x q x m`` -> ``... x k`` objectives."""

    spec: ObjectiveSpec

    def __call__(self, Y: Tensor, X: Tensor | None = None) -> Tensor:
        return self.spec.objectives(Y)


def pareto_front(spec: ObjectiveSpec, y: Tensor) -> Tensor:
    """Boolean mask of the rows of ``y`` (``n x m``) on the feasible Pareto front."""
    from botorch.utils.multi_objective.pareto import is_non_dominated

    objs = spec.objectives(y.to(torch.float64))
    ok = spec.feasible(y) & torch.isfinite(objs).all(-1)
    mask = torch.zeros(len(y), dtype=torch.bool)
    if ok.any():
        rows = ok.nonzero().flatten()
        mask[rows[is_non_dominated(objs[rows])]] = True
    return mask


def reference_point(spec: ObjectiveSpec, y: Tensor) -> Tensor:
    """Hypervolume reference point: the measured front's nadir less 10 % of its range.

    Infeasible measurements count when nothing measured is feasible yet.
    """
    from botorch.utils.multi_objective.hypervolume import infer_reference_point

    objs = spec.objectives(y.to(torch.float64))
    front = objs[pareto_front(spec, y)]
    if front.numel() == 0:
        front = objs[torch.isfinite(objs).all(-1)]
    if front.numel() == 0:
        return torch.zeros(objs.shape[-1], dtype=torch.float64)
    return infer_reference_point(front)


def hypervolume(spec: ObjectiveSpec, y: Tensor, ref: Tensor) -> float:
    """Hypervolume dominated by the feasible measured front of ``y`` above ``ref``."""
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    front = spec.objectives(y.to(torch.float64))[pareto_front(spec, y)]
    front = front[(front > ref).all(-1)]
    return float(Hypervolume(ref).compute(front)) if front.numel() else 0.0


def _best_feasible(spec: ObjectiveSpec, measured_y: Tensor) -> float:
    """Best feasible measured objective; below every measured objective if none is feasible."""
    if measured_y.numel() == 0:
        return -1e9
    score = spec.score(measured_y.to(torch.float64))
    finite = score[torch.isfinite(score)]
    if finite.numel():
        return float(finite.max())
    obj = spec.objective(measured_y.to(torch.float64))
    obj = obj[~torch.isnan(obj)]
    return float(obj.min()) - 1.0 if obj.numel() else -1e9


def _feasibility_weighted(spec: ObjectiveSpec, samples: Tensor) -> Tensor:
    """``S x n x m`` draws -> ``S x n`` objective, -inf where a draw is infeasible."""
    return spec.score(samples)


def _greedy(surrogate: Surrogate, spec: ObjectiveSpec, q: int, available: Tensor) -> list[Pick]:
    samples = surrogate.samples(available)  # S x n x m
    obj = spec.objective(samples)  # S x n
    p_feasible = spec.feasible(samples).to(obj.dtype).mean(0)  # n
    # expected objective among feasible draws, ranked first by probability of feasibility
    mean_obj = obj.mean(0)
    value = torch.where(p_feasible > 0.5, mean_obj, mean_obj - 1e6 * (1 - p_feasible))
    order = torch.argsort(value, descending=True)[:q]
    return [Pick(int(available[i]), float(value[i])) for i in order]


def _hits(
    surrogate: Surrogate,
    spec: ObjectiveSpec,
    q: int,
    available: Tensor,
    pending: Tensor,
    measured_y: Tensor,
    top_fraction: float,
    generator: torch.Generator,
) -> list[Pick]:
    """Top-q by the probability of being a hit, on the belief's draws.

    In each draw the pool is the measured candidates (their measured scores), the
    pending ones and the available ones (their drawn objective, -inf where a drawn
    constraint fails); the hits of that draw are its best ``ceil(top_fraction * pool)``.
    A candidate's probability is the share of draws in which it is a hit. Unlike
    expected improvement over the best measurement, this keeps valuing candidates
    that are probably among the best once the best has been found, which is what a
    campaign counting its good materials wants; unlike the posterior mean it still
    values a candidate whose uncertainty may put it there. Ties (few ensemble
    members) are broken by the mean feasibility-weighted objective.
    """
    ids = torch.cat([available.long(), pending.long()])
    samples = surrogate.samples(ids)  # S x n x m
    drawn = spec.score(samples)  # S x n, -inf where infeasible
    known = spec.score(measured_y.to(torch.float64)) if measured_y.numel() else drawn[:0, 0]
    known = known[torch.isfinite(known)]  # measured rows that count (feasible)
    n_pool = len(ids) + int(measured_y.shape[0])
    k = max(1, math.ceil(top_fraction * n_pool))
    pooled = torch.cat([drawn, known.expand(drawn.shape[0], -1)], dim=1)  # S x (n + measured)
    kth = pooled.clamp_min(-1e300).topk(min(k, pooled.shape[1]), dim=1).values[:, -1:]
    p_hit = ((drawn >= kth) & torch.isfinite(drawn)).to(torch.float64).mean(0)  # n
    p_hit = p_hit[: len(available)]
    mine = samples[:, : len(available)]
    obj, p_feasible = spec.objective(mine).mean(0), spec.feasible(mine).to(torch.float64).mean(0)
    tie = torch.where(p_feasible > 0.5, obj, obj - 1e6 * (1 - p_feasible))  # _greedy's order
    rank = torch.argsort(tie, descending=True)
    tie_rank = torch.empty_like(rank)
    tie_rank[rank] = torch.arange(len(rank))
    value = p_hit - 1e-6 * tie_rank.to(torch.float64) / max(len(rank), 1)
    order = torch.argsort(_break_ties(value, generator), descending=True)[:q]
    return [Pick(int(available[i]), float(p_hit[i])) for i in order]


def _thompson(
    surrogate: Surrogate, spec: ObjectiveSpec, q: int, available: Tensor, generator: torch.Generator
) -> list[Pick]:
    samples = surrogate.samples(available)  # S x n x m
    score = _feasibility_weighted(spec, samples)  # S x n
    fallback = spec.objective(samples)  # used when a draw has no feasible candidate left
    taken = torch.zeros(score.shape[1], dtype=torch.bool)
    picks: list[Pick] = []
    for _ in range(q):
        s = int(torch.randint(score.shape[0], (1,), generator=generator))
        row = score[s].masked_fill(taken, -torch.inf)
        if not torch.isfinite(row).any():
            row = fallback[s].masked_fill(taken, -torch.inf)
        i = int(torch.argmax(row))
        taken[i] = True
        picks.append(Pick(int(available[i]), float(row[i])))
    return picks
