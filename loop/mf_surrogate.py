"""A surrogate across fidelities: an intrinsic-coregionalisation GP (BoTorch ``MultiTaskGP``).

The fidelities of a campaign (:mod:`loop.fidelity`) measure one quantity with
different bias, noise and cost. The model is the intrinsic coregionalisation model
(ICM; Bonilla, Chai & Williams, NeurIPS 2007; the multi-fidelity use follows
Kennedy & O'Hagan, Biometrika 2000, and Poloczek, Wang & Frazier, NeurIPS 2017)::

    cov(f_s(x), f_t(x')) = k(x, x') * B[s, t],     B = W W^T + diag(v)  (PSD, fitted)

with ``k`` an RBF ARD kernel (BoTorch's dimension-scaled lengthscale prior, Hvarfner
et al. 2024) over the same candidate features the GP
surrogate uses (composition features, plus the CLOUD or transfer block when the
surrogate is ``gp_cloud`` / ``gp_transfer``), and one observation noise per
fidelity. Each fidelity's values are standardised separately before the fit
(an affine relation between fidelities then costs the model nothing but ``B``).

ICM gives every fidelity the same length scales: a cheap fidelity that ranks the
broad trends right but errs on a shorter scale (CHGNet against DFT) cannot be
both trusted and corrected. ``kernel="lmc"`` is the linear model of
coregionalisation with two latent processes instead (Journel & Huijbregts 1978;
Alvarez, Rosasco & Lawrence 2012)::

    cov(f_s(x), f_t(x')) = k_1(x, x') * B_1[s, t] + k_2(x, x') * B_2[s, t]

each ``k_q`` its own RBF ARD kernel and each ``B_q = w_q w_q^T + diag(v_q)``.
The autoregressive model of Kennedy & O'Hagan (``f_0 = rho f_1 + delta``, ``delta``
independent with its own length scales) is the case ``w_1 = (rho, 1)``,
``w_2 = (1, 0)``.

Index convention (so that the surrogate keeps the :class:`loop.surrogate.Surrogate`
contract): the model's rows are the pool followed by any prior data, ``R`` rows in
all; index ``i + k * R`` is row ``i`` at fidelity ``k``, fidelity 0 being the
*highest*. Plain indices ``0 .. R - 1`` are therefore the highest fidelity, which is
what :meth:`samples`, :meth:`mean_std` and :meth:`model` predict for every candidate.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from botorch.models.model import Model
from botorch.posteriors import Posterior
from botorch.posteriors.gpytorch import GPyTorchPosterior
from torch import Tensor

from loop.surrogate import Surrogate

__all__ = ["MultiFidelityGPSurrogate"]

logger = logging.getLogger(__name__)
_FILE = "mf_gp.safetensors"


class _HighestFidelityModel(Model):
    """The fitted ICM GP seen by BoTorch over plain indices: the highest fidelity's values."""

    def __init__(self, owner: MultiFidelityGPSurrogate) -> None:
        super().__init__()
        self._owner = owner

    @property
    def num_outputs(self) -> int:
        return 1

    def posterior(self, X: Tensor, *args: Any, **kwargs: Any) -> Posterior:
        owner = self._owner
        idx = X[..., 0].long()  # batch x q
        full = owner._inputs(idx % owner.n_rows, torch.zeros_like(idx))  # batch x q x (d+1)
        post = owner._gp().posterior(full, *args, **kwargs)
        assert isinstance(post, GPyTorchPosterior)
        mean, std = owner._stats[0]
        return GPyTorchPosterior(post.distribution * std + mean)


