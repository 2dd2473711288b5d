"""Matching an event: topic, type and field values, each a value, a list of values, a regex
(whose named groups become captures) or a presence test."""

from __future__ import annotations

import re
from typing import Any

from worker.events import Event
from worker.planning.rules.mapping import StrictMapping
from worker.planning.templates import lookup


class Matcher:
    def __init__(self, spec: Any, where: StrictMapping, key: str) -> None:
        self.values: tuple[Any, ...] | None = None
        self.regex: re.Pattern[str] | None = None
        self.exists: bool | None = None
        if isinstance(spec, dict):
            sub = StrictMapping(spec, where.key(key), where.source)
            if sub.has("regex"):
                pattern = sub.get("regex", str)
                try:
                    self.regex = re.compile(pattern)
                except re.error as exc:
                    raise sub.error(
                        "regex", f"invalid regular expression {pattern!r}: {exc}"
                    ) from None
            if sub.has("exists"):
                self.exists = sub.get("exists", bool)
            if sub.has("in"):
                self.values = tuple(sub.raw("in"))
            sub.done()
            if self.regex is None and self.exists is None and self.values is None:
                raise where.error(key, "a matcher mapping needs regex, in or exists")
        elif isinstance(spec, list):
            self.values = tuple(spec)
        else:
            self.values = (spec,)
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
            m = self.regex.search(value if isinstance(value, str) else str(value))
            if not m:
                return False
            captures.update({k: v for k, v in m.groupdict().items() if v is not None})
        return True


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

    @property
    def captures(self) -> frozenset[str]:
        names: set[str] = set()
        for m in (self.topic, self.type, *(m for _, m in self.fields)):
            if m is not None:
                names |= m.captures
        return frozenset(names)

    def test(self, event: Event) -> dict[str, str] | None:
        captures: dict[str, str] = {}
        if self.topic and not self.topic.test(event.topic, captures):
            return None
        if self.type and not self.type.test(event.type, captures):
            return None
        for path, matcher in self.fields:
            if not matcher.test(lookup(event, path), captures):
                return None
        return captures
