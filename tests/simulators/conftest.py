"""Ground truth for simulated-lab tests: real perov_5 rows from the dataset registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_model.datasets import load_dataset

UNITS = {"heat_ref": "eV", "dir_gap": "eV"}


@pytest.fixture(scope="session")
def perov_truth(data_dir: Path) -> dict[str, dict[str, float]]:
    """The first 400 perov_5 validation crystals: material id -> {heat_ref, dir_gap} (eV)."""
    records = load_dataset("perov_5", ["val"]).records[:400]
    return {r.id: {t: r.targets[t] for t in UNITS} for r in records}
