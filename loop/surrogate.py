"""Surrogates seen by BoTorch: every model takes candidate *indices* as inputs.

The pool is fixed for a campaign, so inputs are ``X[..., 0]`` = index into the pool:

* :class:`LookupEnsembleModel` — a ``botorch.models.ensemble.EnsembleModel`` over the
  cached per-member predictions of a CLOUD deep ensemble (``S x N x m``);
* :class:`IndexedModel` — wraps any BoTorch model over features (the GP baseline on
  composition features) so that it too reads indices;
* :class:`Surrogate` implementations bind a model to the fitting procedure:
  :class:`EnsembleSurrogate` (CLOUD), :class:`GPSurrogate` (SingleTaskGP) and
  :class:`RandomSurrogate` (no model).

All of them expose ``samples(idx) -> S x n x m`` draws from their belief, which is
what Thompson sampling, the greedy strategy and the reports read, and
``save(dir)`` / ``load(dir)``, so that the model registry can version any of them
on disk and restore it on resume without knowing its type. :func:`build_surrogate`
is the one place that maps the config's ``surrogate.kind`` to an implementation.
"""

from __future__ import annotations

import abc
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from botorch.models.ensemble import EnsembleModel
from botorch.models.model import Model
from botorch.posteriors import Posterior
from torch import Tensor

if TYPE_CHECKING:
    from loop.config import CampaignConfig
    from loop.gp_marginals import MarginalPredictor
    from loop.warp import YeoJohnson

logger = logging.getLogger(__name__)


class LookupEnsembleModel(EnsembleModel):
    """Ensemble over cached predictions; ``X[..., 0]`` is a candidate index.

    Args:
        predictions: ``S x N x m`` per-member predictions for the whole pool.
    """

    def __init__(self, predictions: Tensor) -> None:
        super().__init__()
        if predictions.dim() != 3:
            raise ValueError(
                f"predictions must be members x candidates x targets, got {tuple(predictions.shape)}"
            )
        self._num_outputs = int(predictions.shape[-1])
        self.predictions: Tensor
        self.register_buffer("predictions", predictions)

    def forward(self, X: Tensor) -> Tensor:
        idx = X[..., 0].long()  # batch x q
        out = self.predictions[:, idx]  # S x batch x q x m
        return out.movedim(0, -3)  # batch x S x q x m


_MAX_CHOLESKY = 50_000  # rows an exact GP factorises (above gp_max_condition's bound)
# training rows above which a single-output GP's joint posteriors come from its cached
# factorisation (loop.gp_marginals.FactorisedGP) instead of gpytorch's joint kernel
_FACTORISE_ABOVE = 800


class IndexedModel(Model):
    """A BoTorch model over features, addressed by candidate index.

    Args:
        base: a fitted model whose inputs are feature vectors.
        features: ``N x d`` features of the whole pool.
    """

    def __init__(self, base: Model, features: Tensor) -> None:
        super().__init__()
        self.base = base
        self.features: Tensor
        self.register_buffer("features", features)

    @property
    def num_outputs(self) -> int:
        return int(self.base.num_outputs)

    def posterior(self, X: Tensor, *args: Any, **kwargs: Any) -> Posterior:
        import gpytorch

        # exact solves (Cholesky) however many rows the GP conditions on: past gpytorch's
        # default of 800 rows it switches to conjugate gradients, which are approximate (a
        # single-output GP that large never gets here: model() gives it FactorisedGP)
        with gpytorch.settings.max_cholesky_size(_MAX_CHOLESKY):
            return self.base.posterior(self.features[X[..., 0].long()], *args, **kwargs)


