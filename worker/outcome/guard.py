"""The dead-letter guard: stop the worker when too large a share of records is being
dead-lettered. After a bad deploy, stopping beats emptying the whole topic into the dead-letter
topic: the records wait on Kafka for the fix."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from worker.clock import Clock
from worker.config.model import GuardSettings
from worker.errors import DeadLetterGuardTripped


class DeadLetterGuard:
    """Counts finished records in a sliding window; ``check`` raises before a write that would
    push the dead-lettered share over the limit."""

    def __init__(self, config: GuardSettings, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._all: deque[float] = deque()
        self._dead: deque[float] = deque()

    def _trim(self, now: float) -> None:
        horizon = now - self._config.window_seconds
        for q in (self._all, self._dead):
            while q and q[0] < horizon:
                q.popleft()

    def seed(self, failed_at: Sequence[float], now_wall: float) -> None:
        """Count dead letters written by earlier runs (wall times) as if this run wrote them:
        the guard's window then spans restarts."""
        now = self._clock.monotonic()
        for t in sorted(failed_at):
            at = now - max(0.0, now_wall - t)
            self._all.append(at)
            self._dead.append(at)

    def record_ok(self) -> None:
        self._all.append(self._clock.monotonic())

    def check(self) -> None:
        """Call before a dead-letter write. Raises ``DeadLetterGuardTripped``."""
        if self._config.max_ratio >= 1.0:
            return
        now = self._clock.monotonic()
        self._trim(now)
        total = len(self._all) + 1
        dead = len(self._dead) + 1
        if total >= self._config.min_records and dead / total > self._config.max_ratio:
            raise DeadLetterGuardTripped(
                f"{dead} of the last {total} records within {self._config.window_seconds:.0f}s "
                f"would be dead-lettered (limit {self._config.max_ratio:.0%}): stopping instead. "
                "Check the rules, the zones and the token; tune delivery.dead_letter_guard."
            )

    def record_dead(self) -> None:
        now = self._clock.monotonic()
        self._all.append(now)
        self._dead.append(now)
