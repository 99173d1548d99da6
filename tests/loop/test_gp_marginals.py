"""The chunked marginal GP predictor equals BoTorch's posterior for every GP kind."""

from __future__ import annotations

import pytest
import torch

from loop.gp_blocks import TransferGPSurrogate
from loop.gp_marginals import MarginalPredictor
from loop.surrogate import GPSurrogate


@pytest.mark.parametrize("kind", ["gp", "gp_transfer"])
@pytest.mark.parametrize("m", [1, 2])
def test_marginals_match_the_posterior(kind: str, m: int) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(600, 9, generator=gen, dtype=torch.float64) * 3 + 1
    y = (x @ torch.randn(9, m, generator=gen, dtype=torch.float64)).sin() * 5 + 2
    s = (
        GPSurrogate(x[:, :6], seed=0)
        if kind == "gp"
        else TransferGPSurrogate(x, [(0, 6), (6, 9)], seed=0)
    )
    s.fit(torch.arange(40), y[:40])
    gp = s.model().base
    test = s.features[100:400]
    with torch.no_grad():
        post = gp.posterior(test)
        mean, var = MarginalPredictor.from_model(gp)(test)
    assert mean.shape == var.shape == (300, m)
    assert torch.allclose(mean, post.mean, atol=1e-8, rtol=1e-8)
    assert torch.allclose(var, post.variance, atol=1e-10, rtol=1e-6)
    # the surrogate's chunked mean/std is the same thing
    mean_s, std_s = s.mean_std(torch.arange(100, 400))
    assert torch.allclose(mean_s, mean) and torch.allclose(std_s, var.sqrt())
    empty_mean, empty_std = s.mean_std(torch.arange(0))
    assert empty_mean.shape == (0, m) and empty_std.shape == (0, m)
    # a pick's stored prediction is of its measurement: BoTorch's noisy posterior
    with torch.no_grad():
        noisy = gp.posterior(test, observation_noise=True)
    out_mean, out_std = s.outcome_mean_std(torch.arange(100, 400))
    assert torch.allclose(out_mean, mean)
    assert torch.allclose(out_std.pow(2), noisy.variance, atol=1e-10, rtol=1e-6)
    assert bool((out_std > std_s).all())


@pytest.mark.parametrize("kind", ["qlogei", "qucb"])
def test_analytic_screen_ranks_like_the_draws(kind: str) -> None:
    from loop.acquisition import EnsembleMemberSampler, _analytic_screen, _build_acqf
    from loop.objective import Bound, ObjectiveSpec
    from loop.surrogate import LookupEnsembleModel

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(500, 4, generator=gen, dtype=torch.float64)
    y = torch.stack([(x[:, 0] * 2).sin() + x[:, 1], x[:, 2]], dim=1)
    s = GPSurrogate(x, seed=0, n_samples=2048)
    s.fit(torch.arange(30), y[:30])
    bounds = () if kind == "qucb" else (Bound(1, -1.0, 1.0),)
    spec = ObjectiveSpec(targets=("a", "b"), primary=0, sense="minimize", constraints=bounds)
    avail = torch.arange(30, 500)
    exact = _analytic_screen(kind, s, spec, avail, y[:30], 2.0)
    assert exact is not None and exact.shape == (470,)
    draws = LookupEnsembleModel(s.samples(avail))
    acqf = _build_acqf(
        kind, draws, spec, torch.arange(0), y[:30], None, 2.0, EnsembleMemberSampler(2048)
    )
    mc = torch.cat(
        [acqf(c) for c in torch.arange(470.0, dtype=torch.float64).view(-1, 1, 1).split(100)]
    )
    # where Monte Carlo resolves the value (not far in the tail) the two agree
    resolved = exact > -6.0
    assert int(resolved.sum()) >= 8
    assert torch.allclose(exact[resolved], mc[resolved], atol=0.2)
    top_exact = set(torch.topk(exact, 8).indices.tolist())
    assert len(top_exact & set(torch.topk(mc, 8).indices.tolist())) >= 7
    # Pareto or window objectives keep the draws
    window = ObjectiveSpec(targets=("a", "b"), primary=0, sense="window", window=(0.0, 1.0))
    assert _analytic_screen(kind, s, window, avail, y[:30], 2.0) is None