class Surrogate(abc.ABC):
    """What the campaign loop needs of a surrogate.

    Attributes:
        name: the config's ``surrogate.kind``.
        learns: False for a strategy without a model (random): the agent then never
            fits it and keeps choosing by its initial design.
    """

    name: str = "surrogate"
    learns: bool = True

    @property
    def active_name(self) -> str:
        """The model that makes the decisions (a choosing surrogate names its current pick)."""
        return self.name

    @abc.abstractmethod
    def fit(self, train_idx: Tensor, train_y: Tensor) -> dict[str, float]:
        """Update on measured data. ``train_idx``: ``n`` indices, ``train_y``: ``n x m``."""

    @abc.abstractmethod
    def model(self) -> Model | None:
        """The BoTorch model over index inputs (None for random)."""

    @abc.abstractmethod
    def samples(self, idx: Tensor) -> Tensor:
        """``S x n x m`` draws of the belief at candidate indices ``idx`` (``n``)."""

    def mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std (each ``n x m``) of the belief at ``idx``."""
        s = self.samples(idx)
        return s.mean(0), s.std(0) if s.shape[0] > 1 else torch.zeros_like(s[0])

    def outcome_mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std (each ``n x m``) of a *measurement* at ``idx``: what a pick's stored
        prediction, and the 90 % interval it is scored by, are of. The default is
        :meth:`mean_std`, for a belief that already is one of outcomes (an ensemble's,
        ``auto``'s recalibrated one); a GP adds its observation noise to its latent belief.
        """
        return self.mean_std(idx)

    def decision_mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the belief the acquisition acts on (:meth:`model`, :meth:`samples`).

        What ranks a large pool's shortlist, so that the shortlist and the batch chosen from it
        read one belief. The default is :meth:`mean_std`; a surrogate that reports a belief
        other than the one it decides on overrides it (``auto`` reports its chosen member's
        recalibrated belief, a Bayesian-head ensemble adds observation noise to its draws'
        spread). A warped GP's is the delta-method approximation of its warped posterior.
        """
        return self.mean_std(idx)

    def design_features(self) -> Tensor | None:
        """``N x d`` pool features a diverse initial design spreads over (:mod:`loop.design`),
        computed without labels; None when this surrogate has none (the design is random)."""
        return None

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write the fitted state into ``directory`` (created; safetensors + JSON, no pickle)."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore the state :meth:`save` wrote; the surrogate is then fitted.

        Raises:
            CheckpointError: the files are missing or do not match this surrogate.
        """


class EnsemblePredictor(Protocol):
    """The part of ``cloud_model.ensemble.CloudEnsemble`` the surrogate uses."""

    def fit(self, scopes: list[str], y: Tensor, *, warm_start: bool = True) -> Any: ...

    def predict(self, scopes: list[str]) -> Tensor: ...

    def save(self, directory: Path) -> Any: ...


