import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import targets
from worker.errors import InvalidTarget
from worker.targets import Kind, Mode, Target


def test_url_host_is_lowercased_path_and_query_kept():
    t = Target.url("HTTPS://WWW.Example.COM/Path/A?Q=B#frag")
    assert t.value == "https://www.example.com/Path/A?Q=B"
    assert t.hostname == "www.example.com"


def test_url_non_ascii_is_percent_encoded_and_idna_host():
    t = Target.url("https://bücher.example/straße ok".replace(" ok", ""))
    assert t.value == "https://xn--bcher-kva.example/stra%C3%9Fe"
    # Already-encoded input is left alone.
    assert Target.url("https://a.com/stra%C3%9Fe").value == "https://a.com/stra%C3%9Fe"


@pytest.mark.parametrize(
    "bad",
    ["ftp://a.com/x", "https:///nohost", "https://a.com/a b", "https://a.com/*.css", "", "/x"],
)
def test_bad_urls_are_rejected_with_the_url_named(bad):
    with pytest.raises(InvalidTarget) as err:
        Target.url(bad)
    assert repr(bad)[1:-1][:10] in str(err.value) or bad == ""


def test_url_with_cache_key_headers():
    t = Target.url("https://a.com/x", {"CF-Device-Type": "mobile", "Accept-Language": "zh-CN"})
    assert t.item() == {
        "url": "https://a.com/x",
        "headers": {"Accept-Language": "zh-CN", "CF-Device-Type": "mobile"},
    }
    with pytest.raises(InvalidTarget, match="CF-Device-Type"):
        Target.url("https://a.com/x", {"CF-Device-Type": "phone"})
    with pytest.raises(InvalidTarget, match="Origin"):
        Target.url("https://a.com/x", {"Origin": "a.com"})
    assert Target.url("https://a.com/x", {"Origin": "https://b.com:8443"}).headers


def test_tags_are_case_insensitive_and_validated():
    assert Target.tag("Product-42") == Target.tag("product-42")
    for bad in ["", "has space", "x" * 1025, "tab\t", "naïve"]:
        with pytest.raises(InvalidTarget):
            Target.tag(bad)
    assert Target.tag("x" * 1024).value == "x" * 1024


def test_prefixes():
    assert Target.prefix("https://WWW.A.com/Blog/").value == "www.a.com/Blog/"
    for bad in ["www.a.com", "www.a.com/x?y=1", "www.a.com/x#f", "/x", "ftp://a.com/x"]:
        with pytest.raises(InvalidTarget):
            Target.prefix(bad)
    ok = "a.com" + "/s" * 31
    assert Target.prefix(ok).value == ok
    with pytest.raises(InvalidTarget, match="31"):
        Target.prefix(ok + "/s")


def test_hosts():
    assert Target.host("WWW.A.com").value == "www.a.com"
    for bad in ["https://a.com", "a.com/x", "a.com:8080", "", "bad_host!"]:
        with pytest.raises(InvalidTarget):
            Target.host(bad)


def test_everything_and_modes():
    t = Target.everything("Example.com")
    assert t.kind is Kind.EVERYTHING and t.zone == "example.com"
    assert Mode.PURGE.endpoint == "purge_cache"
    assert Mode.INVALIDATE.endpoint == "invalidate_cache"


@settings(max_examples=500, deadline=None)
@given(st.from_regex(targets._NORMAL_URL, fullmatch=True))
def test_a_url_taken_as_already_normal_is_one_the_whole_way_leaves_alone(url):
    # The fast path must only ever take URLs the whole way would return unchanged.
    assert targets._normalize_url(url) == url


URL_PARTS = st.sampled_from(
    [
        "http",
        "https",
        "HTTP",
        "://",
        "/",
        "a",
        "Z",
        ".",
        "-",
        ":80",
        "@",
        "?",
        "#",
        "*",
        "%",
        "%41",
        "~",
        "é",
        " ",
        "\t",
        "=",
        "&",
        "..",
        "//",
        "com",
        "xn--",
        "(",
        "'",
        ";",
        "_",
    ]
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(URL_PARTS, max_size=12).map("".join))
def test_urls_normalise_the_same_with_and_without_the_fast_path(raw):
    try:
        want: str | type[InvalidTarget] = targets._normalize_url(raw)
    except InvalidTarget:
        want = InvalidTarget
    try:
        got: str | type[InvalidTarget] = targets.normalize_url.__wrapped__(raw)
    except InvalidTarget:
        got = InvalidTarget
    assert got == want
