"""The emulator over real HTTP: envelope, validation, documented error codes, limits, settings."""

import json
import math
import time

import pytest
import requests

from tests.conftest import TOKEN, ZONE_A
from worker.clock import MockClock

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(emu, path, body, headers=AUTH):
    return requests.post(emu.api_url + path, json=body, headers=headers, timeout=5)


def purge(emu, body, zone=ZONE_A, headers=AUTH):
    return post(emu, f"/zones/{zone}/purge_cache", body, headers)


def codes(resp):
    return [e["code"] for e in resp.json()["errors"]]


def test_every_selector_is_accepted_and_recorded(emulator):
    bodies = [
        {
            "files": [
                "https://a.com/x",
                {"url": "https://a.com/y", "headers": {"CF-Device-Type": "mobile"}},
            ]
        },
        {"tags": ["t1", "t2"]},
        {"hosts": ["a.com"]},
        {"prefixes": ["a.com/blog/"]},
        {"purge_everything": True},
    ]
    for body in bodies:
        resp = purge(emulator, body)
        assert resp.status_code == 200, resp.text
        env = resp.json()
        assert env["success"] is True and env["errors"] == [] and len(env["result"]["id"]) == 32
    resp = post(emulator, f"/zones/{ZONE_A}/invalidate_cache", {"tags": ["t3"]})
    assert resp.status_code == 200
    recorded = requests.get(emulator.url + "/__emulator/purges", timeout=5).json()
    assert [(p["kind"], p["endpoint"]) for p in recorded] == [
        ("files", "purge_cache"),
        ("tags", "purge_cache"),
        ("hosts", "purge_cache"),
        ("prefixes", "purge_cache"),
        ("everything", "purge_cache"),
        ("tags", "invalidate_cache"),
    ]
    assert recorded[0]["items"][1]["headers"] == {"CF-Device-Type": "mobile"}
    assert recorded[4]["items"] == []
    assert all(p["zone_id"] == ZONE_A and p["received_at"].endswith("Z") for p in recorded)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"purge_everything": True, "files": ["https://a.com/"]}, 1092),
        ({}, 1012),
        ({"urls": ["https://a.com/"]}, 1012),
        ({"files": [{"headers": {"CF-IPCountry": "US"}}]}, 1012),
        ({"files": "https://a.com/"}, 1014),
        ({"tags": "t"}, 1014),
    ],
)
def test_documented_body_errors(emulator, body, code):
    resp = purge(emulator, body)
    assert resp.status_code == 400
    assert resp.json()["success"] is False
    assert code in codes(resp)


def test_too_many_items(emulator_factory):
    emu = emulator_factory(plan="pro")
    resp = purge(emu, {"files": [f"https://a.com/{i}" for i in range(101)]})
    assert resp.status_code == 400 and "more than 100" in resp.json()["errors"][0]["message"]
    resp = purge(emu, {"tags": [f"t{i}" for i in range(101)]})
    assert resp.status_code == 400
    emu30 = emulator_factory(files_cap=30)
    assert purge(emu30, {"files": [f"https://a.com/{i}" for i in range(31)]}).status_code == 400


