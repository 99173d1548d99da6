"""Pick-for-pick comparison of two benchmark JSONs (``cloudlab bench`` output).

For every run present in both (same strategy, batch size and seed), compares the
submitted candidate ids in order and reports the first position where they differ.
Used to show that a refactor changes no decision of an uninterrupted run::

    python benchmarks/compare_picks.py benchmarks/results/bench_carbon24/bench_carbon24.json \
        /tmp/bench_c24/bench_carbon24.json --out benchmarks/results/picks_carbon24.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def compare(reference: dict, candidate: dict) -> dict:
    runs = {}
    for name, run in candidate["runs"].items():
        ref = reference["runs"].get(name)
        if ref is None:
            continue
        a, b = ref["submitted_ids"], run["submitted_ids"]
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        runs[name] = {"n": len(b), "identical": first is None, "first_difference": first}
    return {
        "benchmark": candidate.get("benchmark"),
        "runs_compared": len(runs),
        "identical": sum(r["identical"] for r in runs.values()),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = compare(json.loads(args.reference.read_text()), json.loads(args.candidate.read_text()))
    for name, r in result["runs"].items():
        status = "same picks" if r["identical"] else f"differs from pick {r['first_difference']}"
        print(f"{name:36s} {r['n']:4d} picks  {status}")
    print(f"{result['identical']} of {result['runs_compared']} runs pick for pick identical")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
