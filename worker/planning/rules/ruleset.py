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


# Topics and types whose readers are remembered (then started over): a stream has a handful,
# a hostile one any number.
READERS_KEPT = 1_000

Reads = tuple[tuple[str, ...], ...]


def _union(rules: Sequence[DeclarativeRule]) -> Reads:
    """Every path ``rules`` read, each once, in their order."""
    return tuple(dict.fromkeys(path for rule in rules for path in rule.reads))


class RuleSet:
    def __init__(self, rules: Sequence[Rule], max_targets: int = MAX_TARGETS_PER_RECORD) -> None:
        self.rules = list(rules)
        self.max_targets = max_targets
        self._declarative = [r for r in self.rules if isinstance(r, DeclarativeRule)]
        # Plans are remembered only when every rule says what it reads (none is a plug-in).
        self._remembers = len(self._declarative) == len(self.rules)
        self._reads_for: dict[tuple[str, str | None], Reads] = {}

    @property
    def reads(self) -> Reads | None:
        """The event paths every rule's outcome depends on besides the topic and type: events
        alike in these get the same plan. None when a plug-in rule reads what it likes."""
        return _union(self._declarative) if self._remembers else None

    def reads_for(self, topic: str, type_: str | None) -> Reads | None:
        """``reads`` for an event of this topic and type: only what the rules that can match it
        read. A page view no rule matches then has one plan, whatever its fields (with every
        rule's paths, each article viewed had a plan of its own). None with a plug-in rule."""
        if not self._remembers:
            return None
        key = (topic, type_)
        reads = self._reads_for.get(key)
        if reads is None:
            if len(self._reads_for) >= READERS_KEPT:
                self._reads_for.clear()
            rules = [r for r in self._declarative if r.may_fire(topic, type_)]
            reads = self._reads_for[key] = _union(rules)
        return reads

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
