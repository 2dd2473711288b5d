"""The planning stage: a poll's records in, their plans out, a poll at a time, in order.

Inline, each record is planned when it is submitted. With the planning process
(``worker.planning.process``), a poll's batch goes there whole. In a trickle (small batches) the
loop takes the plans at once: a record waits no longer than the child takes. A large batch is
left to be planned while the loop reads the next one. In a backlog of records older than the
ledger's margin the loop reads further ahead, up to ``READ_AHEAD`` records, and takes each
batch's plans as soon as they are in. Not in a young one: there the targets pending wait for
the repeats still unread (``Loop._defer``), and a target's window runs from when its record was
read, so records read long before their plans came would send their targets before the
repeats read meanwhile are pended (a bulk re-publish sent 1.3 items per distinct one).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import structlog

from worker.events import Record
from worker.planning.planner import Planned, Planner
from worker.planning.process import PlannerDied, PlanningProcess

log = structlog.get_logger("worker.planning")

# A poll's batch at least this large is planned in the planning process while the loop goes on.
OVERLAP_BATCH = 100
# Records a backlog may have in the planning process at once. A backlog's first polls are mostly
# events never planned before (about 40 µs each in the child, against about 10 µs of the loop's
# own work a record); reading ahead, the loop parses the polls after them meanwhile instead of
# waiting. In alternating runs, 32,000 drained the aged backlog no faster and held 8 MiB more
# through the 1,000,000-event one (202 against 194 MiB, both processes, two runs each).
READ_AHEAD = 16_000
# After a backlog's poll that brought nothing, how long the loop looks for plans before it polls
# Kafka again: whichever comes first is worth taking first.
EMPTY_POLL_WAIT = 0.005

B = TypeVar("B")


class Planning(Generic[B]):
    """Plans records for the loop; ``B`` is what the loop names a poll's records by."""

    def __init__(
        self,
        planner: Planner | None,
        process: PlanningProcess | None = None,
        aged: Callable[[Sequence[Record]], bool] = lambda records: True,
    ) -> None:
        """Plans with ``process`` when given, else with ``planner``. ``aged``: whether a poll's
        records are all older than the ledger's margin (a backlog of them is read ahead)."""
        if planner is None and process is None:
            raise ValueError("planning needs a planner or a planning process")
        self._planner = planner
        self._process = process
        self._aged = aged
        # Batches sent to the process and not yet planned, oldest first, as the loop names them,
        # with how many records each holds and whether it is a backlog's to read ahead of.
        self._out: deque[tuple[B, int, bool]] = deque()
        self._ahead = 0  # records in them
        self._aged_backlog = 0  # batches among them large and aged: while any, read ahead
        self._ready: list[tuple[B, Sequence[Planned]]] = []

    @property
    def waiting(self) -> bool:
        """Plans are on their way from the planning process."""
        return bool(self._out)

    def submit(
        self, batch: B, records: Sequence[Record], meanwhile: Callable[[], None] | None = None
    ) -> None:
        """Plan ``records`` (a poll's, named ``batch``: handed back with their plans). While it
        waits for the planning process, ``meanwhile`` is called now and then. Raises
        ``PlannerDied`` if the planning process has ended."""
        if self._process is None:
            assert self._planner is not None
            planned = self._planner.planned
            if records:
                self._ready.append((batch, [planned(record) for record in records]))
            return
        process = self._process
        large = len(records) >= OVERLAP_BATCH
        if records:
            process.submit(list(records))
            ahead = large and self._aged(records)
            self._out.append((batch, len(records), ahead))
            self._ahead += len(records)
            self._aged_backlog += ahead
        if not self._aged_backlog:  # a trickle: its plans now; a young backlog: a poll behind
            while len(self._out) > large:
                self._take(meanwhile)
            return
        if not records and not process.ready(EMPTY_POLL_WAIT):
            return  # back to Kafka
        while self._ahead > READ_AHEAD:
            self._take(meanwhile)
        while self._out and process.ready(0):
            self._take(meanwhile)

    def poll(self) -> list[tuple[B, Sequence[Planned]]]:
        """The plans ready now, a batch at a time, in the order their records came. Never
        blocks long."""
        ready, self._ready = self._ready, []
        return ready

    def join(self, remaining: Callable[[], float]) -> Iterator[tuple[B, Sequence[Planned]]]:
        """Every plan still to come (shutdown) while the planning process answers and
        ``remaining`` (seconds) is left."""
        yield from self.poll()
        try:
            while (
                self._out
                and self._process is not None
                and self._process.alive
                and self._process.ready(max(0.0, remaining()))
            ):
                self._take()
                yield from self.poll()
        except PlannerDied as exc:
            log.error("unplanned records will be redelivered", error=str(exc))

    def close(self) -> None:
        self._out.clear()
        self._ahead = self._aged_backlog = 0
        if self._process is not None:
            self._process.close()

    def _take(self, meanwhile: Callable[[], None] | None = None) -> None:
        """The plans of the oldest batch in the planning process (waits for them)."""
        assert self._process is not None
        # Still on its way (``waiting``) until its plans are in, ``meanwhile`` included.
        plans = self._process.collect(meanwhile)
        batch, size, ahead = self._out.popleft()
        self._ahead -= size
        self._aged_backlog -= ahead
        self._ready.append((batch, plans))
