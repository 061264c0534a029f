"""Faults, each with the accounting of 20,000 uniquely identified events.

For every scenario: every id is in the data source or in the dead letters; none
is missing; an id is stored twice only where the protocol makes it unavoidable (a
failure the client saw after the server stored the rows), and the duplicates are
counted, printed and checked against what the server says it stored behind a
fault. ``tests/sink/test_write_to_tinybird.py`` checks one mix of faults with an
upper bound; here each fault has its own run and, where the server can tell, the
duplicates are matched exactly.
"""

from __future__ import annotations

import collections
import io
import threading
import time

import apache_beam as beam
import pytest
from reliability_testlib import (
    PostRecorder,
    account,
    events,
    fired,
    line_id,
    quick_retries,
    rows_per_full_batch,
    run,
    sink,
)
from shared_testlib import BUSY_MACHINE_SLACK_SECS, TOKEN, dead_letters_in, wait_for

from pipelines import replay_dead_letters
from tinybird_emulator import LocalServer

pytestmark = pytest.mark.timeout(120)

N = 20_000
MAX_BATCH_BYTES = 4 * 1024  # about 320 requests for N events
FULL = rows_per_full_batch(MAX_BATCH_BYTES)


def _send(server, datasource, dead_dir, n=N, *, parts=1, runner="fn_api", **overrides):
    """Sends ids 0..n-1 (in ``parts`` bundles) through the sink; returns its counters."""
    overrides.setdefault("max_batch_bytes", MAX_BATCH_BYTES)

    def build(p):
        size = n // parts
        created = [
            p | f"Part{k}" >> beam.Create(events(size, start=k * size), reshuffle=False)
            for k in range(parts)
        ]
        elements = created[0] if parts == 1 else created | beam.Flatten()
        elements | sink(server, datasource, dead_letter_path=f"{dead_dir}/", **overrides)

    counters, _ = run(build, runner=runner)
    return counters


def _ours(datasource, rules):
    return [{"datasource": datasource, **rule} for rule in rules]


def test_random_503_and_429_with_retry_after_are_retried_and_store_nothing_twice(server, datasource, tmp_path):
    server.set_faults(_ours(datasource, [
        {"status": 503, "when": "before", "probability": 0.2, "seed": 11},
        {"status": 429, "when": "before", "probability": 0.2, "seed": 12, "retry_after_secs": 1},
    ]))
    counters = _send(server, datasource, tmp_path / "dlq", retry_policy=quick_retries(max_attempts=12))
    letters = dead_letters_in(tmp_path / "dlq")
    acc = account(server, datasource, range(N), letters, counters)
    acc.report("503 and 429 on 40% of requests")
    acc.check()
    # 429 and 503 store nothing: nothing is dead-lettered and nothing is stored twice.
    assert letters == []
    assert acc.duplicates == 0 and acc.stored_after_faults == 0
    assert sorted(acc.stored.elements()) == list(range(N))
    assert counters["rows_acknowledged"] == N
    assert counters["retries_503"] == fired(server)[0] > 0
    assert counters["retries_429"] == fired(server)[1] > 0


def test_a_burst_of_429_beyond_the_retry_budget_is_dead_lettered_then_replayed(server, datasource, tmp_path):
    # 60 requests in a row get 429: more than 4 attempts per batch can ride out.
    server.set_faults(_ours(datasource, [
        {"status": 429, "when": "before", "sequence": list(range(40, 100)), "retry_after_secs": 1,
         "message": "injected: rate limit burst"},
    ]))
    first_dead, replayed_dead = tmp_path / "dlq", tmp_path / "replayed"
    # 429 spends no attempt (issue 22): the burst outlasts max_throttled_secs instead.
    counters = _send(server, datasource, first_dead, retry_policy=quick_retries(max_attempts=4, max_throttled_secs=0.3))
    letters = dead_letters_in(first_dead)
    acc = account(server, datasource, range(N), letters, counters)
    acc.report("a burst of 60 429s, 0.3 s of throttling per batch")
    acc.check()
    assert 0 < fired(server)[0] <= 60
    assert len(letters) > 0
    assert {d.kind for d in letters} == {"throttled"} and {d.status for d in letters} <= {429, None}
    assert all("past max_throttled_secs=0.3" in d.message for d in letters)
    assert acc.duplicates == 0
    assert set(acc.stored).isdisjoint(acc.dead)

    # The burst is over: the replay pipeline resends the dead letters as they are.
    server.clear_faults()
    out = io.StringIO()
    summary = replay_dead_letters.run([
        "--input", f"{first_dead}/*", "--dead_letter_path", f"{replayed_dead}/",
        "--api_url", server.url, "--token", server.token, "--datasource", datasource,
        "--num_shards", "2", "--runner=FnApiRunner",
    ], out=out)
    print(out.getvalue())
    assert summary.rows_read == len(letters)
    assert summary.rows_acknowledged == len(letters) and summary.dead_letters == 0
    assert dead_letters_in(replayed_dead) == []
    after = account(server, datasource, range(N), [], counters)
    after.report("after the replay")
    assert sorted(after.stored.elements()) == list(range(N))
    assert TOKEN not in out.getvalue()


