"""``surrogate.kind: auto``: several surrogates, scored on the campaign's own data, the best used.

At every refit the :class:`AutoSurrogate` first scores each candidate model on the
rows measured since the previous refit, *with the predictions it made before they
were measured* (prequential scoring), then refits every candidate and acts through
the one whose predictions have been most likely so far.

The score of a candidate is the Gaussian predictive log-likelihood of all its
prequential predictions under the best of a small family of variance models: its
predicted variances times a free scale, a constant variance (the mean's squared
error alone), or a mix (:func:`calibrated_log_likelihood`). The same two degrees of
freedom for every candidate keep the comparison fair between a GP, whose standard
deviations come from its marginal likelihood, and an ensemble, whose spread is
often far too small or uninformative: a model whose mean predicts well is not
thrown out for its stds, and one whose stds do track its errors gains from them.

The chosen model's standard deviations are then recalibrated by the factor that
would have given its past prequential predictions 90 % coverage
(``quantile(|z|, 0.9) / 1.645``), in what the acquisition sees and in what the
decisions record. Until ``min_evidence`` prequential rows exist the first
candidate (the composition GP by default) is used unrecalibrated.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from botorch.models.model import Model
from botorch.posteriors import Posterior
from torch import Tensor

from loop.surrogate import LookupEnsembleModel, Surrogate

__all__ = ["AutoSurrogate", "PrequentialRecord", "calibrated_log_likelihood"]

logger = logging.getLogger(__name__)
_STATE_FILE = "auto.json"
_Z90 = 1.6448536269514722  # two-sided 90 % Gaussian interval half-width in standard deviations


class PrequentialRecord:
    """A candidate model's predictions of rows made before the rows were measured."""

    def __init__(self) -> None:
        self.mean: list[float] = []
        self.std: list[float] = []
        self.y: list[float] = []

    def extend(self, mean: Tensor, std: Tensor, y: Tensor) -> None:
        """Add ``n x m`` predictions and values (NaN values are skipped)."""
        ok = torch.isfinite(y) & torch.isfinite(mean) & torch.isfinite(std)
        self.mean += mean[ok].tolist()
        self.std += std[ok].tolist()
        self.y += y[ok].tolist()

    def __len__(self) -> int:
        return len(self.y)

    def z(self, floor: float) -> Tensor:
        m, s, y = (torch.tensor(v, dtype=torch.float64) for v in (self.mean, self.std, self.y))
        return (y - m) / s.clamp_min(floor)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": self.mean, "std": self.std, "y": self.y}

    @classmethod
    def from_json(cls, data: dict[str, list[float]]) -> PrequentialRecord:
        rec = cls()
        rec.mean, rec.std, rec.y = list(data["mean"]), list(data["std"]), list(data["y"])
        return rec


def calibrated_log_likelihood(record: PrequentialRecord, floor: float) -> tuple[float, float]:
    """Mean log-likelihood per row with the best variance model, and the best pure std scale.

    The predictive variance of row ``i`` is ``c * ((1 - t) * s_i^2 / mean(s^2) + t)``: ``t = 0``
    trusts the shape of the predicted stds up to a scale, ``t = 1`` ignores them (the
    mean's squared error alone), values between mix the two. ``c`` has a closed form for
    each ``t``; ``t`` is searched on a grid. Every model gets the same two degrees of
    freedom, so uninformative stds cost no more than the error of the mean.

    Args:
        record: prequential predictions.
        floor: smallest standard deviation believed (a zero-spread ensemble is not certain).

    Returns:
        The best mean log-likelihood, and ``a`` with ``a^2 = mean(z^2)`` (the ``t = 0`` scale).
    """
    n = len(record)
    if n == 0:
        return -math.inf, 1.0
    s2 = torch.tensor(record.std, dtype=torch.float64).clamp_min(floor).pow(2)
    r2 = (
        torch.tensor(record.y, dtype=torch.float64) - torch.tensor(record.mean, dtype=torch.float64)
    ).pow(2)
    shape = s2 / s2.mean()
    best = -math.inf
    for t in torch.linspace(0.0, 1.0, 21, dtype=torch.float64):
        w = (1 - t) * shape + t
        c = float((r2 / w).mean().clamp_min(floor**2))
        ll = -0.5 * float(torch.log(c * w).mean()) - 0.5 - 0.5 * math.log(2 * math.pi)
        best = max(best, ll)
    a = float((r2 / s2).mean().sqrt().clamp_min(1e-12))
    return best, a


