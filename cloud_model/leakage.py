"""The leakage guard: no label of a benchmark pool reaches supervised pretraining.

The *pools* are the dataset splits that benchmarks hold out (:data:`DEFAULT_POOLS`):
perov_5 val+test, carbon_24 val+test, mpts_52 test (the later years), the val+test
splits of the four ``aflow_*`` sets (one set of materials with four properties) and
cloud_cv test. A *labelled* row is removed when any of these occurs in a pool, checked
in this order and counted under the first that matches:

``id``
    its record id (Materials Project ``mp-...`` ids are shared by the MP sets, AFLOW
    ``aflow-<row>`` ids by the four AFLOW sets; row-numbered ids never collide);
``structure``
    its native SCOPE string (orbits bound to elements, counted: equal strings are the
    same crystal up to the encoder's tolerance). Rows known only by a published-format
    string (``cloud_cv``) are compared by that string with part 2 (the Wyckoff symbols)
    and part 3 taken as sets, since the published site order is arbitrary;
``formula``
    its reduced formula (pymatgen), read exactly from the native string's orbits, from
    the formula of composition-only rows, or recovered from a published string and
    the cell's atom count.

The formula test removes every polymorph of a pool composition, so a pymatgen
``StructureMatcher`` pass would find nothing more: it only matches structures of the
same reduced composition, which are already gone.

Unlabelled strings for the masked-language-model loss are *not* filtered: pool
crystals without their labels are fair for self-supervision (a campaign sees them as
candidates anyway). The guard applies to labelled rows only.

Example:
    >>> index = build_pool_index(DEFAULT_POOLS)
    >>> guard = LeakageGuard(index)
    >>> keep = guard.filter("mpts_52", structure_row_keys("mpts_52", ["val"]))
    >>> write_guard_report(guard.report(), "guard.json")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cloud_model.composition import formula_from_cloud, formula_from_native, reduced_formula
from cloud_model.errors import ConfigError, DataError
from cloud_model.multitask_data import GuardReport
from cloud_model.scope import PART_SEPARATOR

if TYPE_CHECKING:
    from cloud_model.datasets import CrystalRecord

__all__ = [
    "DEFAULT_POOLS",
    "GUARD_REASONS",
    "GuardReason",
    "LeakageGuard",
    "PoolIndex",
    "RowKeys",
    "build_pool_index",
    "cloud_key",
    "guard_summary",
    "read_guard_report",
    "structure_row_keys",
    "write_guard_report",
]

logger = logging.getLogger(__name__)

GuardReason = Literal["id", "structure", "formula"]
GUARD_REASONS: tuple[GuardReason, ...] = ("id", "structure", "formula")  # checked in this order
_AFLOW_SETS = (
    "aflow_debye_temperature",
    "aflow_bulk_modulus",
    "aflow_shear_modulus",
    "aflow_thermal_expansion",
)
# dataset -> the splits a benchmark holds out
DEFAULT_POOLS: dict[str, tuple[str, ...]] = {
    "perov_5": ("val", "test"),
    "carbon_24": ("val", "test"),
    "mpts_52": ("test",),
    **{name: ("val", "test") for name in _AFLOW_SETS},
    "cloud_cv": ("test",),
}
REPORT_FORMAT = "cloudlab-guard-report-1"


def cloud_key(text: str) -> str:
    """A published-format SCOPE string with its order-free parts sorted (for comparisons only).

    Part 1 is kept; the Wyckoff symbols of part 2 and the (element, fraction) pairs of
    part 3 are sorted, so the arbitrary site order of published strings does not matter.
    """
    parts = text.split(PART_SEPARATOR)
    if len(parts) != 3:
        return text.strip()
    words = parts[2].split()
    pairs = sorted(" ".join(words[i : i + 2]) for i in range(0, len(words), 2))
    return PART_SEPARATOR.join(
        (parts[0].strip(), " ".join(sorted(parts[1].split())), " ".join(pairs))
    )


@dataclass(frozen=True)
class RowKeys:
    """What the guard compares of one row.

    Attributes:
        id: the record id.
        native: the native SCOPE string (CIF sets), else None.
        cloud: :func:`cloud_key` of the published-format string (SCOPE sets, and CIF
            sets encoded with the ``cloud`` variant), else None.
        formula: the reduced formula, or None when it could not be determined.
    """

    id: str
    native: str | None = None
    cloud: str | None = None
    formula: str | None = None


@dataclass
class PoolIndex:
    """Ids, structures and reduced formulas of every excluded pool.

    Attributes:
        names: ``"<dataset>:<split>"`` of every pool split.
        ids: record ids.
        natives: native SCOPE strings.
        clouds: :func:`cloud_key` strings of every pool row that has one.
        clouds_only: those of pool rows without a native string (published sets).
        formulas: reduced formulas.
        rows: pool name -> rows read.
        no_formula: pool name -> rows whose formula could not be determined.
    """

    names: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    natives: set[str] = field(default_factory=set)
    clouds: set[str] = field(default_factory=set)
    clouds_only: set[str] = field(default_factory=set)
    formulas: set[str] = field(default_factory=set)
    rows: dict[str, int] = field(default_factory=dict)
    no_formula: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, rows: Iterable[RowKeys]) -> None:
        """Add the rows of pool ``name`` (``"<dataset>:<split>"``)."""
        if name not in self.names:
            self.names.append(name)
        n = missing = 0
        for row in rows:
            n += 1
            self.ids.add(row.id)
            if row.native is not None:
                self.natives.add(row.native)
            if row.cloud is not None:
                self.clouds.add(row.cloud)
                if row.native is None:
                    self.clouds_only.add(row.cloud)
            if row.formula is not None:
                self.formulas.add(row.formula)
            else:
                missing += 1
        self.rows[name] = self.rows.get(name, 0) + n
        if missing:
            self.no_formula[name] = self.no_formula.get(name, 0) + missing
            logger.warning(
                "pool %s: %d of %d rows have no reduced formula; they are guarded by id "
                "and structure only",
                name,
                missing,
                n,
            )

    def structure_match(self, row: RowKeys) -> bool:
        """Whether ``row``'s crystal is a pool crystal (native string; published string where a side lacks one)."""
        if row.native is not None and row.native in self.natives:
            return True
        if row.cloud is None:
            return False
        return row.cloud in (self.clouds if row.native is None else self.clouds_only)

    def reason(self, row: RowKeys) -> GuardReason | None:
        """The first guard criterion ``row`` meets (id, structure, formula), or None."""
        if row.id in self.ids:
            return "id"
        if self.structure_match(row):
            return "structure"
        if row.formula is not None and row.formula in self.formulas:
            return "formula"
        return None

    def overlaps(self, rows: Iterable[RowKeys]) -> dict[str, int]:
        """Rows meeting each criterion on its own (not first-match): ``{"id": n, ...}``."""
        out: dict[str, int] = dict.fromkeys(GUARD_REASONS, 0)
        for row in rows:
            out["id"] += row.id in self.ids
            out["structure"] += self.structure_match(row)
            out["formula"] += row.formula is not None and row.formula in self.formulas
        return out


