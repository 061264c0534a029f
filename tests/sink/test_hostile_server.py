"""The HTTP layer against a server that misbehaves at the byte level (issue 11).

One test (or a few) per class of misbehaviour: short row counts in a 2xx, dripped
headers and bodies, huge, endless and bomb bodies, garbled rate-limit dates and
chunk sizes, absurd rate-limit numbers, broken 2xx and interim 1xx answers,
header blocks the HTTP stack refuses, 3xx answers with bomb or slow bodies or
bad locations, 413 to
everything and long rate-limit pauses, megabytes of server text, servers
that echo the token, and a proxy in the environment.
Each counts ids: what the server acknowledged plus what was dead-lettered is what
was sent. The server is :class:`sink_testlib.RawServer`, a raw socket on 127.0.0.1.
"""

from __future__ import annotations

import array
import functools
import importlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import apache_beam as beam
import orjson
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from shared_testlib import BUSY_MACHINE_SLACK_SECS, TOKEN, dead_letters_in
from sink_testlib import FakeTime, RawRequest, RawServer, answer, counted, counts_body

from sinks.tinybird import RetryPolicy, WriteToTinybird
from sinks.tinybird._events_api import ClientSettings, EventsApiClient, SendReport
from sinks.tinybird._http import redaction
from sinks.tinybird._http.outcomes import BoundedResponse
from sinks.tinybird._http.transport import _DEADLINE_SLACK_SECS, MAX_BODY_BYTES, Transport
from sinks.tinybird.dead_letters import DeadLetter, DeadLetterKind, to_json_line

pytestmark = pytest.mark.timeout(120)

QUICK = RetryPolicy(max_attempts=3, initial_backoff_secs=0.01, max_backoff_secs=0.02, max_total_secs=5)


def payload_of(n: int, start: int = 0) -> bytes:
    return b"".join(orjson.dumps({"id": i, "pad": "x" * 20}) + b"\n" for i in range(start, start + n))


def client_for(server: RawServer, *, policy: RetryPolicy = QUICK, fake: FakeTime | None = None,
               token: str = TOKEN, **settings) -> EventsApiClient:
    timing = {} if fake is None else {"clock": fake.clock, "sleep": fake.sleep, "wall_clock": fake.wall}
    settings.setdefault("read_timeout_secs", 2.0)
    return EventsApiClient(ClientSettings(api_url=server.url, datasource="events", **settings), token=token,
                           retry_policy=policy, rand=lambda: 0.5, **timing)


def ids_in(payload: bytes) -> list[int]:
    return [orjson.loads(line)["id"] for line in payload.splitlines()]


def account(report: SendReport, sent: list[int], server: RawServer | None = None) -> tuple[list[int], list[int]]:
    """(acknowledged ids, dead-lettered ids); asserts that together they are exactly the ids sent."""
    dead = [i for failed in report.failed for i in ids_in(failed.payload)]
    assert len(dead) == len(set(dead)) == report.failed_rows
    acknowledged = sorted(set(sent) - set(dead))
    assert len(acknowledged) == report.delivered_rows
    assert sorted(acknowledged + dead) == sorted(sent)
    if server is not None:
        # The server did answer 2xx to requests holding every acknowledged id.
        assert set(acknowledged) <= set(server.acknowledged_ids())
    return acknowledged, dead


def _send_forever(conn: socket.socket, data: bytes, *, every_secs: float = 0.0) -> bool:
    """Sends ``data`` over and over until the client goes away."""
    while True:
        conn.sendall(data)
        if every_secs:
            time.sleep(every_secs)


# -- 1. silent loss: a 2xx that counts fewer rows than were sent ------------------------------


def test_a_2xx_counting_fewer_rows_is_dead_lettered_never_retried():
    with RawServer(default=answer(200, b'{"successful_rows":0,"quarantined_rows":0}')) as server:
        payload = payload_of(1000)
        with client_for(server) as client:
            report = client.send(payload, 1000)
    acknowledged, dead = account(report, list(range(1000)))
    assert (acknowledged, len(dead)) == ([], 1000)
    (failed,) = report.failed
    assert (failed.kind, failed.status, failed.attempts) == (DeadLetterKind.ROWS_UNACCOUNTED, 200, 1)
    assert failed.message == ("HTTP 200: the server counted 0 rows stored and 0 quarantined of 1000 sent; "
                              "not retried, since it may have stored some")
    assert len(server.requests) == 1  # never retried: the server may have stored some


def test_a_2xx_whose_counts_add_up_is_delivered_with_its_quarantined_rows():
    def behave(conn, request):
        return answer(200, counts_body(request, quarantined=10))(conn, request)

    with RawServer(default=behave) as server, client_for(server) as client:
        report = client.send(payload_of(100), 100)
    assert [(d.rows, d.quarantined_rows, d.counts_read) for d in report.delivered] == [(100, 10, True)]
    account(report, list(range(100)))


# -- 2. hangs: a server that drips its headers or its body --------------------------------------


def drip_headers(conn: socket.socket, request: RawRequest) -> bool:
    # The status line itself never ends: no answer (one whose status line came whole keeps its
    # status, see test_an_answer_cut_after_its_status_line_keeps_its_status).
    conn.sendall(b"HTTP/1.1 200")
    return _send_forever(conn, b"X", every_secs=0.05)


