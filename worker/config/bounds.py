"""What a config may hold, whatever YAML's aliases make of it: a file of a few hundred bytes can
otherwise expand to billions of values, and one rule to a list far beyond what a record may purge
(README, "Configuration")."""

from __future__ import annotations

from typing import Any

from worker.errors import ConfigError

MAX_FILE_BYTES = 4 * 2**20
MAX_STRING = 65_536
MAX_LIST = 100_000
MAX_VALUES = 1_000_000


def bounded(data: Any, source: str) -> None:
    """Raise ``ConfigError`` naming the key where ``data`` holds a string or a list over its
    cap, refers to itself, or expands to more than ``MAX_VALUES`` values. Each distinct node is
    visited once (aliases share theirs), so the check is as fast as the file is small."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: Any, key: str) -> int:
        if isinstance(node, str):
            if len(node) > MAX_STRING:
                raise ConfigError(
                    source, key, f"a text of {len(node)} characters (max {MAX_STRING})"
                )
            return 1
        if not isinstance(node, dict | list):
            return 1
        ident = id(node)
        known = sizes.get(ident)
        if known is not None:
            return known
        if ident in visiting:
            raise ConfigError(source, key, "refers to itself (a YAML alias inside its anchor)")
        if isinstance(node, list) and len(node) > MAX_LIST:
            raise ConfigError(source, key, f"a list of {len(node)} items (max {MAX_LIST})")
        visiting.add(ident)
        total = 1
        children = node.items() if isinstance(node, dict) else enumerate(node)
        for name, child in children:
            sub = (
                f"{key}[{name}]"
                if isinstance(node, list)
                else f"{key}.{name}"
                if key
                else str(name)
            )
            total += size(child, sub)
            if total > MAX_VALUES:
                raise ConfigError(
                    source,
                    key or "(top)",
                    f"expands to more than {MAX_VALUES:,} values (YAML aliases repeated?)",
                )
        visiting.discard(ident)
        sizes[ident] = total
        return total

    try:
        size(data, "")
    except RecursionError:
        raise ConfigError(source, "", "nested too deeply") from None
