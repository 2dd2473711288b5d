"""What the worker needs of the cluster, asked without side effects: which topics exist, and
which operations the broker's ACLs allow this worker's principal on them and on its group.

``run`` asks at start (and stops, naming the ACL to grant, when it cannot work), ``check
--online`` before a deploy. The answer comes from the broker itself (the operations it would
authorize, KIP-430), so it holds for any authorizer, and a topic this principal may not Describe
is told apart from one that does not exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from kafka import KafkaAdminClient
from kafka import errors as kafka_errors
from kafka.admin import NewTopic
from kafka.errors import KafkaError

from worker.config.settings import KafkaSettings
from worker.errors import AccessError
from worker.kafka.client import connecting, options, translated

# Kafka's error codes in a topic's metadata.
MISSING, DENIED = 3, 29


class Need(NamedTuple):
    """Operations the worker needs on one topic or group, and for what."""

    kind: str  # "topic" or "group"
    name: str
    operations: tuple[str, ...]
    what: str  # the feature, for the message
    fatal: bool = True  # False: the worker runs without it, with a warning
    creatable: bool = False  # a missing topic the worker makes if it may


class Problem(NamedTuple):
    line: str
    fatal: bool


def needs(settings: KafkaSettings) -> list[Need]:
    """Everything ``run`` uses, per feature (the README's ACL table)."""
    read = ("READ", "DESCRIBE")
    out = [Need("topic", t, read, "events are read from it") for t in settings.topics]
    out.append(Need("group", settings.group_id, read, "the workers' group"))
    dlq = settings.dead_letter_topic
    out.append(Need("topic", dlq, ("WRITE", "DESCRIBE"), "records that fail are written to it"))
    out.append(
        Need(
            "topic",
            dlq,
            ("READ",),
            "the dead-letter guard reads it back across restarts",
            fatal=False,
        )
    )
    # Topics the worker makes when it may, and runs without (with a warning).
    optional = (
        (
            settings.budget_topic,
            "workers share each account's budget through it (else: by partitions)",
        ),
        (
            settings.receipts_topic,
            "receipts of each purge are written to it and restore the ledger after a restart",
        ),
    )
    for topic, what in optional:
        if topic:
            rw = ("READ", "WRITE", "DESCRIBE")
            out.append(Need("topic", topic, rw, what, fatal=False, creatable=True))
    return out


def ensure_topic(
    settings: KafkaSettings, topic: str, partitions: int, configs: dict[str, str], layout: str
) -> bool:
    """Make ``topic`` if it is missing and this principal may (``partitions``, ``configs``); a
    topic an admin made is used as it is. True if it was made now. Raises ``AccessError`` naming
    the grant (``layout`` says how an admin should create it) or ``RetryableError``."""
    admin = admin_client(settings)
    try:
        with translated(f"cannot describe {topic}"):
            (found,) = admin.describe_topics([topic])
        code = found.get("error_code", 0)
        if code == DENIED:
            raise AccessError(
                f"not authorized to Describe {topic} (grant Read, Write and Describe on it)"
            )
        if code != MISSING:
            return False
        try:
            with translated(f"cannot create {topic}"):
                try:
                    new = NewTopic(topic, partitions, -1, topic_configs=dict(configs))
                    admin.create_topics([new])
                except kafka_errors.TopicAlreadyExistsError:
                    # Another worker, or this one's other writer, made it meanwhile (caught
                    # here: ``translated`` would make it an error).
                    return False
            return True
        except AccessError:
            raise AccessError(
                f"{topic} does not exist and this worker may not create it: create it "
                f"({layout}) and grant Read, Write and Describe on it"
            ) from None
    finally:
        admin.close()


def admin_client(settings: KafkaSettings) -> Any:
    return connecting(
        lambda: KafkaAdminClient(**options(settings), request_timeout_ms=10_000),
        settings,
        f"cannot reach Kafka at {','.join(settings.bootstrap_servers)}",
    )


def verify(
    settings: KafkaSettings, wanted: Iterable[Need] | None = None, *, ask_create: bool = True
) -> list[Problem]:
    """What stands between the worker and ``wanted`` (default: ``needs``). Raises
    ``AccessError`` or ``RetryableError`` when the cluster cannot be asked at all.

    ``ask_create=False`` leaves a missing topic the worker makes to the part that makes it
    (``run``: that part is starting beside the check and warns, naming the ACL, if it may not).
    Asking costs a create that only validates, a round trip to the controller (35-50 ms, on
    the way to a backlog's first records)."""
    wanted = list(needs(settings) if wanted is None else wanted)
    admin = admin_client(settings)
    try:
        topics = _topics(admin, {n.name for n in wanted if n.kind == "topic"})
        groups = _groups(admin, {n.name for n in wanted if n.kind == "group"})
        problems = []
        for need in wanted:
            found = topics[need.name] if need.kind == "topic" else groups[need.name]
            problem = _judge(admin, need, found, ask_create)
            if problem is not None:
                problems.append(problem)
        return problems
    finally:
        admin.close()


def _topics(admin: Any, names: set[str]) -> dict[str, tuple[int, set[str] | None]]:
    """Per topic: Kafka's error code and the operations authorized (None: not said)."""
    if not names:
        return {}
    with translated("cannot describe topics"):
        described = admin.describe_topics(sorted(names))
    out = {}
    for topic in described:
        ops = topic.get("authorized_operations")
        out[topic["name"]] = (topic.get("error_code", 0), None if ops is None else set(ops))
    return out


def _groups(admin: Any, names: set[str]) -> dict[str, tuple[int, set[str] | None]]:
    out: dict[str, tuple[int, set[str] | None]] = {}
    for name in names:
        try:
            described = admin.describe_groups([name], include_authorized_operations=True)
        except kafka_errors.GroupAuthorizationFailedError:
            out[name] = (DENIED, None)
            continue
        except KafkaError:
            out[name] = (0, None)  # not known: the join will tell
            continue
        ops = (described.get(name) or {}).get("authorized_operations")
        out[name] = (0, None if ops is None else set(ops))
    return out


def _judge(
    admin: Any, need: Need, found: tuple[int, set[str] | None], ask_create: bool
) -> Problem | None:
    code, allowed = found
    what = f"kafka: {need.kind} {need.name}"
    grant = " and ".join(o.title() for o in need.operations)
    if code == MISSING:
        if need.creatable and (not ask_create or _may_create(admin, need.name)):
            return None  # the worker makes it
        return Problem(
            f"{what} does not exist (create it; {need.what})"
            + ("" if not need.creatable else ", and this principal may not create it"),
            need.fatal,
        )
    if code == DENIED:
        return Problem(
            f"{what}: not authorized to Describe it ({need.what}: grant {grant})", need.fatal
        )
    if code:
        return Problem(f"{what}: the broker answered error {code}", need.fatal)
    if allowed is None:
        return None  # the broker does not say; the operations themselves will tell
    lacking = [o for o in need.operations if o not in allowed and "ALL" not in allowed]
    if lacking:
        ops = " and ".join(o.title() for o in lacking)
        return Problem(f"{what}: not authorized to {ops} ({need.what}: grant {grant})", need.fatal)
    return None


def _may_create(admin: Any, topic: str) -> bool:
    """Whether this principal may create ``topic`` (asked with a create that only validates)."""
    try:
        admin.create_topics([NewTopic(topic, 1, -1)], validate_only=True)
        return True
    except kafka_errors.TopicAlreadyExistsError:
        return True
    except KafkaError:
        return False


def check(settings: KafkaSettings) -> list[str]:
    """``check --online``'s lines: one per problem (what the worker would run without, too: the
    config asks for it)."""
    return [
        problem.line if problem.fatal else f"{problem.line}; the worker would run without it"
        for problem in verify(settings)
    ]