def max_attempts_within(budget_secs: float, attempt_secs: float) -> int:
    """The most attempts that can start within ``budget_secs`` when each lasts at least
    ``attempt_secs`` (no attempt starts after the budget): a bound that a busy machine,
    which only makes attempts longer, cannot break."""
    return 1 + int(budget_secs // attempt_secs)


def test_dripped_headers_end_within_the_budget_plus_one_attempt_deadline():
    budget_secs, deadline_secs = 2.0, 0.8
    policy = RetryPolicy(max_attempts=10, initial_backoff_secs=0.05, max_backoff_secs=0.1, max_total_secs=budget_secs)
    with (RawServer(default=drip_headers) as server,
          client_for(server, policy=policy, read_timeout_secs=0.5, attempt_timeout_secs=deadline_secs) as client):
        started = time.monotonic()
        report = client.send(payload_of(50), 50)
        elapsed = time.monotonic() - started
    # Each byte comes well within the read timeout: only the attempt's deadline ends an attempt,
    # never before it (the socket's millisecond rounding aside) and by it, give or take how late
    # a busy machine runs the client.
    latencies = [a.latency_secs for a in report.attempts]
    assert {a.error for a in report.attempts} == {"deadline"}
    assert all(deadline_secs - _DEADLINE_SLACK_SECS <= s <= deadline_secs + BUSY_MACHINE_SLACK_SECS
               for s in latencies), latencies
    # The budget, counted: 3 attempts of at least 0.8 s fit in 2 s; 10 would without it.
    assert 1 <= len(latencies) <= max_attempts_within(budget_secs, deadline_secs - _DEADLINE_SLACK_SECS) == 3
    assert elapsed <= budget_secs + deadline_secs + BUSY_MACHINE_SLACK_SECS, elapsed
    (failed,) = report.failed
    assert failed.kind is DeadLetterKind.RETRIES_EXHAUSTED and "deadline of 0.8 s" in failed.message
    assert account(report, list(range(50)))[1] == list(range(50))


def test_a_2xx_with_a_dripped_body_is_delivered_once_within_the_deadline():
    def behave(conn, request):
        server.mark(request, 200)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        return _send_forever(conn, b"{", every_secs=0.05)

    deadline_secs = 0.6
    with (RawServer(default=behave) as server,
          client_for(server, read_timeout_secs=0.5, attempt_timeout_secs=deadline_secs) as client):
        report = client.send(payload_of(20), 20)
    (attempt,) = report.attempts
    assert (attempt.status, attempt.body_unreadable) == (200, True)
    # Ended by the deadline, not by the body's 50 s of dripping.
    assert deadline_secs - _DEADLINE_SLACK_SECS <= attempt.latency_secs <= deadline_secs + BUSY_MACHINE_SLACK_SECS
    assert [(d.rows, d.counts_read) for d in report.delivered] == [(20, False)]
    assert len(server.requests) == 1
    account(report, list(range(20)), server)


def test_a_pipeline_against_a_dripping_server_ends_within_its_budget(tmp_path):
    """finish_bundle never waits longer than the policy allows: the run takes at most
    max_total_secs plus one attempt's deadline longer than the same run against a good
    server, and every id is dead-lettered."""
    budget_secs, connect_secs, read_secs = 2.0, 0.3, 0.5
    deadline_secs = connect_secs + read_secs  # an attempt's deadline when none is set
    policy = RetryPolicy(max_attempts=50, initial_backoff_secs=0.05, max_backoff_secs=0.1, max_total_secs=budget_secs)

    def run(server: RawServer, dead_letter_path: str) -> tuple[float, object]:
        p = beam.Pipeline(runner=FnApiRunner())
        _ = (p | beam.Create([{"id": i} for i in range(300)], reshuffle=False)
             | WriteToTinybird(datasource="drip", token=TOKEN, api_url=server.url, retry_policy=policy,
                               connect_timeout_secs=connect_secs, read_timeout_secs=read_secs, num_shards=1,
                               dead_letter_path=dead_letter_path))
        started = time.monotonic()
        result = p.run()
        result.wait_until_finish()
        return time.monotonic() - started, result

    with RawServer(default=None) as good:  # type: ignore[arg-type]
        good.default = counted(good)
        baseline, _ = run(good, f"{tmp_path}/good/")
    with RawServer(default=drip_headers) as server:
        elapsed, result = run(server, f"{tmp_path}/dlq/")
    letters = dead_letters_in(tmp_path / "dlq")
    assert sorted(orjson.loads(d.line)["id"] for d in letters) == list(range(300))
    assert {d.kind for d in letters} == {"retries_exhausted"}
    counters = _counters(result)
    assert counters.get("rows_acknowledged", 0) == 0 and counters["retries_deadline"] > 0
    # One batch of 300 rows: at most 3 attempts of at least 0.8 s start within the 2 s budget
    # (50 without it), and the run lasts max_total_secs plus one attempt's deadline longer than
    # against a good server. Without deadlines the run never ends.
    assert counters["requests"] <= max_attempts_within(budget_secs, deadline_secs - _DEADLINE_SLACK_SECS) == 3
    print(f"dripping server: {elapsed:.2f} s, good server: {baseline:.2f} s")
    assert elapsed - baseline <= budget_secs + deadline_secs + BUSY_MACHINE_SLACK_SECS, (elapsed, baseline)


# -- 3. memory: huge, endless and bomb bodies (peak RSS in a process of its own) ---------------


def huge_body(server: RawServer):
    def behave(conn, request):
        server.mark(request, 200)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (400 * 1024 * 1024))
        chunk = b"x" * (1 << 20)
        for _ in range(400):
            conn.sendall(chunk)
        return True

    return behave


@functools.cache
def _gzip_of_zeros(mib: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    return b"".join(compressor.compress(zeros) for _ in range(mib)) + compressor.flush()


def _gzip_bomb_answer() -> bytes:
    bomb = _gzip_of_zeros(512)
    assert len(bomb) < 600_000  # about 0.5 MB that decodes to 512 MiB
    return bomb


def endless_chunked(server: RawServer):
    def behave(conn, request):
        server.mark(request, 200)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        return _send_forever(conn, b"4000\r\n" + b"y" * 0x4000 + b"\r\n")

    return behave


def gzip_bomb(server: RawServer):
    bomb = _gzip_bomb_answer()

    def behave(conn, request):
        server.mark(request, 200)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb)
        return True

    return behave


def _probe(url: str, tmp_path: Path, name: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("rss_probe.py")), url, "2000", str(tmp_path / name)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_huge_endless_and_bomb_bodies_keep_peak_memory_within_64_mib_of_a_good_run(tmp_path):
    peaks = {}
    for name, behaviour in (("good", lambda server: counted(server, 200)), ("400 MB body", huge_body),
                            ("gzip bomb", gzip_bomb), ("endless chunked body", endless_chunked)):
        with RawServer(default=None) as server:  # type: ignore[arg-type]
            server.default = behaviour(server)
            result = _probe(server.url, tmp_path, name.replace(" ", "_"))
            # Every id accounted for: all acknowledged (the status decides), none dead-lettered.
            assert result["dead_letter_ids"] == []
            assert result["counters"]["rows_acknowledged"] == 2000
            assert sorted(server.acknowledged_ids()) == list(range(2000))
            if name != "good":
                assert result["counters"]["responses_2xx_unreadable"] == result["counters"]["requests"]
        peaks[name] = result["peak_rss_kib"] / 1024
    print("peak RSS, MiB:", {k: round(v, 1) for k, v in peaks.items()})
    for name, peak in peaks.items():
        assert peak - peaks["good"] < 64, f"{name}: {peak:.0f} MiB vs {peaks['good']:.0f} MiB"


def test_a_small_bomb_is_decoded_only_up_to_the_cap():
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(compressor.compress(b"\0" * (1 << 20)) for _ in range(40)) + compressor.flush()
    assert len(bomb) < MAX_BODY_BYTES  # read whole, then decoded to at most the cap
    with (RawServer(default=answer(503, bomb, headers=[("Content-Encoding", "gzip")])) as server,
          client_for(server, policy=RetryPolicy(max_attempts=1)) as client):
        report = client.send(payload_of(3), 3)
    (failed,) = report.failed
    assert (failed.kind, failed.status) == (DeadLetterKind.RETRIES_EXHAUSTED, 503)
    assert failed.message.endswith(
        f"last: HTTP 503: (body unreadable: gzip body that does not decode to a whole body of at most "
        f"{MAX_BODY_BYTES} bytes)")


