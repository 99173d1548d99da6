"""Which `auto` candidate decided, as a share of the refits of a benchmark's finished runs.

    cloudlab bench configs/bench_aflow_debye_default.yaml --out DIR
    python benchmarks/auto_choices.py configs/bench_aflow_debye_default.yaml DIR

Reads every run's store under ``DIR/runs`` (its model versions' ``chosen_index``) and names
the index by the campaign's ``surrogate.candidates``.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def main() -> None:
    from loop.bench import load_bench
    from loop.config import parse_config
    from loop.store import CampaignStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path, help="the benchmark YAML the runs came from")
    parser.add_argument("out", type=Path, help="the benchmark's output directory")
    args = parser.parse_args()
    _, base = load_bench(args.config)
    names = [str(k) for k in parse_config(base).surrogate.candidates]
    counts: collections.Counter[str] = collections.Counter()
    runs = sorted(p.parent for p in args.out.glob("runs/*/result.json"))
    if not runs:
        raise SystemExit(f"{args.out}: no finished runs under runs/ (run cloudlab bench first)")
    for run in runs:
        with CampaignStore(run, create=False) as store:
            for version in store.model_versions():
                index = version["metrics"].get("chosen_index")
                if index is not None:
                    counts[names[int(index)]] += 1
    total = sum(counts.values())
    share = {name: round(counts[name] / total, 2) for name in names}
    print(json.dumps({"runs": len(runs), "refits": total, "share": share}))


if __name__ == "__main__":
    main()
