"""The client (and the purger above it) against the emulator over real HTTP."""

import socket

import pytest
import requests

from tests.conftest import TOKEN, ZONE_A
from worker.clock import MockClock, SystemClock
from worker.cloudflare.auth import Credentials, Secret
from worker.cloudflare.client import CacheSetting, CloudflareClient
from worker.cloudflare.ratelimit import AccountRateLimiter
from worker.cloudflare.retry import RetryPolicy
from worker.cloudflare.tiers import Tier, limits_for
from worker.errors import ApiRejected, ApiUnavailable, RateLimited, RetriesExhausted, TransportError
from worker.sending.purger import Destination, Purger
from worker.targets import Kind, Mode, Target


def client_for(emu, token=TOKEN):
    return CloudflareClient(Credentials(token=Secret(token)), base_url=emu.api_url)


def recorded(emu):
    return requests.get(emu.url + "/__emulator/purges", timeout=5).json()


def test_every_selector_and_both_endpoints(emulator):
    c = client_for(emulator)
    c.purge(
        ZONE_A,
        Kind.FILES,
        [
            Target.url("https://a.com/x").item(),
            Target.url("https://a.com/y", {"CF-IPCountry": "US"}).item(),
        ],
    )
    c.purge(ZONE_A, Kind.TAGS, ["a", "b"])
    c.purge(ZONE_A, Kind.HOSTS, ["a.com"])
    c.purge(ZONE_A, Kind.PREFIXES, ["a.com/p/"], Mode.INVALIDATE)
    accepted = c.purge(ZONE_A, Kind.EVERYTHING, [])
    assert len(accepted.id) == 32 and accepted.request_id
    got = recorded(emulator)
    assert [(p["kind"], p["endpoint"]) for p in got] == [
        ("files", "purge_cache"),
        ("tags", "purge_cache"),
        ("hosts", "purge_cache"),
        ("prefixes", "invalidate_cache"),
        ("everything", "purge_cache"),
    ]
    assert got[0]["items"][1] == {"url": "https://a.com/y", "headers": {"CF-IPCountry": "US"}}


def test_settings_are_typed(emulator):
    c = client_for(emulator)
    assert c.get_setting(ZONE_A, CacheSetting.CACHE_RESERVE).value == "off"
    assert c.edit_setting(ZONE_A, CacheSetting.REGIONAL_TIERED, "on").id == "tc_regional"
    assert c.edit_setting(ZONE_A, CacheSetting.SMART_TIERED, "on").value == "on"
    assert (
        c.delete_setting(ZONE_A, CacheSetting.SMART_TIERED).id
        == "tiered_cache_smart_topology_enable"
    )
    v = c.edit_setting(ZONE_A, CacheSetting.VARIANTS, {"png": ["image/webp"]})
    assert v.value == {"png": ["image/webp"]} and v.modified_on
    assert c.delete_setting(ZONE_A, CacheSetting.VARIANTS).id == "variants"
    assert c.cache_reserve_clear_start(ZONE_A).state == "In-progress"
    assert c.cache_reserve_clear_status(ZONE_A).start_ts
    assert c.verify_token() == "active"


def test_error_classes(emulator):
    c = client_for(emulator)
    with pytest.raises(ApiRejected) as err:
        c.purge(ZONE_A, Kind.FILES, "https://a.com/")  # type: ignore[arg-type]
    assert err.value.code == 1014 and err.value.error_class == "api_rejected"
    with pytest.raises(ApiRejected) as err:
        client_for(emulator, "wrong").purge(ZONE_A, Kind.TAGS, ["t"])
    assert err.value.status == 403 and err.value.code == 10000
    requests.post(emulator.url + "/__emulator/faults", json={"status": 503, "count": 1}, timeout=5)
    with pytest.raises(ApiUnavailable) as unavailable:
        c.purge(ZONE_A, Kind.TAGS, ["t"])
    assert unavailable.value.status == 503
    requests.post(emulator.url + "/__emulator/faults", json={"status": 429, "count": 1}, timeout=5)
    with pytest.raises(RateLimited) as limited:
        c.purge(ZONE_A, Kind.TAGS, ["t"])
    assert limited.value.retry_after == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = CloudflareClient(
        Credentials(token=Secret(TOKEN)), base_url=f"http://127.0.0.1:{dead_port}"
    )
    with pytest.raises(TransportError) as transport:
        dead.purge(ZONE_A, Kind.TAGS, ["t"])
    assert TOKEN not in str(transport.value) and TOKEN not in repr(transport.value)


def test_token_never_in_repr():
    creds = Credentials(token=Secret("sekrit-token-value"))
    client = CloudflareClient(creds, base_url="http://127.0.0.1:1")
    assert (
        "sekrit" not in repr(creds) and "sekrit" not in repr(client) and "sekrit" not in str(creds)
    )


