"""Tests of the HTTP layer (sinks/tinybird/_events_api.py) against real local servers.

Every status and retry rule runs against the local Events API server
(``tinybird_emulator.LocalServer``) with fault rules; a few protocol details it does not
produce (HTTP-date ``Retry-After``, garbled bodies, redirects, TLS) run against a
small scripted HTTP(S) server. Time is injected (``FakeTime``) wherever waits
are checked, so the numbers are exact and the tests do not sleep.
"""

from __future__ import annotations

import contextlib
import email.utils
import itertools
import logging
import pickle
import socket
import threading
import time
import zlib

import orjson
import pytest
import zstandard
from shared_testlib import BUSY_MACHINE_SLACK_SECS, RATE_LIMIT_WINDOW_SECS, TOKEN, wait_for, within_one_window
from sink_testlib import WALL_EPOCH, FakeTime, ScriptedServer, stored_rows

from sinks.tinybird._events_api import (
    Attempt,
    ClientSettings,
    Delivered,
    EventsApiClient,
    Failed,
    SendReport,
    _split_at_line,
)
from sinks.tinybird._http.classify import parse_reset, parse_retry_after
from sinks.tinybird._http.transport import _DEADLINE_SLACK_SECS
from sinks.tinybird.dead_letters import DeadLetterKind
from sinks.tinybird.retry import RetryPolicy
from tinybird_emulator import LocalServer

# rand() is fixed at 0.5: the default policy then waits 0.375, 0.75, 1.5, 3.0, 6.0 s.
HALF = lambda: 0.5  # noqa: E731
FIRST_DELAYS = [0.375, 0.75, 1.5, 3.0, 6.0]
DEFAULT_POLICY = RetryPolicy()


def ndjson(n: int, start: int = 0) -> bytes:
    return b"".join(orjson.dumps({"i": i, "city": "Madrid"}) + b"\n" for i in range(start, start + n))


def make_client(
    url: str,
    datasource: str,
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    fake: FakeTime | None = None,
    token: str = TOKEN,
    **settings,
) -> EventsApiClient:
    settings.setdefault("wait", True)
    timing = {} if fake is None else {"clock": fake.clock, "sleep": fake.sleep, "wall_clock": fake.wall}
    return EventsApiClient(
        ClientSettings(api_url=url, datasource=datasource, **settings),
        token=token,
        retry_policy=policy,
        rand=HALF,
        **timing,
    )


def statuses(report: SendReport):
    return [a.status for a in report.attempts]


def causes(report: SendReport):
    return [a.retry_cause for a in report.attempts]


# -- delivery ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "compression, level, expected_wire",
    [
        ("zstd", None, lambda p: len(zstandard.ZstdCompressor(level=1).compress(p))),
        ("zstd", 19, lambda p: len(zstandard.ZstdCompressor(level=19).compress(p))),
        ("gzip", None, lambda p: len(zlib.compress(p, 1, wbits=31))),
        ("gzip", 9, lambda p: len(zlib.compress(p, 9, wbits=31))),
        (None, None, len),
    ],
)
def test_delivers_with_each_compression(server, datasource, compression, level, expected_wire):
    payload = ndjson(50)
    with make_client(server.url, datasource, compression=compression, compression_level=level) as client:
        report = client.send(payload, 50)
    assert report.delivered == (
        Delivered(rows=50, raw_bytes=len(payload), status=200, quarantined_rows=0, attempts=1),
    )
    assert report.failed == ()
    (attempt,) = report.attempts
    assert (attempt.status, attempt.error, attempt.retry_cause) == (200, None, None)
    assert (attempt.raw_bytes, attempt.wire_bytes) == (len(payload), expected_wire(payload))
    assert attempt.latency_secs >= 0
    assert server.query(f"SELECT i, city FROM {datasource} ORDER BY i") == [
        {"i": i, "city": "Madrid"} for i in range(50)
    ]


def test_without_wait_the_server_answers_202(server, datasource):
    with make_client(server.url, datasource, wait=False) as client:
        report = client.send(ndjson(3), 3)
    assert report.delivered == (Delivered(rows=3, raw_bytes=len(ndjson(3)), status=202, quarantined_rows=0, attempts=1),)
    assert stored_rows(server, datasource) == 3


def test_quarantined_rows_come_from_the_response(server, datasource):
    payload = b'{"a":1}\nnot json\n{"a":2}\n'
    with make_client(server.url, datasource) as client:
        report = client.send(payload, 3)
    assert report.delivered == (Delivered(rows=3, raw_bytes=len(payload), status=200, quarantined_rows=1, attempts=1),)
    assert report.delivered_rows == 3 and report.failed_rows == 0
    assert stored_rows(server, datasource) == 2


def test_empty_payload_sends_nothing(scripted):
    with make_client(scripted.url, "events") as client:
        assert client.send(b"", 0) == SendReport(delivered=(), failed=(), attempts=())
    assert scripted.requests == []


# -- retries -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_retryable_status_is_retried_with_backoff(server, datasource, fake_time, status):
    server.set_faults([{"status": status, "sequence": [1, 2], "datasource": datasource}])
    with make_client(server.url, datasource, fake=fake_time) as client:
        report = client.send(ndjson(5), 5)
    assert statuses(report) == [status, status, 200]
    assert causes(report) == [str(status), str(status), None]
    assert fake_time.sleeps == FIRST_DELAYS[:2]
    assert report.delivered == (Delivered(rows=5, raw_bytes=len(ndjson(5)), status=200, quarantined_rows=0, attempts=3),)
    assert stored_rows(server, datasource) == 5


