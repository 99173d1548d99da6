"""Fine-tuning on real data slices with a tiny encoder: learning, early stopping, NaNs, splits."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cloud_model.datasets import load_dataset
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig
from cloud_model.finetune import FinetuneConfig, _param_groups, masked_loss
from cloud_model.finetune_data import DataSource, load_labelled, split_rows
from cloud_model.finetune_job import FinetuneJob, predict_rows, run_finetune_job, write_csv
from cloud_model.heads import RegressionHead
from cloud_model.model import Block

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cv_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLOUD-format CSV (SCOPE column `cloud`) of 260 real rows with a split column."""
    train = load_dataset("cloud_cv", ["train_and_val"]).records[:220]
    test = load_dataset("cloud_cv", ["test"]).records[:40]
    path = tmp_path_factory.mktemp("cv") / "cv.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "cloud", "cv", "n_atoms", "part"])
        for r in train + test:
            writer.writerow([r.id, r.scope, r.targets["cv"], r.extra["n_atoms"], r.split])
    return path


def _tiny(**overrides: object) -> EnsembleConfig:
    base: dict[str, object] = {
        "model_size": "tiny",
        "n_trainable_blocks": "all",
        "device": "cpu",
        "parallel": "in_process",
        "epochs": 8,
        "batch_size": 32,
        "lr_encoder": 1e-3,
        "lr_head": 2e-3,
        "head_dropout": 0.0,
    }
    base.update(overrides)
    return EnsembleConfig.model_validate(base)


def test_finetuning_lowers_validation_loss_and_scores_test(cv_csv: Path, tmp_path: Path) -> None:
    source = DataSource(csv=cv_csv, targets=("cv",), split_column="part")
    job = FinetuneJob(data=source, checkpoint=None, model=_tiny(patience=8), val_fraction=0.2)
    ensemble, report = run_finetune_job(job, tmp_path / "model")
    assert (report.n_train, report.n_val, report.n_test) == (176, 44, 40)
    history = report.fit.members[0].history
    first_val = history[0][1]
    assert first_val is not None and report.fit.members[0].val_loss is not None
    assert report.fit.members[0].val_loss < 0.8 * first_val
    metrics = report.test["cv"]
    assert metrics.n == 40 and metrics.mae_over_mad < 1.0 and math.isfinite(metrics.r2)
    # the saved model predicts the same as the one in memory, through the CSV writer
    loaded = CloudEnsemble.load(tmp_path / "model")
    data = load_labelled(DataSource(csv=cv_csv, targets=("cv",), split_column="part"))
    rows = predict_rows(loaded, data.subset(torch.arange(220, 260)))
    direct = ensemble.predict(data.scopes[220:260]).mean(0)[:, 0]
    assert [r["cv_mean"] for r in rows] == pytest.approx(direct.tolist(), rel=1e-5)
    write_csv(tmp_path / "p.csv", rows)
    # one member: no uncertainty, so no cv_std column (a std of 0.0 would claim certainty)
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "id,split,scope,cv_mean,cv"


def test_every_block_trains_and_the_frozen_trunk_does_not(cv_csv: Path) -> None:
    data = load_labelled(DataSource(csv=cv_csv, targets=("cv",)))
    ens = CloudEnsemble.create(None, 1, "regression", 1, _tiny(n_trainable_blocks=1, epochs=2))
    trunk_before = {k: v.clone() for k, v in ens.encoder.state_dict().items()}
    ens.fit(data.scopes[:64], data.y[:64])
    block_before = ens.encoder.blocks[-1].state_dict()  # the member's top block started here
    member_block = ens.members[0].blocks[0].state_dict()
    changed = [k for k in block_before if not torch.equal(block_before[k], member_block[k])]
    assert len(changed) == len(block_before)  # every tensor of the trainable block moved
    for k, v in ens.encoder.state_dict().items():
        assert torch.equal(v, trunk_before[k]), k


