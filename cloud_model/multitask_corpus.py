"""The supervised multi-task pretraining corpus: every label we have, minus the benchmark pools.

:func:`build_multitask_corpus` turns :class:`MultiTaskDataOptions` into a
:class:`~cloud_model.multitask_data.MultiTaskCorpus`:

* **labelled tasks**, one per (dataset, target), named ``"<dataset>:<target>"``, in the
  target's registry unit. Structure sets give the rows that no benchmark holds out
  (:data:`DEFAULT_STRUCTURE_SOURCES`: mp_20_biternary, mp_20_pilot, mpts_52 val (the
  years before the time split), the AFLOW train split of all four properties, cloud_cv
  train), as SCOPE strings of ``variant`` (cached on disk per dataset; SCOPE sets give
  their published strings). Every ``crabnet_*`` formula set gives composition-only
  strings (:func:`cloud_model.composition.composition_scope`);
* the **leakage guard** (:mod:`cloud_model.leakage`) first removes from every labelled
  set each row whose id, structure or reduced formula occurs in an excluded pool, and
  the corpus carries its :class:`~cloud_model.multitask_data.GuardReport` (rows whose
  formula pymatgen cannot read, or whose string has tokens outside the vocabulary, are
  dropped and counted there too);
* **unlabelled strings** for the masked-language-model loss: the SCOPE strings of every
  structure set, pools included (no label travels with them), plus
  ``cloud_pretrain_10k``, optionally the composition strings; not filtered by the guard.

Validation splits are a fixed function of each string (:func:`cloud_model.pretrain_corpus.in_validation`,
the rule of the MLM-only corpus) with one ``validation_fraction`` for tasks and MLM, so a
task's validation string is also outside the MLM training strings.

Composition-only strings need the ``scope-vocab-2`` tokenizer (:func:`corpus_tokenizer`).

Example:
    >>> corpus = build_multitask_corpus(MultiTaskDataOptions())
    >>> task = corpus.task("crabnet_mp_e_form:formation_energy_per_atom")
    >>> task.train[0]   # (composition SCOPE string, eV/atom), e.g. ('[NOSYM] | [NOWYCK] | Pt 0.5 C 0.5', 2.0)
    >>> guard_summary(corpus.guard)["removed_by_reason"]   # from cloud_model.leakage
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from cloud_model.composition import parse_formula
from cloud_model.errors import ConfigError, DataError
from cloud_model.leakage import (
    DEFAULT_POOLS,
    LeakageGuard,
    PoolIndex,
    RowKeys,
    build_pool_index,
    structure_row_keys,
)
from cloud_model.multitask_data import MultiTaskCorpus, TaskData
from cloud_model.pretrain_corpus import in_validation, split_strings

if TYPE_CHECKING:
    from cloud_model.datasets import DatasetSpec
    from cloud_model.tokenizer import ScopeTokenizer

__all__ = [
    "DEFAULT_STRUCTURE_SOURCES",
    "MultiTaskDataOptions",
    "build_multitask_corpus",
    "corpus_tokenizer",
    "task_name",
]

logger = logging.getLogger(__name__)
_phase = logging.getLogger("cloudlab.progress")  # what a live display shows

_AFLOW_SETS = (
    "aflow_debye_temperature",
    "aflow_bulk_modulus",
    "aflow_shear_modulus",
    "aflow_thermal_expansion",
)
# structure dataset -> splits whose labels are fair for pretraining (no benchmark holds them out)
DEFAULT_STRUCTURE_SOURCES: dict[str, list[str] | Literal["all"]] = {
    "mp_20_biternary": "all",
    "mp_20_pilot": "all",
    "mpts_52": ["val"],  # the years before the time split; test is the benchmark
    **{name: ["train"] for name in _AFLOW_SETS},  # val+test are the AFLOW pool
    "cloud_cv": ["train_and_val"],  # test is the CLOUD-DEBYE benchmark
}

# why a row was dropped before the guard looked at it (counted in the GuardReport beside the guard's reasons)
# no SCOPE string (the encoder rejected the structure)
UNENCODABLE = "unencodable"
# pymatgen cannot read the formula, or it names a non-element
UNPARSABLE_FORMULA = "unparsable_formula"
# the string has tokens outside the vocabulary
UNKNOWN_TOKENS = "unknown_tokens"
# no reduced formula could be determined, so the guard cannot clear the row
NO_FORMULA = "formula_unknown"
# the registry loader rejected the row (empty formula, non-numeric label)
INVALID_ROW = "invalid_row"


class MultiTaskDataOptions(BaseModel):
    """What goes into the multi-task corpus (defaults: every fair label, every pool excluded)."""

    model_config = ConfigDict(extra="forbid")

    # SCOPE grammar for CIF sets (the shipped checkpoint used cloud)
    variant: Literal["cloud", "native"] = "cloud"
    symprec: float = Field(default=0.1, gt=0.0)  # spglib tolerance in Angstrom
    # CIF/SCOPE dataset -> labelled splits ("all" = every split); none may be a pool split
    structure_sources: dict[str, list[str] | Literal["all"]] = Field(
        default_factory=lambda: dict(DEFAULT_STRUCTURE_SOURCES)
    )
    # formula (crabnet_*) sets, every split of each ("all" = every formula set of the registry)
    formula_sources: list[str] | Literal["all"] = "all"
    # dataset -> targets to keep (a source not named here keeps every registered target)
    targets: dict[str, list[str]] = {}
    # dataset -> held-out splits; labelled rows matching them by id, structure or formula are removed
    pools: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_POOLS.items()}
    )
    # CIF/SCOPE sets whose strings (all splits, pools included) go into MLM ("all" = every one)
    mlm_datasets: list[str] | Literal["all"] = "all"
    mlm_exclude_splits: dict[str, list[str]] = {}  # dataset -> splits kept out of MLM
    mlm_compositions: bool = False  # also put the composition strings of the formula sets into MLM
    # rows of one task with the same string: "mean" = one row with the mean label; "keep" = all
    duplicates: Literal["mean", "keep"] = "mean"
    # held out by string hash, for every task and for MLM alike
    validation_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    processes: int | None = Field(default=None, gt=0)  # SCOPE-encoding workers (None = all CPUs)


def task_name(dataset: str, target: str) -> str:
    """``"<dataset>:<target>"``."""
    return f"{dataset}:{target}"


def corpus_tokenizer() -> ScopeTokenizer:
    """The tokenizer a model trained on this corpus needs: ``scope-vocab-2`` (reads the composition form)."""
    from cloud_model.tokenizer import ScopeTokenizer

    return ScopeTokenizer.latest()


# ----------------------------------------------------------------- option checks


@dataclass(frozen=True)
class _Plan:
    """The options resolved against the registry."""

    structure: dict[str, tuple[str, ...]]  # dataset -> splits
    formula: dict[str, tuple[str, ...]]
    targets: dict[str, tuple[str, ...]]  # dataset -> targets
    mlm: dict[str, tuple[str, ...]]
    specs: dict[str, DatasetSpec] = field(default_factory=dict)


def _spec(name: str, kinds: tuple[str, ...], where: str) -> DatasetSpec:
    from cloud_model.datasets import REGISTRY

    spec = REGISTRY.get(name)
    if spec is None:
        raise ConfigError(
            f"{where}: unknown dataset {name!r} (`cloudlab data list` shows the registry)"
        )
    if spec.kind not in kinds:
        hint = "; list formula sets in formula_sources" if spec.kind == "formula" else ""
        raise ConfigError(
            f"{where}: {name!r} is a {spec.kind} dataset, expected {' or '.join(kinds)}{hint}"
        )
    return spec


def _splits(spec: DatasetSpec, chosen: Sequence[str] | str, where: str) -> tuple[str, ...]:
    if chosen == "all":
        return spec.splits
    unknown = [s for s in chosen if s not in spec.splits]
    if unknown:
        raise ConfigError(
            f"{where}: dataset {spec.name!r} has no split(s) {unknown}; it has {list(spec.splits)}"
        )
    return tuple(chosen)


def _plan(options: MultiTaskDataOptions) -> _Plan:
    from cloud_model.datasets import REGISTRY

    specs: dict[str, DatasetSpec] = {}
    structure: dict[str, tuple[str, ...]] = {}
    for name, chosen in options.structure_sources.items():
        spec = specs[name] = _spec(name, ("cif", "scope"), "structure_sources")
        structure[name] = _splits(spec, chosen, "structure_sources")
    names = (
        [n for n, s in REGISTRY.items() if s.kind == "formula"]
        if options.formula_sources == "all"
        else list(options.formula_sources)
    )
    formula = {}
    for name in names:
        spec = specs[name] = _spec(name, ("formula",), "formula_sources")
        formula[name] = spec.splits
    for name, chosen in options.pools.items():  # a labelled split may not be a pool split
        clash = set(structure.get(name, ())) & set(chosen)
        if name in formula and set(chosen) & set(formula[name]):
            clash |= set(chosen) & set(formula[name])
        if clash:
            raise ConfigError(
                f"dataset {name!r} split(s) {sorted(clash)} are both a labelled source and an excluded "
                "pool; a benchmark pool's labels never enter pretraining: drop them from the sources"
            )
    targets: dict[str, tuple[str, ...]] = {}
    for name in (*structure, *formula):
        targets[name] = tuple(specs[name].targets)
    for name, wanted in options.targets.items():
        if name not in targets:
            raise ConfigError(f"targets: {name!r} is not a labelled source ({sorted(targets)})")
        unknown = [t for t in wanted if t not in specs[name].targets]
        if unknown or not wanted:
            raise ConfigError(
                f"targets: dataset {name!r} has no target(s) {unknown or wanted}; it has {sorted(specs[name].targets)}"
            )
        targets[name] = tuple(wanted)
    empty = [n for n, t in targets.items() if not t]
    if empty:
        raise ConfigError(
            f"labelled sources without targets: {empty} (unlabelled sets go in mlm_datasets)"
        )
    mlm_names = (
        [n for n, s in REGISTRY.items() if s.kind in ("cif", "scope")]
        if options.mlm_datasets == "all"
        else list(options.mlm_datasets)
    )
    mlm = {}
    for name in mlm_names:
        spec = _spec(name, ("cif", "scope"), "mlm_datasets")
        excluded = set(options.mlm_exclude_splits.get(name, ()))
        mlm[name] = tuple(s for s in spec.splits if s not in excluded)
    stray = [n for n in options.mlm_exclude_splits if n not in mlm]
    if stray:
        raise ConfigError(f"mlm_exclude_splits: {stray} are not in mlm_datasets")
    return _Plan(structure, formula, targets, mlm, specs)


# ----------------------------------------------------------------- labelled rows


@dataclass
class _Rows:
    """Kept rows of one labelled set: SCOPE strings, guard keys and label columns."""

    strings: list[str] = field(default_factory=list)
    keys: list[RowKeys] = field(default_factory=list)
    labels: dict[str, list[float]] = field(default_factory=dict)


def _strings_of(
    name: str, kind: str, variant: str, options: MultiTaskDataOptions
) -> dict[str, str]:
    """Record id -> SCOPE string of ``variant`` (published strings for SCOPE sets)."""
    from cloud_model.corpus import encode_dataset_full

    return encode_dataset_full(
        name, variant="cloud" if kind == "scope" else variant,  # type: ignore[arg-type]  # a Variant literal
        symprec=options.symprec, processes=options.processes,
    ).strings  # fmt: skip


def _structure_rows(
    name: str, splits: tuple[str, ...], targets: tuple[str, ...], options: MultiTaskDataOptions,
    guard: LeakageGuard, tokenizer: ScopeTokenizer,
) -> _Rows:  # fmt: skip
    from cloud_model.datasets import get_spec, load_dataset

    spec = get_spec(name)
    records = load_dataset(name, splits).records
    keys = structure_row_keys(name, splits, symprec=options.symprec, processes=options.processes)
    strings = _strings_of(name, spec.kind, options.variant, options)
    usable: list[tuple[int, RowKeys]] = []
    for i, key in enumerate(keys):
        text = strings.get(key.id)
        if text is None:
            guard.drop(name, UNENCODABLE)
        elif tokenizer.count_unknown(text):
            guard.drop(name, UNKNOWN_TOKENS)
        elif key.formula is None:
            guard.drop(name, NO_FORMULA)
        else:
            usable.append((i, key))
    keep = guard.filter(name, [k for _, k in usable])
    rows = _Rows(labels={t: [] for t in targets})
    for (i, key), kept in zip(usable, keep, strict=True):
        if kept:
            rows.strings.append(strings[key.id])
            rows.keys.append(key)
            for t in targets:
                rows.labels[t].append(records[i].targets[t])
    return rows


def _formula_rows(
    name: str,
    targets: tuple[str, ...],
    guard: LeakageGuard,
    tokenizer: ScopeTokenizer,
    mlm: list[str] | None,
) -> _Rows:
    """Composition-only rows of a formula set, read split by split (not cached in memory by the loader)."""
    from cloud_model.datasets import get_spec, read_csv, resolve

    spec = get_spec(name)
    paths = resolve(name)
    rows = _Rows(labels={t: [] for t in targets})
    seen: set[str] = set()
    for split in spec.splits:
        loaded = read_csv(spec, split, paths[split], seen=seen)
        guard.drop(name, INVALID_ROW, len(loaded.invalid))
        strings: list[str] = []
        usable: list[tuple[int, RowKeys]] = []
        for i, record in enumerate(loaded.records):
            try:
                reduced, text = parse_formula(record.formula or "")
            except DataError:
                guard.drop(name, UNPARSABLE_FORMULA)
                strings.append("")
                continue
            strings.append(text)
            if tokenizer.count_unknown(text):
                guard.drop(name, UNKNOWN_TOKENS)
                continue
            if mlm is not None:
                mlm.append(text)
            usable.append((i, RowKeys(record.id, formula=reduced)))
        keep = guard.filter(name, [k for _, k in usable])
        for (i, key), kept in zip(usable, keep, strict=True):
            if kept:
                rows.strings.append(strings[i])
                rows.keys.append(key)
                for t in targets:
                    rows.labels[t].append(loaded.records[i].targets[t])
    return rows


def _task(
    name: str, unit: str, strings: list[str], values: list[float], options: MultiTaskDataOptions,
    composition_only: bool,
) -> TaskData:  # fmt: skip
    pairs = [(s, v) for s, v in zip(strings, values, strict=True) if math.isfinite(v)]
    if options.duplicates == "mean":
        grouped: dict[str, list[float]] = {}
        for s, v in pairs:
            grouped.setdefault(s, []).append(v)
        pairs = [(s, sum(vs) / len(vs)) for s, vs in grouped.items()]
    if not pairs:
        raise DataError(
            f"task {name!r} has no rows left (no finite labels after the leakage guard); drop it from "
            "the sources or the targets"
        )
    train = [(s, v) for s, v in pairs if not in_validation(s, options.validation_fraction)]
    validation = [(s, v) for s, v in pairs if in_validation(s, options.validation_fraction)]
    if not train:
        raise DataError(
            f"task {name!r}: all {len(pairs)} rows fall in the validation split; it has no training rows"
        )
    return TaskData(name, unit, train, validation, composition_only=composition_only)


# ----------------------------------------------------------------- the corpus


def build_multitask_corpus(
    options: MultiTaskDataOptions | None = None,
    *,
    tokenizer: ScopeTokenizer | None = None,
    kept_rows: dict[str, list[tuple[RowKeys, str]]] | None = None,
    pool_index: PoolIndex | None = None,
) -> MultiTaskCorpus:
    """Build the labelled tasks, the MLM strings and the guard report (see the module docstring).

    Args:
        options: what to include (defaults: :class:`MultiTaskDataOptions`).
        tokenizer: rows whose strings it cannot fully tokenize are dropped and counted
            (default :func:`corpus_tokenizer`, ``scope-vocab-2``).
        kept_rows: if given, filled with labelled set -> ``(guard keys, SCOPE string)``
            of every row the guard kept (an audit trail: tests check it against the pools).
        pool_index: the pools, already read (default: :func:`~cloud_model.leakage.build_pool_index`
            of ``options.pools``; pass one to reuse it across builds).

    Returns:
        A :class:`~cloud_model.multitask_data.MultiTaskCorpus`; tasks in source order
        (structure sets, then formula sets), each task's rows in file order.

    Raises:
        ConfigError: an unknown or wrong-kind dataset, split or target, or a pool split
            listed as a labelled source.
        DataError: a task with no rows after the guard, or an empty MLM corpus.
    """
    options = options or MultiTaskDataOptions()
    tokenizer = tokenizer or corpus_tokenizer()
    plan = _plan(options)
    if pool_index is None:
        pool_index = build_pool_index(
            options.pools, symprec=options.symprec, processes=options.processes
        )
    guard = LeakageGuard(pool_index)
    tasks: list[TaskData] = []
    n_sources = len(plan.structure) + len(plan.formula)
    for k, (name, splits) in enumerate(plan.structure.items()):
        _phase.debug(
            "multi-task corpus %d/%d",
            k + 1,
            n_sources,
            extra={"phase": "multi-task corpus", "done": k + 1, "total": n_sources},
        )
        rows = _structure_rows(name, splits, plan.targets[name], options, guard, tokenizer)
        if kept_rows is not None:
            kept_rows[name] = list(zip(rows.keys, rows.strings, strict=True))
        for t in plan.targets[name]:
            unit = plan.specs[name].targets[t].unit
            tasks.append(
                _task(task_name(name, t), unit, rows.strings, rows.labels[t], options, False)
            )
    compositions: list[str] | None = [] if options.mlm_compositions else None
    for k, name in enumerate(plan.formula, start=len(plan.structure)):
        _phase.debug(
            "multi-task corpus %d/%d",
            k + 1,
            n_sources,
            extra={"phase": "multi-task corpus", "done": k + 1, "total": n_sources},
        )
        rows = _formula_rows(name, plan.targets[name], guard, tokenizer, compositions)
        if kept_rows is not None:
            kept_rows[name] = list(zip(rows.keys, rows.strings, strict=True))
        for t in plan.targets[name]:
            unit = plan.specs[name].targets[t].unit
            tasks.append(
                _task(task_name(name, t), unit, rows.strings, rows.labels[t], options, True)
            )
    mlm: list[str] = []
    from cloud_model.datasets import get_spec, load_dataset

    # unlabelled strings: not filtered by the guard (see cloud_model.leakage)
    for name, splits in plan.mlm.items():
        strings = _strings_of(name, get_spec(name).kind, options.variant, options)
        mlm += [strings[r.id] for r in load_dataset(name, splits).records if r.id in strings]
    mlm += compositions or []
    if not mlm:
        raise DataError("the MLM corpus is empty: name at least one dataset in mlm_datasets")
    split = split_strings(mlm, options.validation_fraction)
    report = guard.report()
    logger.info(
        "multi-task corpus: %d tasks, %d labelled rows (%d removed by the guard), MLM %d train / %d validation",
        len(tasks), sum(len(t.train) + len(t.validation) for t in tasks), report.total_removed(),
        len(split.train), len(split.validation),
    )  # fmt: skip
    return MultiTaskCorpus(
        tasks=tasks, mlm_train=split.train, mlm_validation=split.validation, guard=report
    )
