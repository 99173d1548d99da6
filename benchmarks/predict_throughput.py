"""Throughput of ``CloudEnsemble.predict`` as a fraction of this machine's fp32 matmul rate.

Both rates are measured in the same run with the same threads: the matmul rate
as the best of several 2048 x 2048 fp32 products, the model rate as FLOPs counted
from the model config (matmul weights + attention, each string at its own real
length, padding not counted) divided by the wall time of ``predict`` on a pool of
real SCOPE strings. Three cuts of the ensemble are timed, each twice: the first
``predict`` computes the frozen trunk (cache miss), the second re-uses the cached
features, which is what a campaign does after every refit.

    nice -n 10 python benchmarks/predict_throughput.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from cloud_model.checkpoint import resolve_checkpoint
from cloud_model.datasets import load_dataset
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an ``n x n`` matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def model_flops(ens: CloudEnsemble, lengths: torch.Tensor, part: str) -> float:
    """Forward FLOPs for strings of these token lengths: ``trunk``, ``members`` or ``all``."""
    cfg = ens.encoder.config
    per_block_weights = ens.encoder.flops_per_token(1) - 4.0 * cfg.n_layer * cfg.d_model
    per_block_weights /= cfg.n_layer  # 2 x matmul weights of one block
    n_top = ens.spec.n_trainable_blocks
    n_blocks = {"trunk": cfg.n_layer - n_top, "members": n_top, "all": cfg.n_layer}[part]
    tokens = float(lengths.sum())
    attention = 4.0 * cfg.d_model * float((lengths.double() ** 2).sum())  # per block
    flops = n_blocks * (per_block_weights * tokens + attention)
    if part in ("members", "all"):
        head = 2.0 * (cfg.d_model * cfg.d_model + cfg.d_model * ens.spec.n_targets)
        flops = (
            flops * (ens.n_members if part == "members" else 1)
            + head * len(lengths) * ens.n_members
        )
    return flops


def time_predict(ens: CloudEnsemble, pool: list[str]) -> float:
    start = time.perf_counter()
    ens.predict(pool)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", default="default", help="checkpoint dir, 'default' or 'none'"
    )
    parser.add_argument(
        "--pool", type=int, default=10000, help="strings scored (pretrain_cloud_10k)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "predict_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    checkpoint = resolve_checkpoint(None if args.checkpoint == "none" else args.checkpoint)
    pool = [r.scope or "" for r in load_dataset("cloud_pretrain_10k").records][: args.pool]
    peak = matmul_rate()
    results = []
    cuts: list[tuple[str, int | Literal["all"], int]] = [
        ("full model, K=1", "all", 1),
        ("top block, K=5", 1, 5),
        ("head only, K=5", 0, 5),
    ]
    for label, n_top, members in cuts:
        config = EnsembleConfig(
            n_trainable_blocks=n_top,
            device="cpu",
            eval_batch_size=args.batch_size,
            model_size="small",
        )
        ens = CloudEnsemble.create(checkpoint, members, "regression", 1, config)
        lengths = ens.tokenizer.batch_encode(pool, max_length=config.max_length).mask.sum(1)
        cold = time_predict(ens, pool)
        warm = time_predict(ens, pool)
        flops_all = model_flops(ens, lengths, "trunk") + model_flops(ens, lengths, "members")
        flops_warm = model_flops(ens, lengths, "members")
        row = {
            "setting": label,
            "n_trainable_blocks": n_top,
            "members": members,
            "cold_seconds": cold,
            "warm_seconds": warm,
            "cold_strings_per_s": len(pool) / cold,
            "warm_strings_per_s": len(pool) / warm,
            "cold_gflops": flops_all / cold / 1e9,
            "cold_fraction_of_matmul": flops_all / cold / peak,
            "warm_gflops": flops_warm / warm / 1e9 if flops_warm > 0 else None,
            "warm_fraction_of_matmul": flops_warm / warm / peak if flops_warm > 0 else None,
        }
        results.append(row)
        print(json.dumps(row))
    report = {
        "benchmark": "predict_throughput",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "checkpoint": str(checkpoint) if checkpoint is not None else "random init (small)",
        "pool": f"cloud_pretrain_10k, first {len(pool)} strings",
        "mean_tokens": float(lengths.double().mean()),
        "matmul_gflops_fp32_2048": peak / 1e9,
        "results": results,
        "command": "nice -n 10 python " + shlex.join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"matmul {peak / 1e9:.1f} GFLOP/s; full model {results[0]['cold_fraction_of_matmul']:.1%} of it"
    )


if __name__ == "__main__":
    main()
