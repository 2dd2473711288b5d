"""A new kafka-python client's first questions about its topics, asked at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# The client's back-off between two metadata requests while a new client asks for its topics'.
PROMPT_BACKOFF_MS = 10


@contextlib.contextmanager
def prompt_metadata(cluster: Any) -> Iterator[None]:
    """Within: the client asks for topics' metadata at once. kafka-python 3.0.12 waits its
    ``retry_backoff_ms`` (100 ms, not taken from the client's settings) after the bootstrap's
    own metadata before it asks again: a tenth of a second of a new client's first question
    about a topic (the consumer's subscription, the receipts feed's restore) spent waiting.
    Outside, the back-off is as it was, so a cluster in trouble is not asked more often."""
    settings = getattr(cluster, "config", None)
    if not isinstance(settings, dict) or not isinstance(
        backoff := settings.get("retry_backoff_ms"), int
    ):
        yield
        return
    settings["retry_backoff_ms"] = min(backoff, PROMPT_BACKOFF_MS)
    try:
        yield
    finally:
        settings["retry_backoff_ms"] = backoff


def partitions_of(consumer: Any, topic: str) -> set[int]:
    """``topic``'s partitions (empty: no such topic, or not visible), asked at once
    (``prompt_metadata``)."""
    with prompt_metadata(getattr(consumer, "_cluster", None)):
        parts: set[int] | None = consumer.partitions_for_topic(topic)
    return parts or set()
