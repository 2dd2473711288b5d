"""How plans cross the pipe between the planning process and the loop: as rows of numbers.

A routed target (its zone, mode and form) crosses once, with the first plan that has it, and is
named by its number after that; so does each list of targets, as the numbers of its targets.
Targets cross as plain tuples: a named tuple is pickled through a Python call (seven times the
time, in the planning process, for the tens of thousands a backlog's first pass numbers).
A plan is then a row of small values: the event's id and times and its list's number. Records
with the same plan get the same list on the loop's side, which lets the pending stage remember
what it found for the list (``PendingTargets``). Both sides start over together once either
table is full, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.planning.planner import SKIPPED, Planned, Routed
from worker.planning.routing import Zone
from worker.targets import Mode, Target

# Routed targets, and lists of them, numbered before the numbering starts over.
NUMBERED_TARGETS = 50_000
NUMBERED_LISTS = 20_000

Row = tuple[Any, ...] | None
# A routed target as it crosses: its zone, its mode, and its target as a plain tuple.
Crossing = tuple[Zone, Mode, tuple[Any, ...]]


class Numbering:
    """The planning process's side: plans into rows, and what crosses for the first time."""

    def __init__(self) -> None:
        self._targets: dict[tuple[str, Mode, Target], int] = {}
        self._lists: dict[tuple[int, ...], int] = {}
        # The number of each remembered plan's list (a tuple the planner hands every record with
        # that plan), by its identity; the tuple is held, so its id is not reused meanwhile.
        self._known: dict[int, tuple[Sequence[Routed], int]] = {}
        self._new_targets: list[Crossing] = []
        self._new_lists: list[tuple[int, ...]] = []

    def start_batch(self) -> bool:
        """True when the numbering starts over with this batch."""
        if len(self._targets) < NUMBERED_TARGETS and len(self._lists) < NUMBERED_LISTS:
            return False
        self._targets.clear()
        self._lists.clear()
        self._known.clear()
        return True

    def row(self, plan: Planned) -> Row:
        if plan is SKIPPED:
            return None  # one byte across the pipe, and the one shared plan back
        return (
            plan.event_id,
            plan.event_time,
            plan.ledger_time,
            plan.skipped,
            self._list(plan.targets),
            # Most plans have none of these: an empty tuple crosses the pipe as one byte and
            # comes back as the one empty tuple, not a new list per record.
            tuple(plan.errors),
            tuple(self._number(plan.warm)) if plan.warm else (),
            tuple(plan.dropped),
        )

    def take_new(self) -> tuple[list[Crossing], list[tuple[int, ...]]]:
        """The targets and lists numbered since the last call, for the loop's tables."""
        new = self._new_targets, self._new_lists
        self._new_targets, self._new_lists = [], []
        return new

    def _list(self, targets: Sequence[Routed]) -> int:
        shared = type(targets) is tuple
        if shared:
            known = self._known.get(id(targets))
            if known is not None and known[0] is targets:
                return known[1]
        numbers = tuple(self._number(targets))
        n = self._lists.get(numbers)
        if n is None:
            n = self._lists[numbers] = len(self._lists)
            self._new_lists.append(numbers)
        if shared:
            self._known[id(targets)] = (targets, n)
        return n

    def _number(self, targets: Sequence[Routed]) -> list[int]:
        numbers = self._targets
        out = []
        for routed in targets:
            key = (routed.zone.id, routed.mode, routed.target)
            n = numbers.get(key)
            if n is None:
                n = numbers[key] = len(numbers)
                self._new_targets.append((routed.zone, routed.mode, tuple(routed.target)))
            out.append(n)
        return out


class Numbered:
    """The loop's side: rows back into plans."""

    def __init__(self) -> None:
        self._targets: list[Routed] = []
        self._lists: list[list[Routed]] = []

    def plans(
        self,
        reset: bool,
        new: tuple[list[Crossing], list[tuple[int, ...]]],
        rows: list[Row],
    ) -> list[Planned]:
        targets, lists = self._targets, self._lists
        if reset:
            targets.clear()
            lists.clear()
        new_targets, new_lists = new
        make = tuple.__new__  # a named tuple's own constructor is a Python call: twice the time
        targets.extend([make(Routed, (z, mode, make(Target, t))) for z, mode, t in new_targets])
        lists.extend([targets[i] for i in numbers] for numbers in new_lists)
        plans: list[Planned] = []
        for row in rows:
            if row is None:
                plans.append(SKIPPED)
                continue
            event_id, event_time, ledger_time, skipped, n, errors, warm, dropped = row
            plans.append(
                make(
                    Planned,
                    (
                        event_id,
                        event_time,
                        ledger_time,
                        skipped,
                        lists[n],
                        errors,
                        [targets[i] for i in warm] if warm else (),
                        dropped,
                    ),
                )
            )
        return plans
