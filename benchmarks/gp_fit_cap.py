"""GP baseline: hyperparameter fit with and without the L-BFGS-B iteration cap, and the
cost of one batch decision with its shortlist pre-screen.

    python benchmarks/gp_fit_cap.py [--n-train 300] [--n-test 8000] [--caps 300 15000]

Fits the campaign's GP (composition features, Matern-5/2 ARD) on ``--n-train`` random
``mpts_52`` rows (val + test splits) and scores ``--n-test`` others: fit seconds, test MAE
of formation energy per atom, and how often the truth lies inside the 90 % interval.
15,000 is scipy's own L-BFGS-B default, i.e. no cap. Then one q = 8 qLogEI decision over the
test rows as candidates (shortlist 256, pre-screen on posterior draws) is timed against the
q = 1 pass through the exact batched posterior that the pre-screen replaced. Writes
``benchmarks/results/gp_fit_cap.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from cloud_model.datasets import load_dataset
from cloud_model.scope import encode_scope
from loop.acquisition import _build_acqf, select_batch
from loop.features import composition_features
from loop.objective import ObjectiveSpec
from loop.surrogate import GPSurrogate

OUT = Path(__file__).resolve().parent / "results" / "gp_fit_cap.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=8000)
    parser.add_argument("--caps", type=int, nargs="+", default=[300, 15000])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    records = load_dataset("mpts_52", ["val", "test"]).records
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(records), generator=gen)[: args.n_train + args.n_test].tolist()
    chosen = [records[i] for i in perm]
    scopes = [r.scope or encode_scope(r.structure()) for r in chosen]
    X = torch.tensor(composition_features(scopes))
    y = torch.tensor(
        [[r.targets["formation_energy_per_atom"]] for r in chosen], dtype=torch.float64
    )
    train = torch.arange(args.n_train)
    test = torch.arange(args.n_train, len(chosen))

    rows = []
    for cap in args.caps:
        gp = GPSurrogate(X, max_train=args.n_train, fit_maxiter=cap)
        t0 = time.perf_counter()
        gp.fit(train, y[train])
        seconds = time.perf_counter() - t0
        mean, std = gp.mean_std(test)
        z = ((mean - y[test]) / std.clamp_min(1e-12)).abs()
        rows.append(
            {
                "maxiter": cap,
                "fit_s": round(seconds, 2),
                "test_mae_ev_per_atom": round(float((mean - y[test]).abs().mean()), 4),
                "coverage_90": round(float((z < 1.645).double().mean()), 3),
            }
        )
        print(rows[-1])
    # one decision with the capped GP (the last fitted is the uncapped one: refit capped)
    gp = GPSurrogate(X, max_train=args.n_train, fit_maxiter=args.caps[0])
    gp.fit(train, y[train])
    spec = ObjectiveSpec(targets=("formation_energy_per_atom",), primary=0, sense="minimize")
    kw = dict(spec=spec, measured_idx=train, measured_y=y[train])
    t0 = time.perf_counter()
    select_batch(
        kind="qlogei",
        surrogate=gp,
        q=8,
        available=test,
        pending=torch.tensor([], dtype=torch.long),
        generator=torch.Generator().manual_seed(0),
        shortlist=256,
        **kw,
    )
    decision_s = time.perf_counter() - t0
    acqf = _build_acqf("qlogei", gp.model(), spec, train, y[train], None, 2.0, None)
    t0 = time.perf_counter()
    with torch.no_grad():
        acqf(test.to(torch.float64).view(-1, 1, 1))
    exact_screen_s = time.perf_counter() - t0
    print({"decision_s": round(decision_s, 2), "exact_batched_q1_pass_s": round(exact_screen_s, 2)})
    report = {
        "command": "python " + shlex.join(sys.argv),
        "dataset": "mpts_52 val+test",
        "n_train": args.n_train,
        "n_test": len(test),
        "features": int(X.shape[1]),
        "rows": rows,
        "decision_q8_shortlist256_s": round(decision_s, 2),
        "exact_batched_q1_pass_s": round(exact_screen_s, 2),
    }
    OUT.write_text(json.dumps(report, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
