"""Turns the model's validation errors into one-line ``ConfigError``s: file, key, reason, and a
"did you mean" for a misspelt key."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from worker.errors import ConfigError

# Location parts pydantic adds for the member of a union it tried, not a key of the file.
_UNION_TAGS = {"str", "int", "float", "bool", "none"}


def _is_tag(part: object) -> bool:
    return isinstance(part, str) and (
        part in _UNION_TAGS or "[" in part or part.startswith("function-")
    )


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if _is_tag(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class holding the key at ``loc`` (for the keys it knows)."""
    current: Any = model
    for part in loc[:-1]:
        if _is_tag(part):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        else:
            current = _element(current)
            if current is None:
                return None
        current = _unwrap(current)
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """``X | None`` and unions with one model in them: the model."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return tp


def _element(tp: Any) -> Any:
    """The element type of ``list[X]`` or the value type of ``dict[K, X]``."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is list and args:
        return _unwrap(args[0])
    if origin is dict and len(args) == 2:
        return _unwrap(args[1])
    return None


def _reason(error: Any, model: type[BaseModel]) -> str:
    kind, loc, ctx = error["type"], error["loc"], error.get("ctx") or {}
    value = error.get("input")
    got = f", got {value!r}" if not isinstance(value, dict | list) else ""
    if kind == "extra_forbidden":
        holder = _model_at(model, loc)
        known = sorted(holder.model_fields) if holder else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if hint:
            return f"unknown key (did you mean {hint[0]!r}?)"
        return f"unknown key; known keys: {', '.join(known)}" if known else "unknown key"
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}{got}".replace("'", "")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": ("at least", "ge"),
            "greater_than": ("more than", "gt"),
            "less_than_equal": ("at most", "le"),
            "less_than": ("less than", "lt"),
        }[kind]
        bound = ctx.get(words[1])
        shown = f"{bound:g}" if isinstance(bound, float) else bound
        return f"must be {words[0]} {shown}{got}"
    if kind == "finite_number":
        return f"must be a finite number{got}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length', 1)} entries"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} entries"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if any(_is_tag(p) for p in loc) and kind == "string_type":
        return f"must be a string or a list of strings{got}"
    typename = {
        "int_type": "an integer",
        "float_type": "a number",
        "bool_type": "true or false",
        "string_type": "a string",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "list_type": "a list",
    }.get(kind)
    if typename:
        return f"must be {typename}, got {_kind(value)}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}{got}"


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def from_validation_error(exc: ValidationError, source: str, model: type[BaseModel]) -> ConfigError:
    """The first error of ``exc`` as a ``ConfigError`` (the rest usually follow from it)."""
    errors = exc.errors(include_url=False)
    # Of a union's alternatives, the list form says most ("a list of strings").
    first = errors[0]
    return ConfigError(source, _key(first["loc"]) or "(top level)", _reason(first, model))
