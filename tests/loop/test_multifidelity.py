"""Multi-fidelity campaigns: config, store, ICM GP surrogate, cost-aware acquisition, resume."""

from __future__ import annotations

import csv
import functools
import sqlite3
from pathlib import Path

import pytest
import torch

from cloud_model.errors import ConfigError
from loop.campaign import Campaign
from loop.config import parse_config
from loop.mf_acquisition import select_pairs
from loop.mf_surrogate import MultiFidelityGPSurrogate
from loop.store import CampaignStore

N_POOL = 40


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    """40 cloud_cv crystals (SCOPE + heat capacity) and a cheap fidelity = 0.5 cv + 10."""
    rows = list(csv.DictReader((data_dir / "cloud" / "cloud_cv_train_and_val.csv").open()))
    rows = rows[:N_POOL]
    root = tmp_path_factory.mktemp("mf")
    pool, low = root / "pool.csv", root / "low.csv"
    with pool.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "scope", "cv"])
        w.writerows([f"cv-{i}", r["cloud"], r["cv"]] for i, r in enumerate(rows))
    with low.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "value"])
        w.writerows([f"cv-{i}", 0.5 * float(r["cv"]) + 10.0] for i, r in enumerate(rows))
    return pool, low


def store_decisions(out: Path) -> list[dict]:
    with CampaignStore(out, create=False) as store:
        return store.decisions()