class LeakageGuard:
    """Filters labelled sets against a :class:`PoolIndex` and counts what it removed, per set and reason."""

    def __init__(self, index: PoolIndex) -> None:
        self.index = index
        self._removed: dict[str, dict[str, int]] = {}
        self._kept: dict[str, int] = {}

    def filter(self, dataset: str, rows: Sequence[RowKeys]) -> list[bool]:
        """Which of ``rows`` (of labelled set ``dataset``) to keep; removals are counted.

        Returns:
            One bool per row, False where the row's id, structure or formula is in a pool.
        """
        keep: list[bool] = []
        for row in rows:
            why = self.index.reason(row)
            if why is not None:
                self.drop(dataset, why)
            keep.append(why is None)
        self._kept[dataset] = self._kept.get(dataset, 0) + sum(keep)
        return keep

    def drop(self, dataset: str, reason: str, n: int = 1) -> None:
        """Count ``n`` rows of ``dataset`` removed for ``reason`` (a guard reason or a data problem)."""
        if n:
            counts = self._removed.setdefault(dataset, {})
            counts[reason] = counts.get(reason, 0) + n

    def report(self) -> GuardReport:
        """What was removed and kept so far, and the pools."""
        return GuardReport(
            pools=list(self.index.names),
            removed={d: dict(r) for d, r in self._removed.items()},
            kept=dict(self._kept),
        )


# ----------------------------------------------------------------- keys of registry datasets


def _record_formula(record: CrystalRecord) -> str | None:
    """Fallback when a row has no native string: the file's formula column, else the CIF's composition."""
    from cloud_model.composition import parse_formula

    written = record.extra.get("formula")
    if isinstance(written, str) and written.strip():
        try:
            return parse_formula(written)[0]
        except DataError:
            pass
    try:
        counts = record.structure().composition.get_el_amt_dict()
    except DataError:
        return None
    return reduced_formula(tuple(sorted((str(e), float(a)) for e, a in counts.items())))


