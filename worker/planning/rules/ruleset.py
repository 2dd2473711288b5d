"""Mapping rules: an event in, purge targets out.

Declarative rules (from YAML) match on topic, event type and field values, then render target
templates; plug-in rules name a Python function. Rules are compiled once at start-up, and every
mistake that can be found then (unknown keys, bad regexes, captures that do not exist, a plug-in
that does not import) is a ``ConfigError`` naming the file, the rule and the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import re
import sys
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from worker.errors import ConfigError, InvalidEvent, InvalidTarget, PermanentError
from worker.events import Event
from worker.planning.rules.mapping import Section
from worker.planning.templates import Template, TemplateError, lookup, values_at
from worker.targets import Kind, Mode, Target, normalize_host

# Distinct inputs one rule remembers the targets of; past it, it starts over. The planner
# remembers whole plans in front of this (unless a plug-in rule is in the set), so it is small.
RENDER_CACHE_SIZE = 5_000
# Targets one record may produce (``delivery.max_targets_per_record``).
DEFAULT_MAX_TARGETS = 10_000


# What a rule asks of a target besides purging it (``RuleTarget.warm``).
PURGE, PURGE_AND_WARM, WARM_ONLY = 0, 1, 2


class RuleTarget(NamedTuple):
    target: Target
    mode: Mode
    rule: str
    # PURGE; PURGE_AND_WARM (``warm: true``); WARM_ONLY (a URL a rule's ``warm`` list names).
    warm: int = PURGE


@dataclass
class PurgePlan:
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


def _named(rule: str, exc: PermanentError) -> PermanentError:
    """``exc`` with the rule's name in front, for the dead-letter message."""
    if type(exc) in (InvalidTarget, InvalidEvent):
        return type(exc)(f"rule {rule}: {exc}")
    return exc


class Rule(Protocol):
    name: str
    # The zone its tags (and everything) go to; needed when several zones are configured and
    # the rule emits targets without a host of their own (``needs_zone``).
    zone: str | None
    needs_zone: bool

    def evaluate(self, event: Event) -> list[RuleTarget] | None:
        """Targets if the rule matches (maybe none), None if not. Raises PermanentError."""


# -- matching ------------------------------------------------------------------------------------


class _Matcher:
    def __init__(self, spec: Any, where: Section, key: str) -> None:
        self.values: tuple[Any, ...] | None = None
        self.regex: re.Pattern[str] | None = None
        self.exists: bool | None = None
        if isinstance(spec, dict):
            sub = Section(spec, where.key(key), where.source)
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