def _config(pool: Path, low: Path, **overrides: object) -> dict:
    data: dict = {
        "name": "mftest",
        "seed": 2,
        "pool": {
            "file": str(pool),
            "id_column": "id",
            "structure_column": "scope",
            "structure_format": "scope",
        },
        "objective": {"target": "cv", "sense": "maximize"},
        "surrogate": {"kind": "gp"},
        "acquisition": {"kind": "qlogei", "batch_size": 4},
        "initial_design": {"n_random": 4},
        "budget": {"experiments": 1000, "cost": 70},
        "fidelities": [
            {"name": "dft", "cost": 10},
            {"name": "cheap", "cost": 1, "simulated": {"file": str(low), "id_column": "id"}},
        ],
        "adapter": {"kind": "simulated", "seed": 1, "capacity": 4, "noise": {"sigma": 0.0}},
        "dispatch": {"mode": "inline", "wait_for": "all"},
        "finetune": {"every_n_results": 12},
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return data


# ---------------------------------------------------------------- synthetic, acquisition level
@functools.cache
def _correlated_surrogate(n: int = 300, n_high: int = 10, n_low: int = 10) -> tuple:
    """An ICM GP on two perfectly correlated fidelities (cheap = 3 f - 2) after an initial
    design of the same candidates at both (fitted once)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    f = torch.sin(6 * X[:, 0]) + X[:, 1] ** 2 - X[:, 2]
    s = MultiFidelityGPSurrogate(X, 2, seed=0)
    high = torch.arange(n_high)
    low = torch.arange(n_low)
    idx = torch.cat([s.combine(high, torch.zeros_like(high)), s.combine(low, torch.ones_like(low))])
    y = torch.cat([f[high], 3 * f[low] - 2]).unsqueeze(-1)
    # botorch's fit retries from prior draws of torch's global generator when L-BFGS warns:
    # seeded, the fit is the same every run (unseeded, the correlation below was 0.977-0.99)
    torch.manual_seed(0)
    s.fit(idx, y)
    return s, f, high, low


def _available(n: int, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    pairs = [(i, k) for k in (0, 1) for i in range(n)]
    taken = {(int(i), 0) for i in high} | {(int(i), 1) for i in low}
    return torch.tensor([p for p in pairs if p not in taken])


def test_perfectly_correlated_fidelities_make_the_cheap_one_win() -> None:
    s, f, high, low = _correlated_surrogate()
    assert float(s.task_correlation()[0, 1]) > 0.95  # the model learnt the correlation
    picks = select_pairs(
        s,
        q=8,
        available=_available(300, high, low),
        pending=torch.zeros(0, 2, dtype=torch.long),
        best=float(f[high].max()),
        sign=1.0,
        costs=[30.0, 1.0],
        budget_left=1000.0,
    )
    assert len(picks) == 8
    assert sum(p.fidelity == 1 for p in picks) >= 7  # (almost) all early queries are cheap
    assert len({p.row for p in picks}) == 8  # the batch spreads over different candidates


def test_the_cost_budget_is_never_exceeded_with_pending_jobs() -> None:
    s, f, high, low = _correlated_surrogate()
    available = _available(300, high, low)
    pending = torch.tensor([[100, 0], [101, 1]])  # in flight: one expensive, one cheap
    for left in (0.5, 1.0, 12.0, 31.0, 45.0):
        picks = select_pairs(
            s,
            q=16,
            available=available[~torch.isin(available[:, 0], pending[:, 0])],
            pending=pending,
            best=float(f[high].max()),
            sign=1.0,
            costs=[30.0, 1.0],
            budget_left=left,
        )
        spent = sum(30.0 if p.fidelity == 0 else 1.0 for p in picks)
        assert spent <= left
        # a cheap query is made only while a target-fidelity query still fits after it
        assert all(p.fidelity == 0 for p in picks) or left >= 31.0
    # with room for one expensive query and nothing else, that query is made
    picks = select_pairs(
        s, q=4, available=available, pending=pending, best=float(f[high].max()), sign=1.0,
        costs=[30.0, 1.0], budget_left=30.0,
    )  # fmt: skip
    assert [p.fidelity for p in picks] == [0]


def test_surrogate_predicts_the_high_fidelity_and_round_trips(tmp_path: Path) -> None:
    s, f, high, low = _correlated_surrogate(n_high=10, n_low=60)
    mean, std = s.mean_std(torch.arange(300))
    # where only the cheap fidelity was measured, the target is predicted through it
    cheap_only = low[~torch.isin(low, high)]
    assert torch.corrcoef(torch.stack([mean[cheap_only, 0], f[cheap_only]]))[0, 1] > 0.98
    assert float(std[cheap_only].mean()) < float(std[200:].mean())  # and known better
    assert mean.shape == std.shape == (300, 1)
    # a stored pick's prediction is of a DFT measurement: the latent belief plus DFT's noise
    _, _, noise = s.joint(torch.arange(300))
    out_mean, out_std = s.outcome_mean_std(torch.arange(300))
    scale = s._stats[0][1]
    assert torch.allclose(out_mean, mean)
    assert torch.allclose(out_std.pow(2), std.pow(2) + noise.unsqueeze(-1) * scale**2, rtol=1e-5)
    s.save(tmp_path / "v1")
    again = MultiFidelityGPSurrogate(s.features, 2, seed=0)
    again.load(tmp_path / "v1")
    m2, s2 = again.mean_std(torch.arange(300))
    assert torch.allclose(mean, m2) and torch.allclose(std, s2)
    with pytest.raises(Exception, match="fidelities"):
        MultiFidelityGPSurrogate(s.features, 3).load(tmp_path / "v1")


def test_over_the_row_cap_the_cheap_rows_nearest_the_optimum_are_kept() -> None:
    """Past ``max_train`` every highest-fidelity row stays, half the remaining places go to
    the best cheap results for the objective's sense, a seeded share to the others."""
    X = torch.rand(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = torch.arange(100)
    for sense, best in (("minimize", torch.arange(10)), ("maximize", torch.arange(90, 100))):
        s = MultiFidelityGPSurrogate(X, 2, seed=0, max_train=30, sense=sense)
        idx = torch.cat([s.combine(rows[:10], torch.zeros(10)), s.combine(rows, torch.ones(100))])
        y = torch.cat([torch.zeros(10), rows.to(torch.float64)])  # cheap value = row number
        kept, _ = s._subsample(idx, y)
        k_rows, k_fid = s.split(kept)
        assert len(kept) == 30 and int((k_fid == 0).sum()) == 10
        assert set(best.tolist()) <= set(k_rows[k_fid == 1].tolist())
    blind = MultiFidelityGPSurrogate(X, 2, seed=0, max_train=30)
    kept, _ = blind._subsample(idx, y)
    assert len(kept) == 30  # no sense: a seeded share of all cheap rows, as before
    with pytest.raises(ValueError, match="sense"):
        MultiFidelityGPSurrogate(X, 2, sense="window")


def test_the_lmc_kernel_learns_a_correction_the_cheap_fidelity_misses(tmp_path: Path) -> None:
    """cheap = the smooth trend; target = trend + a short-scale term. With the target measured
    on a third of the candidates and the cheap fidelity everywhere, the two-kernel model
    predicts the unmeasured targets better than ICM, and round-trips."""
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(240, 2, generator=gen, dtype=torch.float64)
    trend = 2 * X[:, 0] - X[:, 1]
    target = trend + 0.5 * torch.sin(14 * X[:, 0]) * torch.cos(11 * X[:, 1])
    rows = torch.arange(240)
    high, rest = rows[:80], rows[80:]
    errors = {}
    for kernel in ("icm", "lmc"):
        s = MultiFidelityGPSurrogate(X, 2, seed=0, kernel=kernel)
        idx = torch.cat([s.combine(high, torch.zeros(80)), s.combine(rows, torch.ones(240))])
        y = torch.cat([target[high], trend]).unsqueeze(-1)
        torch.manual_seed(0)
        s.fit(idx, y)
        mean, _ = s.mean_std(rest)
        errors[kernel] = float((mean[:, 0] - target[rest]).abs().mean())
    assert errors["lmc"] < 0.8 * errors["icm"], errors
    corr = s.task_correlation()
    assert corr.shape == (2, 2) and 0.0 < float(corr[0, 1]) < 1.0
    s.save(tmp_path / "lmc")
    again = MultiFidelityGPSurrogate(X, 2, seed=0, kernel="lmc")
    again.load(tmp_path / "lmc")
    assert torch.allclose(again.mean_std(rest)[0], mean)
    with pytest.raises(Exception, match="kernel"):
        MultiFidelityGPSurrogate(X, 2, kernel="icm").load(tmp_path / "lmc")
    with pytest.raises(ValueError, match="kernel"):
        MultiFidelityGPSurrogate(X, 2, kernel="lcm")


# ---------------------------------------------------------------- config
def test_a_config_with_fidelities_round_trips(pools: tuple[Path, Path]) -> None:
    config = parse_config(_config(*pools))
    again = parse_config(config.model_dump(mode="json"))
    assert again == config and again.fingerprint() == config.fingerprint()
    assert config.highest_fidelity == "dft"
    assert config.fidelity_cost("cheap") == 1.0
    single = _config(*pools)
    single.pop("fidelities")
    single["budget"] = {"experiments": 10}
    plain = parse_config(single)
    assert plain.fidelity_names == ("",) and plain.fidelity_cost("") == 1.0
    assert "fidelities" not in plain.model_dump(mode="json") or plain.fidelities == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fidelities": [{"name": "a", "cost": 1}, {"name": "b", "cost": 1}]}, "highest"),
        ({"fidelities": [{"name": "a", "cost": 0}, {"name": "b", "cost": 1}]}, "cost"),
        ({"fidelities": [{"name": "a", "cost": 2}, {"name": "a", "cost": 1}]}, "duplicate"),
        (
            {
                "fidelities": [
                    {"name": "a", "cost": 2, "highest": True},
                    {"name": "b", "cost": 1, "highest": True},
                ]
            },
            "only one",
        ),
        ({"budget": {"experiments": 10}}, "budget.cost"),
        ({"surrogate": {"kind": "cloud_ensemble"}}, "surrogate.kind"),
        (
            {
                "fidelities": [
                    {"name": "a", "cost": 2},
                    {"name": "b", "cost": 1, "outputs": {"x": "y"}},
                ]
            },
            "outputs",
        ),
    ],
)
def test_bad_fidelity_configs_are_errors_naming_the_field(
    pools: tuple[Path, Path], change: dict, message: str
) -> None:
    data = _config(*pools)
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_unknown_column_or_missing_source_fails_before_anything_is_written(
    pools: tuple[Path, Path], tmp_path: Path
) -> None:
    pool, low = pools
    data = _config(pool, low)
    data["fidelities"][1]["simulated"] = {"file": str(low), "value_column": "nope"}
    with pytest.raises(ConfigError, match=r"fidelities\[1\] \(cheap\)\.simulated\.file"):
        Campaign(parse_config(data), tmp_path / "a").prepare()
    data["fidelities"][1].pop("simulated")
    with pytest.raises(ConfigError, match=r"fidelities\[1\] \(cheap\)\.simulated"):
        Campaign(parse_config(data), tmp_path / "b").prepare()
    assert not (tmp_path / "a" / "campaign.sqlite").exists()


