"""Mapping rules: an event in, purge targets out.

Declarative rules (from YAML) match on topic, event type and field values, then render target
templates; plug-in rules name a Python function. Rules are compiled once at start-up, and every
mistake that can be found then (unknown keys, bad regexes, captures that do not exist, a plug-in
that does not import) is a ``ConfigError`` naming the file, the rule and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.config.model import MAX_TARGETS_PER_RECORD
from worker.errors import ConfigError, InvalidEvent, InvalidTarget, PermanentError
from worker.events import Event
from worker.planning.rules.declarative import DeclarativeRule
from worker.planning.rules.mapping import StrictMapping
from worker.planning.rules.outcome import (
    PartialTargets,
    Rule,
    RuleOutcome,
    RuleTarget,
    TooManyTargets,
    too_many,
)
from worker.planning.rules.plugin import PluginRule

__all__ = ["Rule", "RuleOutcome", "RuleSet", "RuleTarget", "compile_rules"]


def _named(rule: str, exc: PermanentError) -> PermanentError:
    """``exc`` with the rule's name in front, for the dead-letter message."""
    if type(exc) in (InvalidTarget, InvalidEvent):
        return type(exc)(f"rule {rule}: {exc}")
    return exc


class RuleSet:
    def __init__(self, rules: Sequence[Rule], max_targets: int = MAX_TARGETS_PER_RECORD) -> None:
        self.rules = list(rules)
        self.max_targets = max_targets

    @property
    def reads(self) -> tuple[tuple[str, ...], ...] | None:
        """The event paths every rule's outcome depends on besides the topic and type: events
        alike in these get the same plan. None when a plug-in rule reads what it likes."""
        paths: dict[tuple[str, ...], None] = {}
        for rule in self.rules:
            reads = getattr(rule, "reads", None)
            if reads is None:
                return None
            paths.update(dict.fromkeys(reads))
        return tuple(paths)

    @property
    def warms(self) -> bool:
        """Whether some rule warms URLs (plug-ins never do)."""
        return any(getattr(rule, "warms", False) for rule in self.rules)

    def evaluate(self, event: Event) -> RuleOutcome:
        """Every matching rule's targets, united, and what failed on the way. Raises only
        ``TooManyTargets``: any other failure of one rule or target leaves the rest standing."""
        plan = RuleOutcome()
        for rule in self.rules:
            try:
                targets = rule.evaluate(event)
            except TooManyTargets as exc:
                raise TooManyTargets(f"rule {rule.name}: {exc}") from None
            except PartialTargets as exc:
                targets = exc.targets
                plan.errors.extend(_named(rule.name, e) for e in exc.errors)
            except PermanentError as exc:
                plan.fired.append(rule.name)  # it matched; it could not say what to purge
                plan.errors.append(_named(rule.name, exc))
                continue
            if targets is not None:
                plan.fired.append(rule.name)
                plan.add(targets)
                if len(plan.targets) > self.max_targets:
                    raise too_many(f"rules {', '.join(plan.fired)}", self.max_targets)
        return plan


def compile_rules(
    raw: Any,
    source: str,
    *,
    allow_everything: bool,
    plugin_path: str | None = None,
    taken: set[str] | None = None,
    max_targets: int = MAX_TARGETS_PER_RECORD,
) -> list[Rule]:
    """Compile a list of rule mappings from ``source``. ``taken``: rule names already used
    (by other rule files); every name must be unique across them. Raises ``ConfigError``."""
    if not isinstance(raw, list):
        raise ConfigError(source, "rules", "must be a list of rules")
    names = set() if taken is None else taken
    rules: list[Rule] = []
    for i, item in enumerate(raw):
        label = (
            item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else i
        )
        section = StrictMapping(item, f"rules[{label}]", source)
        rule: Rule = (
            PluginRule(section, plugin_path, max_targets)
            if section.has("plugin")
            else DeclarativeRule(
                section, allow_everything=allow_everything, max_targets=max_targets
            )
        )
        if rule.name in names:
            raise ConfigError(source, f"rules[{label}]", f"duplicate rule name {rule.name!r}")
        names.add(rule.name)
        rules.append(rule)
    return rules
