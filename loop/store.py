"""The durable campaign store: one SQLite file (WAL) per campaign directory.

Everything a campaign knows lives here, so that a crash at any instant loses
nothing and a resume can reconcile:

* ``meta``         key/value: schema version, campaign config (JSON), created_at;
* ``candidates``   the pool: index, id, SCOPE string;
* ``jobs``         one row per experiment, keyed by its idempotency key, with the
                   current state, the adapter's handle (JSON), the decision that chose it,
                   its fidelity (``""`` in a single-fidelity campaign) and its cost;
* ``job_events``   every state transition with its time;
* ``measurements`` the values of SUCCEEDED jobs (a ``Measurement`` as JSON), with the
                   job's fidelity and cost (one measurement per candidate and fidelity);
* ``model_versions`` surrogate versions (file + sha256 + training size + metrics);
* ``decisions``    the acquisition decisions: model version, acquisition, the chosen
                   candidates with their acquisition values and predicted mean/std;
* ``generated``    candidates added while the campaign runs (:mod:`loop.generate.growth`):
                   id, CIF and provenance JSON; their (id, scope) rows are in ``candidates``;
* ``growths``      one row per growth step: the round (decisions so far), the parents, how
                   many were added, the newest model version then, the generation summary;
* ``proposals``    with an approval gate (:mod:`loop.approval`): per proposed experiment,
                   what chose it (JSON) and its audit trail (status, who, when, note).

A job row is committed (state ``CREATED``) before anything is submitted. Every
write is one transaction; readers (``cloudlab status``) may read while a
campaign runs.

Behind an approval gate a job row starts as ``PROPOSED`` (never submitted, not
reconciled on resume) and becomes ``CREATED`` when approved or ``REJECTED``
(terminal: the candidate is never proposed again) when rejected. Approving and
rejecting are short conditional transactions, safe from another process while the
campaign runs.

Schema 2 (multi-fidelity, :mod:`loop.fidelity`) added ``fidelity`` and ``cost`` to
``jobs`` and ``measurements`` and made a candidate unique per fidelity; a schema-1
store is migrated in place when opened (one transaction; its rows get fidelity ``""``
and cost 1, what a single-fidelity experiment costs).

"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from adapters.base import JobHandle, JobState, Measurement
from cloud_model.errors import CloudlabError

logger = logging.getLogger(__name__)

STORE_FILENAME = "campaign.sqlite"
SCHEMA_VERSION = 2  # 2: jobs and measurements carry fidelity and cost
CREATED = "CREATED"  # committed locally, not yet accepted by the adapter
PROPOSED = "PROPOSED"  # waiting behind the approval gate: never submitted until approved
REJECTED = "REJECTED"  # refused at the gate (by a person or a timeout): terminal, never run

# --- schema 1 -> 2 (fidelity and cost per job and measurement), in one transaction
_MIGRATE_1_TO_2 = """
ALTER TABLE jobs RENAME TO jobs_v1;
ALTER TABLE measurements RENAME TO measurements_v1;
{jobs};
{measurements};
INSERT INTO jobs(key, candidate_id, state, handle, decision_id, message, created_at, updated_at)
    SELECT key, candidate_id, state, handle, decision_id, message, created_at, updated_at
    FROM jobs_v1;
INSERT INTO measurements(key, candidate_id, measurement, recorded_at, seq)
    SELECT key, candidate_id, measurement, recorded_at, seq FROM measurements_v1;
DROP TABLE jobs_v1;
DROP TABLE measurements_v1;
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    idx INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, scope TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY, candidate_id TEXT NOT NULL, state TEXT NOT NULL,
    handle TEXT, decision_id INTEGER, message TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    fidelity TEXT NOT NULL DEFAULT '', cost REAL NOT NULL DEFAULT 1.0,
    UNIQUE (candidate_id, fidelity));
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, state TEXT NOT NULL,
    message TEXT, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS measurements (
    key TEXT PRIMARY KEY, candidate_id TEXT NOT NULL, measurement TEXT NOT NULL,
    recorded_at TEXT NOT NULL, seq INTEGER NOT NULL,
    fidelity TEXT NOT NULL DEFAULT '', cost REAL NOT NULL DEFAULT 1.0,
    UNIQUE (candidate_id, fidelity));
