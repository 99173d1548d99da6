"""A fine-tuning job: data source, splits, fit with early stopping, test metrics, predictions.

:func:`run_finetune_job` trains a :class:`~cloud_model.ensemble.CloudEnsemble`
(one member is plain fine-tuning) on the labelled data of a
:class:`~cloud_model.finetune_data.DataSource`, with early stopping on the
validation split, and scores the test split; :func:`predict_rows` turns an
ensemble's predictions into CSV rows (mean and std per output).
:func:`create_ensemble` is :meth:`CloudEnsemble.create` that also knows the
``debye_einstein`` head (Debye acoustic + Einstein optical branches).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from cloud_model.calibration import CalibrationReport, calibration_report
from cloud_model.checkpoint import resolve_checkpoint
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig, FitReport
from cloud_model.ensemble_runtime import EpochCallback
from cloud_model.errors import ConfigError, DataError
from cloud_model.finetune import MemberNet
from cloud_model.finetune_data import DataSource, LabelledData, load_labelled, split_rows
from cloud_model.heads import DebyeHeadConfig
from cloud_model.yaml_file import read_yaml

logger = logging.getLogger(__name__)

__all__ = [
    "DataSource",
    "FinetuneJob",
    "JobReport",
    "LabelledData",
    "EinsteinOptions",
    "HeadKind",
    "TargetMetrics",
    "create_ensemble",
    "load_labelled",
    "output_names",
    "predict_rows",
    "read_job",
    "run_finetune_job",
    "split_rows",
    "target_metrics",
    "write_csv",
]


HeadKind = Literal["regression", "debye", "debye_einstein"]


class EinsteinOptions(BaseModel):
    """The optical-branch part of the ``debye_einstein`` head (ignored by other heads)."""

    model_config = ConfigDict(extra="forbid")
    # Einstein temperatures describing the optical branches (1 = one flat optical band)
    modes: int = Field(default=1, ge=1, le=8)
    # acoustic share of the 3R per atom: 1/n_atoms (an exact mode count for n atoms per
    # primitive cell; needs n_atoms in the data) or learned per structure
    acoustic_fraction: Literal["per_atom", "learned"] = "per_atom"


class FinetuneJob(BaseModel):
    """A fine-tuning run as written in ``configs/finetune_*.yaml``."""

    model_config = ConfigDict(extra="forbid")
    data: DataSource
    # pretrained checkpoint: a directory, "default" (the shipped small model) or null (random init)
    checkpoint: str | None = "default"
    # regression; debye (theta, or Cv through a Debye temperature); debye_einstein (Cv through
    # a Debye temperature of the acoustic branches and Einstein temperatures of the optical ones)
    head: HeadKind = "regression"
    einstein: EinsteinOptions = Field(default_factory=EinsteinOptions)
    # 1 = plain fine-tuning; K > 1 = a deep ensemble with mean and std
    n_members: int = Field(default=1, ge=1)
    # all fine-tuning options; by default every block and the embeddings train
    model: EnsembleConfig = Field(
        default_factory=lambda: EnsembleConfig(n_trainable_blocks="all", loss="l1", epochs=60)
    )
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1)
    split_seed: int = 0

    @classmethod
    def from_yaml(cls, path: str | Path) -> FinetuneJob:
        """Read and validate a YAML job file (``ConfigError`` naming the file if invalid)."""
        raw = read_yaml(path, what="fine-tuning config")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"{path}: invalid fine-tuning config: {exc}") from exc


class TargetMetrics(BaseModel):
    """Test-set accuracy of one target (in its unit)."""

    model_config = ConfigDict(extra="forbid")
    n: int
    mae: float
    rmse: float
    mad: float  # mean absolute deviation of the truth from its mean
    mae_over_mad: float
    r2: float


class JobReport(BaseModel):
    """What :func:`run_finetune_job` did and how well the model does on the test split."""

    model_config = ConfigDict(extra="forbid")
    n_train: int  # rows with at least one finite label (unlabelled rows are not counted)
    n_val: int
    n_test: int
    n_invalid: int  # rows left out: no usable structure
    seconds: float
    fit: FitReport
    # rows left out because every target cell is empty or not a number, and the first few
    n_unlabelled: int = 0
    unlabelled_examples: list[str] = Field(default_factory=list)
    # how the test split was chosen, in words (e.g. "random 10 % (test_fraction 0.1, seed 0)")
    test_split: str = ""
    # "ensemble spread (K members)" or "none (one member)": a single model has no std
    uncertainty: str = ""
    test: dict[str, TargetMetrics] = Field(default_factory=dict)
    test_calibration: CalibrationReport | None = None


def target_metrics(pred: Tensor, truth: Tensor) -> TargetMetrics:
    """MAE, RMSE, MAD, MAE/MAD and R^2 over the finite entries of ``truth`` (1-D tensors)."""
    keep = torch.isfinite(truth)
    p, t = pred[keep].double(), truth[keep].double()
    if t.numel() < 2:
        raise DataError("need at least two finite test targets to score")
    err = p - t
    mad = float((t - t.mean()).abs().mean())
    ss_res, ss_tot = float((err**2).sum()), float(((t - t.mean()) ** 2).sum())
    mae = float(err.abs().mean())
    return TargetMetrics(
        n=int(t.numel()),
        mae=mae,
        rmse=float((err**2).mean().sqrt()),
        mad=mad,
        mae_over_mad=mae / mad if mad > 0 else math.inf,
        r2=1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
    )


def run_finetune_job(
    job: FinetuneJob, out: str | Path | None = None, *, on_epoch: EpochCallback | None = None
) -> tuple[CloudEnsemble, JobReport]:
    """Load data, split, fine-tune (early stopping on validation), score the test split.

    Args:
        job: the job description.
        out: directory for the trained model (``CloudEnsemble.save``) and ``report.json``.
        on_epoch: progress callback ``(member, epoch, train_loss, val_loss)``.

    Returns:
        The trained ensemble and the report.
    """
    start = time.perf_counter()
    if not job.data.targets:
        raise ConfigError("a fine-tuning job needs data.targets (the columns to learn)")
    data = load_labelled(job.data)
    labelled = torch.isfinite(data.y).any(1) if data.y.numel() else torch.zeros(0, dtype=torch.bool)
    unlabelled = [data.ids[i] for i in torch.nonzero(~labelled).flatten().tolist()]
    if unlabelled:  # no finite label: nothing to learn or score from these rows
        reasons = dict(data.invalid_labels)
        logger.warning(
            "%d of %d rows have no numeric label in %s and are left out (first: %s)",
            len(unlabelled),
            len(data.ids),
            list(data.target_names),
            "; ".join(f"{i}: {reasons.get(i, 'no label')}" for i in unlabelled[:3]),
        )
        data = data.subset(torch.nonzero(labelled).flatten())
    parts = split_rows(
        data, val_fraction=job.val_fraction, test_fraction=job.test_fraction, seed=job.split_seed
    )
    train, val, test = (data.subset(parts[k]) for k in ("train", "val", "test"))
    checkpoint = resolve_checkpoint(job.checkpoint)
    config = job.model
    if job.head == "regression" and config.target_names is None:
        config = config.model_copy(update={"target_names": data.target_names})
    ensemble = create_ensemble(
        checkpoint, job.n_members, job.head, len(data.target_names), config, einstein=job.einstein
    )
    validation = (val.scopes, val.y, val.n_atoms) if len(val.scopes) else None
    fit = ensemble.fit(
        train.scopes, train.y, n_atoms=train.n_atoms, validation=validation, on_epoch=on_epoch
    )
    report = JobReport(
        n_train=len(train.scopes),
        n_val=len(val.scopes),
        n_test=len(test.scopes),
        n_invalid=len(data.invalid),
        seconds=0.0,
        # one member has no spread: its "calibration" (std 0) would be meaningless
        fit=fit if ensemble.n_members > 1 else fit.model_copy(update={"validation": None}),
        n_unlabelled=len(unlabelled),
        unlabelled_examples=unlabelled[:5],
        test_split=_describe_test_split(data, job, len(test.scopes)),
        uncertainty=(
            f"ensemble spread ({ensemble.n_members} members)"
            if ensemble.n_members > 1
            else "none (one member)"
        ),
    )
    if len(test.scopes) >= 2:
        preds = ensemble.predict(test.scopes, n_atoms=test.n_atoms)  # (K, n, m)
        mean = preds.mean(0)
        for j, name in enumerate(data.target_names):
            report.test[name] = target_metrics(mean[:, j], test.y[:, j])
        if ensemble.n_members > 1:  # predict() already applied the fitted variance scale
            report.test_calibration = calibration_report(preds, test.y)
    report.seconds = time.perf_counter() - start
    if out is not None:
        directory = Path(out)
        ensemble.save(directory)
        (directory / "job.json").write_text(job.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (directory / "report.json").write_text(
            report.model_dump_json(indent=2) + "\n", encoding="utf-8"
        )
    return ensemble, report


def create_ensemble(
    checkpoint: str | Path | None,
    n_members: int,
    head: HeadKind,
    n_targets: int,
    config: EnsembleConfig | None = None,
    *,
    einstein: EinsteinOptions | None = None,
) -> CloudEnsemble:
    """A new, untrained ensemble; :meth:`CloudEnsemble.create` plus the ``debye_einstein`` head.

    The Debye + Einstein head shares the Debye head's config class (its ``kind`` tells
    them apart), so the ensemble is created with a Debye head and its member spec then
    given the Debye + Einstein head config; members are re-drawn from the same seeds.

    Args:
        checkpoint, n_members, n_targets, config: as :meth:`CloudEnsemble.create`.
        head: ``regression``, ``debye`` or ``debye_einstein``.
        einstein: modes and acoustic fraction of the ``debye_einstein`` head (defaults).

    Raises:
        ConfigError: the ``debye_einstein`` head with ``debye_output: theta``, and whatever
            :meth:`CloudEnsemble.create` raises.
    """
    if head != "debye_einstein":
        return CloudEnsemble.create(checkpoint, n_members, head, n_targets, config)
    config = config or EnsembleConfig()
    if config.debye_output != "heat_capacity":
        raise ConfigError(
            "the debye_einstein head is trained on heat capacities: set model.debye_output: "
            "heat_capacity (the debye head regresses theta labels)"
        )
    options = einstein or EinsteinOptions()
    base = CloudEnsemble.create(checkpoint, n_members, "debye", n_targets, config)
    head_config = DebyeHeadConfig.model_validate(
        {
            **base.spec.head.model_dump(),
            "kind": "debye_einstein",
            "einstein_modes": options.modes,
            "acoustic_fraction": options.acoustic_fraction,
        }
    )
    spec = base.spec.model_copy(update={"head": head_config})
    members = []
    for k in range(n_members):
        torch.manual_seed(config.seed + k)  # as CloudEnsemble.create: one draw per member
        members.append(MemberNet(spec, base.encoder).cpu())
    return CloudEnsemble(
        base.encoder,
        base.tokenizer,
        spec,
        members,
        config,
        source_checkpoint=base.source_checkpoint,
    )


def _describe_test_split(data: LabelledData, job: FinetuneJob, n_test: int) -> str:
    """How the test rows were chosen, in words (the CLI prints it; report.json keeps it)."""
    if {"train", "train_and_val"} & set(data.splits):
        return f"the source's test split ({n_test} rows)"
    if n_test == 0:
        return "none (test_fraction 0: every labelled row trains or validates)"
    return (
        f"{n_test} rows drawn at random (test_fraction {job.test_fraction:g}, split_seed "
        f"{job.split_seed}); set test_fraction: 0 to train on them"
    )


def output_names(ensemble: CloudEnsemble) -> tuple[str, ...]:
    """Names of the ensemble's output columns (regression targets, ``theta`` or ``cv_300K``...)."""
    from cloud_model.heads import RegressionHeadConfig

    spec = ensemble.spec
    if isinstance(spec.head, RegressionHeadConfig):
        return spec.head.target_names
    if spec.debye_output == "theta":
        return ("theta",)
    return tuple(f"cv_{t:g}K" for t in spec.temperatures)


