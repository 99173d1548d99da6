"""One-shot ranking probe of the CHGNet block (``loop/chgnet_block.py``) on a registry pool.

For each seed: fit the ``gp_chgnet`` surrogate (composition block + CHGNet crystal
features) on ``--train`` random rows of the pool, rank the other rows by posterior
mean and count how many of the pool's top 1 % land among the ``--shortlist`` best
ranked; the same for the plain composition GP. No acquisition, no adaptivity: how
much the representation alone ranks. Features come from the on-disk cache
(``python -m loop.chgnet_block DATASET --splits ...`` builds it).

    python benchmarks/chgnet_block_probe.py --dataset carbon_24 --target energy_per_atom
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="carbon_24")
    parser.add_argument("--splits", nargs="*", default=["val", "test"])
    parser.add_argument("--target", default="energy_per_atom")
    parser.add_argument("--sense", choices=["minimize", "maximize"], default="minimize")
    parser.add_argument("--variant", default="native")
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--shortlist", type=int, default=96)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from loop.config import parse_config
    from loop.pool import load_pool
    from loop.surrogate import build_surrogate

    def config(kind: str) -> object:
        return parse_config(
            {
                "name": "probe",
                "pool": {"dataset": args.dataset, "splits": args.splits, "variant": args.variant},
                "objective": {"target": args.target, "sense": args.sense},
                "surrogate": {"kind": kind},
            }
        )

    base = config("gp")
    pool = load_pool(base.pool, base.targets)  # type: ignore[attr-defined]
    keep = [
        i for i, c in enumerate(pool.ids) if math.isfinite(pool.truth[c].get(args.target, math.nan))
    ]
    y = torch.tensor([pool.truth[pool.ids[i]][args.target] for i in keep], dtype=torch.float64)
    sign = 1.0 if args.sense == "minimize" else -1.0
    n_top = math.ceil(0.01 * len(keep))
    top = set(torch.argsort(sign * y)[:n_top].tolist())
    scopes = [pool.scopes[i] for i in keep]
    cifs = [pool.cifs.get(pool.ids[i]) for i in keep]
    result: dict[str, object] = {
        "dataset": args.dataset,
        "target": args.target,
        "pool": len(keep),
        "top_1pct": n_top,
        "train": args.train,
        "shortlist": args.shortlist,
        "seeds": args.seeds,
        "found_in_shortlist": {},
        "seconds": {},
    }
    for kind in ("gp_chgnet", "gp"):
        found = []
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            surrogate = build_surrogate(config(kind), scopes, len(keep), cifs)  # type: ignore[arg-type]
            train = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[
                : args.train
            ]
            surrogate.fit(train, y[train].unsqueeze(-1))
            mean, _ = surrogate.mean_std(torch.arange(len(keep)))
            score = sign * mean[:, 0]
            score[train] = math.inf
            shortlist = torch.argsort(score)[: args.shortlist].tolist()
            found.append(len(top & set(shortlist)))
        result["found_in_shortlist"][kind] = found  # type: ignore[index]
        result["seconds"][kind] = time.perf_counter() - t0  # type: ignore[index]
        print(kind, "top-1% in the shortlist:", found, flush=True)
    out = args.out or RESULTS / f"chgnet_block_probe_{args.dataset}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
