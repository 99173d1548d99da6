"""How much the CLOUD block of ``gp_cloud`` carries on a polymorph pool, outside a campaign.

Fits the GP baseline on the CLOUD PCA block alone (16 and 256 components), the
composition GP, and the two-block ``gp_cloud`` GP on the same 120 random pool rows
(seed 0), and scores 2,000 other rows: Spearman rank correlation of the predicted
mean with the truth, 90 % interval coverage, the fraction of the test rows' best
1 % inside the predicted best 5 %, and the blocks' fitted outputscales::

    python benchmarks/gp_cloud_probe.py [configs/carbon24_lowest_energy.yaml]

Writes ``benchmarks/results/gp_cloud_probe.json``. The labels used are pool labels
of the benchmark; they train this probe only and reach no checkpoint or prior data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cloud_model.checkpoint import default_checkpoint
from loop.config import load_config
from loop.features import composition_features
from loop.gp_blocks import BlockGPSurrogate, cloud_block_features
from loop.pool import load_pool
from loop.surrogate import GPSurrogate

OUT = Path(__file__).resolve().parent / "results" / "gp_cloud_probe.json"


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/carbon24_lowest_energy.yaml")
    args = parser.parse_args()
    cfg = load_config(args.config)
    pool = load_pool(cfg.pool, cfg.targets, seed=cfg.seed)
    target = cfg.objective.target
    y = torch.tensor([[pool.truth[c][target]] for c in pool.ids], dtype=torch.float64)
    sign = 1.0 if cfg.objective.sense == "minimize" else -1.0  # best = lowest of sign * y
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
    train, test = perm[:120], perm[120:2120]
    k = max(1, len(test) // 100)
    best = set((sign * y[test, 0]).argsort()[:k].tolist())

    def score(model: GPSurrogate) -> dict[str, float]:
        model.fit(train, y[train])
        mean, std = model.mean_std(test)
        picked = set((sign * mean[:, 0]).argsort()[: 5 * k].tolist())
        return {
            "spearman": _spearman(mean[:, 0], y[test, 0]),
            "coverage90": float(((mean - y[test]).abs() < 1.645 * std).double().mean()),
            "best1pct_in_predicted_best5pct": len(best & picked) / k,
        }

    comp = torch.as_tensor(composition_features(pool.scopes), dtype=torch.float64)
    out: dict[str, object] = {"config": args.config, "n_train": 120, "n_test": len(test)}
    for dims in (16, 256):
        cloud = cloud_block_features(pool.scopes, default_checkpoint(), n_fit=len(pool), dims=dims)
        out[f"cloud_pca{dims}_gp"] = score(GPSurrogate(cloud, seed=0))
    out["composition_gp"] = score(GPSurrogate(comp, seed=0))
    cloud = cloud_block_features(pool.scopes, default_checkpoint(), n_fit=len(pool), dims=16)
    d = comp.shape[1]
    block = BlockGPSurrogate(torch.cat([comp, cloud], -1), [(0, d), (d, d + 16)], seed=0)
    out["gp_cloud"] = score(block)
    out["gp_cloud_outputscales"] = dict(
        zip(["composition", "cloud"], block.block_weights(), strict=True)
    )
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
