"""Replay the ``auto`` surrogate's recalibration on finished benchmark runs.

Every ``auto`` run keeps, in its newest model version, each candidate model's prequential
record: the predictions each model version made of the rows measured after it, in the
order they were measured. The store's model versions say how long the record was at each
refit (``<member>.prequential_values``) and which member was chosen. That is enough to
recompute, offline and in seconds, the interval coverage that any recalibration rule would
have had on the chosen model's next rows, without rerunning a campaign. The acquisition
runs on the chosen member's own belief, so a rule changes the reported beliefs, and, in
pools larger than the acquisition's shortlist (2,048), which candidates reach the shortlist
(ranked on the reported belief); the replay holds the picks fixed.

    cloudlab bench configs/bench_aflow_debye_diverse.yaml --out runs/bench_aflow_debye_diverse
    python benchmarks/calibration_replay.py runs/bench_aflow_debye_diverse \
        --out benchmarks/results/calibration_replay_aflow_debye_diverse.json

Coverage here is of model version ``v``'s predictions of the rows measured between refits
``v`` and ``v + 1``; the benchmark table's coverage is of the predictions recorded when each
pick was decided, which differ only where a batch was decided by an older version. The first
version (fitted before any prequential value exists, calibrated on held-out training rows)
is not replayed.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
from collections.abc import Callable
from pathlib import Path

from loop.auto_surrogate import _Z90, PrequentialRecord, Recalibration, recalibrate

_MIN_EVIDENCE = 8  # fewer values leave the choice at its fallback (AutoSurrogate: 24 now)
Rule = Callable[[PrequentialRecord, int, float], Recalibration]


def _rule(held_out: bool, adaptive: bool, shrink: bool = True) -> Rule:
    """:func:`recalibrate` with leave-one-out or in-sample residuals and with the adaptive
    or the plain split-conformal level (both off: the rule before this change)."""
    return lambda record, m, floor: recalibrate(
        record, m, floor, held_out=held_out, adaptive=adaptive, shrink=shrink
    )


def _prefix(record: PrequentialRecord, n: int) -> PrequentialRecord:
    out = PrequentialRecord()
    out.mean, out.std, out.y = record.mean[:n], record.std[:n], record.y[:n]
    out.target, out.own = record.target[:n], record.own[:n]
    return out


def _newest_state(run: Path) -> dict | None:
    versions = sorted(
        (p for p in run.rglob("auto.json") if p.parent.name[1:].isdigit()),
        key=lambda p: int(p.parent.name[1:]),
    )
    return json.loads(versions[-1].read_text()) if versions else None


def replay_run(run: Path, rules: dict[str, Rule]) -> dict[str, list[tuple[int, bool]]] | None:
    """Per rule, ``(version, covered)`` for every replayed value of one run (None: not auto)."""
    state = _newest_state(run)
    db = next(run.rglob("campaign.sqlite"), None)
    if state is None or db is None:
        return None
    members: list[str] = state["members"]
    records = {n: PrequentialRecord.from_json(r) for n, r in state["records"].items()}
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT version, metrics FROM model_versions ORDER BY version"
        ).fetchall()
    lengths = []
    for version, metrics in rows:
        m = json.loads(metrics)
        lengths.append((version, int(m.get(f"{members[0]}.prequential_values", 0)), m))
    out: dict[str, list[tuple[int, bool]]] = {name: [] for name in rules}
    floor = float(state["floor"])
    for k, (version, start, metrics) in enumerate(lengths):
        end = lengths[k + 1][1] if k + 1 < len(lengths) else len(records[members[0]])
        if start < _MIN_EVIDENCE or end <= start:
            continue
        chosen = members[int(metrics["chosen_index"])]
        record = records[chosen]
        mean, std, y, _ = (t[start:end] for t in record.column(0))
        for name, rule in rules.items():
            recal = rule(_prefix(record, start), 1, floor)
            mu, sd = recal.apply(mean.unsqueeze(-1), std.clamp_min(floor).unsqueeze(-1))
            covered = ((y - mu.squeeze(-1)).abs() <= _Z90 * sd.squeeze(-1)).tolist()
            out[name] += [(version, bool(c)) for c in covered]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    rules: dict[str, Rule] = {
        # the shipped recalibration; the shipped AutoSurrogate also calibrates versions with
        # fewer than 24 prequential values on leave-one-out rows, which are not replayed here
        "shipped": _rule(held_out=True, adaptive=True),
        "no_slope_prior": _rule(held_out=True, adaptive=True, shrink=False),  # before 2026-12-04
        "held_out_split": _rule(held_out=True, adaptive=False, shrink=False),
        "in_sample_adaptive": _rule(held_out=False, adaptive=True, shrink=False),
        "in_sample_split": _rule(held_out=False, adaptive=False, shrink=False),  # the first rule
    }
    summary: dict[str, dict] = {}
    for bench in args.bench_dirs:
        runs = sorted(p for p in (bench / "runs").iterdir() if p.is_dir())
        per_rule: dict[str, list[float]] = {n: [] for n in rules}
        pooled: dict[str, list[bool]] = {n: [] for n in rules}
        by_version: dict[str, dict[int, list[bool]]] = {n: {} for n in rules}
        for run in runs:
            res = replay_run(run, rules)
            if res is None:
                continue
            for name, values in res.items():
                if values:
                    hits = [c for _, c in values]
                    per_rule[name].append(sum(hits) / len(hits))
                    pooled[name] += hits
                    for version, c in values:
                        by_version[name].setdefault(version, []).append(c)
        summary[bench.name] = {
            name: {
                "runs": len(per_rule[name]),
                "values": len(pooled[name]),
                "coverage_pooled": sum(pooled[name]) / max(len(pooled[name]), 1),
                "coverage_median_run": statistics.median(per_rule[name])
                if per_rule[name]
                else None,
                # model version -> coverage of its next rows, pooled over the runs
                "coverage_by_version": {
                    v: sum(c) / len(c) for v, c in sorted(by_version[name].items())
                },
            }
            for name in rules
        }
        for name, s in summary[bench.name].items():
            print(
                f"{bench.name} {name}: coverage {s['coverage_pooled']:.3f} pooled over "
                f"{s['values']} values, median run {s['coverage_median_run']}; by version "
                + " ".join(f"v{v} {c:.2f}" for v, c in s["coverage_by_version"].items())
            )
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
