"""Diverse initial designs: max-min picks over the surrogate's label-free pool features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loop.agent import CampaignView
from loop.campaign import Campaign
from loop.config import parse_config
from loop.design import block_scaled, max_min_design
from loop.store import CampaignStore
from tests.loop.cv_data import cv_rows, write_cv_pool


def _clusters(n_per: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Four tight, well-separated clusters in 3-d, of very different sizes, and their labels."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]])
    sizes = [n_per * 10, n_per, n_per, 5]  # random picks land almost only in the first
    x = torch.cat(
        [c + 0.1 * torch.randn(s, 3, generator=gen) for c, s in zip(centres, sizes, strict=True)]
    )
    label = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)])
    return x, label


def test_block_scaling_weighs_blocks_equally_and_drops_what_does_not_vary() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = 100.0 * torch.randn(300, 40, generator=gen)
    narrow = torch.rand(300, 2, generator=gen)
    constant = torch.ones(300, 5)
    x = block_scaled([wide, constant, narrow])
    assert x is not None and x.shape == (300, 42)  # the constant block is left out
    per_block = [x[:, :40].pow(2).sum(1).mean(), x[:, 40:].pow(2).sum(1).mean()]
    assert torch.allclose(torch.stack(per_block), torch.ones(2, dtype=x.dtype))
    assert block_scaled([constant]) is None


def test_max_min_picks_reach_every_cluster_where_random_picks_do_not() -> None:
    x, label = _clusters()
    available = torch.arange(len(x))
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        picks = max_min_design(x, available, torch.empty(0, dtype=torch.long), 4, gen)
        assert sorted(label[picks].tolist()) == [0, 1, 2, 3]
    random = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:4]
    assert len(set(label[random].tolist())) < 4  # what the design is for
    # distances start from what is taken: a taken point in cluster 3 leaves it covered
    taken = torch.tensor([int((label == 3).nonzero()[0])])
    rest = available[label != 3]
    picks = max_min_design(x, rest, taken, 3, torch.Generator().manual_seed(0))
    assert sorted(label[picks].tolist()) == [0, 1, 2]
    assert len(set(picks)) == 3 and set(picks) <= set(rest.tolist())


def test_the_design_is_seeded_and_asks_for_no_more_than_is_available() -> None:
    x, _ = _clusters(5)
    avail = torch.arange(10)
    none = torch.empty(0, dtype=torch.long)
    a = max_min_design(x, avail, none, 6, torch.Generator().manual_seed(7))
    b = max_min_design(x, avail, none, 6, torch.Generator().manual_seed(7))
    assert a == b and len(set(a)) == 6
    assert sorted(max_min_design(x, avail, none, 50, torch.Generator())) == list(range(10))
    assert max_min_design(x, avail, none, 0, torch.Generator()) == []


@pytest.fixture(scope="module")
def cv_pool(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    return write_cv_pool(tmp_path_factory.mktemp("pool") / "cv_pool.csv", cv_rows(data_dir, 150))


def _config(pool: Path, method: str) -> dict:
    return {
        "name": "design",
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
        "initial_design": {"n_random": 8, "method": method},
        "budget": {"experiments": 12},
        "adapter": {"kind": "simulated", "seed": 1, "capacity": 4},
        "dispatch": {"mode": "inline", "wait_for": "all", "poll_interval_s": 0.01},
        "finetune": {"every_n_results": 4},
    }


def _min_distance(x: torch.Tensor) -> float:
    d = torch.cdist(x, x)
    return float(d[~torch.eye(len(x), dtype=torch.bool)].min())


def test_a_diverse_campaign_spreads_its_first_picks_over_the_gps_features(
    cv_pool: Path, tmp_path: Path
) -> None:
    config = parse_config(_config(cv_pool, "diverse"))
    agent = Campaign(config, tmp_path / "probe").build_agent()
    features = agent.surrogate.design_features()
    assert features is not None and features.shape[0] == 150

    def view(taken: list[int], n_jobs: int, decision: int) -> CampaignView:
        return CampaignView(
            measured_idx=torch.empty(0, dtype=torch.long),
            measured_y=torch.empty(0, 1, dtype=torch.float64),
            taken=frozenset(taken),
            pending=list(taken),
            n_jobs=n_jobs,
            decision_no=decision,
        )

    first = agent.propose(view([], 0, 0), 4)
    idx = [agent.index[c.candidate_id] for c in first.chosen]
    second = agent.propose(view(idx, 4, 1), 4)  # the design's second batch, the first in flight
    idx += [agent.index[c.candidate_id] for c in second.chosen]
    assert len(set(idx)) == 8 and first.acquisition == second.acquisition == "initial_design"
    # greedy max-min: the 8 picks sit farther apart than any of 50 seeded random designs
    random = [
        _min_distance(features[torch.randperm(150, generator=torch.Generator().manual_seed(s))[:8]])
        for s in range(50)
    ]
    assert _min_distance(features[idx]) > max(random)

    # the whole campaign runs with it, and resumes the same design from its config
    result = Campaign(config, tmp_path / "run").run()
    assert result.n_submitted == 12
    with CampaignStore(tmp_path / "run", create=False) as store:
        jobs = [agent.index[j.candidate_id] for j in store.jobs()]
    assert set(jobs[:4]) == set(idx[:4]) and set(jobs[:8]) == set(idx)  # seeded, greedy


def test_random_is_the_default_and_old_fingerprints_are_kept(cv_pool: Path) -> None:
    plain = parse_config(_config(cv_pool, "random"))
    data = _config(cv_pool, "random")
    del data["initial_design"]["method"]
    assert parse_config(data).initial_design.method == "random"
    assert parse_config(data).fingerprint() == plain.fingerprint()
    assert parse_config(_config(cv_pool, "diverse")).fingerprint() != plain.fingerprint()
    with pytest.raises(Exception, match="initial_design.method"):
        parse_config(_config(cv_pool, "sobol"))
