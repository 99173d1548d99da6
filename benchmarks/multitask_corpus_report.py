"""Real counts of the multi-task pretraining corpus: rows per task, and what the leakage guard removed.

Builds the default :class:`cloud_model.multitask_corpus.MultiTaskDataOptions` corpus
(every fair label of the structure sets, every ``crabnet_*`` formula set, the default
excluded pools), checks the kept rows against every pool by id, structure and reduced
formula (each criterion on its own: all must be 0), and writes the guard report with
per-task counts and timings. SCOPE encodings are cached per dataset, so the first run
encodes every CIF set with both variants (tens of minutes on 2 cores) and later runs
take about a minute.

    CLOUDLAB_THREADS=1 nice -n 10 python benchmarks/multitask_corpus_report.py \\
        --out benchmarks/results/multitask_corpus_guard.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud_model.leakage import RowKeys, build_pool_index, guard_summary, write_guard_report
from cloud_model.multitask_corpus import MultiTaskDataOptions, build_multitask_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/multitask_corpus_guard.json")
    )
    parser.add_argument("--processes", type=int, default=1, help="SCOPE-encoding worker processes")
    parser.add_argument("--variant", choices=("cloud", "native"), default="cloud")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    options = MultiTaskDataOptions(variant=args.variant, processes=args.processes)
    started = time.perf_counter()
    index = build_pool_index(options.pools, symprec=options.symprec, processes=args.processes)
    index_s = time.perf_counter() - started
    kept: dict[str, list[tuple[RowKeys, str]]] = {}
    corpus = build_multitask_corpus(options, kept_rows=kept, pool_index=index)
    build_s = time.perf_counter() - started - index_s

    overlap = {name: index.overlaps(k for k, _ in rows) for name, rows in kept.items()}
    leaks = {name: o for name, o in overlap.items() if any(o.values())}
    tasks: dict[str, Any] = {
        t.name: {
            "unit": t.unit,
            "composition_only": t.composition_only,
            "train": len(t.train),
            "validation": len(t.validation),
        }
        for t in corpus.tasks
    }
    pools = {
        name: {"rows": n, "no_formula": index.no_formula.get(name, 0)}
        for name, n in index.rows.items()
    }
    extra = {
        "benchmark": "multitask_corpus_guard",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "options": options.model_dump(mode="json"),
        "pool_index": {
            "splits": pools,
            "ids": len(index.ids),
            "native_strings": len(index.natives),
            "published_only_strings": len(index.clouds_only),
            "reduced_formulas": len(index.formulas),
        },
        "overlap_after_guard": overlap,
        "zero_overlap": not leaks,
        "tasks": tasks,
        "labelled_rows": sum(t["train"] + t["validation"] for t in tasks.values()),
        "mlm": {"train": len(corpus.mlm_train), "validation": len(corpus.mlm_validation)},
        "timing_s": {"pool_index": round(index_s, 1), "corpus": round(build_s, 1)},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    write_guard_report(corpus.guard, args.out, extra=extra)
    summary = guard_summary(corpus.guard)
    print(json.dumps({"removed_by_reason": summary["removed_by_reason"], "kept_total": summary["kept_total"],
                      "zero_overlap": not leaks, "labelled_rows": extra["labelled_rows"],
                      "mlm": extra["mlm"], "timing_s": extra["timing_s"]}, indent=1))  # fmt: skip
    print(f"{'task':58s} {'train':>8s} {'val':>6s}")
    for name, t in tasks.items():
        print(f"{name:58s} {t['train']:8d} {t['validation']:6d}")
    print(f"{'set':32s} {'kept':>8s}  removed")
    for name, n in corpus.guard.kept.items():
        print(f"{name:32s} {n:8d}  {corpus.guard.removed.get(name, {})}")
    print(f"wrote {args.out}")
    if leaks:
        raise SystemExit(f"leakage guard failed: {leaks}")


if __name__ == "__main__":
    main()
