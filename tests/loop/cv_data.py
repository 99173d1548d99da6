"""Small real pools for the loop tests: the first rows of cloud_cv (SCOPE strings + Cv at 300 K)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def cv_rows(data_dir: Path, n: int) -> list[dict[str, str]]:
    """The first ``n`` crystals of cloud_cv's train+val file as ``{id, scope, cv}`` rows."""
    path = data_dir / "cloud" / "cloud_cv_train_and_val.csv"
    with path.open() as fh:
        rows = [r for _, r in zip(range(n), csv.DictReader(fh), strict=False)]
    return [{"id": f"cv-{i}", "scope": r["cloud"], "cv": r["cv"]} for i, r in enumerate(rows)]


def write_cv_pool(path: Path, rows: list[dict[str, str]]) -> Path:
    """``rows`` of :func:`cv_rows` as a CSV pool (columns id, scope, cv)."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "scope", "cv"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def cv_scopes(data_dir: Path, n: int) -> tuple[list[str], torch.Tensor]:
    """SCOPE strings of the first ``n`` crystals and their Cv as an ``n x 1`` float64 tensor."""
    rows = cv_rows(data_dir, n)
    return [r["scope"] for r in rows], torch.tensor(
        [[float(r["cv"])] for r in rows], dtype=torch.float64
    )
