"""Plug-in rules: ``plugin: "package.module:function"``, imported once at start-up, called with
the event and the rule's options."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from worker.config.model import MAX_TARGETS_PER_RECORD
from worker.errors import InvalidEvent, InvalidTarget, PermanentError
from worker.events import Event
from worker.planning.rules.mapping import StrictMapping
from worker.planning.rules.match import Match
from worker.planning.rules.outcome import (
    PartialTargets,
    RuleTarget,
    too_many,
)
from worker.targets import Kind, Mode, Target

PluginResult = Iterable[Target] | dict[str, Sequence[str]]


class PluginRule:
    """``plugin: "package.module:function"``; the function takes the event (and ``options``)."""

    def __init__(
        self,
        section: StrictMapping,
        search_path: str | None = None,
        max_targets: int = MAX_TARGETS_PER_RECORD,
    ) -> None:
        self.max_targets = max_targets
        self.name = section.get("name", str)
        ref = section.get("plugin", str)
        self.zone: str | None = section.get("zone", str, None)
        self.mode = Mode(section.choice("mode", ("purge", "invalidate"), "purge"))
        self._match = Match(section.section("match"))
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
            # A generator's body runs while its targets are taken: inside the guard too.
            targets = self._targets(self._fn(event, **self._options))
        except PermanentError:
            raise
        except (Exception, SystemExit, KeyboardInterrupt, GeneratorExit) as exc:  # noqa: BLE001
            # A plug-in's bug (even sys.exit() or a stray KeyboardInterrupt) dead-letters the
            # event; it never stops the worker or a command.
            raise InvalidEvent(
                f"plugin rule {self.name} raised {type(exc).__name__}: {exc}"
            ) from None
        return [RuleTarget(t, self.mode, self.name) for t in targets]

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


def _import(ref: str, section: StrictMapping, search_path: str | None) -> Callable[..., Any]:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise section.error("plugin", f"{ref!r} must look like 'package.module:function'")
    if search_path:
        _plugins_next_to(search_path, module_name.split(".")[0], section)
    if module_name.split(".")[0] in sys.stdlib_module_names:
        # A rule is the user's own code. A callable of the standard library (os:system,
        # sys:exit, subprocess:run) is never one, and would run with the event as argument.
        raise section.error(
            "plugin",
            f"{ref!r} is from the standard library; a plug-in must be a function of your own",
        )
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


def _plugins_next_to(search_path: str, top: str, section: StrictMapping) -> None:
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
