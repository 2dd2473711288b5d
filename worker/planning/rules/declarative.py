"""Declarative rules: a match, then target templates rendered from the event (with cache-key
headers, warming, a zone for tags)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.config.model import MAX_TARGETS_PER_RECORD
from worker.errors import InvalidEvent, InvalidTarget, PermanentError
from worker.events import Event
from worker.planning.memo import Memo
from worker.planning.rules.mapping import StrictMapping
from worker.planning.rules.match import Match
from worker.planning.rules.outcome import (
    PURGE,
    PURGE_AND_WARM,
    WARM_ONLY,
    PartialTargets,
    RuleTarget,
    TooManyTargets,
    too_many,
)
from worker.planning.templates import Template, TemplateError, values_at
from worker.targets import Mode, Target, normalize_host

# Distinct inputs one rule remembers the targets of, and the targets it holds in all; past either,
# it starts over. The planner remembers whole plans in front of this (unless a plug-in rule is in
# the set), so it is small.
RENDER_CACHE_SIZE = 5_000
RENDER_CACHE_TARGETS = 20_000


@dataclass(frozen=True)
class _UrlTemplate:
    url: Template
    headers: tuple[tuple[str, tuple[Template, ...]], ...]
    # The authority (host, and port if any) the template spells out, if it does: what the
    # event renders must keep it exactly.
    host: str | None = None


def _check_scheme(template: Template, section: StrictMapping, key: str) -> None:
    """A URL template that spells its scheme must spell http or https: anything else could only
    ever dead-letter every event the rule matches."""
    text = template.literal_prefix.lower()
    if any(s.startswith(text) or text.startswith(s) for s in ("http://", "https://")):
        return
    raise section.error(
        key, f"URL template {template.source!r} must start with http:// or https:// (or {{…}})"
    )


def literal_host(template: Template) -> str | None:
    """The authority a URL template names literally: ``https://www.example.com{…}`` names
    www.example.com, and owns it: event data may add a path, never a port or another host.
    None when the event's data supplies the host."""
    _, sep, rest = template.literal_prefix.partition("://")
    if not sep:
        return None
    authority = rest
    for stop in "/?#":
        authority = authority.split(stop, 1)[0]
    host, colon, port = authority.partition(":")
    if "." not in host or "@" in host:
        return None
    try:
        normalized = normalize_host(host)
    except InvalidTarget:
        return None
    return f"{normalized}:{port}" if colon and port.isdigit() else normalized


