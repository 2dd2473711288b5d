"""Purge targets: what the rules produce and the API accepts, validated and normalised once.

Normalising at construction means equal targets compare equal (dedupe) and nothing malformed ever
reaches the API, where it would burn the shared rate budget on a certain 400.
"""

from __future__ import annotations

import enum
import functools
import re
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import idna

from worker.errors import InvalidTarget

MAX_TAG_LENGTH = 1024
# Far above any real page's URL or cache-key header; past them a target is a bug or an attack,
# and one such record would otherwise fill a request body on its own.
MAX_URL_LENGTH = 8192
MAX_HEADER_VALUE_LENGTH = 1024
MAX_PREFIX_SLASHES = 31
DEVICE_TYPES = frozenset({"mobile", "desktop", "tablet"})

_HOST_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)
_ORIGIN_RE = re.compile(r"^https?://[^/\s:]+(:\d{1,5})?$")
# Characters kept as they are when percent-encoding a path or query: RFC 3986 reserved and
# unreserved characters plus '%', so an already-encoded URL is left alone.
_URL_SAFE = "/:@!$&'()*+,;=-._~%?"
# A URL that normalises to itself: http(s), a lower-case ASCII host without a port or a trailing
# dot, a path, maybe a query, of characters ``quote`` keeps (no '*', no fragment). Checked at C
# speed first: a backlog's first pass renders thousands of new URLs, and taking them apart and
# back together was a sixth of planning each.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"  # as ``_HOST_RE`` has it
_NORMAL_URL = re.compile(
    rf"https?://((?:{_LABEL}\.)*{_LABEL})/[A-Za-z0-9/:@!$&'()+,;=._~%-]*"
    r"(?:\?[A-Za-z0-9/:@!$&'()+,;=._~%?-]+)?"
)
# Exactly the characters ``str.isspace`` is true for, found at C speed: a backlog's first pass
# checks every URL it renders.
_WHITE_SPACE = re.compile(r"\s")


class Kind(enum.StrEnum):
    """The purge selector, named as in the API body. What differs between kinds is answered
    here, once, rather than by ``if kind is …`` wherever it matters."""

    FILES = "files"
    TAGS = "tags"
    HOSTS = "hosts"
    PREFIXES = "prefixes"
    EVERYTHING = "everything"

    @property
    def metered_per_item(self) -> bool:
        """URLs are metered per URL (a URLs-per-second budget, their own per-request cap); the
        other kinds per request, from the account's bucket."""
        return self is Kind.FILES

    @property
    def names_its_zone(self) -> bool:
        """Tags and "everything" have no host: they name their zone instead of being routed."""
        return self in (Kind.TAGS, Kind.EVERYTHING)


class Mode(enum.StrEnum):
    """Delete from cache (``purge_cache``) or mark stale and revalidate (``invalidate_cache``)."""

    PURGE = "purge"
    INVALIDATE = "invalidate"

    @property
    def endpoint(self) -> str:
        return "purge_cache" if self is Mode.PURGE else "invalidate_cache"


