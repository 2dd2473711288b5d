"""The ``kafka`` section as the worker uses it: the bootstrap servers (``KAFKA_BOOTSTRAP`` wins),
the secrets read from the environment, and every combination a broker would refuse caught before
anything connects (a SASL mechanism on a listener without SASL, TLS files without TLS, a
password variable that is not set)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from worker.cloudflare.auth import Secret
from worker.config.model import KafkaSection, KafkaSecurity
from worker.config.settings import KafkaSettings
from worker.errors import ConfigError

# host:port, [IPv6]:port.
_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d{1,5}$")


def build(s: KafkaSection, env: Mapping[str, str], source: str) -> KafkaSettings:
    """Raises ``ConfigError`` naming the key and the reason."""
    servers = s.bootstrap_servers
    where = "kafka.bootstrap_servers"
    if env.get("KAFKA_BOOTSTRAP"):
        servers, where = tuple(env["KAFKA_BOOTSTRAP"].split(",")), "KAFKA_BOOTSTRAP"
    _addresses(servers, where, source)
    topics = s.topics
    if not topics:
        raise ConfigError(source, "kafka.topics", "needs at least one topic")
    if s.dead_letter_topic in topics:
        raise ConfigError(
            source, "kafka.dead_letter_topic", "must not be one of the consumed topics"
        )
    if s.budget_topic is not None and s.budget_topic in (*topics, s.dead_letter_topic):
        raise ConfigError(
            source, "kafka.budget_topic", "must not be a consumed topic or the dead-letter topic"
        )
    taken = (*topics, s.dead_letter_topic, s.budget_topic)
    if s.receipts_topic is not None and s.receipts_topic in taken:
        raise ConfigError(
            source,
            "kafka.receipts_topic",
            "must not be a consumed topic, the dead-letter topic or the budget topic",
        )
    _combination(s.security, source)
    fields = {name: getattr(s, name) for name in type(s).model_fields}
    sec = s.security
    return KafkaSettings.model_validate(
        {
            **fields,
            "bootstrap_servers": servers,
            "sasl_password": _secret(sec.sasl_password_env, "sasl_password_env", env, source),
            "ssl_password": _secret(sec.ssl_password_env, "ssl_password_env", env, source),
        }
    )


def _addresses(servers: tuple[str, ...], where: str, source: str) -> None:
    for server in servers:
        if not _ADDRESS.match(server.strip()):
            hint = (
                " (an IPv6 address goes in brackets: [::1]:9092)" if server.count(":") > 1 else ""
            )
            raise ConfigError(source, where, f"{server!r} is not host:port{hint}")


def _combination(sec: KafkaSecurity, source: str) -> None:
    key = "kafka.security"
    sasl = sec.protocol.startswith("SASL_")
    tls = sec.protocol in ("SSL", "SASL_SSL")
    if sasl and not sec.sasl_mechanism:
        raise ConfigError(source, f"{key}.sasl_mechanism", f"protocol {sec.protocol} needs one")
    if not sasl and (sec.sasl_mechanism or sec.sasl_username or sec.sasl_password_env):
        raise ConfigError(
            source,
            f"{key}.protocol",
            f"{sec.protocol} sends no SASL credentials: use SASL_SSL (or SASL_PLAINTEXT) with "
            "sasl_mechanism, or remove the sasl_* keys",
        )
    if sasl and not (sec.sasl_username and sec.sasl_password_env):
        missing = "sasl_username" if not sec.sasl_username else "sasl_password_env"
        raise ConfigError(source, f"{key}.{missing}", f"{sec.sasl_mechanism} needs it")
    files = {"ssl_cafile": sec.ssl_cafile, "ssl_certfile": sec.ssl_certfile}
    files |= {"ssl_keyfile": sec.ssl_keyfile, "ssl_password_env": sec.ssl_password_env}
    given = [k for k, v in files.items() if v]
    if given and not tls:
        raise ConfigError(
            source,
            f"{key}.{given[0]}",
            f"protocol {sec.protocol} does not use TLS: use SSL or SASL_SSL, or remove it",
        )
    if sec.ssl_keyfile and not sec.ssl_certfile:
        raise ConfigError(source, f"{key}.ssl_keyfile", "needs ssl_certfile, the key's certificate")
    if sec.ssl_password_env and not sec.ssl_certfile:
        raise ConfigError(
            source, f"{key}.ssl_password_env", "is the passphrase of a client key: set ssl_keyfile"
        )


def _secret(name: str | None, key: str, env: Mapping[str, str], source: str) -> Secret | None:
    if not name:
        return None
    if not env.get(name):
        raise ConfigError(
            source, f"kafka.security.{key}", f"environment variable {name} is not set"
        )
    return Secret(env[name])
