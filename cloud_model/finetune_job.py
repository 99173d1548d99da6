"""A fine-tuning job: labelled SCOPE strings from a registry dataset or a CSV, splits, fit, test.

Inputs (:class:`DataSource`): a registry dataset and target column(s) (CIF sets
are encoded with SCOPE through the cached :func:`cloud_model.corpus.encode_dataset`),
a CSV with a CIF column, or a CSV with a SCOPE column (CLOUD format). Splits
(:func:`split_rows`): the registry's where it has them (``train``/``val``/``test``;
``train_and_val`` is divided into train and validation), otherwise a seeded
random split; validation rows are never training rows. :func:`run_finetune_job`
trains a :class:`~cloud_model.ensemble.CloudEnsemble` (one member is plain
fine-tuning) with early stopping on validation and scores the test split.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from cloud_model.calibration import CalibrationReport, calibration_report
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig, FitReport
from cloud_model.ensemble_runtime import EpochCallback
from cloud_model.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SCOPE_COLUMNS = ("cloud", "scope")  # CSV columns read as SCOPE strings when no column is named


class DataSource(BaseModel):
    """Where labelled structures come from: a registry dataset or a CSV file."""

    model_config = ConfigDict(extra="forbid")
    dataset: str | None = None  # registry name, e.g. "cloud_cv", "aflow_debye_temperature"
    csv: Path | None = None  # or a CSV file with a structure column and target columns
    targets: tuple[str, ...] = ()  # target columns, in output order (none: prediction only)
    # CSV: the structure column and what it holds (default: "cloud"/"scope" -> SCOPE, "cif" -> CIF)
    structure_column: str | None = None
    structure_format: Literal["cif", "scope"] | None = None
    split_column: str | None = None  # CSV column holding train / val / test labels
    n_atoms_column: str | None = "n_atoms"  # atoms per cell (Debye Cv per mole of cells)
    variant: Literal["cloud", "native"] = "cloud"  # SCOPE grammar for CIF inputs
    symprec: float = Field(default=0.1, gt=0)  # spglib tolerance in Angstrom for CIF inputs
    processes: int = Field(default=1, ge=1)  # worker processes for SCOPE encoding
    limit: int | None = Field(default=None, ge=1)  # keep only the first rows (quick runs)

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.dataset is None) == (self.csv is None):
            raise ValueError("give exactly one of `dataset` (a registry name) or `csv` (a path)")
        return self


@dataclass
class LabelledData:
    """Labelled SCOPE strings: ``y`` is ``(n, m)`` with NaN where a target is missing."""

    ids: list[str]
    scopes: list[str]
    y: Tensor
    splits: list[str]
    target_names: tuple[str, ...]
    n_atoms: Tensor | None = None  # (n,)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) left out

    def subset(self, index: Tensor) -> LabelledData:
        """The rows ``index`` (a 1-D long tensor)."""
        rows = index.tolist()
        return LabelledData(
            ids=[self.ids[i] for i in rows],
            scopes=[self.scopes[i] for i in rows],
            y=self.y[index],
            splits=[self.splits[i] for i in rows],
            target_names=self.target_names,
            n_atoms=None if self.n_atoms is None else self.n_atoms[index],
        )


def _from_registry(source: DataSource) -> LabelledData:
    from cloud_model.datasets import get_spec, load_dataset

    name = source.dataset or ""
    spec = get_spec(name)
    unknown = [t for t in source.targets if t not in spec.targets]
    if unknown:
        raise ConfigError(
            f"dataset {name!r} has no target {unknown}; it has {sorted(spec.targets)}"
        )
    from cloud_model.corpus import encode_dataset_full

    records = load_dataset(name).records
    encoding = encode_dataset_full(
        name, variant=source.variant, symprec=source.symprec, processes=source.processes
    )
    encoded = encoding.strings
    kept = [r for r in records if r.id in encoded]
    invalid = list(encoding.errors.items())
    if source.limit is not None:
        kept = kept[: source.limit]
    atoms = [r.extra.get("n_atoms") for r in kept]
    return LabelledData(
        ids=[r.id for r in kept],
        scopes=[encoded[r.id] for r in kept],
        y=torch.tensor([[r.targets[t] for t in source.targets] for r in kept]).reshape(
            len(kept), len(source.targets)
        ),
        splits=[r.split for r in kept],
        target_names=source.targets,
        n_atoms=_atoms_tensor(atoms),
        invalid=invalid,
    )


def _atoms_tensor(values: list[Any]) -> Tensor | None:
    if not values or any(v is None or v == "" for v in values):
        return None
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _from_csv(source: DataSource) -> LabelledData:
    path = Path(source.csv or "")
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    header = set(rows[0]) if rows else set()
    column = source.structure_column or next(
        (c for c in (*SCOPE_COLUMNS, "cif") if c in header), None
    )
    if column is None or column not in header:
        raise DataError(f"{path}: no structure column (looked for {column or 'cloud/scope/cif'})")
    fmt = source.structure_format or ("cif" if column == "cif" else "scope")
    missing = [t for t in source.targets if t not in header]
    if missing:
        raise DataError(f"{path}: target columns {missing} not found in {sorted(header)}")
    if source.limit is not None:
        rows = rows[: source.limit]
    ids = [
        row.get("material_id") or row.get("id") or f"{path.stem}:{i}" for i, row in enumerate(rows)
    ]
    scopes: list[str | None] = [row[column] for row in rows]
    invalid: list[tuple[str, str]] = []
    if fmt == "cif":
        scopes = _encode_cifs(ids, scopes, source, invalid)
    keep = [i for i, s in enumerate(scopes) if s]
    atoms_col = source.n_atoms_column if source.n_atoms_column in header else None
    return LabelledData(
        ids=[ids[i] for i in keep],
        scopes=[scopes[i] or "" for i in keep],
        y=torch.tensor([[_number(rows[i][t]) for t in source.targets] for i in keep]).reshape(
            len(keep), len(source.targets)
        ),
        splits=[rows[i][source.split_column] if source.split_column else "" for i in keep],
        target_names=source.targets,
        n_atoms=_atoms_tensor([rows[i][atoms_col] for i in keep]) if atoms_col else None,
        invalid=invalid,
    )


def _encode_cifs(
    ids: list[str], texts: list[str | None], source: DataSource, invalid: list[tuple[str, str]]
) -> list[str | None]:
    from cloud_model.corpus import encode_structures

    result = encode_structures(
        [t or "" for t in texts],
        variant=source.variant,
        symprec=source.symprec,
        processes=source.processes,
    )
    invalid.extend((ids[i], why) for i, why in sorted(result.errors.items()))
    return result.strings


def load_labelled(source: DataSource) -> LabelledData:
    """Labelled SCOPE strings from a :class:`DataSource` (invalid rows left out, listed)."""
    data = _from_registry(source) if source.dataset is not None else _from_csv(source)
    if data.invalid:
        logger.warning("%d rows left out (first: %s)", len(data.invalid), data.invalid[0])
    if not data.scopes:
        raise DataError("no usable rows in the data source")
    return data


def split_rows(
    data: LabelledData, *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, Tensor]:
    """Disjoint train / val / test row indices.

    Registry (or ``split_column``) labels are used when there is a training split:
    ``train``, ``val``, ``test`` as given, ``train_and_val`` divided by a seeded draw of
    ``val_fraction`` of its rows. Otherwise (no labels, or e.g. only ``val``/``test``
    files) every row is drawn at random into test, val and train.
    """
    labels = data.splits
    gen = torch.Generator().manual_seed(seed)
    index = torch.arange(len(labels))

    def rows(name: str) -> Tensor:
        return index[torch.tensor([s == name for s in labels], dtype=torch.bool)]

    if {"train", "train_and_val"} & set(labels):
        pool = rows("train_and_val")
        pool = pool[torch.randperm(len(pool), generator=gen)]
        n_val = int(round(val_fraction * len(pool)))
        parts = {
            "train": torch.cat([rows("train"), pool[n_val:]]),
            "val": torch.cat([rows("val"), pool[:n_val]]),
            "test": rows("test"),
        }
    else:
        order = torch.randperm(len(labels), generator=gen)
        n_test = int(round(test_fraction * len(order)))
        n_val = int(round(val_fraction * len(order)))
        parts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
    return {name: part.sort().values for name, part in parts.items()}


class FinetuneJob(BaseModel):
    """A fine-tuning run as written in ``configs/finetune_*.yaml``."""

    model_config = ConfigDict(extra="forbid")
    data: DataSource
    # pretrained checkpoint: a directory, "default" (the shipped small model) or null (random init)
    checkpoint: str | None = "default"
    head: Literal["regression", "debye"] = "regression"
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
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            return cls.model_validate(raw)
        except (OSError, yaml.YAMLError, ValidationError) as exc:
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
    n_train: int
    n_val: int
    n_test: int
    n_invalid: int
    seconds: float
    fit: FitReport
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
    parts = split_rows(
        data, val_fraction=job.val_fraction, test_fraction=job.test_fraction, seed=job.split_seed
    )
    train, val, test = (data.subset(parts[k]) for k in ("train", "val", "test"))
    checkpoint: str | Path | None = job.checkpoint
    if checkpoint == "default":
        from cloud_model.checkpoint import default_checkpoint

        checkpoint = default_checkpoint()
    config = job.model
    if job.head == "regression" and config.target_names is None:
        config = config.model_copy(update={"target_names": data.target_names})
    ensemble = CloudEnsemble.create(
        checkpoint, job.n_members, job.head, len(data.target_names), config
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
        fit=fit,
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

    Debye ensembles also give ``theta_mean``/``theta_std`` (K); known truth values
    of the data source's targets are copied into columns of their own names.
    """
    preds = ensemble.predict(data.scopes, n_atoms=data.n_atoms)  # (K, n, m)
    mean, std = preds.mean(0), preds.std(0, correction=0)
    names = output_names(ensemble)
    theta = None
    if ensemble.spec.head.kind == "debye" and ensemble.spec.debye_output != "theta":
        theta = ensemble.predict_theta(data.scopes)  # (K, n)
    rows: list[dict[str, object]] = []
    for i, (rid, scope) in enumerate(zip(data.ids, data.scopes, strict=True)):
        row: dict[str, object] = {"id": rid, "split": data.splits[i], "scope": scope}
        for j, name in enumerate(names):
            row[f"{name}_mean"] = float(mean[i, j])
            row[f"{name}_std"] = float(std[i, j])
        if theta is not None:
            row["theta_mean"] = float(theta[:, i].mean())
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