def test_429_without_retry_after_waits_for_the_rate_limit_reset(server, datasource, fake_time):
    # The local server sends X-RateLimit-Reset: 1 on every response; on a 429
    # without Retry-After that is the wait (longer than the 0.375 s backoff).
    server.set_faults([{"status": 429, "sequence": [1], "datasource": datasource}])
    with make_client(server.url, datasource, fake=fake_time) as client:
        report = client.send(ndjson(2), 2)
    assert statuses(report) == [429, 200]
    assert causes(report) == ["429", None]
    assert fake_time.sleeps == [1.0]
    assert report.paced_secs == 0.0


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(server, datasource, fake_time, status):
    server.set_faults([{"status": status, "sequence": [1], "retry_after_secs": 7, "datasource": datasource}])
    with make_client(server.url, datasource, fake=fake_time) as client:
        report = client.send(ndjson(2), 2)
    assert statuses(report) == [status, 200]
    assert fake_time.sleeps == [7.0]
    assert report.delivered[0].attempts == 2


def test_retry_after_is_capped(server, datasource, fake_time):
    server.set_faults([{"status": 503, "sequence": [1], "retry_after_secs": 500, "datasource": datasource}])
    policy = RetryPolicy(max_retry_after_secs=2.0)
    with make_client(server.url, datasource, fake=fake_time, policy=policy) as client:
        report = client.send(ndjson(2), 2)
    assert statuses(report) == [503, 200]
    assert fake_time.sleeps == [2.0]


def test_retry_after_on_500_is_not_honoured(server, datasource, fake_time):
    server.set_faults([{"status": 500, "sequence": [1], "retry_after_secs": 9, "datasource": datasource}])
    with make_client(server.url, datasource, fake=fake_time) as client:
        client.send(ndjson(1), 1)
    assert fake_time.sleeps == [0.375]


def test_retries_exhausted_after_max_attempts(server, datasource, fake_time):
    server.set_faults([{"status": 503, "message": "overloaded", "datasource": datasource}])
    payload = ndjson(5)
    with make_client(server.url, datasource, fake=fake_time, policy=RetryPolicy(max_attempts=3)) as client:
        report = client.send(payload, 5)
    assert report.delivered == ()
    assert report.failed == (
        Failed(
            payload=payload,
            rows=5,
            kind=DeadLetterKind.RETRIES_EXHAUSTED,
            status=503,
            message="gave up after 3 attempts in 1.1 s (max_attempts=3 reached); last: HTTP 503: overloaded",
            attempts=3,
            first_attempt_at=WALL_EPOCH + 1000.0,
            last_attempt_at=WALL_EPOCH + 1001.125,
        ),
    )
    assert statuses(report) == [503, 503, 503]
    assert causes(report) == ["503", "503", None]
    assert [a.started_at for a in report.attempts] == [WALL_EPOCH + 1000.0, WALL_EPOCH + 1000.375, WALL_EPOCH + 1001.125]
    assert fake_time.sleeps == [0.375, 0.75]
    assert stored_rows(server, datasource) == 0


def test_no_attempt_starts_after_max_total_secs(server, datasource, fake_time):
    server.set_faults([{"status": 503, "message": "overloaded", "datasource": datasource}])
    policy = RetryPolicy(max_attempts=10, max_total_secs=1.0)
    with make_client(server.url, datasource, fake=fake_time, policy=policy) as client:
        report = client.send(ndjson(1), 1)
    # 0.375 s after the first attempt the second starts; the third would start at 1.125 s.
    assert statuses(report) == [503, 503]
    assert fake_time.sleeps == [0.375]
    (failed,) = report.failed
    assert failed.kind is DeadLetterKind.RETRIES_EXHAUSTED
    assert failed.message == (
        "gave up after 2 attempts in 0.4 s (the next attempt would start 1.1 s after the first, "
        "past max_total_secs=1); last: HTTP 503: overloaded"
    )


def test_status_codes_of_the_policy_decide(server, datasource, fake_time):
    server.set_faults([{"status": 500, "message": "boom", "datasource": datasource}])
    policy = RetryPolicy(retry_status_codes={503})
    with make_client(server.url, datasource, fake=fake_time, policy=policy) as client:
        report = client.send(ndjson(1), 1)
    assert statuses(report) == [500]
    assert report.failed[0].kind is DeadLetterKind.REJECTED
    assert report.failed[0].message == "HTTP 500: boom"


# -- statuses that are not retried ------------------------------------------------------


@pytest.mark.parametrize(
    "status, message",
    [
        (400, "HTTP 400: nope"),
        (401, "HTTP 401: nope (check the token and its DATASOURCE:APPEND or DATASOURCE:CREATE scope)"),
        (403, "HTTP 403: nope (check the token and its DATASOURCE:APPEND or DATASOURCE:CREATE scope)"),
        (409, "HTTP 409: nope"),
        (501, "HTTP 501: nope"),
    ],
)
def test_rejected_statuses_are_not_retried(server, datasource, fake_time, status, message):
    server.set_faults([{"status": status, "message": "nope", "datasource": datasource}])
    payload = ndjson(4)
    with make_client(server.url, datasource, fake=fake_time) as client:
        report = client.send(payload, 4)
    assert report.failed == (
        Failed(
            payload=payload,
            rows=4,
            kind=DeadLetterKind.REJECTED,
            status=status,
            message=message,
            attempts=1,
            first_attempt_at=WALL_EPOCH + 1000.0,
            last_attempt_at=WALL_EPOCH + 1000.0,
        ),
    )
    assert causes(report) == [None]
    assert fake_time.sleeps == []