# A 3xx is an answer like any other: never followed, its body read within the caps and the
# attempt's deadline, its Location kept as text. Most bytes traced while one is handled: a
# few reads and decodes of at most MAX_BODY_BYTES, far under the bombs' 32 and 256 MiB.
_REDIRECT_TRACED_BYTES = 4 * 1024 * 1024
# case: (MiB of zeros in a gzip body, None for a body that drips, 0 for none; the Location)
_REDIRECT_CASES = {
    "gzip bomb read whole": (32, "https://elsewhere.example/"),  # about 32 KB on the wire
    "gzip bomb over the read cap": (256, "https://elsewhere.example/"),  # about 250 KB
    "slow body": (None, "https://elsewhere.example/"),
    "Location urllib cannot parse": (0, "http://[oops/"),
    "Location that is not UTF-8": (0, "https://h\xe9llo.example/"),
}


@pytest.mark.parametrize("case", list(_REDIRECT_CASES))
@pytest.mark.parametrize("status", [300, 301, 302, 303, 304, 305, 307, 308])
def test_every_3xx_is_rejected_after_one_attempt_within_the_caps(status, case):
    mib, location = _REDIRECT_CASES[case]
    body = _gzip_of_zeros(mib) if mib else b""

    def behave(conn, request):
        server.mark(request, status)
        head = b"HTTP/1.1 %d X\r\nLocation: %s\r\n" % (status, location.encode("latin-1"))
        if mib is None:
            conn.sendall(head + b"Content-Length: 1000\r\n\r\n")
            return _send_forever(conn, b"x", every_secs=0.05)
        if body:
            head += b"Content-Encoding: gzip\r\n"
        conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return True

    deadline_secs = 0.6
    with (RawServer(default=behave) as server,
          client_for(server, read_timeout_secs=0.5, attempt_timeout_secs=deadline_secs) as client):
        tracemalloc.start()
        try:
            report = client.send(payload_of(3), 3)
            traced_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert len(server.requests) == 1
    (attempt,) = report.attempts
    assert (attempt.status, attempt.error, attempt.retry_cause) == (status, None, None)
    assert attempt.latency_secs <= deadline_secs + BUSY_MACHINE_SLACK_SECS
    (failed,) = report.failed
    assert (failed.kind, failed.status, failed.attempts) == (DeadLetterKind.REJECTED, status, 1)
    assert failed.message == f"HTTP {status}: unexpected redirect to {location!r}; check api_url"
    assert traced_peak < _REDIRECT_TRACED_BYTES, traced_peak
    account(report, [0, 1, 2], server)


# -- 4. exceptions that escaped: absurd dates, negative chunk sizes --------------------------


@pytest.mark.parametrize("retry_after", [
    "Fri, 31 Dec 99999999999 23:59:59 GMT",  # OverflowError in datetime
    "Mon, 01 Jan 2024 00:00:00 +99999999",  # an offset out of range
    "9" * 5000,  # capped to 256 characters, then a finite number
    "1e999", "-inf", "nan", "\x00\x01",
])
def test_garbled_retry_after_never_escapes(retry_after):
    fake = FakeTime()
    with RawServer(default=None) as server:  # type: ignore[arg-type]
        server.default = counted(server)
        server.script = [answer(503, b'{"error":"busy"}', headers=[("Retry-After", retry_after)])]
        with client_for(server, fake=fake) as client:
            report = client.send(payload_of(5), 5)
    assert [a.status for a in report.attempts] == [503, 202]
    # The server's wish is honoured up to the policy's cap, else the backoff applies.
    assert fake.sleeps in ([0.0075], [QUICK.max_retry_after_secs])
    account(report, list(range(5)), server)


@pytest.mark.parametrize("chunk_size", [b"-1", b"-5", b"zz", b"ffffffffffffffffffffffff"])
def test_bad_chunk_sizes_never_escape(chunk_size):
    def behave(conn, request):
        server.mark(request, 200)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk_size + b"\r\nabc\r\n")
        conn.shutdown(socket.SHUT_WR)
        return False

    with RawServer(default=behave) as server, client_for(server) as client:
        report = client.send(payload_of(7), 7)
    (attempt,) = report.attempts
    assert (attempt.status, attempt.body_unreadable) == (200, True)
    assert [(d.rows, d.counts_read) for d in report.delivered] == [(7, False)]
    account(report, list(range(7)), server)


def _window(limit: str, remaining: str, *, status: int = 202, retry_after: str | None = None):
    headers = [("X-RateLimit-Limit", limit), ("X-RateLimit-Remaining", remaining)]
    return status, headers + ([] if retry_after is None else [("Retry-After", retry_after)])


_TOP = "1.7976931348623157e308"  # the largest float
_ABSURD_WINDOWS = {
    # Finite, a limit above 0, nothing negative: each answer passes as a rate-limit window, but
    # the requests counted between two of them sum past float's range.
    "enormous limit": [_window("1e308", "0" if i % 2 == 0 else "1e308") for i in range(12)],
    "largest float limit": [_window(_TOP, "0" if i % 2 == 0 else _TOP) for i in range(12)],
    # A service measured at its limit, then a 429 with requests left in a window of 1e-310 requests:
    # the requests that fitted it, which the load is read against for 30 s, are next to zero.
    "next to no requests": [_window("1000", str(900 - 100 * i)) for i in range(8)]
    + [_window("1e-310", "5e-311", status=429, retry_after="0.1")] + [_window("1000", "500")] * 4,
}


@pytest.mark.parametrize("case", list(_ABSURD_WINDOWS))
def test_absurd_rate_limit_numbers_never_escape(case):
    """A ValueError (math domain error) from the limiter's steering escaped ``send`` after the server
    had stored the batch: the bundle failed, and its retry would store the rows again."""
    answers = list(_ABSURD_WINDOWS[case])
    fake = FakeTime()

    def behave(conn, request):
        fake.advance(0.1)  # answers 0.1 s apart: pairs of one window, as the limiter measures them
        status, headers = answers.pop(0) if answers else (202, [])
        body = b'{"error":"slow down"}' if status == 429 else counts_body(request)
        return answer(status, body, headers=headers, server=server)(conn, request)

    sends = sum(1 for status, _ in answers if status == 202)
    with RawServer(default=behave) as server, client_for(server, policy=RetryPolicy(), fake=fake) as client:
        reports = [client.send(payload_of(1, start=i), 1) for i in range(sends)]
    assert answers == []
    assert [(r.delivered_rows, r.failed_rows) for r in reports] == [(1, 0)] * sends
    for i, report in enumerate(reports):
        account(report, [i], server)
    # Every wait was a number within the batch's throttling budget (never infinite nor NaN).
    assert all(0 <= secs <= RetryPolicy().max_throttled_secs for secs in fake.sleeps), fake.sleeps


