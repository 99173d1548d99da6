"""``surrogate.kind: auto`` on real SCOPE strings: prequential scores, the choice, recalibration, save/load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from loop.acquisition import select_batch
from loop.auto_surrogate import (
    AutoSurrogate,
    PrequentialRecord,
    Recalibration,
    calibrated_log_likelihood,
)
from loop.campaign import Campaign
from loop.config import parse_config
from loop.store import CampaignStore
from loop.surrogate import Surrogate, build_surrogate
from tests.loop.cv_data import cv_rows, cv_scopes, write_cv_pool


def _record(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor) -> PrequentialRecord:
    rec = PrequentialRecord()
    rec.extend(mean.view(-1, 1), std.view(-1, 1), y.view(-1, 1))
    return rec


def test_calibrated_likelihood_forgives_a_global_scale_but_not_misplaced_uncertainty() -> None:
    gen = torch.Generator().manual_seed(0)
    std = 0.2 + torch.rand(400, generator=gen, dtype=torch.float64)  # heteroscedastic
    y = torch.randn(400, generator=gen, dtype=torch.float64) * std
    mean = torch.zeros(400, dtype=torch.float64)
    honest, a_honest = calibrated_log_likelihood(_record(mean, std, y), 1e-9)
    # the same model, ten times overconfident: the fitted scale undoes it exactly
    proud, a_proud = calibrated_log_likelihood(_record(mean, std / 10, y), 1e-9)
    assert a_honest == pytest.approx(1.0, abs=0.1) and a_proud == pytest.approx(10 * a_honest)
    assert proud == pytest.approx(honest, abs=1e-9)
    # uninformative stds cost no more than the squared error of the mean alone
    noisy = std * torch.rand(400, generator=gen, dtype=torch.float64).mul(6).exp()
    const = calibrated_log_likelihood(_record(mean, torch.ones(400, dtype=torch.float64), y), 1e-9)[
        0
    ]
    assert calibrated_log_likelihood(_record(mean, noisy, y), 1e-9)[0] >= const - 1e-9
    # stds that do not follow the errors (shuffled) are worse
    shuffled = std[torch.randperm(400, generator=gen)]
    assert calibrated_log_likelihood(_record(mean, shuffled, y), 1e-9)[0] < honest - 0.05
    # a mean that ranks right but is off in offset and scale is forgiven that, not its noise
    signal = torch.randn(400, generator=gen, dtype=torch.float64)
    target = signal + 0.3 * torch.randn(400, generator=gen, dtype=torch.float64)
    ones = torch.ones(400, dtype=torch.float64)
    right = calibrated_log_likelihood(_record(signal, ones, target), 1e-9)[0]
    skewed = calibrated_log_likelihood(_record(5.0 + 0.1 * signal, ones, target), 1e-9)[0]
    assert skewed == pytest.approx(right, abs=0.01)  # the slope's N(1, 1) prior costs little
    assert right > calibrated_log_likelihood(_record(0 * signal, ones, target), 1e-9)[0] + 0.5
    # NaN values are skipped, not scored
    rec = _record(mean[:3], std[:3], torch.tensor([0.1, math.nan, 0.2], dtype=torch.float64))
    assert len(rec) == 2


def test_the_slope_prior_keeps_a_batch_of_nearly_equal_means_on_the_model_s_scale() -> None:
    """Eight picks whose predicted means are within 1e-4 of each other (std 0.05): without
    the prior any slope fits them and the next candidates' means are thrown far off; with it
    the slope stays near 1 and a calibrated model's next values stay inside its intervals."""
    from loop.auto_surrogate import recalibrate

    gen = torch.Generator().manual_seed(4)
    std = torch.full((8,), 0.05, dtype=torch.float64)
    mean = -154.5578 + 1e-4 * torch.rand(8, generator=gen, dtype=torch.float64)
    y = mean + 0.05 * torch.randn(8, generator=gen, dtype=torch.float64)  # a calibrated model
    record = _record(mean, std, y)
    shrunk = recalibrate(record, 1, 1e-9)
    plain = recalibrate(record, 1, 1e-9, shrink=False)
    assert abs(shrunk.beta[0] - 1.0) < 0.01
    assert abs(plain.beta[0] - 1.0) > 10 or plain.beta[0] == pytest.approx(0.05)
    # the next candidates lie 0.1 eV/atom apart in predicted mean, as a campaign's do
    nxt = -154.5578 + torch.linspace(-0.1, 0.1, 200, dtype=torch.float64)
    y_next = nxt + 0.05 * torch.randn(200, generator=gen, dtype=torch.float64)
    sd_next = torch.full((200,), 0.05, dtype=torch.float64)

    def coverage(recal: object) -> float:
        mu, sd = recal.apply(nxt.view(-1, 1), sd_next.view(-1, 1))  # type: ignore[attr-defined]
        return float(((y_next - mu[:, 0]).abs() <= 1.645 * sd[:, 0]).double().mean())

    assert coverage(shrunk) > 0.8 > coverage(plain)


