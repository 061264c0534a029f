"""The streaming job against Google's Pub/Sub emulator, run as a user runs it, every message counted by id.

One emulator and one local Events API server for the module; each job is
``python -m pipelines.streaming_to_tinybird`` in a process group of its own on
Beam's DirectRunner, stopped with SIGINT or SIGTERM once the data source holds
what the test expects (or a deadline passes). Afterwards every id published is
looked for in the data source and in the dead-letter files, and what the
subscription still holds is read without consuming it.

Beam's DirectRunner pulls with a 30 s timeout on its only worker thread, so
on a quiet subscription its timers (the sink's ``max_buffering_secs``) wait
for the pull to return. While the first run waits for rows, a :class:`Trickle`
publishes one small message every 0.3 s (its ids are counted like the
others); it ends before the stop, which then waits for the last rows in
flight, through up to one such pull. The other runs post every row as it
comes (``--max_batch_rows 1``): they test the source, and stop at once.
"""

from __future__ import annotations

import collections
import datetime
import io
import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from pipelines_testlib import REPO_ROOT, PubSubEmulator, StreamingJob, held_messages, wait_for
from shared_testlib import dead_letters_in

from sinks.tinybird.dead_letters import STREAMING_FILE_EVERY_SECS
from tinybird_emulator import LocalServer

pytestmark = pytest.mark.timeout(420)

WINDOW_SECS = 10
TICK_IDS_FROM = 1_000_000
JOB_DEADLINE_SECS = 120.0
ACK_DEADLINE_SECS = 10
# Every row a full batch, posted at once: for tests about the source, whose stop then needs no timer.
UNBUFFERED = ("--max_batch_rows", "1")
GUARD_DIR = REPO_ROOT / "tests" / "tinybird_emulator" / "loopback_guard"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with PubSubEmulator(data_dir=tmp_path_factory.mktemp("pubsub")) as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalServer(data_dir=tmp_path_factory.mktemp("tinybird"), rate_limit_rps=None) as running:
        yield running


def _row(i: int, **more) -> bytes:
    return json.dumps({"id": i, "kind": "click", **more}).encode()


def _ndjson(ids) -> bytes:
    return b"\n".join(_row(i) for i in ids) + b"\n"


class Trickle:
    """Publishes ``{"id": N, "kind": "tick"}`` every ``every_secs`` until stopped; keeps the ids."""

    def __init__(self, emulator: PubSubEmulator, topic: str, *, first_id: int, every_secs: float = 0.3) -> None:
        self.ids: list[int] = []
        self._emulator, self._topic, self._next, self._every = emulator, topic, first_id, every_secs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def _run(self) -> None:
        with self._emulator.publisher() as client:
            while not self._stop.wait(self._every):
                client.publish(self._topic, json.dumps({"id": self._next, "kind": "tick"}).encode()).result(30)
                self.ids.append(self._next)
                self._next += 1

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(30)


def _stored(server: LocalServer, datasource: str) -> collections.Counter:
    server.flush()
    if datasource not in server.datasources():
        return collections.Counter()
    return collections.Counter(r["id"] for r in server.query(f"SELECT id FROM {datasource}"))


def _job_args(server: LocalServer, datasource: str, dead_dir: Path, *more: str) -> list[str]:
    return ["--api_url", server.url, "--token", server.token, "--datasource", datasource, "--wait",
            "--num_shards", "2", "--max_buffering_secs", "1", "--window_secs", str(WINDOW_SECS),
            "--dead_letter_path", str(dead_dir) + "/", "--max_dead_letter_ratio", "0.5", *more]


def _start(emulator: PubSubEmulator, args: list[str], work_dir: Path) -> StreamingJob:
    job = StreamingJob.start(args, emulator=emulator, work_dir=work_dir, guard_dir=GUARD_DIR)
    # Started once Beam's read has made its first pull: the log line comes just before.
    wait_for(lambda: "pipelines._streaming_run: Running on" in job.stderr or not job.running(), timeout_secs=60,
             what="the streaming job to start")
    return job


def _stop(job: StreamingJob, sig: int = signal.SIGINT) -> str:
    status = job.stop(sig=sig)
    assert status == 0, job.describe()
    # The guard was on (it saw the job's requests to the local server) and refused nothing.
    assert any(e["kind"] == "connect" and e["target"].startswith("127.0.0.1:") for e in job.guard_entries())
    assert job.refused_connections() == [], job.refused_connections()
    return job.stdout