def predict_rows(ensemble: CloudEnsemble, data: LabelledData) -> list[dict[str, object]]:
    """One output row per input: id, split, scope, ``<name>_mean``/``<name>_std`` per output.

    Debye ensembles also give ``theta_mean``/``theta_std`` (K; for ``debye_einstein`` the
    Debye temperature of the acoustic branches); known truth values
    of the data source's targets are copied into columns of their own names. A
    one-member model has no uncertainty: its rows carry no ``_std`` columns.
    """
    preds = ensemble.predict(data.scopes, n_atoms=data.n_atoms)  # (K, n, m)
    mean, std = preds.mean(0), preds.std(0, correction=0)
    names = output_names(ensemble)
    spread = ensemble.n_members > 1
    theta = None
    if ensemble.spec.head.kind == "debye" and ensemble.spec.debye_output != "theta":
        theta = ensemble.predict_theta(data.scopes)  # (K, n)
    elif ensemble.spec.head.kind == "debye_einstein":
        theta = ensemble.predict_theta(data.scopes)[..., 0]  # (K, n): the acoustic theta_D
    rows: list[dict[str, object]] = []
    for i, (rid, scope) in enumerate(zip(data.ids, data.scopes, strict=True)):
        row: dict[str, object] = {"id": rid, "split": data.splits[i], "scope": scope}
        for j, name in enumerate(names):
            row[f"{name}_mean"] = float(mean[i, j])
            if spread:
                row[f"{name}_std"] = float(std[i, j])
        if theta is not None:
            row["theta_mean"] = float(theta[:, i].mean())
            if spread:
                row["theta_std"] = float(theta[:, i].std(correction=0))
        for j, name in enumerate(data.target_names):
            row[name] = float(data.y[i, j])
        rows.append(row)
    return rows


def write_csv(path: str | Path, rows: list[dict[str, object]]) -> None:
    """Write dictionaries with identical keys as a CSV file."""
    if not rows:
        raise DataError("nothing to write: no predictions")
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_job(directory: str | Path) -> FinetuneJob | None:
    """The job that trained the model in ``directory`` (its ``job.json``), if recorded."""
    path = Path(directory) / "job.json"
    if not path.is_file():
        return None
    try:
        return FinetuneJob.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid job record: {exc}") from exc