class EnsembleSurrogate(Surrogate):
    """CLOUD deep ensemble: refit on the measured data, predict the whole pool once per fit.

    Args:
        ensemble: a ``CloudEnsemble`` (or anything with its ``fit``/``predict``).
        scopes: SCOPE strings of the pool, length ``N``.
        warm_start: continue from the previous weights at each refit.
    """

    name = "cloud_ensemble"

    def __init__(
        self,
        ensemble: EnsemblePredictor,
        scopes: list[str],
        *,
        warm_start: bool = True,
        n_pool: int | None = None,
    ) -> None:
        self.ensemble = ensemble
        self.scopes = scopes
        self.warm_start = warm_start
        self.n_pool = len(scopes) if n_pool is None else n_pool
        self._model: LookupEnsembleModel | None = None
        self._moments: tuple[Tensor, Tensor] | None = None  # (N x m, N x m) Bayesian heads
        self._fitted_once = False

    def fit(self, train_idx: Tensor, train_y: Tensor) -> dict[str, float]:
        # Heads on cached features are thousands of tiny ops: one thread is ~40x faster than
        # two on a busy 2-core machine (OpenMP contention; measured 3.9 s vs 177 s per refit)
        head_only = getattr(getattr(self.ensemble, "config", None), "n_trainable_blocks", None) == 0
        threads = torch.get_num_threads()
        if head_only:
            torch.set_num_threads(1)
        try:
            report = self.ensemble.fit(
                [self.scopes[int(i)] for i in train_idx],
                train_y,
                warm_start=self.warm_start and self._fitted_once,
            )
        finally:
            torch.set_num_threads(threads)
        self._fitted_once = True
        self._model = self._score()
        metrics = {k: float(v) for k, v in _as_dict(report).items() if isinstance(v, int | float)}
        metrics["score_seconds"] = self.last_score_seconds
        return metrics

    def model(self) -> LookupEnsembleModel:
        if self._model is None:
            if not self._fitted_once:
                raise RuntimeError("the ensemble surrogate has not been fitted yet")
            self._model = self._score()  # restored by load(): score the pool once
        return self._model

    def _score(self) -> LookupEnsembleModel:
        """Predict the whole pool with every member (timed in ``last_score_seconds``).

        Members with Bayesian heads give joint function draws (the samples the
        acquisition sees) and the mixture's mean and variance, observation noise
        included (what :meth:`mean_std` reports).
        """
        t0 = time.perf_counter()
        self._moments = None
        posterior = getattr(self.ensemble, "predict_posterior", None)
        if callable(posterior) and getattr(self.ensemble, "bayes_heads", None):
            post = posterior(self.scopes)
            preds = post.draws.to(torch.float64)  # S x N x m
            self._moments = (post.mean, post.variance.sqrt())
        else:
            preds = self.ensemble.predict(self.scopes).to(torch.float64)  # S x N x m
        self.last_score_seconds = time.perf_counter() - t0
        return LookupEnsembleModel(preds)

    def samples(self, idx: Tensor) -> Tensor:
        return self.model().predictions[:, idx.long()]

    def mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        self.model()
        if self._moments is None:
            return super().mean_std(idx)
        mean, std = self._moments
        return mean[idx.long()], std[idx.long()]

    def decision_mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Moments of the draws the acquisition sees (without the Bayesian heads' noise)."""
        return super().mean_std(idx)

    def design_features(self) -> Tensor | None:
        """PCA scores of the pretrained trunk's pooled embeddings of the pool (none without a
        pretrained checkpoint: a random trunk's distances mean nothing)."""
        source = getattr(self.ensemble, "source_checkpoint", None)
        if source is None:
            return None
        from loop.design import block_scaled
        from loop.gp_blocks import CLOUD_DIMS, cloud_block_features

        pool = self.scopes[: self.n_pool]
        return block_scaled(
            [cloud_block_features(pool, Path(source), n_fit=len(pool), dims=CLOUD_DIMS)]
        )

    def save(self, directory: Path) -> None:
        self.ensemble.save(directory)

    def load(self, directory: Path) -> None:
        loader = getattr(type(self.ensemble), "load", None)
        if loader is None:
            raise TypeError(f"{type(self.ensemble).__name__} cannot be loaded from disk")
        self.ensemble = loader(directory)
        share = getattr(self.ensemble, "share_cache", None)
        if callable(share):
            share()  # runs in one process (benchmark workers) share the frozen trunk's features
        self._fitted_once, self._model = True, None  # the pool is scored on first use


class GPSurrogate(Surrogate):
    """Exact GP (BoTorch ``SingleTaskGP``, Matern-5/2 ARD) on composition features.

    Args:
        features: ``N x d`` pool features (e.g. :func:`loop.features.composition_features`).
        n_samples: how many posterior draws :meth:`samples` returns (independent per candidate).
        seed: seed of those draws and of the prior subsample.
        max_train: at most this many rows fit the hyperparameters (an exact GP costs O(n^3)
            per L-BFGS step): rows below ``n_pool`` (the campaign's own measurements) are
            always kept, and a seeded random subset of the others (prior data) fills the rest.
        max_condition: at most this many rows (the same order: own rows, then the same
            random prior rows, so the fitting rows are among them) the posterior is
            conditioned on, with the hyperparameters fitted on ``max_train``; None means
            ``max_train``. Conditioning costs one O(n^3) factorisation, not one per step.
        n_pool: feature rows ``[0, n_pool)`` are the pool; rows beyond are prior data.
        fit_maxiter: L-BFGS-B iterations of a hyperparameter fit at most.
        warp: model Yeo-Johnson-warped values (:mod:`loop.warp`), refitted at every fit.
    """

    name = "gp"

    def __init__(
        self,
        features: Tensor,
        *,
        n_samples: int = 64,
        seed: int = 0,
        max_train: int = 500,
        max_condition: int | None = None,
        n_pool: int | None = None,
        fit_maxiter: int = 300,
        warp: bool = False,
    ) -> None:
        self.features = features.to(torch.float64)
        self.warp = warp
        self._warp: YeoJohnson | None = None
        self.n_samples = n_samples
        self.seed = seed
        self.max_train = max_train
        self.max_condition = max(max_train, max_condition or max_train)
        self.fit_maxiter = fit_maxiter
        self.n_pool = len(features) if n_pool is None else n_pool
        self._model: IndexedModel | None = None
        self._train: tuple[Tensor, Tensor] | None = None  # rows of the last fit
        self._marginals: MarginalPredictor | None = None  # factorised once per fitted model

    def _subsample(self, train_idx: Tensor, train_y: Tensor, cap: int) -> tuple[Tensor, Tensor]:
        """Own measurements first, then a seeded random share of the prior rows: ``cap`` rows.

        The prior rows are a prefix of one seeded permutation, so a smaller ``cap``'s rows
        are among a larger one's.
        """
        if len(train_idx) <= cap:
            return train_idx, train_y
        own = (train_idx < self.n_pool).nonzero().flatten()
        prior = (train_idx >= self.n_pool).nonzero().flatten()
        room = max(cap - len(own), 0)
        gen = torch.Generator().manual_seed(self.seed)
        prior = prior[torch.randperm(len(prior), generator=gen)[:room]]
        keep = torch.cat([own, prior])
        return train_idx[keep], train_y[keep]

    def fit(self, train_idx: Tensor, train_y: Tensor) -> dict[str, float]:
        from botorch.fit import fit_gpytorch_mll
        from gpytorch.mlls import ExactMarginalLogLikelihood

        all_idx, all_y = train_idx.long(), train_y
        train_idx, train_y = self._subsample(all_idx, all_y, self.max_train)
        if len(train_idx) < len(all_idx):
            logger.info("GP fits on %d of %d rows (max_train)", len(train_idx), len(all_idx))
        if self.warp:
            from loop.warp import YeoJohnson

            self._warp = YeoJohnson.fit(train_y)
        gp = self._gp(train_idx, self._modelled(train_y))
        mll = ExactMarginalLogLikelihood(gp.likelihood, gp)
        try:
            # L-BFGS-B without a cap ran ~4,000 steps a fit on mpts_52 (300 rows x 95 ARD
            # lengthscales, 30-60 s), creeping along the flat directions of features the
            # training rows never vary; the cap ends that (hitting it is not a failure)
            fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": self.fit_maxiter}})
        except Exception as exc:  # botorch raises several types; the GP stays usable at its prior
            logger.warning(
                "GP hyperparameter fit failed (%s); using the initial hyperparameters", exc
            )
        n_fit = len(train_idx)
        if self.max_condition > n_fit and len(all_idx) > n_fit:
            train_idx, train_y = self._subsample(all_idx, all_y, self.max_condition)
            gp = self._conditioned(gp, train_idx, train_y)
        gp.eval()
        self._model = IndexedModel(gp, self.features)
        self._train = (train_idx, train_y.to(torch.float64))
        metrics = {"n_train": float(n_fit), "n_condition": float(len(train_idx))}
        if self._warp is not None:
            metrics["warp_lambda"] = float(self._warp.lam[0])
        return metrics

    def _conditioned(self, fitted: Model, idx: Tensor, y: Tensor) -> Model:
        """The GP over rows ``idx`` with ``fitted``'s hyperparameters (no refit).

        The hyperparameters live in standardised units; the new model standardises its own
        rows, whose mean and spread a random share of them estimates.
        """
        gp = self._gp(idx, self._modelled(y))
        state = {
            k: v for k, v in fitted.state_dict().items() if not k.startswith("outcome_transform.")
        }
        wanted = {k for k in gp.state_dict() if not k.startswith("outcome_transform.")}
        if wanted != set(state):
            raise RuntimeError(
                f"conditioned GP does not take the fitted state: {sorted(wanted ^ set(state))}"
            )
        gp.load_state_dict(state, strict=False)
        logger.info("GP conditions on %d rows (max_condition)", len(idx))
        return gp

    def _modelled(self, y: Tensor) -> Tensor:
        """The values the GP models: warped when warping is on."""
        return y if self._warp is None else self._warp.forward(y.to(torch.float64))

    def _gp(self, train_idx: Tensor, train_y: Tensor) -> Model:
        from botorch.models import SingleTaskGP
        from botorch.models.transforms import Normalize, Standardize

        X = self.features[train_idx]  # n x d
        Y = train_y.to(torch.float64)  # n x m
        return SingleTaskGP(
            X,
            Y,
            input_transform=Normalize(d=X.shape[-1], bounds=_bounds(self.features)),
            outcome_transform=Standardize(m=Y.shape[-1]),
        )

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self._model is None or self._train is None:
            raise RuntimeError("the GP surrogate has not been fitted yet")
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"train_idx": self._train[0], "train_y": self._train[1]}
        for name, value in self._model.base.state_dict().items():
            tensors[f"state.{name}"] = value.detach().clone().contiguous()
        if self._warp is not None:
            tensors.update(self._warp.state())
        save_file(tensors, str(directory / _GP_FILE))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        from cloud_model.errors import CheckpointError

        path = directory / _GP_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: no saved GP surrogate")
        tensors = load_file(str(path))
        train_idx, train_y = tensors["train_idx"].long(), tensors["train_y"]
        if train_idx.numel() and int(train_idx.max()) >= len(self.features):
            raise CheckpointError(f"{path}: trained on rows this campaign's features do not have")
        from loop.warp import YeoJohnson

        self._warp = YeoJohnson.from_state(tensors)
        if self.warp != (self._warp is not None):
            raise CheckpointError(
                f"{path}: saved with warp={not self.warp}, configured {self.warp}"
            )
        gp = self._gp(train_idx, self._modelled(train_y))
        gp.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("state.")})
        gp.eval()
        self._model = IndexedModel(gp, self.features)
        self._train = (train_idx, train_y)

    def model(self) -> IndexedModel:
        if self._model is None:
            raise RuntimeError("the GP surrogate has not been fitted yet")
        base: Model = self._model.base
        if self._train is not None and len(self._train[0]) > _FACTORISE_ABOVE:
            if int(base.num_outputs) == 1:
                from loop.gp_marginals import FactorisedGP

                base = FactorisedGP(self._predictor())
        if self._warp is not None:
            from loop.warp import WarpedModel

            base = WarpedModel(base, self._warp)
        return self._model if base is self._model.base else IndexedModel(base, self.features)

    def _predictor(self) -> MarginalPredictor:
        """The last fit's training-side factorisation (computed once per fit)."""
        if self._model is None:
            raise RuntimeError("the GP surrogate has not been fitted yet")
        if self._marginals is None or self._marginals.model is not self._model.base:
            from loop.gp_marginals import MarginalPredictor

            self._marginals = MarginalPredictor.from_model(self._model.base)
        return self._marginals

    def _own_mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and std of the modelled (possibly warped) values, in chunks."""
        if self._model is None:
            raise RuntimeError("the GP surrogate has not been fitted yet")
        predictor = self._predictor()
        means, stds = [], []
        for chunk in idx.long().split(8192):
            mean, var = predictor(self.features[chunk])  # n x m each
            means.append(mean)
            stds.append(var.sqrt())
        if not means:
            m = int(self._model.num_outputs)
            return torch.empty(0, m, dtype=torch.float64), torch.empty(0, m, dtype=torch.float64)
        return torch.cat(means), torch.cat(stds)

    def design_features(self) -> Tensor | None:
        """The pool rows of the GP's own features, at unit total variance."""
        from loop.design import block_scaled

        return block_scaled([self.features[: self.n_pool]])

    def held_out(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Leave-one-out predictions of the last fit's pool rows: ``idx``, mean, std.

        Closed form (:meth:`loop.gp_marginals.MarginalPredictor.leave_one_out`); None
        before a fit and for a warped GP (its LOO moments are not Gaussian in y).
        """
        if self._model is None or self._train is None or self._warp is not None:
            return None
        mean, var = self._predictor().leave_one_out()
        own = self._train[0] < self.n_pool
        return self._train[0][own], mean[own], var[own].sqrt()

    def mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = self._own_mean_std(idx)
        if self._warp is None:
            return mean, std
        return self._warp.inverse(mean), self._warp.inverse_slope(mean).abs() * std

    def outcome_mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The latent belief widened by the fitted observation noise (in the modelled,
        possibly warped, space; mapped back like :meth:`mean_std`)."""
        mean, std = self._own_mean_std(idx)
        std = (std.pow(2) + self._predictor().noise_variance()).sqrt()
        if self._warp is None:
            return mean, std
        return self._warp.inverse(mean), self._warp.inverse_slope(mean).abs() * std

    def samples(self, idx: Tensor) -> Tensor:
        mean, std = self._own_mean_std(idx)
        gen = torch.Generator().manual_seed(self.seed)
        eps = torch.randn((self.n_samples, *mean.shape), generator=gen, dtype=mean.dtype)
        draws = mean + std * eps  # S x n x m (independent per candidate)
        return draws if self._warp is None else self._warp.inverse(draws)


class RandomSurrogate(Surrogate):
    """No model: the random strategy."""

    name = "random"
    learns = False

    def fit(self, train_idx: Tensor, train_y: Tensor) -> dict[str, float]:
        return {}

    def model(self) -> None:
        return None

    def samples(self, idx: Tensor) -> Tensor:
        raise RuntimeError("the random strategy has no belief to sample")

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)

    def load(self, directory: Path) -> None:
        return None


