"""Ground truth for simulated-lab tests: real perov_5 rows from the offline mirror."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

UNITS = {"heat_ref": "eV", "dir_gap": "eV"}


@pytest.fixture(scope="session")
def perov_truth(data_dir: Path) -> dict[str, dict[str, float]]:
    """The first 400 perov_5 validation crystals: material id -> {heat_ref, dir_gap} (eV)."""
    csv.field_size_limit(10**8)
    truth: dict[str, dict[str, float]] = {}
    with (data_dir / "cdvae" / "perov_5" / "val.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            truth[f"perov_5:{row['material_id']}"] = {t: float(row[t]) for t in UNITS}
            if len(truth) == 400:
                break
    return truth
