"""How the client's requests travel: a one-method interface, its ``requests`` implementation, and
an in-memory one.

``RequestsTransport`` is production's: HTTP over a pooled session, ``requests``' exceptions
translated here into the worker's (``TransportError``: no answer; ``ApiRejected``: a request
that cannot even be built). ``MockTransport`` hands each request to a function: the tests
answer with the emulator's model of the API (``worker.emulator.api.transport``) and never open
a socket, and dry runs answer every purge as accepted (``dry_run``), so that everything else
(batching, rate limits, retries, the ledger) runs as it would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import structlog

from worker import __version__
from worker.errors import ApiRejected, TransportError

if TYPE_CHECKING:
    import requests

log = structlog.get_logger("worker.cloudflare")

# Connect and read timeouts: a purge answers in well under a second; one that hangs is
# abandoned at the read timeout and retried.
TIMEOUT = (3.05, 30.0)


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None  # JSON, or None for no body

    @property
    def path(self) -> str:
        return urlsplit(self.url).path


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON. Raises ``ValueError`` if it is not."""
        return json.loads(self.body)


class Transport(Protocol):
    def handle(self, request: Request) -> Response:
        """Send one request and return the answer, whatever its status. Blocks until answered.
        Raises ``TransportError`` when no answer came, ``ApiRejected`` when the request cannot
        be sent at all."""

    def close(self) -> None: ...


class RequestsTransport:
    """HTTP through a ``requests`` session (connections kept alive between requests)."""

    def __init__(self, timeout: tuple[float, float] = TIMEOUT) -> None:
        import requests  # noqa: PLC0415 (~40 ms: loaded by a transport, not by each command)

        self._timeout = timeout
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"purge-worker/{__version__}"

    def handle(self, request: Request) -> Response:
        parts = urlsplit(request.url)
        # The address in full (a wrong base_url is the usual cause), without any query.
        where = (
            f"{request.method} {parts.scheme}://{parts.hostname}"
            + (f":{parts.port}" if parts.port else "")
            + parts.path
        )
        import requests  # noqa: PLC0415 (loaded by ``__init__``: a look-up)

        try:
            resp = self._session.request(
                request.method,
                request.url,
                json=request.body,
                headers=dict(request.headers),
                timeout=self._timeout,
            )
        except (
            requests.exceptions.InvalidSchema,
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidHeader,
        ) as exc:
            # The request cannot be built: trying again in a minute cannot help.
            raise ApiRejected(0, message=f"{where}: cannot send: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            # requests' exceptions hold the prepared request, auth headers included, so they are
            # never chained and only their type is named.
            raise TransportError(f"{where}: {type(exc).__name__}{_reason(exc)}") from None
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return Response(resp.status_code, headers, resp.content)

    def close(self) -> None:
        self._session.close()


def _reason(exc: requests.RequestException) -> str:
    """The operating system's words for a failed connection ("Connection refused", "Name or
    service not known"), when the exception's text carries them; its text is not shown whole."""
    import requests  # noqa: PLC0415 (as in ``__init__``)

    if isinstance(exc, requests.Timeout):
        return " (timed out)"
    found = re.search(r"\[Errno -?\d+\] ([A-Za-z][A-Za-z ,']{0,80})", str(exc))
    return f" ({found.group(1).strip()})" if found else ""


class MockTransport:
    """Answers every request with ``handler(request)``, in memory."""

    def __init__(self, handler: Callable[[Request], Response]) -> None:
        self._handler = handler

    def handle(self, request: Request) -> Response:
        return self._handler(request)

    def close(self) -> None:
        pass


def _accepted(request: Request) -> Response:
    if request.method == "POST" and request.path.endswith(("/purge_cache", "/invalidate_cache")):
        body = request.body or {}
        log.info(
            "dry run: purge not sent",
            path=request.path,
            kind=next(iter(body), None),
            items=sum(len(v) for v in body.values() if isinstance(v, list)),
        )
        envelope = {"success": True, "errors": [], "messages": [], "result": {"id": "dry-run"}}
        return Response(200, {"cf-ray": "dry-run"}, json.dumps(envelope).encode())
    return Response(404, {}, b'{"success": false, "errors": [{"code": 0, "message": "dry run"}]}')


def dry_run() -> MockTransport:
    """A transport that sends nothing and answers every purge as accepted (shadow mode)."""
    return MockTransport(_accepted)