# ---------------------------------------------------------------- the campaign and its store
def test_campaign_records_fidelity_and_cost_within_budget_and_resumes(
    pools: tuple[Path, Path], tmp_path: Path
) -> None:
    config = parse_config(_config(*pools))
    out = tmp_path / "run"
    result = Campaign(config, out).run()
    assert result.stop_reason.startswith("cost budget reached")
    with CampaignStore(out, create=False) as store:
        jobs = store.jobs()
        rows = store.fidelity_measurements()
        committed = store.committed_cost()
    assert committed <= 70.0
    assert {j.fidelity for j in jobs} == {"dft", "cheap"}
    assert all(j.cost == (10.0 if j.fidelity == "dft" else 1.0) for j in jobs)
    assert sum(c for _, _, c in rows) == pytest.approx(committed)
    # the cheap fidelity reports cv@cheap = 0.5 cv + 10 (noise-free lab)
    truth = {r["id"]: float(r["cv"]) for r in csv.DictReader(pools[0].open())}
    for m, fidelity, _ in rows:
        name = "cv" if fidelity == "dft" else "cv@cheap"
        want = truth[m.candidate_id] if fidelity == "dft" else 0.5 * truth[m.candidate_id] + 10
        assert m.values[name].value == pytest.approx(want)
    # after the initial design (4 candidates at both fidelities) the cheap one dominates
    later = [j for j in jobs if j.decision_id is not None][8:]
    assert sum(j.fidelity == "cheap" for j in later) >= len(later) // 2
    # what a user reads counts the highest fidelity only: a cheap value is another quantity
    from loop.bench import RunRecord, RunTimings, run_one
    from loop.dashboard.state import snapshot
    from loop.report import summarise

    n_dft = sum(f == "dft" for _, f, _ in rows)
    summary = summarise(out)
    assert summary.n_measured == n_dft < len(rows) and summary.fidelity == "dft"
    assert truth[summary.best_id] == pytest.approx(summary.best_value)
    from loop.report import write_report

    report = write_report(out).read_text()
    n_cheap = len(rows) - n_dft
    assert (
        f"| dft | 10 | {sum(j.fidelity == 'dft' for j in jobs)} | {n_dft} | {10 * n_dft:g} |"
        in report
    )
    assert (
        f"| cheap | 1 | {sum(j.fidelity == 'cheap' for j in jobs)} | {n_cheap} | {n_cheap:g} |"
        in report
    )
    assert f"{n_dft} / " in report  # measured / budget counts the DFT results
    view = snapshot(out)
    assert {j["fidelity"] for j in view["jobs"]} == {"dft", "cheap"}
    for j in view["jobs"]:  # a job row shows its own fidelity's value (cheap: cv@cheap)
        if j["state"] == "SUCCEEDED":
            cv = truth[j["candidate_id"]]
            want = cv if j["fidelity"] == "dft" else 0.5 * cv + 10
            assert j["measured"] == pytest.approx(want)
    dft_picks = {
        c.candidate_id
        for d in store_decisions(out)
        for c in d["chosen"]
        if c.fidelity == "dft" and c.predicted_mean is not None
    }
    scored = {m.candidate_id for m, f, _ in rows if f == "dft"} & dft_picks
    assert sum(c["n"] for c in view["calibration"]) == len(scored)
    # a finished benchmark run is not rerun, but its calibration is rescored from its store
    stale = RunRecord(
        name="run", measured_ids=[], submitted_ids=[], stop_reason="done", wall_s=0.0,
        cpu_s=0.0, timings=RunTimings(fit=0, score=0, acquisition=0, dispatch=0),
    )  # fmt: skip
    (out / "result.json").write_text(stale.model_dump_json())
    record = run_one(config.model_dump_json(), str(out))
    assert record["calibration"]["n"] == len(scored)
    assert (
        RunRecord.model_validate_json((out / "result.json").read_text()).calibration
        == (record["calibration"])
    )
    # resume: nothing is run again, the store (fidelity, cost) is as it was
    again = Campaign.resume(out).run()
    assert again.n_submitted == result.n_submitted
    with CampaignStore(out, create=False) as store:
        assert [(j.key, j.fidelity, j.cost) for j in store.jobs()] == [
            (j.key, j.fidelity, j.cost) for j in jobs
        ]


