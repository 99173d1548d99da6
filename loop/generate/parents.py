"""Where parent structures (the hits to substitute into) come from.

A directory of structure files, or a campaign directory: its best ``N`` measured
candidates under the campaign's own objective, with their structures read back from
the campaign's pool.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_model.errors import DataError

if TYPE_CHECKING:
    from pymatgen.core import Structure


def parents_from_directory(directory: Path) -> list[tuple[str, Structure]]:
    """(file stem, structure) of every structure file directly in ``directory``.

    Raises:
        DataError: not a directory, no structure files, or a file pymatgen cannot read.
    """
    from cloud_model.corpus import read_structure_file, structure_files

    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory of structure files or a campaign directory")
    files = structure_files(directory)
    if not files:
        raise DataError(f"{directory}: no structure files (*.cif, *.vasp, POSCAR*) in it")
    return [(path.stem, read_structure_file(path)) for path in files]


def parents_from_campaign(directory: Path, best: int) -> list[tuple[str, Structure]]:
    """The campaign's ``best`` measured candidates (by its objective) and their structures.

    Raises:
        DataError: no store or config in ``directory``, no measurements of the objective,
            or a pool without CIFs (a SCOPE-only pool has no structures to substitute).
    """
    from pymatgen.core import Structure

    from loop.config import parse_config
    from loop.pool import load_pool
    from loop.store import STORE_FILENAME, CampaignStore

    if not (directory / STORE_FILENAME).exists():
        raise DataError(f"{directory}: no {STORE_FILENAME}; not a campaign directory")
    with CampaignStore(directory, create=False) as store:
        text = store.get_meta("config")
        measurements = store.measurements()
    if text is None:
        raise DataError(f"{directory}: the store holds no campaign config")
    config = parse_config(json.loads(text), source=f"{directory}/{STORE_FILENAME}")
    objective = config.objective
    scores: dict[str, float] = {}
    for m in measurements:
        value = m.values.get(objective.target)
        if value is None or not math.isfinite(value.value):
            continue
        v = value.value
        if objective.sense == "maximize":
            score = v
        elif objective.sense == "minimize":
            score = -v
        else:
            low, high = objective.window or (v, v)
            score = -max(low - v, v - high, 0.0)
        scores[m.candidate_id] = max(score, scores.get(m.candidate_id, -math.inf))
    if not scores:
        raise DataError(f"{directory}: no measurement of the objective {objective.target!r} yet")
    chosen = sorted(scores, key=lambda cid: -scores[cid])[:best]
    pool_config = config.pool.model_copy(
        update={"include_ids": chosen, "exclude_ids": [], "max_candidates": None}
    )
    pool = load_pool(pool_config, ())
    missing = [cid for cid in chosen if cid not in pool.cifs]
    if missing:
        raise DataError(
            f"{directory}: the campaign's pool has no CIF for {missing[:3]} "
            "(a SCOPE-only pool has no structures to substitute into)"
        )
    return [(cid, Structure.from_str(pool.cifs[cid], fmt="cif")) for cid in chosen]
