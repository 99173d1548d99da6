"""Candidates added while a campaign runs: substitutions of the newest hits join the pool.

With ``pool.generators.grow`` set, the campaign calls :func:`after_round` before each
decision. Every ``grow.every`` rounds (a round is one acquisition decision) it takes the
best ``grow.from_top`` measured candidates not used as parents before, substitutes into
them (:func:`loop.generate.pipeline.generate_candidates`: data-mined substitution, CHGNet
relaxation, checks, deduplication against the whole pool and each other, SCOPE encoding
at the pool's ``variant``/``symprec``), and appends at most ``grow.max_new`` survivors to
the pool. The additions, their CIFs and provenance and the growth step itself are one
store transaction (:meth:`loop.store.CampaignStore.add_generated`), so a campaign killed at
any point resumes with exactly the candidates it had: :func:`extend_pool` re-attaches them
to the configured pool when the campaign opens. The agent is then rebuilt over the grown
pool, and :class:`GrowthAwareRegistry` makes its surrogate refit rather than restore a
version fitted before the pool grew (prior-data rows sit after the pool, so their
indices move when it grows).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from loop.config import CampaignConfig
    from loop.ledger import Ledger
    from loop.pool import Pool
    from loop.registry import ModelRegistry, ModelVersion
    from loop.store import CampaignStore
    from loop.surrogate import Surrogate

logger = logging.getLogger(__name__)


class GrowConfig(BaseModel):
    """``pool.generators.grow``: when and how much the pool grows during a campaign."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(default=1, ge=1, description="rounds (decisions) between growth steps")
    from_top: int = Field(default=3, ge=1, description="best new hits substituted into per step")
    max_new: int = Field(default=20, ge=1, description="candidates added per step at most")
    max_total: int | None = Field(default=None, ge=1, description="generated in all, at most")


def extend_pool(pool: Pool, store: CampaignStore) -> Pool:
    """The configured pool plus every generated candidate the store holds, in store order."""
    from loop.pool import Pool

    generated = [g for g in store.generated() if g["id"] not in set(pool.ids)]
    if not generated:
        return pool
    return Pool(
        ids=pool.ids + [g["id"] for g in generated],
        scopes=pool.scopes + [g["scope"] for g in generated],
        cifs={**pool.cifs, **{g["id"]: g["cif"] for g in generated}},
        truth=pool.truth,
        units=pool.units,
        invalid=pool.invalid,
    )


def _due(config: GrowConfig, store: CampaignStore) -> int | None:
    """The round number when a growth step is due now, else None."""
    n_decisions = len(store.decisions())
    growths = store.growths()
    last = growths[-1]["round"] if growths else 0
    if n_decisions == 0 or n_decisions < last + config.every or n_decisions == last:
        return None
    if config.max_total is not None and sum(g["n_added"] for g in growths) >= config.max_total:
        return None
    return n_decisions


def _new_hits(ledger: Ledger, pool: Pool, used: set[str], k: int) -> list[str]:
    """The ``k`` best measured candidates with a structure, not parents before."""
    idx, y = ledger.measured()
    if idx.numel() == 0:
        return []
    score = ledger.spec.score(y)  # n
    ranked = sorted(
        ((float(s), ledger.ids[int(i)]) for s, i in zip(score.tolist(), idx.tolist(), strict=True)
         if math.isfinite(float(s))),
        reverse=True,
    )  # fmt: skip
    return [cid for _, cid in ranked if cid not in used and cid in pool.cifs][:k]


def after_round(config: CampaignConfig, ledger: Ledger, pool: Pool, directory: Path) -> Pool | None:
    """Grow the pool when a step is due; the grown pool, or None when nothing changed.

    Args:
        config: the campaign config (``pool.generators`` and the pool's encoding).
        ledger: the campaign's facts (measurements, objective, store).
        pool: the current pool (configured + generated so far).
        directory: the campaign directory (the CHGNet cache goes to ``generate/``).
    """
    from pymatgen.core import Structure

    from loop.generate.pipeline import KnownStructures, generate_candidates

    generators = config.pool.generators
    if generators is None or generators.grow is None:
        return None
    grow, store = generators.grow, ledger.store
    round_no = _due(grow, store)
    if round_no is None:
        return None
    used = {p for g in store.growths() for p in g["parents"]}
    parents_ids = _new_hits(ledger, pool, used, grow.from_top)
    latest = store.latest_model_version()
    model_version = None if latest is None else latest[0]
    if not parents_ids:
        store.add_generated(round_no=round_no, parents=[], rows=[], model_version=model_version,
                            summary=json.dumps({"note": "no new measured hit with a structure"}))  # fmt: skip
        return None
    energies = generators.energies
    if energies.cache_dir == Path(".cloudlab/generate"):  # the default: keep it in the campaign
        energies = energies.model_copy(update={"cache_dir": directory / "generate"})
    gen_config = generators.model_copy(
        update={
            "symmetry": None,
            "grow": None,
            "variant": config.pool.variant,
            "checks": generators.checks.model_copy(update={"symprec": config.pool.symprec}),
            "energies": energies,
            "max_candidates": generators.max_candidates or 3 * grow.max_new,
        }
    )
    parents = [(cid, Structure.from_str(pool.cifs[cid], fmt="cif")) for cid in parents_ids]
    logger.info("round %d: generating from %s", round_no, ", ".join(parents_ids))
    result = generate_candidates(parents, gen_config, pool=KnownStructures.from_cifs(pool.cifs))
    have = set(pool.ids)
    fresh = [c for c in result.candidates if c.id not in have][: grow.max_new]
    rows = [
        (c.id, c.scope, c.cif,
         json.dumps({**c.provenance, "round": round_no, "energy_per_atom": c.energy_per_atom},
                    sort_keys=True))
        for c in fresh
    ]  # fmt: skip
    store.add_generated(
        round_no=round_no,
        parents=parents_ids,
        rows=rows,
        model_version=model_version,
        summary=result.summary.model_dump_json(),
    )
    logger.info("round %d: %d generated candidate(s) joined the pool", round_no, len(rows))
    return extend_pool(pool, store) if rows else None


def registry_for(store: CampaignStore, directory: Path) -> ModelRegistry:
    """The campaign's model registry; with growth, one that never restores a stale version."""
    from loop.registry import ModelRegistry

    class GrowthAwareRegistry(ModelRegistry):
        """Restores the newest version only when it was fitted after the last growth step."""

        def restore(self, surrogate: Surrogate) -> ModelVersion | None:
            grown = [g for g in self.store.growths() if g["n_added"] > 0]
            latest = self.latest()
            if grown and latest is not None:
                before = grown[-1]["model_version"]
                if before is not None and latest.version <= before:
                    logger.info("the pool grew after surrogate v%d: refitting", latest.version)
                    return None
            return super().restore(surrogate)

    return GrowthAwareRegistry(store, directory)
