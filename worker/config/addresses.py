"""The API's base URL: what an address in the config may be."""

from __future__ import annotations

import re
from urllib.parse import urlsplit


def _shown(value: str) -> str:
    """``value`` as an error may quote it: never a user name or password."""
    return re.sub(r"//[^/?#]*@", "//…@", value)


def check_base_url(value: str) -> str:
    """An http(s) URL with a host: anything else would fail every request, and be retried. No
    user name or password (requests would send them as Basic auth in place of the token, and
    APIs quote them back in errors), no query or fragment (paths are appended to it)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError(f"{_shown(value)!r} is not a URL (is the port a number?)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in value:
        raise ValueError(f"{_shown(value)!r} is not an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise ValueError(
            f"{_shown(value)!r}: a user name or password in the URL would replace the API "
            "token; give the address only"
        )
    if parts.query or parts.fragment or value.rstrip().endswith(("?", "#")):
        raise ValueError(
            f"{parts.scheme}://{parts.netloc}{parts.path} has a query or fragment after it; "
            "give the address and path only"
        )
    return value
