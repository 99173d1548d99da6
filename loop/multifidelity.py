"""Low-fidelity tables for simulated multi-fidelity labs: CHGNet on a registry dataset, cached.

A simulated multi-fidelity benchmark needs, for every candidate of a labelled pool,
a cheap and imperfect measurement of the same quantity. For the structure sets
whose labels are DFT values this is a universal ML potential evaluated on the very
same structure:

* ``energy_per_atom`` -- the CHGNet energy per atom of the dataset's structure, as
  given (no relaxation: "the same structure"), eV/atom; the low fidelity of
  ``carbon_24``'s DFT ``energy_per_atom``;
* ``formation_energy_per_cell`` -- the CHGNet energy of the cell minus the elemental
  references computed with CHGNet (eV per cell); the low fidelity of ``perov_5``'s
  ``heat_ref`` (heat of formation of the 5-atom cell). The references are the CHGNet
  adapter's own (:meth:`adapters.mlip.ChgnetCalculator.reference`: ASE's reference
  states, diatomic molecules for H, N, O, F, Cl, Br, I, relaxed with CHGNet); an
  element ASE has no simple ground state for (in perov_5: B, Ga, Mn, S, Te) takes
  the lowest relaxed CHGNet energy per atom among the elemental structures of the
  registry's Materials Project sets (``mp_20_pilot``, ``mpts_52``, ``mp_20_biternary``).

Contamination: CHGNet is trained on MPtrj (Materials Project relaxation
trajectories). ``carbon_24`` (AIRSS carbon at 10 GPa) and ``perov_5`` (Castelli's
computational cubic perovskites) are not Materials Project pools, so the low
fidelity has not seen the benchmark's labels; it stays a cheap, biased proxy.

The table is computed once and cached under the data cache dir
(``$CLOUDLAB_CACHE_DIR/data/fidelity/<dataset>-<quantity>-<key>.jsonl``, the key
hashing the structure set -- every id and its CIF -- the CHGNet version and the
model version). Rows are appended batch by batch, so an interrupted build keeps its
partial table and continues where it stopped. Build with::

    OMP_NUM_THREADS=1 python -m loop.multifidelity carbon_24 energy_per_atom --splits val test
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from loop.config import CampaignConfig
    from loop.pool import Pool

__all__ = [
    "LowFidelityQuantity",
    "TableMeta",
    "check_fidelities",
    "chgnet_table",
    "fidelity_columns",
    "table_path",
]

logger = logging.getLogger(__name__)

LowFidelityQuantity = Literal["energy_per_atom", "formation_energy_per_cell"]
# registry sets searched for elemental structures ASE has no reference state for
_ELEMENT_SOURCES = ("mp_20_pilot", "mpts_52", "mp_20_biternary")
MODEL_VERSION: Literal["0.3.0"] = "0.3.0"


class TableMeta(BaseModel):
    """What a finished table was computed with (``<table>.meta.json``)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    splits: list[str] | None
    quantity: str
    chgnet_version: str
    model_version: str
    n_rows: int
    compute_s: float  # CHGNet seconds of the rows computed by this and earlier builds
    references: dict[str, float]  # element -> eV/atom (formation quantities only)
    reference_sources: dict[str, str]  # element -> what structure gave it


def _chgnet_version() -> str:
    from adapters.mlip import _chgnet_version as version

    return version()


def _structure_key(items: Sequence[tuple[str, str]], quantity: str) -> str:
    digest = hashlib.sha256()
    for cid, cif in items:
        digest.update(cid.encode())
        digest.update(hashlib.sha256(cif.encode()).digest())
    digest.update(f"{quantity}|chgnet {_chgnet_version()}|model {MODEL_VERSION}".encode())
    return digest.hexdigest()[:16]


