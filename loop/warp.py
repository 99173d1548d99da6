"""Outcome warping for GPs: a Yeo-Johnson power transform fitted on the measured values.

Property values are often skewed (Debye temperatures, band gaps, moduli, energies
above the hull have long tails), and the extremes a campaign looks for sit in a
tail, where a GP on the raw values is least faithful. A monotone power transform
fitted to the training values at each refit (the Yeo-Johnson family, which allows
any sign; chosen by maximum likelihood as in HEBO, Cowen-Rivers et al., JAIR 2022)
makes them closer to Gaussian; the GP models the warped values and everything the
loop reads (draws, acquisition, recorded predictions) is mapped back to the raw scale.

``lambda`` is kept in ``[0, 2]``, where the inverse is defined on the whole line, so
any posterior draw maps back to a finite value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from botorch.models.model import Model
from botorch.posteriors import Posterior
from torch import Tensor

__all__ = ["WarpedModel", "YeoJohnson"]

_EPS = 1e-6


def _branch_powers(lam: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(lam == 0, lam == 2, lam, 2 - lam)``, the powers made safe where they are 0."""
    at0, at2 = lam.abs() < _EPS, (2 - lam).abs() < _EPS
    one = torch.ones_like(lam)
    return at0, at2, torch.where(at0, one, lam), torch.where(at2, one, 2 - lam)


class YeoJohnson:
    """Per-target ``z = YJ((y - loc) / scale; lam)`` with its inverse and derivative.

    Args:
        loc, scale, lam: ``m`` values each (one per target).
    """

    def __init__(self, loc: Tensor, scale: Tensor, lam: Tensor) -> None:
        self.loc, self.scale, self.lam = (t.to(torch.float64) for t in (loc, scale, lam))

    @classmethod
    def fit(cls, y: Tensor) -> YeoJohnson:
        """Maximum-likelihood ``lam`` per column of ``y`` (``n x m``; NaN rows ignored)."""
        from scipy import stats

        locs, scales, lams = [], [], []
        for col in y.to(torch.float64).T:
            v = col[torch.isfinite(col)]
            loc = float(v.mean()) if v.numel() else 0.0
            scale = float(v.std()) if v.numel() > 1 else 1.0
            scale = scale if scale > 0 else 1.0
            lam = 1.0  # identity
            if v.numel() >= 4:
                lam = float(stats.yeojohnson_normmax(((v - loc) / scale).numpy()))
            locs.append(loc)
            scales.append(scale)
            lams.append(min(max(lam, 0.0), 2.0))
        return cls(*(torch.tensor(x, dtype=torch.float64) for x in (locs, scales, lams)))

    def forward(self, y: Tensor) -> Tensor:
        x = (y - self.loc) / self.scale
        at0, at2, lp, ln = _branch_powers(self.lam.expand_as(x))
        xp, xn = x.clamp_min(0), (-x).clamp_min(0)
        zp = torch.where(at0, torch.log1p(xp), ((xp + 1) ** lp - 1) / lp)
        zn = torch.where(at2, -torch.log1p(xn), -((xn + 1) ** ln - 1) / ln)
        return torch.where(x >= 0, zp, zn)

    def inverse(self, z: Tensor) -> Tensor:
        at0, at2, lp, ln = _branch_powers(self.lam.expand_as(z))
        zp, zn = z.clamp_min(0), z.clamp_max(0)
        xp = torch.where(at0, torch.expm1(zp), (lp * zp + 1) ** (1 / lp) - 1)
        xn = torch.where(at2, -torch.expm1(-zn), 1 - (1 - ln * zn) ** (1 / ln))
        return self.loc + self.scale * torch.where(z >= 0, xp, xn)

    def inverse_slope(self, z: Tensor) -> Tensor:
        """``d inverse / dz`` at ``z`` (for the delta-method standard deviation)."""
        at0, at2, lp, ln = _branch_powers(self.lam.expand_as(z))
        zp, zn = z.clamp_min(0), z.clamp_max(0)
        dp = torch.where(at0, torch.exp(zp), (lp * zp + 1) ** (1 / lp - 1))
        dn = torch.where(at2, torch.exp(-zn), (1 - ln * zn) ** (1 / ln - 1))
        return self.scale * torch.where(z >= 0, dp, dn)

    def state(self) -> dict[str, Tensor]:
        return {"warp.loc": self.loc, "warp.scale": self.scale, "warp.lam": self.lam}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor]) -> YeoJohnson | None:
        if "warp.lam" not in tensors:
            return None
        return cls(tensors["warp.loc"], tensors["warp.scale"], tensors["warp.lam"])


class WarpedModel(Model):
    """A model of warped values whose posterior is reported on the raw scale.

    Draws are exact (each warped draw mapped back); the mean and variance are the
    delta-method ones around the warped posterior mean.
    """

    def __init__(self, base: Model, warp: YeoJohnson) -> None:
        super().__init__()
        self.base = base
        self.warp = warp

    @property
    def num_outputs(self) -> int:
        return int(self.base.num_outputs)

    def posterior(self, X: Tensor, *args: Any, **kwargs: Any) -> Posterior:
        from botorch.posteriors.transformed import TransformedPosterior

        warp = self.warp
        mean_fn: Callable[[Tensor, Tensor], Tensor] = lambda m, v: warp.inverse(m)  # noqa: E731
        var_fn: Callable[[Tensor, Tensor], Tensor] = (  # noqa: E731
            lambda m, v: warp.inverse_slope(m) ** 2 * v
        )
        return TransformedPosterior(
            self.base.posterior(X, *args, **kwargs),
            sample_transform=warp.inverse,
            mean_transform=mean_fn,
            variance_transform=var_fn,
        )
