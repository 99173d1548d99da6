"""Per-candidate posterior means and variances of a fitted exact GP, over very large pools.

``SingleTaskGP.posterior(X)`` builds the joint posterior of the ``n*`` rows of ``X``:
its test-test kernel alone is ``n* x n*`` (a 4,096-row chunk took 0.16 s on one
core, so 39 s for 1M candidates), though a screen needs only its diagonal. Here the
training side is factorised once per fit and every chunk costs one
``n* x n`` cross-kernel and a triangular solve:

    mean(x) = m(x) + k(x, X) K^-1 (y - m(X)),   var(x) = k(x, x) - ||L^-1 k(X, x)||^2

with ``K = k(X, X) + noise I = L L^T``, in the model's transformed space (its input
transform applied to ``x``, values mapped back through its ``Standardize``). It
equals BoTorch's noise-free marginal posterior to rounding (tested); the model's
own ``posterior`` stays what the acquisition uses for joint q-batches up to a few hundred
training rows; past that, :class:`FactorisedGP` gives the same joint posteriors from the
cached factorisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from botorch.models.model import Model
from torch import Tensor


@dataclass(frozen=True)
class MarginalPredictor:
    """The training-side factorisation of one fitted ``SingleTaskGP`` (eval mode)."""

    model: Any  # a BoTorch SingleTaskGP in eval mode
    chol: Tensor  # (b, n, n), b = outputs batched in the model (1 for one output)
    alpha: Tensor  # (b, n, 1): K^-1 (y - m(X))
    train_x: Tensor  # (b, n, d) transformed

    @classmethod
    def from_model(cls, model: Any) -> MarginalPredictor:
        """Factorise ``model``'s training covariance (a BoTorch ``SingleTaskGP``)."""
        with torch.no_grad():
            train_x = model.train_inputs[0]  # (n, d) or (b, n, d)
            train_y = model.train_targets  # (n,) or (b, n)
            if train_x.dim() == 2:
                train_x, train_y = train_x[None], train_y[None]
            noise = model.likelihood.noise  # (1,) or (b, 1)
            k = model.covar_module(train_x).to_dense()  # (b, n, n)
            k = k.expand(train_x.shape[0], *k.shape[-2:])
            eye = torch.eye(k.shape[-1], dtype=k.dtype)
            noise_b = noise.reshape(-1, 1, 1).expand(k.shape[0], 1, 1)
            chol = torch.linalg.cholesky(k + noise_b * eye)
            resid = (train_y - model.mean_module(train_x)).unsqueeze(-1)
            alpha = torch.cholesky_solve(resid, chol)  # (b, n, 1)
        return cls(model=model, chol=chol, alpha=alpha, train_x=train_x)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Marginal mean and variance ``(n*, m)`` of the latent function at raw inputs ``x`` ``(n*, d)``."""
        model = self.model
        with torch.no_grad():
            xt = model.transform_inputs(x)  # (n*, d)
            b = self.train_x.shape[0]
            xb = xt.expand(b, *xt.shape)  # (b, n*, d)
            cross = model.covar_module(xb, self.train_x).to_dense()
            mean = model.mean_module(xb) + (cross @ self.alpha).squeeze(-1)  # (b, n*)
            v = torch.linalg.solve_triangular(self.chol, cross.transpose(-1, -2), upper=False)
            if getattr(model.covar_module, "is_stationary", False):  # k(x, x) the same for every x
                prior = model.covar_module(xb[:, :1], diag=True).expand(b, xt.shape[0])
            else:
                prior = model.covar_module(xb, diag=True)  # (b, n*)
            var = (prior - v.pow(2).sum(-2)).clamp_min(0.0)  # (b, n*)
            mean, var = mean.transpose(0, 1), var.transpose(0, 1)  # (n*, b)
            tf = getattr(model, "outcome_transform", None)
            if tf is not None:
                std = tf.stdvs.reshape(1, -1)  # (1, m)
                mean = mean * std + tf.means.reshape(1, -1)
                var = var * std**2
        return mean, var

    def noise_variance(self) -> Tensor:
        """The fitted observation noise variance ``(1, m)``, in the model's original units."""
        with torch.no_grad():
            noise = self.model.likelihood.noise.reshape(1, -1)
            tf = getattr(self.model, "outcome_transform", None)
            if tf is not None:
                noise = noise * tf.stdvs.reshape(1, -1) ** 2
        return noise.expand(1, self.chol.shape[0]) if noise.shape[-1] == 1 else noise

    def leave_one_out(self) -> tuple[Tensor, Tensor]:
        """Leave-one-out mean and latent variance ``(n, m)`` of the training rows.

        Closed form for an exact GP (Rasmussen & Williams, eq. 5.12): with ``K^-1`` from the
        factorisation, row ``i``'s prediction from the others has mean
        ``y_i - [K^-1 r]_i / [K^-1]_ii`` and variance ``1 / [K^-1]_ii`` (noise included; the
        latent variance returned is that less the noise), in the model's original units.
        """
        model = self.model
        with torch.no_grad():
            k_inv = torch.cholesky_inverse(self.chol)  # (b, n, n)
            diag = k_inv.diagonal(dim1=-2, dim2=-1)  # (b, n)
            train_y = model.train_targets
            train_y = train_y[None] if train_y.dim() == 1 else train_y  # (b, n)
            mean = train_y - self.alpha.squeeze(-1) / diag  # (b, n)
            noise = model.likelihood.noise.reshape(-1, 1)  # (1 or b, 1)
            var = (1.0 / diag - noise).clamp_min(1e-12)  # (b, n)
            mean, var = mean.transpose(0, 1), var.transpose(0, 1)  # (n, b)
            tf = getattr(model, "outcome_transform", None)
            if tf is not None:
                std = tf.stdvs.reshape(1, -1)
                mean = mean * std + tf.means.reshape(1, -1)
                var = var * std**2
        return mean, var


