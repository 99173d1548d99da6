"""One loader for crystals with labels: a registry dataset or a CSV of CIF or SCOPE strings.

Campaign pools (:mod:`loop.pool`), fine-tuning data (:mod:`cloud_model.finetune_data`)
and the pretraining corpus (:mod:`cloud_model.pretrain_corpus`) all read their rows
with :func:`load_labelled`, so they agree on these rules:

* **Sources.** ``DataSource(dataset=...)``: a registry dataset (CIF sets are encoded
  with SCOPE once and cached on disk by :func:`cloud_model.corpus.encode_dataset_full`;
  SCOPE sets are read as published), optionally only some ``splits``, in the order
  given. ``DataSource(csv=...)``: a CSV file (optionally gzipped) with a structure
  column of CIF texts or SCOPE strings.
* **Ids.** The registry's ids. In a CSV, ``id_column``; when it is not named, the first
  of :data:`ID_COLUMNS` the header has, else ``"<file stem>:<row>"`` (0-based data row).
  A named id column must exist. A row with an empty id or an id seen before is left out.
* **Structures.** ``structure_column`` (default: the first of ``cloud``, ``scope``,
  ``cif`` present); ``structure_format`` defaults to ``cif`` for a column named
  ``cif``, else ``scope``. SCOPE strings are stripped of surrounding whitespace.
  A row with an empty structure, or a CIF that cannot be SCOPE-encoded, is left out.
* **Rows left out** are listed in :attr:`LabelledSet.invalid` as ``(id, reason)``;
  never silently dropped.
* **Labels.** ``y`` is ``(n, m)`` float32 for the ``m`` requested targets, NaN where a
  value is missing. An empty cell, or one that is not a finite number, becomes NaN and
  its row is listed in :attr:`LabelledSet.invalid_labels` (the row stays: its other
  targets and its structure are still usable, and the training loss skips NaNs).
  Registry rows whose target cell is not a number are already left out by the
  registry (:func:`cloud_model.datasets.read_csv`); its empty cells are NaN.
* **Errors.** Every problem with the source itself (a missing file or column, an
  unknown target, no usable rows, a registry formula set, which has no structures)
  is a :class:`~cloud_model.errors.DataError` whose message names the file or
  dataset, the column and, for rows, the row's id.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from cloud_model.errors import DataError

if TYPE_CHECKING:
    from cloud_model.datasets import CrystalRecord

logger = logging.getLogger(__name__)

ID_COLUMNS = ("material_id", "id")  # CSV id column when none is named: the first present
SCOPE_COLUMNS = ("cloud", "scope")  # CSV columns read as SCOPE strings when no column is named
# a selection (only_ids) of a CIF registry dataset up to this size is encoded on its own,
# without encoding (and caching) the whole dataset
SMALL_SELECTION = 500


class DataSource(BaseModel):
    """Where labelled structures come from: a registry dataset or a CSV file."""

    model_config = ConfigDict(extra="forbid")
    dataset: str | None = None  # registry name, e.g. "cloud_cv", "aflow_debye_temperature"
    splits: tuple[str, ...] | None = None  # registry splits to read, in order (None = all)
    csv: Path | None = None  # or a CSV file with a structure column and target columns
    targets: tuple[str, ...] = ()  # target columns, in output order (none: prediction only)
    # CSV: the id column (None = the first of material_id / id present, else <stem>:<row>)
    id_column: str | None = None
    # CSV: the structure column and what it holds (default: "cloud"/"scope" -> SCOPE, "cif" -> CIF)
    structure_column: str | None = None
    structure_format: Literal["cif", "scope"] | None = None
    split_column: str | None = None  # CSV column holding train / val / test labels
    n_atoms_column: str | None = "n_atoms"  # atoms per cell (Debye Cv per mole of cells)
    variant: Literal["cloud", "native"] = "cloud"  # SCOPE grammar for CIF inputs
    symprec: float = Field(default=0.1, gt=0)  # spglib tolerance in Angstrom for CIF inputs
    # worker processes for SCOPE encoding (None = all usable CPUs)
    processes: int | None = Field(default=1, ge=1)
    limit: int | None = Field(default=None, ge=1)  # keep only the first rows (quick runs)

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.dataset is None) == (self.csv is None):
            raise ValueError("give exactly one of `dataset` (a registry name) or `csv` (a path)")
        return self

    def describe(self) -> str:
        """``dataset 'name'`` or the CSV path, for messages."""
        return f"dataset {self.dataset!r}" if self.dataset is not None else str(self.csv)


@dataclass
class LabelledSet:
    """Crystals as SCOPE strings with their labels, in source order.

    Attributes:
        ids: row ids, length ``n``, unique.
        scopes: SCOPE strings, length ``n``.
        y: ``(n, m)`` labels of ``target_names`` (float32 unless asked otherwise); NaN
            where missing.
        splits: the split of each row (registry split or ``split_column``; ``""`` if none).
        target_names: the ``m`` targets, in column order.
        units: target -> unit (from the registry; ``""`` for CSV columns).
        cifs: id -> CIF text, for rows whose source holds structures.
        n_atoms: ``(n,)`` atoms per cell, or None unless every row has it.
        invalid: ``(id, reason)`` of rows left out.
        invalid_labels: ``(id, reason)`` of rows kept with a missing or non-numeric label.
    """

    ids: list[str]
    scopes: list[str]
    y: Tensor
    splits: list[str]
    target_names: tuple[str, ...]
    units: dict[str, str] = field(default_factory=dict)
    cifs: dict[str, str] = field(default_factory=dict)
    n_atoms: Tensor | None = None  # (n,)
    invalid: list[tuple[str, str]] = field(default_factory=list)
    invalid_labels: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Tensor) -> LabelledSet:
        """The rows ``index`` (a 1-D long tensor), without the source's invalid-row lists."""
        rows = index.tolist()
        ids = [self.ids[i] for i in rows]
        return LabelledSet(
            ids=ids,
            scopes=[self.scopes[i] for i in rows],
            y=self.y[index],
            splits=[self.splits[i] for i in rows],
            target_names=self.target_names,
            units=dict(self.units),
            cifs={i: self.cifs[i] for i in ids if i in self.cifs},
            n_atoms=None if self.n_atoms is None else self.n_atoms[index],
        )

    def labels_of(self, row: int) -> dict[str, float]:
        """Target -> value of row ``row``, the missing (NaN) ones left out."""
        return {
            t: float(v)
            for t, v in zip(self.target_names, self.y[row].tolist(), strict=True)
            if not math.isnan(v)
        }


