"""The downstream suite end to end on a few cloud_cv rows with a tiny checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks.downstream import SuiteOptions, TimeBudget, run_suite
from benchmarks.downstream_table import table
from cloud_model.checkpoint import ModelCard, save_checkpoint
from cloud_model.heads import MaskedLMHeadConfig, build_model
from cloud_model.model import CloudConfig
from cloud_model.tokenizer import ScopeTokenizer


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = ScopeTokenizer.default()
    torch.manual_seed(123)  # not the scratch cells' seed: the two encoders must differ
    model = build_model(CloudConfig.named("tiny", tokenizer.vocab_size), MaskedLMHeadConfig())
    path = tmp_path_factory.mktemp("ck") / "tiny-test"
    save_checkpoint(path, model, tokenizer, ModelCard(name="tiny-test", size="tiny"))
    return path


def test_suite_runs_resumes_and_tabulates(tiny_checkpoint: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    options = SuiteOptions(
        checkpoint=str(tiny_checkpoint),
        tasks=["cloud_cv"],
        quick=True,
        epochs=3,
        task_minutes=1e-6,  # every fine-tuning run stops after its first epoch
        max_train=48,
        max_test=32,
        forest_trees=20,
        device="cpu",
    )
    out = tmp_path / "downstream.json"
    lines: list[str] = []
    report = run_suite(options, out, echo=lines.append)
    task = report["tasks"]["cloud_cv"]
    assert task["n_train"] == [48] and task["n_test"] == [32] and task["n_val"] == [10]
    assert task["budget_minutes"] == pytest.approx(1e-6)
    expected = {
        "probe",
        "finetune_debye",
        "finetune_debye_einstein",
        "scratch_debye",
        "scratch_debye_einstein",
        "composition",
    }
    assert set(task["cells"]) == expected
    assert len(lines) == 6 and lines[0].startswith("[1/6] cloud_cv/probe: MAE")
    for name, cell in task["cells"].items():
        assert cell["n_test"] == 32 and math.isfinite(cell["mae"]) and cell["mad"] > 0, name
        assert cell["mae_over_mad"] == pytest.approx(cell["mae"] / cell["mad"])
        if name.startswith(("finetune", "scratch")):
            assert cell["epochs_run"] == [1] and cell["stopped_by_budget"] == 1
    # pretrained and scratch encoders differ, so their fine-tuned predictions differ
    assert task["cells"]["finetune_debye"]["mae"] != task["cells"]["scratch_debye"]["mae"]
    summary = report["summary"]
    assert "pretrained_vs_scratch_pct" in summary["per_task"]["cloud_cv"]
    assert summary["line"].startswith("QUICK")
    # a rerun with the same settings skips every finished cell
    again: list[str] = []
    resumed = run_suite(options, out, echo=again.append)
    assert again == [] and resumed["tasks"] == report["tasks"]
    # other settings are refused rather than mixed into the same file
    with pytest.raises(SystemExit, match="other settings"):
        run_suite(SuiteOptions(**{**options.__dict__, "epochs": 4}), out, echo=again.append)
    markdown = table(resumed)
    assert "| cloud_cv (Debye + Einstein) | J/(mol K) | train/val -> test |" in markdown
    assert markdown.count("\n| cloud_cv") == 2


def test_time_budget_callback() -> None:
    assert TimeBudget(3600.0)(0, 1, 0.5, None) is False
    budget = TimeBudget(0.0)
    assert budget(0, 1, 0.5, 0.4) is True and budget.spent
