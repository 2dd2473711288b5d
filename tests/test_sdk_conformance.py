"""The official Cloudflare SDK, a client nobody here wrote, against the emulator."""

import cloudflare
import pytest
import requests

from tests.conftest import TOKEN, ZONE_A


@pytest.fixture
def sdk(emulator):
    client = cloudflare.Cloudflare(api_token=TOKEN, base_url=emulator.api_url, max_retries=0)
    yield client
    client.close()


def test_every_purge_selector(sdk, emulator):
    z = ZONE_A
    assert len(sdk.cache.purge(zone_id=z, files=["https://a.com/1"]).id) == 32
    sdk.cache.purge(
        zone_id=z, files=[{"url": "https://a.com/2", "headers": {"CF-Device-Type": "mobile"}}]
    )
    sdk.cache.purge(zone_id=z, tags=["tag-a"])
    sdk.cache.purge(zone_id=z, hosts=["a.com"])
    sdk.cache.purge(zone_id=z, prefixes=["a.com/blog/"])
    sdk.cache.purge(zone_id=z, purge_everything=True)
    sdk.cache.invalidate(zone_id=z, tags=["tag-b"])
    got = requests.get(emulator.url + "/__emulator/purges", timeout=5).json()
    assert [(p["kind"], p["items"], p["endpoint"]) for p in got] == [
        ("files", ["https://a.com/1"], "purge_cache"),
        (
            "files",
            [{"url": "https://a.com/2", "headers": {"CF-Device-Type": "mobile"}}],
            "purge_cache",
        ),
        ("tags", ["tag-a"], "purge_cache"),
        ("hosts", ["a.com"], "purge_cache"),
        ("prefixes", ["a.com/blog/"], "purge_cache"),
        ("everything", [], "purge_cache"),
        ("tags", ["tag-b"], "invalidate_cache"),
    ]


def test_every_settings_method(sdk):
    z = ZONE_A
    assert sdk.cache.cache_reserve.get(zone_id=z).value == "off"
    assert sdk.cache.cache_reserve.edit(zone_id=z, value="on").value == "on"
    with pytest.raises(cloudflare.BadRequestError):
        sdk.cache.cache_reserve.clear(zone_id=z)  # 1152: sync must be off first
    sdk.cache.cache_reserve.edit(zone_id=z, value="off")
    assert sdk.cache.cache_reserve.clear(zone_id=z).state == "In-progress"
    assert sdk.cache.cache_reserve.status(zone_id=z).state == "In-progress"
    assert sdk.cache.regional_tiered_cache.get(zone_id=z).value == "off"
    assert sdk.cache.regional_tiered_cache.edit(zone_id=z, value="on").value == "on"
    assert sdk.cache.smart_tiered_cache.get(zone_id=z).value == "off"
    assert sdk.cache.smart_tiered_cache.edit(zone_id=z, value="on").value == "on"
    assert sdk.cache.smart_tiered_cache.delete(zone_id=z).id == "tiered_cache_smart_topology_enable"
    edited = sdk.cache.variants.edit(zone_id=z, value={"jpeg": ["image/webp", "image/avif"]})
    assert edited.value.jpeg == ["image/webp", "image/avif"]
    assert sdk.cache.variants.get(zone_id=z).value.jpeg == ["image/webp", "image/avif"]
    assert sdk.cache.variants.delete(zone_id=z).id == "variants"


def test_sdk_sees_errors_as_the_real_api_gives_them(emulator):
    bad = cloudflare.Cloudflare(api_token="wrong", base_url=emulator.api_url, max_retries=0)
    with pytest.raises(cloudflare.PermissionDeniedError):
        bad.cache.purge(zone_id=ZONE_A, tags=["x"])
    bad.close()
