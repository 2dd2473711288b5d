"""An example plug-in rule: gallery pages are paginated, 20 images a page."""

from __future__ import annotations

from collections.abc import Iterator

from worker.events import Event
from worker.targets import Target

PAGE_SIZE = 20


def gallery_urls(event: Event, base: str) -> Iterator[Target]:
    # A generator: the worker takes targets one at a time and stops at
    # delivery.max_targets_per_record, so a bad image_count costs a dead letter, not the worker.
    data = event.body.get("data", {})
    yield Target.tag(f"gallery-{data['id']}", zone="example.com")
    pages = max(1, -(-int(data.get("image_count", 0)) // PAGE_SIZE))
    slug = data["slug"]
    yield Target.url(f"{base}/galleries/{slug}")
    for n in range(2, pages + 1):
        yield Target.url(f"{base}/galleries/{slug}?page={n}")