class FactorisedGP(Model):
    """A fitted single-output ``SingleTaskGP`` whose joint posteriors reuse one factorisation.

    ``SingleTaskGP.posterior`` evaluates the kernel over the training rows *and* the test
    rows together, ``(n + n*)^2`` entries per call: at 5,000 training rows a q-batch
    decision over a 256-candidate shortlist spent ~85 s there. Here each call costs one
    ``n* x n`` cross-kernel and a triangular solve against the cached Cholesky factor:

        mean = m(x) + k(x, X) alpha,   cov = k(x, x') - (L^-1 k(X, x))^T (L^-1 k(X, x'))

    in the model's transformed space, mapped back through its ``Standardize``: the same
    posterior as the model's own (tested), for the MC acquisition functions.
    """

    def __init__(self, predictor: MarginalPredictor) -> None:
        super().__init__()
        if predictor.chol.shape[0] != 1:
            raise ValueError("FactorisedGP takes a single-output GP")
        self.predictor = predictor

    @property
    def num_outputs(self) -> int:
        return 1

    def posterior(
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: Any = None,
        **kwargs: Any,
    ) -> Any:
        from botorch.posteriors.gpytorch import GPyTorchPosterior
        from gpytorch.distributions import MultivariateNormal
        from linear_operator.operators import DenseLinearOperator

        p = self.predictor
        model = p.model
        xt = model.transform_inputs(X)  # (..., q, d)
        batch, q, d = xt.shape[:-2], xt.shape[-2], xt.shape[-1]
        flat = xt.reshape(-1, d)
        train_x = p.train_x[0]
        cross = model.covar_module(flat, train_x).to_dense()  # (B q, n)
        mean = model.mean_module(flat) + (cross @ p.alpha[0]).squeeze(-1)  # (B q,)
        v = torch.linalg.solve_triangular(p.chol[0], cross.transpose(0, 1), upper=False)
        v = v.reshape(-1, *batch, q).movedim(0, -1)  # (..., q, n)
        prior = model.covar_module(xt).to_dense()  # (..., q, q)
        cov = prior - v @ v.transpose(-1, -2)
        if observation_noise is not False:
            noise = model.likelihood.noise.reshape(())
            cov = cov + noise * torch.eye(q, dtype=cov.dtype)
        mean = mean.reshape(*batch, q)
        tf = getattr(model, "outcome_transform", None)
        if tf is not None:
            std, mu = tf.stdvs.reshape(()), tf.means.reshape(())
            mean, cov = mean * std + mu, cov * std**2
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        # a linear operator, as in gpytorch's own posterior: its root decomposition adds
        # jitter where a batch holds (near-)duplicate points, instead of failing
        posterior = GPyTorchPosterior(MultivariateNormal(mean, DenseLinearOperator(cov)))
        return posterior if posterior_transform is None else posterior_transform(posterior)