def test_500_and_resets_before_and_after_storing_duplicate_exactly_what_the_server_stored(
        server, datasource, tmp_path):
    server.set_faults(_ours(datasource, [
        {"status": 500, "when": "before", "probability": 0.08, "seed": 21},
        {"status": 500, "when": "after", "probability": 0.08, "seed": 22},
        {"reset": True, "when": "before", "probability": 0.05, "seed": 23},
        {"reset": True, "when": "after", "probability": 0.05, "seed": 24},
    ]))
    counters = _send(server, datasource, tmp_path / "dlq")
    letters = dead_letters_in(tmp_path / "dlq")
    acc = account(server, datasource, range(N), letters, counters)
    acc.report("500 and resets before/after storing")
    acc.check()
    assert all(count > 0 for count in fired(server)), fired(server)
    assert {d.kind for d in letters} <= {"retries_exhausted"}
    # Each row stored behind an "after" failure is either stored again by the
    # retry, or dead-lettered although stored: one duplicate each, no more, no less.
    assert acc.stored_after_faults > 0
    assert acc.duplicates == acc.stored_after_faults
    assert max(acc.stored.values()) <= 1 + fired(server)[1] + fired(server)[3]
    assert counters["rows_acknowledged"] + counters.get("dead_letters", 0) == N
    assert counters["retries_500"] > 0 and counters["retries_connection_error"] > 0


def test_responses_slower_than_the_read_timeout_are_retried(server, datasource, tmp_path):
    latency = 1.0
    server.set_faults(_ours(datasource, [
        # Stored and committed, then answered too late.
        {"latency_secs": latency, "when": "after", "probability": 0.015, "seed": 31},
        # Answered too late, stored once the delay is over.
        {"latency_secs": latency, "when": "before", "probability": 0.015, "seed": 32},
        # A slow failure: stores nothing.
        {"status": 503, "latency_secs": latency, "when": "before", "probability": 0.015, "seed": 33},
    ]))
    counters = _send(server, datasource, tmp_path / "dlq", read_timeout_secs=0.3)
    # Requests the client gave up on may still sleep on the server, then store their rows:
    # wait until the server has answered every request the client sent.
    wait_for(lambda: server.stats()["requests"]["total"] >= counters["requests"], poll_secs=0.05,
             timeout_secs=latency + BUSY_MACHINE_SLACK_SECS, what="the server to answer every request sent")
    letters = dead_letters_in(tmp_path / "dlq")
    acc = account(server, datasource, range(N), letters, counters)
    acc.report("answers slower than the read timeout")
    acc.check()
    slow_stores, _, slow_failures = fired(server)
    assert slow_stores > 0 and slow_failures > 0
    assert counters["retries_timeout"] + counters.get("dead_letters", 0) >= sum(fired(server))
    # The client cannot tell a slow store from a slow failure: each timed-out
    # request that the server stored is one duplicated batch. The server does not
    # count those rows (no failure status was sent), so the bound is in batches.
    stored_late = fired(server)[0] + fired(server)[1]
    print(f"  requests stored but answered late: {stored_late} (at most {FULL} rows each)")
    assert stored_late <= acc.duplicates <= stored_late * FULL
    assert acc.stored_after_faults == 0


@pytest.mark.parametrize("how", ["graceful_restart", "kill_then_start"])
def test_the_server_restarted_mid_run_loses_nothing(tmp_path, how):
    """A thread restarts the server once a quarter of the rows are in; the sink retries through."""
    datasource = "restarted"
    # A little latency on every request, kept across restarts: the run lasts a few seconds.
    slow = [{"latency_secs": 0.01, "when": "before"}]
    wait = how == "kill_then_start"  # a kill loses what was accepted (202) but not committed
    with LocalServer(data_dir=tmp_path / "server", token=TOKEN, rate_limit_rps=None, faults=slow) as server:
        restarted = threading.Event()

        def restart_when_a_quarter_is_in():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if server.stats()["rows"]["stored"] >= N // 4:
                    break
                time.sleep(0.02)
            if how == "graceful_restart":
                server.restart()
            else:
                server.kill()
                time.sleep(0.5)
                server.start()
            restarted.set()

        thread = threading.Thread(target=restart_when_a_quarter_is_in, daemon=True)
        thread.start()
        counters = _send(
            server, datasource, tmp_path / "dlq", wait=wait, max_in_flight=2,
            retry_policy=quick_retries(max_attempts=100, max_backoff_secs=0.3, max_total_secs=60))
        thread.join(timeout=60)
        assert restarted.is_set()
        stored_since_restart = server.stats()["rows"]["stored"]
        letters = dead_letters_in(tmp_path / "dlq")
        acc = account(server, datasource, range(N), letters, counters)
    acc.report(f"server {how.replace('_', ' ')} mid-run")
    acc.check()
    assert letters == []
    assert 0 < stored_since_restart < N  # the run went on after the restart
    assert counters["retries_connection_error"] > 0  # and it did meet the downtime
    # A request under way when the server stopped may have been stored without an
    # answer: at most one batch per request that got no response.
    no_answer = counters.get("responses_none", 0)
    print(f"  requests without a response: {no_answer} (at most {FULL} rows each)")
    assert acc.duplicates <= no_answer * FULL