def table_path(dataset: str, quantity: str, key: str, cache_dir: Path | None = None) -> Path:
    """Where the table of ``dataset``/``quantity`` with structure-set ``key`` lives."""
    from cloud_model.datasets import cache_dir as data_cache_dir

    root = cache_dir if cache_dir is not None else data_cache_dir()
    return root / "fidelity" / f"{dataset}-{quantity}-{key}.jsonl"


def _read_rows(path: Path) -> dict[str, float]:
    rows: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: computed again
                    continue
                rows[str(row["id"])] = float(row["value"])
    return rows


def _element_references(
    elements: set[str], calculator: object, reference_dir: Path
) -> tuple[dict[str, float], dict[str, str]]:
    """CHGNet reference energies per atom of ``elements`` (see the module docstring)."""
    from adapters.elemental_references import (
        ReferenceCache,
        ReferenceEnergy,
        reference_structure,
        settings_hash,
    )
    from adapters.mlip import ChgnetCalculator, ChgnetSettings

    assert isinstance(calculator, ChgnetCalculator)
    hard = set()
    for el in elements:
        try:
            reference_structure(el)
        except Exception:  # no ASE reference state: found in the registry instead
            hard.add(el)
    cifs, sources = _registry_elemental_cifs(hard, calculator)
    settings = ChgnetSettings(model_version=MODEL_VERSION, reference_cifs=cifs, threads=1)
    key = settings_hash(settings.reference_settings(_chgnet_version()))
    cache = ReferenceCache(reference_dir / "chgnet.json")
    energies: dict[str, float] = {}
    for el in sorted(elements):

        def compute(el: str = el) -> ReferenceEnergy:
            return calculator.reference(el, settings, key)

        ref = cache.get_or_compute(el, key, compute)
        energies[el] = ref.energy_per_atom
        sources.setdefault(el, ref.description)
    return energies, sources


def _registry_elemental_cifs(
    elements: set[str], calculator: object
) -> tuple[dict[str, str], dict[str, str]]:
    """For each element, the registry structure with the lowest relaxed CHGNet energy per atom."""
    from adapters.mlip import ChgnetCalculator, ChgnetSettings
    from cloud_model.datasets import load_dataset
    from cloud_model.errors import DataError

    assert isinstance(calculator, ChgnetCalculator)
    if not elements:
        return {}, {}
    settings = ChgnetSettings(model_version=MODEL_VERSION, threads=1)
    best: dict[str, tuple[float, str, str]] = {}
    for name in _ELEMENT_SOURCES:
        try:
            records = load_dataset(name).records
        except DataError as exc:
            logger.warning("elemental structures: %s unavailable (%s)", name, exc)
            continue
        for rec in records:
            structure = rec.structure()
            if len(structure.composition.elements) != 1:
                continue
            el = str(structure.composition.elements[0])
            if el not in elements:
                continue
            relaxed, _ = calculator.relax(structure, settings, relax_cell=True)
            e = float(calculator.model().predict_structure(relaxed, task="e")["e"])
            if el not in best or e < best[el][0]:
                best[el] = (e, rec.cif or "", f"{name}:{rec.id}")
    missing = elements - set(best)
    if missing:
        raise DataError(
            f"no elemental reference structure for {sorted(missing)}: ASE has no reference state "
            f"and no registry set ({', '.join(_ELEMENT_SOURCES)}) holds one"
        )
    return {el: b[1] for el, b in best.items()}, {el: b[2] for el, b in best.items()}