_GP_FILE = "gp.safetensors"


def build_surrogate(
    config: CampaignConfig,
    scopes: list[str],
    n_pool: int,
    cifs: list[str | None] | None = None,
) -> Surrogate:
    """The surrogate named by ``config.surrogate.kind``, unfitted.

    Args:
        config: the campaign config.
        scopes: SCOPE strings of the pool followed by those of the prior data; the
            surrogate's candidate indices address this list.
        n_pool: how many of ``scopes`` are the pool (the rest is prior data).
        cifs: the pool's structures (CIF text, None where unknown), for ``gp_chgnet``.

    Raises:
        ConfigError: ``gp_chgnet`` asked for by name on a pool without every structure.
    """
    sc = config.surrogate
    if sc.kind == "random":
        return RandomSurrogate()
    if sc.kind == "auto":
        from loop.auto_surrogate import AutoSurrogate

        kinds = [str(k) for k in sc.candidates]
        if "candidates" not in sc.model_fields_set and _missing_structures(cifs, n_pool):
            # the default list, on a pool of formulas: the kinds that need structures go
            for k in [k for k in kinds if k in _STRUCTURE_KINDS]:
                logger.info("auto: no %s candidate (the pool has no structures)", k)
                kinds.remove(k)
        members: dict[str, Surrogate] = {
            k: _build_one(k, config, scopes, n_pool, cifs) for k in kinds
        }
        return AutoSurrogate(members, n_pool=n_pool)
    return _build_one(sc.kind, config, scopes, n_pool, cifs)