def test_404_says_the_workspace_is_on_another_host(server, datasource):
    server.set_faults([{"status": 404, "message": "workspace not found", "datasource": datasource}])
    with make_client(server.url, datasource) as client:
        report = client.send(ndjson(1), 1)
    (failed,) = report.failed
    assert failed.kind is DeadLetterKind.REJECTED
    assert failed.message == (
        "HTTP 404: the token's workspace is not on this host; check the API host/region "
        f"(api_url={server.url}). Server said: workspace not found"
    )


def test_invalid_token_is_rejected_by_the_server(server, datasource):
    with make_client(server.url, datasource, token="not-a-valid-token") as client:
        report = client.send(ndjson(1), 1)
    (failed,) = report.failed
    assert (failed.kind, failed.status, failed.attempts) == (DeadLetterKind.REJECTED, 403, 1)
    assert failed.message == (
        "HTTP 403: invalid or missing token (check the token and its DATASOURCE:APPEND or DATASOURCE:CREATE scope)"
    )


def test_422_is_partial_and_never_retried(server, datasource, fake_time):
    server.set_faults([{"status": 422, "when": "after", "message": "a materialized view failed", "datasource": datasource}])
    with make_client(server.url, datasource, fake=fake_time) as client:
        report = client.send(ndjson(3), 3)
    (failed,) = report.failed
    assert (failed.kind, failed.status, failed.attempts, failed.rows) == (DeadLetterKind.PARTIAL, 422, 1, 3)
    assert failed.message == (
        "HTTP 422: partially ingested (a materialized view failed); not retried because retrying "
        "may duplicate rows: a materialized view failed"
    )
    assert fake_time.sleeps == []
    assert stored_rows(server, datasource) == 3  # the rows were stored: replaying them duplicates


# -- network failures -------------------------------------------------------------------


def test_read_timeout_is_retried_and_may_duplicate(server, datasource):
    # "after": the rows are committed, then the answer is late: the client times
    # out, retries, and the rows are stored twice (the documented duplicate).
    # The answer comes after anything a busy machine adds to the read timeout: a
    # latency below it says the client timed out, not that it waited.
    read_timeout_secs = 0.3
    late_secs = read_timeout_secs + BUSY_MACHINE_SLACK_SECS
    server.set_faults([{"latency_secs": late_secs, "when": "after", "sequence": [1], "datasource": datasource}])
    policy = RetryPolicy(initial_backoff_secs=0.01, max_backoff_secs=0.01)
    with make_client(server.url, datasource, read_timeout_secs=read_timeout_secs, policy=policy) as client:
        report = client.send(ndjson(4), 4)
    first, second = report.attempts
    assert (first.status, first.error, first.retry_cause) == (None, "timeout", "timeout")
    assert read_timeout_secs - _DEADLINE_SLACK_SECS <= first.latency_secs < late_secs
    assert (second.status, second.error, second.retry_cause) == (200, None, None)
    assert report.delivered == (Delivered(rows=4, raw_bytes=len(ndjson(4)), status=200, quarantined_rows=0, attempts=2),)
    assert stored_rows(server, datasource) == 8
    # The late answer ends here, not in the statistics of a later test on this server.
    wait_for(lambda: server.stats()["requests"]["total"] == 2, timeout_secs=late_secs + BUSY_MACHINE_SLACK_SECS,
             poll_secs=0.05, what="the late answer")


def test_reset_before_storing_is_retried(server, datasource, fake_time):
    server.set_faults([{"reset": True, "when": "before", "sequence": [1], "datasource": datasource}])
    with make_client(server.url, datasource, fake=fake_time) as client:
        report = client.send(ndjson(4), 4)
    assert [(a.status, a.error, a.retry_cause) for a in report.attempts] == [
        (None, "connection_error", "connection_error"),
        (200, None, None),
    ]
    assert fake_time.sleeps == [0.375]
    assert stored_rows(server, datasource) == 4


def test_reset_after_storing_is_retried_and_duplicates(server, datasource, fake_time):
    server.set_faults([{"reset": True, "when": "after", "sequence": [1], "datasource": datasource}])
    with make_client(server.url, datasource, fake=fake_time) as client:
        report = client.send(ndjson(4), 4)
    assert [a.error for a in report.attempts] == ["connection_error", None]
    assert report.delivered_rows == 4
    assert stored_rows(server, datasource) == 8


def test_connection_refused_exhausts_retries(fake_time):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = RetryPolicy(max_attempts=3)
    with make_client(f"http://127.0.0.1:{port}", "events", fake=fake_time, policy=policy) as client:
        report = client.send(ndjson(2), 2)
    assert [(a.status, a.error) for a in report.attempts] == [(None, "connection_error")] * 3
    assert causes(report) == ["connection_error", "connection_error", None]
    (failed,) = report.failed
    assert (failed.kind, failed.status, failed.attempts, failed.rows) == (DeadLetterKind.RETRIES_EXHAUSTED, None, 3, 2)
    assert failed.message.startswith(
        "gave up after 3 attempts in 1.1 s (max_attempts=3 reached); last: connection error: "
    )
    assert fake_time.sleeps == [0.375, 0.75]


