"""The candidate pool of a campaign: ids, SCOPE strings, and (for simulated labs) the truth.

A pool comes from a registry dataset (CIF sets are SCOPE-encoded once, through the
on-disk cache of :mod:`cloud_model.corpus`) or from a CSV file with an id column and
a CIF or SCOPE column, read by the shared loader
:func:`cloud_model.labelled_data.load_labelled` (its rules for ids, missing values
and errors are documented there). Rows that cannot be encoded are reported (count
and first ids) and left out, never silently dropped; a pool with none left is an error.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import torch

from cloud_model.errors import ConfigError
from cloud_model.labelled_data import SMALL_SELECTION, DataSource, LabelledSet, load_labelled
from loop.config import PoolConfig

# a hand-picked pool (pool.include_ids) up to this size is encoded on its own, not the whole dataset
SMALL_POOL = SMALL_SELECTION

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
        targets: target columns to read as truth (missing/NaN values are skipped; a CSV
            pool may lack a target column altogether).
        seed: seeds the ``max_candidates`` subsample.

    Raises:
        DataError: unknown dataset or target, missing file or column.
        ConfigError: ``include_ids`` not in the pool, empty pool.
    """
    if config.dataset is not None:
        source = DataSource(
            dataset=config.dataset,
            splits=None if config.splits is None else tuple(config.splits),
            targets=targets,
            variant=config.variant,
            symprec=config.symprec,
            processes=None,
        )
    else:
        source = DataSource(
            csv=config.file,
            targets=targets,
            id_column=config.id_column,
            structure_column=config.structure_column,
            structure_format=config.structure_format,
            n_atoms_column=None,
            variant=config.variant,
            symprec=config.symprec,
            processes=None,
        )
    small = config.include_ids is not None and len(config.include_ids) <= SMALL_POOL
    data = load_labelled(
        source,
        only_ids=config.include_ids if small else None,
        require_targets=config.dataset is not None,  # a CSV pool may come without truth
        allow_empty=True,
        dtype=torch.float64,  # the truth exactly as the source has it
    )
    pool = _from_labelled(data)
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
    return pool


def _from_labelled(data: LabelledSet) -> Pool:
    """Ids, strings, structures and the finite labels (truth) of a loaded set."""
    truth: dict[str, dict[str, float]] = {}
    for cid, row in zip(data.ids, data.y.tolist(), strict=True):  # one conversion, not n
        values = {t: v for t, v in zip(data.target_names, row, strict=True) if not math.isnan(v)}
        if values:
            truth[cid] = values
    return Pool(
        ids=list(data.ids),
        scopes=list(data.scopes),
        cifs=dict(data.cifs),
        truth=truth,
        units=dict(data.units),
        invalid=list(data.invalid),
    )


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


def load_prior(
    config: PoolConfig, targets: tuple[str, ...], pool_ids: list[str], *, seed: int = 0
) -> tuple[list[str], torch.Tensor]:
    """Labelled prior data: SCOPE strings and ``p x m`` labels (NaN where missing).

    Rows without any label, and rows whose id is a candidate of the pool (a label
    of the pool must never be known in advance), are left out.
    """
    prior = load_pool(config, targets, seed=seed)
    in_pool = set(pool_ids)
    rows = [
        (scope, prior.truth[cid])
        for cid, scope in zip(prior.ids, prior.scopes, strict=True)
        if prior.truth.get(cid) and cid not in in_pool
    ]
    y = torch.tensor(
        [[labels.get(name, float("nan")) for name in targets] for _, labels in rows],
        dtype=torch.float64,
    ).reshape(len(rows), len(targets))
    logger.info("%d labelled prior records join every fit", len(rows))
    return [scope for scope, _ in rows], y