def _cv(data_dir: Path, n: int = 50) -> tuple[list[str], torch.Tensor]:
    return cv_scopes(data_dir, n)


def _auto_config(**surrogate: object) -> dict:
    return {
        "name": "auto",
        "pool": {"file": "x.csv", "structure_format": "scope"},
        "objective": {"target": "cv", "sense": "maximize"},
        "surrogate": {
            "kind": "auto",
            "candidates": ["gp", "cloud_ensemble"],
            "checkpoint": None,
            "n_members": 3,
            "ensemble": {"model_size": "tiny", "epochs": 10, "warm_start_epochs": 4},
            **surrogate,
        },
    }


def test_auto_scores_members_before_they_see_the_rows_and_round_trips(
    data_dir: Path, tmp_path: Path
) -> None:
    scopes, y = _cv(data_dir)
    config = parse_config(_auto_config())
    auto = build_surrogate(config, scopes, len(scopes))
    assert isinstance(auto, AutoSurrogate) and list(auto.members) == ["gp", "cloud_ensemble"]
    auto.min_evidence = 12  # the prequential choice after one batch of 12 (default: 24 values)
    first = torch.arange(16)
    metrics = auto.fit(first, y[first])
    # nothing scored yet: the fallback decides, its stds calibrated by its leave-one-out
    # predictions of the 16 training rows (the ensemble has none to offer)
    assert auto.chosen == "gp" and not auto.recal.is_identity
    assert set(auto._held_out) == {"gp"} and len(auto._held_out["gp"]) == 16
    assert auto.recals["cloud_ensemble"].is_identity
    assert all(len(r) == 0 for r in auto.records.values())
    # what each member predicted for the next rows before they were measured
    nxt = torch.arange(16, 28)
    before = {n: m.mean_std(nxt) for n, m in auto.members.items()}
    metrics = auto.fit(torch.arange(28), y[:28])
    for name, (mean, std) in before.items():
        rec = auto.records[name]
        assert len(rec) == 12
        assert torch.allclose(torch.tensor(rec.mean, dtype=torch.float64), mean.view(-1))
        assert torch.allclose(torch.tensor(rec.std, dtype=torch.float64), std.view(-1))
    best = max(auto.scores, key=auto.scores.__getitem__)
    assert auto.chosen == best and metrics["chosen_index"] == list(auto.members).index(best)
    assert {"gp.prequential_ll", "cloud_ensemble.prequential_ll", "recal_spread"} <= set(metrics)
    # the choice acts through the chosen member, mapped by its recalibration
    assert not auto.recal.is_identity
    idx = torch.arange(28, 50)
    m_auto, s_auto = auto.mean_std(idx)
    m_member, s_member = auto.members[best].mean_std(idx)
    m_recal, s_recal = auto.recal.apply(m_member, s_member)
    assert torch.allclose(m_auto, m_recal) and torch.allclose(s_auto, s_recal)
    assert auto.recal.beta[0] >= 0.05 and auto.recal.spread[0] > 0
    draws = auto.samples(idx)
    assert draws.shape[1:] == (22, 1) and draws.shape[0] >= 2

    def choose(surrogate: Surrogate, q: int, shortlist: int) -> set[int]:
        picks = select_batch(
            kind="qlogei",
            surrogate=surrogate,
            spec=config.objective_spec(),
            q=q,
            available=idx,
            pending=torch.tensor([], dtype=torch.long),
            measured_idx=torch.arange(28),
            measured_y=y[:28],
            generator=torch.Generator().manual_seed(0),
            beta=2.0,
            shortlist=shortlist,
        )
        return {p.index for p in picks}

    picks = choose(auto, 4, config.acquisition.shortlist_for(auto.active_name))
    assert len(picks) == 4 and all(28 <= i < 50 for i in picks)
    # the acquisition sees the member's own belief; the recalibrated one is there to be read
    assert torch.equal(draws, auto.members[best].samples(idx))
    m_own, s_own = auto.decision_mean_std(idx)
    assert torch.equal(m_own, m_member) and torch.equal(s_own, s_member)
    assert not torch.allclose(s_own, s_auto)
    calibrated = auto.calibrated_model()
    assert calibrated is not None
    post = calibrated.posterior(idx.to(torch.float64).view(-1, 1, 1))
    assert torch.allclose(post.mean.reshape(-1, 1), m_auto, atol=1e-6)
    # save / load: same choice, scale and beliefs
    auto.save(tmp_path / "v2")
    restored = build_surrogate(config, scopes, len(scopes))
    assert isinstance(restored, AutoSurrogate)
    restored.min_evidence = 12
    restored.load(tmp_path / "v2")
    assert restored.chosen == auto.chosen and restored.recal == auto.recal
    m2, s2 = restored.mean_std(idx)
    assert torch.allclose(m_auto, m2, atol=1e-6) and torch.allclose(s_auto, s2, atol=1e-6)

    # the closed-form screen of a pool larger than the shortlist ranks on the chosen GP's own
    # belief: under a map that moves every reported mean far below the best value (the
    # reported expected improvement then rewards the widest candidates) it shortlists what
    # the GP alone does (q = shortlist, so the batch is the shortlist; an ensemble is screened
    # on its draws, so the GP is the member chosen here)
    auto.chosen = "gp"
    m_gp, s_gp = auto.members["gp"].mean_std(idx)
    shift = -10.0 * float(s_gp.max())
    auto.recals["gp"] = Recalibration(auto.recal.ll, (shift,), (1.0,), (1.0,))
    assert torch.allclose(auto.mean_std(idx)[0], m_gp + shift)
    assert choose(auto, 2, 2) == choose(auto.members["gp"], 2, 2)


