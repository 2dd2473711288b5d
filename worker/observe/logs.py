"""structlog set-up: JSON lines in production, readable lines in a terminal, secrets redacted.

Redaction works on values, not key names: every known secret (API tokens and keys, SASL
passwords) is replaced wherever it appears in any string of any log line, including exception text.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "***"
_HANDLER_NAME = "purge-worker"
# One of kafka-python's warnings said again within this long is held back (``_Repeats``),
# remembering at most this many different ones (lines that differ each time: start over).
REPEAT_EVERY = 60.0
REPEATS_KEPT = 1000
_secrets: list[str] = []


def register_secrets(values: Iterable[str]) -> None:
    """Add values that must never be logged (anything shorter than 4 characters is ignored)."""
    for v in values:
        if v and len(v) >= 4 and v not in _secrets:
            _secrets.append(v)
    _secrets.sort(key=len, reverse=True)


def redact_text(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact(value: Any) -> Any:
    """``value`` (text, or JSON-like data) with every known secret replaced."""
    return _redact(value) if _secrets else value


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


def redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact(value)
    return event_dict


class _Stderr:
    """Whatever ``sys.stderr`` is at write time (test runners and daemons replace it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """``fmt``: json, console, or auto (console when the stream is a terminal)."""
    out: Any = stream or _Stderr()
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(out, renderer, level)


def _client_errors_in_one_line(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """kafka-python logs what it retries with whole tracebacks: one line says as much (the
    worker's own errors name the cause)."""
    exc_info = event_dict.get("exc_info")
    if str(event_dict.get("logger", "")).startswith("kafka") and exc_info:
        exc = exc_info[1] if isinstance(exc_info, tuple) else None
        event_dict.pop("exc_info")
        if isinstance(exc, BaseException):
            event_dict["error"] = f"{type(exc).__name__}: {exc}"
    return event_dict


def _route_stdlib(out: Any, renderer: Any, level: str) -> None:
    """Send the standard library's log records (kafka-python's among them) through the same
    redaction and rendering: one format on stderr, and no secret escapes by another path."""
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.stdlib.ExtraAdder(allow=["held_back"]),
                _client_errors_in_one_line,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_processor,
                renderer,
            ],
        )
    )
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_Repeats())
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(level.upper())
    # kafka-python narrates every connection at INFO and every protocol frame at DEBUG (a flood
    # that slows the worker); its warnings and errors are what an operator needs.
    logging.getLogger("kafka").setLevel(logging.WARNING)


class _Repeats(logging.Filter):
    """kafka-python logs a warning each time it tries again: with Write on the budget topic
    taken away mid-run, its producer said "Failed to produce messages" four times a second
    (121 lines in 30 s). The first of a kind goes through; the same line again (same logger and
    text) goes through once every ``REPEAT_EVERY`` seconds, saying how many were held back
    (``held_back``)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # when let by, held
        self._lock = threading.Lock()  # kafka-python logs from its own threads

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith("kafka"):
            return True
        try:
            key = (record.name, record.getMessage())  # as it reads: arguments' reprs differ
        except Exception:  # noqa: BLE001 - a bad format is the formatter's to report, not ours
            return True
        with self._lock:
            let_by, held = self._seen.get(key, (-math.inf, 0))
            if record.created - let_by < REPEAT_EVERY:
                self._seen[key] = (let_by, held + 1)
                return False
            if len(self._seen) >= REPEATS_KEPT:
                self._seen.clear()
            self._seen[key] = (record.created, 0)
        if held:
            record.held_back = held
        return True