def test_zone_and_auth_errors(emulator):
    resp = purge(emulator, {"tags": ["t"]}, zone="not-a-zone")
    assert resp.status_code == 400 and codes(resp) == [7003, 7000]
    resp = purge(emulator, {"tags": ["t"]}, zone="c" * 32)
    assert resp.status_code == 403 and codes(resp) == [10000]
    resp = purge(emulator, {"tags": ["t"]}, headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 403 and codes(resp) == [10000]
    resp = purge(emulator, {"tags": ["t"]}, headers={"Authorization": "Token abc"})
    assert resp.status_code == 400 and codes(resp) == [6003]
    resp = purge(emulator, {"tags": ["t"]}, headers={})
    assert resp.status_code == 400 and codes(resp) == [6003]
    assert resp.json()["errors"][0]["error_chain"][0]["code"] == 6103
    requests_seen = requests.get(emulator.url + "/__emulator/requests", timeout=5).json()
    assert [r["status"] for r in requests_seen] == [400, 403, 403, 400, 400]


def test_legacy_email_and_key(emulator_factory):
    emu = emulator_factory(email="ops@example.com", api_key="k" * 37)
    ok = {"X-Auth-Email": "ops@example.com", "X-Auth-Key": "k" * 37}
    assert purge(emu, {"tags": ["t"]}, headers=ok).status_code == 200
    bad = {"X-Auth-Email": "ops@example.com", "X-Auth-Key": "x" * 37}
    assert purge(emu, {"tags": ["t"]}, headers=bad).status_code == 403


@pytest.mark.parametrize(
    ("plan", "bucket", "refill"),
    [("free", 25, 5 / 60), ("pro", 25, 5), ("business", 50, 10), ("enterprise", 500, 50)],
)
def test_flex_bucket_per_plan_then_429_with_retry_after(emulator_factory, plan, bucket, refill):
    clock = MockClock()
    emu = emulator_factory(plan=plan, clock=clock)
    for i in range(bucket):
        ok = purge(emu, {"tags": [f"t{i}"]})
        assert ok.status_code == 200, i
        # What is left of the bucket, as the API's headers say it: a client can follow it.
        assert ok.headers["Ratelimit"].startswith(f'"default";r={bucket - i - 1};t=')
    resp = purge(emu, {"tags": ["over"]})
    assert resp.status_code == 429
    assert codes(resp) == [1134]
    assert int(resp.headers["Retry-After"]) == math.ceil(1 / refill)
    assert "Ratelimit" in resp.headers
    clock.advance(1.001 / refill)  # a hair over one token, against float rounding
    assert purge(emu, {"tags": ["refilled"]}).status_code == 200
    assert purge(emu, {"tags": ["again"]}).status_code == 429


def test_url_budget_per_plan_and_shared_by_zones_of_an_account(emulator_factory):
    zone_b = "b" * 32
    emu = emulator_factory(plan="free", zones={ZONE_A: "acc", zone_b: "acc"}, clock=MockClock())
    # 800 URLs/s of burst, spread over two zones of the same account.
    for i in range(0, 780, 30):
        zone = ZONE_A if i % 60 else zone_b
        assert (
            purge(
                emu, {"files": [f"https://a.com/{i}/{j}" for j in range(30)]}, zone=zone
            ).status_code
            == 200
        )
    resp = purge(emu, {"files": [f"https://a.com/x/{j}" for j in range(30)]}, zone=zone_b)
    assert resp.status_code == 429 and codes(resp) == [1134]


def test_settings_persist_and_cache_reserve_clear_rules(emulator_factory):
    emu = emulator_factory(clear_seconds=0.3)
    base = f"{emu.api_url}/zones/{ZONE_A}/cache"

    def get(name):
        return requests.get(f"{base}/{name}", headers=AUTH, timeout=5)

    def patch(name, v):
        return requests.patch(f"{base}/{name}", json={"value": v}, headers=AUTH, timeout=5)

    assert get("cache_reserve").json()["result"]["value"] == "off"
    assert patch("cache_reserve", "on").json()["result"]["value"] == "on"
    assert get("cache_reserve").json()["result"]["value"] == "on"
    resp = requests.post(f"{base}/cache_reserve_clear", headers=AUTH, timeout=5)
    assert resp.status_code == 400 and codes(resp) == [1152]
    patch("cache_reserve", "off")
    resp = requests.post(f"{base}/cache_reserve_clear", headers=AUTH, timeout=5)
    assert resp.json()["result"]["state"] == "In-progress"
    resp = patch("cache_reserve", "on")
    assert resp.status_code == 400 and codes(resp) == [1153]
    time.sleep(0.4)
    status = get("cache_reserve_clear").json()["result"]
    assert status["state"] == "Completed" and status["end_ts"]
    assert patch("cache_reserve", "on").status_code == 200
    assert patch("regional_tiered_cache", "on").json()["result"]["id"] == "tc_regional"
    assert patch("tiered_cache_smart_topology_enable", "on").json()["result"]["value"] == "on"
    resp = requests.delete(f"{base}/tiered_cache_smart_topology_enable", headers=AUTH, timeout=5)
    assert resp.status_code == 200 and "value" not in resp.json()["result"]
    assert get("tiered_cache_smart_topology_enable").json()["result"]["value"] == "off"
    assert patch("cache_reserve", "maybe").status_code == 400
    assert patch("variants", {"jpeg": ["image/webp", "image/avif"]}).status_code == 200
    assert get("variants").json()["result"]["value"] == {"jpeg": ["image/webp", "image/avif"]}
    assert patch("variants", {"exe": ["application/x"]}).status_code == 400
    requests.delete(f"{base}/variants", headers=AUTH, timeout=5)
    assert get("variants").json()["result"]["value"] == {}


def test_faults_by_count_duration_latency_and_clear(emulator):
    ctl = emulator.url + "/__emulator/faults"
    requests.post(ctl, json={"status": 503, "count": 2}, timeout=5)
    assert [purge(emulator, {"tags": ["t"]}).status_code for _ in range(3)] == [503, 503, 200]
    requests.post(ctl, json={"status": 502, "seconds": 0.3}, timeout=5)
    assert purge(emulator, {"tags": ["t"]}).status_code == 502
    time.sleep(0.35)
    assert purge(emulator, {"tags": ["t"]}).status_code == 200
    requests.post(ctl, json={"latency_ms": 200}, timeout=5)
    start = time.monotonic()
    purge(emulator, {"tags": ["t"]})
    assert time.monotonic() - start >= 0.2
    requests.post(ctl, json={"clear": True}, timeout=5)
    requests.post(emulator.url + "/__emulator/reset", timeout=5)
    assert requests.get(emulator.url + "/__emulator/purges", timeout=5).json() == []
    assert requests.post(ctl, json={"status": 503}, timeout=5).status_code == 400


def test_urls_are_metered_over_a_sliding_second_not_a_bucket(emulator_factory):
    clock = MockClock()
    emu = emulator_factory(plan="pro", clock=clock)

    def urls(tag, n=100):
        return {"files": [f"https://a.com/{tag}/{j}" for j in range(n)]}

    for i in range(15):  # 1,500 URLs at one instant: the plan's second is full
        assert purge(emu, urls(i)).status_code == 200
    clock.advance(0.6)
    resp = purge(emu, urls("early", 1))
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) == 1
    clock.advance(0.41)  # the first second has passed: room for a whole second again
    for i in range(15):
        assert purge(emu, urls(f"b{i}")).status_code == 200, i
    # A token bucket refilling at 1,500/s would now allow 100 more after 0.1 s; a sliding
    # second does not, until those 1,500 are a second old.
    clock.advance(0.1)
    assert purge(emu, urls("c")).status_code == 429


