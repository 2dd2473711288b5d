"""Matching an event: topic, type and field values, each a value, a list of values, a regex
(whose named groups become captures) or a presence test."""

from __future__ import annotations

import re
from typing import Any

import re2

from worker.events import Event
from worker.planning.rules.mapping import StrictMapping
from worker.planning.templates import lookup

# RE2's own defaults (Perl-like syntax, UTF-8), without its log line on stderr for a bad pattern:
# the config error says it, once.
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False


class Matcher:
    def __init__(self, spec: Any, where: StrictMapping, key: str) -> None:
        self.values: tuple[Any, ...] | None = None
        # RE2 (google-re2): matching time linear in the field's length, whatever the pattern.
        self.regex: Any = None
        self.exists: bool | None = None
        if isinstance(spec, dict):
            sub = StrictMapping(spec, where.key(key), where.source)
            if sub.has("regex"):
                self.regex = _compile(sub.get("regex", str), sub)
            if sub.has("exists"):
                self.exists = sub.get("exists", bool)
            if sub.has("in"):
                values = sub.raw("in")
                if not isinstance(values, list):
                    raise sub.error("in", "must be a list of values")
                self.values = _scalars(values, sub, "in")
            sub.done()
            if self.regex is None and self.exists is None and self.values is None:
                raise where.error(key, "a matcher mapping needs regex, in or exists")
        elif isinstance(spec, list):
            self.values = _scalars(spec, where, key)
        else:
            self.values = _scalars([spec], where, key)
        # A string compares equal to an expected value when their texts are equal (see _equal):
        # one set look-up instead of a loop, for the common case of string fields.
        self._texts = frozenset(str(v) for v in self.values or ())

    @property
    def captures(self) -> frozenset[str]:
        return frozenset(self.regex.groupindex) if self.regex else frozenset()

    def test(self, value: Any, captures: dict[str, str]) -> bool:
        if self.exists is not None and (value is not None) != self.exists:
            return False
        if self.values is not None:
            if type(value) is str:
                if value not in self._texts:
                    return False
            elif not any(_equal(value, v) for v in self.values):
                return False
        if self.regex is not None:
            if value is None or isinstance(value, dict | list):
                return False
            try:
                m = self.regex.search(value if isinstance(value, str) else str(value))
            except UnicodeEncodeError:
                return False  # a lone surrogate: not text, so no pattern matches it
            if not m:
                return False
            captures.update({k: v for k, v in m.groupdict().items() if v is not None})
        return True


def _compile(pattern: str, where: StrictMapping) -> Any:
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        said = exc.args[0] if exc.args else ""
        said = said.decode("utf-8", "replace") if isinstance(said, bytes) else str(said)
        try:
            re.compile(pattern)
        except re.error as invalid:
            reason = f"invalid regular expression {pattern!r}: {invalid}"
        else:
            # Valid for a backtracking engine, which is what can run for ever on one event.
            reason = (
                f"regular expression {pattern!r} needs a backtracking engine (look-around or a "
                f"back-reference); rules run on a linear-time engine: {said}"
            )
        raise where.error("regex", reason) from None


def _scalars(values: list[Any], where: StrictMapping, key: str) -> tuple[Any, ...]:
    """Match values are texts, numbers, booleans or null: an event's field is compared with
    each. A list or mapping inside would never equal a field's value as intended (and YAML
    aliases can make one astronomically large)."""
    for value in values:
        if value is not None and not isinstance(value, str | int | float | bool):
            raise where.error(
                key,
                f"a match value must be a text, number, boolean or null, not a "
                f"{'list' if isinstance(value, list) else type(value).__name__}",
            )
    return tuple(values)


def _equal(actual: Any, expected: Any) -> bool:
    if actual == expected and type(actual) is type(expected):
        return True
    # YAML reads `id: 42` as an int while JSON may carry "42": compare their text.
    return (
        actual is not None and not isinstance(actual, dict | list) and str(actual) == str(expected)
    )


class Match:
    def __init__(self, section: StrictMapping) -> None:
        self.topic = (
            Matcher(section.raw("topic"), section, "topic") if section.has("topic") else None
        )
        self.type = Matcher(section.raw("type"), section, "type") if section.has("type") else None
        fields = section.section("fields")
        self.fields = [
            (path, Matcher(fields.raw(path), fields, path)) for path in list(fields.data)
        ]
        fields.done()
        section.done()

    def _topic_and_type(self, topic: str, type_: str | None, captures: dict[str, str]) -> bool:
        return (self.topic is None or self.topic.test(topic, captures)) and (
            self.type is None or self.type.test(type_, captures)
        )

    @property
    def captures(self) -> frozenset[str]:
        names: set[str] = set()
        for m in (self.topic, self.type, *(m for _, m in self.fields)):
            if m is not None:
                names |= m.captures
        return frozenset(names)

    def may_match(self, topic: str, type_: str | None) -> bool:
        """Whether an event of this topic and type can match, whatever its fields."""
        return self._topic_and_type(topic, type_, {})

    def test(self, event: Event) -> dict[str, str] | None:
        captures: dict[str, str] = {}
        if not self._topic_and_type(event.topic, event.type, captures):
            return None
        for path, matcher in self.fields:
            if not matcher.test(lookup(event, path), captures):
                return None
        return captures
