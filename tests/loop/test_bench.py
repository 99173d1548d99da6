from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from loop import metrics as M
from loop.bench import _run_dict, load_bench, run_bench
from tests.loop.cv_data import cv_rows, write_cv_pool

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("bench_*.yaml"))


def test_metrics_have_known_values() -> None:
    ids = ["a", "x", "b", "y", "z", "c"]
    top = {"a", "b", "c", "d"}
    curve = M.found_curve(ids, top)
    assert curve.tolist() == [0.25, 0.25, 0.5, 0.5, 0.5, 0.75]
    assert M.experiments_to_reach(curve, 0.5) == 3
    assert M.experiments_to_reach(curve, 1.0) is None
    # pool of 100: random finds n/100 of the top set after n draws
    assert M.enrichment_factor(curve, 100)[0] == pytest.approx(25.0)
    assert M.acceleration_factor(curve, 0.5, 100) == pytest.approx(50 / 3)
    assert M.any_found_at(ids, top) == 1 and M.any_found_at(["x"], top) is None
    # P(no top among n draws) for N=100, K=4 falls to 1/2 at n = 16
    p_miss = lambda n: math.comb(96, n) / math.comb(100, n)  # noqa: E731
    n_half = M.random_any_median(100, 4)
    assert p_miss(n_half) <= 0.5 < p_miss(n_half - 1)
    b = M.band([np.array([0.0, 1.0]), np.array([0.5])], 3)
    assert b["median"] == [0.25, 0.75, 0.75]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_benchmark_configs_load(path: Path) -> None:
    bench, base = load_bench(path)
    assert base["budget"]["experiments"] > 0
    if bench.compare_with is None:
        assert "random" in bench.strategies  # every benchmark carries its random baseline
    else:  # ... or extends one that does, on the same campaign, budget and seeds 0..n-1
        ref, ref_base = load_bench(path.parent / f"{bench.compare_with}.yaml")
        assert "random" in ref.strategies and ref.campaign == bench.campaign
        assert bench.seeds <= ref.seeds and ref_base["budget"] == base["budget"]


def test_batch_size_sets_dispatch_and_refit_cadence() -> None:
    bench, base = load_bench(CONFIGS[0])
    for q, refit in ((1, 1), (8, 8)):
        run = _run_dict(base, "random", bench.strategies["random"], q, seed=3)
        assert run["name"] == f"random-q{q}-s3" and run["seed"] == 3 and run["adapter"]["seed"] == 3
        assert run["acquisition"]["batch_size"] == q and run["dispatch"]["concurrency"] == q
        # q = 1 is fully sequential: the surrogate sees every result before the next decision
        assert run["finetune"]["every_n_results"] == refit


def test_bench_runs_resumes_and_reports(ray_session: None, data_dir: Path, tmp_path: Path) -> None:
    pool = write_cv_pool(tmp_path / "pool.csv", cv_rows(data_dir, 100))
    campaign = {
        "name": "base",
        "pool": {
            "file": str(pool),
            "id_column": "id",
            "structure_column": "scope",
            "structure_format": "scope",
        },
        "objective": {"target": "cv", "sense": "maximize"},
        "surrogate": {
            "kind": "cloud_ensemble",
            "checkpoint": None,
            "n_members": 2,
            "ensemble": {
                "n_trainable_blocks": 0,
                "model_size": "tiny",
                "epochs": 10,
                "warm_start_epochs": 5,
            },
        },
        "initial_design": {"n_random": 4},
        "budget": {"experiments": 12},
        "adapter": {"kind": "simulated", "capacity": 4, "noise": {"sigma": 1.0}},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(campaign))
    bench = {
        "name": "smoke",
        "campaign": "base.yaml",
        "seeds": 2,
        "batch_sizes": [4],
        "af_levels": [0.8],  # not the default levels: the report follows the config
        "parallel": 2,
        "strategies": {
            "random": {"surrogate": {"kind": "random"}, "acquisition": {"kind": "random"}},
            "cloud": {},
        },
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    done: list[str] = []
    summary = run_bench(tmp_path / "bench.yaml", tmp_path / "out", on_done=done.append)
    assert sorted(done) == ["cloud-q4-s0", "cloud-q4-s1", "random-q4-s0", "random-q4-s1"]
    assert set(summary["strategies"]) == {"random-q4", "cloud-q4"}
    entry = summary["strategies"]["cloud-q4"]
    assert len(entry["top0.05"]["median"]) == 12
    assert entry["time_s"]["fit"] > 0
    assert summary["strategies"]["random-q4"]["time_s"]["fit"] == 0
    saved = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert saved["pool"] == 100
    assert set(saved["runs"]) == {"cloud-q4-s0", "cloud-q4-s1", "random-q4-s0", "random-q4-s1"}
    assert len(saved["runs"]["cloud-q4-s1"]["submitted_ids"]) == 12
    # the cost of the runs themselves is kept, so a resumed benchmark still reports it
    assert saved["runs_wall_s"] >= max(r["wall_s_mean"] for r in saved["strategies"].values())
    assert (tmp_path / "out" / "smoke.png").stat().st_size > 1000
    table = (tmp_path / "out" / "smoke.md").read_text()
    assert "| cloud-q4 |" in table and "AF(80%)" in table and "AF(50%)" not in table
    assert "af_0.8_top0.05" in entry and "af_0.5_top0.05" not in entry
    # every run is an ordinary campaign directory, and a second call recomputes nothing
    first = (tmp_path / "out" / "runs" / "cloud-q4-s0" / "result.json").stat().st_mtime
    again = run_bench(tmp_path / "bench.yaml", tmp_path / "out")
    assert (tmp_path / "out" / "runs" / "cloud-q4-s0" / "result.json").stat().st_mtime == first
    assert again["runs_wall_s"] == saved["runs_wall_s"]
    assert (tmp_path / "out" / "runs" / "cloud-q4-s0" / "campaign.sqlite").exists()
