"""Yeo-Johnson outcome warping of the GP: exact inverse, raw-scale beliefs, BoTorch acquisition, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loop.acquisition import select_batch
from loop.config import parse_config
from loop.surrogate import GPSurrogate, build_surrogate
from loop.warp import YeoJohnson
from tests.loop.cv_data import cv_scopes


def test_yeo_johnson_inverts_and_gaussianises_a_skewed_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    skewed = torch.randn(500, 1, generator=gen, dtype=torch.float64).mul(0.8).exp() * 300.0
    signed = torch.randn(500, 1, generator=gen, dtype=torch.float64) - 2.0
    y = torch.cat([skewed, signed], dim=1)
    warp = YeoJohnson.fit(y)
    z = warp.forward(y)
    assert torch.allclose(warp.inverse(z), y, atol=1e-8)
    assert 0.0 <= float(warp.lam[0]) < 0.5  # log-like for the long right tail
    assert abs(float(warp.lam[1]) - 1.0) < 0.3  # near the identity for a Gaussian column

    def skew(v: torch.Tensor) -> float:
        c = v - v.mean()
        return float((c**3).mean() / (c**2).mean() ** 1.5)

    assert skew(y[:, 0]) > 2.0 and abs(skew(z[:, 0])) < 0.25 * skew(y[:, 0])
    grid = torch.linspace(-6, 6, 25, dtype=torch.float64).view(-1, 1).expand(-1, 2)
    h = 1e-6
    numeric = (warp.inverse(grid + h) - warp.inverse(grid - h)) / (2 * h)
    assert torch.allclose(numeric, warp.inverse_slope(grid), rtol=1e-4, atol=1e-6)
    assert torch.isfinite(warp.inverse(grid * 100)).all()  # lambda in [0, 2]: defined everywhere
    again = YeoJohnson.from_state(warp.state())
    assert again is not None and torch.equal(again.lam, warp.lam)


def test_warped_gp_reports_raw_scale_beliefs_and_round_trips(
    data_dir: Path, tmp_path: Path
) -> None:
    scopes, labels = cv_scopes(data_dir, 60)
    cv = labels[:, 0]
    # two targets: a skewed objective (exp of Cv) and a constraint column
    y = torch.stack([((cv - cv.mean()) / cv.std()).exp(), cv], dim=1)
    config = parse_config(
        {
            "name": "w",
            "pool": {"file": "x.csv", "structure_format": "scope"},
            "objective": {"target": "a", "sense": "minimize"},
            "constraints": [{"target": "b", "lower": 5.0}],
            "surrogate": {"kind": "gp", "gp_warp": True},
        }
    )
    gp = build_surrogate(config, scopes, len(scopes))
    assert isinstance(gp, GPSurrogate) and gp.warp
    train = torch.arange(0, 40)
    metrics = gp.fit(train, y[train])
    assert "warp_lambda" in metrics
    idx = torch.arange(40, 60)
    mean, std = gp.mean_std(idx)
    assert mean.shape == std.shape == (20, 2) and bool((std > 0).all())
    assert float(mean[:, 0].min()) > -0.5  # the raw scale of a positive target, not warped units
    draws = gp.samples(idx)
    assert draws.shape == (gp.n_samples, 20, 2) and bool((draws[..., 0] > -1).all())
    # the median of the draws is the reported mean (the inverse of the warped mean)
    assert torch.allclose(draws.median(0).values, mean, rtol=0.25)
    picks = select_batch(
        kind="qlogei",
        surrogate=gp,
        spec=config.objective_spec(),
        q=3,
        available=idx,
        pending=torch.tensor([41], dtype=torch.long),
        measured_idx=train,
        measured_y=y[train],
        generator=torch.Generator().manual_seed(0),
        beta=2.0,
        shortlist=8,
    )
    assert len({p.index for p in picks}) == 3
    gp.save(tmp_path / "v1")
    restored = build_surrogate(config, scopes, len(scopes))
    restored.load(tmp_path / "v1")
    m2, s2 = restored.mean_std(idx)
    assert torch.allclose(mean, m2, atol=1e-8) and torch.allclose(std, s2, atol=1e-8)
    plain = build_surrogate(
        config.model_copy(
            update={"surrogate": config.surrogate.model_copy(update={"gp_warp": False})}
        ),
        scopes,
        len(scopes),
    )
    from cloud_model.errors import CheckpointError

    with pytest.raises(CheckpointError, match="warp"):
        plain.load(tmp_path / "v1")
