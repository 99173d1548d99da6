"""The campaign report can be acted on: values with units and sign, formulas, what the
top set is, a clipped z histogram, the surrogate in words, and no stale or silently
missing sections."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import pytest

from cloud_model.datasets import load_dataset
from loop.campaign import Campaign
from loop.config import parse_config
from loop.report import _z_histogram, write_report
from loop.store import CampaignStore

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A finished inline campaign: minimise heat_ref (eV) over 60 hand-picked perov_5 crystals."""
    ids = [r.id for r in load_dataset("perov_5", ["val"]).records[:60]]
    root = tmp_path_factory.mktemp("report")
    data = {
        "name": "reporttest",
        "seed": 1,
        "pool": {"dataset": "perov_5", "splits": ["val"], "include_ids": ids},
        "objective": {"target": "heat_ref", "sense": "minimize"},
        "surrogate": {"kind": "cloud_ensemble", "checkpoint": None, "n_members": 3,
                      "ensemble": {"n_trainable_blocks": 0, "model_size": "tiny", "epochs": 10}},
        "acquisition": {"kind": "qlogei", "batch_size": 4},
        "initial_design": {"n_random": 8},
        "budget": {"experiments": 20},
        "adapter": {"kind": "simulated", "seed": 1, "capacity": 4, "noise": {"sigma": 0.02},
                    "time_acceleration": 7200},
        "dispatch": {"mode": "inline", "wait_for": "all", "poll_interval_s": 0.05},
        "finetune": {"every_n_results": 4},
    }  # fmt: skip
    out = root / "run"
    Campaign(parse_config(data), out).run()
    return out


def test_report_states_values_units_formulas_and_the_top_set(finished: Path) -> None:
    (finished / "report").mkdir(exist_ok=True)
    (finished / "report" / "from_an_old_run.png").write_bytes(b"stale")
    text = write_report(finished).read_text()
    with CampaignStore(finished, create=False) as store:
        measured = {m.candidate_id: m.values["heat_ref"] for m in store.measurements()}
    best_id = min(measured, key=lambda c: measured[c].value)
    assert measured[best_id].unit  # the simulated lab measures in the pool's unit
    # the best candidate with its own value (lowest heat_ref, its sign), unit, formula, SCOPE
    assert "| rank | candidate | formula | heat_ref" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert f"| {best_id} |" in row and f"{measured[best_id].value:.4g}" in row
    assert "`" in row.split("|")[-2]  # the SCOPE string, quoted
    formula = row.split("|")[3].strip()
    assert formula and formula[0].isupper()
    assert "lower is better" in text
    # what the top set is: a fraction of this 60-candidate pool
    assert "top 5% of the pool: 3 candidates (of 60)" in text
    # the surrogate in words
    assert "90 % intervals held" in text and "NLL" in text and "baseline" in text
    # a figure this run did not draw is gone
    assert not (finished / "report" / "from_an_old_run.png").exists()
    assert (finished / "report" / "top_found.png").is_file()


def test_report_marks_what_it_cannot_show_and_removes_its_old_figure(
    finished: Path, tmp_path: Path
) -> None:
    import json

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    write_report(copy)
    assert (copy / "report" / "top_found.png").is_file()
    with CampaignStore(copy, create=False) as store:  # the pool's source moved away
        config = json.loads(store.get_meta("config") or "{}")
        config["pool"] = {"file": str(tmp_path / "moved.csv"), "id_column": "id",
                          "structure_column": "cif", "structure_format": "cif"}  # fmt: skip
    with CampaignStore(copy) as store:
        store.set_meta("config", json.dumps(config))
    text = write_report(copy).read_text()
    section = text.split("## Top candidates found", 1)[1].split("##", 1)[0]
    assert "_missing: the pool's source could not be loaded" in section
    assert not (copy / "report" / "top_found.png").exists()  # not the previous run's figure


def test_z_histogram_is_clipped_so_the_normal_curve_shows() -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    n_out = _z_histogram(ax, [-250.0, -1.0, 0.0, 0.3, 1.2, 250.0])
    assert n_out == 2
    assert ax.get_xlim() == (-5.0, 5.0)
    heights = [p.get_height() for p in ax.patches]
    assert heights[0] > 0 and heights[-1] > 0  # the clipped values sit in the edge bins
    plt.close(fig)
