"""The campaign: open or resume, reconcile, fill free slots, record events, stop.

One :class:`Campaign` owns a campaign directory (``campaign.sqlite``, the lab's
state, surrogate versions, reports). ``run()`` is the whole loop and also the
resume path: whatever the store says is in flight is reconciled first (jobs the
adapter never accepted are submitted again with their key, which the adapter
contract makes safe; accepted ones are polled), and then::

    until a stop rule fires and nothing is in flight:
        ask the agent to fill the free slots (it refits and acquires as it sees fit)
        commit its decision and the jobs (state CREATED), then submit them
        wait for events from the executor; record each one as it arrives

The campaign knows no surrogate, adapter or acquisition: the agent proposes
(:mod:`loop.agent`), the executor runs jobs (:mod:`adapters.engine`, wired by
:mod:`loop.wiring`), the stop rules decide when to stop (:mod:`loop.stop_rules`).
Decisions depend only on what the store holds, so a campaign killed at any point
and resumed makes the same decisions as one that never stopped, provided the
loop waits for whole batches (``dispatch.wait_for: all``) or runs inline, where
the simulated lab's virtual time is journalled too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from adapters.base import EventKind, Executor, ExperimentRequest, JobEvent, JobState
from cloud_model.errors import CloudlabError, ConfigError
from loop.agent import Agent, CampaignView, Proposer
from loop.config import CampaignConfig
from loop.pool import Pool, load_pool
from loop.records import CampaignResult, Progress, Timings
from loop.stop_rules import LoopState, first_reason, rules_for
from loop.store import CREATED, STORE_FILENAME, CampaignStore

__all__ = ["Campaign", "CampaignResult", "LabRefusedError", "Progress", "Timings"]

logger = logging.getLogger(__name__)

_ENDED = {
    EventKind.FAILED: JobState.FAILED,
    EventKind.TIMED_OUT: JobState.FAILED,
    EventKind.CANCELLED: JobState.CANCELLED,
    EventKind.LOST: JobState.LOST,
}
_OPEN = (CREATED, JobState.QUEUED.value, JobState.RUNNING.value)
_UNSUCCESSFUL = (JobState.FAILED.value, JobState.LOST.value, JobState.CANCELLED.value)


class LabRefusedError(CloudlabError, PermissionError):
    """The lab refused our credentials: nothing was spent; fix them and resume."""


class Campaign:
    """A campaign bound to its directory. Nothing is written before :meth:`prepare`.

    Args:
        config: the validated campaign config.
        directory: where the store, the lab state and model versions live.

    Raises:
        ConfigError: the directory already holds a campaign with a different config.
    """

    def __init__(self, config: CampaignConfig, directory: str | Path) -> None:
        self.config = config
        self.directory = Path(directory)
        self.spec = config.objective_spec()
        self.timings = Timings()
        self.pool: Pool | None = None
        self.store: CampaignStore | None = None
        self._index: dict[str, int] = {}
        self._prior_scopes: list[str] = []
        self._prior_y = torch.zeros(0, len(config.targets), dtype=torch.float64)
        self._streak = 0
        self._best_seen: float | None = None
        if (self.directory / STORE_FILENAME).is_file():
            self._open_store()

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

    def _open_store(self) -> CampaignStore:
        self.directory.mkdir(parents=True, exist_ok=True)
        store = self.store = self.store or CampaignStore(self.directory)
        stored = store.get_meta("config_sha256")
        if stored is not None and store.n_candidates() == 0 and not store.job_counts():
            stored = None  # a campaign that never got past loading its pool: the new config wins
        if stored is None:
            store.set_meta("config", json.dumps(self.config.model_dump(mode="json")))
            store.set_meta("config_sha256", self.config.fingerprint())
            store.set_meta("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        elif stored != self.config.fingerprint():
            text = store.get_meta("config")
            name = json.loads(text).get("name") if text else "?"
            raise ConfigError(
                f"{self.directory} already holds campaign {name!r} with a different config; use "
                "`cloudlab resume` on that directory, or choose a new --out directory"
            )
        return store

    # ------------------------------------------------------------------ setup
    def prepare(self) -> Pool:
        """Load and encode the pool (and prior data), then open the store and record the pool.

        Everything that can be checked (dataset, splits, targets, files) is checked
        before anything is created on disk.
        """
        if self.pool is not None:
            return self.pool
        cfg = self.config
        pool = load_pool(cfg.pool, cfg.targets, seed=cfg.seed)
        prior = load_pool(cfg.prior, cfg.targets, seed=cfg.seed) if cfg.prior else None
        in_pool = set(pool.ids)
        unknown = [c for c in cfg.initial_design.ids if c not in in_pool]
        if unknown:
            raise ConfigError(
                f"initial_design.ids: {len(unknown)} id(s) are not in the candidate pool "
                f"(invalid rows are left out): {unknown[:10]}"
            )
        store = self._open_store()
        if store.n_candidates() == 0:
            store.add_candidates(zip(pool.ids, pool.scopes, strict=True))
        elif [c for c, _ in store.candidates()] != pool.ids:
            raise ConfigError(
                f"{self.directory}: the candidate pool differs from the one this campaign started "
                "with (did the dataset or the encoder change?)"
            )
        self.pool, self._index = pool, {cid: i for i, cid in enumerate(pool.ids)}
        if prior is not None:
            rows = [
                (s, prior.truth[c])
                for c, s in zip(prior.ids, prior.scopes, strict=True)
                if prior.truth.get(c) and c not in self._index
            ]
            self._prior_scopes = [s for s, _ in rows]
            self._prior_y = torch.tensor(
                [[t.get(name, float("nan")) for name in cfg.targets] for _, t in rows],
                dtype=torch.float64,
            ).reshape(len(rows), len(cfg.targets))
            logger.info("%d labelled prior records join every fit", len(rows))
        return pool

    def build_agent(self) -> Agent:
        """The agent over the configured surrogate, restored to its newest version."""
        from loop.registry import ModelRegistry
        from loop.surrogate import build_surrogate

        pool, store = self.prepare(), self._store()
        surrogate = build_surrogate(self.config, pool.scopes + self._prior_scopes, len(pool))
        registry = ModelRegistry(store, self.directory)
        return Agent(self.config, pool.ids, surrogate, registry, self._prior_y, self.timings)

    # ------------------------------------------------------------------ what the store says
    def _store(self) -> CampaignStore:
        if self.store is None:
            raise ConfigError("the campaign has not been prepared (call prepare() or run())")
        return self.store

    def _measured(self) -> tuple[Tensor, Tensor]:
        """Measured pool indices (sorted) and their ``n x m`` values (NaN if missing)."""
        rows: dict[int, list[float]] = {}
        for m in self._store().measurements():
            if (at := self._index.get(m.candidate_id)) is not None:
                rows[at] = [
                    m.values[t].value if t in m.values else float("nan")
                    for t in self.config.targets
                ]
        order = sorted(rows)
        y = torch.tensor([rows[i] for i in order], dtype=torch.float64)
        return torch.tensor(order, dtype=torch.long), y.reshape(
            len(order), len(self.config.targets)
        )

    def _best(self) -> tuple[float | None, float | None, str | None]:
        """Score (higher is better), objective target value and id of the best feasible one."""
        idx, y = self._measured()
        if idx.numel() == 0:
            return None, None, None
        score = self.spec.score(y)
        i = int(torch.argmax(score))
        if not torch.isfinite(score[i]) or self.pool is None:
            return None, None, None
        return float(score[i]), float(y[i, self.spec.primary]), self.pool.ids[int(idx[i])]

    def best(self) -> tuple[float | None, str | None]:
        """The best feasible candidate's measured objective target (its own value and sign)."""
        _, value, cid = self._best()
        return value, cid

    def unit(self) -> str:
        """Unit of the objective's target (as the pool states it), or "" when unknown."""
        units = self.pool.units if self.pool is not None else {}
        return str(units.get(self.config.objective.target, ""))

    def finished(self) -> str | None:
        """Why the campaign is over (a stop rule fired and nothing is in flight), or None."""
        self.prepare()
        store = self._store()
        if store.open_jobs() or store.get_meta("stop_reason") in (None, "running", "interrupted"):
            return None
        counts = store.job_counts()
        state = LoopState(
            n_jobs=sum(counts.values()),
            n_failed=sum(counts.get(s, 0) for s in _UNSUCCESSFUL),
            pool_left=len(self._index) - sum(counts.values()),
            elapsed_s=0.0,
            cost_spent=sum(m.cost for m in store.measurements()) if self.config.budget.cost else 0.0,
            decisions_without_improvement=0,
        )
        return first_reason(rules_for(self.config), state)

    def _view(self) -> CampaignView:
        jobs = self._store().jobs()
        idx, y = self._measured()
        return CampaignView(
            measured_idx=idx,
            measured_y=y,
            taken=frozenset(
                self._index[j.candidate_id] for j in jobs if j.candidate_id in self._index
            ),
            pending=[
                self._index[j.candidate_id]
                for j in jobs
                if not j.is_terminal and j.candidate_id in self._index
            ],
            n_jobs=len(jobs),
            decision_no=len(self._store().decisions()),
        )

    def _request(self, candidate_id: str) -> ExperimentRequest:
        assert self.pool is not None
        return ExperimentRequest(
            candidate_id=candidate_id,
            targets=self.config.targets,
            structure_cif=self.pool.cifs.get(candidate_id),
            scope=self.pool.scopes[self._index[candidate_id]],
            campaign=self.config.name,
        )

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        agent: Proposer | None = None,
        executor: Executor | None = None,
    ) -> CampaignResult:
        """Run (or resume) the campaign until a stop rule fires and nothing is in flight.

        Args:
            on_progress: called before every step with what the CLI shows.
            agent: who proposes (default: :meth:`build_agent`).
            executor: who runs jobs (default: :func:`loop.wiring.build_executor`).

        Ctrl-C stops it cleanly: every recorded fact stays in the store, in-flight jobs
        stay open and are reconciled by the next ``run``.
        """
        pool = self.prepare()
        store = self._store()
        if agent is None and executor is None and (done := self.finished()) is not None:
            logger.info("the campaign is already complete (%s): nothing to run", done)
            return self._result(done)  # no model, no Ray, no lab: a finished campaign stays so
        agent = agent or self.build_agent()
        if executor is None:
            from loop.wiring import build_executor

            executor = build_executor(self.config, pool, self.directory)
        stop_reason = "running"
        try:
            self._reconcile(executor)
            stop_reason = self._loop(agent, executor, on_progress)
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            logger.warning("interrupted: the store is consistent; `cloudlab resume` continues")
            executor.shutdown(graceful=False, cancel_in_flight=False)
            raise
        except LabRefusedError as exc:
            stop_reason = f"refused by the lab: {exc}"
            executor.shutdown(graceful=False, cancel_in_flight=False)
            raise
        else:
            executor.shutdown(graceful=True, cancel_in_flight=False)
        finally:
            store.set_meta("stop_reason", stop_reason)
        return self._result(stop_reason)

    def _result(self, stop_reason: str) -> CampaignResult:
        store = self._store()
        best_value, best_id = self.best()
        counts = store.job_counts()
        return CampaignResult(
            n_submitted=sum(counts.values()),
            n_measured=store.n_measurements(),
            n_failed=sum(counts.get(s, 0) for s in _UNSUCCESSFUL),
            best_value=best_value,
            best_id=best_id,
            stop_reason=stop_reason,
            timings=self.timings,
        )

    def _reconcile(self, executor: Executor) -> None:
        """Re-attach to every job the store says is not finished."""
        open_jobs = self._store().open_jobs()
        for job in open_jobs:
            if job.handle is None or job.state == CREATED:
                executor.submit(
                    self._request(job.candidate_id), job.key
                )  # same key: never a 2nd run
            else:
                executor.track(job.handle)
        if open_jobs:
            logger.info("reconciling %d unfinished job(s) from the store", len(open_jobs))

    def _loop(
        self, agent: Proposer, executor: Executor, on_progress: Callable[[Progress], None] | None
    ) -> str:
        cfg, store, started = self.config, self._store(), time.monotonic()
        rules = rules_for(cfg)
        concurrency = cfg.dispatch.concurrency or cfg.acquisition.batch_size
        while True:
            counts = store.job_counts()
            n_jobs = sum(counts.values())
            n_open = sum(counts.get(s, 0) for s in _OPEN)
            n_failed = sum(counts.get(s, 0) for s in _UNSUCCESSFUL)
            if on_progress is not None:
                best_value, best_id = self.best()
                on_progress(
                    Progress(
                        n_submitted=n_jobs,
                        n_measured=store.n_measurements(),
                        n_failed=n_failed,
                        n_in_flight=n_open,
                        budget=cfg.budget.experiments,
                        best_value=best_value,
                        best_id=best_id,
                        model_version=agent.model_version,
                    )
                )
            state = LoopState(
                n_jobs=n_jobs,
                n_failed=n_failed,
                pool_left=len(self._index) - n_jobs,
                elapsed_s=time.monotonic() - started,
                cost_spent=sum(m.cost for m in store.measurements()) if cfg.budget.cost else 0.0,
                decisions_without_improvement=self._streak,
            )
            reason = first_reason(rules, state)
            n_free = min(concurrency - n_open, cfg.budget.experiments - n_jobs)
            batch_fits = concurrency - n_open >= min(
                cfg.acquisition.batch_size, cfg.budget.experiments - n_jobs
            )
            waiting_for_all = cfg.dispatch.wait_for == "all" and n_open > 0
            if reason is None and n_free > 0 and batch_fits and not waiting_for_all:
                n_new = self._submit_batch(agent, executor, n_free)
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
            refused = [e for e in events if e.kind is EventKind.REFUSED]
            if refused:
                raise LabRefusedError(
                    f"{refused[0].message}. No experiment was counted as failed; fix the "
                    f"credentials and run `cloudlab resume {self.directory}`"
                )

    def _submit_batch(self, agent: Proposer, executor: Executor, n_free: int) -> int:
        store = self._store()
        t0 = time.perf_counter()
        proposal = agent.propose(self._view(), min(n_free, self.config.acquisition.batch_size))
        if not proposal.chosen:
            return 0
        keys = [f"{self.config.name}/{c.candidate_id}" for c in proposal.chosen]
        store.record_decision(
            keys=keys,
            chosen=proposal.chosen,
            model_version=proposal.model_version,
            acquisition=proposal.acquisition,
            n_pending=len(store.open_jobs()),
            seconds=time.perf_counter() - t0,
        )
        best_score, _, _ = self._best()
        if best_score is not None and (self._best_seen is None or best_score > self._best_seen):
            self._best_seen, self._streak = best_score, 0
        else:
            self._streak += 1
        for key, c in zip(keys, proposal.chosen, strict=True):
            executor.submit(self._request(c.candidate_id), key)
        return len(keys)

    def _record(self, event: JobEvent) -> None:
        store, key = self._store(), event.idempotency_key
        if event.kind == EventKind.SUBMITTED:
            store.update_job(key, JobState.QUEUED, handle=event.handle)
        elif event.kind == EventKind.STATE and event.status is not None:
            store.update_job(key, event.status.state, handle=event.handle)
        elif event.kind == EventKind.SUCCEEDED and event.measurement is not None:
            if event.handle is not None:
                store.update_job(key, JobState.RUNNING, handle=event.handle)
            store.record_measurement(key, event.measurement)
        elif event.kind in _ENDED:
            reason = event.message or event.kind.value.lower()
            if event.kind == EventKind.TIMED_OUT:
                reason = f"timed out: {reason}"
            store.update_job(key, _ENDED[event.kind], handle=event.handle, message=reason)
            logger.debug("job %s ended %s: %s", key, event.kind.value, reason)

    def _why_stuck(self) -> str:
        """Why no new decision can be made although budget is left."""
        store = self._store()
        if len(self._index) - sum(store.job_counts().values()) <= 0:
            return "pool exhausted"
        failed = [
            j for j in store.jobs() if j.state in (JobState.FAILED.value, JobState.LOST.value)
        ]
        if store.n_measurements() < 2 and failed:
            return (
                f"{len(failed)} jobs failed and fewer than 2 succeeded, so the surrogate cannot learn; "
                f"last failure: {failed[-1].message}"
            )
        return "nothing left to decide"
