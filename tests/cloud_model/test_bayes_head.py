"""Bayesian last layers: evidence fits on known linear data, and an ensemble of members with them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cloud_model.bayes_head import BayesianLastLayer
from cloud_model.datasets import load_dataset
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig
from cloud_model.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_evidence_recovers_the_noise_and_variance_grows_away_from_the_data() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen)
    w = torch.tensor([1.0, -2.0, 0.5])
    z = torch.stack([x @ w + 0.3 * torch.randn(200, generator=gen), x[:, 0]], dim=1)  # (200, 2)
    z[:50, 1] = float("nan")  # a missing column is fitted on its finite rows
    head = BayesianLastLayer(3, 2)
    head.fit(x, z)
    assert abs(float(head.noise_var[0].sqrt()) - 0.3) < 0.06
    assert torch.allclose(head.w_mean[0, :3], w.double(), atol=0.08)
    near, _ = head.moments(x[:5])
    assert torch.allclose(near[:, 0], (x[:5] @ w).double(), atol=0.3)
    _, var_near = head.moments(torch.zeros(1, 3))
    _, var_far = head.moments(torch.full((1, 3), 8.0))
    assert float(var_far[0, 0]) > 20 * float(var_near[0, 0])
    # joint draws: mean and covariance of the draws match the closed form
    eps = torch.randn(4000, 2, 4, generator=gen)
    draws = head.draws(x[:3], eps)  # (4000, 3, 2)
    mean, var = head.moments(x[:3])
    assert torch.allclose(draws.mean(0), mean, atol=0.05)
    assert torch.allclose(draws.var(0), var, rtol=0.15, atol=1e-4)
    # the same eps on a different chunk gives the same functions (joint over a pool)
    again = head.draws(x[1:2], eps)
    assert torch.allclose(again[:, 0], draws[:, 1])


def test_a_noise_free_fit_keeps_the_noise_floor() -> None:
    x = torch.randn(10, 40, generator=torch.Generator().manual_seed(1))  # p > n: it interpolates
    z = x[:, :1] * 3.0
    head = BayesianLastLayer(40, 1)
    head.fit(x, z)
    assert float(head.noise_var[0].sqrt()) >= 0.02 * float(z.std()) * 0.999


def test_bad_shapes_are_named() -> None:
    head = BayesianLastLayer(4, 1)
    with pytest.raises(ConfigError, match="4 features x 1 targets"):
        head.fit(torch.zeros(5, 3), torch.zeros(5, 1))
    with pytest.raises(ConfigError, match="fewer than two finite"):
        head.fit(torch.zeros(5, 4), torch.full((5, 1), float("nan")))


@pytest.fixture(scope="module")
def rows() -> tuple[list[str], torch.Tensor]:
    records = load_dataset("cloud_cv", ["train_and_val"]).records[:90]
    return [r.scope or "" for r in records], torch.tensor([[r.targets["cv"]] for r in records])


def _config(**overrides: object) -> EnsembleConfig:
    base: dict[str, object] = {
        "model_size": "tiny",
        "epochs": 4,
        "warm_start_epochs": 2,
        "batch_size": 16,
        "device": "cpu",
        "parallel": "in_process",
        "n_trainable_blocks": 0,
        "bayesian_head": True,
        "bootstrap": True,
        "head_draws": 6,
        "predict_chunk": 16,
    }
    base.update(overrides)
    return EnsembleConfig.model_validate(base)


def test_ensemble_mixture_posterior_is_joint_and_round_trips(rows, tmp_path: Path) -> None:
    scopes, cv = rows
    ens = CloudEnsemble.create(None, 3, "regression", 1, _config())
    ens.fit(scopes[:40], cv[:40])
    assert len(ens.bayes_heads) == 3
    pool = scopes[:50]
    post = ens.predict_posterior(pool)
    assert post.mean.shape == (50, 1) and post.variance.shape == (50, 1)
    assert post.draws.shape == (18, 50, 1)  # 3 members x 6 draws, over the whole pool
    assert bool((post.variance > 0).all())
    # members differ (bootstrap + seeds): per-member means are not all equal
    per_member = ens.predict(pool)  # (3, 50, 1)
    assert float(per_member.std(0).mean()) > 0
    assert torch.allclose(per_member.double().mean(0), post.mean, rtol=1e-4, atol=1e-4)
    # chunked scoring (predict_chunk 16) gives the draws of one function per sample
    head_chunk = ens.predict_posterior(pool[:16]).draws
    assert torch.allclose(head_chunk, post.draws[:, :16], atol=1e-6)
    # the mixture variance is at least the members' mean noise-free spread
    assert bool(
        (
            post.variance.squeeze(-1) + 1e-9 >= per_member.double().var(0, correction=0).squeeze(-1)
        ).all()
    )

    ens.save(tmp_path / "ens")
    again = CloudEnsemble.load(tmp_path / "ens")
    post2 = again.predict_posterior(pool)
    assert torch.allclose(post2.mean, post.mean, atol=1e-6)
    assert torch.allclose(post2.draws, post.draws, atol=1e-6)


def test_bayesian_head_needs_a_regression_head() -> None:
    with pytest.raises(ConfigError, match="bayesian_head needs a regression head"):
        CloudEnsemble.create(None, 2, "debye", 1, _config(debye_output="theta"))