# -- 413: splitting --------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """A server that refuses bodies over 1000 bytes."""
    with LocalServer(
        data_dir=tmp_path_factory.mktemp("small"), token=TOKEN, port=0, rate_limit_rps=None, max_body_bytes=1000
    ) as server:
        yield server


def line_of(size: int, i: int) -> bytes:
    """One NDJSON line of exactly ``size`` bytes, newline included."""
    head = b'{"i":%d,"pad":"' % i
    return head + b"x" * (size - len(head) - 3) + b'"}\n'


def test_413_splits_in_halves_until_parts_fit(small_server, datasource):
    payload = b"".join(line_of(100, i) for i in range(16))  # 1600 bytes
    with make_client(small_server.url, datasource, compression=None) as client:
        report = client.send(payload, 16)
    assert [(a.status, a.raw_bytes, a.retry_cause) for a in report.attempts] == [
        (413, 1600, "413"),
        (200, 800, None),
        (200, 800, None),
    ]
    half = Delivered(rows=8, raw_bytes=800, status=200, quarantined_rows=0, attempts=2)
    assert report.delivered == (half, half)
    assert report.failed == ()
    assert small_server.query(f"SELECT i FROM {datasource} ORDER BY i") == [{"i": i} for i in range(16)]


def test_413_on_a_single_row_dead_letters_only_that_row(small_server, datasource):
    small = [line_of(100, i) for i in (0, 1, 2, 4, 5, 6)]
    big = line_of(1500, 3)
    payload = b"".join(small[:3]) + big + b"".join(small[3:])  # 2100 bytes
    with make_client(small_server.url, datasource, compression=None) as client:
        report = client.send(payload, 7)
    # 2100 -> [1800 | 300]; 1800 -> [300 | 1500]; the 1500-byte row alone fails.
    assert [(a.status, a.raw_bytes, a.retry_cause) for a in report.attempts] == [
        (413, 2100, "413"),
        (413, 1800, "413"),
        (200, 300, None),
        (413, 1500, None),
        (200, 300, None),
    ]
    assert report.delivered == (
        Delivered(rows=3, raw_bytes=300, status=200, quarantined_rows=0, attempts=3),
        Delivered(rows=3, raw_bytes=300, status=200, quarantined_rows=0, attempts=2),
    )
    (failed,) = report.failed
    assert (failed.payload, failed.rows, failed.kind, failed.status, failed.attempts) == (
        big, 1, DeadLetterKind.PAYLOAD_TOO_LARGE, 413, 3,
    )
    assert failed.message == (
        "HTTP 413: a single row of 1499 bytes (1500 on the wire) is larger than the server accepts: "
        "the body is larger than the limit of 1000 bytes"
    )
    assert failed.first_row == 3  # where its line is in the payload sent
    assert report.delivered_rows + report.failed_rows == 7
    assert small_server.query(f"SELECT i FROM {datasource} ORDER BY i") == [{"i": i} for i in (0, 1, 2, 4, 5, 6)]


def test_failed_parts_say_where_they_start_even_when_their_lines_repeat(small_server, datasource):
    big = line_of(1500, 3)
    payload = big + line_of(100, 0) + line_of(100, 1) + line_of(100, 2) + big  # the same big row twice
    with make_client(small_server.url, datasource, compression=None) as client:
        report = client.send(payload, 5)
    # 3300 -> [1700 | 1600]; 1700 -> [big | 200]; 1600 -> [100 | big]: each big row fails alone.
    assert [(f.payload, f.rows, f.kind, f.first_row) for f in report.failed] == [
        (big, 1, DeadLetterKind.PAYLOAD_TOO_LARGE, 0),
        (big, 1, DeadLetterKind.PAYLOAD_TOO_LARGE, 4),
    ]
    assert report.delivered_rows == 3


def test_413_halves_keep_their_own_retries(small_server, datasource, fake_time):
    small_server.set_faults([{"status": 503, "sequence": [1], "datasource": datasource}])
    try:
        payload = b"".join(line_of(100, i) for i in range(12))
        with make_client(small_server.url, datasource, compression=None, fake=fake_time) as client:
            report = client.send(payload, 12)
    finally:
        small_server.clear_faults()
    # The fault rules never see the 413 (the body is refused before them): the
    # first half's first attempt is the 1st matching request, and only it is retried.
    assert [(a.status, a.retry_cause) for a in report.attempts] == [
        (413, "413"), (503, "503"), (200, None), (200, None),
    ]
    assert [d.attempts for d in report.delivered] == [3, 2]
    assert fake_time.sleeps == [0.375]


@pytest.mark.parametrize(
    "payload, first",
    [
        (b"a\nb\n", b"a\n"),
        (b"aaaa\nb\nc\n", b"aaaa\n"),
        (b"a\nb\ncccccccc\n", b"a\nb\n"),
        (b"a\nbb\ncc\nd\n", b"a\nbb\n"),
        (b"x" * 10 + b"\n" + b"y\n", b"x" * 10 + b"\n"),
    ],
)
def test_split_at_line_near_the_middle(payload, first):
    assert _split_at_line(payload) == (first, payload[len(first):])


# -- pacing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    """A server allowing 3 requests per second per data source."""
    with LocalServer(data_dir=tmp_path_factory.mktemp("limited"), token=TOKEN, port=0, rate_limit_rps=3) as server:
        yield server