# -- 5. broken 2xx and interim 1xx answers ----------------------------------------------------


@pytest.mark.parametrize("case", ["cut short", "gzip that does not decode", "unknown encoding"])
def test_a_broken_2xx_is_delivered_once_and_counted_as_unreadable(case):
    def behave(conn, request):
        server.mark(request, 200)
        if case == "cut short":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + counts_body(request)[:10])
            conn.shutdown(socket.SHUT_WR)
            return False
        encoding = "gzip" if case == "gzip that does not decode" else "br"
        return answer(200, b"\x1f\x8b garbage", headers=[("Content-Encoding", encoding)])(conn, request)

    with RawServer(default=behave) as server, client_for(server) as client:
        report = client.send(payload_of(30), 30)
    assert len(server.requests) == 1  # not resent: resending a stored 2xx would store it twice
    assert [(a.status, a.body_unreadable, a.retry_cause) for a in report.attempts] == [(200, True, None)]
    assert [(d.rows, d.counts_read) for d in report.delivered] == [(30, False)]
    assert report.failed == ()
    account(report, list(range(30)), server)


def test_interim_answers_are_skipped_and_the_final_answer_counts():
    interim = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
               b"HTTP/1.1 102 Processing\r\n\r\n")

    def behave(conn, request):
        return answer(202, counts_body(request), interim=interim, server=server)(conn, request)

    with RawServer(default=behave) as server, client_for(server) as client:
        first = client.send(payload_of(10), 10)
        second = client.send(payload_of(10, start=10), 10)  # the same connection, still in step
    for report in (first, second):
        assert [(a.status, a.body_unreadable) for a in report.attempts] == [(202, False)]
        assert [(d.status, d.counts_read) for d in report.delivered] == [(202, True)]
    account(first, list(range(10)), server)
    account(second, list(range(10, 20)), server)


def test_endless_interim_answers_are_a_protocol_error():
    def behave(conn, request):
        return _send_forever(conn, b"HTTP/1.1 103 Early Hints\r\n\r\n" * 20)

    with (RawServer(default=behave) as server,
          client_for(server, policy=RetryPolicy(max_attempts=2, initial_backoff_secs=0.01)) as client):
        report = client.send(payload_of(4), 4)
    assert [a.error for a in report.attempts] == ["protocol_error", "protocol_error"]
    assert report.failed[0].kind is DeadLetterKind.RETRIES_EXHAUSTED
    account(report, list(range(4)))


# Header blocks that the HTTP stack refuses once the status line was read: urllib3
# refuses different Content-Length values, http.client more than 100 header lines
# and a line over 64 KiB.
_HEADER_DEFECTS = {
    "two different Content-Length values": lambda length: [
        b"Content-Length: %d" % length, b"Content-Length: %d" % (length + 1)],
    "a Content-Length list of different values": lambda length: [b"Content-Length: %d, %d" % (length, length + 1)],
    "101 header lines": lambda length: [b"X-H%d: v" % i for i in range(101)] + [b"Content-Length: %d" % length],
    "a header line over 64 KiB": lambda length: [b"X-Long: " + b"v" * 70_000, b"Content-Length: %d" % length],
}


def refused_headers(server: RawServer, status: int, defect: str):
    def behave(conn, request):
        server.mark(request, status)
        body = counts_body(request) if 200 <= status < 300 else b'{"error":"no"}'
        head = [b"HTTP/1.1 %d X" % status, *_HEADER_DEFECTS[defect](len(body))]
        conn.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        return False

    return behave


@pytest.mark.parametrize("defect", sorted(_HEADER_DEFECTS))
@pytest.mark.parametrize("status", [200, 202, 204, 400, 401, 403, 404])
def test_an_answer_whose_headers_the_http_stack_refuses_keeps_its_status(status, defect):
    """The answer came, so its status decides: a 2xx is acknowledged (its rows are
    stored: resending would store them twice), a 4xx is rejected; neither is resent."""
    with RawServer(default=None) as server:  # type: ignore[arg-type]
        server.default = refused_headers(server, status, defect)
        with client_for(server) as client:
            report = client.send(payload_of(5), 5)
    assert len(server.requests) == 1
    assert [(a.status, a.error, a.body_unreadable, a.retry_cause) for a in report.attempts] == [
        (status, None, True, None)]
    if status < 300:
        assert [(d.rows, d.status, d.counts_read) for d in report.delivered] == [(5, status, False)]
        assert report.failed == ()
    else:
        (failed,) = report.failed
        assert (failed.kind, failed.status, failed.attempts) == (DeadLetterKind.REJECTED, status, 1)
        assert failed.message.startswith(f"HTTP {status}: ")
        assert "(body unreadable: its headers were refused or cut short (" in failed.message
    account(report, list(range(5)), server)


@pytest.mark.parametrize("defect", sorted(_HEADER_DEFECTS))
def test_a_5xx_whose_headers_the_http_stack_refuses_is_retried_as_a_5xx(defect):
    with RawServer(default=None) as server:  # type: ignore[arg-type]
        server.default = refused_headers(server, 503, defect)
        with client_for(server) as client:
            report = client.send(payload_of(5), 5)
    assert [(a.status, a.retry_cause) for a in report.attempts] == [(503, "503"), (503, "503"), (503, None)]
    (failed,) = report.failed
    assert (failed.kind, failed.status) == (DeadLetterKind.RETRIES_EXHAUSTED, 503)
    assert account(report, list(range(5)), server) == ([], list(range(5)))


def _cut_after_status_line(server: RawServer, status: int, how: str):
    """A status line and half a header, then a reset, an orderly close, or header bytes dripped
    until the attempt's deadline."""
    def behave(conn, request):
        server.mark(request, status)
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Ty" % status)
        if how == "dripped past the deadline":
            return _send_forever(conn, b"p", every_secs=0.05)
        if how == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        return False

    return behave


_CUTS = ["reset", "closed", "dripped past the deadline"]


@pytest.mark.parametrize("how", _CUTS)
@pytest.mark.parametrize("status", [200, 202, 400, 403])
def test_an_answer_cut_after_its_status_line_keeps_its_status(status, how):
    """Found by a review: a 200 whose headers were cut by a reset (or the deadline) was taken
    for no answer and resent, where the same 200 closed in order was delivered once: up to
    max_attempts copies of stored rows. The status line came whole, so it decides."""
    with RawServer(default=None) as server:  # type: ignore[arg-type]
        server.default = _cut_after_status_line(server, status, how)
        with client_for(server, read_timeout_secs=0.5, attempt_timeout_secs=0.8) as client:
            report = client.send(payload_of(5), 5)
    assert len(server.requests) == 1
    # Closed in order, the stream's end ends the headers for http.client: an empty body.
    assert [(a.status, a.error, a.body_unreadable) for a in report.attempts] == [(status, None, how != "closed")]
    if status < 300:
        assert [(d.rows, d.status, d.counts_read) for d in report.delivered] == [(5, status, False)]
    else:
        (failed,) = report.failed
        assert (failed.kind, failed.status, failed.attempts) == (DeadLetterKind.REJECTED, status, 1)
    account(report, list(range(5)), server)