class Target(NamedTuple):
    """One normalised purge target. Build with the ``url``/``tag``/... constructors.

    A named tuple: targets are made, hashed and compared many times per event, and a tuple does
    that in C."""

    kind: Kind
    value: str
    headers: tuple[tuple[str, str], ...] = ()
    # Tags and "everything" have no host of their own: they name the zone they apply to.
    zone: str | None = None

    @staticmethod
    def url(url: str, headers: dict[str, str] | None = None) -> Target:
        if not headers:
            return Target(Kind.FILES, normalize_url(url))
        return Target(Kind.FILES, normalize_url(url), normalize_headers(headers, url))

    @staticmethod
    def tag(tag: str, zone: str | None = None) -> Target:
        return Target(Kind.TAGS, normalize_tag(tag), zone=zone)

    @staticmethod
    def host(host: str) -> Target:
        return Target(Kind.HOSTS, normalize_host(host))

    @staticmethod
    def prefix(prefix: str) -> Target:
        return Target(Kind.PREFIXES, normalize_prefix(prefix))

    @staticmethod
    def everything(zone: str) -> Target:
        if not zone:
            raise InvalidTarget("a purge of everything must name its zone")
        return Target(Kind.EVERYTHING, zone.lower(), zone=zone.lower())

    @property
    def hostname(self) -> str | None:
        """The host the target lives on, used to route it to a zone; None for tags."""
        if self.kind is Kind.FILES:
            return _url_host(self.value)
        if self.kind is Kind.HOSTS:
            return self.value
        if self.kind is Kind.PREFIXES:
            return self.value.split("/", 1)[0].split(":", 1)[0]
        return None

    def item(self) -> str | dict[str, Any]:
        """The element of the API body's list for this target."""
        if self.kind is Kind.FILES and self.headers:
            return {"url": self.value, "headers": dict(self.headers)}
        return self.value

    def __str__(self) -> str:
        if self.headers:
            hdrs = ",".join(f"{k}={v}" for k, v in self.headers)
            return f"{self.kind}:{self.value} [{hdrs}]"
        return f"{self.kind}:{self.value}"


# Normalising is pure and the same URLs and tags recur event after event: cache the results.
CACHE_SIZE = 65_536


def _url_host(url: str) -> str:
    """The host of a normalised URL (``scheme://host[:port]/…``), without parsing it again."""
    return url.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]


def _not_too_long(what: str, raw: str) -> None:
    if len(raw) > MAX_URL_LENGTH:
        raise InvalidTarget(
            f"{what} {raw[:60]!r}… is {len(raw)} characters long (max {MAX_URL_LENGTH})"
        )
    _unicode(what, raw)


