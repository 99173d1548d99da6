"""Surrogate versions: save/load through the registry, hashes, and resume."""

from __future__ import annotations

from pathlib import Path

import torch

from loop.registry import ModelRegistry, directory_sha256
from loop.store import CampaignStore
from loop.surrogate import GPSurrogate, RandomSurrogate


def _gp_data(n: int = 60, d: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(n, d, generator=gen, dtype=torch.float64)
    y = (features @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)).unsqueeze(-1)
    idx = torch.arange(0, n, 3)
    return (
        features,
        idx,
        y[idx] + 0.01 * torch.randn(len(idx), 1, generator=gen, dtype=torch.float64),
    )


def test_a_gp_version_restores_the_same_posterior_without_refitting(tmp_path: Path) -> None:
    features, idx, y = _gp_data()
    gp = GPSurrogate(features, seed=1)
    gp.fit(idx, y)
    with CampaignStore(tmp_path) as store:
        registry = ModelRegistry(store, tmp_path)
        v1 = registry.save(gp, n_train=len(idx), metrics={"n_train": float(len(idx))})
        assert (v1.version, v1.path) == (1, "models/v1")
        restored = GPSurrogate(features, seed=1)
        assert registry.restore(restored) == registry.latest()
    everything = torch.arange(len(features))
    for (m1, s1), (m2, s2) in [(gp.mean_std(everything), restored.mean_std(everything))]:
        assert torch.allclose(m1, m2, atol=1e-10) and torch.allclose(s1, s2, atol=1e-10)


def test_a_tampered_or_missing_version_is_not_used(tmp_path: Path) -> None:
    features, idx, y = _gp_data()
    gp = GPSurrogate(features)
    gp.fit(idx, y)
    with CampaignStore(tmp_path) as store:
        registry = ModelRegistry(store, tmp_path)
        registry.save(gp, n_train=20, metrics={})
        v2 = registry.save(gp, n_train=28, metrics={})
        v3 = registry.save(gp, n_train=36, metrics={})
        assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["v2", "v3"]  # two kept
        assert v3.sha256 == directory_sha256(tmp_path / "models" / "v3")
        assert v2.version == 2
        (tmp_path / "models" / "v3" / "gp.safetensors").write_bytes(b"corrupt")
        assert registry.restore(GPSurrogate(features)) is None  # hash mismatch: refit instead
        (tmp_path / "models" / "v3").rename(tmp_path / "models" / "gone")
        assert registry.restore(GPSurrogate(features)) is None  # files missing


def test_random_has_nothing_to_version(tmp_path: Path) -> None:
    with CampaignStore(tmp_path) as store:
        registry = ModelRegistry(store, tmp_path)
        version = registry.save(RandomSurrogate(), n_train=3, metrics={})
        assert registry.restore(RandomSurrogate()) == version
