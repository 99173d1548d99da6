"""Server-side persistence of a simulated lab: an SQLite journal of its events.

The lab appends every submission and cancellation to the journal *before*
applying it. Because every random draw of a job is seeded by (seed, key), the
events alone determine every job's state and measurement, so a restarted
server replays them and knows all its jobs (and their idempotency keys) again.
The journal also keeps the lab's configuration, the ground truth's fingerprint
and the timeline's origin, and refuses to reopen with different ones.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import TypeAdapter

from cloud_model.errors import ConfigError
from simulators.clock import SimClock, VirtualClock, WallClock
from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth
from simulators.lab import CancelEvent, LabEvent, SimulatedLab, SubmitEvent

__all__ = ["STATE_FILE", "SqliteLabJournal", "open_lab"]

logger = logging.getLogger(__name__)

STATE_FILE = "lab_state.sqlite"
_FORMAT = "cloudlab-lab-state/1"
_EVENT = TypeAdapter[SubmitEvent | CancelEvent](LabEvent)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    job_id TEXT NOT NULL,
    body TEXT NOT NULL
);
"""


class SqliteLabJournal:
    """Append-only event log in one SQLite file (WAL; every append commits).

    Args:
        path: the database file; created with its tables if absent.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the lab state database {path}: {exc}") from exc

    def append(self, event: SubmitEvent | CancelEvent) -> None:
        """Commit ``event``; raises ``sqlite3.Error`` if it could not be stored."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO events (kind, job_id, body) VALUES (?, ?, ?)",
                (event.kind, event.job_id, event.model_dump_json()),
            )

    def events(self) -> list[SubmitEvent | CancelEvent]:
        """Every stored event, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT body FROM events ORDER BY seq").fetchall()
        return [_EVENT.validate_json(body) for (body,) in rows]

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_lab(
    truth: GroundTruth,
    config: SimulatedLabConfig,
    state_dir: Path | None = None,
    *,
    virtual_time: bool = False,
) -> SimulatedLab:
    """The one way to build a :class:`SimulatedLab`, persisted in ``state_dir`` when given.

    A new state directory records the configuration, the truth's fingerprint,
    the kind of clock and the timeline origin; an existing one must match them,
    and its jobs are replayed. On a virtual clock (``virtual_time``: benchmarks
    and inline campaigns) every move of the clock is stored first, so a lab
    reopened after a crash continues at the instant it stopped and finishes
    every job exactly when the uninterrupted lab would have.

    Raises:
        ConfigError: the state directory belongs to a lab with another
            configuration, ground truth or kind of clock.
    """
    if state_dir is None:
        clock: SimClock = VirtualClock() if virtual_time else WallClock(config.time_acceleration)
        return SimulatedLab(truth.values, truth.units, config, clock=clock)
    state_dir.mkdir(parents=True, exist_ok=True)
    journal = SqliteLabJournal(state_dir / STATE_FILE)
    try:
        stored_format = journal.meta("format")
        if stored_format is None:
            for key, value in (
                ("format", _FORMAT),
                ("config", config.model_dump_json()),
                ("truth_sha256", truth.fingerprint()),
                ("origin", repr(time.time())),
                ("clock", "virtual" if virtual_time else "wall"),
            ):
                journal.set_meta(key, value)
        else:
            _check_matches(journal, state_dir, truth, config, stored_format)
            stored_clock = journal.meta("clock") or "wall"
            if stored_clock != ("virtual" if virtual_time else "wall"):
                raise ConfigError(
                    f"state directory {state_dir} belongs to a lab on a {stored_clock} clock; "
                    "reopen it in the same dispatch mode or use a new directory"
                )
        origin = float(journal.meta("origin") or "nan")
        history = journal.events()
        if virtual_time:
            clock = VirtualClock(
                start=float(journal.meta("virtual_now") or "0"),
                origin=datetime.fromtimestamp(origin, tz=UTC),
                on_advance=lambda now: journal.set_meta("virtual_now", repr(now)),
            )
        else:
            clock = WallClock(config.time_acceleration, origin=origin)
        lab = SimulatedLab(
            truth.values,
            truth.units,
            config,
            clock=clock,
            journal=journal,
            history=history,
        )
    except BaseException:
        journal.close()
        raise
    logger.info("simulated lab state %s: %d events replayed", state_dir, len(history))
    return lab


def _check_matches(
    journal: SqliteLabJournal,
    state_dir: Path,
    truth: GroundTruth,
    config: SimulatedLabConfig,
    fmt: str,
) -> None:
    if fmt != _FORMAT:
        raise ConfigError(f"{state_dir / STATE_FILE} has format {fmt!r}, expected {_FORMAT!r}")
    stored = SimulatedLabConfig.model_validate_json(journal.meta("config") or "{}")
    if stored != config:
        raise ConfigError(
            f"state directory {state_dir} belongs to a lab with another configuration "
            f"({stored.model_dump_json()}); restart with the same settings or use a new --state-dir"
        )
    if journal.meta("truth_sha256") != truth.fingerprint():
        raise ConfigError(
            f"state directory {state_dir} belongs to a lab with another ground truth "
            "(dataset or target); restart with the same ones or use a new --state-dir"
        )
