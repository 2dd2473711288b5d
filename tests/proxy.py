"""A TCP proxy the test controls, for network partitions: it forwards, then holds every byte
while the sockets stay open (as a partitioned network does: nothing is refused, nothing
arrives), then forwards again what it held and what follows."""

from __future__ import annotations

import contextlib
import socket
import threading

from scripts.kafka_broker import Broker, free_port


class Proxy:
    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = port or free_port()
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        """From now on nothing passes, in either direction; connections stay open."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class ProxiedBroker(Broker):
    """A broker with a second listener that clients reach only through ``proxy``."""

    def __init__(self) -> None:
        self.proxy_port = free_port()
        super().__init__()
        self.proxy: Proxy | None = None

    def extra_listeners(self) -> dict[str, str]:
        return {"PROXIED": "PLAINTEXT"}

    def advertised_ports(self) -> dict[str, int]:
        return {"PROXIED": self.proxy_port}

    def start(self) -> ProxiedBroker:
        super().start()
        self.proxy = Proxy(self.ports["PROXIED"], self.proxy_port)
        return self

    @property
    def proxied(self) -> str:
        """The bootstrap address through the proxy."""
        return f"127.0.0.1:{self.proxy_port}"

    def cleanup(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        super().cleanup()
