"""How a worker shares an account's budget while the budget exchange does not answer.

Before the exchange first answers (it may only be slow to connect), a worker spends almost
nothing (``JOINING_SHARE``) for ``REPORT_TTL``; then it takes its part of the partitions, as
every worker without the exchange does, and the parts add up to the budget.

When the exchange falls silent after the worker was in the demand split, the others may still
hear each other: ``REPORT_TTL`` after its last report they stop counting it and share the whole
budget among themselves. Had it gone on at its part of the partitions, the account was overspent
until the group moved those partitions (two and four 429s when one replica of two lost Kafka for
12 s). So it sends nothing ("cut off") while its consumer does not hear Kafka either: the
group soon gives its partitions to the others, which purge their records again. Nothing, not a
joiner's little: the other, hearing nobody, spends the plan's whole URL figure (one 429 in a
run where the cut-off worker went on at the joining share). Once its
consumer hears Kafka after the exchange fell silent, the exchange is what is down, for every
worker alike: it waits as a joining worker does (the others notice the silence meanwhile), then
shares by partitions.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from worker.clock import Clock
from worker.sending.accounts import Accounts
from worker.sending.split import EPOCH, REPORT_TTL

log = structlog.get_logger("worker.sending")

# When (monotonic) the consumer last heard from Kafka; None: never.
Contact = Callable[[], float | None]

# Cut off, each look stops every send for this long (the loop looks at least every boundary).
HOLD = 2 * EPOCH

DEMAND, JOINING, CUT_OFF, PARTITIONS = "demand", "joining", "cut off", "partitions"


class Fallback:
    """Decides the mode to share in while the exchange is silent. Only the loop calls it."""

    def __init__(self, clock: Clock, contact: Contact, accounts: Accounts) -> None:
        self._clock = clock
        self._contact = contact
        self._accounts = accounts
        self._joined = clock.time()  # wall-clock time the worker began waiting as a joiner
        self._silent_at: float | None = None  # monotonic: when the exchange fell silent

    def mode(self, previous: str) -> str:
        """The mode now, the exchange being silent (``previous``: the mode until now):
        ``joining`` spends almost nothing, ``cut off`` nothing, ``partitions`` the worker's
        part of them."""
        if previous == DEMAND:
            log.warning("budget exchange silent; sending nothing until it or Kafka answers")
            self._silent_at = self._clock.monotonic()
            return self._hold()
        if previous == CUT_OFF:
            contact = self._contact()
            if contact is None or self._silent_at is None or contact <= self._silent_at:
                return self._hold()
            log.warning("Kafka answers, the budget exchange does not; sharing by partitions soon")
            self._joined = self._clock.time()
            return JOINING
        if previous == JOINING and self._clock.time() - self._joined < REPORT_TTL:
            return JOINING  # still connecting: a partition share now could overrun the others
        if previous != PARTITIONS:
            log.warning("budget exchange silent; sharing the budget by partitions")
        return PARTITIONS

    def _hold(self) -> str:
        for limiter in self._accounts.limiters.values():
            limiter.pause(HOLD)
        return CUT_OFF
