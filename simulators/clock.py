"""Clocks for the simulated lab: simulated seconds since the lab's origin.

The lab never sleeps. It asks its clock what simulated time it is and works out
lazily which experiments have started or ended by then. Two clocks:

* :class:`VirtualClock` advances only when told (benchmarks, tests): a campaign
  of a thousand one-hour experiments runs in milliseconds;
* :class:`WallClock` follows the wall clock times ``time_acceleration``
  (the HTTP server): with an acceleration of 3600, a simulated hour takes one
  wall-clock second. Its origin is an absolute Unix time so that a restarted
  server continues the same timeline.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from cloud_model.errors import ConfigError

__all__ = ["SimClock", "VirtualClock", "WallClock"]


@runtime_checkable
class SimClock(Protocol):
    """What the lab needs from a clock."""

    def now(self) -> float:
        """Simulated seconds since the clock's origin; never decreases."""
        ...

    def to_datetime(self, sim_time: float) -> datetime:
        """The (UTC) wall-clock instant at which simulated time ``sim_time`` happened."""
        ...


class VirtualClock:
    """A clock that moves only when :meth:`advance` or :meth:`advance_to` is called.

    Args:
        start: initial simulated time in seconds.
        origin: the datetime reported for simulated time 0 (default: now, UTC).
    """

    def __init__(self, start: float = 0.0, origin: datetime | None = None) -> None:
        if start < 0:
            raise ConfigError(f"VirtualClock start must be >= 0 s, got {start}")
        self._now = float(start)
        self._origin = origin if origin is not None else datetime.now(UTC)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (>= 0); returns the new time."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards (advance by {seconds} s)")
        with self._lock:
            self._now += seconds
            return self._now

    def advance_to(self, sim_time: float) -> float:
        """Move the clock to ``sim_time`` if that is later than now; returns the new time."""
        with self._lock:
            self._now = max(self._now, float(sim_time))
            return self._now

    def to_datetime(self, sim_time: float) -> datetime:
        return self._origin + timedelta(seconds=sim_time)


class WallClock:
    """Wall-clock time since ``origin``, sped up by ``time_acceleration``.

    Args:
        time_acceleration: simulated seconds per wall-clock second (> 0).
        origin: Unix time of simulated time 0 (default: now). Persist it to let a
            restarted process continue the same timeline.
    """

    def __init__(self, time_acceleration: float = 1.0, origin: float | None = None) -> None:
        if not time_acceleration > 0:
            raise ConfigError(f"time_acceleration must be > 0, got {time_acceleration}")
        self.time_acceleration = float(time_acceleration)
        self.origin = time.time() if origin is None else float(origin)
        self._last = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:  # time.time() may step back (NTP); the simulated time never does
            self._last = max(self._last, (time.time() - self.origin) * self.time_acceleration)
            return self._last

    def to_datetime(self, sim_time: float) -> datetime:
        wall = self.origin + sim_time / self.time_acceleration
        return datetime.fromtimestamp(wall, tz=UTC)
