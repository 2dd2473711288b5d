"""Plans remembered by an event's data, found without reading the data.

In a backlog the same article comes by again and again, each time as a new CloudEvent: its own
id and time, the same data. When the rules that can match an event of its topic and type read
nothing but its ``data``, two such events whose data are the same bytes get the same plan. So
the planning process reads only the envelope of such an event (id, type, time; a quarter of the
work of decoding it whole and walking the paths the rules read) and looks its plan up by the
data's bytes. What the look-up finds was made the whole way (``Planner.planned``) for an event
with the same topic, type and data bytes.

Anything out of the ordinary goes the whole way, and is judged there: a record with headers
(binary CloudEvents, a content type) or over the size limit, an envelope that is not a plain
structured CloudEvent 1.0 with string attributes and data, a time that is not one, rules that
read outside ``data``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import NamedTuple

import msgspec

from worker.errors import InvalidEvent
from worker.events import Record
from worker.intake.decode import event_time, record_time
from worker.planning.rules.ruleset import Reads


class _Envelope(msgspec.Struct):
    """A structured CloudEvent's attributes the plan needs, and its data left unread."""

    specversion: str
    id: str
    source: str
    type: str
    data: msgspec.Raw
    time: str | None = None


_read_envelope = msgspec.json.Decoder(_Envelope).decode
_make = tuple.__new__

DATA, NOTHING = 1, 2  # what a plan depends on besides topic and type (``ByData._depends``)
_UNKNOWN = -1
# Look-ups by data a topic's judge weighs at a time, and how many of the topic's records then go
# the whole way without a look, if the look-ups mostly missed plans the whole way found.
JUDGED = 1_000
RESTING = 20_000
# Topics, and topic and type pairs, remembered at most (then started over): they are few, but
# a replayed record names its origin's topic, which a dead letter's headers say.
KEPT = 10_000


class Judge:
    """Whether looking plans up by data pays on a topic. It does not when the data vary in
    what the rules do not read (a version, a time of update): every look-up misses, and the
    whole way finds the plan anyway (3.0 -> 5.0 us an event, measured). Looks that miss where
    the whole way also makes a new plan say nothing, so a backlog's first pass is not judged."""

    __slots__ = ("found", "missed", "resting")

    def __init__(self) -> None:
        self.found = self.missed = self.resting = 0

    def hit(self) -> None:
        self.found += 1
        if self.found + self.missed >= JUDGED:
            self._judge()

    def miss(self) -> None:
        """A look-up missed a plan the whole way had remembered."""
        self.missed += 1
        if self.found + self.missed >= JUDGED:
            self._judge()

    def _judge(self) -> None:
        if self.missed > self.found:
            self.resting = RESTING
        self.found = self.missed = 0


class Found(NamedTuple):
    """An event whose plan may be looked up by ``key``, and what its plan carries of it."""

    key: Hashable
    event_id: str
    event_time: float | None  # its own time, else its record's
    record_time: float | None
    judge: Judge


class ByData:
    def __init__(
        self,
        reads_for: Callable[[str, str | None], Reads | None],
        max_bytes: int,
    ) -> None:
        self._reads_for = reads_for
        self._max_bytes = max_bytes
        # Per topic and type: what the plan of such an event depends on besides them. ``DATA``:
        # its data alone; ``NOTHING``: nothing (no rule can match: a stream of page views has
        # one plan, whatever each view's data); None: something outside its data.
        self._depends: dict[tuple[str, str], int | None] = {}
        self._judges: dict[str, Judge] = {}

    def find(self, record: Record) -> Found | None:
        """The key ``record``'s plan is remembered by, or None: plan it the whole way."""
        topic = (record.origin or record).topic
        judge = self._judges.get(topic)
        if judge is None:
            if len(self._judges) >= KEPT:
                self._judges.clear()
            judge = self._judges[topic] = Judge()
        if judge.resting:
            judge.resting -= 1
            return None
        value = record.value
        if record.headers or value is None or len(value) > self._max_bytes:
            return None
        try:
            envelope = _read_envelope(value)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return None
        etype = envelope.type
        if not (envelope.specversion == "1.0" and envelope.id and etype and envelope.source):
            return None
        depends = self._depends.get((topic, etype), _UNKNOWN)
        if depends == _UNKNOWN:
            depends = self._learn(topic, etype)
        if depends is None:
            return None
        stamp = record_time(record)
        try:
            when = event_time(envelope.time) or stamp
        except InvalidEvent:
            return None
        key = (topic, etype, bytes(envelope.data) if depends == DATA else b"")
        # A named tuple's own constructor is a Python call; this is its C constructor.
        return _make(Found, (key, envelope.id, when, stamp, judge))

    def _learn(self, topic: str, etype: str) -> int | None:
        reads = self._reads_for(topic, etype)
        depends: int | None = None
        if reads is not None and all(path[0] == "data" for path in reads):
            depends = DATA if reads else NOTHING
        if len(self._depends) >= KEPT:
            self._depends.clear()
        self._depends[(topic, etype)] = depends
        return depends