CREATE TABLE IF NOT EXISTS model_versions (
    version INTEGER PRIMARY KEY, path TEXT, sha256 TEXT, n_train INTEGER NOT NULL,
    metrics TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model_version INTEGER, acquisition TEXT NOT NULL,
    chosen TEXT NOT NULL, n_pending INTEGER NOT NULL, seconds REAL NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS proposals (
    key TEXT PRIMARY KEY, candidate_id TEXT NOT NULL UNIQUE, decision_id INTEGER NOT NULL,
    detail TEXT NOT NULL, status TEXT NOT NULL, proposed_at TEXT NOT NULL,
    decided_at TEXT, decided_by TEXT, note TEXT);
CREATE TABLE IF NOT EXISTS generated (
    id TEXT PRIMARY KEY, growth INTEGER NOT NULL, cif TEXT NOT NULL, provenance TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS growths (
    round INTEGER PRIMARY KEY, parents TEXT NOT NULL, n_added INTEGER NOT NULL,
    model_version INTEGER, summary TEXT NOT NULL, created_at TEXT NOT NULL);
"""


class StoreError(CloudlabError, RuntimeError):
    """The campaign store is missing, corrupt, or asked to do something inconsistent."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


class JobRow(BaseModel):
    """One experiment as the store knows it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    candidate_id: str
    state: str  # CREATED or a JobState value
    handle: JobHandle | None
    decision_id: int | None
    message: str | None
    fidelity: str = ""  # "" in a single-fidelity campaign
    cost: float = 1.0  # in the unit of budget.cost, committed when the job was created

    @property
    def is_terminal(self) -> bool:
        if self.state in (CREATED, PROPOSED):
            return False
        return self.state == REJECTED or JobState(self.state).is_terminal


class ChosenCandidate(BaseModel):
    """One candidate picked by a decision, with what the surrogate believed of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate_id: str
    acquisition_value: float | None = None
    predicted_mean: list[float] | None = None  # per target
    predicted_std: list[float] | None = None
    surrogate: str | None = None  # the model that chose it (``auto`` names its current pick)
    fidelity: str = ""  # the fidelity to measure it at ("" in a single-fidelity campaign)
    cost: float = 1.0  # what the experiment costs, in the unit of budget.cost


class CampaignStore:
    """SQLite store of one campaign. Open with :meth:`open` (creates if missing).

    Args:
        path: the campaign directory or the SQLite file inside it.
    """

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        path = Path(path)
        self.path = path / STORE_FILENAME if path.suffix != ".sqlite" else path
        if not self.path.exists() and not create:
            raise StoreError(f"no campaign store at {self.path}: is this a campaign directory?")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if self._stored_version() == 1:
                self._migrate_1_to_2()
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"campaign store {self.path} is not a valid SQLite file: {exc}"
            ) from exc
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise StoreError(
                f"campaign store {self.path} has schema version {version}, this cloudlab reads "
                f"{SCHEMA_VERSION}"
            )

    # ---- schema migration (1 -> 2: fidelity and cost) -------------------------------------
    def _stored_version(self) -> int | None:
        """The schema version the file holds (None: a new file), read before any DDL."""
        has_meta = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not has_meta:
            return None
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else int(row[0])

    def _migrate_1_to_2(self) -> None:
        """Rebuild ``jobs`` and ``measurements`` with fidelity and cost, in one transaction."""
        tables = {
            name: sql.strip().rstrip(";")
            for name, sql in (
                ("jobs", _SCHEMA.split("CREATE TABLE IF NOT EXISTS jobs")[1].split(";")[0]),
                (
                    "measurements",
                    _SCHEMA.split("CREATE TABLE IF NOT EXISTS measurements")[1].split(";")[0],
                ),
            )
        }
        script = _MIGRATE_1_TO_2.format(
            jobs=f"CREATE TABLE jobs {tables['jobs']}",
            measurements=f"CREATE TABLE measurements {tables['measurements']}",
        )
        with self.transaction() as db:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        logger.info("campaign store %s migrated from schema 1 to 2 (fidelity, cost)", self.path)

    # ---- plumbing -------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: everything inside commits together or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CampaignStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- meta -----------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # ---- candidates -----------------------------------------------------------------------
    def add_candidates(self, items: Iterable[tuple[str, str]]) -> int:
        """Insert the pool as (id, scope) pairs, in order. Returns the number added."""
        rows = list(items)
        with self.transaction() as db:
            start = db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
            db.executemany(
                "INSERT INTO candidates(idx, id, scope) VALUES (?, ?, ?)",
                [(start + i, cid, scope) for i, (cid, scope) in enumerate(rows)],
            )
        return len(rows)

    def candidates(self) -> list[tuple[str, str]]:
        """The pool as (id, scope) pairs in index order."""
        return [
            (str(r[0]), str(r[1]))
            for r in self._db.execute("SELECT id, scope FROM candidates ORDER BY idx")
        ]

    def n_candidates(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0])

    # ---- decisions and jobs ---------------------------------------------------------------
    def record_decision(
        self,
        *,
        keys: Sequence[str],
        chosen: Sequence[ChosenCandidate],
        model_version: int | None,
        acquisition: str,
        n_pending: int,
        seconds: float,
        proposals: Sequence[str] | None = None,
    ) -> int:
        """Commit a decision and its jobs (state CREATED) in one transaction.

        Args:
            proposals: behind an approval gate, one JSON detail per chosen candidate (what
                chose it, :class:`loop.approval.ProposalDetail`): the jobs then start as
                PROPOSED and a ``proposals`` row is written for each, in the same transaction.

        Raises:
            StoreError: a candidate already has a job (it would be measured twice).
        """
        if len(keys) != len(chosen) or (proposals is not None and len(proposals) != len(keys)):
            raise StoreError("record_decision: one idempotency key per chosen candidate")
        state = CREATED if proposals is None else PROPOSED
        now = _now()
        with self.transaction() as db:
            taken = [
                c.candidate_id
                for c in chosen
                if db.execute(
                    "SELECT 1 FROM jobs WHERE candidate_id = ? AND fidelity = ?",
                    (c.candidate_id, c.fidelity),
                ).fetchone()
            ]
            if taken:
                raise StoreError(
                    f"candidates already have jobs, refusing to measure twice: {taken[:5]}"
                )
            cur = db.execute(
                "INSERT INTO decisions(model_version, acquisition, chosen, n_pending, seconds, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    model_version,
                    acquisition,
                    json.dumps([c.model_dump() for c in chosen]),
                    n_pending,
                    seconds,
                    now,
                ),
            )
            decision_id = int(cur.lastrowid or 0)
            for key, c in zip(keys, chosen, strict=True):
                db.execute(
                    "INSERT INTO jobs(key, candidate_id, state, handle, decision_id, message, created_at, updated_at, fidelity, cost)"
                    " VALUES (?, ?, ?, NULL, ?, NULL, ?, ?, ?, ?)",
                    (key, c.candidate_id, state, decision_id, now, now, c.fidelity, c.cost),
                )
                db.execute(
                    "INSERT INTO job_events(key, state, message, at) VALUES (?, ?, NULL, ?)",
                    (key, state, now),
                )
            for key, c, detail in zip(keys, chosen, proposals or (), strict=False):
                db.execute(
                    "INSERT INTO proposals(key, candidate_id, decision_id, detail, status, proposed_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (key, c.candidate_id, decision_id, detail, PROPOSED, now),
                )
        return decision_id

    def update_job(
        self,
        key: str,
        state: JobState,
        *,
        handle: JobHandle | None = None,
        message: str | None = None,
    ) -> None:
        """Record a state transition (and the handle once the adapter accepted the job)."""
        now = _now()
        with self.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise StoreError(f"unknown job {key!r}")
            if row[0] in (PROPOSED, REJECTED):
                raise StoreError(
                    f"job {key!r} is {row[0]} at the approval gate: it was never submitted"
                )
            if row[0] != CREATED and JobState(row[0]).is_terminal:
                logger.debug("job %s already terminal (%s); ignoring %s", key, row[0], state)
                return
            if handle is not None:
                db.execute(
                    "UPDATE jobs SET handle = ? WHERE key = ?", (handle.model_dump_json(), key)
                )
            db.execute(
                "UPDATE jobs SET state = ?, message = COALESCE(?, message), updated_at = ? WHERE key = ?",
                (state.value, message, now, key),
            )
            if row[0] != state.value:
                db.execute(
                    "INSERT INTO job_events(key, state, message, at) VALUES (?, ?, ?, ?)",
                    (key, state.value, message, now),
                )

    def record_measurement(self, key: str, measurement: Measurement) -> None:
        """Store a SUCCEEDED job's measurement and mark the job SUCCEEDED, atomically."""
        now = _now()
        with self.transaction() as db:
            row = db.execute(
                "SELECT candidate_id, fidelity, cost FROM jobs WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                raise StoreError(f"unknown job {key!r}")
            if db.execute("SELECT 1 FROM measurements WHERE key = ?", (key,)).fetchone():
                return  # already recorded (a resumed campaign re-reading a result)
            seq = db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
            db.execute(
                "INSERT INTO measurements(key, candidate_id, measurement, recorded_at, seq, fidelity, cost)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, row[0], measurement.model_dump_json(), now, seq, row[1], row[2]),
            )
            db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE key = ?",
                (JobState.SUCCEEDED.value, now, key),
            )
            db.execute(
                "INSERT INTO job_events(key, state, message, at) VALUES (?, ?, NULL, ?)",
                (key, JobState.SUCCEEDED.value, now),
            )

    def jobs(self, *, states: Sequence[str] | None = None) -> list[JobRow]:
        query = "SELECT key, candidate_id, state, handle, decision_id, message, fidelity, cost FROM jobs"
        params: tuple[Any, ...] = ()
        if states is not None:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            params = tuple(states)
        rows = self._db.execute(query + " ORDER BY created_at, key", params).fetchall()
        return [
            JobRow(
                key=r[0],
                candidate_id=r[1],
                state=r[2],
                handle=None if r[3] is None else JobHandle.model_validate_json(r[3]),
                decision_id=r[4],
                message=r[5],
                fidelity=r[6],
                cost=float(r[7]),
            )
            for r in rows
        ]

    def open_jobs(self) -> list[JobRow]:
        """Jobs not yet in a terminal state (CREATED, QUEUED, RUNNING)."""
        return self.jobs(states=[CREATED, JobState.QUEUED.value, JobState.RUNNING.value])

    def job_counts(self) -> dict[str, int]:
        return {
            str(s): int(n)
            for s, n in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        }

    def measurements(self) -> list[Measurement]:
        """Every measurement, in the order it was recorded."""
        return [
            Measurement.model_validate_json(r[0])
            for r in self._db.execute("SELECT measurement FROM measurements ORDER BY seq")
        ]

    def measurements_at(self, fidelity: str) -> list[Measurement]:
        """The measurements at ``fidelity`` (``""`` in a single-fidelity campaign), in order."""
        return [m for m, f, _ in self.fidelity_measurements() if f == fidelity]

    def fidelity_measurements(self) -> list[tuple[Measurement, str, float]]:
        """Every measurement with its fidelity and cost, in the order it was recorded."""
        return [
            (Measurement.model_validate_json(r[0]), str(r[1]), float(r[2]))
            for r in self._db.execute(
                "SELECT measurement, fidelity, cost FROM measurements ORDER BY seq"
            )
        ]

    def committed_cost(self) -> float:
        """Summed cost of every job that ran, runs or will run (rejected proposals excluded).

        In-flight jobs and proposals waiting at the approval gate count: a budget in cost
        units is never exceeded by what is already on its way.
        """
        row = self._db.execute(
            "SELECT COALESCE(SUM(cost), 0) FROM jobs WHERE state != ?", (REJECTED,)
        ).fetchone()
        return float(row[0])

    def n_measurements(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0])

    def job_events(self, key: str) -> list[tuple[str, str]]:
        """(state, time) transitions of one job, oldest first."""
        return [
            (str(r[0]), str(r[1]))
            for r in self._db.execute(
                "SELECT state, at FROM job_events WHERE key = ? ORDER BY id", (key,)
            )
        ]

    # ---- models and decisions ------------------------------------------------------------
    def record_model_version(
        self, *, path: str | None, sha256: str | None, n_train: int, metrics: dict[str, float]
    ) -> int:
        with self.transaction() as db:
            version = int(
                db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM model_versions").fetchone()[0]
            )
            db.execute(
                "INSERT INTO model_versions(version, path, sha256, n_train, metrics, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (version, path, sha256, n_train, json.dumps(metrics), _now()),
            )
        return version

    def latest_model_version(self) -> tuple[int, int] | None:
        """(version, n_train) of the newest surrogate, or None."""
        row = self._db.execute(
            "SELECT version, n_train FROM model_versions ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def latest_model_record(self) -> dict[str, Any] | None:
        """The newest surrogate version: ``version``, ``n_train``, ``path``, ``sha256``."""
        row = self._db.execute(
            "SELECT version, n_train, path, sha256 FROM model_versions ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return {"version": int(row[0]), "n_train": int(row[1]), "path": row[2], "sha256": row[3]}

    def decisions(self) -> list[dict[str, Any]]:
        out = []
        for r in self._db.execute(
            "SELECT id, model_version, acquisition, chosen, n_pending, seconds, created_at FROM decisions ORDER BY id"
        ):
            out.append(
                {
                    "id": r[0],
                    "model_version": r[1],
                    "acquisition": r[2],
                    "chosen": [ChosenCandidate.model_validate(c) for c in json.loads(r[3])],
                    "n_pending": r[4],
                    "seconds": r[5],
                    "created_at": r[6],
                }
            )
        return out

    def model_versions(self) -> list[dict[str, Any]]:
        """Every surrogate version, oldest first: ``version``, ``n_train``, ``metrics``, ``created_at``."""
        return [
            {
                "version": int(r[0]),
                "n_train": int(r[1]),
                "metrics": json.loads(r[2]),
                "created_at": r[3],
            }
            for r in self._db.execute(
                "SELECT version, n_train, metrics, created_at FROM model_versions ORDER BY version"
            )
        ]

    # ---- the approval gate ---------------------------------------------------------------
    def proposals(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """Proposals behind the approval gate (oldest first), optionally of one ``status``.

        Each is a dict with ``key``, ``candidate_id``, ``decision_id``, ``detail`` (the JSON
        text of what chose it), ``status`` (PROPOSED, APPROVED or REJECTED), ``proposed_at``,
        ``decided_at``, ``decided_by`` and ``note``.
        """
        query = (
            "SELECT key, candidate_id, decision_id, detail, status, proposed_at, decided_at,"
            " decided_by, note FROM proposals"
        )
        params: tuple[str, ...] = ()
        if status is not None:
            query, params = query + " WHERE status = ?", (status,)
        names = ("key", "candidate_id", "decision_id", "detail", "status", "proposed_at",
                 "decided_at", "decided_by", "note")  # fmt: skip
        rows = self._db.execute(query + " ORDER BY proposed_at, rowid", params).fetchall()
        return [dict(zip(names, r, strict=True)) for r in rows]

    def decide_proposals(
        self, keys: Sequence[str], *, approve: bool, actor: str, note: str | None
    ) -> list[str]:
        """Approve (PROPOSED -> CREATED) or reject (-> REJECTED) proposals in one transaction.

        Only proposals still waiting change; one decided meanwhile (by another process, or
        by the campaign's timeout) is left as it is, so two deciders never both win.

        Returns:
            The keys that were still waiting and are now decided.
        """
        now, decided = _now(), []
        status, job_state = ("APPROVED", CREATED) if approve else (REJECTED, REJECTED)
        with self.transaction() as db:
            for key in keys:
                cur = db.execute(
                    "UPDATE proposals SET status = ?, decided_at = ?, decided_by = ?, note = ?"
                    " WHERE key = ? AND status = ?",
                    (status, now, actor, note, key, PROPOSED),
                )
                if cur.rowcount != 1:
                    continue
                db.execute(
                    "UPDATE jobs SET state = ?, message = ?, updated_at = ? WHERE key = ? AND state = ?",
                    (job_state, None if approve else f"rejected by {actor}: {note or ''}".rstrip(": "),
                     now, key, PROPOSED),
                )  # fmt: skip
                db.execute(
                    "INSERT INTO job_events(key, state, message, at) VALUES (?, ?, ?, ?)",
                    (key, job_state, f"{status.lower()} by {actor}", now),
                )
                decided.append(key)
        return decided

    # ---- generated candidates (loop/generate/growth.py) -----------------------------------
    def add_generated(
        self,
        *,
        round_no: int,
        parents: Sequence[str],
        rows: Sequence[tuple[str, str, str, str]],
        model_version: int | None,
        summary: str,
    ) -> None:
        """Append generated candidates to the pool and record the growth step, atomically.

        Args:
            round_no: decisions made so far (the step is recorded once per round).
            parents: ids of the hits the candidates were generated from.
            rows: (id, scope, cif, provenance JSON) per new candidate, in pool order.
            model_version: the newest surrogate version when the pool grew.
            summary: the generation summary (JSON).
        """
        with self.transaction() as db:
            start = db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
            db.executemany(
                "INSERT INTO candidates(idx, id, scope) VALUES (?, ?, ?)",
                [(start + i, cid, scope) for i, (cid, scope, _, _) in enumerate(rows)],
            )
            db.executemany(
                "INSERT INTO generated(id, growth, cif, provenance) VALUES (?, ?, ?, ?)",
                [(cid, round_no, cif, prov) for cid, _, cif, prov in rows],
            )
            db.execute(
                "INSERT INTO growths(round, parents, n_added, model_version, summary, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (round_no, json.dumps(list(parents)), len(rows), model_version, summary, _now()),
            )

    def generated(self) -> list[dict[str, Any]]:
        """Generated candidates in pool order: id, scope, cif, growth (round) and provenance."""
        rows = self._db.execute(
            "SELECT g.id, c.scope, g.cif, g.growth, g.provenance FROM generated g "
            "JOIN candidates c ON c.id = g.id ORDER BY c.idx"
        ).fetchall()
        return [
            {"id": r[0], "scope": r[1], "cif": r[2], "growth": r[3], "provenance": json.loads(r[4])}
            for r in rows
        ]

    def growths(self) -> list[dict[str, Any]]:
        """The growth steps in order: round, parents, n_added, model_version, summary."""
        rows = self._db.execute(
            "SELECT round, parents, n_added, model_version, summary, created_at FROM growths "
            "ORDER BY round"
        ).fetchall()
        return [
            {"round": r[0], "parents": json.loads(r[1]), "n_added": r[2],
             "model_version": r[3], "summary": json.loads(r[4]), "created_at": r[5]}
            for r in rows
        ]  # fmt: skip