def _summary_figures(stdout: str) -> dict[str, int]:
    figures = {}
    for line in stdout.splitlines():
        for name in ("rows read", "rows acknowledged", "dead letters"):
            if line.strip().startswith(name + " "):
                figures[name] = int(line.strip()[len(name):].split()[0].replace(",", ""))
    return figures


def _no_temporary_files(dead_dir: Path) -> list[str]:
    return sorted(p.name for p in dead_dir.iterdir() if not p.name.startswith("dead-letters-"))


def _window(epoch_secs: int) -> str:
    start = epoch_secs - epoch_secs % WINDOW_SECS

    def text(t: int) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    return f"[{text(start)}, {text(start + WINDOW_SECS)})"


def test_json_ndjson_bad_messages_event_times_and_a_restart_on_the_same_subscription(emulator, server, tmp_path):
    """Every id stored once or dead-lettered with its reason; what a stop acknowledged is not delivered again.

    Run 1 reads JSON, NDJSON and pretty-printed messages, messages that are
    not JSON, and messages whose ``ts`` attribute puts them in three windows an
    hour ago (late: the DirectRunner's watermark is the wall clock) or an hour
    ahead. It is stopped with SIGINT; then more messages are published while no
    job runs: the subscription holds exactly those, and run 2 (SIGTERM) stores
    them, with nothing of run 1 twice.
    """
    topic = emulator.create_topic("events-mixed")
    # The shortest ack deadline: a message handed to a pull that no one answers comes back soonest.
    subscription = emulator.create_subscription("events-mixed-sub", topic=topic, ack_deadline_secs=ACK_DEADLINE_SECS)
    datasource, dead_dir = "ps_mixed", tmp_path / "dead"
    now = int(time.time())
    late = now - 3600 - now % WINDOW_SECS  # the starts of three windows an hour ago
    late_windows = [late, late + WINDOW_SECS, late + 2 * WINDOW_SECS]

    messages: list = [_row(i) for i in range(40)]                              # JSON, publish time
    messages += [_ndjson(range(100 + 5 * k, 105 + 5 * k)) for k in range(8)]   # NDJSON, 5 rows each
    messages += [json.dumps({"id": 200 + k, "kind": "click"}, indent=2).encode() for k in range(2)]
    event_time_ids = {}
    for w, start in enumerate(late_windows):
        for k in range(4):
            i = 300 + 10 * w + k
            # Milliseconds since the epoch and RFC 3339, both accepted.
            ts = str((start + k) * 1000) if k % 2 else datetime.datetime.fromtimestamp(
                start + k, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            messages.append((_row(i), {"ts": ts}))
            event_time_ids[i] = start + k
    messages += [(_row(400 + k), {"ts": str((now + 3600 + k) * 1000)}) for k in range(3)]  # an hour ahead
    good = set(range(40)) | set(range(100, 140)) | {200, 201} | set(event_time_ids) | {400, 401, 402}
    good |= {500, 502}
    bad = {
        b"not json #1": None,
        b'["an array #2"]': None,
        b"\xff\xfe not utf-8 #3": None,
        b"{oops #4": _window(late_windows[0]),     # in the window of its ts attribute
        b"{oops #5": _window(late_windows[2]),
    }
    messages += [b"not json #1", b'["an array #2"]', b"\xff\xfe not utf-8 #3"]
    messages += [(b"{oops #4", {"ts": str(late_windows[0] * 1000)}),
                 (b"{oops #5", {"ts": str(late_windows[2] * 1000 + 9999)})]
    messages.append(_row(500) + b"\n{oops #6}\n" + _row(502))                   # NDJSON with one bad line

    job = _start(emulator, _job_args(server, datasource, dead_dir, "--input_subscription", subscription,
                                     "--timestamp_attribute", "ts"), tmp_path / "run1")
    with Trickle(emulator, topic, first_id=TICK_IDS_FROM) as trickle:
        emulator.publish(topic, messages)
        # Dead letters reach their final files within a pane of the writing step (not when a window closes).
        took = wait_for(lambda: len(dead_letters_in(dead_dir)) >= 6, timeout_secs=JOB_DEADLINE_SECS,
                        poll_secs=0.05, what="run 1's 6 dead letters in final files")
        assert took < STREAMING_FILE_EVERY_SECS + 5.0, took
        wait_for(lambda: good <= set(_stored(server, datasource)), timeout_secs=JOB_DEADLINE_SECS,
                 what="run 1 to store the good rows")
    # Stopped with the last ticks in flight: the stop waits for them.
    stdout = _stop(job, signal.SIGINT)

    stored = _stored(server, datasource)
    letters = dead_letters_in(dead_dir)
    ticks = set(trickle.ids)
    # Every id once: the good rows and every tick published before the stop (run 1 waited for them).
    assert set(stored) == good | ticks and set(stored.values()) == {1}, stored
    # Every bad message dead-lettered once, with why, in its window; none in a temporary file.
    assert sorted(d.element for d in letters) == sorted(
        [repr(m) for m in bad] + [repr(b"{oops #6}")])
    assert {d.kind for d in letters} == {"unencodable"}
    by_element = {d.element: d for d in letters}
    for message, window in bad.items():
        if window is not None:
            assert by_element[repr(message)].window == window
    assert "JSON value is a list" in by_element[repr(b'["an array #2"]')].message
    assert _no_temporary_files(dead_dir) == []
    # The summary says the same, from the job's own counters.
    rows_read = len(good) + len(ticks) + len(letters)
    assert _summary_figures(stdout) == {
        "rows read": rows_read, "rows acknowledged": len(good) + len(ticks), "dead letters": len(letters)}, stdout
    assert "stopped (SIGINT) once every row read was acknowledged or dead-lettered" in stdout

    # While no job runs: the subscription holds what is published now, and nothing of run 1.
    later = [_row(i) for i in range(600, 630)]
    emulator.publish(topic, later)
    assert sorted(_held_once_leases_end(emulator, subscription, later)) == sorted(later)

    # Run 2 posts each row as it comes (batches of one row): no partial batch waits for a timer.
    job = _start(emulator, _job_args(server, datasource, dead_dir, "--input_subscription", subscription,
                                     "--timestamp_attribute", "ts", *UNBUFFERED), tmp_path / "run2")
    wait_for(lambda: set(range(600, 630)) <= set(_stored(server, datasource)),
             timeout_secs=JOB_DEADLINE_SECS, what="run 2 to store what was published while no job ran")
    stdout = _stop(job, signal.SIGTERM)
    stored = _stored(server, datasource)
    assert set(stored) == good | ticks | set(range(600, 630))
    assert set(stored.values()) == {1}  # nothing delivered twice
    assert _summary_figures(stdout) == {"rows read": 30, "rows acknowledged": 30, "dead letters": 0}, stdout
    assert held_messages(emulator, subscription) == []
    assert len(dead_letters_in(dead_dir)) == len(letters)


def test_datasource_field_sends_each_row_to_its_kinds_data_source(emulator, server, tmp_path):
    """``--datasource_field kind``: three kinds of rows in one subscription, each data source exactly its rows."""
    topic = emulator.create_topic("events-routed")
    subscription = emulator.create_subscription("events-routed-sub", topic=topic, ack_deadline_secs=ACK_DEADLINE_SECS)
    prefix, dead_dir = "ps_routed_", tmp_path / "dead"
    kinds = ("click", "view", "purchase")
    ids = {kind: set(range(1000 * k, 1000 * k + 120)) for k, kind in enumerate(kinds, 1)}
    rows = sorted((i, kind) for kind in kinds for i in ids[kind])
    # NDJSON messages of 10 rows, the kinds mixed in each.
    messages = [b"\n".join(json.dumps({"id": i, "kind": kind}).encode() for i, kind in rows[k::36]) + b"\n"
                for k in range(36)]
    unroutable = {b'{"id": 1}': "", b'{"id": 2, "kind": 5}': "", b'{"id": 3, "kind": "bad-name"}': f"{prefix}bad-name"}
    messages += list(unroutable)
    args = ["--api_url", server.url, "--token", server.token, "--datasource_field", "kind",
            "--datasource_prefix", prefix, "--wait", "--num_shards", "2", "--max_buffering_secs", "1",
            "--window_secs", str(WINDOW_SECS), "--dead_letter_path", str(dead_dir) + "/",
            "--input_subscription", subscription]

    job = _start(emulator, args, tmp_path / "run")
    # The ticks (kind "tick", to their own data source) keep Beam's pulls returning, so its timers run.
    with Trickle(emulator, topic, first_id=TICK_IDS_FROM) as trickle:
        emulator.publish(topic, messages)
        wait_for(lambda: all(ids[kind] <= set(_stored(server, prefix + kind)) for kind in kinds)
                 and len(dead_letters_in(dead_dir)) >= 3, timeout_secs=JOB_DEADLINE_SECS,
                 what="each kind's rows in its data source and the 3 unroutable rows in files")
    stdout = _stop(job, signal.SIGINT)

    for kind in kinds:
        stored = _stored(server, prefix + kind)
        assert set(stored) == ids[kind] and set(stored.values()) == {1}, (kind, stored)  # its rows, once each
        server.flush()
        assert server.query(f"SELECT DISTINCT kind FROM {prefix}{kind}") == [{"kind": kind}]  # no foreign rows
    ticks = _stored(server, prefix + "tick")
    assert set(ticks) == set(trickle.ids) and set(ticks.values()) == {1}
    letters = dead_letters_in(dead_dir)
    assert sorted((d.line.encode(), d.datasource) for d in letters) == sorted(unroutable.items())
    assert {d.kind for d in letters} == {"unroutable"}
    assert _summary_figures(stdout) == {"rows read": len(rows) + len(trickle.ids) + 3,
                                        "rows acknowledged": len(rows) + len(trickle.ids), "dead letters": 3}, stdout
    for kind in kinds:
        assert re.search(rf"^    {prefix}{kind}\s+120\s+0$", stdout, re.MULTILINE), stdout


def _held_once_leases_end(emulator: PubSubEmulator, subscription: str, expected: list[bytes]) -> list[bytes]:
    """What ``subscription`` holds, asked again until it is ``expected`` or an ack deadline has
    passed: the emulator may first lease messages to a pull stream of a job that has stopped,
    and hands them out again only when that lease ends."""
    deadline = time.monotonic() + ACK_DEADLINE_SECS + 10
    while True:
        held = held_messages(emulator, subscription)
        if sorted(held) == sorted(expected) or time.monotonic() > deadline:
            return held
        time.sleep(1.0)


def test_input_topic_reads_through_its_own_subscription(emulator, server, tmp_path):
    """``--input_topic``: the runner makes a subscription when it starts; what is published after is stored."""
    topic = emulator.create_topic("events-topic")
    datasource, dead_dir = "ps_topic", tmp_path / "dead"
    job = _start(emulator, _job_args(server, datasource, dead_dir, "--input_topic", topic, *UNBUFFERED),
                 tmp_path / "run")
    with emulator.publisher() as client:
        wait_for(lambda: list(client.list_topic_subscriptions(topic=topic)), timeout_secs=60,
                 what="the job's subscription to the topic")
    emulator.publish(topic, [_row(i) for i in range(50)] + [_ndjson(range(50, 60)), b"not json"])
    wait_for(lambda: set(range(60)) <= set(_stored(server, datasource)) and dead_letters_in(dead_dir),
             timeout_secs=JOB_DEADLINE_SECS, what="the topic's rows")
    stdout = _stop(job)
    stored = _stored(server, datasource)
    assert set(stored) == set(range(60)) and set(stored.values()) == {1}
    assert [d.element for d in dead_letters_in(dead_dir)] == [repr(b"not json")]
    assert _no_temporary_files(dead_dir) == []
    assert _summary_figures(stdout) == {"rows read": 61, "rows acknowledged": 60, "dead letters": 1}


def test_the_latency_benchmark_runs_and_prints_its_figures(emulator, server, tmp_path):
    """A smoke run of ``python -m benchmarks.pubsub_latency`` (tiny sizes; the figures are not asserted)."""
    from benchmarks import pubsub_latency

    out = io.StringIO()
    [result] = pubsub_latency.run(rate=10, secs=2, buffering=[1.0], out=out, emulator=emulator, server=server,
                                  work_dir=tmp_path)
    assert (result.published, result.stored) == (20, 20)
    assert 0 < result.p50_secs <= result.p99_secs <= result.max_secs
    table = out.getvalue().splitlines()
    assert table[-2].split() == ["max_buffering_secs", "msg/s", "published", "stored", "p50", "s", "p99", "s",
                                 "max", "s"]
    assert table[-1].split()[:4] == ["1", "10", "20", "20"]