def test_auto_switches_to_the_member_whose_predictions_were_likelier(data_dir: Path) -> None:
    """A property of the SCOPE string's symmetry alone: composition cannot explain it."""
    scopes, _ = _cv(data_dir)
    config = parse_config(_auto_config(candidates=["gp", "gp_cloud"], checkpoint="default"))
    auto = build_surrogate(config, scopes, len(scopes))
    assert isinstance(auto, AutoSurrogate)
    cloud = auto.members["gp_cloud"].features[:, -16:]  # type: ignore[attr-defined]
    target = (cloud[:, :1] + 0.5 * cloud[:, 1:2] ** 2).to(torch.float64)
    auto.fit(torch.arange(20), target[:20])
    auto.fit(torch.arange(35), target[:35])
    assert auto.scores["gp_cloud"] > auto.scores["gp"]
    assert auto.chosen == "gp_cloud" and auto.active_name == "gp_cloud"
    # a GP's recalibrated posterior: the affine map on its mean, its draws mapped the same way
    idx = torch.arange(35, 50)
    mean, std = auto.mean_std(idx)
    post = auto.calibrated_model().posterior(idx.to(torch.float64).view(-1, 1, 1))  # type: ignore[union-attr]
    assert torch.allclose(post.mean.reshape(-1, 1), mean, atol=1e-6)
    assert torch.allclose(post.variance.reshape(-1, 1).sqrt(), std, atol=1e-6)
    assert post.rsample(torch.Size([3])).shape == (3, 15, 1, 1)