def prediction_input(
    spec: str | Path,
    *,
    truth: tuple[str, ...] = (),
    variant: Literal["cloud", "native"] = "cloud",
    symprec: float = 0.1,
    processes: int = 1,
) -> LabelledData:
    """Structures to score: an existing CSV file, else a registry dataset name.

    Args:
        spec: a CSV path (SCOPE column ``cloud``/``scope`` or CIF column ``cif``) or a dataset.
        truth: target columns to copy beside the predictions where the input has them.
        variant, symprec, processes: SCOPE encoding of CIF inputs (use the training values).
    """
    options: dict[str, Any] = {"variant": variant, "symprec": symprec, "processes": processes}
    path = Path(spec)
    if path.suffix == ".csv" and not path.is_file():
        raise DataError(f"{path}: input CSV not found")
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        targets = tuple(t for t in truth if t in header)
        return load_labelled(DataSource(csv=path, targets=targets, **options))
    from cloud_model.datasets import get_spec

    available = get_spec(str(spec)).targets
    targets = tuple(t for t in truth if t in available)
    return load_labelled(DataSource(dataset=str(spec), targets=targets, **options))


def read_job(directory: str | Path) -> FinetuneJob | None:
    """The job that trained the model in ``directory`` (its ``job.json``), if recorded."""
    path = Path(directory) / "job.json"
    if not path.is_file():
        return None
    try:
        return FinetuneJob.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid job record: {exc}") from exc