class _Match:
    def __init__(self, section: Section) -> None:
        self.topic = (
            _Matcher(section.raw("topic"), section, "topic") if section.has("topic") else None
        )
        self.type = _Matcher(section.raw("type"), section, "type") if section.has("type") else None
        fields = section.section("fields")
        self.fields = [
            (path, _Matcher(fields.raw(path), fields, path)) for path in list(fields.data)
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


# -- declarative rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _UrlTemplate:
    url: Template
    headers: tuple[tuple[str, tuple[Template, ...]], ...]
    # The host the template spells out, if it does: what the event renders must keep it.
    host: str | None = None


def _check_scheme(template: Template, section: Section, key: str) -> None:
    """A URL template that spells its scheme must spell http or https: anything else could only
    ever dead-letter every event the rule matches."""
    text = template.literal_prefix.lower()
    if any(s.startswith(text) or text.startswith(s) for s in ("http://", "https://")):
        return
    raise section.error(
        key, f"URL template {template.source!r} must start with http:// or https:// (or {{…}})"
    )


def literal_host(template: Template) -> str | None:
    """The host a URL template names literally (``https://www.example.com{…}`` names
    www.example.com), or None when the event's data supplies the host."""
    _, sep, rest = template.literal_prefix.partition("://")
    if not sep:
        return None
    authority = rest
    for stop in "/?#":
        authority = authority.split(stop, 1)[0]
    host = authority.split(":", 1)[0]
    if "." not in host or "@" in host:
        return None
    try:
        return normalize_host(host)
    except InvalidTarget:
        return None


class DeclarativeRule:
    def __init__(
        self,
        section: Section,
        *,
        allow_everything: bool,
        max_targets: int = DEFAULT_MAX_TARGETS,
    ) -> None:
        self.max_targets = max_targets
        self.name = section.get("name", str)
        self.zone: str | None = section.get("zone", str, None)
        self.mode = Mode(section.choice("mode", ("purge", "invalidate"), "purge"))
        self._match = _Match(section.section("match"))
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
        self._rendered: dict[Hashable, tuple[RuleTarget, ...]] = {}
        if not (self._urls or any(self._templates.values()) or self.everything):
            raise section.error(
                "urls", "the rule produces no targets (urls, tags, hosts, prefixes or everything)"
            )

    @property
    def warms(self) -> bool:
        """Whether any URL of this rule is to be warmed after its purge."""
        return self._warm_all or bool(self._warm)

    def _warming(self, section: Section, caps: frozenset[str]) -> tuple[bool, list[_UrlTemplate]]:
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
    def _list(section: Section, key: str) -> list[Any]:
        value = section.raw(key, [])
        if not isinstance(value, list):
            raise section.error(key, "must be a list")
        return value

    @staticmethod
    def _template(text: Any, section: Section, key: str, caps: frozenset[str]) -> Template:
        try:
            return Template(text, caps)
        except TemplateError as exc:
            raise section.error(key, str(exc)) from None

    def _url(
        self, item: Any, section: Section, caps: frozenset[str], key: str = "urls"
    ) -> _UrlTemplate:
        if isinstance(item, str):
            url = self._template(item, section, key, caps)
            _check_scheme(url, section, key)
            return _UrlTemplate(url, (), literal_host(url))
        sub = Section(item, section.key(key), section.source)
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
            if len(self._rendered) >= RENDER_CACHE_SIZE:
                self._rendered.clear()
            self._rendered[key] = cached
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
                            out.append(self._url_target(spec, url, headers)._replace(warm=how))
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
        self, spec: _UrlTemplate, url: str, headers: dict[str, str] | None
    ) -> RuleTarget:
        made = self._target(Target.url, url, headers)
        if spec.host is not None and made.target.hostname != spec.host:
            raise InvalidTarget(
                f"URL {url!r} from template {spec.url.source!r}: the event's data "
                f"changed the host from {spec.host} to {made.target.hostname}"
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


# -- plug-ins ------------------------------------------------------------------------------------

PluginResult = Iterable[Target] | dict[str, Sequence[str]]


class PluginRule:
    """``plugin: "package.module:function"``; the function takes the event (and ``options``)."""

    def __init__(
        self,
        section: Section,
        search_path: str | None = None,
        max_targets: int = DEFAULT_MAX_TARGETS,
    ) -> None:
        self.max_targets = max_targets
        self.name = section.get("name", str)
        ref = section.get("plugin", str)
        self.zone: str | None = section.get("zone", str, None)
        self.mode = Mode(section.choice("mode", ("purge", "invalidate"), "purge"))
        self._match = _Match(section.section("match"))
        self._options: dict[str, Any] = section.get("options", dict, {})
        section.raw("description", None)
        section.done()
        self._fn = _import(ref, section, search_path)
        # What a plug-in returns is only known per event: a tag without a zone is then an
        # unknown-zone failure for that event, not a config error.
        self.needs_zone = False
        try:
            inspect.signature(self._fn).bind(None, **self._options)
        except TypeError as exc:
            raise section.error("options", f"{ref} does not accept these options: {exc}") from None

    def evaluate(self, event: Event) -> list[RuleTarget] | None:
        if self._match.test(event) is None:
            return None
        try:
            result = self._fn(event, **self._options)
        except PermanentError:
            raise
        except Exception as exc:  # noqa: BLE001 (a plug-in bug dead-letters the event, never stops the worker)
            raise InvalidEvent(
                f"plugin rule {self.name} raised {type(exc).__name__}: {exc}"
            ) from None
        return [RuleTarget(t, self.mode, self.name) for t in self._targets(result)]

    def _targets(self, result: Any) -> list[Target]:
        """The plug-in's targets; ``PartialTargets`` names those it could not make."""
        if result is None:
            return []
        bad: list[PermanentError] = []
        if isinstance(result, dict):
            makers: dict[str, Callable[[str], Target]] = {
                "urls": Target.url,
                "tags": lambda v: Target.tag(v, self.zone),
                "hosts": Target.host,
                "prefixes": Target.prefix,
            }
            unknown = set(result) - set(makers)
            if unknown:
                raise InvalidEvent(
                    f"plugin rule {self.name} returned unknown keys {sorted(unknown)}"
                )
            made = (_made(makers[k], v, bad) for k, values in result.items() for v in values)
            targets = [t for t in self._capped(made) if t is not None]
        elif not isinstance(result, Iterable) or isinstance(result, str | bytes):
            raise InvalidEvent(
                f"plugin rule {self.name} returned {type(result).__name__}, "
                "not an iterable of Targets or a dict"
            )
        else:
            targets = []
            for t in self._capped(result):
                if not isinstance(t, Target):
                    bad.append(
                        InvalidEvent(
                            f"plugin rule {self.name} returned {type(t).__name__}, not a Target"
                        )
                    )
                elif t.kind is Kind.EVERYTHING:
                    bad.append(InvalidTarget(f"plugin rule {self.name} may not purge everything"))
                else:
                    targets.append(t)
        targets = [
            Target(t.kind, t.value, t.headers, t.zone or self.zone) if t.kind is Kind.TAGS else t
            for t in targets
        ]
        if bad:
            rts = [RuleTarget(t, self.mode, self.name) for t in targets]
            raise PartialTargets(rts, bad)
        return targets

    def _capped(self, items: Iterable[Any]) -> list[Any]:
        """At most ``max_targets`` items, taken one by one: a generator that would go on for
        ever is stopped at the cap, without building the rest."""
        out = list(itertools.islice(items, self.max_targets + 1))
        if len(out) > self.max_targets:
            raise too_many(f"plugin rule {self.name}", self.max_targets)
        return out


def _made(make: Callable[[str], Target], value: Any, bad: list[PermanentError]) -> Target | None:
    try:
        return make(value)
    except InvalidTarget as exc:
        bad.append(exc)
        return None


def _import(ref: str, section: Section, search_path: str | None) -> Callable[..., Any]:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise section.error("plugin", f"{ref!r} must look like 'package.module:function'")
    if search_path:
        _plugins_next_to(search_path, module_name.split(".")[0], section)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 (any import-time failure is the same config error)
        raise section.error(
            "plugin", f"cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise section.error("plugin", f"{module_name} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


def _plugins_next_to(search_path: str, top: str, section: Section) -> None:
    """Make modules next to the config importable without packaging them, *after* the standard
    library and installed packages: a file there named like one of those (a ``netrc.py``) must
    never replace it for the whole process. Such a clash is a config error naming the file."""
    if search_path not in sys.path:
        sys.path.append(search_path)
    here = Path(search_path)
    local = next((p for p in (here / f"{top}.py", here / top / "__init__.py") if p.is_file()), None)
    if local is None:
        return
    spec = importlib.util.find_spec(top)
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is not None and origin != local.resolve():
        raise section.error(
            "plugin",
            f"{local} has the name of the module {top!r} from {origin.parent}; "
            "rename the plug-in module",
        )


# -- the rule set --------------------------------------------------------------------------------


class RuleSet:
    def __init__(self, rules: Sequence[Rule], max_targets: int = DEFAULT_MAX_TARGETS) -> None:
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

    def evaluate(self, event: Event) -> PurgePlan:
        """Every matching rule's targets, united, and what failed on the way. Raises only
        ``TooManyTargets``: any other failure of one rule or target leaves the rest standing."""
        plan = PurgePlan()
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


def too_many(what: str, cap: int) -> InvalidTarget:
    return TooManyTargets(
        f"{what} produced more than {cap} targets for one record (delivery.max_targets_per_record)"
    )


def compile_rules(
    raw: Any,
    source: str,
    *,
    allow_everything: bool,
    plugin_path: str | None = None,
    taken: set[str] | None = None,
    max_targets: int = DEFAULT_MAX_TARGETS,
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
        section = Section(item, f"rules[{label}]", source)
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