def test_auto_config_needs_two_different_candidates() -> None:
    from cloud_model.errors import ConfigError

    with pytest.raises(ConfigError, match="candidates"):
        parse_config(_auto_config(candidates=["gp"]))
    with pytest.raises(ConfigError, match="candidates"):
        parse_config(_auto_config(candidates=["gp", "gp"]))
    with pytest.raises(ConfigError, match="gp_cloud needs"):
        parse_config(_auto_config(candidates=["gp", "gp_cloud"]))


def test_auto_campaign_records_which_model_chose_each_candidate(
    data_dir: Path, tmp_path: Path
) -> None:
    pool = write_cv_pool(tmp_path / "pool.csv", cv_rows(data_dir, 60))
    data = _auto_config()
    data["pool"] = {
        "file": str(pool),
        "id_column": "id",
        "structure_column": "scope",
        "structure_format": "scope",
    }
    data.update(
        acquisition={"kind": "qlogei", "batch_size": 4},
        initial_design={"n_random": 8},
        budget={"experiments": 24},
        adapter={"kind": "simulated", "seed": 1, "capacity": 4, "noise": {"sigma": 1.0}},
        dispatch={"mode": "inline", "wait_for": "all", "poll_interval_s": 0.01},
        finetune={"every_n_results": 4},
    )
    Campaign(parse_config(data), tmp_path / "run").run()
    with CampaignStore(tmp_path / "run", create=False) as store:
        decisions = store.decisions()
    chosen = [c for d in decisions if d["acquisition"] == "qlogei" for c in d["chosen"]]
    assert len(chosen) == 16
    assert {c.surrogate for c in chosen} <= {"gp", "cloud_ensemble"}
    assert chosen[0].surrogate == "gp"  # nothing scored before the first model decision
    assert all(c.predicted_std is not None for c in chosen)
    # every refit's picks are scored against what was predicted of them, in the report too
    from loop.calibration import calibration_by_version, pick_calibration
    from loop.report import write_report

    with CampaignStore(tmp_path / "run", create=False) as store:
        values = {m.candidate_id: m.values["cv"].value for m in store.measurements()}
    per_version = calibration_by_version(decisions, values)
    overall = pick_calibration(decisions, values)
    assert overall is not None and overall.n == sum(c.n for c in per_version)
    assert all(0.0 <= c.coverage90 <= 1.0 and c.mean_std > 0 for c in per_version)
    report = write_report(tmp_path / "run").read_text()
    assert "Calibration per model version" in report
    assert (tmp_path / "run" / "report" / "calibration_by_version.png").is_file()
    for c in per_version:
        assert f"| v{c.version} | {c.surrogate} | {c.n} |" in report


def test_calibration_scores_predictions_against_measurements() -> None:
    from loop.calibration import calibration_by_version, pick_calibration
    from loop.store import ChosenCandidate

    def pick(cid: str, mean: float, sd: float) -> ChosenCandidate:
        return ChosenCandidate(
            candidate_id=cid, predicted_mean=[mean], predicted_std=[sd], surrogate="gp"
        )

    decisions = [
        {"model_version": 1, "chosen": [pick("a", 0.0, 1.0), pick("b", 0.0, 1.0)]},
        {"model_version": 2, "chosen": [pick("c", 1.0, 0.5), pick("d", 5.0, 0.1)]},
        {"model_version": None, "chosen": [ChosenCandidate(candidate_id="e")]},  # initial design
    ]
    measured = {"a": 0.5, "b": 3.0, "c": 1.0, "d": 5.0, "e": 9.0}
    v1, v2 = calibration_by_version(decisions, measured)
    assert (v1.version, v1.n, v1.coverage90, v1.mae) == (1, 2, 0.5, 1.75)
    assert v2.coverage90 == 1.0 and v2.mean_std == pytest.approx(0.3)
    nll_a = 0.5 * 0.25 + 0.5 * math.log(2 * math.pi)
    nll_b = 0.5 * 9.0 + 0.5 * math.log(2 * math.pi)
    assert v1.nll == pytest.approx((nll_a + nll_b) / 2)
    overall = pick_calibration(decisions, measured)
    assert overall is not None and overall.n == 4 and overall.coverage90 == 0.75