def test_paces_on_rate_limit_remaining_zero(limited_server, datasource):
    names = (f"{datasource}_{k}" for k in itertools.count())
    with contextlib.ExitStack() as clients:

        def three_requests():
            # A data source of its own each time: its window starts with the first request.
            fake = FakeTime(real_sleep=True)  # the server's window must really pass
            client = clients.enter_context(make_client(limited_server.url, next(names), fake=fake))
            return fake, client, [client.send(ndjson(1, start=i), 1) for i in range(3)]

        # The first three inside one window of the server's real clock (a busy machine may take longer).
        fake, client, reports = within_one_window(three_requests, window_secs=RATE_LIMIT_WINDOW_SECS)
        reports.append(client.send(ndjson(1, start=3), 1))
    # The 3rd answer says X-RateLimit-Remaining: 0, X-RateLimit-Reset: 1: the 4th
    # request waits 1 s instead of getting a 429.
    assert [statuses(r) for r in reports] == [[200], [200], [200], [200]]
    assert [r.paced_secs for r in reports] == [0.0, 0.0, 0.0, 1.0]
    assert fake.sleeps == [1.0]


@pytest.mark.parametrize("status", [429, 503])
def test_a_throttling_answer_pauses_every_thread_of_the_client(server, datasource, fake_time, status):
    # A throttling answer (a 429, a 503 with Retry-After) spends no attempt
    # (max_attempts=1 does not end it): the batch waits 3 s, gets a second one,
    # and is dead-lettered as throttled because another 3 s would pass
    # max_throttled_secs=4; that second pause holds the other thread: 3 s
    # lengthened by the jitter of a process that already paces itself
    # (PAUSE_JITTER 0.5 x rand 0.5: 0.75 s).
    server.set_faults([{"status": status, "sequence": [1, 2], "retry_after_secs": 3, "datasource": datasource}])
    policy = RetryPolicy(max_attempts=1, max_throttled_secs=4)
    with make_client(server.url, datasource, fake=fake_time, policy=policy) as client:
        first = client.send(ndjson(1), 1)
        results = []
        thread = threading.Thread(target=lambda: results.append(client.send(ndjson(1, start=1), 1)))
        thread.start()
        thread.join()
    (failed,) = first.failed
    assert (failed.kind, failed.status, failed.attempts) == (DeadLetterKind.THROTTLED, status, 2)
    assert failed.message == (
        "throttled 2 times, 3.0 s in all; the next wait would bring it to 6.0 s, past max_throttled_secs=4; "
        f"last: HTTP {status}: injected fault: rule 0 (before)")
    assert (first.throttled_secs, first.throttled_answers) == (3.0, 2)
    # The other thread's request waited the 3 s the server asked for, and the jitter.
    (second,) = results
    assert statuses(second) == [200]
    assert second.paced_secs == second.throttled_secs == 3.75
    assert fake_time.sleeps == [3.0, 3.75]


def test_waiting_for_a_slot_another_client_holds_is_not_throttling(server, datasource):
    # Two clients of one process (two posting steps) share one limiter, so one
    # request in flight between them: the second waits for the first, slowed by
    # the server. That wait is pacing, not throttling: no 429 was seen.
    server.set_faults([{"latency_secs": 0.5, "sequence": [1], "datasource": datasource}])
    with make_client(server.url, datasource, max_in_flight=1) as first, \
            make_client(server.url, datasource, max_in_flight=1) as second:
        assert first.limiter() is second.limiter()
        reports = {}
        slow = threading.Thread(target=lambda: reports.setdefault("first", first.send(ndjson(1), 1)))
        slow.start()
        deadline = time.monotonic() + 10
        while first.limiter().in_flight == 0 and time.monotonic() < deadline:  # the first holds the slot
            time.sleep(0.005)
        reports["second"] = second.send(ndjson(1, start=1), 1)
        slow.join()
    assert [statuses(reports[name]) for name in ("first", "second")] == [[200], [200]]
    assert reports["second"].paced_secs > 0.1
    assert reports["first"].throttled_secs == reports["second"].throttled_secs == 0.0
    assert stored_rows(server, datasource) == 2


def test_threads_share_the_rate_limit_and_lose_nothing(limited_server, datasource):
    policy = RetryPolicy(initial_backoff_secs=0.05, max_backoff_secs=0.2, max_attempts=10)
    results = []
    lock = threading.Lock()
    with make_client(limited_server.url, datasource, policy=policy, max_in_flight=3) as client:

        def work(t: int) -> None:
            for k in range(2):
                report = client.send(ndjson(5, start=t * 10 + k * 5), 5)
                with lock:
                    results.append(report)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(r.delivered_rows for r in results) == 30
    assert all(not r.failed for r in results)
    assert stored_rows(limited_server, datasource) == 30


# -- concurrency -------------------------------------------------------------------------


def test_concurrent_sends_with_faults_deliver_every_row_once(server, datasource, caplog):
    caplog.set_level(logging.DEBUG)
    server.set_faults([{"status": 503, "probability": 0.3, "seed": 7, "datasource": datasource}])
    policy = RetryPolicy(initial_backoff_secs=0.001, max_backoff_secs=0.01, max_attempts=20)
    results = []
    lock = threading.Lock()
    with make_client(server.url, datasource, policy=policy, max_in_flight=4) as client:

        def work(t: int) -> None:
            for k in range(5):
                report = client.send(ndjson(20, start=t * 100 + k * 20), 20)
                with lock:
                    results.append(report)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(r.delivered_rows for r in results) == 400
    assert sum(1 for r in results for a in r.attempts if a.status == 503) > 0
    assert stored_rows(server, datasource) == 400
    assert server.query(f"SELECT count(DISTINCT i) AS n FROM {datasource}") == [{"n": 400}]
    assert "Connection pool is full" not in caplog.text


