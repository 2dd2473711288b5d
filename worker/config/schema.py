"""The config file's JSON Schema, generated from the model: for editors, for CI checks of config
files, and for the Helm chart, whose ``values.schema.json`` embeds the worker's sections."""

from __future__ import annotations

from typing import Any

from worker.config.model import ConfigFile


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every ``$ref`` by its definition, so each section stands alone."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            merged = {
                **defs[ref.removeprefix("#/$defs/")],
                **{k: v for k, v in node.items() if k != "$ref"},
            }
            return _inline(merged, defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def config_schema() -> dict[str, Any]:
    """The whole file's schema, self-contained (no ``$ref``)."""
    raw = ConfigFile.model_json_schema()
    schema: dict[str, Any] = _inline(raw, raw.get("$defs", {}))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def section_schema(name: str) -> dict[str, Any]:
    """One top-level section's schema (``coalesce``, ``delivery``, …). Raises ``KeyError``."""
    return config_schema()["properties"][name]  # type: ignore[no-any-return]
