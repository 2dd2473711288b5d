"""Four faults of kafka-python 3.0 that a broker outage brings out, and two waits it adds to a
consumer's polls, mended where the worker meets them. Each is applied only to the code it mirrors; a
kafka-python that differs is left as it is. The first two apply when ``worker.kafka`` is
imported; ``mend`` applies the others to each client the worker makes. Cut off from Kafka by a
network partition, a worker used 1.2 cores before ``steady_sender`` and ``steady_poll`` (0.9 with
only the first), 0.02 after.

- The socket of a connection attempt that fails is left to the garbage collector: the failed
  attempt's exception, kept by the connection it was for, holds the frame that holds the socket,
  a reference cycle that only the cyclic collector frees. The worker runs that collector seldom
  (``worker.runtime.tune_gc``), so while a broker was unreachable each client kept about one
  more socket a second: a worker went from 20 open sockets to 78 in the first minute of an
  outage, without end. ``close_failed_connects`` closes it where the attempt fails.
- A consumer or admin client that cannot reach a broker within its bootstrap timeout raises from
  its constructor with its network thread already started, and nothing can close it: the thread
  goes on reconnecting for the life of the process. The worker makes such clients again and
  again while Kafka is away (its start-up retries, the budget exchange, the receipts writer and
  feed): one started with no broker went from 9 threads and 21 open files to 26 and 72 in its
  first minute. ``stop_failed_starts`` closes what such a constructor started.
- A producer's sender thread spins while a broker is connected but cannot take a request (every
  request slot waits on an answer, as in a network partition) or is being connected to: it waits
  the node's ``connection_delay``, which is 0 then, and is seconds where the sender reads
  milliseconds. ``steady_sender`` makes the sender wait on the network instead; an answer, a
  new record or a timer wakes it as before.
- A group member's ``poll`` spins while its heartbeat is overdue (the coordinator cannot be
  reached): it waits for records at most until the next heartbeat is due, which is 0 then, and
  each turn wakes the client's network thread. The heartbeat goes from that network thread
  whatever ``poll`` does, so ``steady_poll`` lets a poll wait at least ``OVERDUE_WAIT`` for
  records (which end the wait as they come).
- Every poll of a group member first makes sure its coordinator is known, on the client's
  network thread, and waits for the answer, even when it is known and connected: a round trip
  between threads each poll, 1-2 ms on two busy cores. Draining 120,000 records, the worker's
  coordinator polls waited 0.18-0.23 s in all, 0.10-0.14 s with ``known_coordinator`` (the
  group join's own waits are in both). It answers from the poll's own thread when the
  coordinator is known and its connection is up; otherwise the network thread looks, as before.
- A poll that empties what was fetched sends the next fetch before it returns, on the network
  thread, and waits for that with the records in hand: 4-15 ms a time on two busy cores;
  draining 120,000 records, the worker's polls waited 0.04-0.06 s in all for these sends, 0.02 s
  with ``prompt_fetches``. It hands the records over at once and lets the network thread send;
  a poll that found nothing still waits for its send, and then for the fetch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import structlog
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.net.inet import KafkaNetSocket

_log = structlog.get_logger("worker.kafka")
_PARAMETERS = ["self", "net", "addrinfo", "socket_options", "timeout_at"]
# How long a producer's sender waits on a node it cannot send to yet, at most (ms): the network
# wakes it as soon as anything changes, this only bounds a missed wake-up.
NOT_READY_WAIT_MS = 1000.0
# How long a group member's poll may wait for records when its heartbeat is overdue (s).
OVERDUE_WAIT = 0.1


def mend(client: Any) -> None:
    """Apply to ``client`` (any kafka-python client) what fits it."""
    steady_sender(client)
    steady_poll(client)
    known_coordinator(client)
    prompt_fetches(client)


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


def stop_failed_starts() -> bool:
    """Make the consumer's and the admin client's constructors close their network client
    (and with it its thread) when they fail. Returns whether they do (False: not the
    constructors expected)."""
    for cls in (KafkaConsumer, KafkaAdminClient):
        original: Any = cls.__init__
        if getattr(original, "stops_failed", False):
            continue
        if list(inspect.signature(original).parameters)[-1:] != ["configs"]:
            return False
        cls.__init__ = _stopping_on_failure(original)
    return True


def _stopping_on_failure(original: Any) -> Any:
    @functools.wraps(original)
    def init(self: Any, *args: Any, **configs: Any) -> None:
        try:
            original(self, *args, **configs)
        except BaseException:
            client = self.__dict__.get("_client")
            # The constructor's own error is the one to raise, not one from closing.
            with contextlib.suppress(Exception):
                if client is not None:
                    client.close()  # its connections, then its network thread
            raise

    init.stops_failed = True  # type: ignore[attr-defined]
    return init


def steady_sender(producer: Any) -> bool:
    """Give ``producer``'s sender a ``connection_delay`` it can wait on: the backoff left, in
    milliseconds, or ``NOT_READY_WAIT_MS`` for a node connected or connecting but not ready.
    Only the sender's client is changed (a consumer's coordinator reads the same method, with
    kafka-python's meaning). Returns whether it was (False: not the producer expected)."""
    client: Any = getattr(getattr(producer, "_sender", None), "_client", None)
    manager: Any = getattr(client, "_manager", None)
    if not (
        hasattr(manager, "connection_delay")
        and isinstance(getattr(manager, "_conns", None), dict)
        and hasattr(client, "is_ready")
    ):
        return False

    def connection_delay(node_id: Any) -> float:
        backoff = manager.connection_delay(node_id)  # seconds
        if backoff > 0:
            return float(backoff) * 1000
        if node_id in manager._conns and not client.is_ready(node_id):
            return NOT_READY_WAIT_MS
        return 0.0

    client.connection_delay = connection_delay
    return True


