"""Fit, scoring and one q = 8 decision over a 1,000,000-candidate pool, for every surrogate kind,
with one or all cores' threads, with and without another busy process.

Each (kind, threads, load) cell runs in a fresh process (a thread budget is set once,
before any work) and times, over cached features (GP kinds) or cached member
predictions (the CLOUD ensemble):

* ``fit_s``: a refit on 96 rows (for ``auto``: every candidate refitted after the
  prequential scoring of the last 8 rows);
* ``score_s``: the posterior mean and std of every candidate (chunked, bounded memory);
* ``decide_s``: ``select_batch`` with q = 8 and 10 jobs pending (qLogEI);
* ``floor_s``: one vectorised pass over the cached predictions (``5 x N x 1``) that
  ranks every candidate -- the least any decision must do; ``decide_over_floor`` is
  the ratio.

Features are synthetic (Gaussian, 40 composition-like columns plus 5 transfer columns; the
CHGNet kinds add 64 and gp_cloud the CLOUD block's 16 PCA columns, each from its own generator
so the other kinds' data stay as they were); only the sizes matter for cost. The load is a
pure-Python busy loop in its own process.

    python benchmarks/decision_scale.py [--pool 1000000] [--out benchmarks/results/decision_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

KINDS = (
    "cloud_ensemble",
    "gp",
    "gp_transfer",
    "auto",
    "gp_chgnet",
    "gp_transfer_chgnet",
    "gp_cloud",
)
N_TRAIN = 96
D_COMP, D_TRANSFER, D_CHGNET = 40, 5, 64


def _worker(kind: str, threads: int, n: int) -> dict[str, object]:
    from cloud_model.threads import apply_thread_budget

    apply_thread_budget(threads)
    import torch
    from acquisition_scale import _Cached as Cached  # the same cached-ensemble surrogate

    from loop.acquisition import select_batch
    from loop.chgnet_block import ChgnetGPSurrogate, TransferChgnetGPSurrogate
    from loop.objective import ObjectiveSpec
    from loop.surrogate import GPSurrogate, Surrogate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, D_COMP + D_TRANSFER, generator=gen, dtype=torch.float64)  # cached features
    w = torch.randn(D_COMP + D_TRANSFER, 1, generator=gen, dtype=torch.float64)
    y_all = (x @ w).tanh()  # (N, 1) the hidden function
    preds = y_all[None] + 0.3 * torch.randn(5, n, 1, generator=gen, dtype=torch.float64)
    spec = ObjectiveSpec(targets=("y",), primary=0, sense="maximize", constraints=())

    def build() -> Surrogate:
        from loop.auto_surrogate import AutoSurrogate
        from loop.gp_blocks import TransferGPSurrogate

        if kind == "cloud_ensemble":
            return Cached(preds)
        if kind == "gp":
            return GPSurrogate(x[:, :D_COMP], seed=0, n_pool=n)
        if kind == "gp_cloud":
            from loop.gp_blocks import CLOUD_DIMS, BlockGPSurrogate

            g = torch.Generator().manual_seed(2)
            pca = torch.randn(n, CLOUD_DIMS, generator=g, dtype=torch.float64)
            tiles = [(0, D_COMP), (D_COMP, D_COMP + CLOUD_DIMS)]
            return BlockGPSurrogate(torch.cat([x[:, :D_COMP], pca], -1), tiles, seed=0, n_pool=n)
        if kind in ("gp_chgnet", "gp_transfer_chgnet"):
            g = torch.Generator().manual_seed(1)
            crystal = torch.randn(n, D_CHGNET, generator=g, dtype=torch.float64)
            if kind == "gp_chgnet":
                f, b = torch.cat([x[:, :D_COMP], crystal], -1), [(0, D_COMP)]
                return ChgnetGPSurrogate(f, [*b, (D_COMP, D_COMP + D_CHGNET)], seed=0, n_pool=n)
            d = D_COMP + D_TRANSFER
            three = [(0, D_COMP), (D_COMP, d), (d, d + D_CHGNET)]
            f = torch.cat([x, crystal], -1)
            return TransferChgnetGPSurrogate(f, three, seed=0, n_pool=n)
        blocks = [(0, D_COMP), (D_COMP, D_COMP + D_TRANSFER)]
        transfer = TransferGPSurrogate(x, blocks, seed=0, n_pool=n)
        if kind == "gp_transfer":
            return transfer
        return AutoSurrogate({"gp_transfer": transfer, "cloud_ensemble": Cached(preds)}, n_pool=n)

    surrogate = build()
    train = torch.arange(N_TRAIN)
    y = y_all[train] + 0.05 * torch.randn(N_TRAIN, 1, generator=gen, dtype=torch.float64)
    surrogate.fit(train[:-8], y[:-8])  # auto: the next fit scores these 8 rows first
    t0 = time.perf_counter()
    surrogate.fit(train, y)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    surrogate.mean_std(torch.arange(n))
    score_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        spec.score(preds).mean(0).topk(8)
    floor_s = (time.perf_counter() - t0) / 5
    shortlist = (
        256 if kind != "cloud_ensemble" and surrogate.active_name != "cloud_ensemble" else 2048
    )
    t0 = time.perf_counter()
    picks = select_batch(
        kind="qlogei",
        surrogate=surrogate,
        spec=spec,
        q=8,
        available=torch.arange(N_TRAIN + 10, n),
        pending=torch.arange(N_TRAIN, N_TRAIN + 10),
        measured_idx=train,
        measured_y=y,
        generator=gen,
        shortlist=shortlist,
    )
    decide_s = time.perf_counter() - t0
    return {
        "kind": kind,
        "active": surrogate.active_name,
        "threads": torch.get_num_threads(),
        "fit_s": fit_s,
        "score_s": score_s,
        "decide_s": decide_s,
        "floor_s": floor_s,
        "decide_over_floor": decide_s / floor_s,
        "picks": len(picks),
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", type=int, default=1_000_000)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--worker", choices=KINDS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decision_scale.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.threads, args.pool)))
        return
    from cloud_model.threads import usable_cores

    cores = usable_cores()
    rows = []
    for load in (False, True):
        hog = None
        if load:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1.0)
        try:
            for threads in sorted({1, cores}):
                for kind in args.kinds:
                    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(threads)]
                    cmd += ["--pool", str(args.pool)]
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                    t0 = time.perf_counter()
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    row.update(load=load, process_s=time.perf_counter() - t0)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    payload = {
        "benchmark": "decision_scale",
        "pool": args.pool,
        "q": 8,
        "pending": 10,
        "n_train": N_TRAIN,
        "usable_cores": cores,
        "machine": platform.processor() or platform.machine(),
        "load_average_at_end": os.getloadavg(),
        "note": "load=True: one other process busy-looping on a core during the cell",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