def test_multi_fidelity_calibration_scores_only_the_highest_fidelity_picks() -> None:
    """A cheap pick's stored prediction is the DFT one: scoring it against CHGNet is wrong."""
    from loop.calibration import calibration_by_version, pick_calibration
    from loop.store import ChosenCandidate

    def pick(cid: str, fidelity: str) -> ChosenCandidate:
        return ChosenCandidate(
            candidate_id=cid, predicted_mean=[0.0], predicted_std=[1.0], fidelity=fidelity
        )

    decisions = [
        {"model_version": 1, "chosen": [pick("a", "dft"), pick("b", "chgnet")]},
        {"model_version": 2, "chosen": [pick("c", "chgnet")]},  # a version with no DFT pick
    ]
    dft = {"a": 0.5, "b": 0.1}  # b was measured at DFT later, by another decision
    (v1,) = calibration_by_version(decisions, dft, "dft")
    assert (v1.version, v1.n, v1.mae) == (1, 1, 0.5)
    overall = pick_calibration(decisions, dft, fidelity="dft")
    assert overall is not None and overall.n == 1
    assert pick_calibration(decisions, dft).n == 2  # type: ignore[union-attr]  # unfiltered
    assert pick_calibration(decisions, {"c": 0.0}, fidelity="dft") is None


def test_spread_is_the_split_conformal_quantile() -> None:
    from loop.auto_surrogate import _conformal

    z = torch.arange(1, 101, dtype=torch.float64)  # 1..100
    assert _conformal(z) == 91.0  # ceil(0.9 * 101) = 91st smallest
    assert _conformal(z[:10]) == 10.0  # few values: the largest


def test_held_out_z_is_the_leave_one_out_refit() -> None:
    """The closed form equals refitting the weighted line and the scale without each value."""
    from loop.auto_surrogate import _held_out_z

    gen = torch.Generator().manual_seed(3)
    n = 12
    mean = torch.randn(n, generator=gen, dtype=torch.float64)
    y = 0.3 + 0.7 * mean + 0.4 * torch.randn(n, generator=gen, dtype=torch.float64)
    w = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    iw = 1 / w

    def line(keep: torch.Tensor, fixed: float | None) -> tuple[float, float]:
        a = iw[keep]
        mw = float((a * mean[keep]).sum() / a.sum())
        yw = float((a * y[keep]).sum() / a.sum())
        if fixed is not None:
            return yw - fixed * mw, fixed
        b = float(
            (a * (mean[keep] - mw) * (y[keep] - yw)).sum() / (a * (mean[keep] - mw) ** 2).sum()
        )
        return yw - b * mw, b

    for fixed in (None, 0.05):
        alpha, beta = line(torch.ones(n, dtype=torch.bool), fixed)
        z = _held_out_z(mean, y - alpha - beta * mean, w, fixed_slope=fixed is not None, floor=1e-9)
        for i in range(n):
            keep = torch.arange(n) != i
            a_i, b_i = line(keep, fixed)
            r_i = y[i] - a_i - b_i * mean[i]
            r_all = y - alpha - beta * mean
            c_i = float((r_all[keep] ** 2 / w[keep]).mean())
            assert float(z[i]) == pytest.approx(abs(float(r_i)) / math.sqrt(c_i * float(w[i])))