def _purger(emu, plan, clock, budget=30.0):
    limiter = AccountRateLimiter(limits_for(plan), clock)
    dest = Destination(ZONE_A, "a.com", client_for(emu), limiter)
    return Purger(
        RetryPolicy(initial_backoff_seconds=0.05, max_backoff_seconds=1.0, budget_seconds=budget),
        clock,
    ), dest


@pytest.mark.parametrize("plan", ["free", "pro", "business", "enterprise"])
def test_url_budget_per_plan_without_429(emulator_factory, plan):
    emu = emulator_factory(plan=plan)
    purger, dest = _purger(emu, Tier(plan), SystemClock())
    cap = 500 if plan == "enterprise" else 100
    per_s = limits_for(plan).urls_per_second
    total = int(per_s * 2.5) // cap * cap
    for i in range(0, total, cap):
        batch = [Target.url(f"https://a.com/{i}/{j}") for j in range(cap)]
        assert not purger.send(dest, Kind.FILES, Mode.PURGE, batch).failed
    statuses = [
        r["status"] for r in requests.get(emu.url + "/__emulator/requests", timeout=5).json()
    ]
    assert statuses.count(429) == 0 and len(statuses) == total // cap


@pytest.mark.parametrize("plan", ["free", "pro", "business", "enterprise"])
def test_flex_budget_model_matches_the_server(emulator_factory, plan):
    """The client's bucket says "wait" exactly where the server would answer 429."""
    emu = emulator_factory(plan=plan)
    clock = MockClock()
    # A full bucket, like the emulator's when it starts.
    limiter = AccountRateLimiter(limits_for(plan), clock, start_full=True)
    c = client_for(emu)
    n = 0
    while limiter.reserve(Kind.TAGS, 1) == 0:
        c.purge(ZONE_A, Kind.TAGS, [f"t{n}"])
        n += 1
    bucket = limits_for(plan).flex_bucket
    assert bucket * 0.9 <= n <= bucket  # stopped at the burst, before the server would refuse


def test_pro_flex_pacing_without_429(emulator_factory):
    emu = emulator_factory(plan="pro")
    purger, dest = _purger(emu, Tier.PRO, SystemClock())
    for i in range(35):
        assert not purger.send(dest, Kind.TAGS, Mode.PURGE, [Target.tag(f"t{i}")]).failed
    statuses = [
        r["status"] for r in requests.get(emu.url + "/__emulator/requests", timeout=5).json()
    ]
    assert statuses == [200] * 35


def test_purger_retries_through_an_outage(emulator):
    requests.post(emulator.url + "/__emulator/faults", json={"status": 503, "count": 3}, timeout=5)
    purger, dest = _purger(emulator, Tier.PRO, SystemClock())
    result = purger.send(dest, Kind.TAGS, Mode.PURGE, [Target.tag("a")])
    assert result.accepted == [Target.tag("a")] and result.requests == 4


def test_purger_gives_up_when_budget_is_spent(emulator):
    requests.post(
        emulator.url + "/__emulator/faults", json={"status": 500, "seconds": 30}, timeout=5
    )
    purger, dest = _purger(emulator, Tier.PRO, SystemClock(), budget=0.5)
    result = purger.send(dest, Kind.TAGS, Mode.PURGE, [Target.tag("a")])
    assert isinstance(result.failed[0][1], RetriesExhausted)


def test_purger_bisects_a_rejected_batch(emulator):
    bad = "https://a.com/bad"
    requests.post(
        emulator.url + "/__emulator/faults",
        json={"reject_items": [bad], "reject_code": 1012},
        timeout=5,
    )
    purger, dest = _purger(emulator, Tier.PRO, SystemClock())
    targets = [Target.url(f"https://a.com/{i}") for i in range(7)] + [Target.url(bad)]
    result = purger.send(dest, Kind.FILES, Mode.PURGE, targets)
    assert [t.value for t, _ in result.failed] == [bad]
    assert result.failed[0][1].code == 1012
    assert len(result.accepted) == 7
    purged = {i for p in recorded(emulator) for i in p["items"]}
    assert purged == {f"https://a.com/{i}" for i in range(7)}


def test_purger_survives_a_lowered_cap(emulator_factory):
    emu = emulator_factory(files_cap=30)
    purger, dest = _purger(emu, Tier.ENTERPRISE, SystemClock())
    targets = [Target.url(f"https://a.com/{i}") for i in range(100)]
    result = purger.send(dest, Kind.FILES, Mode.PURGE, targets)
    assert len(result.accepted) == 100 and not result.failed