def test_a_worker_failure_after_posting_retries_the_bundle_and_its_duplicates_are_explained(
        server, datasource, tmp_path, monkeypatch):
    """The runner retries a bundle whose batches were already posted.

    The FnApiRunner (the DirectRunner's batch engine) does not retry a failed
    bundle: the pipeline fails. The BundleBasedDirectRunner retries a bundle up
    to 4 times, like Dataflow retries work items; it does not fuse steps, so the
    failure is injected in the posting step itself: after the server answered
    the 5th request, the worker "dies" (an exception on its HTTP thread), once.
    """
    crash_flag = tmp_path / "crashed"

    def die_once_after_the_fifth_answer(post):
        if len(recorder.posts) == 5 and not crash_flag.exists():
            crash_flag.write_text("1")
            raise RuntimeError("injected worker failure after the server answered")

    recorder = PostRecorder(monkeypatch, after=die_once_after_the_fifth_answer)
    parts, size = 4, N // 4
    _send(server, datasource, tmp_path / "dlq", parts=parts, runner="bundle_based",
          compression=None, max_in_flight=1)
    letters = dead_letters_in(tmp_path / "dlq")
    # This runner's metrics lose the counters of all but one bundle (a Beam
    # limitation, seen with a plain counting DoFn too): they are not used here.
    acc = account(server, datasource, range(N), letters, None)
    acc.report("a worker failure after posting (bundle retried)")
    acc.check()
    assert crash_flag.exists() and letters == []

    # The data source holds exactly what the server acknowledged, post by post.
    posted = collections.Counter(i for post in recorder.posts if post.status == 202 for i in post.ids)
    assert acc.stored == posted
    twice = sorted(i for i, n in acc.stored.items() if n == 2)
    assert max(acc.stored.values()) == 2
    assert acc.duplicates == len(twice) > 0
    # All duplicates come from the one retried bundle (one Create part): every
    # batch its failed attempt posted up to the failure, and the one it had
    # in flight (max_in_flight=1: one queued behind the one being completed).
    crashed_part = recorder.posts[4].ids[0] // size
    assert {i // size for i in twice} == {crashed_part} and len(twice) <= size
    before_failure = {i for post in recorder.posts[:5] for i in post.ids if i // size == crashed_part}
    in_flight = {i for post in recorder.posts[5:7] for i in post.ids if i // size == crashed_part}
    assert before_failure <= set(twice) <= before_failure | in_flight
    print(f"  duplicates: {len(twice)} rows, all from the retried bundle "
          f"(ids {twice[0]}..{twice[-1]}), posted by its failed attempt")


def test_400_and_403_dead_letter_exactly_the_rows_of_those_requests_with_the_servers_message(
        server, datasource, tmp_path, monkeypatch):
    server.set_faults(_ours(datasource, [
        {"status": 400, "when": "before", "sequence": [5, 17, 60], "message": "injected: a bad column"},
        {"status": 403, "when": "before", "sequence": [9, 100], "message": "injected: token revoked"},
    ]))
    recorder = PostRecorder(monkeypatch)
    counters = _send(server, datasource, tmp_path / "dlq")
    letters = dead_letters_in(tmp_path / "dlq")
    acc = account(server, datasource, range(N), letters, counters)
    acc.report("400 and 403 for five requests")
    acc.check()
    assert fired(server) == [3, 2]
    by_status = {
        status: sorted(line_id(d) for d in letters if d.status == status) for status in (400, 403)}
    assert by_status[400] == sorted(recorder.ids_answered(400)) and len(by_status[400]) > 0
    assert by_status[403] == sorted(recorder.ids_answered(403)) and len(by_status[403]) > 0
    assert len(letters) == len(by_status[400]) + len(by_status[403])
    assert {(d.kind, d.attempts) for d in letters} == {("rejected", 1)}
    assert all(d.message == "HTTP 400: injected: a bad column" for d in letters if d.status == 400)
    assert all(d.message.startswith("HTTP 403: injected: token revoked (check the token")
               for d in letters if d.status == 403)
    # Everything else is stored, once.
    assert sorted(acc.stored) == sorted(set(range(N)) - set(acc.dead))
    assert acc.duplicates == 0
    assert counters["dead_letters_rejected"] == len(letters)
