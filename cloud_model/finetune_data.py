"""Labelled SCOPE strings for fine-tuning and prediction: the splits, and prediction inputs.

Rows are read by the shared loader :func:`cloud_model.labelled_data.load_labelled`
(registry datasets, CSV files of CIF or SCOPE strings; its rules for ids, missing
labels and errors are documented there). Splits (:func:`split_rows`): the
registry's where it has them (``train``/``val``/``test``; ``train_and_val`` is
divided into train and validation), otherwise a seeded random split; validation
rows are never training rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from cloud_model.errors import DataError
from cloud_model.labelled_data import SCOPE_COLUMNS as SCOPE_COLUMNS
from cloud_model.labelled_data import DataSource as DataSource
from cloud_model.labelled_data import LabelledData as LabelledData
from cloud_model.labelled_data import LabelledSet as LabelledSet
from cloud_model.labelled_data import load_labelled as load_labelled

logger = logging.getLogger(__name__)


def split_rows(
    data: LabelledSet, *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
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
    structure_column: str | None = None,
) -> LabelledSet:
    """Structures to score: an existing CSV file, else a registry dataset name.

    Args:
        spec: a CSV path (SCOPE column ``cloud``/``scope`` or CIF column ``cif``) or a dataset.
        truth: target columns to copy beside the predictions where the input has them.
        variant, symprec, processes: SCOPE encoding of CIF inputs (use the training values).
        structure_column: the CSV column holding the structures (default: ``cloud``/``scope``
            for SCOPE strings, ``cif`` for CIF texts).

    Raises:
        DataError: a ``.csv`` path that does not exist, an unknown dataset, no usable rows.
    """
    path = Path(spec)
    if path.suffix == ".csv" and not path.is_file():
        raise DataError(f"{path}: input CSV not found")
    options: dict[str, Any] = {
        "targets": truth,
        "variant": variant,
        "symprec": symprec,
        "processes": processes,
    }
    if structure_column is not None and not path.is_file():
        raise DataError(f"{spec}: a structure column applies to a CSV input, not a dataset name")
    source = (
        DataSource(csv=path, structure_column=structure_column, **options)
        if path.is_file()
        else DataSource(dataset=str(spec), **options)
    )
    return load_labelled(source, require_targets=False)  # truth columns only where present
