"""The campaign loop: decide, record, dispatch, measure, learn, repeat.

One :class:`Campaign` owns a campaign directory (``campaign.sqlite``, the lab's
state, surrogate versions, reports). ``run()`` is the whole loop and is also
the resume path: whatever the store says is in flight is reconciled first
(jobs never accepted by the adapter are submitted again with their key, which
the adapter contract makes safe; accepted ones are polled), and then::

    while budget and pool last:
        refit the surrogate when the fine-tune policy says so (warm start, all data)
        fill free slots: acquisition over the unmeasured pool with X_pending = in flight
        commit the decision and its jobs (state CREATED), then submit them
        wait for events; record each one as it arrives

Decisions depend only on what the store holds (measured values sorted by
candidate, the model version, the decision number as RNG seed), so a campaign
killed at any point and resumed makes the same decisions as one that never
stopped, provided the loop waits for whole batches (``dispatch.wait_for: all``);
with ``any`` the order in which jobs finish may legitimately change later choices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from adapters.base import ExperimentRequest, JobState
from adapters.dispatch import DispatchEvent, EventKind
from cloud_model.errors import ConfigError
from loop.acquisition import select_batch
from loop.config import CampaignConfig
from loop.executor import Executor, build_executor
from loop.pool import Pool, load_pool
from loop.store import CREATED, CampaignStore, ChosenCandidate
from loop.surrogate import EnsembleSurrogate, GPSurrogate, RandomSurrogate, Surrogate

logger = logging.getLogger(__name__)

_EVENT_STATE = {
    EventKind.FAILED: JobState.FAILED,
    EventKind.TIMED_OUT: JobState.FAILED,
    EventKind.CANCELLED: JobState.CANCELLED,
    EventKind.LOST: JobState.LOST,
}


@dataclass
class Progress:
    """What the CLI shows while a campaign runs."""

    n_submitted: int
    n_measured: int
    n_failed: int
    n_in_flight: int
    budget: int
    best_value: float | None
    best_id: str | None
    model_version: int | None
    stage: str = "running"


@dataclass
class Timings:
    """Seconds spent per stage (the benchmark harness reads these)."""

    fit: float = 0.0
    score: float = 0.0
    acquisition: float = 0.0
    dispatch: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class CampaignResult:
    n_submitted: int
    n_measured: int
    n_failed: int
    best_value: float | None
    best_id: str | None
    stop_reason: str
    timings: Timings


class Campaign:
    """A campaign bound to its directory.

    Args:
        config: the validated campaign config.
        directory: where the store, the lab state and model versions live.

    Raises:
        ConfigError: the directory already holds a campaign with a different config.
    """

    def __init__(self, config: CampaignConfig, directory: str | Path) -> None:
        self.config = config
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.store = CampaignStore(self.directory)
        stored = self.store.get_meta("config_sha256")
        if stored is not None and self.store.n_candidates() == 0 and not self.store.job_counts():
            stored = (
                None  # a campaign that never got past loading its pool: the new config replaces it
            )
        if stored is None:
            self.store.set_meta("config", json.dumps(config.model_dump(mode="json")))
            self.store.set_meta("config_sha256", config.fingerprint())
            self.store.set_meta("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        elif stored != config.fingerprint():
            raise ConfigError(
                f"{self.directory} already holds campaign {self._stored_name()!r} with a different "
                "config; use `cloudlab resume` on that directory, or choose a new --out directory"
            )
        self.spec = config.objective_spec()
        self.timings = Timings()
        self.pool: Pool | None = None
        self.surrogate: Surrogate | None = None
        self._model_version: int | None = None
        self._n_fit = -1
        self._best_streak = 0
        self._best_seen: float | None = None

    @classmethod
    def resume(cls, directory: str | Path) -> Campaign:
        """Reopen a campaign from its directory (its config is read from the store)."""
        from loop.config import parse_config

        store = CampaignStore(directory, create=False)
        text = store.get_meta("config")
        store.close()
        if text is None:
            raise ConfigError(f"{directory}: the store holds no campaign config")
        return cls(parse_config(json.loads(text), source=f"{directory}/campaign.sqlite"), directory)

    def _stored_name(self) -> str:
        text = self.store.get_meta("config")
        return str(json.loads(text).get("name")) if text else "?"

    # ------------------------------------------------------------------ setup
    def prepare(self) -> Pool:
        """Load and encode the pool; on first run, store it (its order is the index)."""
        if self.pool is not None:
            return self.pool
        pool = load_pool(self.config.pool, self.config.targets, seed=self.config.seed)
        if self.store.n_candidates() == 0:
            self.store.add_candidates(zip(pool.ids, pool.scopes, strict=True))
        else:
            stored = self.store.candidates()
            if [c for c, _ in stored] != pool.ids:
                raise ConfigError(
                    f"{self.directory}: the candidate pool differs from the one this campaign started "
                    "with (did the dataset or the encoder change?)"
                )
        self.pool = pool
        self._index = {cid: i for i, cid in enumerate(pool.ids)}
        self._prior_scopes: list[str] = []
        self._prior_y = torch.zeros(0, len(self.config.targets), dtype=torch.float64)
        if self.config.prior is not None:
            prior = load_pool(self.config.prior, self.config.targets, seed=self.config.seed)
            in_pool = set(self._index)
            rows = [
                (s, prior.truth.get(c, {})) for c, s in zip(prior.ids, prior.scopes, strict=True)
            ]
            rows = [
                (s, t) for (s, t), c in zip(rows, prior.ids, strict=True) if t and c not in in_pool
            ]
            self._prior_scopes = [s for s, _ in rows]
            self._prior_y = torch.tensor(
                [[t.get(name, float("nan")) for name in self.config.targets] for _, t in rows],
                dtype=torch.float64,
            ).reshape(len(rows), len(self.config.targets))
            logger.info("%d labelled prior records join every fit", len(rows))
        return pool

    def _build_surrogate(self, pool: Pool) -> Surrogate:
        sc = self.config.surrogate
        if sc.kind == "random":
            return RandomSurrogate()
        if sc.kind == "gp":
            from loop.features import composition_features

            feats = torch.as_tensor(
                composition_features(pool.scopes + self._prior_scopes), dtype=torch.float64
            )
            return GPSurrogate(
                feats, seed=self.config.seed, max_train=sc.gp_max_train, n_pool=len(pool)
            )
        from cloud_model.checkpoint import default_checkpoint
        from cloud_model.ensemble import CloudEnsemble

        checkpoint = None
        if sc.checkpoint == "default":
            checkpoint = default_checkpoint()
        elif sc.checkpoint is not None:
            checkpoint = Path(sc.checkpoint)
        ens_config = sc.ensemble.model_copy(
            update={"seed": self.config.seed, "target_names": self.config.targets}
        )
        latest = self.store.latest_model_version()
        ensemble = None
        if latest is not None and (self.directory / "models" / f"v{latest[0]}").is_dir():
            ensemble = CloudEnsemble.load(self.directory / "models" / f"v{latest[0]}")
            self._model_version, self._n_fit = latest
        if ensemble is None:
            ensemble = CloudEnsemble.create(
                checkpoint, sc.n_members, sc.head, len(self.config.targets), ens_config
            )
        # runs in one process (benchmark workers) share the frozen features of one trunk
        ensemble.share_cache()
        surrogate = EnsembleSurrogate(
            ensemble, pool.scopes + self._prior_scopes, warm_start=self.config.finetune.warm_start
        )
        if latest is not None and self._model_version is not None:
            surrogate._fitted_once = True
            surrogate._model = None  # predictions recomputed lazily in _ensure_scored
        return surrogate

    # ------------------------------------------------------------------ data
    def _measured(self) -> tuple[Tensor, Tensor]:
        """Measured candidate indices (sorted) and their ``n x m`` values (NaN if missing)."""
        assert self.pool is not None
        rows: dict[int, list[float]] = {}
        for m in self.store.measurements():
            at = self._index.get(m.candidate_id)
            if at is None:
                continue
            rows[at] = [
                m.values[t].value if t in m.values else float("nan") for t in self.config.targets
            ]
        order = sorted(rows)
        idx = torch.tensor(order, dtype=torch.long)
        y = torch.tensor([rows[i] for i in order], dtype=torch.float64).reshape(
            len(order), len(self.config.targets)
        )
        return idx, y

    def best(self) -> tuple[float | None, str | None]:
        """Best feasible measured objective and its candidate."""
        idx, y = self._measured()
        if idx.numel() == 0:
            return None, None
        score = self.spec.score(y)
        i = int(torch.argmax(score))
        if not torch.isfinite(score[i]):
            return None, None
        assert self.pool is not None
        return float(score[i]), self.pool.ids[int(idx[i])]

    # ------------------------------------------------------------------ learning
    def _maybe_refit(self, measured_idx: Tensor, measured_y: Tensor) -> None:
        assert self.surrogate is not None
        n = int(measured_idx.numel())
        if isinstance(self.surrogate, RandomSurrogate) or n + len(self._prior_scopes) < 2:
            return
        due = self._model_version is None or n - self._n_fit >= self.config.finetune.every_n_results
        if not due:
            if isinstance(self.surrogate, EnsembleSurrogate) and self.surrogate._model is None:
                self._score_ensemble()
            return
        t0 = time.perf_counter()
        torch.manual_seed(self.config.seed * 100_003 + n)
        assert self.pool is not None
        n_prior = len(self._prior_scopes)
        train_idx = torch.cat(
            [measured_idx, torch.arange(len(self.pool), len(self.pool) + n_prior)]
        )
        train_y = torch.cat([measured_y, self._prior_y])
        keep = ~torch.isnan(train_y).all(-1)
        metrics = self.surrogate.fit(train_idx[keep], train_y[keep])
        scoring = metrics.get("score_seconds", 0.0)  # the ensemble re-scores the pool in fit()
        self.timings.fit += time.perf_counter() - t0 - scoring
        self.timings.score += scoring
        path, digest = self._save_surrogate()
        self._model_version = self.store.record_model_version(
            path=path, sha256=digest, n_train=n, metrics=metrics
        )
        self._n_fit = n
        logger.info("surrogate v%d fitted on %d measurements", self._model_version, n)

    def _score_ensemble(self) -> None:
        assert isinstance(self.surrogate, EnsembleSurrogate)
        from loop.surrogate import LookupEnsembleModel

        t0 = time.perf_counter()
        preds = self.surrogate.ensemble.predict(self.surrogate.scopes).to(torch.float64)
        self.surrogate._model = LookupEnsembleModel(preds)
        self.timings.score += time.perf_counter() - t0

    def _save_surrogate(self) -> tuple[str | None, str | None]:
        if not isinstance(self.surrogate, EnsembleSurrogate):
            return None, None
        version = (self._model_version or 0) + 1
        target = self.directory / "models" / f"v{version}"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.surrogate.ensemble.save(tmp)  # type: ignore[attr-defined]
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in sorted((self.directory / "models").glob("v*")):
            if old.is_dir() and old.name[1:].isdigit() and int(old.name[1:]) < version - 1:
                shutil.rmtree(old, ignore_errors=True)
        card = target / "ensemble.json"
        digest = hashlib.sha256(card.read_bytes()).hexdigest() if card.exists() else None
        return str(target.relative_to(self.directory)), digest

    # ------------------------------------------------------------------ deciding
    def _decide(self, n_free: int) -> list[ChosenCandidate]:
        assert self.pool is not None and self.surrogate is not None
        jobs = self.store.jobs()
        taken = {self._index[j.candidate_id] for j in jobs if j.candidate_id in self._index}
        pending = [
            self._index[j.candidate_id]
            for j in jobs
            if not j.is_terminal and j.candidate_id in self._index
        ]
        available = torch.tensor(
            [i for i in range(len(self.pool)) if i not in taken], dtype=torch.long
        )
        if available.numel() == 0:
            return []
        decision_no = len(self.store.decisions())
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + decision_no)
        n_initial = self.config.initial_design.n_random + len(self.config.initial_design.ids)
        measured_idx, measured_y = self._measured()
        n_known = measured_idx.numel() + len(self._prior_scopes)
        if len(jobs) < n_initial or n_known < 2 or isinstance(self.surrogate, RandomSurrogate):
            given = [
                self._index[c]
                for c in self.config.initial_design.ids
                if c in self._index and self._index[c] not in taken
            ]
            if isinstance(self.surrogate, RandomSurrogate) or len(jobs) < n_initial:
                k = (
                    n_free
                    if isinstance(self.surrogate, RandomSurrogate)
                    else min(n_free, n_initial - len(jobs))
                )
                chosen = given[:k]
                rest = available[~torch.isin(available, torch.tensor(chosen, dtype=torch.long))]
                order = torch.randperm(rest.numel(), generator=gen)[: k - len(chosen)]
                chosen += [int(rest[i]) for i in order]
                return [ChosenCandidate(candidate_id=self.pool.ids[i]) for i in chosen]
            return []  # initial design in flight; wait for data before modelling
        self._maybe_refit(measured_idx, measured_y)
        t0 = time.perf_counter()
        picks = select_batch(
            kind=self.config.acquisition.kind,
            surrogate=self.surrogate,
            spec=self.spec,
            q=n_free,
            available=available,
            pending=torch.tensor(pending, dtype=torch.long),
            measured_idx=measured_idx,
            measured_y=measured_y,
            generator=gen,
            beta=self.config.acquisition.beta,
            shortlist=self.config.acquisition.shortlist_for(self.config.surrogate.kind),
        )
        self.timings.acquisition += time.perf_counter() - t0
        chosen_idx = torch.tensor([p.index for p in picks], dtype=torch.long)
        mean, std = self.surrogate.mean_std(chosen_idx)
        return [
            ChosenCandidate(
                candidate_id=self.pool.ids[p.index],
                acquisition_value=p.value,
                predicted_mean=mean[k].tolist(),
                predicted_std=std[k].tolist(),
            )
            for k, p in enumerate(picks)
        ]

    def _request(self, candidate_id: str) -> ExperimentRequest:
        assert self.pool is not None
        return ExperimentRequest(
            candidate_id=candidate_id,
            targets=self.config.targets,
            structure_cif=self.pool.cifs.get(candidate_id),
            scope=self.pool.scopes[self._index[candidate_id]],
            campaign=self.config.name,
        )

    def _key(self, candidate_id: str) -> str:
        return f"{self.config.name}/{candidate_id}"

    # ------------------------------------------------------------------ events
    def _record(self, event: DispatchEvent) -> None:
        key = event.idempotency_key
        if event.kind == EventKind.SUBMITTED:
            self.store.update_job(key, JobState.QUEUED, handle=event.handle)
        elif event.kind == EventKind.STATE and event.status is not None:
            self.store.update_job(key, event.status.state, handle=event.handle)
        elif event.kind == EventKind.SUCCEEDED and event.measurement is not None:
            if event.handle is not None:
                self.store.update_job(key, JobState.RUNNING, handle=event.handle)
            self.store.record_measurement(key, event.measurement)
        elif event.kind in _EVENT_STATE:
            reason = event.message or event.kind.value.lower()
            if event.kind == EventKind.TIMED_OUT:
                reason = f"timed out: {reason}"
            self.store.update_job(
                key, _EVENT_STATE[event.kind], handle=event.handle, message=reason
            )
            logger.info("job %s ended %s: %s", key, event.kind.value, reason)

    # ------------------------------------------------------------------ the loop
    def run(self, *, on_progress: Callable[[Progress], None] | None = None) -> CampaignResult:
        """Run (or resume) the campaign until a stop rule fires.

        Ctrl-C stops it cleanly: every recorded fact stays in the store, in-flight jobs
        stay open and are reconciled by the next ``run``.
        """
        pool = self.prepare()
        self.surrogate = self._build_surrogate(pool)
        executor = build_executor(self.config, pool, self.directory)
        started = time.monotonic()
        stop_reason = "running"
        try:
            self._reconcile(executor)
            stop_reason = self._loop(executor, started, on_progress)
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            logger.warning("interrupted: the store is consistent; `cloudlab resume` continues")
            executor.shutdown(graceful=False, cancel_in_flight=False)
            raise
        else:
            executor.shutdown(graceful=True, cancel_in_flight=False)
        finally:
            self.store.set_meta("stop_reason", stop_reason)
        best_value, best_id = self.best()
        counts = self.store.job_counts()
        return CampaignResult(
            n_submitted=sum(counts.values()),
            n_measured=self.store.n_measurements(),
            n_failed=sum(
                counts.get(s.value, 0) for s in (JobState.FAILED, JobState.LOST, JobState.CANCELLED)
            ),
            best_value=best_value,
            best_id=best_id,
            stop_reason=stop_reason,
            timings=self.timings,
        )

    def _reconcile(self, executor: Executor) -> None:
        """Re-attach to every job the store says is not finished."""
        for job in self.store.open_jobs():
            if job.handle is None or job.state == CREATED:
                executor.submit(
                    self._request(job.candidate_id), job.key
                )  # same key: never a 2nd run
            else:
                executor.track(job.handle)
        reconciled = len(self.store.open_jobs())
        if reconciled:
            logger.info("reconciling %d unfinished job(s) from the store", reconciled)

    def _loop(
        self, executor: Executor, started: float, on_progress: Callable[[Progress], None] | None
    ) -> str:
        cfg = self.config
        concurrency = cfg.dispatch.concurrency or cfg.acquisition.batch_size
        while True:
            counts = self.store.job_counts()
            n_jobs = sum(counts.values())
            n_open = sum(
                counts.get(s, 0) for s in (CREATED, JobState.QUEUED.value, JobState.RUNNING.value)
            )
            n_failed = sum(
                counts.get(s.value, 0) for s in (JobState.FAILED, JobState.LOST, JobState.CANCELLED)
            )
            best_value, best_id = self.best()
            if on_progress is not None:
                on_progress(
                    Progress(
                        n_jobs,
                        self.store.n_measurements(),
                        n_failed,
                        n_open,
                        cfg.budget.experiments,
                        best_value,
                        best_id,
                        self._model_version,
                    )
                )
            reason = self._stop_reason(n_jobs, n_failed, started)
            can_submit = reason is None
            wait_all = cfg.dispatch.wait_for == "all" and n_open > 0
            n_free = min(concurrency - n_open, cfg.budget.experiments - n_jobs)
            if can_submit and n_free > 0 and not wait_all:
                if concurrency - n_open >= min(
                    cfg.acquisition.batch_size, cfg.budget.experiments - n_jobs
                ):
                    n_new = self._submit_batch(executor, n_free)
                    if n_new == 0 and n_open == 0:
                        return self._why_stuck()
                    if n_new:
                        continue
            if n_open == 0:
                return reason or "budget exhausted"
            t0 = time.perf_counter()
            events = executor.next_events(timeout=5.0)
            self.timings.dispatch += time.perf_counter() - t0
            for event in events:
                self._record(event)

    def _submit_batch(self, executor: Executor, n_free: int) -> int:
        t0 = time.perf_counter()
        chosen = self._decide(min(n_free, self.config.acquisition.batch_size))
        if not chosen:
            return 0
        keys = [self._key(c.candidate_id) for c in chosen]
        self.store.record_decision(
            keys=keys,
            chosen=chosen,
            model_version=self._model_version,
            acquisition=self.config.acquisition.kind if self._model_version else "initial_design",
            n_pending=len(self.store.open_jobs()),
            seconds=time.perf_counter() - t0,
        )
        best_value, _ = self.best()
        if best_value is not None and (self._best_seen is None or best_value > self._best_seen):
            self._best_seen, self._best_streak = best_value, 0
        else:
            self._best_streak += 1
        for key, c in zip(keys, chosen, strict=True):
            executor.submit(self._request(c.candidate_id), key)
        return len(chosen)

    def _why_stuck(self) -> str:
        """Why no new decision can be made although budget is left."""
        if self._pool_left() == 0:
            return "pool exhausted"
        failed = [
            j for j in self.store.jobs() if j.state in (JobState.FAILED.value, JobState.LOST.value)
        ]
        if self.store.n_measurements() < 2 and failed:
            return (
                f"{len(failed)} jobs failed and fewer than 2 succeeded, so the surrogate cannot learn; "
                f"last failure: {failed[-1].message}"
            )
        return "nothing left to decide"

    def _pool_left(self) -> int:
        assert self.pool is not None
        return len(self.pool) - sum(self.store.job_counts().values())

    def _stop_reason(self, n_jobs: int, n_failed: int, started: float) -> str | None:
        cfg = self.config
        if n_jobs >= cfg.budget.experiments:
            return "experiment budget reached"
        if self._pool_left() <= 0:
            return "pool exhausted"
        if (
            cfg.budget.wall_time_s is not None
            and time.monotonic() - started > cfg.budget.wall_time_s
        ):
            return "wall-time budget reached"
        if cfg.budget.cost is not None:
            spent = sum(m.cost for m in self.store.measurements())
            if spent >= cfg.budget.cost:
                return "cost budget reached"
        if (
            cfg.stop.no_improvement_rounds is not None
            and self._best_streak >= cfg.stop.no_improvement_rounds
        ):
            return f"no improvement in {self._best_streak} decisions"
        if n_jobs >= 10 and n_failed / n_jobs >= cfg.stop.max_failure_fraction:
            return f"{n_failed} of {n_jobs} jobs failed"
        return None