class _ScaledModel(Model):
    """A model whose posterior spread is multiplied by ``scale`` (mean unchanged)."""

    def __init__(self, base: Model, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = scale

    @property
    def num_outputs(self) -> int:
        return int(self.base.num_outputs)

    def posterior(self, X: Tensor, *args: Any, **kwargs: Any) -> Posterior:
        from botorch.posteriors.gpytorch import GPyTorchPosterior
        from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal

        post = self.base.posterior(X, *args, **kwargs)
        if not isinstance(post, GPyTorchPosterior):
            raise TypeError(f"cannot rescale a {type(post).__name__}")
        mvn = post.distribution
        cov = mvn.lazy_covariance_matrix * (self.scale**2)
        if isinstance(mvn, MultitaskMultivariateNormal):
            scaled: MultivariateNormal = MultitaskMultivariateNormal(
                mvn.mean, cov, interleaved=mvn._interleaved
            )
        else:
            scaled = MultivariateNormal(mvn.mean, cov)
        return GPyTorchPosterior(scaled)


class AutoSurrogate(Surrogate):
    """Choose among candidate surrogates by prequential predictive likelihood.

    Args:
        members: the candidate surrogates by name, the fallback first.
        n_pool: indices below this are the campaign's pool (only those are scored).
        min_evidence: prequential rows needed before the choice leaves the fallback.
    """

    name = "auto"

    def __init__(
        self, members: dict[str, Surrogate], *, n_pool: int, min_evidence: int = 4
    ) -> None:
        if len(members) < 2:
            raise ValueError("the auto surrogate needs at least two candidate surrogates")
        self.members = members
        self.n_pool = n_pool
        self.min_evidence = min_evidence
        self.chosen = next(iter(members))
        self.scale = 1.0
        self.records = {name: PrequentialRecord() for name in members}
        self.scores: dict[str, float] = {}
        self._trained: set[int] = set()
        self._floor = 1e-9
        self._fitted = False

    # ------------------------------------------------------------------ the choice
    @property
    def active_name(self) -> str:
        return self.chosen

    @property
    def active(self) -> Surrogate:
        return self.members[self.chosen]

    def _score_new_rows(self, train_idx: Tensor, train_y: Tensor) -> None:
        """Score every fitted member on pool rows it has not been trained on yet."""
        if not self._fitted:
            return
        new = [
            k
            for k, i in enumerate(train_idx.tolist())
            if i < self.n_pool and int(i) not in self._trained
        ]
        if not new:
            return
        rows = torch.tensor(new, dtype=torch.long)
        idx, y = train_idx[rows].long(), train_y[rows].to(torch.float64)
        for name, member in self.members.items():
            mean, std = member.mean_std(idx)
            self.records[name].extend(mean.to(torch.float64), std.to(torch.float64), y)

    def _choose(self) -> None:
        self.scores = {}
        for name, rec in self.records.items():
            ll, _ = calibrated_log_likelihood(rec, self._floor)
            self.scores[name] = ll
        enough = all(len(r) >= self.min_evidence for r in self.records.values())
        first = next(iter(self.members))
        self.chosen = max(self.scores, key=lambda n: self.scores[n]) if enough else first
        rec = self.records[self.chosen]
        if len(rec) >= self.min_evidence:
            z = rec.z(self._floor).abs()
            self.scale = float(torch.quantile(z, 0.9)) / _Z90
            self.scale = min(max(self.scale, 0.2), 50.0)
        else:
            self.scale = 1.0

    # ------------------------------------------------------------------ Surrogate
    def fit(self, train_idx: Tensor, train_y: Tensor) -> dict[str, float]:
        self._score_new_rows(train_idx, train_y)
        finite = train_y[torch.isfinite(train_y)]
        if finite.numel() > 1:
            self._floor = max(1e-6 * float(finite.std()), 1e-12)
        metrics: dict[str, float] = {}
        score_seconds = 0.0
        for name, member in self.members.items():
            m = member.fit(train_idx, train_y)
            score_seconds += float(m.pop("score_seconds", 0.0))
            metrics.update({f"{name}.{k}": v for k, v in m.items()})
        self._trained = {int(i) for i in train_idx.tolist() if i < self.n_pool}
        self._fitted = True
        self._choose()
        for name in self.members:
            metrics[f"{name}.prequential_ll"] = self.scores[name]
            metrics[f"{name}.prequential_rows"] = float(len(self.records[name]))
        metrics["chosen_index"] = float(list(self.members).index(self.chosen))
        metrics["std_scale"] = self.scale
        metrics["score_seconds"] = score_seconds
        logger.info(
            "auto surrogate: %s (scale %.2f; prequential ll %s)",
            self.chosen,
            self.scale,
            ", ".join(f"{n} {v:.3f}" for n, v in self.scores.items()),
        )
        return metrics

    def model(self) -> Model | None:
        base = self.active.model()
        if base is None or self.scale == 1.0:
            return base
        if isinstance(base, LookupEnsembleModel):
            p = base.predictions
            mean = p.mean(0, keepdim=True)
            return LookupEnsembleModel(mean + self.scale * (p - mean))
        return _ScaledModel(base, self.scale)

    def samples(self, idx: Tensor) -> Tensor:
        s = self.active.samples(idx)
        mean = s.mean(0, keepdim=True)
        return mean + self.scale * (s - mean)

    def mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = self.active.mean_std(idx)
        return mean, std * self.scale

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, member in self.members.items():
            member.save(directory / name)
        state = {
            "members": list(self.members),
            "chosen": self.chosen,
            "trained": sorted(self._trained),
            "floor": self._floor,
            "records": {n: r.to_json() for n, r in self.records.items()},
        }
        (directory / _STATE_FILE).write_text(json.dumps(state))

    def load(self, directory: Path) -> None:
        from cloud_model.errors import CheckpointError

        path = directory / _STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: no saved auto surrogate")
        state = json.loads(path.read_text())
        if state.get("members") != list(self.members):
            raise CheckpointError(
                f"{path}: saved with candidates {state.get('members')}, "
                f"this campaign has {list(self.members)}"
            )
        for name, member in self.members.items():
            member.load(directory / name)
        self.records = {n: PrequentialRecord.from_json(r) for n, r in state["records"].items()}
        self._trained = {int(i) for i in state["trained"]}
        self._floor = float(state["floor"])
        self._fitted = True
        self._choose()
        if self.chosen != state["chosen"]:
            raise CheckpointError(f"{path}: the saved choice does not follow from its records")
