"""An example plug-in rule: gallery pages are paginated, 20 images a page."""

from __future__ import annotations

from worker.events import Event
from worker.targets import Target

PAGE_SIZE = 20


def gallery_urls(event: Event, base: str) -> list[Target]:
    data = event.body.get("data", {})
    pages = max(1, -(-int(data.get("image_count", 0)) // PAGE_SIZE))
    slug = data["slug"]
    targets = [Target.url(f"{base}/galleries/{slug}")]
    targets += [Target.url(f"{base}/galleries/{slug}?page={n}") for n in range(2, pages + 1)]
    targets.append(Target.tag(f"gallery-{data['id']}", zone="example.com"))
    return targets
