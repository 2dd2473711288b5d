"""The emulator's API paths, independent of HTTP: a parsed request in, ``(status, envelope,
headers)`` out. The HTTP server answers with it, and so does ``transport``: the worker's client
talks to the same model in memory, without a socket (the fast tests of the loop)."""

from __future__ import annotations

import json
import re
from typing import Any

from worker.cloudflare.transport import MockTransport, Request, Response
from worker.emulator.state import EmulatorState, Reply, envelope, error

PURGE = re.compile(r"^/client/v4/zones/([^/]+)/(purge_cache|invalidate_cache)$")
SETTING = re.compile(r"^/client/v4/zones/([^/]+)/cache/([a-z_]+)$")
VERIFY = "/client/v4/user/tokens/verify"


def handle(
    state: EmulatorState, method: str, path: str, raw: bytes, headers: dict[str, str]
) -> Reply:
    """One API request (``headers`` with lower-case names). Sleeps for injected latency."""
    status, body, extra = _route(state, method, path, raw, headers)
    if status >= 400 and state.faults.echo_headers:
        echoed = "; ".join(f"{k}: {v}" for k, v in headers.items())
        for err in body.get("errors") or []:
            err["message"] = f"{err.get('message', '')} (request headers: {echoed})"
    return status, body, extra


def _route(
    state: EmulatorState, method: str, path: str, raw: bytes, headers: dict[str, str]
) -> Reply:
    latency_ms, fault = state.injected_fault()
    if latency_ms:
        state.clock.sleep(latency_ms / 1000)
    if fault is not None:
        return fault
    denied = state.authenticate(headers)
    if denied is not None:
        return denied
    if path == VERIFY and method == "GET":
        return 200, envelope({"id": "0" * 32, "status": "active"}), {}
    body: Any = None
    if raw:
        try:
            body = json.loads(raw)
        except ValueError:
            return error(400, 6007, "Malformed JSON in request body")
    m = PURGE.match(path)
    if m:
        if method != "POST":
            return error(405, 10405, "Method not allowed")
        return state.zone(m.group(1)) or state.purge(m.group(1), m.group(2), body)
    m = SETTING.match(path)
    if m:
        return state.zone(m.group(1)) or state.setting(m.group(1), m.group(2), method, body)
    return error(404, 7000, "No route for that URI")


def transport(state: EmulatorState) -> MockTransport:
    """A client transport answered by ``state`` in memory, as the HTTP server would answer."""

    def answer(request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        raw = b"" if request.body is None else json.dumps(request.body).encode()
        status, body, extra = handle(state, request.method, request.path, raw, headers)
        state.record_request(request.method, request.path, status)
        reply_headers = {"cf-ray": "memory-EMU", **{k.lower(): v for k, v in extra.items()}}
        return Response(status, reply_headers, json.dumps(body).encode())

    return MockTransport(answer)
