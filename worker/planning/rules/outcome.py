"""What rules produce: targets with their mode and warming, an event's outcome across every rule
that fired, the failures a rule can report alongside its targets, and the ``Rule`` interface."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from worker.errors import InvalidTarget, PermanentError
from worker.events import Event
from worker.targets import Mode, Target

# What a rule asks of a target besides purging it (``RuleTarget.warm``).
PURGE, PURGE_AND_WARM, WARM_ONLY = 0, 1, 2


class RuleTarget(NamedTuple):
    target: Target
    mode: Mode
    rule: str
    # PURGE; PURGE_AND_WARM (``warm: true``); WARM_ONLY (a URL a rule's ``warm`` list names).
    warm: int = PURGE


@dataclass
class RuleOutcome:
    """What an event purges: targets (deduplicated, first-seen order), the rules that fired, and
    what failed (a target that is invalid, a field a template needs): the record's valid
    targets are purged all the same, and the record is dead-lettered naming the failures."""

    targets: list[RuleTarget] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)
    errors: list[PermanentError] = field(default_factory=list)
    # URLs to fetch again once the record is purged (rules with ``warm``), deduplicated.
    warm: list[Target] = field(default_factory=list)

    def add(self, items: Iterable[RuleTarget]) -> None:
        seen = {(t.target, t.mode) for t in self.targets}
        warm = set(self.warm)
        for item in items:
            if item.warm and item.target not in warm:
                warm.add(item.target)
                self.warm.append(item.target)
            if item.warm != WARM_ONLY and (item.target, item.mode) not in seen:
                seen.add((item.target, item.mode))
                self.targets.append(item)


class TooManyTargets(InvalidTarget):
    """The record would produce more than ``delivery.max_targets_per_record``: it purges
    nothing (its cost is what is wrong), and is dead-lettered."""


class PartialTargets(PermanentError):
    """A rule produced ``targets`` but also ``errors`` (targets it could not make)."""

    def __init__(self, targets: list[RuleTarget], errors: list[PermanentError]) -> None:
        self.targets = targets
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors[:3]))


class Rule(Protocol):
    name: str
    # The zone its tags (and everything) go to; needed when several zones are configured and
    # the rule emits targets without a host of their own (``needs_zone``).
    zone: str | None
    needs_zone: bool

    def evaluate(self, event: Event) -> list[RuleTarget] | None:
        """Targets if the rule matches (maybe none), None if not. Raises PermanentError."""


def too_many(what: str, cap: int) -> InvalidTarget:
    return TooManyTargets(
        f"{what} produced more than {cap} targets for one record (delivery.max_targets_per_record)"
    )
