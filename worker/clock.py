"""Time, injected into everything that waits, so tests never sleep; and times written as text."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; for intervals and deadlines."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch; for event age and timestamps."""

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Block for ``seconds`` or until ``event`` is set, whichever is first; True if set."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(max(0.0, seconds))


class MockClock:
    """A clock that moves only when told to; ``sleep`` advances it instead of blocking."""

    def __init__(self, start: float = 1_000.0, wall: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def time(self) -> float:
        with self._lock:
            return self._now + self._wall_offset

    def sleep(self, seconds: float) -> None:
        with self._lock:
            if seconds > 0:
                self._now += seconds

    def wait(self, event: threading.Event, seconds: float) -> bool:
        if event.is_set():
            return True
        self.sleep(seconds)
        return event.is_set()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def rfc3339(ts: float) -> str:
    """Wall seconds as RFC 3339 UTC with milliseconds: ``2026-11-27T10:00:00.000Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float | None:
    """Wall seconds from an RFC 3339 time (``Z`` or an offset); None if it is not one, a time
    without an offset included (its moment would depend on this machine's time zone)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None