def structure_row_keys(
    dataset: str,
    splits: Sequence[str] | None = None,
    *,
    symprec: float = 0.1,
    processes: int | None = None,
) -> list[RowKeys]:
    """Guard keys of every row of a CIF or SCOPE registry dataset, in file order.

    CIF sets are encoded with both SCOPE variants (cached on disk by
    :func:`cloud_model.corpus.encode_dataset_full`); the formula comes from the native
    string, or, where encoding failed, from the formula column or the CIF itself.
    SCOPE sets give the published string and the formula recovered from it and the
    ``n_atoms`` column.

    Raises:
        DataError: a formula set or resource (use the formula of each row instead), an
            unknown split.
    """
    from cloud_model.corpus import encode_dataset_full
    from cloud_model.datasets import get_spec, load_dataset

    spec = get_spec(dataset)
    if spec.kind not in ("cif", "scope"):
        raise DataError(
            f"dataset {dataset!r} is a {spec.kind} set; structure keys need a CIF or SCOPE set"
        )
    records = load_dataset(dataset, splits).records
    if spec.kind == "scope":
        out = []
        for r in records:
            text = r.scope or ""
            n_atoms = r.extra.get("n_atoms")
            out.append(RowKeys(r.id, None, cloud_key(text), formula_from_cloud(text, n_atoms)))
        return out
    native = encode_dataset_full(
        dataset, variant="native", symprec=symprec, processes=processes
    ).strings
    cloud = encode_dataset_full(
        dataset, variant="cloud", symprec=symprec, processes=processes
    ).strings
    out = []
    for r in records:
        n = native.get(r.id)
        c = cloud.get(r.id)
        formula = formula_from_native(n) if n is not None else _record_formula(r)
        out.append(RowKeys(r.id, n, None if c is None else cloud_key(c), formula))
    return out


def build_pool_index(
    pools: Mapping[str, Sequence[str]] = DEFAULT_POOLS,
    *,
    symprec: float = 0.1,
    processes: int | None = None,
) -> PoolIndex:
    """Read every pool split (CIF or SCOPE sets) into a :class:`PoolIndex`.

    Raises:
        ConfigError: an unknown dataset or split, or a pool that is not a CIF/SCOPE set.
    """
    from cloud_model.datasets import REGISTRY

    index = PoolIndex()
    for dataset, splits in pools.items():
        spec = REGISTRY.get(dataset)
        if spec is None or spec.kind not in ("cif", "scope"):
            raise ConfigError(f"pools: {dataset!r} is not a registered CIF or SCOPE dataset")
        for split in splits:
            if split not in spec.splits:
                raise ConfigError(
                    f"pools: dataset {dataset!r} has no split {split!r} (it has {list(spec.splits)})"
                )
            index.add(
                f"{dataset}:{split}",
                structure_row_keys(dataset, [split], symprec=symprec, processes=processes),
            )
    logger.info(
        "leakage guard: %d pool splits, %d ids, %d structures, %d formulas",
        len(index.names),
        len(index.ids),
        len(index.natives),
        len(index.formulas),
    )
    return index


# ----------------------------------------------------------------- reports


def guard_summary(report: GuardReport) -> dict[str, Any]:
    """A plain, JSON-ready summary of a guard report for a model card.

    Returns:
        ``excluded_pools``, ``criteria`` (the guard reasons in check order),
        ``removed_by_reason`` (totals over sets), ``removed`` and ``kept`` per set,
        ``removed_total`` (guard reasons only), ``dropped_invalid_total`` (rows
        dropped for data problems: unparsable formulas, unknown tokens, unencodable
        structures) and ``kept_total``.
    """
    by_reason: dict[str, int] = {}
    for reasons in report.removed.values():
        for reason, n in reasons.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    guarded = sum(n for r, n in by_reason.items() if r in GUARD_REASONS)
    return {
        "excluded_pools": list(report.pools),
        "criteria": list(GUARD_REASONS),
        "removed_by_reason": dict(sorted(by_reason.items())),
        "removed_total": guarded,
        "dropped_invalid_total": sum(by_reason.values()) - guarded,
        "kept_total": sum(report.kept.values()),
        "removed": {d: dict(sorted(r.items())) for d, r in sorted(report.removed.items())},
        "kept": dict(sorted(report.kept.items())),
    }


def write_guard_report(
    report: GuardReport, path: str | Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``report`` as JSON (``format``, the report's fields, ``summary``, then ``extra``).

    Returns:
        The path written.
    """
    payload: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "pools": list(report.pools),
        "removed": report.removed,
        "kept": report.kept,
        "summary": guard_summary(report),
        **dict(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_guard_report(path: str | Path) -> GuardReport:
    """Read a report written by :func:`write_guard_report`.

    Raises:
        DataError: unreadable file or another format.
    """
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read guard report {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != REPORT_FORMAT:
        raise DataError(f"{path} is not a {REPORT_FORMAT} file")
    return GuardReport(
        pools=list(payload["pools"]), removed=dict(payload["removed"]), kept=dict(payload["kept"])
    )