class MultiFidelityGPSurrogate(Surrogate):
    """ICM GP over candidate features and fidelities (see the module docstring).

    Args:
        features: ``R x d`` features of the pool, then of the prior rows.
        n_fidelities: ``L``; fidelity 0 is the highest.
        n_samples: draws :meth:`samples` returns (independent per candidate).
        seed: seeds those draws and the training subsample.
        max_train: at most this many training rows (exact GP, O(n^3)): every highest-
            fidelity row is kept first; with ``sense`` given, half of the remaining places go
            to the cheaper rows best by ``sense`` (each standardised within its fidelity),
            then a seeded share of the others fills the rest.
        sense: ``minimize`` or ``maximize`` for the campaign's objective; None: the share
            is drawn from all cheaper rows alike. On perov_5 at 1:30 a random share dropped
            ~55 % of 596 CHGNet results at every refit, the best among them included
            (``benchmarks/mf_pick_audit.py``).
        rank: rank of ``W`` (None: ``L``, a full-rank task covariance); with ``lmc``, the
            rank of each ``B_q`` (None: 1).
        fit_maxiter: L-BFGS-B iterations per hyperparameter fit at most.
        kernel: ``icm`` (one spatial kernel) or ``lmc`` (two, see the module docstring).
    """

    name = "mf_gp"

    def __init__(
        self,
        features: Tensor,
        n_fidelities: int,
        *,
        n_samples: int = 64,
        seed: int = 0,
        max_train: int = 500,
        rank: int | None = None,
        fit_maxiter: int = 200,
        sense: str | None = None,
        kernel: str = "icm",
    ) -> None:
        if kernel not in ("icm", "lmc"):
            raise ValueError(f"kernel must be icm or lmc, got {kernel!r}")
        if n_fidelities < 1:
            raise ValueError(f"n_fidelities must be >= 1, got {n_fidelities}")
        if sense not in (None, "minimize", "maximize"):
            raise ValueError(f"sense must be minimize, maximize or None, got {sense!r}")
        f = features.to(torch.float64)
        lo, hi = f.min(0).values, f.max(0).values
        self.features = (f - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # R x d
        self.n_rows = int(f.shape[0])
        self.n_fidelities = n_fidelities
        self.n_samples = n_samples
        self.seed = seed
        self.max_train = max_train
        self.rank = rank
        self.fit_maxiter = fit_maxiter
        self.sense = sense
        self.kernel = kernel
        self._model: Any = None  # botorch MultiTaskGP, fitted
        self._train: tuple[Tensor, Tensor] | None = None  # combined indices, raw values
        self._stats: list[tuple[float, float]] = []  # per fidelity: (mean, std) of its values

    # ------------------------------------------------------------------ indices
    def split(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows and fidelities of combined indices ``idx`` (``n`` each)."""
        idx = idx.long()
        return idx % self.n_rows, idx // self.n_rows

    def combine(self, rows: Tensor, fidelities: Tensor) -> Tensor:
        """Combined indices of (row, fidelity) pairs."""
        return rows.long() + fidelities.long() * self.n_rows

    def _inputs(self, rows: Tensor, fidelities: Tensor) -> Tensor:
        """``... x (d + 1)`` model inputs: features, then the fidelity index."""
        return torch.cat([self.features[rows], fidelities.to(torch.float64).unsqueeze(-1)], -1)

    def _gp(self) -> Any:
        if self._model is None:
            raise RuntimeError("the multi-fidelity GP has not been fitted yet")
        return self._model

    # ------------------------------------------------------------------ fitting
    def _subsample(self, idx: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if len(idx) <= self.max_train:
            return idx, y
        _, fid = self.split(idx)
        top = (fid == 0).nonzero().flatten()
        rest = (fid != 0).nonzero().flatten()
        places = max(self.max_train - len(top), 0)
        best = rest[:0]
        if self.sense is not None and places:
            # the cheap results nearest the optimum: where the expensive measurements will go
            z = torch.empty(len(rest), dtype=torch.float64)
            for k in fid[rest].unique():
                at = fid[rest] == k
                vals = y[rest[at]]
                z[at] = (vals - vals.mean()) / vals.std().clamp_min(1e-12) if at.sum() > 1 else 0.0
            sign = -1.0 if self.sense == "minimize" else 1.0
            order = torch.argsort(sign * z, descending=True, stable=True)
            best, rest = rest[order[: places // 2]], rest[order[places // 2 :]]
        gen = torch.Generator().manual_seed(self.seed)
        share = rest[torch.randperm(len(rest), generator=gen)[: places - len(best)]]
        keep = torch.cat([top, best, share]).sort().values
        return idx[keep], y[keep]

    def _build(self, idx: Tensor, y: Tensor) -> Any:
        from botorch.models import MultiTaskGP

        rows, fid = self.split(idx)
        self._stats = []
        z = torch.empty_like(y)
        for k in range(self.n_fidelities):
            at = fid == k
            vals = y[at]
            mean = float(vals.mean()) if vals.numel() else 0.0
            std = float(vals.std()) if vals.numel() > 1 else 1.0
            std = std if std > 1e-9 else 1.0
            self._stats.append((mean, std))
            z[at] = (vals - mean) / std
        X = self._inputs(rows, fid)  # n x (d+1)
        gp = MultiTaskGP(
            X,
            z.unsqueeze(-1),
            task_feature=-1,
            output_tasks=[0],
            all_tasks=list(range(self.n_fidelities)),
            rank=self.rank,
            outcome_transform=None,
        )
        if self.kernel == "lmc":
            gp.covar_module = self._lmc_kernel()
        return gp

    def _lmc_kernel(self) -> Any:
        """``k_1 B_1 + k_2 B_2`` over (features, fidelity) inputs (see the module docstring).

        Both spatial kernels are the ICM's (RBF, ARD, BoTorch's dimension-scaled lengthscale
        prior). The start breaks their symmetry the autoregressive way: ``k_1`` shared by all
        fidelities at the prior's lengthscale, ``k_2`` on the highest fidelity only, at half of it.
        """
        from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
        from gpytorch.kernels import AdditiveKernel, IndexKernel, ProductKernel

        d, L = self.features.shape[1], self.n_fidelities
        rank = self.rank or 1
        parts = []
        for q in range(2):
            spatial = get_covar_module_with_dim_scaled_prior(ard_num_dims=d, active_dims=range(d))
            tasks = IndexKernel(num_tasks=L, rank=rank, active_dims=[d])
            with torch.no_grad():
                if q == 1:
                    spatial.lengthscale = spatial.lengthscale * 0.5
                factor = torch.zeros(L, rank)
                factor[:, 0] = 0.9 if q == 0 else 0.0
                factor[0, 0] = 0.9 if q == 0 else 0.45
                tasks.covar_factor.copy_(factor)
                tasks.raw_var.fill_(-4.0)
            parts.append(ProductKernel(spatial, tasks))
        return AdditiveKernel(*parts).to(torch.float64)

    def fit(self, train_idx: Tensor, train_y: Tensor) -> dict[str, float]:
        """Fit on ``n`` combined indices and their ``n x 1`` values (see the module docstring)."""
        from botorch.fit import fit_gpytorch_mll
        from gpytorch.mlls import ExactMarginalLogLikelihood

        y = train_y.to(torch.float64).reshape(len(train_idx), -1)[:, 0]
        keep = torch.isfinite(y)
        idx, y = self._subsample(train_idx.long()[keep], y[keep])
        gp = self._build(idx, y)
        warm = self._warm_start(gp)
        mll = ExactMarginalLogLikelihood(gp.likelihood, gp)
        try:
            fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": self.fit_maxiter}})
        except Exception as exc:  # botorch raises several types; the GP stays usable at its prior
            logger.warning("multi-fidelity GP fit failed (%s); initial hyperparameters kept", exc)
        gp.eval()
        self._model, self._train = gp, (idx, y)
        corr = self.task_correlation()
        metrics = {"n_train": float(len(idx)), "warm_start": float(warm)}
        for k in range(1, self.n_fidelities):
            metrics[f"corr_0_{k}"] = float(corr[0, k])
        return metrics

    def _warm_start(self, gp: Any) -> bool:
        """Start ``gp``'s hyperparameters from the last fit's (the data grew by a batch, so the
        optimum moved little and L-BFGS needs fewer steps); the last fit is restored on resume,
        so a resumed campaign warm-starts from the same values."""
        if self._model is None:
            return False
        try:
            gp.load_state_dict(self._model.state_dict())
        except (RuntimeError, KeyError) as exc:  # another shape: start from the prior
            logger.debug("multi-fidelity GP: no warm start (%s)", exc)
            return False
        return True

    def task_correlation(self) -> Tensor:
        """``L x L`` correlation between fidelities at zero distance (``B``; ``B_1 + B_2``)."""
        gp = self._gp()
        products = gp.covar_module.kernels if self.kernel == "lmc" else [gp.covar_module]
        B = torch.zeros(self.n_fidelities, self.n_fidelities, dtype=torch.float64)
        for product in products:
            task_kernel = product.kernels[-1] if hasattr(product, "kernels") else None
            if task_kernel is None or not hasattr(task_kernel, "covar_matrix"):
                raise RuntimeError("unexpected MultiTaskGP kernel structure: no task covariance")
            with torch.no_grad():
                B = B + task_kernel.covar_matrix.to_dense()
        d = B.diagonal().clamp_min(1e-12).sqrt()
        return B / d[:, None] / d[None, :]

    # ------------------------------------------------------------------ predictions
    def joint(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Joint posterior at combined indices ``idx`` (``P``), each fidelity standardised.

        Returns:
            ``P`` means, ``P x P`` covariance of the latent values, ``P`` observation noise
            variances, all in the standardised units of each index's fidelity.
        """
        rows, fid = self.split(idx)
        X = self._inputs(rows, fid)
        gp = self._gp()
        with torch.no_grad():
            post = gp.posterior(X)
            noisy = gp.posterior(X, observation_noise=True)
            mean = post.mean.reshape(-1)
            cov = post.distribution.covariance_matrix.reshape(len(idx), len(idx))
            noise = (noisy.variance - post.variance).reshape(-1).clamp_min(1e-10)
        return mean, cov, noise

    def marginals(
        self, idx: Tensor, chunk: int = 1024, observation_noise: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Posterior means and variances (``n`` each) at ``idx``, standardised, in chunks;
        with ``observation_noise`` the variances are of a measurement at each fidelity."""
        means, variances = [], []
        gp = self._gp()
        with torch.no_grad():
            for part in idx.long().split(chunk):
                rows, fid = self.split(part)
                post = gp.posterior(self._inputs(rows, fid), observation_noise=observation_noise)
                means.append(post.mean.reshape(-1))
                variances.append(post.variance.reshape(-1).clamp_min(1e-12))
        if not means:
            return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
        return torch.cat(means), torch.cat(variances)

    def standardise(self, value: float, fidelity: int = 0) -> float:
        """``value`` of ``fidelity`` in that fidelity's standardised units."""
        mean, std = self._stats[fidelity]
        return (value - mean) / std

    def model(self) -> Model:
        self._gp()
        return _HighestFidelityModel(self)

    def mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Highest-fidelity mean and std (``n x 1`` each) at plain indices ``idx``."""
        return self._highest(idx, observation_noise=False)

    def outcome_mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of a highest-fidelity measurement (its fitted noise included)."""
        return self._highest(idx, observation_noise=True)

    def _highest(self, idx: Tensor, observation_noise: bool) -> tuple[Tensor, Tensor]:
        mean, var = self.marginals(idx.long() % self.n_rows, observation_noise=observation_noise)
        m, s = self._stats[0]
        return (mean * s + m).unsqueeze(-1), (var.sqrt() * s).unsqueeze(-1)

    def samples(self, idx: Tensor) -> Tensor:
        mean, std = self.mean_std(idx)
        gen = torch.Generator().manual_seed(self.seed)
        eps = torch.randn((self.n_samples, *mean.shape), generator=gen, dtype=mean.dtype)
        return mean + std * eps  # S x n x 1 (independent per candidate)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self._model is None or self._train is None:
            raise RuntimeError("the multi-fidelity GP has not been fitted yet")
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "train_idx": self._train[0].contiguous(),
            "train_y": self._train[1].contiguous(),
            "n_fidelities": torch.tensor([self.n_fidelities]),
            "lmc": torch.tensor([int(self.kernel == "lmc")]),
        }
        for name, value in self._model.state_dict().items():
            tensors[f"state.{name}"] = value.detach().clone().contiguous()
        save_file(tensors, str(directory / _FILE))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        from cloud_model.errors import CheckpointError

        path = directory / _FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: no saved multi-fidelity GP")
        tensors = load_file(str(path))
        if int(tensors["n_fidelities"][0]) != self.n_fidelities:
            raise CheckpointError(
                f"{path}: saved with {int(tensors['n_fidelities'][0])} fidelities, the campaign "
                f"has {self.n_fidelities}"
            )
        saved = "lmc" if int(tensors.get("lmc", torch.tensor([0]))[0]) else "icm"
        if saved != self.kernel:
            raise CheckpointError(
                f"{path}: saved with kernel {saved}, the campaign uses {self.kernel}"
            )
        idx, y = tensors["train_idx"].long(), tensors["train_y"]
        if idx.numel() and int(idx.max()) >= self.n_rows * self.n_fidelities:
            raise CheckpointError(f"{path}: trained on rows this campaign's features do not have")
        gp = self._build(idx, y)
        gp.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("state.")})
        gp.eval()
        self._model, self._train = gp, (idx, y)
