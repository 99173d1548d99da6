"""Print the README markdown table of a downstream-suite JSON (``benchmarks/downstream.py``).

python benchmarks/downstream_table.py benchmarks/results/downstream_cloud-small_quick.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEAD_NAMES = {"debye": "Debye", "debye_einstein": "Debye + Einstein"}
SPLIT_NAMES = {
    "split": "train/val -> test",
    "cv5": "5-fold CV",
    "val_to_test": "val -> test (time)",
}


def _cell(cell: dict[str, Any] | None) -> str:
    """``MAE (MAE/MAD)`` or a dash."""
    if cell is None:
        return "-"
    return f"{cell['mae']:.4g} ({cell['mae_over_mad']:.3f})"


def _gain(finetune: dict[str, Any] | None, scratch: dict[str, Any] | None) -> str:
    if finetune is None or scratch is None:
        return "-"
    return f"{100.0 * (scratch['mae'] - finetune['mae']) / scratch['mae']:+.1f} %"


def table(report: dict[str, Any]) -> str:
    """The markdown table (one row per task and fine-tuning head) and the targets' line."""
    settings = report.get("settings", {})
    checkpoint = settings.get("checkpoint", {})
    lines = [
        f"Checkpoint `{checkpoint.get('name', '?')}`"
        + (" (QUICK run: subsampled, few epochs)" if settings.get("quick") else "")
        + ". MAE (MAE/MAD) on each task's fixed held-out split; CV tasks average their folds.",
        "",
        "| task | unit | split | probe (ridge, frozen) | fine-tune | from scratch "
        "| composition (RF) | pretrained vs scratch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, task in report.get("tasks", {}).items():
        cells = task.get("cells", {})
        split = SPLIT_NAMES.get(task.get("protocol", ""), task.get("protocol", ""))
        if task.get("protocol") == "cv5" and task.get("n_folds") != 5:
            split = f"{task.get('n_folds')} of 5 CV folds"
        heads = [k.removeprefix("finetune_") for k in cells if k.startswith("finetune_")]
        variants = [(name, "finetune", "scratch")] if not heads else []
        variants += [
            (f"{name} ({HEAD_NAMES.get(h, h)})", f"finetune_{h}", f"scratch_{h}") for h in heads
        ]
        for label, ft, sc in variants:
            lines.append(
                f"| {label} | {task.get('unit', '')} | {split} | {_cell(cells.get('probe'))} "
                f"| {_cell(cells.get(ft))} | {_cell(cells.get(sc))} "
                f"| {_cell(cells.get('composition'))} | {_gain(cells.get(ft), cells.get(sc))} |"
            )
    summary = report.get("summary", {})
    if summary.get("line"):
        lines += ["", summary["line"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path, help="a JSON written by benchmarks/downstream.py")
    args = parser.parse_args()
    print(table(json.loads(args.json.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
