"""The approval gate: a person approves each proposed experiment before it is submitted.

With ``approval.mode: required`` the campaign stores every candidate the agent
chooses as a *proposal* (job state ``PROPOSED``) together with what chose it
(:class:`ProposalDetail`: model version, acquisition and its value, predicted mean
and std, the candidate's formula and SCOPE string) and submits it only once it is
approved. Decisions are made from any process, while the campaign runs or not:

* ``cloudlab approve DIR IDS... | --all [--note TEXT]`` and
  ``cloudlab reject DIR IDS... --note TEXT`` (:func:`decide`);
* the dashboard's operator buttons (:mod:`loop.dashboard`), which call the same function;
* the campaign itself when ``approval.timeout_s`` passes (:func:`expire`), doing what
  ``approval.on_timeout`` says; the clock is the wall clock from the moment of proposing,
  and only a running campaign applies it (a resumed one decides overdue proposals at once).

Each decision is one short SQLite transaction that changes only proposals still
waiting (:meth:`~loop.store.CampaignStore.decide_proposals`), so a decision and a
timeout never both win. A rejected candidate keeps its job row (state ``REJECTED``)
and so is never proposed again in that campaign; a rejection costs no budget.
The audit trail (who, when, the note) stays in the store and the report shows it.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import socket
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

from cloud_model.errors import CloudlabError
from loop.config import ApprovalConfig
from loop.store import PROPOSED, CampaignStore, ChosenCandidate

__all__ = [
    "ApprovalError",
    "ProposalDetail",
    "ProposalRecord",
    "decide",
    "default_actor",
    "details_for",
    "expire",
    "formula_from_scope",
    "list_proposals",
]

logger = logging.getLogger(__name__)

TIMEOUT_ACTOR = "timeout"  # who decided, when approval.timeout_s decided


class ApprovalError(CloudlabError, ValueError):
    """An approval or rejection names no waiting proposal, or lacks what it needs."""


class ProposalDetail(BaseModel):
    """What chose a proposed experiment, as the person approving it sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate_id: str
    formula: str  # from the SCOPE string's composition ("" when it has none)
    scope: str
    model_version: int | None  # None: the initial design chose it
    acquisition: str  # "initial_design" or the acquisition kind
    acquisition_value: float | None = None
    targets: list[str]
    predicted_mean: list[float] | None = None  # per target, at decision time
    predicted_std: list[float] | None = None
    surrogate: str | None = None


class ProposalRecord(BaseModel):
    """One proposal and its audit trail."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str  # the job's idempotency key
    candidate_id: str
    decision_id: int
    status: str  # PROPOSED (waiting), APPROVED or REJECTED
    proposed_at: str  # ISO 8601, UTC
    decided_at: str | None = None
    decided_by: str | None = None
    note: str | None = None
    detail: ProposalDetail

    @property
    def waiting(self) -> bool:
        return self.status == PROPOSED


def formula_from_scope(scope: str) -> str:
    """A formula from the composition tail of a SCOPE string (``Ba 0.2 Ti 0.2 O 0.6`` -> BaTiO3).

    Fractions rounded in the string (two decimals) are turned into the smallest whole
    numbers of atoms, up to 24, that they agree with; "" when the string has no
    composition part.
    """
    tail = scope.rsplit("|", 1)[-1].split()
    comp: dict[str, float] = {}
    try:
        for symbol, amount in zip(tail[::2], tail[1::2], strict=True):
            comp[symbol] = comp.get(symbol, 0.0) + float(amount)
    except ValueError:  # an odd number of words, or an amount that is not a number
        return ""
    if not comp or not all(symbol.isalpha() and x > 0 for symbol, x in comp.items()):
        return ""
    for n in range(1, 25):
        counts = {el: x * n for el, x in comp.items()}
        # a fraction written with two decimals carries up to 0.005 of rounding: 0.005 n atoms
        if all(abs(c - round(c)) <= 0.0051 * n + 1e-9 and round(c) >= 1 for c in counts.values()):
            ints = {el: round(c) for el, c in counts.items()}
            divisor = math.gcd(*ints.values())
            return "".join(
                el + (str(k // divisor) if k // divisor != 1 else "") for el, k in ints.items()
            )
    return "".join(f"{el}{x:g}" for el, x in comp.items())


def details_for(
    chosen: Sequence[ChosenCandidate],
    scopes: Sequence[str],
    *,
    model_version: int | None,
    acquisition: str,
    targets: Sequence[str],
) -> list[ProposalDetail]:
    """One :class:`ProposalDetail` per chosen candidate (``scopes`` in the same order)."""
    return [
        ProposalDetail(
            candidate_id=c.candidate_id,
            formula=formula_from_scope(scope),
            scope=scope,
            model_version=model_version,
            acquisition=acquisition,
            acquisition_value=c.acquisition_value,
            targets=list(targets),
            predicted_mean=c.predicted_mean,
            predicted_std=c.predicted_std,
            surrogate=c.surrogate,
        )
        for c, scope in zip(chosen, scopes, strict=True)
    ]


def list_proposals(store: CampaignStore, *, status: str | None = None) -> list[ProposalRecord]:
    """The campaign's proposals, oldest first (only waiting ones with ``status="PROPOSED"``)."""
    return [
        ProposalRecord(
            detail=ProposalDetail.model_validate_json(row.pop("detail")),
            **row,
        )
        for row in store.proposals(status=status)
    ]