def test_purges_can_be_followed_from_a_position(emulator):
    for tag in ("a", "b", "c"):
        assert purge(emulator, {"tags": [tag]}).status_code == 200
    url = emulator.url + "/__emulator/purges"
    assert [p["items"] for p in requests.get(url + "?since=1", timeout=5).json()] == [["b"], ["c"]]
    assert requests.get(url + "?since=3", timeout=5).json() == []
    assert requests.get(url + "?since=-1", timeout=5).status_code == 400
    assert requests.get(url + "?since=x", timeout=5).status_code == 400


def _raw(emu, request: bytes) -> bytes:
    """Send ``request`` as it is and read the whole answer (the emulator closes after it)."""
    import socket

    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        (b"Authorization: Bearer t\xe2\x82\xac\r\nContent-Length: 2\r\n", b"403", 10000),
        (b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: abc\r\n", b"400", 6007),
        (b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: -5\r\n", b"400", 6007),
    ],
)
def test_malformed_requests_get_the_error_envelope_not_a_reset(emulator, headers, status, code):
    request = (
        f"POST /client/v4/zones/{ZONE_A}/purge_cache HTTP/1.1\r\nHost: x\r\n".encode()
        + headers
        + b"Content-Type: application/json\r\nConnection: close\r\n\r\n{}"
    )
    answer = _raw(emulator, request)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["success"] is False and [e["code"] for e in body["errors"]] == [code]


@pytest.mark.parametrize(
    "body",
    [
        {"files": ["https://a.com/*"]},
        {"files": [{"url": "https://a.com/x", "headers": {"CF-Device-Type": "fridge"}}]},
        {"files": []},
        {"tags": []},
    ],
)
def test_what_the_api_documents_as_invalid_is_refused(emulator, body):
    resp = purge(emulator, body)
    assert resp.status_code == 400 and codes(resp) == [1012]
    assert requests.get(emulator.url + "/__emulator/purges", timeout=5).json() == []


def test_a_negative_latency_fault_is_refused_and_the_emulator_goes_on(emulator):
    resp = requests.post(emulator.url + "/__emulator/faults", json={"latency_ms": -5}, timeout=5)
    assert resp.status_code == 400 and "latency_ms" in resp.text
    assert purge(emulator, {"tags": ["t"]}).status_code == 200


def test_a_bad_files_cap_is_one_line_and_exit_2():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "worker", "emulator", "--files-cap", "-5"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "purge-worker emulator: argument --files-cap: -5 must be 1 or more"
    ]
