"""One plan for every command: what ``explain`` prints is exactly what ``run`` sends."""

import json
from pathlib import Path

import pytest
import requests

from tests.conftest import TOKEN
from worker.clock import SystemClock
from worker.commands.explain import explain
from worker.config import load
from worker.events import Record
from worker.pipeline import Pipeline
from worker.testing import InMemorySink, InMemorySource
from worker.wiring import Accounts

ROOT = Path(__file__).resolve().parent.parent
EVENTS = sorted((ROOT / "examples" / "events").glob("*.json"))
EXAMPLE_ZONES = {
    "023e105f4ecef8ad9ca31a8372d0c353": "acc",
    "9a7806061c88ada191ed06f989cc3dac": "acc",
}


def _canon(kind, mode, zone_id, items):
    return (
        zone_id,
        kind,
        mode,
        tuple(sorted(json.dumps(i, sort_keys=True) for i in items)),
    )


@pytest.mark.parametrize("event_file", EVENTS, ids=lambda p: p.stem)
def test_explain_prints_exactly_what_run_sends(event_file, emulator_factory):
    emulator = emulator_factory(plan="enterprise", zones=EXAMPLE_ZONES)
    config = load(
        ROOT / "examples" / "config.yaml",
        env={"CLOUDFLARE_API_TOKEN": TOKEN, "CLOUDFLARE_BASE_URL": emulator.api_url},
    )
    record = Record(config.kafka.topics[0], 0, 0, b"k", event_file.read_bytes(), ())
    plan, code = explain(record, config)
    assert code == 0 and plan["purges"], plan

    source, sink = InMemorySource([record]), InMemorySink()
    clock = SystemClock()
    pipeline = Pipeline(config, source, sink, Accounts(config, clock), clock)
    for _ in range(400):
        pipeline.step()
        if pipeline.idle and source.positions[(record.topic, 0)] == 1:
            break
    pipeline.commit()
    sent = requests.get(emulator.url + "/__emulator/purges", timeout=5).json()
    endpoint_mode = {"purge_cache": "purge", "invalidate_cache": "invalidate"}
    assert sorted(
        _canon(p["kind"], endpoint_mode[p["endpoint"]], p["zone_id"], p["items"]) for p in sent
    ) == sorted(_canon(p["kind"], p["mode"], p["zone_id"], p["items"]) for p in plan["purges"])
    assert sink.records == [] and source.committed == {(record.topic, 0): 1}
