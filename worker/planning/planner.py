"""What one record purges: decode, rules, validation, zone routing and cache-key variants.

``Planner.plan`` is the single answer to "what does this record purge"; ``run``, ``replay``,
``explain`` and ``purge`` all ask it, so ``explain`` can never drift from what ``run`` sends.
Its ``RecordPlan`` keeps the event (for ``explain``); ``Planned`` is what the loop keeps of it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import structlog

from worker.config.model import EVENT_TYPE_FIELD, MAX_RECORD_BYTES
from worker.errors import InvalidEvent, NoRuleMatched, PermanentError, UnknownZone
from worker.events import Event, Record
from worker.intake.decode import decode
from worker.planning.envelope import ByData
from worker.planning.memo import Memo
from worker.planning.routing import Zone, ZoneRouter
from worker.planning.rules.outcome import RuleTarget
from worker.planning.rules.ruleset import RuleSet
from worker.planning.templates import values_at
from worker.targets import Mode, Target

log = structlog.get_logger("worker.planning.planner")

# Targets whose zone is remembered, and the targets they expand to there; past either bound,
# routing starts over. It runs only for plans not remembered (below): memory (README, "Memory").
ROUTE_CACHE_SIZE = 30_000
ROUTE_CACHE_TARGETS = 120_000
# Plans remembered by what the rules read of an event, and the targets they hold in all.
PLAN_CACHE_SIZE = 20_000
PLAN_CACHE_TARGETS = 100_000


class Routed(NamedTuple):
    """A validated target, routed to its zone, in the form it is sent."""

    zone: Zone
    mode: Mode
    target: Target


@dataclass(frozen=True)
class PlanningSettings:
    """What planning needs: rules, zones, how to read records, and where misfits go (below)."""

    rules: RuleSet
    zones: tuple[Zone, ...]
    max_record_bytes: int = MAX_RECORD_BYTES
    event_type_field: str = EVENT_TYPE_FIELD
    unknown_zone: str = "dead_letter"  # or "drop"
    no_rule_matched: str = "skip"  # or "dead_letter"
    use_event_time: bool = False  # the ledger goes by the event's time, not the record's


@dataclass(slots=True)
class RecordPlan:
    event: Event | None = None
    fired: list[str] = field(default_factory=list)
    targets: list[Routed] = field(default_factory=list)
    # Failures that put the record on the dead-letter topic (its other targets still go).
    errors: list[PermanentError] = field(default_factory=list)
    # Targets for no configured zone, left out because ``delivery.unknown_zone`` is ``drop``.
    dropped: list[UnknownZone] = field(default_factory=list)
    # URLs to fetch again once the record is purged, per zone and cache-key variant.
    warm: list[Routed] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        """No rule fired and the config says to move on."""
        return not self.fired and not self.errors


class Planned(NamedTuple):
    """What the worker's loop needs of a plan (the event's body stays behind)."""

    event_id: str | None
    event_time: float | None  # the event's own time, else the record's
    ledger_time: float | None  # what the purge ledger goes by (None: always purge)
    skipped: bool
    targets: Sequence[Routed]
    errors: Sequence[PermanentError]
    warm: Sequence[Routed]
    dropped: Sequence[UnknownZone]

    @staticmethod
    def of(plan: RecordPlan, use_event_time: bool) -> Planned:
        if plan.skipped:
            return SKIPPED
        event = plan.event
        if event is None:
            event_id = event_time = ledger_time = None
        else:
            event_id, event_time = event.id, event.time
            ledger_time = ledger_time_of(event.time, event.record_time, use_event_time)
        return Planned(
            event_id,
            event_time,
            ledger_time,
            plan.skipped,
            plan.targets,
            plan.errors,
            plan.warm,
            plan.dropped,
        )


def ledger_time_of(when: float | None, record: float | None, use_event_time: bool) -> float | None:
    """What the ledger judges an event by: its time ``when`` if so configured, else its record's."""
    return when if use_event_time and when is not None else record


