"""Ship a pretrained run as the default checkpoint (``checkpoint: default``).

Copies a checkpoint directory (weights, tokenizer, card; e.g. a multi-task run's
``best/``) to ``cloud_model/checkpoints/<name>``, after loading it (so a broken or
mismatched checkpoint is refused), checking the weights against the card's sha256 and
the size limit, and writes into the card's ``evaluation`` the downstream suite's summary
(per-task MAEs of every cell, the targets, the settings and the command) from the given
results file. The weights file is copied byte for byte: its hash stays the card's.

    python benchmarks/ship_checkpoint.py runs/pretrain_multitask/best \\
        --downstream benchmarks/results/downstream_multitask.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from cloud_model.checkpoint import (
    CARD_FILE,
    SHIPPED_CHECKPOINT,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    file_sha256,
    load_checkpoint,
)
from cloud_model.errors import CheckpointError

CHECKPOINTS = Path(__file__).resolve().parents[1] / "cloud_model" / "checkpoints"
MAX_BYTES = 50_000_000  # the "under ~50 MB"


def downstream_evaluation(path: Path) -> dict[str, Any]:
    """The card's record of a downstream run: per-task cell MAEs, summary and settings."""
    report = json.loads(path.read_text())
    tasks = {
        name: {
            cell: {k: res[k] for k in ("mae", "mae_over_mad", "unit") if k in res}
            for cell, res in task.get("cells", {}).items()
        }
        for name, task in report.get("tasks", {}).items()
    }
    settings = report.get("settings", {})
    return {
        "suite": "benchmarks/downstream.py",
        "results_file": str(path),
        "command": report.get("command", ""),
        "quick": bool(settings.get("quick")),
        "tasks": tasks,
        "summary": report.get("summary", {}),
    }


def ship(source: Path, downstream: Path | None, name: str = SHIPPED_CHECKPOINT) -> Path:
    """Copy ``source`` to ``cloud_model/checkpoints/<name>`` with the evaluation in its card."""
    _, _, card = load_checkpoint(source)  # refuses a broken or inconsistent checkpoint
    weights = source / WEIGHTS_FILE
    size = weights.stat().st_size
    if size > MAX_BYTES:
        raise CheckpointError(f"{weights}: {size / 1e6:.1f} MB is over the {MAX_BYTES / 1e6:.0f} MB limit")
    if card.weights_sha256 and file_sha256(weights) != card.weights_sha256:
        raise CheckpointError(f"{weights}: sha256 differs from the card's weights_sha256")
    update: dict[str, Any] = {"name": name}
    if downstream is not None:
        update["evaluation"] = {"downstream": downstream_evaluation(downstream)}
    card = card.model_copy(update=update)
    target = CHECKPOINTS / name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target / WEIGHTS_FILE)
    shutil.copyfile(source / TOKENIZER_FILE, target / TOKENIZER_FILE)
    (target / CARD_FILE).write_text(card.model_dump_json(indent=1) + "\n")
    load_checkpoint(target)  # what was written loads
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="checkpoint directory (e.g. RUN/best)")
    parser.add_argument("--downstream", type=Path, default=None, help="downstream suite JSON")
    parser.add_argument("--name", default=SHIPPED_CHECKPOINT)
    args = parser.parse_args(argv)
    try:
        target = ship(args.source, args.downstream, args.name)
    except (CheckpointError, OSError, json.JSONDecodeError) as exc:
        sys.exit(f"ship_checkpoint: {exc}")
    print(f"shipped {args.source} -> {target} ({(target / WEIGHTS_FILE).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