def test_recalibrate_reads_the_spread_from_held_out_residuals() -> None:
    """Few values, a fitted line: leave-one-out residuals give wider intervals than in-sample."""
    from loop.auto_surrogate import PrequentialRecord, recalibrate

    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(10, 1, generator=gen, dtype=torch.float64)
    y = 2.0 * mean + 0.5 * torch.randn(10, 1, generator=gen, dtype=torch.float64)
    record = PrequentialRecord()
    record.extend(mean, torch.full_like(mean, 0.3), y, own=True)
    shipped = recalibrate(record, 1, 1e-9)
    in_sample = recalibrate(record, 1, 1e-9, held_out=False, adaptive=False)
    assert shipped.alpha == in_sample.alpha and shipped.beta == in_sample.beta
    assert shipped.ll == in_sample.ll  # the choice between models is unchanged
    assert shipped.spread[0] > 1.1 * in_sample.spread[0]


def test_adaptive_level_widens_after_drift_and_matches_split_without_it() -> None:
    from loop.auto_surrogate import _adaptive_conformal_90, _conformal

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(80, generator=gen, dtype=torch.float64).abs()
    drift = torch.cat([z[:40], 3 * z[40:]])  # the later picks are three times harder
    assert _adaptive_conformal_90(drift) > _conformal(drift)
    assert _adaptive_conformal_90(z[:10]) == _conformal(z[:10]) == float(z[:10].max())


def test_bayesian_head_ensemble_gives_joint_draws_and_noisy_moments(
    data_dir: Path, tmp_path: Path
) -> None:
    scopes, y = _cv(data_dir)
    config = parse_config(
        _auto_config(
            kind="cloud_ensemble",
            ensemble={
                "model_size": "tiny",
                "epochs": 10,
                "warm_start_epochs": 4,
                "bayesian_head": True,
                "bootstrap": True,
                "head_draws": 4,
            },
        )
    )
    surrogate = build_surrogate(config, scopes, len(scopes))
    surrogate.fit(torch.arange(20), y[:20])
    idx = torch.arange(20, 50)
    draws = surrogate.samples(idx)
    assert draws.shape == (12, 30, 1)  # 3 members x 4 joint draws each
    mean, std = surrogate.mean_std(idx)
    # reported moments are the mixture's, noise included: wider than the draws' spread
    assert bool((std + 1e-9 >= draws.std(0, correction=0)).all())
    assert torch.allclose(mean, draws.mean(0), atol=float(std.max()))
    picks = select_batch(
        kind="qlogei",
        surrogate=surrogate,
        spec=config.objective_spec(),
        q=3,
        available=idx,
        pending=torch.tensor([], dtype=torch.long),
        measured_idx=torch.arange(20),
        measured_y=y[:20],
        generator=torch.Generator().manual_seed(0),
        beta=2.0,
        shortlist=config.acquisition.shortlist_for(surrogate.active_name),
    )
    assert len({p.index for p in picks}) == 3
    surrogate.save(tmp_path / "s")
    again = build_surrogate(config, scopes, len(scopes))
    again.load(tmp_path / "s")
    m2, s2 = again.mean_std(idx)
    assert torch.allclose(m2, mean, atol=1e-6) and torch.allclose(s2, std, atol=1e-6)
    assert torch.allclose(again.samples(idx), draws, atol=1e-6)


def test_a_mean_without_signal_keeps_the_level_of_the_values() -> None:
    """A constant prediction far from zero (carbon_24's GP: -9 eV/atom) is mapped onto the
    values' level; the floored slope gets its own intercept."""
    from loop.auto_surrogate import recalibrate

    gen = torch.Generator().manual_seed(0)
    rec = PrequentialRecord()
    y = -9.5 + 0.1 * torch.randn(30, 1, generator=gen, dtype=torch.float64)
    rec.extend(
        torch.full((30, 1), -9.0, dtype=torch.float64),
        torch.full((30, 1), 0.01, dtype=torch.float64),
        y,
    )
    recal = recalibrate(rec, 1, 1e-9)
    mean, std = recal.apply(
        torch.tensor([[-9.0]], dtype=torch.float64), torch.tensor([[0.01]], dtype=torch.float64)
    )
    assert abs(float(mean) - float(y.mean())) < 1e-6
    inside = ((y - mean).abs() <= 1.645 * std).double().mean()
    assert 0.85 <= float(inside) <= 1.0