@pytest.mark.slow
def test_killed_campaign_resumes_with_fidelities_and_costs(
    pools: tuple[Path, Path], tmp_path: Path
) -> None:
    """Stop after the first decisions (as a kill would), then resume to the same result."""
    config = parse_config(_config(*pools))
    reference = Campaign(config, tmp_path / "ref").run()

    class Stop(Exception):
        pass

    campaign = Campaign(config, tmp_path / "cut")
    calls = {"n": 0}

    def cut(progress: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        campaign.run(on_progress=cut)
    campaign.store.close() if campaign.store else None
    resumed = Campaign.resume(tmp_path / "cut").run()
    assert resumed.n_submitted == reference.n_submitted
    with (
        CampaignStore(tmp_path / "ref", create=False) as a,
        CampaignStore(tmp_path / "cut", create=False) as b,
    ):
        assert sorted((j.key, j.cost) for j in a.jobs()) == sorted(
            (j.key, j.cost) for j in b.jobs()
        )
        assert a.committed_cost() == b.committed_cost()


def test_a_schema_1_store_is_migrated_and_stays_readable(tmp_path: Path) -> None:
    """A store written before fidelities existed opens, keeps its rows, costs 1 each."""
    path = tmp_path / "campaign.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE jobs (key TEXT PRIMARY KEY, candidate_id TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL, handle TEXT, decision_id INTEGER, message TEXT,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
        CREATE TABLE measurements (key TEXT PRIMARY KEY, candidate_id TEXT NOT NULL UNIQUE,
            measurement TEXT NOT NULL, recorded_at TEXT NOT NULL, seq INTEGER NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        INSERT INTO jobs VALUES ('c/a', 'a', 'SUCCEEDED', NULL, 1, NULL, 't', 't');
        INSERT INTO jobs VALUES ('c/b', 'b', 'RUNNING', NULL, 1, NULL, 't', 't');
        INSERT INTO measurements VALUES ('c/a', 'a',
            '{"job_id": "j", "candidate_id": "a", "values": {"cv": {"value": 1.5, "unit": "J/K"}}}', 't', 0);
        """
    )
    db.commit()
    db.close()
    with CampaignStore(tmp_path) as store:
        assert store.get_meta("schema_version") == "2"
        assert [(j.key, j.fidelity, j.cost) for j in store.jobs()] == [
            ("c/a", "", 1.0),
            ("c/b", "", 1.0),
        ]
        ((m, fidelity, cost),) = store.fidelity_measurements()
        assert (m.values["cv"].value, fidelity, cost) == (1.5, "", 1.0)
        assert store.committed_cost() == 2.0
    with CampaignStore(tmp_path) as store:  # opening again changes nothing
        assert len(store.jobs()) == 2


# ---------------------------------------------------------------- real data: CHGNet on carbon_24
@pytest.mark.slow
def test_chgnet_low_fidelity_of_carbon_24_correlates_with_dft(tmp_path: Path) -> None:
    from cloud_model.datasets import load_dataset
    from loop.multifidelity import chgnet_table

    records = load_dataset("carbon_24", ["val"]).records[:10]
    ids = [r.id for r in records]
    table = chgnet_table(
        "carbon_24", "energy_per_atom", splits=["val"], ids=ids, cache_dir=tmp_path
    )
    assert sorted(table) == sorted(ids)
    lines = next((tmp_path / "fidelity").glob("carbon_24-energy_per_atom-*.jsonl")).read_text()
    assert len(lines.splitlines()) == 10  # cached on disk, one row per structure
    dft = torch.tensor([r.targets["energy_per_atom"] for r in records])
    low = torch.tensor([table[i] for i in ids])
    assert torch.corrcoef(torch.stack([dft, low]))[0, 1] > 0.5  # CHGNet tracks DFT
    assert chgnet_table("carbon_24", "energy_per_atom", splits=["val"], ids=ids,
                        cache_dir=tmp_path) == table  # fmt: skip


def test_cost_metrics_count_only_highest_fidelity_finds_and_sum_every_cost(
    pools: tuple[Path, Path],
) -> None:
    from loop.bench import cost_metrics

    config = parse_config(_config(*pools))  # dft costs 10, cheap 1, budget 70
    top = {"a", "b"}
    runs = [
        {"jobs": [("a", "cheap", 1.0), ("a", "dft", 10.0), ("x", "dft", 10.0), ("b", "dft", 10.0)]},
        {"jobs": [("b", "cheap", 1.0), ("c", "cheap", 1.0), ("x", "dft", 10.0)]},
    ]
    out = cost_metrics(runs, top, config)
    # run 1 reaches 50 % of the top at cost 11 (a at dft) and 100 % at 31; run 2 never
    assert out["reached_50"] == 0.5
    assert out["cost_to_50"]["median"] == pytest.approx((11.0 + 71.0) / 2)
    assert out["top_at_budget"]["median"] == pytest.approx(0.5)
    assert out["n_low"]["median"] == pytest.approx(1.5)
