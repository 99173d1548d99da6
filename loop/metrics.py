"""Benchmark metrics of simulated loops (definitions in shared/DESIGN.md).

For a pool of ``N`` candidates whose top set ``T`` (``K = |T|``, e.g. the top 1 % by
the objective among feasible candidates) is known but hidden from the strategy:

* ``Top%(n)``   fraction of ``T`` found in the first ``n`` experiments (= allALM);
* ``EF(n)``     ``Top%_strategy(n) / Top%_random(n)`` with the random baseline taken
  analytically: drawing ``n`` of ``N`` without replacement finds ``n K / N`` of ``T``
  in expectation (hypergeometric mean), so ``Top%_random(n) = n / N``;
* ``AF(p)``     ``n_random(p) / n_strategy(p)``, experiments to reach ``Top% = p``;
  ``n_random(p) = ceil(p N)`` (the analytic expectation);
* ``anyALM``    the first ``n`` at which any member of ``T`` is found; its random
  reference is the ``n`` where ``P(any) = 1 - C(N-K, n) / C(N, n)`` first reaches 1/2;
* ``deALM(n)``  the same as Top% for the pool's top decile (10 %): a coarser view that
  shows whether a strategy is in the right region before it finds the very best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def found_curve(measured_ids: Sequence[str], top: set[str]) -> NDArray[np.float64]:
    """``Top%(n)`` for ``n = 1..len(measured_ids)`` (fraction of ``top`` found)."""
    if not top:
        return np.zeros(len(measured_ids))
    hits = np.cumsum([cid in top for cid in measured_ids])
    return hits / len(top)


def random_found(n: NDArray[np.float64] | float, pool_size: int) -> NDArray[np.float64]:
    """Expected ``Top%(n)`` of uniform random selection (any top-set size)."""
    return np.minimum(np.asarray(n, dtype=float) / pool_size, 1.0)


def enrichment_factor(curve: NDArray[np.float64], pool_size: int) -> NDArray[np.float64]:
    """``EF(n)`` for ``n = 1..len(curve)``."""
    n = np.arange(1, len(curve) + 1, dtype=float)
    return curve / random_found(n, pool_size)


def experiments_to_reach(curve: NDArray[np.float64], p: float) -> int | None:
    """Smallest ``n`` with ``Top%(n) >= p`` (None when never reached)."""
    hit = np.nonzero(curve >= p - 1e-12)[0]
    return int(hit[0]) + 1 if hit.size else None


def acceleration_factor(curve: NDArray[np.float64], p: float, pool_size: int) -> float | None:
    """``AF(p) = ceil(p N) / n_strategy(p)``; None if the strategy never reached ``p``."""
    n = experiments_to_reach(curve, p)
    return None if n is None else math.ceil(p * pool_size) / n


def any_found_at(measured_ids: Sequence[str], top: set[str]) -> int | None:
    """anyALM: the first ``n`` at which any top candidate was measured."""
    for i, cid in enumerate(measured_ids):
        if cid in top:
            return i + 1
    return None


def random_any_median(pool_size: int, k: int) -> int:
    """The ``n`` at which random selection has found a top candidate with probability 1/2."""
    log_miss = 0.0  # log P(no top candidate in the first n draws)
    for n in range(1, pool_size - k + 2):
        log_miss += (
            math.log((pool_size - k - n + 1) / (pool_size - n + 1))
            if pool_size - k - n + 1 > 0
            else -math.inf
        )
        if log_miss <= math.log(0.5):
            return n
    return pool_size - k + 1


def band(curves: Sequence[NDArray[np.float64]], length: int) -> dict[str, list[float]]:
    """Median and 5-95 % band over runs, each padded with its last value to ``length``."""
    if not curves:
        return {"median": [], "p05": [], "p95": []}
    stacked = np.stack(
        [
            np.concatenate([c, np.full(max(0, length - len(c)), c[-1] if len(c) else 0.0)])[:length]
            for c in curves
        ]
    )
    return {
        "median": np.median(stacked, 0).tolist(),
        "p05": np.percentile(stacked, 5, axis=0).tolist(),
        "p95": np.percentile(stacked, 95, axis=0).tolist(),
    }
