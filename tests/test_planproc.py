"""Planning in a second process: the same plans as the loop's own planner, through a real child
process and pipe, and the child's life tied to the worker's."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import cloudevent, make_config
from worker.events import Record
from worker.planning import numbering, process
from worker.planning.planner import SKIPPED, Planned, Planner, Routed
from worker.planning.process import PlannerDied, PlanningProcess, usable_cpus, wanted
from worker.targets import Target

RULES = [
    {
        "name": "article",
        "match": {"type": "article.updated"},
        "urls": ["https://www.example.com/{data.locales[]}/{data.slug}"],
        "tags": ["article-{data.id}"],
        "zone": "example.com",
        "warm": True,
    },
    {"name": "image", "match": {"type": "image.updated"}, "urls": ["https://{data.host}/x"]},
]


def records(count: int, start: int = 0) -> list[Record]:
    out = []
    for i in range(start, start + count):
        if i % 7 == 3:
            value = b"{not json"
        elif i % 7 == 5:
            value = cloudevent("image.updated", {"host": "evil.org"}, f"e{i}")  # unknown zone
        else:
            data = {"slug": f"s{i % 11}", "locales": ["en", "de"][: 1 + i % 2], "id": i % 5}
            value = cloudevent("article.updated", data, f"e{i}")
        out.append(Record("cms", i % 3, i, b"k", value, (), 1_800_000_000_000 + i))
    return out


def same(got: Planned, want: Planned) -> None:
    assert got[:4] == want[:4]  # id, times, skipped
    assert list(got.targets) == list(want.targets)
    assert list(got.warm) == list(want.warm)
    assert [(type(e), str(e)) for e in got.errors] == [(type(e), str(e)) for e in want.errors]
    assert [str(e) for e in got.dropped] == [str(e) for e in want.dropped]


@pytest.fixture
def config():
    return make_config("http://127.0.0.1:1", rules=RULES)


@pytest.fixture
def remote(config):
    process = PlanningProcess(config.planning).start()
    yield process
    process.close()


def test_the_process_plans_exactly_what_the_loop_would(config, remote):
    batch = records(300)
    remote.submit(batch)
    remote.submit(batch[:10])  # a second batch before the first is collected
    planner = Planner(config.planning)
    want = [Planned.of(planner.plan(r), use_event_time=False) for r in batch]
    got = remote.collect()
    assert len(got) == 300 and any(p.errors for p in got) and any(p.warm for p in got)
    for g, w in zip(got, want, strict=True):
        same(g, w)
    for g, w in zip(remote.collect(), want[:10], strict=True):
        same(g, w)


def test_a_polls_batch_goes_out_without_waiting_for_the_child(config, remote):
    """The pipe to the child holds a poll's batch (about 400 KB in the benchmark's backlog), so
    sending it never waits for the child to read; a batch larger than the pipe still arrives
    whole, as do its plans."""
    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        pytest.skip("pipe capacity is a Linux setting")
    assert fcntl.fcntl(remote._out.fileno(), fcntl.F_GETPIPE_SZ) == process.PIPE_BYTES
    big = [r._replace(value=r.value + b" " * 3000) for r in records(1000)]  # about 3.5 MB
    remote.submit(big)
    remote.submit(big[:5])
    planner = Planner(config.planning)
    for g, r in zip(remote.collect(), big, strict=True):
        same(g, Planned.of(planner.plan(r), use_event_time=False))
    assert len(remote.collect()) == 5


def test_records_no_rule_fires_for_share_one_plan_across_the_pipe(config, remote):
    """In a stream of page views most records match no rule: each crosses back as one byte and
    becomes the one shared plan, which the loop finishes without pending anything."""
    views = [
        Record("cms", 0, i, None, cloudevent("page.viewed", {"n": i}, f"v{i}"), (), 1_800_000_000)
        for i in range(3)
    ]
    batch = [*views, *records(20)]
    remote.submit(batch)
    got = remote.collect()
    assert all(plan is SKIPPED for plan in got[:3])
    assert not any(plan is SKIPPED for plan in got[3:])
    assert Planned.of(Planner(config.planning).plan(views[0]), use_event_time=False) is SKIPPED
    assert SKIPPED.skipped and not (SKIPPED.targets or SKIPPED.errors or SKIPPED.warm)


@pytest.mark.parametrize("table", ["NUMBERED_TARGETS", "NUMBERED_LISTS"])
def test_numbering_starts_over_without_mixing_targets_up(config, monkeypatch, table):
    monkeypatch.setattr(numbering, table, 5)  # the child is forked with it
    remote = PlanningProcess(config.planning).start()
    try:
        planner = Planner(config.planning)
        for start in range(0, 400, 40):
            batch = records(40, start)
            remote.submit(batch)
            for record, got in zip(batch, remote.collect(), strict=True):
                same(got, Planned.of(planner.plan(record), use_event_time=False))
    finally:
        remote.close()


def test_records_with_one_plan_share_one_list_of_targets(config, remote):
    """The pending stage knows records with the same plan by their list being the same object;
    a list crosses the pipe once, and rows name it by number after that."""
    batch = [r for r in records(70) if r.offset % 7 not in (3, 5)]  # no failures
    remote.submit(batch)
    remote.submit(batch)
    first, second = remote.collect(), remote.collect()
    assert all(p.targets for p in first)
    for a, b in zip(first, second, strict=True):
        assert b.targets is a.targets
    distinct = {id(p.targets) for p in first}
    assert len(distinct) == len({tuple(p.targets) for p in first})


def test_batches_larger_than_the_pipe_do_not_block_either_side(config, remote):
    big = [
        r._replace(value=r.value[:-1] + b', "pad": "' + b"x" * 4000 + b'"}')
        if r.value.startswith(b'{"spec')
        else r
        for r in records(3000)
    ]
    for _ in range(3):  # ~36 MB each way before anything is collected
        remote.submit(big)
    for _ in range(3):
        assert len(remote.collect()) == 3000


def test_a_dead_planning_process_is_an_error_naming_it(config, remote):
    remote.submit(records(5))
    assert len(remote.collect()) == 5
    os.kill(remote._process.pid, signal.SIGKILL)
    remote._process.join(5)
    with pytest.raises(PlannerDied, match=r"planning process ended \(exit code -9\)"):
        remote.submit(records(5))
        remote.collect()
    assert not remote.alive


def test_the_child_ignores_terminal_signals_and_ends_with_its_parent(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path.cwd())!r})
        from tests.helpers import make_config
        from worker.planning.process import PlanningProcess
        remote = PlanningProcess(make_config("http://127.0.0.1:1").planning).start()
        print(remote._process.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(child, signal.SIGINT)  # Ctrl-C reaches the whole process group
        os.kill(child, signal.SIGTERM)
        time.sleep(0.5)
        assert alive(child)
        parent.kill()  # kill -9: the pipe closes with it
        parent.wait(5)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        parent.kill()
        parent.wait(5)
        parent.stdout.close()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    ("cpu_max", "affinity_cap", "process"),
    [("max 100000\n", None, None), ("100000 100000\n", 1.0, False), ("200000 100000", 2.0, True)],
)
def test_auto_plans_in_a_process_only_with_two_cpus_to_use(
    tmp_path, cpu_max, affinity_cap, process
):
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    cpus = usable_cpus(path)
    affinity = len(os.sched_getaffinity(0))
    assert cpus == (affinity if affinity_cap is None else min(affinity, affinity_cap))
    if process is not None and affinity >= 2:
        assert wanted("auto", cpus) is process
    assert usable_cpus(tmp_path / "missing") == affinity
    assert wanted("process", 1) and not wanted("inline", 8)
    json.dumps(cpus)  # a plain number, as logged


def test_waiting_for_plans_the_loop_is_called_back_now_and_then(config, remote):
    # The loop frees the threads of ended requests while it waits for a slow batch's plans.
    import itertools
    import threading

    pid = remote._process.pid
    os.kill(pid, signal.SIGSTOP)  # the child is slow: it answers only once resumed
    threading.Timer(0.2, os.kill, (pid, signal.SIGCONT)).start()
    batch = records(50)
    remote.submit(batch)
    calls: list[float] = []
    got = remote.collect(lambda: calls.append(time.monotonic()))
    planner = Planner(config.planning)
    for g, r in zip(got, batch, strict=True):
        same(g, Planned.of(planner.plan(r), use_event_time=False))
    # Every WAIT_STEP (5 ms) of the 0.2 s wait, give or take a slow machine's scheduling.
    assert len(calls) >= 10
    assert max(b - a for a, b in itertools.pairwise(calls)) < 0.1


def test_plans_still_on_their_way_count_as_waiting_while_the_loop_does_other_work():
    # A batch whose plans are being waited for is still on its way (``waiting``): the loop's
    # work meanwhile must not take it for nothing more to come.
    from worker.planning.stage import Planning

    slow = Slow(done=0)
    planning: Planning[str] = Planning(None, slow)  # type: ignore[arg-type]
    seen: list[bool] = []
    batch = records(100)
    planning.submit("first", batch, lambda: seen.append(planning.waiting))
    assert seen == [] and planning.waiting  # a large batch is left to be planned meanwhile
    slow.done = 1
    planning.submit("empty poll", [], lambda: seen.append(planning.waiting))
    assert seen == [True]  # its plans, taken after a poll that brought nothing
    assert [name for name, _ in planning.poll()] == ["first"] and not planning.waiting


class Slow:
    """A planning process whose plans are in only once ``done`` says so."""

    alive = True

    def __init__(self, done: int = 1) -> None:
        self.sent: list[int] = []
        self.done = done  # batches planned
        self.waits: list[float] = []

    def submit(self, records):
        self.sent.append(len(records))

    def ready(self, wait=0.0):
        self.waits.append(wait)
        return self.done > 0

    def collect(self, meanwhile=None):
        if meanwhile is not None:
            meanwhile()
        self.done -= 1
        return [SKIPPED] * self.sent.pop(0)


def test_a_backlog_is_read_ahead_while_the_child_plans_and_taken_as_it_comes():
    # In a backlog the loop does not wait for a batch's plans to read the next poll: batches
    # stay on their way up to READ_AHEAD records, each taken once its plans are in.
    from worker.planning.stage import EMPTY_POLL_WAIT, READ_AHEAD, Planning

    slow = Slow(done=0)
    planning: Planning[int] = Planning(None, slow)  # type: ignore[arg-type]
    size = 2000
    n = READ_AHEAD // size
    for i in range(n):
        planning.submit(i, records(size))
    assert planning.waiting and planning.poll() == [] and len(slow.sent) == n
    planning.submit(n, records(size))  # past the bound: the oldest is waited for
    assert [i for i, _ in planning.poll()] == [0] and len(slow.sent) == n
    slow.done = 2  # two more are planned meanwhile: both taken at the next poll
    planning.submit(n + 1, records(50))  # a small batch in a backlog is not waited for
    assert [i for i, _ in planning.poll()] == [1, 2]
    slow.waits.clear()
    planning.submit(n + 2, [])  # Kafka had nothing yet: a short look, then back to Kafka
    assert slow.waits == [EMPTY_POLL_WAIT] and planning.poll() == []
    slow.done = len(slow.sent)
    planning.submit(n + 3, [])
    assert [i for i, _ in planning.poll()] == list(range(3, n + 2)) and not planning.waiting


def test_a_trickle_takes_its_plans_at_once():
    # No large batch on its way: a small poll's plans are waited for in the same step.
    from worker.planning.stage import Planning

    slow = Slow(done=1)
    planning: Planning[str] = Planning(None, slow)  # type: ignore[arg-type]
    planning.submit("few", records(3))
    assert [name for name, _ in planning.poll()] == ["few"] and not planning.waiting


def test_shutdown_takes_the_plans_that_come_within_the_deadline():
    from worker.planning.stage import Planning

    slow = Slow(done=0)
    planning: Planning[int] = Planning(None, slow)  # type: ignore[arg-type]
    for i in range(3):
        planning.submit(i, records(200))
    slow.done = 1  # the child plans one more batch, then no more before the deadline
    left = iter([2.0, 1.5])
    assert [i for i, _ in planning.join(lambda: next(left))] == [0]
    assert slow.waits[-2:] == [2.0, 1.5]  # the second batch was waited for as long as was left


def test_threads_freed_while_waiting_for_plans_send_with_the_steps_last_judgement():
    # Between the loop's judgements (waiting for plans) nothing is drained early and windows
    # stay open as long as the step's last sends held them.
    from worker.sending.stage import Sending

    calls: list[dict[str, object]] = []

    class Dispatcher:
        def dispatch(self, **kw: object) -> int:
            calls.append(kw)
            return 0

    sending = Sending(Dispatcher(), None, receipts=False)  # type: ignore[arg-type]
    sending.send(drain=True, defer=4.5)
    sending.send_again()
    assert calls == [{"drain": True, "defer": 4.5}, {"defer": 4.5}]


def test_a_young_backlog_is_planned_a_poll_behind_not_read_ahead():
    # Records younger than the ledger's margin: their targets wait for the repeats still
    # unread, and windows run from when a record was read, so the loop stays a poll behind.
    from worker.planning.stage import Planning

    slow = Slow(done=0)
    planning: Planning[int] = Planning(None, slow, aged=lambda records: False)  # type: ignore[arg-type]
    planning.submit(0, records(2000))
    assert planning.waiting and planning.poll() == []  # the newest batch is left to the child
    planning.submit(1, records(2000))
    assert [i for i, *_ in planning.poll()] == [0] and planning.waiting  # the one before: taken


def test_records_are_aged_when_all_were_written_longer_than_the_margin_ago():
    from worker.app import _aged
    from worker.clock import MockClock

    clock = MockClock()
    aged = _aged(clock, margin=5.0)
    now_ms = int(clock.time() * 1000)
    old = [r._replace(timestamp_ms=now_ms - 6_000) for r in records(3)]
    assert aged(old)
    assert not aged([*old, old[0]._replace(timestamp_ms=now_ms - 4_000)])  # one young
    assert not aged([*old, old[0]._replace(timestamp_ms=None)])  # one without a time
    assert not aged([*old, old[0]._replace(timestamp_ms=0)])  # nor one at 0 (``record_time``)


def test_targets_cross_back_as_the_workers_own_types():
    """Targets cross the pipe as plain tuples; the loop gets ``Routed`` and ``Target`` back, with
    their kind, mode, zone and cache-key headers, as its own planner makes them."""
    config = make_config("http://127.0.0.1:1")  # URLs with cache-key headers, prefixes, hosts
    events = [
        ("article.updated", {"locales": ["en"], "slug": "a", "id": 1}),
        ("section.changed", {"section": "news"}),
        ("site.rebuilt", {"host": "www.example.com"}),
    ]
    batch = [
        Record("cms", 0, i, None, cloudevent(kind, data, f"e{i}"), (), 1_800_000_000_000)
        for i, (kind, data) in enumerate(events)
    ]
    remote = PlanningProcess(config.planning).start()
    try:
        remote.submit(batch)
        got = remote.collect()
    finally:
        remote.close()
    planner = Planner(config.planning)
    for record, plan in zip(batch, got, strict=True):
        want = Planned.of(planner.plan(record), use_event_time=False).targets
        assert list(plan.targets) == list(want) and plan.targets
        for routed, made in zip(plan.targets, want, strict=True):
            assert type(routed) is Routed and type(routed.target) is Target
            assert routed.zone.id == made.zone.id and routed.mode is made.mode
            assert routed.target.kind is made.target.kind
    headers = [r.target.headers for p in got for r in p.targets if r.target.headers]
    assert headers, "the default rules make URLs with cache-key headers"
