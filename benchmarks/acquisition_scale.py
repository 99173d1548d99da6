"""Cost of one acquisition decision over large pools once member predictions are cached.

For pools of 1e3, 1e4 and 1e5 candidates (K = 5 members, 2 targets, one constraint,
q = 8, 10 jobs pending) this times `select_batch` for each strategy and, in the same run,
a floor: one vectorised pass computing every candidate's constrained objective from the
cached predictions. The ratio decision / floor says how much the BoTorch machinery
(sequential pending-aware q-batch optimisation) costs on top of touching the data once.

    python benchmarks/acquisition_scale.py [--sizes 1000 10000 100000] [--out benchmarks/results/acquisition_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from loop.acquisition import select_batch
from loop.objective import Bound, ObjectiveSpec
from loop.surrogate import LookupEnsembleModel, Surrogate


class _Cached(Surrogate):
    name = "cached"

    def __init__(self, predictions: torch.Tensor) -> None:
        self._model = LookupEnsembleModel(predictions)

    def fit(self, train_idx: torch.Tensor, train_y: torch.Tensor) -> dict[str, float]:
        return {}

    def model(self) -> LookupEnsembleModel:
        return self._model

    def samples(self, idx: torch.Tensor) -> torch.Tensor:
        return self._model.predictions[:, idx]

    def save(self, directory: Path) -> None:
        raise NotImplementedError("a benchmark's cached predictions are not saved")

    def load(self, directory: Path) -> None:
        raise NotImplementedError("a benchmark's cached predictions are not saved")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--q", type=int, default=8)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/acquisition_scale.json")
    )
    args = parser.parse_args()
    spec = ObjectiveSpec(
        targets=("y", "c"), primary=0, sense="minimize", constraints=(Bound(1, -1.0, 1.0),)
    )
    results = []
    for n in args.sizes:
        gen = torch.Generator().manual_seed(0)
        preds = torch.randn(5, n, 2, generator=gen, dtype=torch.float64)
        surrogate = _Cached(preds)
        t0 = time.perf_counter()
        for _ in range(5):
            spec.score(preds).mean(0).topk(args.q)
        floor = (time.perf_counter() - t0) / 5
        row: dict[str, object] = {"pool": n, "floor_s": floor}
        for kind in ("qlogei", "qlognei", "qucb", "thompson", "greedy"):
            t0 = time.perf_counter()
            select_batch(
                kind=kind,  # type: ignore[arg-type]
                surrogate=surrogate,
                spec=spec,
                q=args.q,
                available=torch.arange(30, n),
                pending=torch.arange(20, 30),
                measured_idx=torch.arange(20),
                measured_y=preds.mean(0)[:20],
                generator=gen,
            )
            dt = time.perf_counter() - t0
            row[f"{kind}_s"] = dt
            row[f"{kind}_over_floor"] = dt / floor
        results.append(row)
        print(json.dumps(row))
    payload = {
        "benchmark": "acquisition_scale",
        "q": args.q,
        "members": 5,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
