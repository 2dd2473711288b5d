"""The planning stage: a poll's records in, their plans out, a poll at a time, in order.

Inline, each record is planned when it is submitted. With the planning process
(``worker.planning.process``), a poll's batch goes there whole; a large batch is left to be
planned while the loop goes on (a backlog: the two run side by side), and the batch before it,
and any small one, is taken at once (a trickle waits no longer than the child takes).
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

B = TypeVar("B")


class Planning(Generic[B]):
    """Plans records for the loop; ``B`` is what the loop names a poll's records by."""

    def __init__(self, planner: Planner | None, process: PlanningProcess | None = None) -> None:
        """Plans with ``process`` when given, else with ``planner``."""
        if planner is None and process is None:
            raise ValueError("planning needs a planner or a planning process")
        self._planner = planner
        self._process = process
        # Batches sent to the process and not yet planned, oldest first, as the loop names them.
        self._out: deque[B] = deque()
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
        if records:
            self._process.submit(list(records))
            self._out.append(batch)
        keep = 1 if len(records) >= OVERLAP_BATCH else 0
        while len(self._out) > keep:
            self._take(meanwhile)

    def poll(self) -> list[tuple[B, Sequence[Planned]]]:
        """The plans ready now, a batch at a time, in the order their records came. Never
        blocks long."""
        ready, self._ready = self._ready, []
        return ready

    def join(self) -> Iterator[tuple[B, Sequence[Planned]]]:
        """Every plan still to come (shutdown), while the planning process answers."""
        yield from self.poll()
        try:
            while self._out and self._process is not None and self._process.alive:
                self._take()
                yield from self.poll()
        except PlannerDied as exc:
            log.error("unplanned records will be redelivered", error=str(exc))

    def close(self) -> None:
        self._out.clear()
        if self._process is not None:
            self._process.close()

    def _take(self, meanwhile: Callable[[], None] | None = None) -> None:
        """The plans of the oldest batch in the planning process (waits for them)."""
        assert self._process is not None
        # Still on its way (``waiting``) until its plans are in, ``meanwhile`` included.
        plans = self._process.collect(meanwhile)
        self._ready.append((self._out.popleft(), plans))
