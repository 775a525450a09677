"""The one source of time.

Every component receives a clock; nothing else calls ``time.time()`` or
``time.sleep()``. Paper and live trading use :class:`WallClock`; the simulator
and replay use :class:`SimClock`, so the same main loop runs everywhere.
Both clocks can be woken early through a stop event, which is how a signal
ends a sleep at once.
"""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime
from typing import Protocol


def iso_utc(ts: float | None) -> str | None:
    """``2026-01-01T00:00:00Z`` for a unix time (``None`` stays ``None``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Clock(Protocol):
    def now(self) -> float:
        """Current time in unix seconds."""

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of clock time pass (returns early when stopped)."""


class WallClock:
    """Real time. ``sleep`` waits on ``stop_event`` so shutdown is immediate."""

    def __init__(self, stop_event: threading.Event | None = None) -> None:
        self._stop = stop_event or threading.Event()

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stop.wait(seconds)


class SimClock:
    """Simulated time that advances only through :meth:`sleep` or :meth:`advance`.

    ``speed`` is how many simulated seconds pass per wall second while
    sleeping; ``math.inf`` never waits on the wall clock at all.
    """

    def __init__(
        self,
        start: float,
        speed: float = math.inf,
        stop_event: threading.Event | None = None,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed!r}")
        self._now = float(start)
        self.speed = speed
        self._stop = stop_event or threading.Event()
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward without waiting."""
        if seconds < 0:
            raise ValueError("time cannot go backwards")
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if math.isfinite(self.speed):
            self._stop.wait(seconds / self.speed)
        self.advance(seconds)