def default_actor() -> str:
    """Who is deciding when nobody said: ``user@host`` of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def decide(
    store: CampaignStore,
    ids: Sequence[str],
    *,
    approve: bool,
    actor: str,
    note: str | None = None,
    all_waiting: bool = False,
) -> list[ProposalRecord]:
    """Approve or reject waiting proposals, named by candidate id or job key.

    Args:
        store: the campaign's store (another process may be running the campaign).
        ids: candidate ids or job keys of waiting proposals.
        approve: True to approve (they will be submitted), False to reject (never run).
        actor: who decides (kept in the audit trail).
        note: why; required to reject.
        all_waiting: decide every waiting proposal (then ``ids`` must be empty).

    Returns:
        The proposals this call decided, as stored afterwards.

    Raises:
        ApprovalError: no ids (and not ``all_waiting``), a rejection without a note, an id
            that names no proposal, or one already decided (nothing is changed then).
    """
    verb = "approve" if approve else "reject"
    if not approve and not (note and note.strip()):
        raise ApprovalError("reject: give the reason with --note TEXT (it goes in the audit trail)")
    if all_waiting and ids:
        raise ApprovalError(f"{verb}: give candidate ids or --all, not both")
    if not actor.strip():
        raise ApprovalError(f"{verb}: the actor (who decides) must not be empty")
    everything = list_proposals(store)
    if all_waiting:
        chosen = [p for p in everything if p.waiting]
    else:
        if not ids:
            raise ApprovalError(f"{verb}: name the proposals (candidate ids) or give --all")
        by_name = {p.candidate_id: p for p in everything} | {p.key: p for p in everything}
        unknown = [i for i in ids if i not in by_name]
        if unknown:
            raise ApprovalError(
                f"{verb}: {', '.join(unknown[:5])} is not a proposal of this campaign "
                "(`cloudlab proposals DIR` lists the waiting ones)"
            )
        chosen = list({by_name[i].key: by_name[i] for i in ids}.values())
        done = [p for p in chosen if not p.waiting]
        if done:
            p = done[0]
            raise ApprovalError(
                f"{verb}: {p.candidate_id} was already {p.status.lower()} by {p.decided_by} at "
                f"{p.decided_at}; nothing was changed"
            )
    decided = set(store.decide_proposals([p.key for p in chosen], approve=approve, actor=actor,
                                         note=note))  # fmt: skip
    if len(decided) < len(chosen) and not all_waiting:
        raced = [p.candidate_id for p in chosen if p.key not in decided]
        logger.warning("%s: %s were decided meanwhile by someone else", verb, ", ".join(raced))
    return [p for p in list_proposals(store) if p.key in decided]


def _age_s(proposed_at: str, now: datetime) -> float:
    return (now - datetime.fromisoformat(proposed_at)).total_seconds()


def expire(
    store: CampaignStore, config: ApprovalConfig, *, now: datetime | None = None
) -> list[str]:
    """Decide proposals that waited longer than ``config.timeout_s`` as ``on_timeout`` says.

    Returns:
        The keys decided by the timeout (empty without a timeout).
    """
    if config.timeout_s is None:
        return []
    now = now or datetime.now(UTC)
    overdue = [
        row["key"]
        for row in store.proposals(status=PROPOSED)
        if _age_s(row["proposed_at"], now) >= config.timeout_s
    ]
    if not overdue:
        return []
    approve = config.on_timeout == "approve"
    note = f"no decision within {config.timeout_s:g} s (approval.on_timeout: {config.on_timeout})"
    decided = store.decide_proposals(overdue, approve=approve, actor=TIMEOUT_ACTOR, note=note)
    if decided:
        logger.info("%d proposal(s) %s after the timeout", len(decided),
                    "approved" if approve else "skipped")  # fmt: skip
    return decided


def detail_json(detail: ProposalDetail) -> str:
    """The JSON the store keeps for a proposal."""
    return json.dumps(detail.model_dump(mode="json"))
