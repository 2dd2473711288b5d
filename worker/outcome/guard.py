"""The dead-letter guard: stop the worker when too large a share of records is being
dead-lettered. After a bad deploy, stopping beats emptying the whole topic into the dead-letter
topic: the records wait on Kafka for the fix.

It judges the stream, not the order outcomes come back in: every record counts in the second it
arrived, and its dead letter counts against that same second. (Invalid records finish at once and
valid ones only once their purge is accepted: judged by when outcomes came back, a backlog with a
quarter of bad records looked like nothing but bad ones for its first seconds.) The share is the
dead letters among the records that arrived within the window.

Across restarts the guard goes on from where its predecessor was: each dead letter carries the
window's figures when it was written (``purge.guard.window``), and a starting worker seeds itself
with the latest. A stream under the limit stays under it; one over it stops the new worker at its
first dead letter, before it purges anything again.
"""

from __future__ import annotations

import math

from worker.clock import Clock
from worker.config.model import GuardSettings
from worker.errors import DeadLetterGuardTripped

HEADER = "purge.guard.window"


class DeadLetterGuard:
    def __init__(self, config: GuardSettings, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        # Whole monotonic seconds -> [records that arrived then, of them dead-lettered].
        self._seconds: dict[int, list[int]] = {}
        # Until when a predecessor's figures, over the limit, stop this worker at its first
        # dead letter (its own arrivals would otherwise dilute them for a while).
        self._inherited_over_until = -math.inf

    @property
    def off(self) -> bool:
        return self._config.off

    @property
    def inherited_over(self) -> bool:
        """A predecessor's figures, over the limit, stop this worker at its first dead letter."""
        return self._clock.monotonic() < self._inherited_over_until

    def arrived(self, count: int, at: float) -> None:
        """``count`` records arrived at monotonic time ``at``."""
        if count and not self.off:
            self._second(at)[0] += count

    def check(self, arrived_at: float) -> None:
        """Before dead-lettering a record that arrived at ``arrived_at``. Raises
        ``DeadLetterGuardTripped`` when that would take the share over the limit."""
        if self.off:
            return
        arrived, dead = self.window()
        if self.inherited_over:
            raise DeadLetterGuardTripped(
                f"the last run dead-lettered over {self._config.max_ratio:.0%} of the records "
                f"of the last {self._config.window_seconds:.0f}s and this one would go on: "
                "stopping. Check the rules, the zones and the token; tune "
                "delivery.dead_letter_guard."
            )
        if arrived_at >= self._horizon():
            dead += 1
        arrived = max(arrived, dead)
        if arrived >= self._config.min_records and dead / arrived > self._config.max_ratio:
            raise DeadLetterGuardTripped(
                f"{dead} of the {arrived} records that arrived within "
                f"{self._config.window_seconds:.0f}s would be dead-lettered (limit "
                f"{self._config.max_ratio:.0%}): stopping instead. Check the rules, the zones "
                "and the token; tune delivery.dead_letter_guard."
            )

    def dead(self, arrived_at: float) -> None:
        """A record that arrived at ``arrived_at`` is being dead-lettered."""
        if not self.off and arrived_at >= self._horizon():
            self._second(arrived_at)[1] += 1

    def window(self) -> tuple[int, int]:
        """Records that arrived within the window, and how many of them were dead-lettered."""
        self._prune()
        arrived = sum(a for a, _ in self._seconds.values())
        return arrived, sum(d for _, d in self._seconds.values())

    def header(self) -> str:
        """This window's figures, for the dead letter about to be written."""
        arrived, dead = self.window()
        return f"arrived={arrived} dead={dead}"

    def seed(self, header: str, age: float) -> bool:
        """Go on from a predecessor's figures (a ``header()`` written ``age`` seconds ago).
        False if the text is not one."""
        try:
            fields = dict(part.split("=", 1) for part in header.split())
            arrived, dead = int(fields["arrived"]), int(fields["dead"])
        except (ValueError, KeyError):
            return False
        if age >= self._config.window_seconds or not 0 <= dead <= arrived:
            return False
        counts = self._second(self._clock.monotonic() - max(0.0, age))
        counts[0] += arrived
        counts[1] += dead
        limit = self._config
        # At the limit counts: the predecessor's next dead letter would have been over it (the
        # one that tripped it is never written, so its figures stop at the limit).
        if arrived >= limit.min_records and dead / arrived >= limit.max_ratio:
            self._inherited_over_until = self._clock.monotonic() + limit.window_seconds - age
        return True

    def _horizon(self) -> float:
        return self._clock.monotonic() - self._config.window_seconds

    def _second(self, at: float) -> list[int]:
        second = math.floor(at)
        counts = self._seconds.get(second)
        if counts is None:
            # Seconds past the window go as new ones come, not only when a dead letter asks for
            # the window: a stream without bad records would otherwise add one a second for ever.
            self._prune()
            counts = self._seconds[second] = [0, 0]
        return counts

    def _prune(self) -> None:
        horizon = math.floor(self._horizon())
        for second in [s for s in self._seconds if s < horizon]:
            del self._seconds[second]
