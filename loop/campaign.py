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

Behind an approval gate (``approval.mode: required``, :mod:`loop.approval`) the
decision's jobs are committed as PROPOSED instead and submitted only once approved
(from another process, or by the timeout); each waiting proposal holds a slot, the
other slots keep running and being filled, and a resume leaves proposals waiting.

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

from adapters.base import EventKind, Executor, ExperimentRequest, JobEvent
from cloud_model.errors import CloudlabError, ConfigError
from loop.agent import Agent, Proposal, Proposer
from loop.config import CampaignConfig
from loop.ledger import Ledger
from loop.pool import Pool, load_pool, load_prior
from loop.records import CampaignResult, Progress, Timings
from loop.stop_rules import first_reason, rules_for
from loop.store import CREATED, STORE_FILENAME, CampaignStore

__all__ = [
    "Campaign",
    "CampaignResult",
    "LabGoneError",
    "LabRefusedError",
    "Progress",
    "Timings",
]

logger = logging.getLogger(__name__)
_phase = logging.getLogger("cloudlab.progress")  # what a live display shows (loop/cli/live.py)


class LabRefusedError(CloudlabError, PermissionError):
    """The lab refused our credentials: nothing was spent; fix them and resume."""


class LabGoneError(CloudlabError, ConnectionError):
    """No adapter call succeeded for ``dispatch.lab_deadline_s``: the campaign stopped.

    Nothing the lab did not answer about is counted as failed; ``cloudlab resume``
    continues once the lab is back (jobs at the lab are polled again, the others
    submitted again with their keys).
    """


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
        self.ledger: Ledger | None = None
        self._prior_scopes: list[str] = []
        self._prior_y = torch.zeros(0, len(config.targets), dtype=torch.float64)
        self._streak, self._best_seen = 0, float("-inf")
        self._last_warning: str | None = None  # the latest RETRYING message, for Progress
        self._handed: set[str] = set()  # keys given to the executor by this run (approval gate)
        self._failing_since: dict[str, float] = {}  # key -> start of its transient-error streak
        if (self.directory / STORE_FILENAME).is_file():
            self._open_store()

    @classmethod
    def resume(cls, directory: str | Path) -> Campaign:
        """Reopen a campaign from its directory (its config is read from the store)."""
        from loop.config import parse_config

        with CampaignStore(directory, create=False) as store:
            text = store.get_meta("config")
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
            name = json.loads(store.get_meta("config") or "{}").get("name", "?")
            raise ConfigError(
                f"{self.directory} already holds campaign {name!r} with a different config; use "
                "`cloudlab resume` on that directory, or choose a new --out directory"
            )
        return store

    # ------------------------------------------------------------------ setup
    def prepare(self) -> Ledger:
        """Load the pool and prior data, check them, then open the store and record the pool.

        Everything that can be checked (dataset, splits, targets, files, initial ids)
        is checked before anything is created on disk.
        """
        if self.ledger is not None:
            return self.ledger
        cfg = self.config
        _phase.debug("preparing pool", extra={"phase": "preparing pool"})
        pool = load_pool(cfg.pool, cfg.targets, seed=cfg.seed)
        if cfg.prior is not None:
            self._prior_scopes, self._prior_y = load_prior(
                cfg.prior, cfg.targets, pool.ids, seed=cfg.seed
            )
        sc = cfg.surrogate
        kinds = sc.candidates if sc.kind == "auto" else [sc.kind]
        if {"gp_transfer", "gp_transfer_chgnet"} & set(kinds):
            from cloud_model.datasets import get_spec

            for name in sc.transfer_sets:
                if get_spec(name).kind != "formula":  # an unknown name raises, naming it
                    raise ConfigError(
                        f"surrogate.transfer_sets: {name!r} is a {get_spec(name).kind} dataset; "
                        "give formula label sets (cloudlab data list)"
                    )
        if cfg.fidelities:  # multi-fidelity: every simulated fidelity's values must exist
            from loop.multifidelity import check_fidelities

            check_fidelities(cfg.campaign_adapter_fidelities(), pool)  # own adapters: not here
        unknown = sorted(set(cfg.initial_design.ids) - set(pool.ids))
        if unknown:
            raise ConfigError(
                f"initial_design.ids: {len(unknown)} id(s) are not in the candidate pool "
                f"(invalid rows are left out): {unknown[:10]}"
            )
        store = self._open_store()
        if cfg.pool.generators is not None:  # candidates generated while it ran (loop/generate)
            from loop.generate.growth import extend_pool

            pool = extend_pool(pool, store)
        if store.n_candidates() == 0:
            store.add_candidates(zip(pool.ids, pool.scopes, strict=True))
        elif [c for c, _ in store.candidates()] != pool.ids:
            raise ConfigError(
                f"{self.directory}: the candidate pool differs from the one this campaign started "
                "with (did the dataset or the encoder change?)"
            )
        self.pool, self.ledger = pool, Ledger(store, cfg, pool.ids)
        return self.ledger

    def build_agent(self) -> Proposer:
        """The agent over the configured surrogate, restored to its newest version."""
        from loop.registry import ModelRegistry
        from loop.surrogate import build_surrogate

        ledger = self.prepare()
        assert self.pool is not None
        scopes = self.pool.scopes + self._prior_scopes
        cifs = [self.pool.cifs.get(c) for c in self.pool.ids]
        if self.config.fidelities:  # multi-fidelity: the cost-aware agent (loop/mf_agent.py)
            from loop.mf_agent import build_mf_agent

            return build_mf_agent(
                self.config, self.pool.ids, scopes, ModelRegistry(ledger.store, self.directory),
                self.timings, cifs,
            )  # fmt: skip
        surrogate = build_surrogate(self.config, scopes, len(self.pool), cifs)
        registry = ModelRegistry(ledger.store, self.directory)
        if self.config.pool.generators is not None:  # never a version fitted before the pool grew
            from loop.generate.growth import registry_for

            registry = registry_for(ledger.store, self.directory)
        return Agent(self.config, self.pool.ids, surrogate, registry, self._prior_y, self.timings)

    # ------------------------------------------------------------------ facts
    def best(self) -> tuple[float | None, str | None]:
        """The best feasible candidate's measured objective target (its own value and sign)."""
        best = self.prepare().best()
        return (None, None) if best is None else (best.value, best.candidate_id)

    def unit(self) -> str:
        """Unit of the objective's target (as the pool states it), or "" when unknown."""
        units = self.pool.units if self.pool is not None else {}
        return str(units.get(self.config.objective.target, ""))

    def finished(self) -> str | None:
        """Why the campaign is over (a stop rule fired and nothing is in flight), or None."""
        ledger = self.prepare()
        reason = ledger.store.get_meta("stop_reason")
        counts = ledger.counts()
        if counts.n_open or counts.n_proposed or reason in (None, "running", "interrupted"):
            return None
        state = ledger.loop_state(elapsed_s=0.0, decisions_without_improvement=0)
        return first_reason(rules_for(self.config), state)

    def _request(self, candidate_id: str, fidelity: str = "") -> ExperimentRequest:
        assert self.pool is not None and self.ledger is not None
        targets, parameters = self.config.targets, {}
        if fidelity:  # what this fidelity reports, and its name for the adapter to route by
            from loop.fidelity import output_names

            f = next(f for f in self.config.fidelities if f.name == fidelity)
            is_highest = fidelity == self.config.highest_fidelity
            targets = tuple(output_names(f, targets, is_highest=is_highest).values())
            parameters = {"fidelity": fidelity, **f.parameters}
        return ExperimentRequest(
            candidate_id=candidate_id,
            targets=targets,
            structure_cif=self.pool.cifs.get(candidate_id),
            scope=self.pool.scopes[self.ledger.index[candidate_id]],
            campaign=self.config.name,
            parameters=parameters,
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

        Raises:
            LabRefusedError: the lab refused our credentials (nothing counted as failed).

        Ctrl-C stops it cleanly: every recorded fact stays in the store, in-flight jobs
        stay open and are reconciled by the next ``run``.
        """
        ledger = self.prepare()
        if agent is None and executor is None and (done := self.finished()) is not None:
            logger.debug("the campaign is already complete (%s): nothing to run", done)
            return self._result(done)  # no model, no Ray, no lab: a finished campaign stays so
        from cloud_model.threads import apply_thread_budget, resolve_threads

        apply_thread_budget(resolve_threads(self.config.threads))
        agent = agent or self.build_agent()
        if executor is None:
            from loop.wiring import build_executor

            assert self.pool is not None
            executor = build_executor(self.config, self.pool, self.directory)
        stop_reason = "running"
        self._failing_since.clear()
        try:
            self._reconcile(executor)
            stop_reason = self._loop(agent, executor, on_progress)
        except (KeyboardInterrupt, LabRefusedError, LabGoneError) as exc:
            stop_reason = (
                "interrupted"
                if isinstance(exc, KeyboardInterrupt)
                else f"refused by the lab: {exc}"
                if isinstance(exc, LabRefusedError)
                else "lab unreachable"
            )
            logger.warning("%s: the store is consistent; `cloudlab resume` continues", stop_reason)
            executor.shutdown(graceful=False, cancel_in_flight=False)
            raise
        else:
            executor.shutdown(graceful=True, cancel_in_flight=False)
        finally:
            ledger.store.set_meta("stop_reason", stop_reason)
        return self._result(stop_reason)

    def _result(self, stop_reason: str) -> CampaignResult:
        ledger = self.prepare()
        counts, (best_value, best_id) = ledger.counts(), self.best()
        return CampaignResult(
            n_submitted=counts.n_jobs,
            n_measured=ledger.store.n_measurements(),
            n_failed=counts.n_failed,
            best_value=best_value,
            best_id=best_id,
            stop_reason=stop_reason,
            timings=self.timings,
        )

    def _reconcile(self, executor: Executor) -> None:
        """Re-attach to every job the store says is not finished."""
        open_jobs = self.prepare().store.open_jobs()
        for job in open_jobs:
            if job.handle is None or job.state == CREATED:
                request = self._request(job.candidate_id, job.fidelity)
                executor.submit(request, job.key)  # same key: no 2nd run
            else:
                executor.track(job.handle)
            self._handed.add(job.key)
        if open_jobs:
            logger.info("reconciling %d unfinished job(s) from the store", len(open_jobs))

    def _loop(
        self, agent: Proposer, executor: Executor, on_progress: Callable[[Progress], None] | None
    ) -> str:
        cfg, ledger, started = self.config, self.prepare(), time.monotonic()
        rules, budget, batch = rules_for(cfg), cfg.budget.experiments, cfg.acquisition.batch_size
        concurrency = cfg.dispatch.concurrency or batch
        gated = cfg.approval.mode == "required"
        while True:
            if gated:
                self._pass_the_gate(executor)
            c = ledger.counts()
            if on_progress is not None:
                value, cid = self.best()
                on_progress(
                    Progress(
                        n_submitted=c.n_jobs,
                        n_measured=ledger.store.n_measurements(),
                        n_failed=c.n_failed,
                        n_in_flight=c.n_open,
                        budget=budget,
                        best_value=value,
                        best_id=cid,
                        model_version=agent.model_version,
                        last_warning=self._last_warning,
                        n_awaiting_approval=c.n_proposed,
                    )
                )
            state = ledger.loop_state(
                elapsed_s=time.monotonic() - started, decisions_without_improvement=self._streak
            )
            reason = first_reason(rules, state)
            busy = c.n_open + c.n_proposed  # a waiting proposal holds its slot
            n_free = min(concurrency - busy, budget - c.n_jobs)
            batch_fits = concurrency - busy >= min(batch, budget - c.n_jobs)
            waiting_for_all = cfg.dispatch.wait_for == "all" and busy > 0
            if reason is None and n_free > 0 and batch_fits and not waiting_for_all:
                if cfg.pool.generators is not None and cfg.pool.generators.grow is not None:
                    agent, ledger = self._grow_pool(agent)  # loop/generate/growth.py
                n_new = self._submit_batch(agent, executor, min(n_free, batch))
                if n_new == 0 and busy == 0:
                    return ledger.why_stuck()
                if n_new:
                    continue
            if busy == 0:
                return reason or "budget exhausted"
            if c.n_open == 0:  # only proposals wait: look at the store again in a moment
                time.sleep(cfg.approval.poll_interval_s)
                continue
            label = f"waiting on {c.n_open} in flight"
            _phase.debug(label, extra={"phase": label})
            t0 = time.perf_counter()
            events = executor.next_events(timeout=cfg.approval.poll_interval_s if gated else 5.0)
            self.timings.dispatch += time.perf_counter() - t0
            for event in events:
                key = event.idempotency_key
                if event.kind == EventKind.RETRYING:
                    self._last_warning = event.message
                    self._failing_since.setdefault(key, time.monotonic())
                else:
                    if event.kind == EventKind.FAILED and event.attempt and not event.permanent:
                        # its retries ran out: if the lab is silent, the lab is gone, not the job
                        self._check_lab_deadline(c.n_open, retries_ran_out=True)
                    self._failing_since.pop(key, None)
                if event.kind in (EventKind.SUBMITTED, EventKind.STATE, EventKind.SUCCEEDED):
                    self._last_warning = None  # the lab answered again
                self._record(event)
            self._check_lab_deadline(c.n_open)

    def _grow_pool(self, agent: Proposer) -> tuple[Proposer, Ledger]:
        """Generated candidates join the pool when a growth step is due (``pool.generators.grow``).

        The agent is rebuilt over the grown pool (a caller's own agent is kept as it is).
        """
        from loop.generate.growth import after_round

        ledger = self.prepare()
        assert self.pool is not None
        grown = after_round(self.config, ledger, self.pool, self.directory)
        if grown is None:
            return agent, ledger
        self.pool, self.ledger = grown, Ledger(ledger.store, self.config, grown.ids)
        return (self.build_agent() if isinstance(agent, Agent) else agent), self.ledger

    def _submit_batch(self, agent: Proposer, executor: Executor, n_free: int) -> int:
        ledger, t0 = self.prepare(), time.perf_counter()
        proposal = agent.propose(ledger.view(), n_free)
        if not proposal.chosen:
            return 0
        keys = [  # one job per candidate and fidelity
            f"{self.config.name}/{c.candidate_id}" + (f"@{c.fidelity}" if c.fidelity else "")
            for c in proposal.chosen
        ]
        gated = self.config.approval.mode == "required"
        ledger.store.record_decision(
            keys=keys,
            chosen=proposal.chosen,
            model_version=proposal.model_version,
            acquisition=proposal.acquisition,
            n_pending=len(ledger.store.open_jobs()),
            seconds=time.perf_counter() - t0,
            proposals=self._proposal_details(proposal) if gated else None,
        )
        best = ledger.best()
        if best is not None and best.score > self._best_seen:
            self._best_seen, self._streak = best.score, 0
        else:
            self._streak += 1
        if gated:
            logger.info("%d proposal(s) wait for approval: %s", len(keys),
                        ", ".join(c.candidate_id for c in proposal.chosen))  # fmt: skip
            return len(keys)
        for key, c in zip(keys, proposal.chosen, strict=True):
            executor.submit(self._request(c.candidate_id, c.fidelity), key)
        return len(keys)

    # ------------------------------------------------------------------ the approval gate
    def _proposal_details(self, proposal: Proposal) -> list[str]:
        """What chose each candidate of ``proposal``, as the store keeps it (JSON)."""
        from loop.approval import detail_json, details_for

        assert self.pool is not None and self.ledger is not None
        scopes = [self.pool.scopes[self.ledger.index[c.candidate_id]] for c in proposal.chosen]
        details = details_for(
            proposal.chosen,
            scopes,
            model_version=proposal.model_version,
            acquisition=proposal.acquisition,
            targets=self.config.targets,
        )
        return [detail_json(d) for d in details]

    def _pass_the_gate(self, executor: Executor) -> None:
        """Apply the approval timeout, then submit every approved job not yet submitted."""
        from loop.approval import expire

        store = self.prepare().store
        expire(store, self.config.approval)
        for job in store.jobs(states=[CREATED]):
            if job.key not in self._handed:
                executor.submit(self._request(job.candidate_id, job.fidelity), job.key)
                self._handed.add(job.key)
                logger.info("approved: %s submitted", job.candidate_id)

    def _lab_gone(self, n_open: int) -> float | None:
        """Seconds the lab has not answered, when every job it holds is failing; else None.

        A job's streak of transient errors starts at its first RETRYING event and ends
        with any other event of it. The lab counts as silent when at least two jobs (or
        the only open one) are in a streak; it has been silent since the latest start.
        """
        streaks = self._failing_since
        if not streaks or len(streaks) < min(2, max(n_open, 1)):
            return None
        return time.monotonic() - max(streaks.values())

    def _check_lab_deadline(self, n_open: int, *, retries_ran_out: bool = False) -> None:
        """Raise :class:`LabGoneError` when the lab has been silent past the deadline.

        With ``retries_ran_out`` (a job's retries are exhausted) it is raised as soon as
        the lab is silent at all: the lab is gone, not that one experiment.
        """
        deadline = self.config.dispatch.lab_deadline_s
        silent = self._lab_gone(n_open)
        if deadline is None or silent is None or (silent <= deadline and not retries_ran_out):
            return
        where = getattr(self.config.adapter, "base_url", None) or self.config.adapter.kind
        raise LabGoneError(
            f"the lab ({where}) has not answered for {silent:.0f} s (dispatch.lab_deadline_s "
            f"{deadline:g}); the campaign stopped and nothing it did not hear back about counts "
            f"as failed. Last error: {self._last_warning}. Once the lab is back, run "
            f"`cloudlab resume {self.directory}`"
        )

    def _record(self, event: JobEvent) -> None:
        if event.kind == EventKind.REFUSED:  # not an outcome: the job stays as it is
            raise LabRefusedError(
                f"{event.message}. No experiment was counted as failed; fix the credentials "
                f"and run `cloudlab resume {self.directory}`"
            )
        self.prepare().record(event)