def test_early_stopping_stops_when_validation_cannot_improve(cv_csv: Path) -> None:
    data = load_labelled(DataSource(csv=cv_csv, targets=("cv",)))
    ens = CloudEnsemble.create(None, 1, "regression", 1, _tiny(epochs=40, patience=2))
    shuffled = data.y[100:160][torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    report = ens.fit(
        data.scopes[:100], data.y[:100], validation=(data.scopes[100:160], shuffled, None)
    )
    member = report.members[0]
    assert member.stopped_early and member.epochs_run < 40
    assert member.epochs_run == member.best_epoch + 2
    best = min(v for _, v in member.history if v is not None)
    assert member.val_loss == pytest.approx(best)


def test_nan_targets_are_ignored(cv_csv: Path) -> None:
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    y = torch.tensor([[2.0, float("nan")], [3.0, 8.0], [float("nan"), 7.0]])
    scale = torch.tensor([1.0, 2.0])
    assert float(masked_loss(pred, y, scale, "l1")) == pytest.approx((1 + 0 + 2 + 0.5) / 4)
    assert float(masked_loss(pred, y, scale, "mse")) == pytest.approx((1 + 0 + 4 + 0.25) / 4)
    # a second target that is missing on every other row trains without NaNs
    data = load_labelled(DataSource(csv=cv_csv, targets=("cv", "n_atoms")))
    y2 = data.y[:96].clone()
    y2[::2, 1] = float("nan")
    ens = CloudEnsemble.create(None, 1, "regression", 2, _tiny(epochs=2))
    report = ens.fit(data.scopes[:96], y2)
    assert all(math.isfinite(t) for t, _ in report.members[0].history)
    head = ens.members[0].head
    assert isinstance(head, RegressionHead)
    std = head.target_std  # statistics from the finite entries only
    assert float(std[1]) == pytest.approx(float(y2[1::2, 1].std()), rel=1e-4)
    assert bool(torch.isfinite(ens.predict(data.scopes[:8])).all())


def test_registry_and_random_splits_are_disjoint() -> None:
    data = load_labelled(DataSource(dataset="cloud_cv", targets=("cv",)))
    parts = split_rows(data, val_fraction=0.1, seed=3)
    sets = {k: set(v.tolist()) for k, v in parts.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])
    assert len(sets["train"]) + len(sets["val"]) + len(sets["test"]) == len(data.scopes)
    assert {data.splits[i] for i in sets["test"]} == {"test"}  # the registry's test split
    assert {data.splits[i] for i in sets["val"]} == {"train_and_val"}  # val from training rows
    assert len(sets["val"]) == round(0.1 * 1213)
    again = split_rows(data, val_fraction=0.1, seed=3)
    assert all(torch.equal(parts[k], again[k]) for k in parts)  # deterministic
    data.splits = [""] * len(data.splits)  # no labels: seeded random three-way split
    random_parts = split_rows(data, val_fraction=0.2, test_fraction=0.1, seed=0)
    sizes = {k: len(v) for k, v in random_parts.items()}
    assert sizes == {"test": 151, "val": 302, "train": 1059}
    assert len(set().union(*(set(v.tolist()) for v in random_parts.values()))) == 1512
    assert data.n_atoms is not None and data.n_atoms.shape == (1512,)


def test_csv_with_cif_column_is_encoded(tmp_path: Path) -> None:
    records = load_dataset("perov_5", ["val"]).records[:6]
    path = tmp_path / "cifs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["material_id", "cif", "heat_ref"])
        writer.writerows([r.id, r.cif, r.targets["heat_ref"]] for r in records)
        writer.writerow(["broken", "not a cif", "0.0"])
    data = load_labelled(DataSource(csv=path, targets=("heat_ref",)))
    assert len(data.scopes) == 6 and data.invalid[0][0] == "broken"
    assert all(s.count(" | ") == 2 for s in data.scopes)
    assert data.y.shape == (6, 1)


def test_layer_wise_learning_rate_decay() -> None:
    ens = CloudEnsemble.create(None, 1, "regression", 1, _tiny(layer_decay=0.5))
    config = FinetuneConfig(lr_head=1e-3, lr_encoder=1e-4, layer_decay=0.5)
    member = ens.members[0]
    lrs = {id(p): g["lr"] for g in _param_groups(member, config) for p in g["params"]}  # type: ignore[attr-defined]
    assert lrs[id(member.head.net[-1].weight)] == 1e-3
    top, bottom = member.blocks[-1], member.blocks[0]
    assert isinstance(top, Block) and isinstance(bottom, Block)
    assert lrs[id(top.mlp.fc.weight)] == pytest.approx(1e-4)
    assert lrs[id(bottom.mlp.fc.weight)] == pytest.approx(1e-4 * 0.5)
    assert member.embed is not None
    assert lrs[id(member.embed["tok"].weight)] == pytest.approx(1e-4 * 0.25)


