"""Strict reading of a rule's YAML mapping, key by key: unknown keys and wrong types are errors
naming the file and the key. (The rest of the file is checked by the config model; a rule's
language is richer than a schema.)"""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

from worker.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


class StrictMapping:
    """A mapping read key by key; ``done()`` rejects whatever keys were not read."""

    def __init__(self, data: Any, path: str, source: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                source, path or "(top level)", f"must be a mapping, got {_kind(data)}"
            )
        self.data: dict[str, Any] = data
        self.path = path
        self.source = source
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self._read.add(name)
        if name not in self.data:
            if default is _MISSING:
                raise self.error(name, "is required")
            return default
        return self.data[name]

    def get(self, name: str, typ: type[T], default: Any = _MISSING) -> T:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value  # type: ignore[no-any-return]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise self.error(name, f"must be {typ.__name__}, got {_kind(value)}")
        return value

    def number(
        self, name: str, default: float, *, minimum: float = 0.0, maximum: float | None = None
    ) -> float:
        value = self.get(name, float, default)
        if value < minimum or (maximum is not None and value > maximum):
            top = f" and at most {maximum}" if maximum is not None else ""
            raise self.error(name, f"must be at least {minimum}{top}, got {value}")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self.get(name, int, default)
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def strings(self, name: str, default: Any = _MISSING) -> tuple[str, ...]:
        value = self.raw(name, default)
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"must be a string or a list of strings, got {_kind(value)}")
        return tuple(value)

    def section(self, name: str) -> StrictMapping:
        return StrictMapping(self.raw(name, {}), self.key(name), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            name = unknown[0]
            hint = difflib.get_close_matches(str(name), sorted(self._read), n=1)
            more = (
                f" (did you mean {hint[0]!r}?)"
                if hint
                else f"; known keys: {', '.join(sorted(self._read))}"
            )
            raise self.error(str(name), f"unknown key{more}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
