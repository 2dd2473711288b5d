"""``/healthz`` (the poll loop is alive) and ``/readyz`` (connected and consuming) for probes."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A loop that has not polled for this long is stuck (Kafka's own max.poll.interval is 300 s; a
# healthy loop polls many times a second even when idle).
STALE_AFTER_SECONDS = 60.0


class HealthServer:
    """Serves the probes from a daemon thread; ``check`` returns (healthy, ready, details)."""

    def __init__(
        self,
        port: int,
        check: Callable[[], tuple[bool, bool, dict[str, Any]]],
        host: str = "127.0.0.1",
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                healthy, ready, details = outer.check()
                if self.path == "/healthz":
                    ok = healthy
                elif self.path == "/readyz":
                    ok = ready
                else:
                    self.send_error(404)
                    return
                body = json.dumps({"ok": ok, **details}).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.check = check
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