def _unicode(what: str, raw: str) -> None:
    """Text that is not Unicode (a lone surrogate: from JSON's "\\ud800", or an undecodable
    byte in a command-line argument) cannot be encoded into a request."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidTarget(
            f"{what} {raw[:60]!r} is not valid text: a lone surrogate or undecodable byte at "
            f"position {exc.start + 1}"
        ) from None


@functools.lru_cache(maxsize=CACHE_SIZE)
def normalize_url(raw: str) -> str:
    normal = _NORMAL_URL.fullmatch(raw) if type(raw) is str and len(raw) <= MAX_URL_LENGTH else None
    if normal is not None and len(normal.group(1)) <= 253:
        return raw  # already as ``_normalize_url`` would make it: most new URLs are
    return _normalize_url(raw)


def _normalize_url(raw: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidTarget(f"URL must be a non-empty string, got {raw!r}")
    _not_too_long("URL", raw)
    if _WHITE_SPACE.search(raw):
        raise InvalidTarget(f"URL {raw!r} contains white space")
    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidTarget(f"URL {raw!r} must start with http:// or https://")
    if "@" in parts.netloc:
        # "https://www.example.com@other.host/" names other.host: a user name in front of the
        # host lets event data pick the host (and the zone), so it is never a purge target.
        raise InvalidTarget(f"URL {raw!r} has user information before its host")
    host = parts.hostname
    if not host:
        raise InvalidTarget(f"URL {raw!r} has no host")
    host = _idna(host, raw)
    if "*" in parts.path or "*" in host:
        raise InvalidTarget(f"URL {raw!r}: wildcards are not expanded by URL purges; use a prefix")
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    path = quote(parts.path or "/", safe=_URL_SAFE)
    query = quote(parts.query, safe=_URL_SAFE)
    # The fragment never reaches the cache, so it is not part of the cache key.
    return urlunsplit((parts.scheme.lower(), netloc, path, query, ""))


def normalize_headers(headers: dict[str, str], url: str = "") -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9-]+", name):
            raise InvalidTarget(f"cache-key header name {name!r} for {url} is not a header name")
        if not isinstance(value, str) or not value or any(ord(c) < 0x20 for c in value):
            raise InvalidTarget(f"cache-key header {name}={value!r} for {url} has no usable value")
        _unicode(f"cache-key header {name} for {url}", value)
        if len(value) > MAX_HEADER_VALUE_LENGTH:
            raise InvalidTarget(
                f"cache-key header {name} for {url} is {len(value)} characters long "
                f"(max {MAX_HEADER_VALUE_LENGTH})"
            )
        lname = name.lower()
        if lname == "cf-device-type" and value not in DEVICE_TYPES:
            raise InvalidTarget(
                f"CF-Device-Type {value!r} for {url}: use mobile, desktop or tablet"
            )
        if lname == "origin" and not _ORIGIN_RE.match(value):
            raise InvalidTarget(
                f"Origin {value!r} for {url}: needs scheme and host, e.g. https://a.com"
            )
        out.append((name, value))
    return tuple(sorted(out, key=lambda kv: kv[0].lower()))


@functools.lru_cache(maxsize=CACHE_SIZE)
def normalize_tag(raw: str) -> str:
    if not isinstance(raw, str):
        raise InvalidTarget(f"tag must be a string, got {raw!r}")
    if not 1 <= len(raw) <= MAX_TAG_LENGTH:
        raise InvalidTarget(
            f"tag {raw[:40]!r} must be 1..{MAX_TAG_LENGTH} characters, is {len(raw)}"
        )
    bad = next((c for c in raw if not 0x21 <= ord(c) <= 0x7E), None)
    if bad is not None:
        raise InvalidTarget(f"tag {raw[:60]!r} has {bad!r}: only printable ASCII without spaces")
    # Tags are case-insensitive at Cloudflare; one spelling makes duplicates collapse.
    return raw.lower()


def normalize_host(raw: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidTarget(f"host must be a non-empty string, got {raw!r}")
    if "/" in raw or ":" in raw:
        raise InvalidTarget(f"host {raw!r} must be a bare host name: no scheme, port or path")
    return _idna(raw, raw)


def normalize_prefix(raw: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidTarget(f"prefix must be a non-empty string, got {raw!r}")
    _not_too_long("prefix", raw)
    text = raw
    lowered = text.lower()
    for scheme in ("https://", "http://"):
        if lowered.startswith(scheme):
            text = text[len(scheme) :]
            break
    if "://" in text:
        raise InvalidTarget(f"prefix {raw!r}: only http and https prefixes exist")
    if "?" in text or "#" in text:
        raise InvalidTarget(f"prefix {raw!r} must not contain a query or fragment")
    if any(c.isspace() for c in text) or "*" in text:
        raise InvalidTarget(f"prefix {raw!r} must not contain white space or wildcards")
    if "/" not in text:
        raise InvalidTarget(f"prefix {raw!r} has no path: purge the host instead")
    host, path = text.split("/", 1)
    if not host:
        raise InvalidTarget(f"prefix {raw!r} must start with a host name")
    host_only, _, port = host.partition(":")
    host_norm = _idna(host_only, raw) + (f":{port}" if port else "")
    result = f"{host_norm}/{quote(path, safe=_URL_SAFE)}"
    if result.count("/") > MAX_PREFIX_SLASHES:
        raise InvalidTarget(f"prefix {raw!r} has more than {MAX_PREFIX_SLASHES} '/' separators")
    return result


def _idna(host: str, original: str) -> str:
    host = host.lower().rstrip(".")
    try:
        # UTS-46 processing with IDNA 2008 (what browsers resolve): Python's own "idna" codec is
        # IDNA 2003, which maps "faß.de" to "fass.de", a different domain.
        ascii_host = host if host.isascii() else idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise InvalidTarget(f"host in {original!r} is not a valid host name: {exc}") from None
    if not _HOST_RE.match(ascii_host):
        raise InvalidTarget(f"host {ascii_host!r} in {original!r} is not a valid host name")
    return ascii_host