@pytest.mark.parametrize("how", _CUTS)
def test_a_5xx_cut_after_its_status_line_is_retried_as_a_5xx(how):
    with RawServer(default=None) as server:  # type: ignore[arg-type]
        server.default = _cut_after_status_line(server, 503, how)
        with client_for(server, read_timeout_secs=0.5, attempt_timeout_secs=0.8) as client:
            report = client.send(payload_of(5), 5)
    assert [(a.status, a.retry_cause) for a in report.attempts] == [(503, "503"), (503, "503"), (503, None)]
    (failed,) = report.failed
    assert (failed.kind, failed.status) == (DeadLetterKind.RETRIES_EXHAUSTED, 503)
    assert account(report, list(range(5)), server) == ([], list(range(5)))


# -- 6. unbounded work: 413 to everything, long rate-limit pauses -----------------------------


def test_413_to_everything_stops_at_the_time_budget():
    # Each answer takes the server 1/16 s of the client's clock (injected: a busy machine
    # changes nothing), so the 1 s budget holds a known number of requests.
    fake, server_secs = FakeTime(), 0.0625

    def behave(conn, request):
        fake.advance(server_secs)
        return answer(413, b'{"error":"too large"}')(conn, request)

    policy = RetryPolicy(max_total_secs=1.0)
    with RawServer(default=behave) as server, client_for(server, policy=policy, fake=fake) as client:
        started = fake.clock()
        report = client.send(payload_of(1000), 1000)
    # No request starts after the budget: one at 0 s, then one every 1/16 s up to 1 s; far
    # fewer than the 1999 requests of splitting down to single rows.
    assert len(server.requests) == 1 + 16
    assert fake.clock() - started == 17 * server_secs
    assert fake.sleeps == []  # a split is sent at once
    kinds = {f.kind for f in report.failed}
    assert kinds <= {DeadLetterKind.PAYLOAD_TOO_LARGE, DeadLetterKind.RETRIES_EXHAUSTED}
    assert DeadLetterKind.RETRIES_EXHAUSTED in kinds
    refused = [f for f in report.failed if f.kind is DeadLetterKind.RETRIES_EXHAUSTED]
    assert all("past max_total_secs=1" in f.message for f in refused)
    assert account(report, list(range(1000)))[1] == list(range(1000))


def test_a_single_row_refused_with_413_stays_payload_too_large():
    with RawServer(default=answer(413, b'{"error":"too large"}')) as server, client_for(server) as client:
        report = client.send(payload_of(1), 1)
    (failed,) = report.failed
    assert (failed.kind, failed.attempts) == (DeadLetterKind.PAYLOAD_TOO_LARGE, 1)


def test_a_rate_limit_pause_longer_than_the_budget_fails_the_batch_at_once():
    fake = FakeTime()
    with RawServer(default=None) as server:  # type: ignore[arg-type]
        server.default = counted(server, headers=[("X-RateLimit-Remaining", "0"), ("X-RateLimit-Reset", "100")])
        policy = RetryPolicy(max_throttled_secs=30)
        with client_for(server, policy=policy, fake=fake) as client:
            first = client.send(payload_of(3), 3)
            second = client.send(payload_of(3, start=3), 3)
    assert first.delivered_rows == 3 and len(server.requests) == 1
    (failed,) = second.failed
    # A pause is throttling: it counts against max_throttled_secs (issue 22), no longer max_total_secs.
    assert (failed.kind, failed.attempts, failed.status) == (DeadLetterKind.THROTTLED, 0, None)
    assert failed.message == (
        "waiting on the rate limit would bring the batch's throttled time to 100.0 s, past max_throttled_secs=30")
    assert fake.sleeps == []
    account(second, [3, 4, 5])


# -- 7. unbounded server text -----------------------------------------------------------------


def test_megabytes_of_location_or_error_text_stay_capped_in_dead_letters():
    folded = "https://elsewhere.example/" + "".join(f"\r\n {'L' * 60_000}" for _ in range(16))
    with RawServer(default=answer(307, b"", headers=[("Location", folded)])) as server:
        server.script = [answer(400, orjson.dumps({"error": "E" * 2_000_000}))]
        with client_for(server) as client:
            reports = [client.send(payload_of(2), 2), client.send(payload_of(2, start=2), 2)]
    account(reports[0], [0, 1])
    account(reports[1], [2, 3])
    messages = [f.message for r in reports for f in r.failed]
    assert [len(m) <= 1000 for m in messages] == [True, True]
    assert messages[0] == f"HTTP 400: (body unreadable: larger than {MAX_BODY_BYTES} bytes)"
    assert messages[1].startswith("HTTP 307: unexpected redirect to 'https://elsewhere.example/ LLL")
    assert len(messages[1]) < 256 + 60
    for report in reports:
        for failed in report.failed:
            for line in failed.payload.splitlines():
                record = DeadLetter(line=line.decode(), element=None, datasource="events", kind=failed.kind.value,
                                    status=failed.status, message=failed.message, attempts=failed.attempts,
                                    first_attempt_at="", last_attempt_at="", window="global")
                assert len(to_json_line(record)) < len(line) + 1500


# -- 8. token leaks -----------------------------------------------------------------------------


def _token_parts(text: str) -> list[str]:
    """Pieces of the token (12 characters or more) found in ``text``."""
    return [TOKEN[i:i + 12] for i in range(len(TOKEN) - 11) if TOKEN[i:i + 12] in text]


@pytest.mark.parametrize("offset", [990, 995, 1000, 1005])
def test_a_token_straddling_the_message_cap_is_scrubbed_first(offset):
    text = "x" * (offset - len("HTTP 400: ")) + TOKEN + " and more"
    with RawServer(default=answer(400, orjson.dumps({"error": text}))) as server, client_for(server) as client:
        report = client.send(payload_of(1), 1)
    (failed,) = report.failed
    assert account(report, [0]) == ([], [0])
    assert _token_parts(failed.message) == []
    assert len(failed.message) <= len("HTTP 400: ") + 1000