def test_example_configs_load() -> None:
    paths = sorted((REPO / "configs").glob("finetune_*.yaml"))
    assert paths, "no configs/finetune_*.yaml examples"
    for path in paths:
        job = FinetuneJob.from_yaml(path)
        assert job.data.targets


def test_cli_finetune_then_predict(cv_csv: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loop.cli import app

    config = tmp_path / "job.yaml"
    config.write_text(
        f"data: {{csv: {cv_csv}, targets: [cv], split_column: part, limit: 120}}\n"
        "checkpoint: null\nhead: debye\nn_members: 2\nval_fraction: 0.2\n"
        "model: {model_size: tiny, n_trainable_blocks: 0, epochs: 2, device: cpu,"
        " debye_output: heat_capacity, temperatures: [300.0]}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", str(config), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "report.json").is_file() and (tmp_path / "m" / "job.json").is_file()
    out = tmp_path / "preds.csv"
    result = runner.invoke(
        app, ["predict", "--model", str(tmp_path / "m"), "--input", str(cv_csv), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 260
    assert set(rows[0]) >= {"id", "cv_300K_mean", "cv_300K_std", "theta_mean", "theta_std", "cv"}
    assert all(float(r["theta_mean"]) > 0 and float(r["cv_300K_std"]) >= 0 for r in rows)


def test_cli_finetune_as_a_batch_job(cv_csv: Path, tmp_path: Path) -> None:
    """Not a terminal: a log line per epoch; unlabelled rows counted and left out; one
    member says "no uncertainty"; the random test split is stated; predict takes
    --structure-column and --threads."""
    import json

    from typer.testing import CliRunner

    from loop.cli import app

    rows = list(csv.DictReader(cv_csv.open()))[:60]
    rows[3]["cv"], rows[7]["cv"], rows[11]["cv"] = "", "n/a", "nan"
    data = tmp_path / "train.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "structure", "cv"])  # a structure column of its own name
        writer.writerows([r["id"], r["cloud"], r["cv"]] for r in rows)
    config = tmp_path / "job.yaml"
    config.write_text(
        f"data: {{csv: {data}, targets: [cv], structure_column: structure,"
        " structure_format: scope}\ncheckpoint: null\nn_members: 1\n"
        "model: {model_size: tiny, n_trainable_blocks: 0, epochs: 3, device: cpu}\n"
    )
    runner = CliRunner()
    result = runner.invoke(
        app, ["finetune", str(config), "--out", str(tmp_path / "m"), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    epochs = [line for line in result.stderr.splitlines() if "epoch " in line and "/3:" in line]
    assert len(epochs) == 3  # one line per epoch as it ends, not a bar drawn at the end
    assert "left out 3 rows without a numeric label" in result.stdout
    assert "test split: 6 rows drawn at random (test_fraction 0.1" in result.stdout
    assert "uncertainty: none (one member)" in result.stdout
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["n_unlabelled"] == 3 and len(report["unlabelled_examples"]) == 3
    assert report["n_train"] + report["n_val"] + report["n_test"] == 57  # 60 - 3 unlabelled
    assert report["fit"]["validation"] is None  # no NLL of a zero spread
    assert report["uncertainty"] == "none (one member)"
    out = tmp_path / "p.csv"
    result = runner.invoke(
        app,
        ["predict", "--model", str(tmp_path / "m"), "--input", str(data), "--out", str(out),
         "--structure-column", "structure", "--threads", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "one member: no uncertainty" in result.stdout
    header = out.read_text().splitlines()[0].split(",")
    assert header == ["id", "split", "scope", "cv_mean", "cv"]  # no cv_std of 0.0
    result = runner.invoke(
        app,
        ["predict", "--model", str(tmp_path / "m"), "--input", str(data), "--out", str(out),
         "--structure-column", "nosuch"],
    )  # fmt: skip
    assert result.exit_code != 0 and "nosuch" in str(result.exception)
