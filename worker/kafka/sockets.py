"""The socket of a connection attempt that fails is closed where it fails.

kafka-python 3.0 leaves it to the garbage collector: the failed attempt's exception, kept by the
connection it was for, holds the frame that holds the socket, a reference cycle that only the
cyclic collector frees. The worker runs that collector seldom (``worker.runtime.tune_gc``), so
while a broker was unreachable each client kept about one more socket a second: a worker went
from 20 open sockets to 78 in the first minute of an outage, without end. Applied once, when
``worker.kafka`` is imported; a kafka-python whose ``connect`` is not the one this mirrors is left
as it is.
"""

from __future__ import annotations

import inspect
from typing import Any

from kafka.net.inet import KafkaNetSocket

_PARAMETERS = ["self", "net", "addrinfo", "socket_options", "timeout_at"]


def close_failed_connects() -> bool:
    """Make ``KafkaNetSocket.connect`` close its socket when the attempt fails. Returns whether
    it does (False: kafka-python's ``connect`` is not the one expected)."""
    original = KafkaNetSocket.connect
    if getattr(original, "closes_failed", False):
        return True
    if list(inspect.signature(original).parameters) != _PARAMETERS or not hasattr(
        KafkaNetSocket, "sock_connect"
    ):
        return False

    async def connect(
        self: Any, net: Any, addrinfo: Any, socket_options: Any = (), timeout_at: Any = None
    ) -> Any:
        family, sock_type, proto, _canonname, sockaddr = addrinfo
        sock = self.socket(family, sock_type, proto)
        try:
            sock.setblocking(False)
            for option in socket_options:
                sock.setsockopt(*option)
            return await self.sock_connect(net, sock, sockaddr, timeout_at=timeout_at)
        except BaseException:
            sock.close()
            raise

    connect.closes_failed = True  # type: ignore[attr-defined]
    KafkaNetSocket.connect = connect
    return True
