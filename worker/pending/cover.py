"""What covers what, written once for the pending set and the purge ledger.

A prefix covers the URLs and longer prefixes under it on a path boundary: ``a.com/bar`` covers
``a.com/bar/x`` and ``a.com/bar?x``, never ``a.com/barn``. (A host covers everything on it, and
``everything`` the whole zone; those need no text rules.) Paths here are bare: ``host/path?query``,
the form prefixes are written in.
"""

from __future__ import annotations

from collections.abc import Iterator


def bare(url: str) -> str:
    """``https://a.com/x?y`` -> ``a.com/x?y``: the form prefixes are written in."""
    return url.split("://", 1)[1]


def netloc(path: str) -> str:
    """The host (with port, as written) of a bare path."""
    return path.split("/", 1)[0]


def covers(prefix: str, path: str) -> bool:
    """Whether ``prefix`` covers ``path`` (a bare URL or prefix), on a path boundary."""
    if not path.startswith(prefix):
        return False
    if len(path) == len(prefix) or prefix.endswith("/"):
        return True
    return path[len(prefix)] in "/?"


def prefixes_covering(path: str) -> Iterator[str]:
    """Every prefix that ``covers`` ``path``: ``a.com/x`` and ``a.com/x/`` cover
    ``a.com/x/y?q``, and so does ``a.com/x/y`` itself."""
    end = path.find("?")
    end = len(path) if end < 0 else end
    start = path.find("/")
    if start < 0:
        return
    yield path[:end]
    slash = start
    while 0 <= slash < end:
        if slash > start:
            yield path[:slash]  # followed by "/"
        if slash + 1 < end:
            yield path[: slash + 1]  # ends with "/"
        slash = path.find("/", slash + 1)