# the name fine-tuning code used before the loaders were merged
LabelledData = LabelledSet


def load_labelled(
    source: DataSource,
    *,
    only_ids: Collection[str] | None = None,
    require_targets: bool = True,
    allow_empty: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LabelledSet:
    """Read ``source`` into a :class:`LabelledSet` (rules in the module docstring).

    Args:
        source: a registry dataset or a CSV file, and what to read from it.
        only_ids: keep only rows with these ids (a small selection of a CIF registry
            dataset is then encoded on its own, not the whole dataset).
        require_targets: False = skip targets the source does not have (prediction
            inputs, candidate pools without truth) instead of raising.
        allow_empty: return an empty set instead of raising when no row is usable.
        dtype: of ``y``; float32 for training, float64 to keep the values exactly as
            read (a simulated lab's hidden truth).

    Raises:
        DataError: missing file or column, unknown dataset or target, no usable rows.
    """
    if source.dataset is not None:
        data = _from_registry(source, only_ids, require_targets, dtype)
    else:
        data = _from_csv(source, only_ids, require_targets, dtype)
    where = source.describe()
    if data.invalid:
        logger.warning(
            "%s: %d rows left out (first: %s)",
            where,
            len(data.invalid),
            "; ".join(f"{i}: {r}" for i, r in data.invalid[:3]),
        )
    if data.invalid_labels:
        logger.warning(
            "%s: %d rows have missing or non-numeric labels, kept as NaN (first: %s)",
            where,
            len(data.invalid_labels),
            "; ".join(f"{i}: {r}" for i, r in data.invalid_labels[:3]),
        )
    if not data.ids and not allow_empty:
        first = (
            f" (first left out: {data.invalid[0][0]}: {data.invalid[0][1]})" if data.invalid else ""
        )
        raise DataError(f"{where}: no usable rows{first}")
    return data


# ----------------------------------------------------------------- registry datasets


def _from_registry(
    source: DataSource, only_ids: Collection[str] | None, require_targets: bool, dtype: torch.dtype
) -> LabelledSet:
    from cloud_model.datasets import get_spec, load_dataset

    name = source.dataset or ""
    spec = get_spec(name)
    spec.require_structures("loading labelled crystals (pools, fine-tuning, pretraining)")
    unknown = [t for t in source.targets if t not in spec.targets]
    if unknown and require_targets:
        raise DataError(
            f"dataset {name!r} has no target(s) {unknown}; it has {sorted(spec.targets)}"
        )
    targets = tuple(t for t in source.targets if t in spec.targets)
    loaded = load_dataset(name, source.splits)
    records = loaded.records
    if only_ids is not None:
        wanted = set(only_ids)
        records = [r for r in records if r.id in wanted]
    encoded, errors = _registry_scopes(source, records, small=only_ids is not None)
    invalid = list(loaded.invalid)
    kept: list[CrystalRecord] = []
    for rec in records:
        if rec.id in encoded:
            kept.append(rec)
        else:
            invalid.append((rec.id, errors.get(rec.id, "could not be SCOPE-encoded")))
    if source.limit is not None:
        kept = kept[: source.limit]
    y = torch.tensor([[rec.targets[t] for t in targets] for rec in kept], dtype=dtype).reshape(
        len(kept), len(targets)
    )  # (n, m)
    invalid_labels = []
    for rec in kept:
        empty = [t for t in targets if not math.isfinite(rec.targets[t])]
        if empty:
            invalid_labels.append((rec.id, "; ".join(f"target {t!r} is empty" for t in empty)))
    return LabelledSet(
        ids=[r.id for r in kept],
        scopes=[encoded[r.id] for r in kept],
        y=y,
        splits=[r.split for r in kept],
        target_names=targets,
        units={t: spec.targets[t].unit for t in targets},
        cifs={r.id: r.cif for r in kept if r.cif is not None},
        n_atoms=_atoms_tensor([r.extra.get("n_atoms") for r in kept]),
        invalid=invalid,
        invalid_labels=invalid_labels,
    )


def _registry_scopes(
    source: DataSource, records: list[CrystalRecord], *, small: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """SCOPE strings and encoding errors by id: the whole dataset (cached), or a few records."""
    from cloud_model.corpus import encode_dataset_full, encode_structures

    name = source.dataset or ""
    if small and len(records) <= SMALL_SELECTION and all(r.cif is not None for r in records):
        result = encode_structures(
            [r.cif or "" for r in records],
            variant=source.variant,
            symprec=source.symprec,
            processes=source.processes,
        )
        strings = {r.id: s for r, s in zip(records, result.strings, strict=True) if s is not None}
        return strings, {records[i].id: why for i, why in result.errors.items()}
    encoding = encode_dataset_full(
        name, variant=source.variant, symprec=source.symprec, processes=source.processes
    )
    return encoding.strings, encoding.errors


# ----------------------------------------------------------------- CSV files


def _open_text(path: Path) -> Any:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8")
    return path.open(newline="", encoding="utf-8")


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    csv.field_size_limit(1 << 26)  # CIF texts of large cells exceed the 128 kB default
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _pick_column(
    path: Path, header: list[str], named: str | None, defaults: Sequence[str], what: str
) -> str | None:
    """The named column (which must exist), else the first default present (or None)."""
    if named is not None:
        if named not in header:
            raise DataError(f"{path}: no {what} column {named!r} (columns: {header})")
        return named
    return next((c for c in defaults if c in header), None)


def _label(raw: str | None) -> tuple[float, str | None]:
    """A label cell -> (value, problem); NaN with a reason when empty or not a finite number."""
    text = (raw or "").strip()
    if not text:
        return math.nan, "is empty"
    try:
        value = float(text)
    except ValueError:
        return math.nan, f"is not a number: {text[:40]!r}"
    if not math.isfinite(value):
        return math.nan, f"is not a finite number: {text[:40]!r}"
    return value, None


def _from_csv(
    source: DataSource, only_ids: Collection[str] | None, require_targets: bool, dtype: torch.dtype
) -> LabelledSet:
    path = Path(source.csv or "")
    header, rows = _read_rows(path)
    id_column = _pick_column(path, header, source.id_column, ID_COLUMNS, "id")
    column = _pick_column(
        path, header, source.structure_column, (*SCOPE_COLUMNS, "cif"), "structure"
    )
    if column is None:
        raise DataError(
            f"{path}: no structure column (looked for {', '.join((*SCOPE_COLUMNS, 'cif'))}; "
            f"columns: {header})"
        )
    fmt = source.structure_format or ("cif" if column == "cif" else "scope")
    missing = [t for t in source.targets if t not in header]
    if missing and require_targets:
        raise DataError(f"{path}: target columns {missing} not found in {sorted(header)}")
    targets = tuple(t for t in source.targets if t in header)
    split_column = _pick_column(path, header, source.split_column, (), "split")
    atoms_column = source.n_atoms_column if source.n_atoms_column in header else None

    # ids: unique and non-empty, else the row is left out
    invalid: list[tuple[str, str]] = []
    chosen: list[tuple[str, dict[str, str]]] = []
    seen: dict[str, int] = {}
    wanted = None if only_ids is None else set(only_ids)
    for i, row in enumerate(rows):
        fallback = f"{path.stem}:{i}"
        rid = fallback if id_column is None else (row.get(id_column) or "").strip()
        if not rid:
            invalid.append((fallback, f"empty id column {id_column!r}"))
            continue
        if rid in seen:
            invalid.append(
                (rid, f"duplicate id in column {id_column!r} (first at row {seen[rid]})")
            )
            continue
        seen[rid] = i
        if wanted is None or rid in wanted:
            chosen.append((rid, row))
    if source.limit is not None:
        chosen = chosen[: source.limit]

    texts = [(row.get(column) or "") for _, row in chosen]
    if fmt == "scope":
        scopes: list[str | None] = [t.strip() or None for t in texts]
        errors = {i: f"empty {column!r} column" for i, s in enumerate(scopes) if s is None}
    else:
        from cloud_model.corpus import encode_structures

        result = encode_structures(
            texts, variant=source.variant, symprec=source.symprec, processes=source.processes
        )
        scopes, errors = list(result.strings), dict(result.errors)

    ids: list[str] = []
    kept_scopes: list[str] = []
    labels: list[list[float]] = []
    splits: list[str] = []
    atoms: list[str | None] = []
    cifs: dict[str, str] = {}
    invalid_labels: list[tuple[str, str]] = []
    for i, ((rid, row), scope) in enumerate(zip(chosen, scopes, strict=True)):
        if scope is None:
            invalid.append((rid, errors.get(i, "could not be SCOPE-encoded")))
            continue
        ids.append(rid)
        kept_scopes.append(scope)
        if fmt == "cif":
            cifs[rid] = texts[i]
        values, problems = [], []
        for t in targets:
            value, problem = _label(row.get(t))
            values.append(value)
            if problem is not None:
                problems.append(f"column {t!r} {problem}")
        labels.append(values)
        if problems:
            invalid_labels.append((rid, "; ".join(problems)))
        splits.append(row.get(split_column, "") if split_column else "")
        atoms.append(row.get(atoms_column) if atoms_column else None)
    return LabelledSet(
        ids=ids,
        scopes=kept_scopes,
        y=torch.tensor(labels, dtype=dtype).reshape(len(ids), len(targets)),  # (n, m)
        splits=splits,
        target_names=targets,
        units={t: "" for t in targets},
        cifs=cifs,
        n_atoms=_atoms_tensor(atoms) if atoms_column else None,
        invalid=invalid,
        invalid_labels=invalid_labels,
    )


def _atoms_tensor(values: Sequence[Any]) -> Tensor | None:
    """``(n,)`` float32 atoms per cell, or None unless every row has a value."""
    if not values or any(v is None or v == "" for v in values):
        return None
    try:
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    except ValueError:
        return None