def chgnet_table(
    dataset: str,
    quantity: LowFidelityQuantity,
    *,
    splits: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """CHGNet values of every structure of ``dataset`` (computed once, then read from disk).

    Args:
        dataset: a registry CIF set (``carbon_24``, ``perov_5``...).
        quantity: ``energy_per_atom`` (eV/atom) or ``formation_energy_per_cell`` (eV/cell).
        splits: the dataset's splits (None: all).
        ids: only these records (a test's tiny table); None: every record of the splits.
        cache_dir: root of the cache (default: the data cache dir).
        batch_size: structures per CHGNet call.
        progress: called with (rows done, rows in all) after every batch.

    Returns:
        Candidate id -> value.

    Raises:
        DataError: the dataset cannot be read, or an element has no reference.
    """
    from cloud_model.datasets import load_dataset

    records = load_dataset(dataset, list(splits) if splits is not None else None).records
    if ids is not None:
        wanted = set(ids)
        records = [r for r in records if r.id in wanted]
    items = [(r.id, r.cif or "") for r in records]
    key = _structure_key(items, quantity)
    path = table_path(dataset, quantity, key, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = path.with_suffix(".meta.json")
    rows = _read_rows(path)
    todo = [r for r in records if r.id not in rows]
    if not todo:
        return rows
    from adapters.mlip import ChgnetCalculator

    calculator = ChgnetCalculator(MODEL_VERSION, threads=1)
    structures: list[Structure] = [r.structure() for r in todo]
    references: dict[str, float] = {}
    sources: dict[str, str] = {}
    if quantity == "formation_energy_per_cell":
        elements = {str(e) for s in structures for e in s.composition.elements}
        references, sources = _element_references(elements, calculator, path.parent / "references")
    old = TableMeta.model_validate_json(meta_path.read_text()) if meta_path.exists() else None
    compute_s = old.compute_s if old is not None else 0.0
    logger.info(
        "CHGNet %s of %d %s structures (%d cached)", quantity, len(todo), dataset, len(rows)
    )
    model = calculator.model()
    for start in range(0, len(todo), batch_size):
        batch = structures[start : start + batch_size]
        t0 = time.perf_counter()
        out = model.predict_structure(batch, task="e", batch_size=batch_size)
        outs = out if isinstance(out, list) else [out]
        compute_s += time.perf_counter() - t0
        lines = []
        for rec, structure, pred in zip(todo[start : start + batch_size], batch, outs, strict=True):
            e_atom = float(pred["e"])
            if quantity == "energy_per_atom":
                value = e_atom
            else:
                n = len(structure)
                comp = structure.composition
                value = e_atom * n - sum(references[str(el)] * amt for el, amt in comp.items())
            rows[rec.id] = value
            lines.append(json.dumps({"id": rec.id, "value": value}))
        with path.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
        if progress is not None:
            progress(len(rows), len(records))
    meta = TableMeta(
        dataset=dataset,
        splits=list(splits) if splits is not None else None,
        quantity=quantity,
        chgnet_version=_chgnet_version(),
        model_version=MODEL_VERSION,
        n_rows=len(rows),
        compute_s=compute_s,
        references=references,
        reference_sources=sources,
    )
    meta_path.write_text(meta.model_dump_json(indent=1))
    return rows


_UNITS = {"energy_per_atom": "eV/atom", "formation_energy_per_cell": "eV"}
_TABLES: dict[tuple[str, tuple[str, ...] | None, str], dict[str, float]] = {}  # per process


def _cached_table(
    dataset: str, splits: tuple[str, ...] | None, quantity: LowFidelityQuantity
) -> dict[str, float]:
    """:func:`chgnet_table`, read from disk once per process (benchmark workers run many)."""
    key = (dataset, splits, quantity)
    if key not in _TABLES:
        _TABLES[key] = chgnet_table(dataset, quantity, splits=splits)
    return _TABLES[key]


def fidelity_columns(
    config: CampaignConfig, pool: Pool
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Every simulated fidelity's hidden values, under the names it reports them, and units.

    The highest fidelity's values are the pool's labels (renamed if its ``outputs`` say
    so); a lower one's come from its ``simulated`` source, which states one value per
    candidate for the objective's target (the first target).

    Raises:
        ConfigError: naming ``fidelities[i].simulated``: no source, an unknown column,
            a file that cannot be read, or a source covering none of the pool.
    """
    from cloud_model.errors import ConfigError
    from loop.fidelity import output_names

    columns: dict[str, dict[str, float]] = {}
    units: dict[str, str] = {}
    target = config.objective.target
    highest = config.highest_fidelity
    for i, f in enumerate(config.fidelities):
        names = output_names(f, config.targets, is_highest=f.name == highest)
        where = f"fidelities[{i}] ({f.name})"
        if f.name == highest:
            for t, name in names.items():
                if name != t:
                    columns[name] = {c: v[t] for c, v in pool.truth.items() if t in v}
                    units[name] = pool.units.get(t, "")
            continue
        sim = f.simulated
        if sim is None:
            raise ConfigError(
                f"{where}.simulated: a simulated lab needs this fidelity's values (a dataset "
                "column, a chgnet table or a file)"
            )
        if sim.column is not None:
            values = _dataset_column(config, sim.column, where)
            unit = pool.units.get(target, "")
        elif sim.chgnet is not None:
            if config.pool.dataset is None:
                raise ConfigError(f"{where}.simulated.chgnet: needs a registry pool.dataset")
            splits = tuple(config.pool.splits) if config.pool.splits is not None else None
            values = _cached_table(config.pool.dataset, splits, sim.chgnet)
            unit = _UNITS[sim.chgnet]
        else:
            assert sim.file is not None
            values = _file_column(sim.file, sim.id_column, sim.value_column, where)
            unit = pool.units.get(target, "")
        in_pool = {c: v for c, v in values.items() if c in set(pool.ids)}
        if not in_pool:
            raise ConfigError(f"{where}.simulated: no value for any candidate of the pool")
        columns[names[target]] = in_pool
        units[names[target]] = unit
    return columns, units


def check_fidelities(config: CampaignConfig, pool: Pool) -> None:
    """Check, before anything is written, that a simulated lab can measure every fidelity.

    Raises:
        ConfigError: naming the fidelity and the field (see :func:`fidelity_columns`).
    """
    from simulators.config import SimulatedLabConfig

    if isinstance(config.adapter, SimulatedLabConfig):
        fidelity_columns(config, pool)


def _dataset_column(config: CampaignConfig, column: str, where: str) -> dict[str, float]:
    import math

    from cloud_model.datasets import load_dataset
    from cloud_model.errors import ConfigError

    if config.pool.dataset is None:
        raise ConfigError(f"{where}.simulated.column: needs a registry pool.dataset")
    records = load_dataset(config.pool.dataset, config.pool.splits).records
    if records and column not in records[0].targets:
        raise ConfigError(
            f"{where}.simulated.column: {column!r} is not a column of {config.pool.dataset} "
            f"(it has {sorted(records[0].targets)})"
        )
    return {r.id: r.targets[column] for r in records if math.isfinite(r.targets[column])}


def _file_column(path: Path, id_column: str, value_column: str, where: str) -> dict[str, float]:
    import csv
    import math

    from cloud_model.errors import ConfigError

    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            if id_column not in fields or value_column not in fields:
                raise ConfigError(
                    f"{where}.simulated.file: {path} needs columns {id_column!r} and "
                    f"{value_column!r}, has {fields}"
                )
            out = {}
            for row in reader:
                value = float(row[value_column])
                if math.isfinite(value):
                    out[row[id_column]] = value
            return out
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}.simulated.file: cannot read {path}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    """Build one table from the command line (with progress on stderr)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m loop.multifidelity")
    parser.add_argument("dataset")
    parser.add_argument("quantity", choices=["energy_per_atom", "formation_energy_per_cell"])
    parser.add_argument("--splits", nargs="*", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    t0 = time.perf_counter()

    def show(done: int, total: int) -> None:
        sys.stderr.write(f"\r{done}/{total} ({time.perf_counter() - t0:.0f} s)")

    rows = chgnet_table(
        args.dataset, args.quantity, splits=args.splits, batch_size=args.batch_size, progress=show
    )
    sys.stderr.write(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
