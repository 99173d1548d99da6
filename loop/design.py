"""Space-filling initial designs over a fixed pool.

Before a surrogate has data, random picks from a pool of thousands often miss whole regions of
the representation (on ``carbon_24`` 45 % of 16-pick random designs hold none of the lowest 5 %
of energies). A *diverse* design spreads the picks instead: greedy max-min distance (the
farthest-point or k-center rule, the discrete analogue of a space-filling design) over the
features the surrogate itself will learn from (each column on its range, as the GPs see it;
each block at unit total variance so no block dominates by its dimension). The first pick is
seeded-random unless candidates are already taken, in which case distances start from those.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_scaled", "max_min_design"]

_CHUNK = 262_144  # rows per distance update (bounded memory on a 1M-candidate pool)


def block_scaled(blocks: list[Tensor]) -> Tensor | None:
    """Concatenate ``N x d_k`` feature blocks, each scaled to total variance 1.

    Each column is first mapped to [0, 1] by its range (what the GPs' input transform does),
    constant columns are dropped and a block with no variance is left out. Returns None when
    nothing varies (every distance would be zero).
    """
    parts = []
    for block in blocks:
        x = block.to(torch.float64)
        lo, span = x.min(0).values, x.max(0).values - x.min(0).values
        keep = span > 1e-12
        if not bool(keep.any()):
            continue
        x = (x[:, keep] - lo[keep]) / span[keep]
        x = x - x.mean(0)
        parts.append(x / x.pow(2).sum(1).mean().sqrt().clamp_min(1e-12))
    return torch.cat(parts, dim=1) if parts else None


def max_min_design(
    features: Tensor, available: Tensor, taken: Tensor, k: int, generator: torch.Generator
) -> list[int]:
    """Greedy max-min picks: each one the available row farthest from every pick and taken row.

    Args:
        features: ``N x d`` (rows address the pool).
        available: indices that may be picked.
        taken: indices already measured or in flight (distances start from these).
        k: how many to pick (fewer if fewer are available).
        generator: seeds the first pick when nothing is taken.
    """
    k = min(k, int(available.numel()))
    if k <= 0:
        return []
    x = features[available].to(torch.float32)
    dist = torch.full((len(available),), float("inf"))
    for i in taken.tolist():
        _update(dist, x, features[int(i)].to(torch.float32))
    picks: list[int] = []
    if taken.numel() == 0:
        first = int(torch.randint(len(available), (1,), generator=generator))
        picks.append(first)
        _update(dist, x, x[first])
    while len(picks) < k:
        dist[picks] = -1.0  # already picked in this design
        j = int(torch.argmax(dist))
        picks.append(j)
        _update(dist, x, x[j])
    return [int(available[j]) for j in picks]


def _update(dist: Tensor, x: Tensor, centre: Tensor) -> None:
    """``dist = min(dist, |x - centre|^2)`` in chunks."""
    for start in range(0, len(x), _CHUNK):
        d = (x[start : start + _CHUNK] - centre).pow(2).sum(1)
        torch.minimum(dist[start : start + _CHUNK], d, out=dist[start : start + _CHUNK])