def test_a_token_echoed_in_a_malformed_header_line_reaches_no_log(caplog):
    caplog.set_level(logging.DEBUG)

    def behave(conn, request):
        body = b'{"error":"bad"}'
        conn.sendall(b"HTTP/1.1 400 Bad\r\nContent-Length: %d\r\nX-Ok: 1\r\n" % len(body)
                     + b"Bearer " + TOKEN.encode() + b" \x01\r\n"  # not a header line: urllib3 logs it
                     + b"X-Echo: " + TOKEN.encode() + b"\r\n\r\n" + body)
        return True

    urllib3_logger = logging.getLogger("urllib3.connection")
    registered = redaction._FILTER._tokens[TOKEN]  # other tests' clients Beam never tore down
    with RawServer(default=behave) as server:
        with client_for(server) as client:
            report = client.send(payload_of(2), 2)
            filters = list(urllib3_logger.filters)
            during = redaction._FILTER._tokens[TOKEN]
        after = redaction._FILTER._tokens[TOKEN]
    assert any("Failed to parse headers" in r.getMessage() for r in caplog.records), "urllib3 did not log it"
    texts = [caplog.text, repr(report), *(f.message for f in report.failed)]
    texts += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    for text in texts:
        assert _token_parts(text) == [], text[:300]
    assert report.failed[0].status == 400
    assert account(report, [0, 1]) == ([], [0, 1])
    # Installed while the client is open (one filter however many clients), released when it closes.
    assert len(filters) == 1 and (during, after) == (registered + 1, registered)


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_a_token_echoed_after_the_client_closed_reaches_no_log(in_flight, caplog):
    """A DoFn torn down (a failed bundle) with sends under way: each attempt still reads
    its answer after close(), and urllib3 logs a malformed header line of it. The token
    stays scrubbed until the last of them ends, then its registration is released."""
    caplog.set_level(logging.DEBUG)
    token = f"p.closed-while-in-flight-{in_flight}-0123456789abcdef"  # no other client registers it
    arrived, closed = threading.Semaphore(0), threading.Event()

    def behave(conn, request):
        arrived.release()
        closed.wait(10)
        time.sleep(0.05 * request.ids[0])  # the answers end one after the other
        body = b'{"error":"bad"}'
        conn.sendall(b"HTTP/1.1 400 Bad\r\nContent-Length: %d\r\n" % len(body)
                     + b"Bearer " + token.encode() + b" \x01\r\n\r\n" + body)
        return True

    with RawServer(default=behave) as server:
        client = client_for(server, token=token, max_in_flight=in_flight, read_timeout_secs=10.0)
        reports: list[SendReport] = []
        # A data source each: each has a limiter of its own, which lets its first request go at once.
        threads = [threading.Thread(target=lambda i=i: reports.append(client.send(payload_of(1, i), 1, f"closing_{i}")))
                   for i in range(in_flight)]
        for thread in threads:
            thread.start()
        for _ in threads:
            assert arrived.acquire(timeout=10)
        client.close()
        registered_after_close = redaction._FILTER._tokens[token]
        closed.set()
        for thread in threads:
            thread.join(10)
    parse_failures = [r for r in caplog.records if "Failed to parse headers" in r.getMessage()]
    assert len(parse_failures) == in_flight, "urllib3 did not log every answer"
    for text in [caplog.text, *(r.getMessage() + (r.exc_text or "") for r in caplog.records)]:
        assert _slices_in_any_case(token, text) == [], text[:300]
    # Kept while the sends ran, released once the last ended.
    assert (registered_after_close, redaction._FILTER._tokens[token]) == (1, 0)
    assert sorted((r.failed[0].status, *ids_in(r.failed[0].payload)) for r in reports) == [
        (400, i) for i in range(in_flight)]


_TOKENS = (
    TOKEN,
    "p.secret-lowercase-token-0123456789abcdefghijklmnopqrstuvwxyz",
    "p.eyJ1IjogIjQ2YzdjMGM0LTMwZjMtNGQ1Yy1hYjYwLTJmZTM3NTk5NmQ2YyJ9.SIGnatureXYZ",
)
_CASES = (str, str.upper, str.lower, str.swapcase)
# Every header kept, one not kept, and the reason phrase.
_ECHOING_HEADERS = ("Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Location",
                    "Content-Type", "Content-Encoding", "X-Echo")


def _slices_in_any_case(token: str, text: str) -> list[str]:
    """Pieces of ``token`` (12 characters or more) found in ``text``, whatever their case."""
    folded = text.lower()
    return [token[i:i + 12] for i in range(len(token) - 11) if token[i:i + 12].lower() in folded]


def echoing(token: str, status: int | None):
    """An answer with ``token`` in every header (a different case in each) and its reason
    phrase; ``None``: a status line that does not parse, holding it."""

    def behave(conn, request):
        if status is None:
            conn.sendall(f"HTTP/1.1 2x0 {token.upper()}\r\nContent-Length: 0\r\n\r\n".encode())
            return False
        lines = [f"HTTP/1.1 {status} {token.swapcase()}"]
        lines += [f"{name}: {_CASES[i % len(_CASES)](token)}" for i, name in enumerate(_ECHOING_HEADERS)]
        lines.append("Content-Length: 0")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return False

    return behave


@pytest.mark.parametrize("status", [200, 307, 400, 429, 503, None])
@pytest.mark.parametrize("token", _TOKENS)
def test_a_token_echoed_in_any_header_in_any_case_reaches_no_text(token, status, caplog):
    """Scrubbed before anything lower-cases or cuts it, in any case of its letters: no
    12-character piece of the token is left in the headers kept, the messages or the logs."""
    caplog.set_level(logging.DEBUG)
    with RawServer(default=echoing(token, status)) as server:
        transport = Transport(url=f"{server.url}/v0/events", headers={}, token=token,
                              redactor=redaction.Redactor((token,)), connect_timeout_secs=2.0,
                              read_timeout_secs=2.0, attempt_timeout_secs=5.0, ca_bundle_path=None, max_in_flight=1)
        try:
            outcome = transport.post(b'{"id":1}\n')
        finally:
            transport.close()
        policy = RetryPolicy(max_attempts=2, initial_backoff_secs=0.01, max_backoff_secs=0.01,
                             max_throttled_secs=0.05)
        with client_for(server, policy=policy, token=token) as client:
            report = client.send(payload_of(2), 2)
    texts = [outcome.message, repr(report), caplog.text, *(r.getMessage() + (r.exc_text or "") for r in caplog.records)]
    if isinstance(outcome, BoundedResponse):
        # Every header kept held nothing but the token; the unknown encoding is named, scrubbed.
        assert (outcome.status, dict(outcome.headers)) == (
            status, {**{name: "***" for name in _ECHOING_HEADERS[:-1]}, "Content-Length": "0"})
        assert outcome.message == "(body unreadable: content encoding '***' is not supported)"
        texts.append(outcome.body_error or "")
    else:
        assert (status, outcome.error) == (None, "protocol_error")
        assert "BadStatusLine('HTTP/1.1 2x0 ***\\r\\n')" in outcome.message
    if status == 307:
        assert [f.message for f in report.failed] == ["HTTP 307: unexpected redirect to '***'; check api_url"]
    texts += [f.message for f in report.failed]
    for text in texts:
        assert _slices_in_any_case(token, text) == [], text[:300]
    account(report, [0, 1])


