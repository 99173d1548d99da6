"""Labelled SCOPE strings for fine-tuning and prediction: registry datasets or CSV files, splits.

Inputs (:class:`DataSource`): a registry dataset and target column(s) (CIF sets
are encoded with SCOPE through the cached :func:`cloud_model.corpus.encode_dataset_full`),
a CSV with a CIF column, or a CSV with a SCOPE column (CLOUD format). Splits
(:func:`split_rows`): the registry's where it has them (``train``/``val``/``test``;
``train_and_val`` is divided into train and validation), otherwise a seeded
random split; validation rows are never training rows.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

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
