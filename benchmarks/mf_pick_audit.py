"""Audit a multi-fidelity benchmark's picks: did the expensive measurements go where the cheap ones pointed?

For every ``multi_fidelity`` run of a finished ``cloudlab bench`` directory, read the
run's store and count, against the pool's true top fraction (the hidden high-fidelity
labels, as the benchmark scores it):

* ``top_found``: top candidates measured at the highest fidelity (what the benchmark counts);
* ``top_low_measured``: top candidates among those measured at the cheap fidelity;
* ``top_in_lowest_low``: top candidates among the ``n_high`` best cheap measurements (as many
  as the run spent on the highest fidelity), i.e. what the rule "measure the best cheap
  results expensively" would have found with the same number of expensive jobs, and
  ``lowest_low_measured_high``: how many of those ``n_high`` the run did measure expensively.

The gap between ``top_found`` and ``top_in_lowest_low`` says how much of what the cheap
fidelity revealed the campaign's surrogate and acquisition left unused.

    python benchmarks/mf_pick_audit.py runs/bench_perov5_mf --dataset perov_5 \\
        --target heat_ref --out benchmarks/results/mf_pick_audit_perov5.json
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loop.config import PoolConfig  # noqa: E402
from loop.objective import ObjectiveSpec, top_fraction_ids  # noqa: E402
from loop.pool import load_pool  # noqa: E402


def audit_run(store: Path, top: set[str], high: str, sense: str) -> dict[str, int]:
    """The counts of the module docstring for one run's ``campaign.sqlite``."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        rows = db.execute("select candidate_id, measurement, fidelity from measurements").fetchall()
    high_ids = {cid for cid, _, fid in rows if fid == high}
    low: dict[str, float] = {}
    for cid, text, fid in rows:
        if fid == high:
            continue
        values = json.loads(text)["values"]
        (value,) = (v["value"] for v in values.values())  # one cheap output per job
        low[cid] = float(value)
    ranked = sorted(low, key=low.__getitem__, reverse=sense == "maximize")
    lowest = set(ranked[: len(high_ids)])
    return {
        "n_high": len(high_ids),
        "n_low": len(low),
        "top_found": len(high_ids & top),
        "top_low_measured": len(set(low) & top),
        "top_in_lowest_low": len(lowest & top),
        "lowest_low_measured_high": len(lowest & high_ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench_dir", type=Path, help="a finished `cloudlab bench ... --out` dir")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--sense", choices=["minimize", "maximize"], default="minimize")
    parser.add_argument("--top-fraction", type=float, default=0.01)
    parser.add_argument("--high", default="dft", help="name of the highest fidelity")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    runs = sorted(args.bench_dir.glob("runs/multi_fidelity*/campaign.sqlite"))
    if not runs:
        raise SystemExit(f"{args.bench_dir}: no runs/multi_fidelity*/campaign.sqlite")
    pool = load_pool(PoolConfig(dataset=args.dataset, splits=args.splits), (args.target,))
    truth = torch.tensor(
        [[pool.truth[i].get(args.target, float("nan"))] for i in pool.ids], dtype=torch.float64
    )
    spec = ObjectiveSpec(targets=(args.target,), primary=0, sense=args.sense)
    top = top_fraction_ids(pool.ids, truth, spec, args.top_fraction)
    per_run = {store.parent.name: audit_run(store, top, args.high, args.sense) for store in runs}
    keys = next(iter(per_run.values())).keys()
    report = {
        "command": " ".join(["python benchmarks/mf_pick_audit.py", *sys.argv[1:]]),
        "pool": len(pool),
        "top_size": len(top),
        "median": {k: statistics.median(r[k] for r in per_run.values()) for k in keys},
        "runs": per_run,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["median"]))


if __name__ == "__main__":
    main()