# -- protocol details (scripted server) -----------------------------------------------


def test_request_shape(scripted):
    payload = ndjson(2)
    with make_client(scripted.url + "/", "events", compression="zstd") as client:
        report = client.send(payload, 2)
    assert report.delivered[0].status == 202
    ((path, headers, body),) = scripted.requests
    assert path == "/v0/events?name=events&wait=true"
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Content-Type"] == "application/x-ndjson"
    assert headers["Content-Encoding"] == "zstd"
    assert zstandard.ZstdDecompressor().decompress(body) == payload


def test_no_wait_and_no_compression_request_shape(scripted):
    with make_client(scripted.url, "events", wait=False, compression=None) as client:
        client.send(b'{"a":1}\n', 1)
    ((path, headers, body),) = scripted.requests
    assert path == "/v0/events?name=events"
    assert "Content-Encoding" not in headers
    assert body == b'{"a":1}\n'


@pytest.mark.parametrize("body", [b"", b"oops", b"[1]", b'{"quarantined_rows": "two"}', b'{"successful_rows": -1}'])
def test_success_with_a_body_without_counts_is_delivered_uncounted(scripted, body):
    # The status decides: resending a 2xx would duplicate. counts_read=False feeds a metric.
    scripted.script.append((202, {}, body))
    with make_client(scripted.url, "events") as client:
        report = client.send(ndjson(2), 2)
    assert report.delivered == (
        Delivered(rows=2, raw_bytes=len(ndjson(2)), status=202, quarantined_rows=0, attempts=1, counts_read=False),)
    assert [a.body_unreadable for a in report.attempts] == [False]


def test_retry_after_as_an_http_date(scripted, fake_time):
    date = email.utils.formatdate(fake_time.wall() + 4, usegmt=True)
    scripted.script.append((429, {"Retry-After": date}, b'{"error":"slow down"}'))
    with make_client(scripted.url, "events", fake=fake_time) as client:
        report = client.send(ndjson(1), 1)
    assert statuses(report) == [429, 202]
    assert fake_time.sleeps == [4.0]


def test_error_body_that_is_not_json_is_truncated(scripted):
    scripted.script.append((400, {}, b"<html>" + b"x" * 5000))
    with make_client(scripted.url, "events") as client:
        report = client.send(ndjson(1), 1)
    message = report.failed[0].message
    assert message.startswith("HTTP 400: <html>xxx") and message.endswith("...")
    assert len(message) == len("HTTP 400: ") + 1000


def test_redirects_are_not_followed(scripted):
    scripted.script.append((307, {"Location": "https://elsewhere.invalid/v0/events"}, b""))
    with make_client(scripted.url, "events") as client:
        report = client.send(ndjson(1), 1)
    assert len(scripted.requests) == 1
    (failed,) = report.failed
    assert (failed.kind, failed.status) == (DeadLetterKind.REJECTED, 307)
    assert failed.message == "HTTP 307: unexpected redirect to 'https://elsewhere.invalid/v0/events'; check api_url"


def test_remaining_zero_paces_the_next_request(scripted, fake_time):
    scripted.script.append((202, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "3"}, b"{}"))
    with make_client(scripted.url, "events", fake=fake_time) as client:
        first = client.send(ndjson(1), 1)
        second = client.send(ndjson(1), 1)
    assert (first.paced_secs, second.paced_secs) == (0.0, 3.0)
    assert fake_time.sleeps == [3.0]


