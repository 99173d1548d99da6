"""The GP with a CHGNet crystal-feature block, on real carbon_24 structures and CHGNet's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cloud_model.datasets import load_dataset
from cloud_model.errors import ConfigError
from loop.auto_surrogate import AutoSurrogate
from loop.chgnet_block import (
    CHGNET_DIMS,
    ChgnetGPSurrogate,
    TransferChgnetGPSurrogate,
    chgnet_features,
)
from loop.config import parse_config
from loop.surrogate import build_surrogate

N = 40


@pytest.fixture(scope="module")
def carbon() -> tuple[list[str], list[str], torch.Tensor]:
    pytest.importorskip("chgnet")
    records = load_dataset("carbon_24", ["val"]).records[:N]
    from cloud_model.scope import encode_scope

    scopes = [encode_scope(r.structure(), variant="native") for r in records]
    y = torch.tensor([[r.targets["energy_per_atom"]] for r in records], dtype=torch.float64)
    return scopes, [str(r.cif) for r in records], y


def _config(kind: str, **surrogate: object) -> object:
    return parse_config(
        {
            "name": "t",
            "pool": {"file": "x.csv", "structure_format": "scope"},
            "objective": {"target": "energy_per_atom", "sense": "minimize"},
            "surrogate": {"kind": kind, **surrogate},
        }
    )


def test_features_are_cached_per_structure_and_survive_a_cut_line(
    carbon: tuple[list[str], list[str], torch.Tensor], tmp_path: Path
) -> None:
    _, cifs, _ = carbon
    first = chgnet_features(cifs[:6], cache_dir=tmp_path, batch_size=4)
    assert first.shape == (6, CHGNET_DIMS) and bool(torch.isfinite(first).all())
    assert len(torch.unique(first, dim=0)) == 6  # six polymorphs, six feature vectors
    (cache,) = (tmp_path / "chgnet_features").glob("*.jsonl")
    lines = cache.read_text().splitlines()
    assert len(lines) == 6 and {"sha256", "fea"} <= set(json.loads(lines[0]))
    cache.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])  # a write cut by a kill
    again = chgnet_features(cifs[:6], cache_dir=tmp_path)  # recomputes the cut row only
    assert torch.allclose(again, first, atol=1e-6)
    assert len(cache.read_text().splitlines()) == 7


def test_gp_chgnet_ranks_polymorphs_and_round_trips(
    carbon: tuple[list[str], list[str], torch.Tensor], tmp_path: Path
) -> None:
    scopes, cifs, y = carbon
    config = _config("gp_chgnet")
    gp = build_surrogate(config, scopes, N, cifs)  # type: ignore[arg-type]
    assert isinstance(gp, ChgnetGPSurrogate) and len(gp.blocks) == 2
    train, test = torch.arange(0, N, 2), torch.arange(1, N, 2)
    metrics = gp.fit(train, y[train])
    assert {"block0_outputscale", "block1_outputscale"} <= set(metrics)
    composition_w, chgnet_w = gp.block_weights()
    assert chgnet_w > composition_w  # pure carbon: composition is constant
    mean, std = gp.mean_std(torch.arange(N))
    assert mean.shape == std.shape == (N, 1) and bool((std > 0).all())
    mae = (mean[test] - y[test]).abs().mean()
    assert mae < 0.7 * (y[test] - y[train].mean()).abs().mean()
    gp.save(tmp_path / "v1")
    restored = build_surrogate(config, scopes, N, cifs)  # type: ignore[arg-type]
    restored.load(tmp_path / "v1")
    m2, s2 = restored.mean_std(torch.arange(N))
    assert torch.allclose(mean, m2, atol=1e-9) and torch.allclose(std, s2, atol=1e-9)


def test_gp_chgnet_fits_on_pool_rows_only(
    carbon: tuple[list[str], list[str], torch.Tensor],
) -> None:
    scopes, cifs, y = carbon
    gp = build_surrogate(_config("gp_chgnet"), scopes + scopes[:5], N, cifs)  # type: ignore[arg-type]
    rows = torch.cat([torch.arange(10), torch.arange(N, N + 5)])  # 10 own, 5 prior rows
    metrics = gp.fit(rows, torch.cat([y[:10], y[:5]]))
    assert metrics["n_train"] == 10.0  # prior rows have no structure, so no CHGNet features


def test_gp_transfer_chgnet_adds_the_three_blocks_and_round_trips(
    carbon: tuple[list[str], list[str], torch.Tensor], tmp_path: Path
) -> None:
    scopes, cifs, y = carbon
    config = _config("gp_transfer_chgnet", transfer_sets=["crabnet_log10_gvrh"])
    gp = build_surrogate(config, scopes + scopes[:5], N, cifs)  # type: ignore[arg-type]
    assert isinstance(gp, TransferChgnetGPSurrogate) and gp.name == "gp_transfer_chgnet"
    (c0, c1), (t0, t1), (g0, g1) = gp.blocks  # composition, transfer, CHGNet, side by side
    assert c0 == 0 and c1 == t0 and t1 == g0 and g1 - g0 == CHGNET_DIMS
    assert g1 == gp.features.shape[-1]
    rows = torch.cat([torch.arange(0, N, 2), torch.arange(N, N + 5)])  # 20 own, 5 prior rows
    metrics = gp.fit(rows, torch.cat([y[0:N:2], y[:5]]))
    assert metrics["n_train"] == 20.0  # prior rows have no structure
    composition_w, transfer_w, chgnet_w = gp.block_weights()
    assert chgnet_w > max(composition_w, transfer_w)  # pure carbon: only structure varies
    test = torch.arange(1, N, 2)
    mean, std = gp.mean_std(torch.arange(N))
    assert bool((std > 0).all())
    assert (mean[test] - y[test]).abs().mean() < 0.7 * (y[test] - y[0:N:2].mean()).abs().mean()
    gp.save(tmp_path / "v1")
    restored = build_surrogate(config, scopes + scopes[:5], N, cifs)  # type: ignore[arg-type]
    restored.load(tmp_path / "v1")
    m2, s2 = restored.mean_std(torch.arange(N))
    assert torch.allclose(mean, m2, atol=1e-9) and torch.allclose(std, s2, atol=1e-9)


def test_gp_chgnet_needs_structures(carbon: tuple[list[str], list[str], torch.Tensor]) -> None:
    scopes, cifs, _ = carbon
    with pytest.raises(ConfigError, match="surrogate gp_chgnet needs every candidate.s structure: 1 of"):
        build_surrogate(_config("gp_chgnet"), scopes, N, [*cifs[:-1], None])  # type: ignore[arg-type]
    three = _config("gp_transfer_chgnet", transfer_sets=["crabnet_log10_gvrh"])
    with pytest.raises(ConfigError, match="surrogate gp_transfer_chgnet needs every candidate"):
        build_surrogate(three, scopes, N, [*cifs[:-1], None])  # type: ignore[arg-type]
    named = _config("auto", candidates=["gp", "gp_chgnet"])  # asked for by name: an error
    with pytest.raises(ConfigError, match="gp_chgnet"):
        build_surrogate(named, scopes, N, None)  # type: ignore[arg-type]


def test_auto_takes_gp_chgnet_as_a_candidate(
    carbon: tuple[list[str], list[str], torch.Tensor],
) -> None:
    scopes, cifs, y = carbon
    auto = build_surrogate(
        _config("auto", candidates=["gp", "gp_chgnet"]),  # type: ignore[arg-type]
        scopes,
        N,
        cifs,
    )
    assert isinstance(auto, AutoSurrogate) and list(auto.members) == ["gp", "gp_chgnet"]
    # before any prequential value the GPs are compared on their leave-one-out predictions
    # of the 16 rows: composition explains nothing on pure carbon, so the first decision is
    # already gp_chgnet's, calibrated by its own held-out predictions
    metrics = auto.fit(torch.arange(16), y[:16])
    assert all(len(r) == 0 for r in auto.records.values())
    assert set(auto._held_out) == {"gp", "gp_chgnet"}
    assert metrics["gp_chgnet.loo_ll"] > metrics["gp.loo_ll"]
    assert auto.chosen == "gp_chgnet" and metrics["chosen_index"] == 1
    assert not auto.recal.is_identity
    # leave-one-out still bridges the choice until 24 prequential values exist (8, then 16)
    for n in (24, 32):
        auto.fit(torch.arange(n), y[:n])
        assert set(auto._held_out) == {"gp", "gp_chgnet"} and auto.chosen == "gp_chgnet"
    auto.fit(torch.arange(N), y)  # 24 values: the prequential record decides
    assert not auto._held_out and len(auto.records["gp_chgnet"]) == 24
    assert auto.chosen == "gp_chgnet"  # and stays so on the prequential record


def test_multi_fidelity_gp_takes_the_chgnet_block(
    carbon: tuple[list[str], list[str], torch.Tensor], tmp_path: Path
) -> None:
    from loop.chgnet_block import chgnet_block_features
    from loop.features import composition_features
    from loop.mf_agent import build_mf_agent
    from loop.records import Timings
    from loop.registry import ModelRegistry
    from loop.store import CampaignStore

    scopes, cifs, y = carbon
    ids = [f"c{i}" for i in range(N)]
    cheap = tmp_path / "cheap.csv"
    rows = zip(ids, y[:, 0].tolist(), strict=True)
    cheap.write_text("id,value\n" + "".join(f"{c},{v}\n" for c, v in rows))
    config = parse_config(
        {
            "name": "t",
            "pool": {"file": "x.csv", "structure_format": "scope"},
            "objective": {"target": "energy_per_atom", "sense": "minimize"},
            "surrogate": {"kind": "gp_chgnet"},
            "budget": {"cost": 100},
            "fidelities": [
                {"name": "dft", "cost": 10},
                {"name": "chgnet", "cost": 1, "simulated": {"file": str(cheap)}},
            ],
        }
    )
    registry = ModelRegistry(CampaignStore(tmp_path / "run"), tmp_path / "run")
    agent = build_mf_agent(config, ids, scopes, registry, Timings(), list(cifs))
    d = composition_features(scopes[:1]).shape[-1]
    feats = agent.surrogate.features
    assert feats.shape == (N, d + CHGNET_DIMS)
    block = chgnet_block_features(cifs, N)  # min-max scaled inside the surrogate: same order
    assert torch.equal(feats[:, d:].argsort(0), block.argsort(0))
    # the cheap fidelity (here the DFT values themselves) on 24 candidates, DFT on 8 of them:
    # the high-fidelity prediction of the 16 candidates measured only cheaply follows it
    s = agent.surrogate
    high, low = torch.arange(8), torch.arange(24)
    idx = torch.cat([s.combine(high, torch.zeros(8)), s.combine(low, torch.ones(24))])
    torch.manual_seed(0)
    s.fit(idx, torch.cat([y[high], y[low]]))
    mean, _ = s.mean_std(torch.arange(8, 24))
    assert torch.corrcoef(torch.stack([mean[:, 0], y[8:24, 0]]))[0, 1] > 0.9
    with pytest.raises(ConfigError, match="surrogate gp_chgnet needs every candidate.s structure: 1 of"):
        build_mf_agent(config, ids, scopes, registry, Timings(), [*cifs[:-1], None])
    # the three blocks: composition, transfer, CHGNet side by side under the one ICM kernel
    data = config.model_dump(mode="json")
    data["surrogate"] = {"kind": "gp_transfer_chgnet", "transfer_sets": ["crabnet_log10_gvrh"]}
    three = build_mf_agent(parse_config(data), ids, scopes, registry, Timings(), list(cifs))
    f3 = three.surrogate.features
    # one column per transfer set between the two (constant here: every candidate is carbon)
    assert f3.shape[-1] == d + 1 + CHGNET_DIMS
    assert torch.equal(f3[:, :d], feats[:, :d]) and torch.equal(f3[:, -CHGNET_DIMS:], feats[:, d:])
    with pytest.raises(ConfigError, match="surrogate gp_transfer_chgnet needs every candidate"):
        build_mf_agent(parse_config(data), ids, scopes, registry, Timings(), [*cifs[:-1], None])
