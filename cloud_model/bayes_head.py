"""A closed-form Bayesian last layer on a fine-tuned member's own features.

After a member of a :class:`cloud_model.ensemble.CloudEnsemble` is fine-tuned, its
regression head's last linear layer is replaced, for prediction, by Bayesian
linear regression on the features that layer sees (the head's hidden layer plus
a constant), one regression per target column in the member's standardised units:

    z = phi(x)^T w + eps,   w ~ N(0, I / alpha),   eps ~ N(0, 1 / beta)

``alpha`` and ``beta`` maximise the evidence (MacKay's fixed-point updates, in
the eigenbasis of ``Phi^T Phi``), so nothing is tuned by hand. The posterior
over ``w`` is Gaussian, which gives each candidate a mean and a variance that
grows away from the training rows, and *joint* draws over any set of candidates:
one draw of ``w`` is one function, applied to every chunk of a pool alike.

This is the last-layer idea of VBLL (Harrison et al., ICLR 2025) and last-layer
Laplace (Daxberger et al., NeurIPS 2021) in its exact, conjugate form for a
Gaussian likelihood; see Bishop, *Pattern Recognition and Machine Learning*,
section 3.5, for the evidence updates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cloud_model.errors import ConfigError

# the noise std never falls below this share of the training targets' std: a head
# that interpolates its few training rows would otherwise claim they are noise-free
MIN_NOISE_STD = 0.02
_EVIDENCE_STEPS = 100
_ALPHA_RANGE = (1e-6, 1e6)


class BayesianLastLayer(nn.Module):
    """Gaussian posteriors of ``m`` linear maps from ``p - 1`` features (plus a constant).

    Buffers (saved with the weights): ``w_mean`` ``(m, p)``, ``w_scale`` ``(m, p, p)``
    (``w = w_mean + w_scale @ eps`` with ``eps ~ N(0, I)``), ``noise_var`` ``(m,)``
    and ``alpha`` ``(m,)``, all in standardised target units.
    """

    w_mean: Tensor
    w_scale: Tensor
    noise_var: Tensor
    alpha: Tensor

    def __init__(self, n_features: int, n_targets: int) -> None:
        super().__init__()
        p = n_features + 1
        self.register_buffer("w_mean", torch.zeros(n_targets, p, dtype=torch.float64))
        self.register_buffer("w_scale", torch.zeros(n_targets, p, p, dtype=torch.float64))
        self.register_buffer("noise_var", torch.ones(n_targets, dtype=torch.float64))
        self.register_buffer("alpha", torch.ones(n_targets, dtype=torch.float64))

    @property
    def n_targets(self) -> int:
        """m."""
        return int(self.w_mean.shape[0])

    def fit(self, hidden: Tensor, z: Tensor) -> None:
        """Evidence-maximised posterior per target column.

        Args:
            hidden: ``(n, p - 1)`` features of the training rows.
            z: ``(n, m)`` standardised targets; NaN = missing (that column is fitted on
                its finite rows).

        Raises:
            ConfigError: a column has fewer than two finite values, or shapes differ.
        """
        phi = _with_bias(hidden.double())  # (n, p)
        if phi.shape[1] != self.w_mean.shape[1] or z.shape != (phi.shape[0], self.n_targets):
            raise ConfigError(
                f"Bayesian head for {self.w_mean.shape[1] - 1} features x {self.n_targets} "
                f"targets got features {tuple(hidden.shape)} and targets {tuple(z.shape)}"
            )
        for j in range(self.n_targets):
            rows = torch.isfinite(z[:, j])
            if int(rows.sum()) < 2:
                raise ConfigError(f"target column {j} has fewer than two finite values")
            mean, scale, noise, alpha = _evidence_fit(phi[rows], z[rows, j].double())
            self.w_mean[j], self.w_scale[j] = mean, scale
            self.noise_var[j], self.alpha[j] = noise, alpha

    def moments(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive mean and variance of ``f`` (noise excluded), each ``(n, m)``.

        Args:
            hidden: ``(n, p - 1)`` features.
        """
        phi = _with_bias(hidden.double())  # (n, p)
        mean = phi @ self.w_mean.T  # (n, m)
        var = torch.einsum("np,mpq->nmq", phi, self.w_scale).pow(2).sum(-1)  # (n, m)
        return mean, var

    def draws(self, hidden: Tensor, eps: Tensor) -> Tensor:
        """Joint function draws ``(S, n, m)`` for standard normal ``eps`` ``(S, m, p)``.

        The same ``eps`` gives the same functions on any rows, so a pool scored in
        chunks gets draws that are joint over all of it.
        """
        phi = _with_bias(hidden.double())  # (n, p)
        w = self.w_mean + torch.einsum("mpq,smq->smp", self.w_scale, eps.double())  # (S, m, p)
        return torch.einsum("np,smp->snm", phi, w)  # (S, n, m)


def _with_bias(hidden: Tensor) -> Tensor:
    return torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)  # (n, p)


def _evidence_fit(phi: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MacKay's fixed point for ``alpha`` and ``beta`` of one column.

    Args:
        phi: ``(n, p)`` design; z: ``(n,)`` targets (float64).

    Returns:
        posterior mean ``(p,)``, scale ``(p, p)`` (``cov = scale @ scale.T``), noise
        variance and ``alpha``.
    """
    n = phi.shape[0]
    lam, vecs = torch.linalg.eigh(phi.T @ phi)  # (p,), (p, p)
    lam = lam.clamp_min(0.0)
    proj = vecs.T @ (phi.T @ z)  # (p,) Phi^T z in the eigenbasis
    max_beta = 1.0 / (MIN_NOISE_STD**2 * float(z.var().clamp_min(1e-12)))
    alpha, beta = 1.0, 1.0 / float(z.var().clamp_min(1e-12))
    for _ in range(_EVIDENCE_STEPS):
        denom = alpha + beta * lam  # (p,)
        m_eig = beta * proj / denom  # (p,) posterior mean in the eigenbasis
        gamma = float((beta * lam / denom).sum())
        resid = float(((z - phi @ (vecs @ m_eig)) ** 2).sum())
        new_alpha = min(
            max(gamma / max(float((m_eig**2).sum()), 1e-12), _ALPHA_RANGE[0]), _ALPHA_RANGE[1]
        )
        new_beta = min(max((n - gamma) / max(resid, 1e-12), 1e-6), max_beta)
        done = abs(new_alpha - alpha) <= 1e-6 * alpha and abs(new_beta - beta) <= 1e-6 * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    denom = alpha + beta * lam
    mean = vecs @ (beta * proj / denom)  # (p,)
    scale = vecs * denom.rsqrt()  # (p, p): cov = V diag(1/denom) V^T
    return mean, scale, torch.tensor(1.0 / beta), torch.tensor(alpha)