_STRUCTURE_KINDS = ("gp_chgnet", "gp_transfer_chgnet")  # need every candidate's structure


def _missing_structures(cifs: list[str | None] | None, n_pool: int) -> int:
    """How many of the pool's candidates have no structure."""
    if cifs is None:
        return n_pool
    return sum(1 for c in cifs[:n_pool] if not c) + max(n_pool - len(cifs), 0)


def _build_one(
    kind: str,
    config: CampaignConfig,
    scopes: list[str],
    n_pool: int,
    cifs: list[str | None] | None = None,
) -> Surrogate:
    """One learning surrogate of ``kind`` (``gp``, ``gp_chgnet``, ``gp_cloud``,
    ``gp_transfer``, ``gp_transfer_chgnet``, ``cloud_ensemble``)."""
    from loop.config import GP_KINDS

    sc = config.surrogate
    if kind in GP_KINDS:
        parts = gp_feature_blocks(kind, config, scopes, n_pool, cifs)
        gp_args: dict[str, Any] = {
            "seed": config.seed,
            "max_train": sc.gp_max_train,
            "max_condition": sc.gp_max_condition,
            "n_pool": n_pool,
            "warp": sc.gp_warp,
        }
        if kind == "gp":
            return GPSurrogate(parts[0], **gp_args)
        from loop.chgnet_block import ChgnetGPSurrogate, TransferChgnetGPSurrogate
        from loop.gp_blocks import BlockGPSurrogate, TransferGPSurrogate

        cls = {
            "gp_chgnet": ChgnetGPSurrogate,
            "gp_cloud": BlockGPSurrogate,
            "gp_transfer": TransferGPSurrogate,
            "gp_transfer_chgnet": TransferChgnetGPSurrogate,
        }[kind]
        return cls(torch.cat(parts, dim=-1), _tiles(parts), **gp_args)
    if kind != "cloud_ensemble":
        raise ValueError(f"unknown surrogate kind {kind!r}")
    from cloud_model.checkpoint import resolve_checkpoint
    from cloud_model.finetune_job import create_ensemble

    checkpoint = resolve_checkpoint(sc.checkpoint)  # "default" = the shipped checkpoint
    ens_config = sc.ensemble.model_copy(
        update={"seed": config.seed, "target_names": config.targets}
    )
    ensemble = create_ensemble(checkpoint, sc.n_members, sc.head, len(config.targets), ens_config)
    ensemble.share_cache()  # runs in one process (benchmark workers) share the trunk's features
    return EnsembleSurrogate(ensemble, scopes, warm_start=config.finetune.warm_start, n_pool=n_pool)


