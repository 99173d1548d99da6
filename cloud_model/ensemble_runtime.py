"""Where an ensemble's work runs: the frozen-feature cache and member training (local or Ray).

:class:`FeatureCache` keeps the frozen trunk's output per SCOPE string in memory
so that a pool is encoded once however often it is scored. :func:`fit_members`
trains the members either one after the other in this process (CPU default) or
in parallel as Ray actors, each pinned to a GPU or a fraction of one
(``gpus_per_member``); members go to the actors as JSON spec + safetensors-style
tensor dicts and come back the same way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from cloud_model.finetune import (
    FeatureKind,
    FeatureSet,
    FinetuneConfig,
    MemberFitReport,
    MemberNet,
    MemberSpec,
    resolve_device,
    train_member,
)

logger = logging.getLogger(__name__)

ParallelMode = Literal["in_process", "ray"]
# (member index, epoch, training loss, validation loss or None)
EpochCallback = Callable[[int, int, float, float | None], None]


class FeatureCache:
    """Frozen-trunk features per string, first in first out beyond ``max_entries``.

    Rows are stored trimmed to the string's real tokens on the CPU: ``(C,)`` pooled
    vectors, ``(L, C)`` token states or ``(L,)`` token ids. ``n_computed`` counts
    strings that had to go through the trunk (a cache miss).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.n_computed = 0
        self._rows: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, scope: object) -> bool:
        return scope in self._rows

    def clear(self) -> None:
        """Forget every cached row."""
        self._rows.clear()

    def adopt(self, other: FeatureCache) -> None:
        """Add the rows of ``other`` that this cache lacks (within ``max_entries``)."""
        for scope, row in other._rows.items():
            if len(self._rows) >= self.max_entries:
                break
            self._rows.setdefault(scope, row)

    def gather(
        self,
        scopes: Sequence[str],
        encode: Callable[[list[str]], list[Tensor]],
        kind: FeatureKind,
    ) -> tuple[Tensor, Tensor | None]:
        """Features of ``scopes``, encoding (once each) the strings not cached yet.

        Args:
            scopes: n strings, duplicates allowed.
            encode: maps new strings to their trimmed feature rows.
            kind: which features the rows are (see :mod:`cloud_model.finetune`).

        Returns:
            ``(n, C)`` and None for pooled features, else rows padded to the longest
            (``(n, T, C)`` or ``(n, T)``) and the ``(n, T)`` bool mask of real tokens.
        """
        unique = list(dict.fromkeys(scopes))
        found = {s: self._rows[s] for s in unique if s in self._rows}  # before any eviction
        missing = [s for s in unique if s not in found]
        fresh: dict[str, Tensor] = {}
        if missing:
            fresh = dict(zip(missing, encode(missing), strict=True))
            self.n_computed += len(missing)
            for scope, row in fresh.items():
                if self.max_entries <= 0:
                    break
                if len(self._rows) >= self.max_entries:
                    del self._rows[next(iter(self._rows))]
                self._rows[scope] = row
        rows = [fresh[s] if s in fresh else found[s] for s in scopes]
        if kind == "pooled":
            if not rows:
                return torch.empty(0, 0), None
            return torch.stack(rows), None  # (n, C)
        n = len(rows)
        length = max((int(r.shape[0]) for r in rows), default=1)
        if kind == "ids":
            x = torch.zeros(n, length, dtype=torch.long)
        else:
            width = int(rows[0].shape[1]) if rows else 0
            x = torch.zeros(n, length, width)
        mask = torch.zeros(n, length, dtype=torch.bool)
        for i, row in enumerate(rows):
            x[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = True
        return x, mask  # (n, T[, C]), (n, T)


# process-wide caches of identical frozen trunks (see shared_feature_cache), most recent last
_SHARED_CACHES: dict[str, FeatureCache] = {}
_MAX_SHARED_CACHES = 4


def shared_feature_cache(fingerprint: str, max_entries: int) -> FeatureCache:
    """The process-wide cache of the frozen trunk identified by ``fingerprint``.

    Ensembles built on the same trunk weights and cut in one process (the runs of a
    benchmark on a Ray worker, a campaign restarted in place) then encode each string
    once between them. The ``_MAX_SHARED_CACHES`` most recently used trunks are kept.
    """
    cache = _SHARED_CACHES.pop(fingerprint, None)
    if cache is None:
        cache = FeatureCache(max_entries)
    _SHARED_CACHES[fingerprint] = cache
    while len(_SHARED_CACHES) > _MAX_SHARED_CACHES:
        del _SHARED_CACHES[next(iter(_SHARED_CACHES))]
    return cache


def _choose_mode(n_members: int, parallel: str) -> ParallelMode:
    if parallel == "ray":
        return "ray"
    if parallel == "auto" and n_members > 1 and torch.cuda.is_available():
        return "ray"
    return "in_process"


def fit_members(
    members: list[MemberNet],
    trains: list[FeatureSet],
    val: FeatureSet | None,
    config: FinetuneConfig,
    *,
    epochs: int,
    device: torch.device,
    parallel: Literal["auto", "ray", "in_process"] = "auto",
    gpus_per_member: float = 1.0,
    on_epoch: EpochCallback | None = None,
) -> tuple[ParallelMode, list[MemberFitReport]]:
    """Train member k on ``trains[k]`` (seed ``config.seed + k``), in place.

    Args:
        members: the K member modules; trains: their K training sets.
        val: shared validation rows for early stopping (None = none).
        config: training hyperparameters; epochs: at most this many passes.
        device: device for in-process training.
        parallel: ``"ray"`` (actors), ``"in_process"``, or ``"auto"`` (Ray when CUDA exists).
        gpus_per_member: GPU share of each actor when CUDA exists.
        on_epoch: called as ``(member, epoch, train_loss, val_loss)`` after each epoch
            of in-process training (Ray actors report only when they finish).

    Returns:
        The mode used and one report per member.
    """
    mode = _choose_mode(len(members), parallel)
    if mode == "in_process":
        reports = []
        for k, (member, train) in enumerate(zip(members, trains, strict=True)):
            hook = None if on_epoch is None else functools.partial(on_epoch, k)
            reports.append(
                train_member(
                    member,
                    train,
                    val,
                    config,
                    epochs=epochs,
                    seed=config.seed + k,
                    device=device,
                    on_epoch=hook,
                )
            )
        return mode, reports
    return mode, _fit_with_ray(members, trains, val, config, epochs, gpus_per_member)


class MemberTrainer:
    """A Ray actor that trains members on its own device (a GPU share, or the CPU)."""

    def __init__(self) -> None:
        self.device = resolve_device("auto")

    def train(
        self,
        spec_json: str,
        state: dict[str, Tensor],
        train: FeatureSet,
        val: FeatureSet | None,
        config_json: str,
        epochs: int,
        seed: int,
    ) -> tuple[dict[str, Tensor], str]:
        """Rebuild the member, train it, return its CPU weights and the report as JSON."""
        member = MemberNet(MemberSpec.model_validate_json(spec_json))
        member.load_state_dict(state)
        config = FinetuneConfig.model_validate_json(config_json)
        report = train_member(
            member, train, val, config, epochs=epochs, seed=seed, device=self.device
        )
        weights = {k: v.detach().cpu() for k, v in member.state_dict().items()}
        return weights, report.model_dump_json()


def _fit_with_ray(
    members: list[MemberNet],
    trains: list[FeatureSet],
    val: FeatureSet | None,
    config: FinetuneConfig,
    epochs: int,
    gpus_per_member: float,
) -> list[MemberFitReport]:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    resources = ray.cluster_resources()
    use_gpu = torch.cuda.is_available() and resources.get("GPU", 0) > 0 and gpus_per_member > 0
    if use_gpu:
        slots = int(resources.get("GPU", 0) / gpus_per_member)
        options = {"num_gpus": gpus_per_member, "num_cpus": 0}
    else:
        slots = int(resources.get("CPU", 1))
        options = {"num_gpus": 0, "num_cpus": 1}
    n_actors = max(1, min(len(members), slots))
    actor_cls: Any = ray.remote(MemberTrainer)
    actors: list[Any] = [actor_cls.options(**options).remote() for _ in range(n_actors)]
    base = {name: getattr(config, name) for name in FinetuneConfig.model_fields}
    config_json = FinetuneConfig.model_validate(base).model_dump_json()
    val_ref = ray.put(val)
    train_refs = {id(t): ray.put(t) for t in trains}  # a shared training set is sent once
    futures = []
    for k, (member, train) in enumerate(zip(members, trains, strict=True)):
        state = {name: v.detach().cpu() for name, v in member.state_dict().items()}
        futures.append(
            actors[k % n_actors].train.remote(
                member.spec.model_dump_json(),
                state,
                train_refs[id(train)],
                val_ref,
                config_json,
                epochs,
                config.seed + k,
            )
        )
    logger.info("training %d members on %d Ray actors (%s)", len(members), n_actors, options)
    try:
        results = ray.get(futures)
    finally:
        for actor in actors:
            ray.kill(actor)
    reports = []
    for member, (state, report_json) in zip(members, results, strict=True):
        member.load_state_dict(state)
        member.eval()
        reports.append(MemberFitReport.model_validate_json(report_json))
    return reports
