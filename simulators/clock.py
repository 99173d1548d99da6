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

import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from cloud_model.errors import ConfigError

__all__ = ["EngineTime", "SimClock", "VirtualClock", "WallClock"]


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
        on_advance: called with the new time *before* the clock moves (a lab journal
            persists it there, so a resumed lab continues at the same instant).
    """

    def __init__(
        self,
        start: float = 0.0,
        origin: datetime | None = None,
        *,
        on_advance: Callable[[float], None] | None = None,
    ) -> None:
        if start < 0:
            raise ConfigError(f"VirtualClock start must be >= 0 s, got {start}")
        self._now = float(start)
        self._origin = origin if origin is not None else datetime.now(UTC)
        self._on_advance = on_advance
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (>= 0); returns the new time."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards (advance by {seconds} s)")
        with self._lock:
            return self._move(self._now + seconds)

    def advance_to(self, sim_time: float) -> float:
        """Move the clock to ``sim_time`` if that is later than now; returns the new time."""
        with self._lock:
            return self._move(max(self._now, float(sim_time)))

    def _move(self, new: float) -> float:
        if new != self._now and self._on_advance is not None:
            self._on_advance(new)
        self._now = new
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


class EngineTime:
    """A job engine's clock (:class:`adapters.base.Clock`) on a lab's virtual clock.

    The engine counts wall-clock seconds (poll intervals, timeouts, backoff are
    configured that way); the lab counts simulated seconds. With ``scale`` =
    the lab's ``time_acceleration``, one engine second is ``scale`` simulated
    seconds, as on a :class:`WallClock`, so a timeout means the same inline and
    over Ray; sleeping jumps the lab's clock instead of waiting.

    Args:
        clock: the lab's virtual clock.
        scale: simulated seconds per engine second (> 0).
    """

    is_virtual = True

    def __init__(self, clock: VirtualClock, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ConfigError(f"EngineTime scale must be > 0, got {scale}")
        self.clock = clock
        self.scale = float(scale)
        self._exact: dict[float, float] = {}  # engine times handed out by from_sim -> sim times

    def monotonic(self) -> float:
        return self.clock.now() / self.scale

    def sleep_until(self, deadline: float) -> None:
        # (t / scale) * scale may fall one ulp short of t: a deadline that came from
        # from_sim() (the lab's next completion) goes to that exact simulated instant
        target = self._exact.get(deadline, deadline * self.scale)
        while target / self.scale < deadline:  # never wake a rounding error short of it
            target = math.nextafter(target, math.inf)
        self.clock.advance_to(target)

    def from_sim(self, sim_time: float) -> float:
        """Engine time of simulated time ``sim_time`` (sleeping until it reaches it exactly)."""
        engine = sim_time / self.scale
        if len(self._exact) > 64:
            self._exact.clear()
        self._exact[engine] = sim_time
        return engine