def gp_feature_blocks(
    kind: str,
    config: CampaignConfig,
    scopes: list[str],
    n_pool: int,
    cifs: list[str | None] | None = None,
) -> list[Tensor]:
    """The feature blocks of GP ``kind``, ``len(scopes)`` rows each: composition descriptors,
    then the CLOUD (``gp_cloud``) or transfer block (``gp_transfer``, ``gp_transfer_chgnet``),
    then CHGNet crystal features (``gp_chgnet``, ``gp_transfer_chgnet``).

    Raises:
        ConfigError: a structure kind on a pool without every candidate's structure.
    """
    from loop.features import composition_features

    parts = [torch.as_tensor(composition_features(scopes), dtype=torch.float64)]
    if kind in ("gp_cloud", "gp_transfer"):
        parts.append(_second_block(kind, config, scopes, n_pool))
    elif kind == "gp_transfer_chgnet":
        parts.append(_second_block("gp_transfer", config, scopes, n_pool))
    if kind in _STRUCTURE_KINDS:
        parts.append(chgnet_block(cifs, n_pool, len(scopes), kind=kind))
    return parts


def _tiles(parts: list[Tensor]) -> list[tuple[int, int]]:
    """``(start, stop)`` column ranges of ``parts`` placed side by side."""
    stops = torch.tensor([p.shape[-1] for p in parts]).cumsum(0).tolist()
    return list(zip([0, *stops[:-1]], stops, strict=True))