def test_pacing_with_a_clock_that_does_not_move_terminates(scripted):
    scripted.script.append((202, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"}, b"{}"))
    sleeps = []
    client = EventsApiClient(
        ClientSettings(api_url=scripted.url, datasource="events"),
        token=TOKEN, retry_policy=RetryPolicy(), clock=lambda: 0.0, sleep=sleeps.append,
    )
    with client:
        client.send(ndjson(1), 1)
        report = client.send(ndjson(1), 1)
    assert sleeps == [2.0]
    assert report.delivered_rows == 1


def test_pacing_wait_is_capped(scripted, fake_time):
    scripted.script.append((202, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "3600"}, b"{}"))
    with make_client(scripted.url, "events", fake=fake_time, policy=RetryPolicy(max_retry_after_secs=10)) as client:
        client.send(ndjson(1), 1)
        client.send(ndjson(1), 1)
    assert fake_time.sleeps == [10.0]


def test_server_echoing_the_token_is_scrubbed(scripted):
    scripted.script.append((403, {}, orjson.dumps({"error": f"token {TOKEN} is not valid"})))
    with make_client(scripted.url, "events") as client:
        report = client.send(ndjson(1), 1)
    assert report.failed[0].message.startswith("HTTP 403: token *** is not valid")


@pytest.mark.parametrize(
    "value, expected",
    [("5", 5.0), (" 1.5 ", 1.5), ("0", 0.0), ("-3", 0.0), ("soon", None), ("", None), (None, None), ("nan", None),
     # The header sent twice, joined by the HTTP stack: the longest wait.
     ("5, 5", 5.0), ("5, 10", 10.0), ("10,5", 10.0), ("5, soon", None), ("5, nan", None), ("5,", None)],
)
def test_parse_retry_after_seconds(value, expected):
    assert parse_retry_after(value, WALL_EPOCH) == expected


def test_parse_retry_after_dates():
    assert parse_retry_after(email.utils.formatdate(WALL_EPOCH + 30, usegmt=True), WALL_EPOCH) == 30.0
    assert parse_retry_after(email.utils.formatdate(WALL_EPOCH - 30, usegmt=True), WALL_EPOCH) == 0.0


@pytest.mark.parametrize(
    "value, expected",
    [("2", 2.0), ("0", 0.0), ("x", None), (None, None), (str(WALL_EPOCH + 7), 7.0),
     # An epoch time in milliseconds (as seconds it would be 120 s or more of pause: the cap).
     (str(int((WALL_EPOCH + 7) * 1000)), 7.0), (str(int((WALL_EPOCH - 3) * 1000)), 0.0)],
)
def test_parse_rate_limit_reset(value, expected):
    # A delta in seconds, as Tinybird sends; an epoch time, in seconds or milliseconds, is tolerated.
    assert parse_reset(value, WALL_EPOCH) == expected


# -- TLS --------------------------------------------------------------------------------


def test_tls_with_custom_ca_bundle(self_signed_cert):
    cert, key = self_signed_cert
    with (ScriptedServer(certfile=cert, keyfile=key) as tls_server,
          make_client(tls_server.url, "events", ca_bundle_path=cert) as client):
        report = client.send(ndjson(1), 1)
    assert statuses(report) == [202]
    assert report.delivered[0].rows == 1


def test_tls_verification_failure_is_not_retried(self_signed_cert, fake_time):
    cert, key = self_signed_cert
    with (ScriptedServer(certfile=cert, keyfile=key) as tls_server,
          make_client(tls_server.url, "events", fake=fake_time) as client):
        report = client.send(ndjson(1), 1)
    assert [(a.status, a.error, a.retry_cause) for a in report.attempts] == [(None, "tls_verification_failed", None)]
    (failed,) = report.failed
    assert (failed.kind, failed.status, failed.attempts) == (DeadLetterKind.REJECTED, None, 1)
    assert failed.message.startswith(f"TLS certificate verification failed for {tls_server.url}: ")
    assert failed.message.endswith("Set ca_bundle_path to the CA bundle that signs the server's certificate.")
    assert fake_time.sleeps == []


@pytest.mark.parametrize(
    "url", ["http://api.tinybird.co", "http://10.0.0.1:8000", "http://[2001:db8::1]", "http://localhost.example.com"]
)
def test_plain_http_to_a_remote_host_is_refused(url):
    with pytest.raises(ValueError, match="clear text"):
        ClientSettings(api_url=url, datasource="events")
    assert ClientSettings(api_url=url, datasource="events", allow_insecure_http=True).api_url == url


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:7181", "http://127.8.9.10", "http://[::1]:7181", "http://localhost:7181", "http://LOCALHOST",
     "https://api.tinybird.co", "https://api.us-east.aws.tinybird.co/"],
)
def test_loopback_http_and_any_https_are_allowed(url):
    assert ClientSettings(api_url=url, datasource="events").api_url == url.rstrip("/")


# -- secrets ---------------------------------------------------------------------------


def test_token_never_leaks(server, datasource, caplog, fake_time):
    caplog.set_level(logging.DEBUG)
    server.set_faults(
        [
            {"status": 503, "sequence": [1], "datasource": datasource},
            {"reset": True, "sequence": [2], "datasource": datasource},
            {"status": 400, "sequence": [4], "message": f"bad token {TOKEN}", "datasource": datasource},
        ]
    )
    with make_client(server.url, datasource, fake=fake_time) as client:
        reports = [client.send(ndjson(2), 2), client.send(ndjson(2), 2)]
        client_repr = repr(client)
        with pytest.raises(TypeError) as pickling:
            pickle.dumps(client)
    with make_client(server.url, datasource, token="p.wrong-SECRET-xyz") as wrong:
        reports.append(wrong.send(ndjson(1), 1))
    assert [[a.status for a in r.attempts] for r in reports] == [[503, None, 200], [400], [403]]
    texts = [caplog.text, client_repr, repr(reports), str(reports), str(pickling.value)]
    texts += [f.message for r in reports for f in r.failed]
    for text in texts:
        assert TOKEN not in text
        assert "p.wrong-SECRET-xyz" not in text
    assert f"Tinybird {datasource}: attempt 1 of 6 failed (503); retrying 2 rows in 0.38 s" in caplog.text
    assert f"Tinybird {datasource}: 2 rows" in caplog.text and "dead-lettered as rejected after 1 attempts" in caplog.text


def test_client_repr_and_pickling(scripted):
    client = make_client(scripted.url, "events")
    assert repr(client) == (
        f"EventsApiClient(api_url={scripted.url!r}, datasource='events', wait=True, compression='zstd', max_in_flight=4)"
    )
    with pytest.raises(TypeError, match=r"Create it in DoFn\.setup"):
        pickle.dumps(client)
    client.close()
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.send(ndjson(1), 1)


def test_failed_repr_does_not_print_rows():
    failed = Failed(
        payload=b'{"secret_field":"x"}\n', rows=1, kind=DeadLetterKind.REJECTED, status=400, message="HTTP 400: no",
        attempts=1, first_attempt_at=1.0, last_attempt_at=1.0,
    )
    assert "secret_field" not in repr(failed)
    assert repr(failed) == (
        "Failed(rows=1, payload_bytes=21, kind='rejected', status=400, message='HTTP 400: no', attempts=1)"
    )