def test_leave_one_out_matches_refitting_without_the_row() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    y = (x[:, :1] * 2).sin() * 3 + 1 + 0.1 * torch.randn(200, 1, generator=gen, dtype=torch.float64)
    s = GPSurrogate(x, seed=0)
    s.fit(torch.arange(25), y[:25])
    idx, mean, std = s.held_out()
    assert torch.equal(idx, torch.arange(25)) and mean.shape == std.shape == (25, 1)
    gp = s.model().base
    pred = MarginalPredictor.from_model(gp)
    k = pred.chol[0] @ pred.chol[0].T  # K + noise I, standardised
    r = (gp.train_targets - gp.mean_module(pred.train_x[0])).detach()
    tf = gp.outcome_transform
    for i in (0, 7, 24):
        keep = torch.tensor([j for j in range(25) if j != i])
        k_i = k[keep][:, i]
        sol = torch.linalg.solve(k[keep][:, keep], torch.stack([r[keep], k_i], dim=1))
        m_i = float(gp.mean_module(pred.train_x[0][i : i + 1]).detach()) + float(k_i @ sol[:, 0])
        latent = float(k[i, i] - gp.likelihood.noise.detach()) - float(k_i @ sol[:, 1])
        assert abs(float(mean[i, 0]) - (m_i * float(tf.stdvs) + float(tf.means))) < 1e-6
        assert abs(float(std[i, 0]) - latent**0.5 * float(tf.stdvs)) < 1e-6


def test_tied_screen_values_are_ordered_at_random() -> None:
    from loop.acquisition import _analytic_screen
    from loop.objective import ObjectiveSpec

    x = torch.ones(400, 3, dtype=torch.float64)  # identical features: every candidate ties
    y = torch.randn(400, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = GPSurrogate(x, seed=0)
    s.fit(torch.arange(16), y[:16])
    spec = ObjectiveSpec(targets=("a",), primary=0, sense="maximize")
    avail = torch.arange(16, 400)
    gen = torch.Generator().manual_seed(0)
    top = torch.topk(_analytic_screen("qlogei", s, spec, avail, y[:16], 2.0, gen), 64).indices
    assert int((top >= 64).sum()) > 32  # not the pool's first rows


@pytest.mark.parametrize("kind", ["gp", "gp_transfer"])
def test_factorised_joint_posterior_matches_the_model(kind: str) -> None:
    """Past 800 conditioning rows the acquisition's joint posteriors come from the cached
    factorisation (FactorisedGP): the same means and covariances as the GP's own."""
    from loop.gp_marginals import FactorisedGP

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1200, 5, generator=gen, dtype=torch.float64)
    y = (x[:, :1] * 1.5).sin() + x[:, 1:2] * x[:, 2:3] + 0.05 * torch.randn(1200, 1, generator=gen)
    kw = {"seed": 0, "max_train": 60, "max_condition": 1000, "n_pool": 200}
    s = (
        GPSurrogate(x[:, :4], **kw)
        if kind == "gp"
        else TransferGPSurrogate(x, [(0, 4), (4, 5)], **kw)
    )
    s.fit(torch.cat([torch.arange(10), torch.arange(200, 1200)]), torch.cat([y[:10], y[200:]]))
    model = s.model()
    assert isinstance(model.base, FactorisedGP)
    gp = s._model.base if s._model is not None else None
    X = s.features[torch.arange(10, 34)].reshape(8, 3, -1)  # 8 q-batches of 3
    for noise in (False, True):
        with torch.no_grad():
            ours = model.base.posterior(X, observation_noise=noise)
            theirs = gp.posterior(X, observation_noise=noise)
        assert ours.mean.shape == theirs.mean.shape == (8, 3, 1)
        assert torch.allclose(ours.mean, theirs.mean, atol=1e-7)
        cov_ours = ours.distribution.covariance_matrix
        cov_theirs = theirs.distribution.covariance_matrix
        assert torch.allclose(cov_ours, cov_theirs, atol=1e-7)
    # and the index-addressed model the acquisition sees draws from it
    draws = model.posterior(torch.arange(10, 16.0).view(2, 3, 1)).rsample(torch.Size([4]))
    assert draws.shape == (4, 2, 3, 1) and torch.isfinite(draws).all()
