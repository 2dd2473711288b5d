"""Shared helpers: configs for tests, CloudEvents, and reading the emulator's record."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import requests
import yaml

from tests.conftest import TOKEN, ZONE_A, ZONE_B
from worker.config.load import parse
from worker.config.settings import Config


def config_dict(api_url: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "kafka": {"topics": ["cms"], "group_id": "g", "dead_letter_topic": "dlq"},
        "cloudflare": {
            "base_url": api_url,
            "accounts": {"main": {"plan": "enterprise", "files_per_request": 30}},
            "zones": [
                {"name": "example.com", "id": ZONE_A, "hosts": ["example.com", "*.example.com"]},
                {"name": "cdn", "id": ZONE_B, "hosts": ["img.example-cdn.net"]},
            ],
        },
        "coalesce": {"window_seconds": 0.2},
        "delivery": {
            "retry": {
                "initial_backoff_seconds": 0.05,
                "max_backoff_seconds": 0.5,
                "budget_seconds": 30,
            }
        },
        "observability": {"metrics_port": None, "health_port": None},
        "rules": [
            {
                "name": "article",
                "match": {"type": ["article.published", "article.updated"]},
                "urls": [
                    "https://www.example.com/{data.locales[]}/{data.slug}",
                    {
                        "url": "https://m.example.com/{data.slug}",
                        "headers": {"CF-Device-Type": ["mobile", "tablet"]},
                    },
                ],
                "tags": ["article-{data.id}"],
                "zone": "example.com",
            },
            {
                "name": "section",
                "match": {"type": "section.changed"},
                "prefixes": ["www.example.com/{data.section}/"],
            },
            {"name": "site", "match": {"type": "site.rebuilt"}, "hosts": ["{data.host}"]},
            {
                "name": "image",
                "match": {"type": "image.updated"},
                "urls": ["https://{data.host}/{data.path}"],
            },
        ],
    }
    for key, value in over.items():
        section, _, sub = key.partition("__")
        if sub:
            cfg[section][sub] = value
        else:
            cfg[section] = value
    return cfg


def make_config(api_url: str, **over: Any) -> Config:
    return parse(config_dict(api_url, **over), "test-config.yaml", {"CLOUDFLARE_API_TOKEN": TOKEN})


def write_config(path, api_url: str, **over: Any) -> str:
    path.write_text(yaml.safe_dump(config_dict(api_url, **over)))
    return str(path)


def cloudevent(type_: str, data: dict[str, Any], id_: str = "e1") -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": id_,
            "source": "/cms",
            "type": type_,
            "time": "2026-11-27T10:00:00Z",
            "data": data,
        }
    ).encode()


def purges(emu) -> list[dict[str, Any]]:
    return requests.get(emu.url + "/__emulator/purges", timeout=5).json()


def items_of(recorded: list[dict[str, Any]], kind: str | None = None) -> list[Any]:
    """Every item of ``recorded`` purges (of ``kind``), a URL with headers as sorted JSON."""
    return [
        json.dumps(i, sort_keys=True) if isinstance(i, dict) else i
        for p in recorded
        if kind in (None, p["kind"])
        for i in p["items"]
    ]


def purged_items(emu, kind: str | None = None) -> list[Any]:
    return items_of(purges(emu), kind)


class MemoryApi:
    """The emulator's model of the API on the test's clock, answered in memory: the worker's
    client reaches it through a ``MockTransport``, no socket and no wall-clock wait. Close
    ``gate`` to hold every request until it opens again."""

    URL = "http://api.invalid/client/v4"

    def __init__(self, clock, plan: str = "pro", **kwargs: Any) -> None:
        from worker.cloudflare.transport import MockTransport
        from worker.emulator import api
        from worker.emulator.state import EmulatorState

        self.state = EmulatorState(
            {ZONE_A: "acc", ZONE_B: "acc"}, {"acc": plan}, token=TOKEN, clock=clock, **kwargs
        )
        self.gate = threading.Event()
        self.gate.set()
        inner = api.transport(self.state)

        def answer(request):
            self.gate.wait()
            return inner.handle(request)

        self.transport = MockTransport(answer)

    def purges(self) -> list[dict[str, Any]]:
        return self.state.snapshot()[0]

    def items(self, kind: str | None = None) -> list[Any]:
        return items_of(self.purges(), kind)

    def statuses(self) -> list[int]:
        return [r["status"] for r in self.state.snapshot()[1]]

    def fault(self, **spec: Any) -> None:
        status, _, _ = self.state.set_faults(spec)
        assert status == 200, spec


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