# -- helpers of the pipeline tests ----------------------------------------------------------------


def _counters(result) -> dict[str, int]:
    totals: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace("tinybird"))["counters"]:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + counter.committed
    return totals


def test_a_pipeline_counts_every_id_and_the_new_metrics(tmp_path):
    """Short counts, an unreadable 2xx and good answers in one run: acknowledged + dead-lettered = sent."""
    lock = threading.Lock()
    seen = []

    def behave(conn, request):
        with lock:
            seen.append(request)
            n = len(seen)
        if n == 1:
            return answer(200, counts_body(request, successful=request.rows - 1), server=server)(conn, request)
        if n == 2:
            return answer(200, b"not json", server=server)(conn, request)
        return counted(server, 200)(conn, request)

    with RawServer(default=behave) as server:
        p = beam.Pipeline(runner=FnApiRunner())
        _ = (p | beam.Create([{"id": i} for i in range(500)], reshuffle=False)
             | WriteToTinybird(datasource="mixed", token=TOKEN, api_url=server.url, retry_policy=QUICK,
                               max_batch_bytes=1024, num_shards=1, max_in_flight=1,
                               dead_letter_path=f"{tmp_path}/dlq/"))
        result = p.run()
        result.wait_until_finish()
    letters = dead_letters_in(tmp_path / "dlq")
    dead = sorted(orjson.loads(d.line)["id"] for d in letters)
    first_ids = seen[0].ids
    assert dead == sorted(first_ids) and {d.kind for d in letters} == {"rows_unaccounted"}
    counters = _counters(result)
    assert counters["rows_acknowledged"] + len(dead) == 500
    assert sorted(set(server.acknowledged_ids()) - set(dead)) == sorted(set(range(500)) - set(dead))
    assert counters["responses_2xx_unaccounted"] == 1
    assert counters["dead_letters_rows_unaccounted"] == len(first_ids)
    assert counters["responses_2xx_unreadable"] == 1
    assert counters["rows_acknowledged_uncounted"] == seen[1].rows
    assert counters["requests"] == len(seen)


def test_finish_bundle_never_waits_past_the_clients_bound():
    """The safety net: a send that outlives the client's own bound (which the client keeps
    by construction) is dead-lettered by finish_bundle instead of being waited for."""
    from apache_beam.utils.timestamp import Timestamp

    from sinks.tinybird._batching import Batch
    from sinks.tinybird._token import TokenSource
    from sinks.tinybird._transform import _PostDoFn

    release = threading.Event()

    class StuckClient:
        max_send_secs = 0.3

        def send(self, payload, rows, datasource=None):
            release.wait(10)
            raise AssertionError("never reached in time")

        def close(self):
            release.set()

    fn = _PostDoFn(settings=ClientSettings(api_url="http://127.0.0.1:9", datasource="stuck"),
                   token=TokenSource(value=TOKEN), retry_policy=QUICK, raise_on_failure=False)
    fn.setup()
    fn._client.close()
    fn._client = StuckClient()  # type: ignore[assignment]
    try:
        fn.start_bundle()
        payload = payload_of(5)
        started = time.monotonic()
        stamps = array.array("q", [0] * 5).tobytes()
        outputs = list(fn.process(Batch("global", payload, 5, b"", stamps, "stuck"), timestamp=Timestamp(0)))
        outputs += list(fn.finish_bundle())
        elapsed = time.monotonic() - started
    finally:
        fn.teardown()
    letters = [o.value.value[0] for o in outputs]  # (dead letter, its window's bytes)
    assert elapsed < StuckClient.max_send_secs + BUSY_MACHINE_SLACK_SECS < 10, elapsed  # never the 10 s wait
    assert sorted(orjson.loads(d.line)["id"] for d in letters) == list(range(5))
    assert {(d.kind, d.attempts) for d in letters} == {("retries_exhausted", 0)}
    assert letters[0].message.startswith("no outcome within 0.3 s")


_LONG_WAIT_SECS = 30.0
# Each case: the answers that put the sends into a wait of _LONG_WAIT_SECS, and the sends
# (rows of each, to one data source) under way when the client is closed.
_WAITS_AT_CLOSE = {
    "after a 429's Retry-After": ([answer(429, headers=[("Retry-After", "30")])], [2]),
    "in a 503's backoff": ([answer(503)], [2]),
    "on the process's pause another send's 429 set": ([answer(429, headers=[("Retry-After", "30")])], [2, 3]),
    "with the other half of a 413 split left": (
        [answer(413), answer(429, headers=[("Retry-After", "30")])], [4]),
}


