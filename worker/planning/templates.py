"""Target templates: ``"https://{data.host}/{data.locales[]}/{data.slug}"``.

A placeholder is a dotted path, optionally followed by filters: ``{data.title|slug}``.
Roots: ``match.NAME`` (a named regex capture of the rule), ``kafka.topic|key|partition|offset`` and
``kafka.headers.NAME``, else a path into the event body. ``name[]`` fans out over a list;
several fan-outs in one template give every combination. ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from worker.errors import InvalidEvent
from worker.events import Event

MAX_FANOUT = 1000
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_SEGMENT = re.compile(r"^([A-Za-z0-9_$@-]+)(\[\]|\[\d+\])?$")
_SLUG_RE = re.compile(r"[^a-z0-9]+")

FILTERS: dict[str, Callable[[str], str]] = {
    "lower": str.lower,
    "upper": str.upper,
    "slug": lambda s: _SLUG_RE.sub("-", s.lower()).strip("-"),
    "urlencode": lambda s: quote(s, safe=""),
    "strip_slash": lambda s: s.strip("/"),
}


class TemplateError(ValueError):
    """A template that cannot be compiled; the message says which part is wrong."""


@dataclass(frozen=True)
class _Ref:
    text: str
    segments: tuple[tuple[str, str | None], ...]  # (name, "[]" | "[3]" | None)
    filters: tuple[Callable[[str], str], ...]

    @property
    def root(self) -> str:
        return self.segments[0][0]

    @property
    def source_path(self) -> tuple[str, ...] | None:
        """The path of the value this reads: up to its first fan-out or index, since what
        follows is read from every element of that list (None for a regex capture, which is
        an input of its own)."""
        if self.root == "match":
            return None
        names = []
        for name, index in self.segments:
            names.append(name)
            if index:
                break
        return tuple(names)

    @functools.cached_property
    def plain(self) -> tuple[str, ...] | None:
        """The names of a path into the event body without fan-out, index or filter."""
        if self.filters or self.root in ("match", "kafka") or any(i for _, i in self.segments):
            return None
        return tuple(name for name, _ in self.segments)


class Template:
    def __init__(self, source: str, captures: frozenset[str]) -> None:
        if not isinstance(source, str):
            raise TemplateError(f"template must be a string, got {type(source).__name__}")
        self.source = source
        self._parts: list[str | _Ref] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(source):
            self._parts.append(source[pos : m.start()])
            pos = m.end()
            if m.group(0) in ("{{", "}}"):
                self._parts.append(m.group(0)[0])
                continue
            self._parts.append(_compile_ref(m.group(1), captures))
        rest = source[pos:]
        if "{" in rest or "}" in rest:
            raise TemplateError(
                f"unbalanced brace in {source!r} (write {{{{ or }}}} for a literal)"
            )
        self._parts.append(rest)

    @property
    def literal_prefix(self) -> str:
        """The text before the first placeholder (all of it when there is none)."""
        return "".join(itertools.takewhile(lambda p: isinstance(p, str), self._parts))  # type: ignore[arg-type]

    @property
    def inputs(self) -> list[tuple[str, ...]]:
        """The paths of every value this template reads from an event (besides captures)."""
        paths = [p.source_path for p in self._parts if isinstance(p, _Ref)]
        return [p for p in paths if p is not None]

    def render(self, event: Event, captures: dict[str, str]) -> list[str]:
        """Every string this template yields for the event. Raises ``InvalidEvent``."""
        choices: list[list[str]] = []
        total = 1
        for part in self._parts:
            values = [part] if isinstance(part, str) else _resolve(part, event, captures)
            total *= len(values)
            choices.append(values)
        if total > MAX_FANOUT:
            raise InvalidEvent(
                f"template {self.source!r} fans out to {total} values (max {MAX_FANOUT})"
            )
        if total == 1:  # the common case: no fan-out
            return ["".join(values[0] for values in choices)]
        return ["".join(combo) for combo in itertools.product(*choices)]


def _compile_ref(text: str, captures: frozenset[str]) -> _Ref:
    path, *filter_names = (p.strip() for p in text.split("|"))
    if not path:
        raise TemplateError(f"empty placeholder {{{text}}}")
    segments: list[tuple[str, str | None]] = []
    for seg in path.split("."):
        m = _SEGMENT.match(seg)
        if not m:
            raise TemplateError(f"bad path segment {seg!r} in {{{text}}}")
        segments.append((m.group(1), m.group(2)))
    filters = []
    for name in filter_names:
        if name not in FILTERS:
            raise TemplateError(
                f"unknown filter {name!r} in {{{text}}}; known: {', '.join(FILTERS)}"
            )
        filters.append(FILTERS[name])
    ref = _Ref(text, tuple(segments), tuple(filters))
    if ref.root == "match" and (len(segments) != 2 or segments[1][0] not in captures):
        known = ", ".join(sorted(captures)) or "none"
        raise TemplateError(f"{{{text}}} names no capture of this rule (captures: {known})")
    if ref.root == "kafka":
        allowed = {"topic", "key", "partition", "offset", "headers"}
        if len(segments) < 2 or segments[1][0] not in allowed:
            raise TemplateError(
                f"{{{text}}}: kafka.* is topic, key, partition, offset or headers.NAME"
            )
    return ref


def _resolve(ref: _Ref, event: Event, captures: dict[str, str]) -> list[str]:
    if ref.plain is not None:
        # The common case, a plain path into the body: one walk, no lists.
        value: Any = event.body
        for name in ref.plain:
            value = value.get(name) if isinstance(value, dict) else None
        if type(value) is str:
            return [value]
        return [_scalar(value, ref.text)]
    if ref.root == "match":
        values: list[Any] = [captures.get(ref.segments[1][0])]
        rest: tuple[tuple[str, str | None], ...] = ()
    elif ref.root == "kafka":
        values, rest = [_kafka_meta(event)], ref.segments[1:]
    else:
        values, rest = [event.body], ref.segments
    for name, index in rest:
        nxt: list[Any] = []
        for v in values:
            child = v.get(name) if isinstance(v, dict) else None
            if index == "[]":
                if not isinstance(child, list):
                    raise InvalidEvent(f"{{{ref.text}}}: {name} is not a list")
                nxt.extend(child)
            elif index:
                i = int(index[1:-1])
                nxt.append(child[i] if isinstance(child, list) and i < len(child) else None)
            else:
                nxt.append(child)
        values = nxt
    out = []
    for v in values:
        text = _scalar(v, ref.text)
        for f in ref.filters:
            text = f(text)
        out.append(text)
    return out


def _scalar(value: Any, ref: str) -> str:
    if value is None:
        raise InvalidEvent(f"field {{{ref}}} is missing")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        # JSON's NaN and Infinity would render as "nan" and "inf": a page no one meant.
        raise InvalidEvent(f"field {{{ref}}} is {value}, not a value to put in a target")
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list):
        raise InvalidEvent(f"field {{{ref}}} is a list: write it with [] to fan out")
    raise InvalidEvent(f"field {{{ref}}} is an object, not a value")


def _kafka_meta(event: Event) -> dict[str, Any]:
    """What ``kafka.*`` paths read: where the record came from."""
    return {
        "topic": event.topic,
        "key": event.key,
        "partition": event.partition,
        "offset": event.offset,
        "headers": event.headers,
    }


def lookup(event: Event, path: str) -> Any:
    """The raw value at a dotted path (``kafka.*`` included), or None; for rule matching."""
    return value_at(event, tuple(path.split(".")))


def value_at(event: Event, parts: tuple[str, ...]) -> Any:
    """The raw value at a path already split into its names, or None."""
    if parts[0] == "kafka":
        value: Any = _kafka_meta(event)
        parts = parts[1:]
    else:
        value = event.body
    for p in parts:
        value = value.get(p) if isinstance(value, dict) else None
    return value


def values_at(event: Event, paths: tuple[tuple[str, ...], ...]) -> tuple[Hashable, ...]:
    """The values at ``paths``, frozen: a cache key for what depends on exactly these."""
    # Once per record read, for every path the rules read: the walk and the common cases of
    # ``freeze`` are written out here (calls per path were most of a warm plan's key).
    body = event.body
    out: list[Hashable] = []
    for path in paths:
        if path[0] == "kafka":
            value: Any = value_at(event, path)
        else:
            value = body
            for p in path:
                value = value.get(p) if isinstance(value, dict) else None  # as ``value_at``
        out.append(value if type(value) is str else freeze(value))
    return tuple(out)


def freeze(value: Any) -> Hashable:
    """A hashable stand-in for a JSON value that tells ``1``, ``1.0``, ``True`` and ``"1"``
    apart (they render differently)."""
    if type(value) is str:
        return value
    if isinstance(value, list):
        return ("list", tuple([v if type(v) is str else freeze(v) for v in value]))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
    return (type(value), value)