def steady_poll(consumer: Any) -> bool:
    """Let ``consumer``'s poll wait at least ``OVERDUE_WAIT`` for records when its heartbeat is
    overdue. Returns whether it does (False: not the consumer expected)."""
    coordinator: Any = getattr(consumer, "_coordinator", None)
    original = getattr(coordinator, "time_to_next_poll", None)
    if original is None or not callable(original):
        return False
    if getattr(original, "steady", False):
        return True

    def time_to_next_poll() -> float:
        return max(float(original()), OVERDUE_WAIT)

    time_to_next_poll.steady = True  # type: ignore[attr-defined]
    coordinator.time_to_next_poll = time_to_next_poll
    return True


def known_coordinator(consumer: Any) -> bool:
    """Make ``consumer``'s coordinator answer ``ensure_coordinator_ready`` without the network
    thread while the coordinator is known and connected (two reads: a stale one only sends the
    next poll the long way). Returns whether it does (False: not the consumer expected)."""
    coordinator: Any = getattr(consumer, "_coordinator", None)
    original = getattr(coordinator, "ensure_coordinator_ready", None)
    client: Any = getattr(coordinator, "_client", None)
    if original is None or not callable(getattr(client, "connected", None)):
        return False
    if getattr(original, "known", False):
        return True
    if not hasattr(coordinator, "coordinator_id"):
        return False

    def ensure_coordinator_ready(timeout_ms: Any = None) -> bool:
        node = coordinator.coordinator_id
        if node is not None and client.connected(node):
            return True
        return bool(original(timeout_ms=timeout_ms))

    ensure_coordinator_ready.known = True  # type: ignore[attr-defined]
    coordinator.ensure_coordinator_ready = ensure_coordinator_ready
    return True


def prompt_fetches(consumer: Any) -> bool:
    """Let ``consumer``'s poll hand over the records it has without waiting for the network
    thread to send the next fetch; a poll that has none still waits for the send (it then
    waits for the fetch it sent). Returns whether it does (False: not the consumer expected)."""
    fetcher: Any = getattr(consumer, "_fetcher", None)
    fetched = getattr(fetcher, "fetched_records", None)
    send = getattr(fetcher, "send_fetches", None)
    call_soon = getattr(getattr(fetcher, "_manager", None), "call_soon", None)
    if fetched is None or send is None or call_soon is None:
        return False
    if getattr(send, "prompt", False):
        return True
    if not callable(getattr(fetcher, "_send_fetches_async", None)) or not hasattr(
        fetcher, "fetch_records"
    ):
        return False
    # What the poll's last look at the buffer found: the send that follows it is awaited only
    # when it found nothing. Only the poll's thread calls either method.
    found = [False]

    def fetched_records(*args: Any, **kwargs: Any) -> Any:
        records, partial = fetched(*args, **kwargs)
        found[0] = bool(records)
        return records, partial

    def send_fetches() -> Any:
        if not found[0]:
            return send()
        # A send that fails here fails again, awaited, at the first poll that finds nothing.
        call_soon(fetcher._send_fetches_async).add_errback(
            lambda exc: _log.debug("fetch not sent; the next poll sends it", error=str(exc))
        )
        return []

    send_fetches.prompt = True  # type: ignore[attr-defined]
    fetcher.fetched_records = fetched_records
    fetcher.send_fetches = send_fetches
    return True
