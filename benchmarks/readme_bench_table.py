"""Rewrite the loop-benchmark table of README.md from the committed benchmark JSONs.

    python benchmarks/readme_bench_table.py          # rewrite between the bench-table markers
    python benchmarks/readme_bench_table.py --print  # only print the table

One row per strategy and batch size of every ``benchmarks/results/bench_*/bench_*.json``;
the columns are those of each benchmark's own Markdown table at the pool's top 1 %.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- bench-table -->", "<!-- /bench-table -->"

# README label of each benchmark, in table order
# checkpoint the CLOUD parts of each benchmark's committed runs used (what a row compares with)
_OLD = ", CLOUD: cloud-small (retired)"
_NEW = ", CLOUD: cloud-small-multitask"
# `auto` rows measured before the shortlist read the chosen member's own belief (be72a85) and
# its tie-breaking the decision's generator (dd80d05)
_PRE = ", before be72a85"
# rows whose GP had prior data and conditioned on its gp_max_train rows only, before
# surrogate.gp_max_condition
_COND = ", GP on <= 500 prior rows"
# `auto` rows measured before it chose the first model by leave-one-out likelihood (b65b243)
_LOO = ", auto before b65b243"
# the example campaigns' default: auto over gp_transfer, cloud_ensemble, gp_chgnet and
# gp_transfer_chgnet + hits; before that (and still on carbon_24), the first three only
_DEF = ", default (auto + CHGNet and three-block GPs, hits)"
_DEF3 = ", earlier default (auto + CHGNet block, hits)"
# carbon_24's default keeps the three (one element: the three-block GP adds nothing to gp_chgnet)
_DEF_C = ", default (auto + CHGNet block, hits)"
LABELS = {
    "bench_perov_5": "perov_5 window, {budget} of {pool:,}" + _OLD,
    "bench_perov_5_auto": "perov_5 window, {budget} of {pool:,}, auto (gp_transfer, CLOUD), the earlier default" + _NEW,
    "bench_perov_5_auto3": "perov_5 window, {budget} of {pool:,}" + _DEF3 + _NEW,
    "bench_perov_5_default": "perov_5 window, {budget} of {pool:,}" + _DEF + _NEW,
    "bench_perov_5_hits": (
        "perov_5 window, {budget} of {pool:,}, hits acquisition, GP + CHGNet block" + _NEW + _LOO
    ),
    "bench_perov_5_three_blocks": (
        "perov_5 window, {budget} of {pool:,}, one GP on composition + transfer + CHGNet, hits"
    ),
    "bench_perov_5_diverse": (
        "perov_5 window, {budget} of {pool:,}, auto + diverse initial design" + _NEW
    ),
    "bench_aflow_debye": "AFLOW lowest theta, {budget} of {pool:,}" + _OLD,
    "bench_aflow_debye_auto3": "AFLOW lowest theta, {budget} of {pool:,}" + _DEF3 + _NEW,
    "bench_aflow_debye_default": "AFLOW lowest theta, {budget} of {pool:,}" + _DEF + _NEW,
    "bench_aflow_debye_hits": (
        "AFLOW lowest theta, {budget} of {pool:,}, hits acquisition, GP + CHGNet block" + _NEW + _LOO
    ),
    "bench_aflow_debye_q1": "AFLOW lowest theta, {budget} of {pool:,}, batch 1 vs 8" + _OLD,
    "bench_aflow_debye_gp_cloud": "AFLOW lowest theta, {budget} of {pool:,}, CLOUD + GP" + _OLD,
    "bench_aflow_debye_chgnet": (
        "AFLOW lowest theta, {budget} of {pool:,}, GP + CHGNet block (MPtrj-trained features)"
    ),
    "bench_aflow_debye_three_blocks": (
        "AFLOW lowest theta, {budget} of {pool:,}, one GP on composition + transfer + CHGNet, hits"
    ),
    "bench_aflow_debye_finetune": (
        "AFLOW lowest theta, {budget} of {pool:,}, top block fine-tuned vs frozen" + _NEW
    ),
    "bench_aflow_debye_transfer": "AFLOW lowest theta, {budget} of {pool:,}, GP + transfer",
    "bench_aflow_debye_prior": (
        "AFLOW lowest theta, {budget} of {pool:,}, GP + AFLOW train rows" + _COND
    ),
    "bench_aflow_debye_prior_condition": (
        "AFLOW lowest theta, {budget} of {pool:,}, GP + AFLOW train rows, conditioned on 2,000"
    ),
    "bench_aflow_debye_prior_diverse": (
        "AFLOW lowest theta, {budget} of {pool:,}, GP + AFLOW train rows, diverse design" + _COND
    ),
    "bench_aflow_debye_auto": (
        "AFLOW lowest theta, {budget} of {pool:,}, auto (gp_transfer, CLOUD), the earlier default" + _NEW
    ),
    "bench_aflow_debye_diverse": (
        "AFLOW lowest theta, {budget} of {pool:,}, auto + diverse initial design" + _NEW
    ),
    "bench_mpts52": "mpts_52 time split, {budget} of {pool:,}" + _OLD + _COND,
    "bench_mpts52_auto": (
        "mpts_52 time split, {budget} of {pool:,}, auto (gp, CLOUD)" + _NEW + _PRE + _COND
    ),
    "bench_mpts52_diverse": (
        "mpts_52 time split, {budget} of {pool:,}, auto + diverse initial design" + _NEW + _COND
    ),
    "bench_mpts52_gp_diverse": (
        "mpts_52 time split, {budget} of {pool:,}, GP, diverse initial design" + _COND
    ),
    "bench_mpts52_condition": (
        "mpts_52 time split, {budget} of {pool:,}, GP conditioned on 2,000 prior rows" + _NEW
    ),
    "bench_mpts52_hits": (
        "mpts_52 time split, {budget} of {pool:,}, auto (gp, CLOUD) + hits acquisition" + _NEW
    ),
    "bench_carbon24": "carbon_24 lowest E, {budget} of {pool:,}" + _OLD,
    "bench_carbon24_gp_cloud": "carbon_24 lowest E, {budget} of {pool:,}, CLOUD + GP" + _OLD,
    "bench_carbon24_auto": (
        "carbon_24 lowest E, {budget} of {pool:,}, auto (gp_transfer, CLOUD), the earlier default" + _NEW
    ),
    "bench_carbon24_diverse": (
        "carbon_24 lowest E, {budget} of {pool:,}, auto + diverse initial design" + _NEW
    ),
    "bench_carbon24_trunks": (
        "carbon_24 lowest E, {budget} of {pool:,}, multitask vs untrained trunk" + _NEW
    ),
    "bench_carbon24_first": (
        "carbon_24 lowest E, {budget} of {pool:,}, auto, CLOUD decides first" + _NEW
    ),
    "bench_carbon24_chgnet": (
        "carbon_24 lowest E, {budget} of {pool:,}, GP + CHGNet block (MPtrj-trained features)"
    ),
    "bench_carbon24_default": "carbon_24 lowest E, {budget} of {pool:,}" + _DEF_C + _NEW,
    "bench_carbon24_auto4": (
        "carbon_24 lowest E, {budget} of {pool:,}, auto + CHGNet and three-block GPs, hits" + _NEW
    ),
    "bench_carbon24_hits": (
        "carbon_24 lowest E, {budget} of {pool:,}, hits acquisition, GP + CHGNet block" + _NEW + _LOO
    ),
    "bench_carbon24_bayes": "carbon_24 lowest E, {budget} of {pool:,}, Bayesian heads" + _OLD,
    "bench_carbon24_three_blocks": (
        "carbon_24 lowest E, {budget} of {pool:,}, one GP on composition + transfer + CHGNet, hits"
    ),
    "bench_carbon24_finetune": (
        "carbon_24 lowest E, {budget} of {pool:,}, top block fine-tuned" + _OLD
    ),
}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(entry: dict[str, Any], budget: int) -> list[str]:
    top = entry["top0.01"]
    at = min(budget, len(top["median"])) - 1
    ef = entry["ef0.01"]["median"][at]
    t = entry["time_s"]
    return [
        f"{top['median'][at]:.2f} [{top['p05'][at]:.2f}-{top['p95'][at]:.2f}]",
        _fmt(ef),
        _fmt(entry.get("af_0.5_top0.01")),
        _fmt(entry.get("coverage90"), 2),
        f"{t['fit'] + t['score']:.1f} / {t['acquisition']:.1f}",
    ]


def table() -> str:
    lines = [
        "| benchmark (seeds) | strategy | Top% at budget, median [5-95] | EF | AF(50 %) "
        "| 90 % cover (own picks) | s/run fit+score / acq |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in LABELS.items():
        path = RESULTS / name / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        title = label.format(budget=data["budget"], pool=data["pool"]) + f" ({data['seeds']})"
        batch_sizes = {e["batch_size"] for e in data["strategies"].values()}
        for i, (strategy, entry) in enumerate(sorted(data["strategies"].items())):
            # the batch-size suffix only where a benchmark compares batch sizes
            short = strategy if len(batch_sizes) > 1 else re.sub(r"-q\d+$", "", strategy)
            lines.append(
                "| "
                + " | ".join([title if i == 0 else "", short, *_row(entry, data["budget"])])
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table, change nothing")
    args = parser.parse_args()
    text = table()
    if args.print:
        print(text)
        return
    readme = ROOT / "README.md"
    source = readme.read_text()
    if START not in source or END not in source:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    head, rest = source.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(f"rewrote the benchmark table in {readme}")


if __name__ == "__main__":
    main()
