"""Records in flight, a poll's runs at a time: offsets commit only behind finished records.

The tracker is checked against the plainest model there is: per partition, every offset read
since the partition was last forgotten, each finished or not; the committable offset is the one
past the longest finished prefix.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.events import Record, TopicPartition
from worker.outcome.inflight import InFlightRecords, Opened, Ref

TPS: list[TopicPartition] = [("cms", 0), ("cms", 1), ("shop", 0)]


class Model:
    def __init__(self) -> None:
        self.offsets: dict[TopicPartition, dict[int, bool]] = {tp: {} for tp in TPS}
        self.next: dict[TopicPartition, int] = dict.fromkeys(TPS, 0)
        self.committable: dict[TopicPartition, int] = {}

    def read(self, tp: TopicPartition, offsets: list[int]) -> None:
        for offset in offsets:
            self.offsets[tp][offset] = False
        self.next[tp] = offsets[-1] + 1

    def finished(self, tp: TopicPartition, offset: int) -> None:
        assert self.offsets[tp][offset] is False, "finished twice"
        self.offsets[tp][offset] = True
        prefix = None
        for o in sorted(self.offsets[tp]):
            if not self.offsets[tp][o]:
                break
            prefix = o + 1
        if prefix is not None:
            self.committable[tp] = prefix

    def forget(self, tp: TopicPartition) -> None:
        self.offsets[tp] = {}
        self.committable.pop(tp, None)

    def unfinished(self) -> int:
        return sum(not done for offsets in self.offsets.values() for done in offsets.values())


def poll(model: Model, runs: list[tuple[TopicPartition, int, int]]) -> list[Record]:
    records = []
    for tp, start, count in runs:
        offsets = list(range(start, start + count))
        records += [Record(tp[0], tp[1], o, None, b"{}") for o in offsets]
    return records


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_offsets_commit_exactly_behind_the_finished_prefix(data: st.DataObject) -> None:
    records, model = InFlightRecords(), Model()
    unplanned: list[Opened] = []
    waiting: list[Ref] = []
    rewinds: list[set[TopicPartition]] = []

    def rewound(tps: set[TopicPartition]) -> None:
        rewinds.append(tps)
        records.forget(tps)
        for tp in tps:
            model.forget(tp)
        waiting[:] = [ref for ref in waiting if ref.tp not in tps]

    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["poll", "poll", "plan", "plan", "finish", "forget"]))
        if op == "poll":
            runs = []
            for tp in data.draw(st.lists(st.sampled_from(TPS), unique=True, max_size=3)):
                rewind = data.draw(st.integers(0, 9)) == 0 and model.next[tp] > 0
                start = data.draw(st.integers(0, model.next[tp] - 1)) if rewind else model.next[tp]
                runs.append((tp, start, data.draw(st.integers(1, 5))))
            expected_rewinds = [
                {tp} for tp, start, _ in runs if model.offsets[tp] and start < model.next[tp]
            ]
            before = len(rewinds)
            opened = records.open(poll(model, runs), 0.0, rewound)
            assert rewinds[before:] == expected_rewinds
            for tp, start, count in runs:
                model.read(tp, list(range(start, start + count)))
            unplanned.append(opened)
        elif op == "plan" and unplanned:
            opened = unplanned.pop(0)  # plans come back in the order the polls went out
            for tp, run, lo, hi in opened.runs:
                if not run.alive:
                    continue
                held: set[int] = set()
                for record in opened.records[lo:hi]:
                    if data.draw(st.booleans()):
                        ref = Ref(tp[0], tp[1], record.offset, run.seq)
                        records.waits(ref, records.add(ref, record, 0.0), 1)
                        held.add(record.offset)
                        waiting.append(ref)
                    else:
                        model.finished(tp, record.offset)
                records.planned(tp, run, held)
        elif op == "finish" and waiting:
            ref = waiting.pop(data.draw(st.integers(0, len(waiting) - 1)))
            records.settle(ref, 1)
            for ready, _ in records.take_ready():
                records.finish(ready)
                model.finished(ready.tp, ready.offset)
        elif op == "forget":
            rewound({data.draw(st.sampled_from(TPS))})
        assert records.committable() == model.committable
        assert len(records) == model.unfinished()
        assert records.last_seen() == {
            tp: max(offsets) for tp, offsets in model.offsets.items() if offsets
        }


def test_a_run_with_nothing_to_wait_for_commits_whole() -> None:
    records = InFlightRecords()
    opened = records.open([Record("cms", 0, o, None, b"{}") for o in range(2000)], 0.0, print)
    ((tp, run, lo, hi),) = opened.runs
    assert (tp, lo, hi) == (("cms", 0), 0, 2000) and len(records) == 2000
    records.planned(tp, run, set())
    assert records.committable() == {("cms", 0): 2000} and len(records) == 0


def test_a_waiting_record_holds_back_the_runs_after_it() -> None:
    records = InFlightRecords()
    first = records.open([Record("cms", 0, o, None, b"{}") for o in range(10)], 0.0, print)
    second = records.open([Record("cms", 0, o, None, b"{}") for o in range(10, 20)], 0.0, print)
    (tp, run, _, _), (_, later, _, _) = first.runs[0], second.runs[0]
    ref = Ref("cms", 0, 4, run.seq)
    records.waits(ref, records.add(ref, first.records[4], 0.0), 1)
    records.planned(tp, run, {4})
    records.planned(tp, later, set())
    assert records.committable() == {("cms", 0): 4}
    records.settle(ref, 1)
    ((ready, _),) = records.take_ready()
    records.finish(ready)
    assert records.committable() == {("cms", 0): 20}
