"""Multi-objective campaigns: Pareto front, hypervolume, qLogNEHVI over a real perov_5 pool."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cloud_model.errors import ConfigError
from loop.acquisition import hypervolume, pareto_front, reference_point, select_batch
from loop.campaign import Campaign
from loop.config import load_config, parse_config
from loop.objective import Bound, Goal, ObjectiveSpec
from loop.store import CampaignStore

sys.path.insert(0, str(Path(__file__).parent))
from test_acquisition import _Cached  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _spec() -> ObjectiveSpec:
    # maximise target 0, bring target 1 into [1, 2]; target 2 must stay <= 0
    return ObjectiveSpec(
        targets=("a", "b", "c"),
        primary=0,
        sense="maximize",
        constraints=(Bound(2, upper=0.0),),
        others=(Goal(1, "window", (1.0, 2.0)),),
    )


def test_front_and_hypervolume_of_a_known_set() -> None:
    y = torch.tensor(
        [
            [3.0, 1.5, -1.0],  # a = 3 inside the window: dominates everything feasible
            [2.0, 1.2, -1.0],  # dominated by the first
            [4.0, 3.0, -1.0],  # larger a, 1 away from the window: on the front
            [9.0, 1.5, 1.0],  # infeasible (c > 0): never on the front
        ],
        dtype=torch.float64,
    )
    spec = _spec()
    assert spec.objectives(y)[2].tolist() == [4.0, -1.0]
    assert pareto_front(spec, y).tolist() == [True, False, True, False]
    ref = torch.tensor([0.0, -2.0], dtype=torch.float64)
    # union of the boxes [0, 3] x [-2, 0] and [0, 4] x [-2, -1]: 6 + 1
    assert hypervolume(spec, y, ref) == pytest.approx(7.0)
    auto_ref = reference_point(spec, y)
    assert (auto_ref < spec.objectives(y)[[0, 2]].min(0).values).all()
    assert "window b in [1.0, 2.0]" in spec.describe()


def test_qlognehvi_extends_the_front_of_an_ensemble_belief() -> None:
    gen = torch.Generator().manual_seed(1)
    truth = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    truth[:, 2] = -1.0  # all feasible
    truth[150, :2] = torch.tensor([5.0, 1.5])  # one candidate beats the whole front
    preds = truth + 0.02 * torch.randn(4, 200, 3, generator=gen, dtype=torch.float64)
    picks = select_batch(
        kind="qlognehvi",
        surrogate=_Cached(preds),
        spec=_spec(),
        q=3,
        available=torch.arange(20, 200),
        pending=torch.tensor([21], dtype=torch.long),
        measured_idx=torch.arange(20),
        measured_y=truth[:20],
        generator=torch.Generator().manual_seed(0),
        shortlist=64,
    )
    assert picks[0].index == 150 and len({p.index for p in picks}) == 3
    assert 21 not in {p.index for p in picks}


def test_pareto_config_errors_name_the_problem() -> None:
    base = {
        "name": "p",
        "pool": {"dataset": "perov_5"},
        "objective": {"target": "heat_ref", "sense": "minimize"},
        "objectives": [{"target": "ind_gap", "sense": "window", "window": [1.9, 2.1]}],
    }
    with pytest.raises(ConfigError, match="qlogei optimises one objective"):
        parse_config(base)
    with pytest.raises(ConfigError, match="repeat a target"):
        parse_config(
            {
                **base,
                "objectives": [{"target": "heat_ref", "sense": "maximize"}],
                "acquisition": {"kind": "qlognehvi"},
            }
        )
    with pytest.raises(ConfigError, match="needs two or more objectives"):
        parse_config({**base, "objectives": [], "acquisition": {"kind": "qlognehvi"}})
    config = parse_config({**base, "acquisition": {"kind": "qlognehvi"}})
    assert config.targets == ("heat_ref", "ind_gap") and config.objective_spec().is_multi


def test_pareto_campaign_on_perov5_reports_front_and_hypervolume(tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "perovskite_pareto.yaml")
    data = config.model_dump(mode="json")
    data["pool"]["max_candidates"] = 400
    data["surrogate"] = {"kind": "gp"}
    data["initial_design"] = {"n_random": 16}
    data["budget"] = {"experiments": 32}
    data["dispatch"] = {"mode": "inline", "concurrency": 8, "wait_for": "all"}
    data["adapter"]["failure"] = {"probability": 0.0}
    Campaign(parse_config(data), tmp_path / "run").run()
    with CampaignStore(tmp_path / "run", create=False) as store:
        kinds = [d["acquisition"] for d in store.decisions()]
        ms = store.measurements()
    assert kinds[:2] == ["initial_design"] * 2 and set(kinds[2:]) == {"qlognehvi"}
    assert len(ms) == 32
    from loop.report import write_report

    report = write_report(tmp_path / "run").read_text()
    assert "## Pareto front" in report and (tmp_path / "run" / "report" / "pareto.png").is_file()
    assert "| candidate | heat_ref | ind_gap |" in report
    y = torch.tensor([[m.values[t].value for t in ("heat_ref", "ind_gap")] for m in ms])
    spec = parse_config(data).objective_spec()
    ref = reference_point(spec, y)
    # the model-chosen half extended the front the random half had found
    assert hypervolume(spec, y, ref) > hypervolume(spec, y[:16], ref)
