"""The emulator's HTTP front: a threaded loopback server speaking the API's paths and envelope."""

from __future__ import annotations

import json
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from worker.emulator import api
from worker.emulator.state import EmulatorState, error

MAX_BODY = 10 * 1024 * 1024


def _since(target: str) -> int | None:
    """The ``since`` query parameter of ``target``: 0 when absent, None when not a count."""
    values = parse_qs(urlsplit(target).query).get("since", ["0"])
    try:
        since = int(values[-1])
    except ValueError:
        return None
    return since if since >= 0 else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections, as with the real API
    # Headers and body go out in separate writes; without this, Nagle and delayed ACKs add 40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            self._answer(method)
        except ConnectionError:
            # The client went away (a worker killed mid-request): nobody is left to answer.
            self.close_connection = True
        except Exception:  # noqa: BLE001 (a client must get an answer, never a reset)
            traceback.print_exc()
            self.close_connection = True
            self._send(
                *error(500, 10001, "emulator failed on this request (see its output)"),
                record=(method, self.path.split("?", 1)[0]),
            )

    def _answer(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        state = self.server.state
        declared = self.headers.get("Content-Length") or "0"
        length = int(declared) if declared.strip().isdigit() else -1
        if length < 0:
            # The body's end is unknown: answer, and close the connection after.
            self.close_connection = True
            self._send(*error(400, 6007, "Content-Length is not a length"), record=(method, path))
            return
        if length > MAX_BODY:
            self.close_connection = True  # the body is left unread
            self._send(*error(413, 1001, "request body too large"), record=(method, path))
            return
        raw = self.rfile.read(length) if length else b""
        if path.startswith("/__emulator/"):
            self._inspect(method, path, raw)
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        if method == "GET" and not path.startswith("/client/"):
            self._edge(self.headers.get("Host", ""), self.path, headers)
            return
        status, body, extra = api.handle(state, method, path, raw, headers)
        self._send(status, body, extra, record=(method, path))

    def _edge(self, host: str, path: str, headers: dict[str, str]) -> None:
        """A GET for a zone's page, served as Cloudflare's edge would (``edge.py``)."""
        status, cache = self.server.state.edge.get(host.split(":", 1)[0], path, headers)
        data = b"<html>purge-worker emulator edge</html>"
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("CF-Cache-Status", cache)
        self.end_headers()
        self.wfile.write(data)

    def _inspect(self, method: str, path: str, raw: bytes) -> None:
        state = self.server.state
        purges, requests = state.snapshot()
        if method == "GET" and path == "/__emulator/edge":
            self._send_json(200, list(state.edge.log))
            return
        if method == "POST" and path == "/__emulator/edge/tags":
            try:
                spec = json.loads(raw or b"{}")
                state.edge.set_tags(str(spec["url"]), [str(t) for t in spec["tags"]])
            except (ValueError, TypeError, KeyError) as exc:
                self._send_json(400, {"error": f"bad tags spec: {exc}"})
                return
            self._send_json(200, {"tags": "set"})
            return
        if method == "GET" and path == "/__emulator/purges":
            # ``?since=N``: the purges from the N-th on, so a long run can be followed cheaply.
            since = _since(self.path)
            if since is None:
                self._send_json(400, {"error": "since must be a whole number >= 0"})
            else:
                self._send_json(200, purges[since:])
        elif method == "GET" and path == "/__emulator/requests":
            self._send_json(200, requests)
        elif method == "POST" and path == "/__emulator/reset":
            state.reset()
            self._send_json(200, {"reset": True})
        elif method == "POST" and path == "/__emulator/faults":
            try:
                spec = json.loads(raw or b"{}")
                status, env, _ = (
                    state.set_faults(spec)
                    if isinstance(spec, dict)
                    else error(400, 1001, "fault spec must be a JSON object")
                )
            except (ValueError, TypeError) as exc:
                status, env, _ = error(400, 1001, f"bad fault spec: {exc}")
            self._send_json(status, env)
        else:
            self._send_json(404, {"error": f"no emulator endpoint {method} {path}"})

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str], *, record: tuple[str, str]
    ) -> None:
        self.server.state.record_request(record[0], record[1], status)
        self._send_json(status, body, {"cf-ray": f"{id(body):x}-EMU", **headers})

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], state: EmulatorState, verbose: bool) -> None:
        self.state = state
        self.verbose = verbose
        super().__init__(addr, _Handler)


class Emulator:
    """Serve ``state`` on ``host:port`` (0 picks a free port) from a background thread."""

    def __init__(
        self, state: EmulatorState, host: str = "127.0.0.1", port: int = 0, verbose: bool = False
    ) -> None:
        self.state = state
        self._server = _Server((host, port), state, verbose)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + "/client/v4"

    def start(self) -> Emulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="emulator", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
