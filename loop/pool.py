"""The candidate pool of a campaign: ids, SCOPE strings, and (for simulated labs) the truth.

A pool comes from a registry dataset (CIF sets are SCOPE-encoded once, through the
on-disk cache of :mod:`cloud_model.corpus`) or from a CSV file with an id column and
a CIF or SCOPE column. Rows that cannot be encoded are reported (count and first
ids) and left out, never silently dropped; a pool with none left is an error.
"""

from __future__ import annotations

import csv
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_model.errors import ConfigError, DataError
from loop.config import PoolConfig

if TYPE_CHECKING:
    from cloud_model.datasets import CrystalRecord

# a hand-picked pool (pool.include_ids) up to this size is encoded on its own, not the whole dataset
SMALL_POOL = 500

logger = logging.getLogger(__name__)


@dataclass
class Pool:
    """Candidates in a fixed order (the index used by the surrogate and acquisition).

    Attributes:
        ids: candidate ids, length ``N``.
        scopes: SCOPE strings, length ``N``.
        cifs: CIF text per id where known (GPAW/CHGNet adapters need structures).
        truth: id -> {target: value} from the source, for simulated labs and reports only.
        units: target -> unit.
        invalid: (id, reason) of rows left out.
    """

    ids: list[str]
    scopes: list[str]
    cifs: dict[str, str] = field(default_factory=dict)
    truth: dict[str, dict[str, float]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    invalid: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def load_pool(config: PoolConfig, targets: tuple[str, ...], *, seed: int = 0) -> Pool:
    """Build the pool described by ``config``.

    Args:
        config: the campaign's pool section.
        targets: target columns to read as truth (missing/NaN values are skipped).
        seed: seeds the ``max_candidates`` subsample.

    Raises:
        ConfigError: unknown dataset or target, missing columns, empty pool.
    """
    if config.dataset is not None:
        pool = _from_dataset(config, targets)
    else:
        assert config.file is not None  # the config validator guarantees one source
        pool = _from_file(config, targets)
    if config.include_ids is not None:
        wanted = set(config.include_ids)
        missing = wanted - set(pool.ids)
        if missing:
            raise ConfigError(f"pool.include_ids not in the pool: {sorted(missing)[:5]}")
        pool = _subset(pool, [i for i, cid in enumerate(pool.ids) if cid in wanted])
    if config.exclude_ids:
        drop = set(config.exclude_ids)
        pool = _subset(pool, [i for i, cid in enumerate(pool.ids) if cid not in drop])
    if config.max_candidates is not None and config.max_candidates < len(pool):
        keep = sorted(random.Random(seed).sample(range(len(pool)), config.max_candidates))
        pool = _subset(pool, keep)
    if len(pool) == 0:
        raise ConfigError("the candidate pool is empty after encoding, exclusions and subsampling")
    if pool.invalid:
        logger.warning(
            "%d pool rows left out (first: %s)",
            len(pool.invalid),
            ", ".join(f"{i}: {r}" for i, r in pool.invalid[:3]),
        )
    return pool


def _from_dataset(config: PoolConfig, targets: tuple[str, ...]) -> Pool:
    from cloud_model.datasets import get_spec, load_dataset

    assert config.dataset is not None
    spec = get_spec(config.dataset)
    unknown = [t for t in targets if t not in spec.targets]
    if unknown:
        raise ConfigError(
            f"dataset {spec.name!r} has no target(s) {unknown}; it has {sorted(spec.targets)}"
        )
    loaded = load_dataset(spec.name, config.splits)
    scopes = _scopes_for(spec.name, loaded.records, config)
    pool = Pool(ids=[], scopes=[], units={t: spec.targets[t].unit for t in targets})
    pool.invalid.extend(loaded.invalid)
    for rec in loaded.records:
        scope = scopes.get(rec.id)
        if scope is None:
            pool.invalid.append((rec.id, "could not be SCOPE-encoded"))
            continue
        pool.ids.append(rec.id)
        pool.scopes.append(scope)
        if rec.cif is not None:
            pool.cifs[rec.id] = rec.cif
        values = {
            t: rec.targets[t] for t in targets if not math.isnan(rec.targets.get(t, math.nan))
        }
        if values:
            pool.truth[rec.id] = values
    return pool


def _scopes_for(name: str, records: list[CrystalRecord], config: PoolConfig) -> dict[str, str]:
    """SCOPE strings by record id: the whole dataset (cached), or only a hand-picked few."""
    from cloud_model.corpus import encode_dataset, encode_structures

    few = config.include_ids is not None and len(config.include_ids) <= SMALL_POOL
    if not few or any(r.cif is None for r in records):
        return encode_dataset(name, variant=config.variant, symprec=config.symprec)
    wanted = set(config.include_ids or ())
    chosen = [r for r in records if r.id in wanted]
    result = encode_structures(
        [r.cif or "" for r in chosen], variant=config.variant, symprec=config.symprec
    )
    return {r.id: s for r, s in zip(chosen, result.strings, strict=True) if s is not None}


def _from_file(config: PoolConfig, targets: tuple[str, ...]) -> Pool:
    assert config.file is not None
    path = config.file
    if not path.is_file():
        raise ConfigError(f"pool.file {path} not found")
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        for needed in (config.id_column, config.structure_column):
            if needed not in columns:
                raise ConfigError(f"pool.file {path}: no column {needed!r} (columns: {columns})")
        rows = list(reader)
    ids = [r[config.id_column] for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"pool.file {path}: ids in column {config.id_column!r} are not unique")
    texts = [r[config.structure_column] for r in rows]
    if config.structure_format == "scope":
        encoded: list[str | None] = [t.strip() or None for t in texts]
        errors = {i: "empty SCOPE string" for i, t in enumerate(encoded) if t is None}
    else:
        from cloud_model.corpus import encode_structures

        result = encode_structures(texts, variant=config.variant, symprec=config.symprec)
        encoded, errors = list(result.strings), dict(result.errors)
    pool = Pool(ids=[], scopes=[], units={t: "" for t in targets if t in columns})
    for i, (cid, scope) in enumerate(zip(ids, encoded, strict=True)):
        if scope is None:
            pool.invalid.append((cid, errors.get(i, "could not be encoded")))
            continue
        pool.ids.append(cid)
        pool.scopes.append(scope)
        if config.structure_format == "cif":
            pool.cifs[cid] = texts[i]
        values = {}
        for t in targets:
            raw = rows[i].get(t, "")
            try:
                values[t] = float(raw)
            except (TypeError, ValueError):
                continue
        if values:
            pool.truth[cid] = values
    return pool


def _subset(pool: Pool, keep: list[int]) -> Pool:
    ids = [pool.ids[i] for i in keep]
    kept = set(ids)
    return Pool(
        ids=ids,
        scopes=[pool.scopes[i] for i in keep],
        cifs={k: v for k, v in pool.cifs.items() if k in kept},
        truth={k: v for k, v in pool.truth.items() if k in kept},
        units=pool.units,
        invalid=pool.invalid,
    )


def _open_text(path: Path):  # type: ignore[no-untyped-def]
    import gzip

    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="")
    return path.open(newline="")
