"""The GP with a composition block and a CLOUD-embedding block, on real strings and the shipped checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from cloud_model.checkpoint import default_checkpoint
from loop.config import parse_config
from loop.gp_blocks import BlockGPSurrogate, cloud_block_features
from loop.surrogate import build_surrogate
from tests.loop.cv_data import cv_scopes


def _cv(data_dir: Path, n: int = 60) -> tuple[list[str], torch.Tensor]:
    return cv_scopes(data_dir, n)


def test_cloud_block_is_a_label_free_pca_of_the_pool(data_dir: Path) -> None:
    scopes, _ = _cv(data_dir)
    feats = cloud_block_features(scopes, default_checkpoint(), n_fit=50, dims=8)
    assert feats.shape == (60, 8)
    assert torch.allclose(feats[:50].std(0), torch.ones(8, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(feats[:50].mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-6)
    again = cloud_block_features(scopes, default_checkpoint(), n_fit=50, dims=8)
    assert again is feats  # cached per process


def test_gp_cloud_fits_both_blocks_and_round_trips(data_dir: Path, tmp_path: Path) -> None:
    scopes, _ = _cv(data_dir)
    config = parse_config(
        {
            "name": "t",
            "pool": {"file": "x.csv", "structure_format": "scope"},
            "objective": {"target": "cv", "sense": "maximize"},
            "surrogate": {"kind": "gp_cloud"},
        }
    )
    gp = build_surrogate(config, scopes, len(scopes))
    assert isinstance(gp, BlockGPSurrogate) and len(gp.blocks) == 2
    # a property that is a smooth function of the CLOUD embedding alone: the CLOUD block must
    # carry it (larger outputscale) and predict held-out strings well
    cloud = gp.features[:, gp.blocks[1][0] :]
    target = (cloud[:, :1] + 0.5 * cloud[:, 1:2] ** 2).to(torch.float64)  # 60 x 1
    train, test = torch.arange(0, 60, 2), torch.arange(1, 60, 2)
    metrics = gp.fit(train, target[train])
    assert {"block0_outputscale", "block1_outputscale"} <= set(metrics)
    composition_w, cloud_w = gp.block_weights()
    assert cloud_w > composition_w
    mean, std = gp.mean_std(torch.arange(60))
    assert mean.shape == std.shape == (60, 1) and bool((std > 0).all())
    mae = (mean[test] - target[test]).abs().mean()
    assert mae < 0.5 * (target[test] - target[train].mean()).abs().mean()
    gp.save(tmp_path / "v1")
    restored = build_surrogate(config, scopes, len(scopes))
    restored.load(tmp_path / "v1")
    m2, s2 = restored.mean_std(torch.arange(60))
    assert torch.allclose(mean, m2, atol=1e-9) and torch.allclose(std, s2, atol=1e-9)


def test_block_gp_fits_two_targets_without_falling_back(caplog) -> None:  # type: ignore[no-untyped-def]
    """Two targets (objective + constraint): the kernels are batched over the outputs."""
    import logging

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 6, generator=gen, dtype=torch.float64)
    y = torch.stack([3 * x[:, 0], x[:, 4] ** 2], dim=1)
    gp = BlockGPSurrogate(x, [(0, 3), (3, 6)])
    with caplog.at_level(logging.WARNING, logger="loop.surrogate"):
        gp.fit(torch.arange(30), y[:30])
    assert "fit failed" not in caplog.text
    mean, std = gp.mean_std(torch.arange(30, 40))
    assert mean.shape == std.shape == (10, 2)
    assert bool(((mean - y[30:]).abs().mean(0) < 0.1 * y.std(0)).all())