# -- argument validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, rows, message",
    [
        ('{"a":1}\n', 1, "payload must be bytes, got str"),
        (b'{"a":1}', 1, "payload must end with a newline"),
        (b'{"a":1}\n{"a":2}\n', 1, "rows=1 but the payload holds 2 lines"),
        (b'{"a":1}\n', -1, "rows must be an int >= 0, got -1"),
        (b'{"a":1}\n', True, "rows must be an int >= 0, got True"),
    ],
)
def test_send_rejects_bad_arguments(scripted, payload, rows, message):
    with make_client(scripted.url, "events") as client, pytest.raises(ValueError) as info:
        client.send(payload, rows)
    assert str(info.value) == message
    assert scripted.requests == []


def test_client_rejects_bad_token():
    settings = ClientSettings(api_url="http://127.0.0.1:1", datasource="events")
    for token in ("", "with space", "trailing\n", 42):
        with pytest.raises(ValueError, match="token must be a non-empty string without whitespace") as info:
            EventsApiClient(settings, token=token, retry_policy=RetryPolicy())  # type: ignore[arg-type]
        assert "trailing" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"api_url": ""}, "api_url must be a non-empty string"),
        ({"api_url": "ftp://host"}, "api_url must be an http:// or https:// URL with a host"),
        ({"api_url": "https://"}, "api_url must be an http:// or https:// URL with a host"),
        ({"api_url": "https://user:pw@host"}, "api_url must not hold credentials"),
        ({"api_url": "https://host/?token=x"}, "api_url must not have a query or a fragment"),
        ({"api_url": "https://host:99999"}, "api_url has an invalid port"),
        ({"datasource": "1events"}, "datasource must match [A-Za-z_][A-Za-z0-9_]{0,99}, got '1events'"),
        ({"datasource": "ev-ents"}, "datasource must match [A-Za-z_][A-Za-z0-9_]{0,99}, got 'ev-ents'"),
        ({"datasource": "events\n"}, "datasource must match"),
        ({"datasource": "e" * 101}, "datasource must match"),
        ({"datasource": "events&wait=true"}, "datasource must match"),
        ({"datasource": "events_quarantine"}, "datasource must not name a quarantine data source"),
        ({"wait": "yes"}, "wait must be a bool, got 'yes'"),
        ({"compression": "br"}, "compression must be 'zstd', 'gzip' or None, got 'br'"),
        ({"compression": None, "compression_level": 3}, "compression_level needs a compression"),
        ({"compression": "gzip", "compression_level": 10}, "compression_level for gzip must be an int in 1..9, got 10"),
        ({"compression": "zstd", "compression_level": 0}, "compression_level for zstd must be an int in 1..22, got 0"),
        ({"connect_timeout_secs": 0}, "connect_timeout_secs must be a finite number > 0, got 0"),
        ({"read_timeout_secs": float("inf")}, "read_timeout_secs must be a finite number > 0, got inf"),
        ({"attempt_timeout_secs": 0}, "attempt_timeout_secs must be a finite number > 0 or None, got 0"),
        ({"attempt_timeout_secs": True}, "attempt_timeout_secs must be a finite number > 0 or None, got True"),
        ({"max_in_flight": 0}, "max_in_flight must be an int >= 1, got 0"),
        ({"ca_bundle_path": ""}, "ca_bundle_path must be a non-empty string or None, got ''"),
        ({"allow_insecure_http": 1}, "allow_insecure_http must be a bool, got 1"),
    ],
)
def test_settings_validation_names_the_bad_value(kwargs, message):
    arguments = {"api_url": "https://api.tinybird.co", "datasource": "events", **kwargs}
    with pytest.raises(ValueError) as info:
        ClientSettings(**arguments)
    assert str(info.value).startswith(message)


def test_settings_defaults_and_derived_values():
    settings = ClientSettings(api_url="https://api.tinybird.co/", datasource="events")
    assert settings.api_url == "https://api.tinybird.co"
    assert (settings.wait, settings.compression, settings.compression_level) == (False, "zstd", None)
    assert (settings.connect_timeout_secs, settings.read_timeout_secs, settings.max_in_flight) == (5.0, 30.0, 4)
    assert settings.effective_compression_level == 1
    assert (settings.attempt_timeout_secs, settings.effective_attempt_timeout_secs) == (None, 35.0)
    assert ClientSettings(api_url="https://h", datasource="e", attempt_timeout_secs=8).effective_attempt_timeout_secs == 8.0
    assert settings.events_url == "https://api.tinybird.co/v0/events?name=events"
    assert pickle.loads(pickle.dumps(settings)) == settings
    waiting = ClientSettings(api_url="https://h", datasource="e", wait=True, compression="gzip", compression_level=6)
    assert waiting.events_url == "https://h/v0/events?name=e&wait=true"
    assert waiting.effective_compression_level == 6
    assert ClientSettings(api_url="https://h", datasource="e", compression=None).effective_compression_level is None
    with pytest.raises(TypeError):
        ClientSettings("https://h", "e")  # type: ignore[misc]


def test_attempt_and_report_are_frozen():
    attempt = Attempt(started_at=1.0, latency_secs=0.1, status=200, error=None, raw_bytes=1, wire_bytes=1, retry_cause=None)
    with pytest.raises(AttributeError):
        attempt.status = 500  # type: ignore[misc]