class DeclarativeRule:
    def __init__(
        self,
        section: StrictMapping,
        *,
        allow_everything: bool,
        max_targets: int = MAX_TARGETS_PER_RECORD,
    ) -> None:
        self.max_targets = max_targets
        self.name = section.get("name", str)
        self.zone: str | None = section.get("zone", str, None)
        self.mode = Mode(section.choice("mode", ("purge", "invalidate"), "purge"))
        self._match = Match(section.section("match"))
        caps = self._match.captures
        self._urls = [self._url(item, section, caps) for item in self._list(section, "urls")]
        self._templates = {
            kind: [self._template(t, section, kind, caps) for t in self._list(section, kind)]
            for kind in ("tags", "hosts", "prefixes")
        }
        self._warm_all, self._warm = self._warming(section, caps)
        self.everything = section.get("everything", bool, False)
        if self.everything and not allow_everything:
            raise section.error(
                "everything", "purging everything is off; set delivery.allow_everything"
            )
        section.raw("description", None)
        section.done()
        # Every template makes at least one target: more templates than a record may purge
        # would dead-letter every event the rule matches.
        least = len(self._urls) + sum(len(ts) for ts in self._templates.values())
        if least > max_targets:
            counts = {"urls": len(self._urls), **{k: len(ts) for k, ts in self._templates.items()}}
            raise section.error(
                max(counts, key=lambda k: counts[k]),
                f"the rule makes at least {least} targets for each event it matches, over "
                f"delivery.max_targets_per_record ({max_targets})",
            )
        self.needs_zone = bool(self._templates["tags"]) or self.everything
        templates = [
            t for spec in (*self._urls, *self._warm) for t in (spec.url, *_header_templates(spec))
        ]
        templates += [t for ts in self._templates.values() for t in ts]
        self._inputs = tuple(dict.fromkeys(p for t in templates for p in t.inputs))
        # Everything the rule's outcome depends on besides topic and type: what it matches on
        # and what its templates read (captures come from matched values).
        self.reads: tuple[tuple[str, ...], ...] = tuple(
            dict.fromkeys(
                [*(tuple(path.split(".")) for path, _ in self._match.fields), *self._inputs]
            )
        )
        self._rendered: Memo[tuple[RuleTarget, ...]] = Memo(
            RENDER_CACHE_SIZE, RENDER_CACHE_TARGETS, lambda targets: 1 + len(targets)
        )
        if not (self._urls or any(self._templates.values()) or self.everything):
            raise section.error(
                "urls", "the rule produces no targets (urls, tags, hosts, prefixes or everything)"
            )

    @property
    def warms(self) -> bool:
        """Whether any URL of this rule is to be warmed after its purge."""
        return self._warm_all or bool(self._warm)

    def _warming(
        self, section: StrictMapping, caps: frozenset[str]
    ) -> tuple[bool, list[_UrlTemplate]]:
        """``warm: true`` (fetch the rule's URLs again once purged) or a list of URL templates
        to fetch (for rules that purge tags, hosts or prefixes)."""
        value = section.raw("warm", False)
        if isinstance(value, bool):
            if value and not self._urls:
                raise section.error(
                    "warm", "true warms the rule's urls, and it has none: list URLs to warm"
                )
            return value, []
        if not isinstance(value, list) or not value:
            raise section.error("warm", "must be true, false or a list of URL templates")
        return False, [self._url(item, section, caps, "warm") for item in value]

    @staticmethod
    def _list(section: StrictMapping, key: str) -> list[Any]:
        value = section.raw(key, [])
        if not isinstance(value, list):
            raise section.error(key, "must be a list")
        return value

    @staticmethod
    def _template(text: Any, section: StrictMapping, key: str, caps: frozenset[str]) -> Template:
        try:
            return Template(text, caps)
        except TemplateError as exc:
            raise section.error(key, str(exc)) from None

    def _url(
        self, item: Any, section: StrictMapping, caps: frozenset[str], key: str = "urls"
    ) -> _UrlTemplate:
        if isinstance(item, str):
            url = self._template(item, section, key, caps)
            _check_scheme(url, section, key)
            return _UrlTemplate(url, (), literal_host(url))
        sub = StrictMapping(item, section.key(key), section.source)
        url = self._template(sub.get("url", str), sub, "url", caps)
        _check_scheme(url, sub, "url")
        hdrs = sub.section("headers")
        headers = []
        for name in list(hdrs.data):
            values = hdrs.strings(name)
            headers.append((name, tuple(self._template(v, hdrs, name, caps) for v in values)))
        hdrs.done()
        sub.done()
        return _UrlTemplate(url, tuple(headers), literal_host(url))

    def may_fire(self, topic: str, type_: str | None) -> bool:
        """Whether an event of this topic and type can match the rule, whatever its fields."""
        return self._match.may_match(topic, type_)

    def evaluate(self, event: Event) -> list[RuleTarget] | None:
        captures = self._match.test(event)
        if captures is None:
            return None
        # What a rule renders depends only on its captures and the values its templates read,
        # and in a backlog the same article comes by again and again: render each once.
        key = (
            tuple(sorted(captures.items())),
            values_at(event, self._inputs),
        )
        cached = self._rendered.get(key)
        if cached is None:
            cached = tuple(self._render(event, captures))
            self._rendered.put(key, cached)
        return list(cached)

    def _render(self, event: Event, captures: dict[str, str]) -> list[RuleTarget]:
        """Every target the templates make. Raises ``PartialTargets`` when some template or
        target failed (a missing field, a bad target), with the targets that did not: such
        results are not cached, so every record that has them is dead-lettered."""
        out: list[RuleTarget] = []
        bad: list[PermanentError] = []
        warm = PURGE_AND_WARM if self._warm_all else PURGE
        for specs, how in ((self._urls, warm), (self._warm, WARM_ONLY)):
            for spec in specs:
                try:
                    urls = spec.url.render(event, captures)
                    combos = _header_combos(spec.headers, event, captures, self.max_targets)
                except TooManyTargets:
                    raise
                except PermanentError as exc:
                    bad.append(exc)
                    continue
                if len(out) + len(urls) * len(combos) > self.max_targets:
                    raise too_many(f"rule {self.name}", self.max_targets)
                for url in urls:
                    for headers in combos:
                        try:
                            out.append(self._url_target(spec, url, headers, how))
                        except InvalidTarget as exc:
                            bad.append(exc)
        makers: dict[str, Callable[[str], Target]] = {
            "tags": lambda v: Target.tag(v, self.zone),
            "hosts": Target.host,
            "prefixes": Target.prefix,
        }
        for kind, make in makers.items():
            for template in self._templates[kind]:
                try:
                    values = template.render(event, captures)
                except PermanentError as exc:
                    bad.append(exc)
                    continue
                for value in values:
                    try:
                        out.append(self._target(make, value))
                    except InvalidTarget as exc:
                        bad.append(exc)
        if self.everything:
            if not self.zone:
                bad.append(InvalidEvent("everything needs the rule's zone"))
            else:
                out.append(RuleTarget(Target.everything(self.zone), self.mode, self.name))
        if bad:
            raise PartialTargets(out, bad)
        return out

    def _url_target(
        self, spec: _UrlTemplate, url: str, headers: dict[str, str] | None, how: int
    ) -> RuleTarget:
        made = RuleTarget(Target.url(url, headers), self.mode, self.name, how)
        authority = made.target.value.split("://", 1)[1].split("/", 1)[0]
        if spec.host is not None and authority != spec.host:
            raise InvalidTarget(
                f"URL {url!r} from template {spec.url.source!r}: the event's data "
                f"changed the host from {spec.host} to {authority}"
            )
        return made

    def _target(self, make: Callable[..., Target], *args: Any) -> RuleTarget:
        return RuleTarget(make(*args), self.mode, self.name)


def _header_templates(spec: _UrlTemplate) -> list[Template]:
    return [t for _, templates in spec.headers for t in templates]


def _header_combos(
    headers: tuple[tuple[str, tuple[Template, ...]], ...],
    event: Event,
    captures: dict[str, str],
    cap: int,
) -> list[dict[str, str] | None]:
    combos: list[dict[str, str]] = [{}]
    for name, templates in headers:
        values = [v for t in templates for v in t.render(event, captures)]
        if len(combos) * len(values) > cap:
            raise too_many(f"cache-key header {name}", cap)
        combos = [{**c, name: v} for c in combos for v in values]
    return [c or None for c in combos]