@pytest.mark.parametrize("case", list(_WAITS_AT_CLOSE))
def test_a_send_waiting_when_its_client_closes_ends_at_once_and_sends_nothing_more(case):
    """A DoFn torn down with sends under way (a failed bundle; the runner retries it): each
    send that is waiting ends within a second of close(), not after its wait of 30 s, starts no
    attempt, and still accounts for every row (the worker process's exit joins its thread)."""
    script, sends = _WAITS_AT_CLOSE[case]
    policy = RetryPolicy(max_attempts=3, initial_backoff_secs=_LONG_WAIT_SECS, max_backoff_secs=_LONG_WAIT_SECS,
                         max_total_secs=1000)
    reports: list[SendReport] = []
    with RawServer(default=answer(500), script=script) as server:
        client = client_for(server, policy=policy)  # its own limiter: the server has a port of its own
        first_ids = [sum(sends[:i]) for i in range(len(sends))]
        threads = [threading.Thread(target=lambda rows=rows, first=first: reports.append(
            client.send(payload_of(rows, first), rows))) for rows, first in zip(sends, first_ids, strict=True)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(server.requests) < len(script) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # every send is in its wait now
        requests_at_close = len(server.requests)
        closed_at = time.monotonic()
        client.close()
        for thread in threads:
            thread.join(_LONG_WAIT_SECS + 10)
        ended_after = time.monotonic() - closed_at
    assert requests_at_close == len(script)
    assert len(server.requests) == requests_at_close  # no attempt after close
    assert ended_after < 1.0 + BUSY_MACHINE_SLACK_SECS < _LONG_WAIT_SECS, ended_after
    assert len(reports) == len(sends)
    for report in reports:
        assert report.delivered == ()
        assert {(f.kind, f.message.split("; last:")[0]) for f in report.failed} == {
            (DeadLetterKind.REJECTED, "the client was closed")}
    dead = sorted(i for report in reports for failed in report.failed for i in ids_in(failed.payload))
    assert dead == list(range(sum(sends)))


_RAISING_STEPS = {
    "the transport": "sinks.tinybird._http.transport.Transport.post",
    "classifying the answer": "sinks.tinybird._events_api.classify",
    "reading the rate-limit headers": "sinks.tinybird._events_api.rate_window",
    "asking the pause left": "sinks.tinybird._http.limiter.Limiter.pause_remaining",
}


@pytest.mark.parametrize("step", list(_RAISING_STEPS))
def test_an_attempt_that_raises_after_taking_its_slot_gives_the_slot_back(step, monkeypatch):
    """Whatever step of an attempt raises once it holds a slot of the process's limiter (none is
    known to, for any answer: a fault injected here), the slot is given back: one held for ever
    would leave the data source a request in flight fewer for the life of the worker, and none at
    all once max_in_flight had leaked. The send raises (its bundle fails and is retried); the next
    sends go through, as many at once as before."""
    target = _RAISING_STEPS[step]
    module_path, _, name = target.rpartition(".")
    owner: object
    try:
        owner = importlib.import_module(module_path)
    except ModuleNotFoundError:
        module, _, cls = module_path.rpartition(".")
        owner = getattr(importlib.import_module(module), cls)
    real = getattr(owner, name)
    failures = {"left": 2}

    def raising(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError(f"injected in {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, raising)
    with RawServer(default=answer(200, b'{"successful_rows": 3, "quarantined_rows": 0}')) as server:
        client = client_for(server, max_in_flight=2)  # its own limiter: the server has a port of its own
        limiter = client.limiter("events")
        for _ in range(2):
            with pytest.raises(RuntimeError, match="injected"):
                client.send(payload_of(3), 3)
            assert limiter.in_flight == 0
        reports = [client.send(payload_of(3, 3 * i), 3) for i in range(3)]
        client.close()
    assert [r.delivered_rows for r in reports] == [3, 3, 3]
    assert limiter.in_flight == 0


# -- name lookups ---------------------------------------------------------------------------


def _transport(url: str, getaddrinfo, *, attempt_timeout_secs: float):
    from sinks.tinybird._http.transport import Transport

    return Transport(url=url, headers={}, token=TOKEN, redactor=redaction.Redactor((TOKEN,)),
                     connect_timeout_secs=5.0, read_timeout_secs=5.0, attempt_timeout_secs=attempt_timeout_secs,
                     ca_bundle_path=None, max_in_flight=1, getaddrinfo=getaddrinfo)


def test_a_name_lookup_that_hangs_ends_with_the_attempts_deadline():
    """Issue 21, 6: the lookup counts against the attempt, which ends at its deadline, not at the
    connect timeout (5 s) nor when the resolver answers (never, here)."""
    release = threading.Event()
    lookups = []

    def hanging(host, *args):
        lookups.append(host)
        release.wait()
        raise socket.gaierror(socket.EAI_AGAIN, "released")

    transport = _transport("http://events.tinybird.invalid:80/v0/events", hanging, attempt_timeout_secs=0.5)
    try:
        for _ in range(3):  # a second and third attempt queue behind the hung lookup and end in time too
            started = time.monotonic()
            failure = transport.post(b'{"id":1}\n')
            elapsed = time.monotonic() - started
            assert 0.5 <= elapsed < 5.0, elapsed
            assert (failure.error, failure.retryable) == ("connect_timeout", True)
            assert "within the attempt's deadline of 0.5 s" in failure.message
            assert "name lookup of events.tinybird.invalid" in failure.message
        assert lookups[0] == "events.tinybird.invalid"
    finally:
        release.set()
        transport.close()


def test_the_injected_lookup_is_the_one_used_and_its_address_is_connected_to():
    with RawServer(default=answer(200, b'{"successful_rows":1,"quarantined_rows":0}')) as server:
        port = int(server.url.rsplit(":", 1)[1])
        lookups = []

        def local(host, port_, *args):
            lookups.append((host, port_))
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]

        transport = _transport(f"http://tinybird.test:{port}/v0/events", local, attempt_timeout_secs=5.0)
        try:
            response = transport.post(b'{"id":1}\n')
        finally:
            transport.close()
    assert lookups == [("tinybird.test", port)]
    assert response.status == 200 and orjson.loads(response.body)["successful_rows"] == 1


def test_without_an_injected_lookup_socket_getaddrinfo_is_looked_up_at_each_lookup(monkeypatch):
    """A patch of socket.getaddrinfo made after the transport was built (this suite's loopback guard,
    gevent's) is the one used."""
    with RawServer(default=answer(200, b'{"successful_rows":1,"quarantined_rows":0}')) as server:
        port = int(server.url.rsplit(":", 1)[1])
        transport = _transport(f"http://tinybird.test:{port}/v0/events", None, attempt_timeout_secs=5.0)
        lookups = []

        def patched(host, port_, *args, **kwargs):
            lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]

        monkeypatch.setattr(socket, "getaddrinfo", patched)
        try:
            response = transport.post(b'{"id":1}\n')
        finally:
            transport.close()
    # Then urllib3 looks up the address it connects to, an IP literal (no DNS query).
    assert lookups[0] == "tinybird.test" and set(lookups[1:]) <= {"127.0.0.1"} and response.status == 200


# -- proxies from the environment ----------------------------------------------------------------


@pytest.fixture
def proxy_environment(monkeypatch):
    """A proxy in every variable requests reads (it answers itself), and no exception for any host."""
    with RawServer(default=counted_answer_behaviour()) as proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        yield proxy


def counted_answer_behaviour():
    def behave(conn, request):
        return answer(202, counts_body(request))(conn, request)
    return behave


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_loopback_host_is_never_reached_through_a_proxy_from_the_environment(proxy_environment, host):
    """Through the proxy, the token would go (in clear text for http://) to the proxy's host."""
    with RawServer(default=counted_answer_behaviour()) as server:
        api_url = server.url.replace("127.0.0.1", host)
        with EventsApiClient(ClientSettings(api_url=api_url, datasource="events", read_timeout_secs=2.0),
                             token=TOKEN, retry_policy=QUICK, rand=lambda: 0.5) as client:
            report = client.send(payload_of(10), 10)
    assert [d.rows for d in report.delivered] == [10]
    assert [r.ids for r in server.requests] == [list(range(10))]
    assert proxy_environment.requests == []


def test_another_host_is_reached_through_the_proxy_from_the_environment(proxy_environment):
    """The control: the environment's proxy is requests' own behaviour, kept for every other host
    (here a name that never resolves: only the proxy, on 127.0.0.1, is connected to)."""
    settings = ClientSettings(api_url="http://tinybird.invalid", datasource="events", read_timeout_secs=2.0,
                              allow_insecure_http=True)
    with EventsApiClient(settings, token=TOKEN, retry_policy=QUICK, rand=lambda: 0.5) as client:
        report = client.send(payload_of(10), 10)
    assert [d.rows for d in report.delivered] == [10]
    assert [r.head.split(b" ")[:2] for r in proxy_environment.requests] == [
        [b"POST", b"http://tinybird.invalid/v0/events?name=events"]]
