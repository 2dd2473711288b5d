"""What every Kafka client of the worker shares: connection options from the settings (with the
TLS context built here), records and offsets translated to and from kafka-python's types, and its
errors translated into the worker's, the causes of a failed connection named. Nothing outside
``worker.kafka`` imports kafka-python; this is where its vocabulary ends.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import structlog
from kafka import KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka import errors as kafka_errors
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from worker.config.settings import KafkaSettings
from worker.errors import AccessError, RetryableError
from worker.events import Record, TopicPartition
from worker.kafka.repairs import mend

_log = structlog.get_logger("worker.kafka")

__all__ = ["KafkaError", "connecting", "options", "unavailable"]

T = TypeVar("T")
# How long a client waits for its first broker. A broker that is down is retried by the caller;
# one that refuses us says why within this.
BOOTSTRAP_MS = 5000
# OpenSSL's verify codes for a certificate that does not name the host (or IP) connected to.
_WRONG_HOST = {62, 64}
_SASL_FAILED = (kafka_errors.SaslAuthenticationFailedError, kafka_errors.IllegalSaslStateError)
_REFUSALS = (
    ssl.SSLError,
    *_SASL_FAILED,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.AuthorizationError,
)
# How long a refusal met by any client still explains another's failure to connect.
REFUSAL_MEMORY = 30.0
# The brokers' version per cluster, as its first client learned it. Told it, a client skips
# kafka-python's probe and the 100 ms it then waits before asking for topic metadata.
_VERSIONS: dict[tuple[tuple[str, ...], str], tuple[int, ...]] = {}


def options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by the consumer, the producers and the admin client. Raises
    ``AccessError`` when a TLS file cannot be used."""
    sec = settings.security
    opts: dict[str, Any] = {
        "bootstrap_servers": list(settings.bootstrap_servers),
        "client_id": settings.client_id,
        "security_protocol": sec.protocol,
        "bootstrap_timeout_ms": BOOTSTRAP_MS,
    }
    if known := _VERSIONS.get((tuple(settings.bootstrap_servers), sec.protocol)):
        opts["api_version"] = known
    if sec.sasl_mechanism:
        opts["sasl_mechanism"] = sec.sasl_mechanism
        opts["sasl_plain_username"] = sec.sasl_username
        password = settings.sasl_password
        opts["sasl_plain_password"] = password.reveal() if password else None
    if sec.protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = tls_context(settings)
    return opts


def learn_version(settings: KafkaSettings, client: Any) -> None:
    """Remember the brokers' version ``client`` learned, for the clients made after it."""
    version, servers = getattr(client, "config", {}).get("api_version"), settings.bootstrap_servers
    if isinstance(version, tuple) and version:
        _VERSIONS.setdefault((tuple(servers), settings.security.protocol), version)


def tls_context(settings: KafkaSettings) -> ssl.SSLContext:
    """The TLS context of every connection: the brokers verified against ``ssl_cafile`` (or the
    system's CAs) and their host names checked; a client certificate when configured. A key is
    decrypted only with ``ssl_password_env``'s passphrase: OpenSSL never prompts on a terminal
    (a prompt would block start-up for ever where stdin is open)."""
    sec = settings.security
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    key = "kafka.security.ssl_cafile"
    try:
        if sec.ssl_cafile:
            ctx.load_verify_locations(sec.ssl_cafile)
        else:
            ctx.load_default_certs()
        if sec.ssl_certfile:
            key = "kafka.security.ssl_certfile"
            passphrase = settings.ssl_password
            ctx.load_cert_chain(
                sec.ssl_certfile,
                sec.ssl_keyfile,
                password=passphrase.reveal() if passphrase else _no_passphrase,
            )
    except AccessError:
        raise
    except OSError as exc:  # ssl.SSLError is one
        raise AccessError(f"{key}: cannot use it: {_tls_reason(exc)}") from None
    return ctx


def _no_passphrase() -> str:
    raise AccessError(
        "kafka.security.ssl_keyfile is encrypted: set kafka.security.ssl_password_env to the "
        "environment variable holding its passphrase"
    )


def _tls_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        if "BAD_DECRYPT" in str(exc) or "bad decrypt" in str(exc):
            return "the key's passphrase (ssl_password_env) does not decrypt it"
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


class _Failures(logging.Handler):
    """Keeps the exceptions kafka-python logs while it connects, from any of the worker's
    clients: it retries them quietly and in the end raises only a timeout, while they say why
    (a refusal may reach one client and leave another with "socket disconnected")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: deque[tuple[float, BaseException]] = deque(maxlen=200)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            args = record.args if isinstance(record.args, tuple) else ()
            for a in args:
                if isinstance(a, BaseException) and _refusal_like(a):
                    self.seen.append((record.created, a))
        except Exception:  # noqa: BLE001 (kafka-python's logging call must never fail on us)
            self.handleError(record)

    def since(self, moment: float) -> list[BaseException]:
        return [exc for at, exc in list(self.seen) if at >= moment]


_FAILURES = _Failures()


def connecting(make: Callable[[], T], settings: KafkaSettings, doing: str) -> T:
    """``make()`` a client. Raises ``AccessError`` naming the cause when Kafka refused us
    (credentials, TLS, hostname, an ACL) and ``RetryableError`` when it could not be reached."""
    logger = logging.getLogger("kafka")
    if _FAILURES not in logger.handlers:
        logger.addHandler(_FAILURES)
    # A refusal another client met lately (the budget exchange connects first) counts too.
    started = time.time() - REFUSAL_MEMORY
    try:
        client = make()
    except KafkaError as exc:
        seen = [*_FAILURES.since(started), exc]
        refused = next((c for c in (_refusal(e, settings) for e in seen) if c), None)
        if refused is not None:
            raise AccessError(f"{doing}: {refused}") from None
        raise unavailable(doing, exc) from None
    learn_version(settings, client)
    mend(client)  # so that it waits out an outage instead of spinning
    return client


def _refusal_like(arg: BaseException) -> bool:
    """Whether a logged exception may say why Kafka refused us (kept, the rest passed over).
    A lost connection is kept too: where it was lost is known only once it has been raised."""
    kinds = (*_REFUSALS, kafka_errors.KafkaConnectionError)
    return any(isinstance(e, kinds) for e in _chain(arg))


def _during_sasl(e: BaseException) -> bool:
    """The connection was lost while the credentials were being checked: a broker closes it
    without an answer (after a delay) when they are wrong."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_sasl_authenticate":
            return True
        tb = tb.tb_next
    return False