def chgnet_block(
    cifs: list[str | None] | None, n_pool: int, n_rows: int, *, kind: str = "gp_chgnet"
) -> Tensor:
    """``n_rows x 64`` CHGNet block of surrogate ``kind`` (zero rows past the pool's ``n_pool``).

    Raises:
        ConfigError: a candidate of the pool without a structure.
    """
    from cloud_model.errors import ConfigError
    from loop.chgnet_block import chgnet_block_features

    missing = _missing_structures(cifs, n_pool)
    if missing or cifs is None:
        raise ConfigError(
            f"surrogate {kind} needs every candidate's structure: {missing} of the "
            f"{n_pool} candidates of the pool have none (use a pool with CIFs, or leave "
            f"{kind} out of surrogate.candidates)"
        )
    return chgnet_block_features([str(c) for c in cifs[:n_pool]], n_rows)


def _second_block(kind: str, config: CampaignConfig, scopes: list[str], n_pool: int) -> Tensor:
    """The block a block GP adds to the composition descriptor: CLOUD PCA or transfer."""
    if kind == "gp_transfer":
        from loop.features import composition_from_scope
        from loop.transfer import transfer_features

        comps = [composition_from_scope(s) for s in scopes]
        return transfer_features(comps, sets=config.surrogate.transfer_sets)
    from cloud_model.checkpoint import resolve_checkpoint
    from cloud_model.errors import ConfigError
    from loop.gp_blocks import CLOUD_DIMS, cloud_block_features

    checkpoint = resolve_checkpoint(config.surrogate.checkpoint)
    if checkpoint is None:
        raise ConfigError("surrogate.kind gp_cloud needs a pretrained surrogate.checkpoint")
    return cloud_block_features(scopes, checkpoint, n_fit=n_pool, dims=CLOUD_DIMS)


def _bounds(features: Tensor) -> Tensor:
    lo, hi = features.min(0).values, features.max(0).values
    hi = torch.where(hi > lo, hi, lo + 1.0)
    return torch.stack([lo, hi])


def _as_dict(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    if isinstance(report, dict):
        return report
    if hasattr(report, "model_dump"):
        return dict(report.model_dump())
    return {k: v for k, v in vars(report).items() if not k.startswith("_")}