_make = tuple.__new__  # a named tuple's C constructor: ``_Known.planned`` runs per record
# The plan of every record no rule fired for: the loop finishes it at once (most page views).
SKIPPED = Planned(None, None, None, True, (), (), (), ())


class _Known(NamedTuple):
    """A plan remembered: what it fired, purges and warms."""

    fired: tuple[str, ...]
    targets: tuple[Routed, ...]
    warm: tuple[Routed, ...]

    def planned(
        self, event_id: str | None, when: float | None, record: float | None, by: bool
    ) -> Planned:
        """This plan for one event (``by``: the ledger goes by the event's time)."""
        if not self.fired:
            return SKIPPED
        ledger_time = ledger_time_of(when, record, by)
        return _make(Planned, (event_id, when, ledger_time, False, self.targets, (), self.warm, ()))


def _plan_weight(known: _Known) -> int:
    return 1 + len(known.targets) + len(known.warm)


def _route_weight(routed: tuple[Zone, tuple[Target, ...]] | UnknownZone) -> int:
    return 1 if isinstance(routed, UnknownZone) else len(routed[1])


class Planner:
    def __init__(self, settings: PlanningSettings) -> None:
        self.settings = settings
        self._router = ZoneRouter(settings.zones)
        self._routes: Memo[tuple[Zone, tuple[Target, ...]] | UnknownZone] = Memo(
            ROUTE_CACHE_SIZE, ROUTE_CACHE_TARGETS, _route_weight
        )
        # A backlog repeats an article as new events (own id and time): events alike in all the
        # rules that can match them read get one plan, made once (not with plug-in rules).
        self._reads_for = settings.rules.reads_for
        self._plans: Memo[_Known] = Memo(PLAN_CACHE_SIZE, PLAN_CACHE_TARGETS, _plan_weight)
        # The same plans, found by the event's data bytes without decoding it (``envelope``).
        self._by_data = ByData(self._reads_for, settings.max_record_bytes)
        self._data_plans: Memo[_Known] = Memo(PLAN_CACHE_SIZE, PLAN_CACHE_TARGETS, _plan_weight)

    def plan(self, record: Record) -> RecordPlan:
        """The plan for one record. Never raises: failures are in ``RecordPlan.errors``."""
        plan = RecordPlan()
        try:
            event = plan.event = self._decode(record)
            key = self._key(event)
        except PermanentError as exc:
            plan.errors.append(exc)
            return plan
        except Exception as exc:  # noqa: BLE001 (logged with its traceback by ``_failed``)
            return self._failed(record, plan, exc)
        known = self._plans.get(key) if key is not None else None
        if known is not None:
            plan.fired = list(known.fired)
            plan.targets = list(known.targets)
            plan.warm = list(known.warm)
            return plan
        return self._evaluate(record, plan, key)

    def planned(self, record: Record) -> Planned:
        """``Planned.of(plan(record))``; a remembered plan without a ``RecordPlan`` (copying its
        lists took a third of the time), found by the data's bytes if it can be (``envelope``)."""
        found = self._by_data.find(record)
        by_event = self.settings.use_event_time
        if found is not None and (known := self._data_plans.get(found.key)) is not None:
            found.judge.hit()
            return known.planned(found.event_id, found.event_time, found.record_time, by_event)
        try:
            event = self._decode(record)
            key = self._key(event)
        except Exception:  # noqa: BLE001 (``plan`` meets it again, and words and logs it)
            return Planned.of(self.plan(record), by_event)
        known = self._plans.get(key) if key is not None else None
        if known is None:
            planned = Planned.of(self._evaluate(record, RecordPlan(event), key), by_event)
            known = self._plans.get(key) if key is not None else None  # if it was remembered
            if known is not None and found is not None:
                self._data_plans.put(found.key, known)
            return planned
        if found is not None:
            found.judge.miss()
            self._data_plans.put(found.key, known)
        return known.planned(event.id, event.time, event.record_time, by_event)

    def _decode(self, record: Record) -> Event:
        settings = self.settings
        return decode(
            record, max_bytes=settings.max_record_bytes, type_field=settings.event_type_field
        )

    def _key(self, event: Event) -> Hashable | None:
        """What the rules' outcome depends on: topic, type and the values they read (None with
        plug-in rules, which may read anything)."""
        reads = self._reads_for(event.topic, event.type)
        if reads is None:
            return None
        return (event.topic, event.type, values_at(event, reads))

    def _evaluate(self, record: Record, plan: RecordPlan, key: Hashable | None) -> RecordPlan:
        """Run the rules on ``plan.event`` and route what they ask for; remembered by ``key``."""
        settings = self.settings
        event = plan.event
        assert event is not None
        try:
            rules = settings.rules.evaluate(event)
        except PermanentError as exc:
            plan.errors.append(exc)
            return plan
        except Exception as exc:  # noqa: BLE001 (logged with its traceback by ``_failed``)
            return self._failed(record, plan, exc)
        plan.fired = rules.fired
        plan.errors.extend(rules.errors)
        if not rules.fired and settings.no_rule_matched == "dead_letter":
            plan.errors.append(
                NoRuleMatched(f"no rule matched event type {event.type!r} on {event.topic}")
            )
        self.route(rules.targets, plan)
        self.route_warm(rules.warm, plan)
        if key is not None and not plan.errors and not plan.dropped:
            # Failures are not remembered: every record that has them is dead-lettered anew.
            self._plans.put(key, _Known(tuple(plan.fired), tuple(plan.targets), tuple(plan.warm)))
        return plan

    @staticmethod
    def _failed(record: Record, plan: RecordPlan, exc: Exception) -> RecordPlan:
        # A bug here must dead-letter the record, not stop the worker on it forever.
        log.exception("unexpected error planning a record", offset=record.offset)
        plan.errors.append(InvalidEvent(f"internal error: {type(exc).__name__}: {exc}"))
        return plan

    def route_warm(self, targets: Iterable[Target], plan: RecordPlan) -> RecordPlan:
        """Route URLs to warm: each to its zone, once per cache-key variant. A URL on no
        configured zone is not warmed (there is no zone to pace it by)."""
        seen = {(r.zone.id, r.target) for r in plan.warm}
        for target in targets:
            routed = self._routes.get(target) or self._route(target)
            if isinstance(routed, UnknownZone):
                continue
            zone, expanded = routed
            for variant in expanded:
                if (zone.id, variant) not in seen:
                    seen.add((zone.id, variant))
                    plan.warm.append(Routed(zone, Mode.PURGE, variant))
        return plan

    def route(self, targets: Iterable[RuleTarget], plan: RecordPlan) -> RecordPlan:
        """Route ``targets`` into ``plan``: each to its zone, URLs repeated per the zone's
        cache-key variants, duplicates once."""
        seen: set[tuple[str, Mode, Target]] = set()
        for rt in targets:
            routed = self._routes.get(rt.target) or self._route(rt.target)
            if isinstance(routed, UnknownZone):
                if self.settings.unknown_zone == "drop":
                    plan.dropped.append(routed)
                else:
                    plan.errors.append(routed)
                continue
            zone, expanded = routed
            for target in expanded:
                key = (zone.id, rt.mode, target)
                if key not in seen:
                    seen.add(key)
                    plan.targets.append(Routed(zone, rt.mode, target))
        return plan

    def _route(self, target: Target) -> tuple[Zone, tuple[Target, ...]] | UnknownZone:
        """The zone of ``target`` and the targets it becomes there; remembered, since the zones
        never change while the worker runs."""
        try:
            zone = self._router.route(target)
            routed: tuple[Zone, tuple[Target, ...]] | UnknownZone = (
                zone,
                tuple(ZoneRouter.expand(zone, target)),
            )
        except UnknownZone as exc:
            routed = exc
        self._routes.put(target, routed)
        return routed