def _tls_alert(e: BaseException) -> bool:
    """A TLS alert from the broker, which reaches kafka-python as text only."""
    return isinstance(e, kafka_errors.KafkaConnectionError) and "[SSL: " in str(e)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _refusal(exc: BaseException, settings: KafkaSettings) -> str | None:
    """Why Kafka refused the connection, in a line naming what to fix (None: perhaps it is down)."""
    sec = settings.security
    chain = list(_chain(exc))
    for e in chain:  # a certificate check names its cause precisely: it goes first
        if isinstance(e, ssl.SSLCertVerificationError):
            if e.verify_code in _WRONG_HOST:
                return (
                    f"TLS: the broker's certificate does not name the address connected to "
                    f"({e.verify_message}); use the host name the certificate was made for in "
                    "kafka.bootstrap_servers"
                )
            return (
                f"TLS: the broker's certificate is not trusted ({e.verify_message}); "
                "kafka.security.ssl_cafile must name the CA that signed it"
            )
    for e in chain:
        if isinstance(e, _SASL_FAILED) or (
            isinstance(e, kafka_errors.KafkaConnectionError) and _during_sasl(e)
        ):
            return (
                f"authentication failed for user {sec.sasl_username!r} ({sec.sasl_mechanism}): "
                f"check kafka.security.sasl_username and the password in "
                f"${sec.sasl_password_env}"
            )
        if isinstance(e, kafka_errors.UnsupportedSaslMechanismError):
            return f"the broker does not offer SASL mechanism {sec.sasl_mechanism}"
        if isinstance(e, kafka_errors.AuthorizationError):
            return f"not authorized: {type(e).__name__}"
        if isinstance(e, ssl.SSLError) or _tls_alert(e):
            reason = getattr(e, "reason", None) or str(e)
            return (
                f"TLS handshake failed ({reason}); does the listener speak {sec.protocol}? "
                "Does it want a client certificate (ssl_certfile, ssl_keyfile)?"
            )
    return None


def unavailable(doing: str, exc: KafkaError) -> RetryableError:
    """A kafka-python failure as the worker's error, naming what was being done."""
    return RetryableError(f"{doing}: {type(exc).__name__}: {exc}")


def kafka_offsets(offsets: dict[TopicPartition, int]) -> dict[KafkaTP, OffsetAndMetadata]:
    """Offsets to commit, as kafka-python's ``commit`` takes them."""
    return {KafkaTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}


def millis(seconds: float) -> int:
    """A kafka-python ``timeout_ms`` from seconds, never below 1 ms."""
    return max(1, int(seconds * 1000))


def to_record(r: Any) -> Record:
    """A kafka-python ConsumerRecord as the worker's ``Record``."""
    headers = tuple(h) if (h := r.headers) else ()  # most have none: no tuple each
    return Record(r.topic, r.partition, r.offset, r.key, r.value, headers, r.timestamp)


@contextlib.contextmanager
def translated(doing: str) -> Iterator[None]:
    """kafka-python's errors inside as the worker's: an authorization failure is an
    ``AccessError`` naming what was denied, anything else retryable."""
    try:
        yield
    except kafka_errors.AuthorizationError as exc:
        raise AccessError(f"{doing}: not authorized ({type(exc).__name__})") from None
    except KafkaError as exc:
        raise unavailable(doing, exc) from None


def confirming_producer(settings: KafkaSettings, wait: float, linger_ms: int, doing: str) -> Any:
    """A producer whose sends are confirmed by every in-sync replica or fail within ``wait``
    seconds (metadata, request and delivery alike): the dead-letter and receipts writers'."""
    wait_ms = int(wait * 1000)
    return connecting(
        lambda: KafkaProducer(
            **options(settings),
            acks="all",
            linger_ms=linger_ms,
            max_block_ms=wait_ms,
            request_timeout_ms=wait_ms,
            delivery_timeout_ms=wait_ms + 5_000,
        ),
        settings,
        doing,
    )


def close_quietly(producer: Any) -> None:
    """Close a producer being thrown away (after a failed batch) without waiting or raising."""
    if producer is None:
        return
    try:
        producer.close(timeout=0)
    except Exception as exc:  # noqa: BLE001 (it is being thrown away)
        _log.debug("discarded producer did not close cleanly", error=str(exc))
