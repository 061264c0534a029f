"""Bad input never crashes the server nor yields a 500, and acknowledged rows stay intact."""

from __future__ import annotations

import dataclasses
import gzip
import os
import random
import socket
import time
import uuid
from typing import Any

import orjson
import pytest
import requests
import zstandard
from emulator_testlib import EventsClient, assert_error, assert_ok
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_testlib import BUSY_MACHINE_SLACK_SECS, wait_for

from tinybird_emulator import LocalServer
from tinybird_emulator._config import ServerConfig

pytestmark = pytest.mark.timeout(120)

GOOD = b'{"id": 1, "s": "keep"}\n'
ALLOWED = {200, 202, 400, 413}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A server whose body limit lets a 50 MB line through."""
    with LocalServer(
        data_dir=tmp_path_factory.mktemp("emulator-big"), rate_limit_rps=None, max_body_bytes=64_000_000
    ) as srv:
        client = EventsClient(srv)
        assert_ok(client.post("keep", GOOD * 10), 200, 10)
        yield srv
        # Whatever the tests sent, the acknowledged rows are intact and the server answers.
        assert srv.running
        assert srv.query("SELECT count(*) AS n, min(s) AS s FROM keep") == [{"n": 10, "s": "keep"}]


@pytest.fixture
def bclient(big):
    return EventsClient(big)


def _still_fine(client: EventsClient, name: str = "keep", rows: int = 10) -> None:
    assert client.server.query(f"SELECT count(*) AS n FROM {name}") == [{"n": rows}]
    health = client.session.get(f"{client.server.url}/_emulator/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_random_bytes(bclient):
    rng = random.Random(1)
    for size in (1, 10, 1000, 100_000):
        body = bytes(rng.getrandbits(8) for _ in range(size))
        for encoding in (None, "gzip", "zstd"):
            headers = {"Content-Encoding": encoding} if encoding else {}
            response = bclient.post("keep", body, headers=headers)
            assert response.status_code in (200, 400), (size, encoding, response.text)
            assert "error" in response.json() or response.status_code == 200
    # Random bytes that happen to be line-separated UTF-8 are quarantined, not stored.
    _still_fine(bclient)


def test_invalid_utf8_in_some_lines_is_quarantined(bclient, ds):
    assert_ok(bclient.post(ds, GOOD), 200, 1)
    body = GOOD + b'{"id": 2, "s": "\xff\xfe"}\n' + GOOD + b"\xc3\x28\n"
    assert_ok(bclient.post(ds, body), 200, 2, 2)
    rows = bclient.quarantined(ds)
    assert [r["c__error"][0].startswith("invalid UTF-8") for r in rows] == [True, True]
    assert rows[0]["c__raw"] == '{"id": 2, "s": "\ufffd\ufffd"}'
    _still_fine(bclient)


def test_invalid_utf8_everywhere_is_400(bclient):
    assert_error(bclient.post("keep", b"\xff" * 1000 + b"\n" + b"\xfe" * 10), 400, "UTF-8")
    _still_fine(bclient)


def test_truncated_gzip_of_valid_rows(bclient):
    body = gzip.compress(GOOD * 10_000)
    for cut in (1, 10, len(body) // 2, len(body) - 1):
        assert_error(bclient.post("keep", body[:cut], headers={"Content-Encoding": "gzip"}), 400)
    _still_fine(bclient)


def test_a_50_mb_line(bclient, ds):
    assert_ok(bclient.post(ds, b'{"id": 0, "s": "small"}\n'), 200, 1)
    huge = b'{"id": 1, "s": "' + b"x" * 50_000_000 + b'"}\n'
    assert_ok(bclient.post(ds, huge, timeout=120), 200, 1)
    assert bclient.server.query(f"SELECT id, length(s) AS n FROM {ds} ORDER BY id") == [
        {"id": 0, "n": 5},
        {"id": 1, "n": 50_000_000},
    ]
    broken = b'{"id": 2, "s": "' + b"x" * 50_000_000 + b"\n"
    assert_ok(bclient.post(ds, broken, timeout=120), 200, 0, 1)
    _still_fine(bclient)


def test_a_50_mb_line_against_the_default_limit(client, ds):
    assert_ok(client.post(ds, GOOD), 200, 1)
    huge = b'{"id": 1, "s": "' + b"x" * 50_000_000 + b'"}\n'
    assert_error(client.post(ds, huge, timeout=120), 413)
    assert_error(client.post(ds, gzip.compress(huge), headers={"Content-Encoding": "gzip"}), 413, "decoded")
    assert client.count(ds) == 1


@pytest.mark.parametrize("fmt", [None, "json", "ndjson"])
def test_deeply_nested_json(bclient, ds, fmt):
    assert_ok(bclient.post(ds, GOOD), 200, 1)
    depth = 100_000
    deep_object = b'{"a":' * depth + b"1" + b"}" * depth
    deep_array = b"[" * depth + b"]" * depth
    params = {"format": fmt} if fmt else {}
    for body in (deep_object, deep_array, deep_object + b"\n" + GOOD):
        response = bclient.post(ds, body, params=params)
        assert response.status_code in (200, 400), response.text
        if response.status_code == 200:
            assert response.json()["quarantined_rows"] >= 1
    # Nested within orjson's limits but deeper than the flattening depth: stored, extra depth ignored.
    nested = b'{"id": 5, "s": "n", "deep": ' + b'{"a":' * 500 + b"1" + b"}" * 500 + b"}\n"
    assert_ok(bclient.post(ds, nested), 200, 1)
    _still_fine(bclient)


def test_deep_nesting_in_a_first_batch(bclient, ds):
    nested = b'{"id": 5, "deep": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}\n"
    assert_ok(bclient.post(ds, nested), 200, 1)
    # Deeper than 32 levels is not flattened into columns (ignored like unknown fields).
    assert [c["name"] for c in bclient.server.datasources()[ds]["columns"]] == ["id"]
    shallow = b'{"id": 6, "deep": ' + b'{"a":' * 3 + b"1" + b"}" * 3 + b"}\n"
    other = ds + "_shallow"
    assert_ok(bclient.post(other, shallow), 200, 1)
    columns = bclient.server.datasources()[other]["columns"]
    assert columns[1] == {"name": "deep_a_a_a", "type": "Int64", "jsonpath": "$.deep.a.a.a"}


def test_integers_beyond_64_bits(bclient, ds):
    assert_ok(bclient.post(ds, b'{"id": 1, "v": 1.5}\n'), 200, 1)
    # orjson reads them as floats and SQLite as reals: a Float64 column takes them.
    body = b'{"id": 2, "v": 18446744073709551616}\n{"id": 3, "v": 2.5}\n'
    assert_ok(bclient.post(ds, body), 200, 2)
    assert bclient.server.query(f"SELECT v FROM {ds} WHERE id = 2") == [{"v": 1.8446744073709552e19}]
    _still_fine(bclient)


def test_unsafe_names_leave_the_database_alone(bclient):
    for name in ['keep"; DROP TABLE keep; --', "keep; DELETE FROM keep", "../../etc/passwd", "keep%00"]:
        assert_error(bclient.post(name, GOOD), 400, "name")
    _still_fine(bclient)


def test_slow_and_aborted_uploads(bclient):
    import socket

    host, port = bclient.server.url.rsplit("//", 1)[1].split(":")
    # A client that announces a body and hangs up half-way.
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v0/events?name=keep&wait=true HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {bclient.server.token}\r\n".encode()
            + b"Content-Length: 100000\r\n\r\n"
            + GOOD * 10
        )
    # Garbage that is not HTTP at all.
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(os.urandom(2000))
        try:
            sock.recv(1000)
        except OSError:
            pass
    _still_fine(bclient)


def _stalled_upload(server: LocalServer, name: str, *, content_length: int = 100, sent: bytes = b"{") -> socket.socket:
    """An append that sends its headers and ``sent`` of a ``content_length`` body, then nothing."""
    return _stalled_request(server, f"POST /v0/events?name={name}&wait=true", content_length=content_length, sent=sent)


def _stalled_request(server: LocalServer, request_line: str, *, content_length: int, sent: bytes,
                     headers: str = "") -> socket.socket:
    """A connection that sends ``request_line``, its headers and ``sent`` of a ``content_length`` body, then nothing."""
    host, port = server.url.rsplit("//", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    sock.sendall(
        f"{request_line} HTTP/1.1\r\nHost: x\r\n{headers}".encode()
        + f"Authorization: Bearer {server.token}\r\nContent-Length: {content_length}\r\n\r\n".encode()
        + sent
    )
    return sock


def _answer_then_close(sock: socket.socket) -> tuple[bytes, float, float]:
    """The server's answer, when it was complete and when the server closed the
    connection (seconds from now)."""
    start = time.monotonic()
    out = b""
    answered = None
    while chunk := sock.recv(65536):
        out += chunk
        head, sep, body = out.partition(b"\r\n\r\n")
        length = next((int(line[15:]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), -1)
        if answered is None and sep and len(body) == length:
            answered = time.monotonic() - start
    assert answered is not None, out
    return out, answered, time.monotonic() - start


def test_stalled_uploads_leave_the_other_requests_alone(bclient, ds):
    """More stalled bodies than decode slots: a request to another data source is answered."""
    slots = next(f.default for f in dataclasses.fields(ServerConfig) if f.name == "max_concurrent_decodes")
    assert isinstance(slots, int)
    stalled = [_stalled_upload(bclient.server, "t_stalled") for _ in range(slots + 2)]
    try:
        # The server has read their headers and waits for their bodies (100 bytes each).
        wait_for(lambda: bclient.server.stats()["queue"]["bodies_held_bytes"] == 100 * len(stalled),
                 timeout_secs=10 + BUSY_MACHINE_SLACK_SECS, what="the server to receive the stalled headers")
        assert_ok(bclient.post(ds, GOOD, timeout=15), 200, 1)
        assert bclient.server.query(f"SELECT id, s FROM {ds}") == [{"id": 1, "s": "keep"}]
    finally:
        for sock in stalled:
            sock.close()
    _still_fine(bclient)


@pytest.fixture(scope="module")
def impatient(tmp_path_factory):
    """A server that waits 1 s for a body."""
    with LocalServer(
        data_dir=tmp_path_factory.mktemp("emulator-impatient"),
        rate_limit_rps=None,
        max_body_bytes=1000,
        extra_args=["--body-read-timeout-secs", "1"],
    ) as srv:
        yield srv


def _status_and_headers(answer: bytes) -> tuple[bytes, bytes, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    return status, body, headers


def _refused_at_the_deadline(sock: socket.socket, status: bytes) -> Any:
    """The JSON body of the answer ``status``, which came by the 1 s deadline and closed the
    connection (after aiohttp's lingering time, 10 s)."""
    answer, answered_secs, closed_secs = _answer_then_close(sock)
    assert 0.9 <= answered_secs < 8, answered_secs
    assert closed_secs < 20, closed_secs
    got, body, headers = _status_and_headers(answer)
    assert got == status, answer
    assert headers[b"connection"].lower() == b"close"
    return orjson.loads(body)


def test_a_body_stalled_past_the_deadline_gets_408_and_the_connection_closed(impatient):
    name = "t_" + uuid.uuid4().hex[:12]
    impatient.reset_stats()
    with _stalled_upload(impatient, name) as sock:
        assert _refused_at_the_deadline(sock, b"HTTP/1.1 408 Request Timeout") == {
            "error": "the body did not arrive within 1 s; nothing was inserted"}
    assert impatient.stats()["requests"]["by_status"] == {"408": 1}
    assert name not in impatient.datasources()
    assert_ok(EventsClient(impatient).post(name, GOOD), 200, 1)


@pytest.mark.parametrize("path, content_type", [
    ("/v0/sql", "text/plain"), ("/v0/sql", "application/x-www-form-urlencoded"), ("/_emulator/faults", "")])
def test_a_query_or_rules_body_stalled_past_the_deadline_gets_408(impatient, path, content_type):
    """/v0/sql's POST body and the fault rules' PUT body have the appends' deadline too."""
    method = "PUT" if path.startswith("/_emulator") else "POST"
    with _stalled_request(impatient, f"{method} {path}", content_length=100, sent=b"q=SEL",
                          headers=f"Content-Type: {content_type}\r\n") as sock:
        assert _refused_at_the_deadline(sock, b"HTTP/1.1 408 Request Timeout") == {
            "error": "the body did not arrive within 1 s"}
    # The server answers the next query, and the rules are as they were.
    assert impatient.query("SELECT 1 AS one") == [{"one": 1}]
    rules = requests.get(f"{impatient.url}/_emulator/faults", timeout=10,
                         headers={"Authorization": f"Bearer {impatient.token}"})
    assert rules.status_code == 200 and rules.json()["rules"] == []


def test_a_refused_body_that_never_comes_gets_its_413_by_the_deadline(impatient):
    """A body announced over the limit is drained so that the client reads the 413;
    one that never arrives is not waited for past the deadline."""
    with _stalled_upload(impatient, "keep", content_length=5000, sent=b"") as sock:
        assert _refused_at_the_deadline(sock, b"HTTP/1.1 413 Request Entity Too Large") == {
            "error": "the body is larger than the limit of 1000 bytes"}


def test_bodies_being_received_are_bounded_in_bytes_and_a_lone_one_always_gets_in(tmp_path):
    """Bodies read whole wait for a decode slot: those being received hold at most
    ``queue_max_bytes`` (each counted at its Content-Length); past it, 503 and nothing stored."""
    with LocalServer(data_dir=tmp_path / "data", rate_limit_rps=None, max_body_bytes=2_000_000,
                     queue_max_bytes=1_000_000, extra_args=["--body-read-timeout-secs", "2"]) as server:
        client = EventsClient(server)

        def held() -> int:
            return server.stats()["queue"]["bodies_held_bytes"]

        # Alone, a body larger than the bound gets in.
        lone = b"".join(b'{"id": %d, "pad": "%s"}\n' % (i, b"x" * 100) for i in range(12_000))
        assert len(lone) > 1_000_000
        assert_ok(client.post("t_lone", lone), 200, 12_000)
        assert held() == 0
        # Two uploads that stall mid-body hold 500,000 + 400,000 bytes...
        first = _stalled_upload(server, "t_held", content_length=500_000)
        second = _stalled_upload(server, "t_held", content_length=400_000)
        try:
            wait_for(lambda: held() == 900_000, timeout_secs=10 + BUSY_MACHINE_SLACK_SECS,
                     what="the server to receive both stalled bodies' headers")
            # ... so a third of 200,000 bytes finds no room: 503, drained, nothing stored.
            third = b"".join(b'{"id": %d, "pad": "%s"}\n' % (i, b"y" * 100) for i in range(1_800))
            assert 200_000 <= len(third) < 250_000
            response = client.post("t_third", third)
            assert response.status_code == 503, response.text
            assert response.json() == {
                "error": "too many request bodies are being received; nothing was inserted, retry later"}
            assert "t_third" not in server.datasources()
            assert held() == 900_000
        finally:
            for sock in (first, second):
                sock.close()
        # Their deadline (or their close) frees the room: the same body is stored whole.
        wait_for(lambda: held() == 0, timeout_secs=2 + 10 + BUSY_MACHINE_SLACK_SECS,
                 what="the stalled bodies' room to be freed")
        assert_ok(client.post("t_third", third), 200, 1_800)
        assert server.query("SELECT count(*) AS n FROM t_third") == [{"n": 1_800}]
        assert "t_held" not in server.datasources()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        st.binary(max_size=2000),
        st.text(max_size=500).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.lists(st.text(alphabet='{}[]":,0123456789.-eE \\nultrfas', max_size=40), max_size=20).map(
            lambda parts: "\n".join(parts).encode()
        ),
    ),
    encoding=st.sampled_from([None, "gzip", "zstd", "identity"]),
    fmt=st.sampled_from([None, "json", "ndjson"]),
    compress=st.booleans(),
)
def test_fuzzed_bodies_never_500(bclient, body, encoding, fmt, compress):
    if compress and encoding == "gzip":
        body = gzip.compress(body)
    elif compress and encoding == "zstd":
        body = zstandard.ZstdCompressor().compress(body)
    headers = {"Content-Encoding": encoding} if encoding else {}
    params = {"format": fmt} if fmt else {}
    try:
        response = bclient.post("fuzz_target", body, headers=headers, params=params)
    except requests.ConnectionError as exc:  # pragma: no cover - would be a bug
        pytest.fail(f"connection error: {exc}")
    assert response.status_code in ALLOWED, response.text
    body_json = response.json()
    if response.status_code >= 400:
        assert list(body_json) == ["error"]
    else:
        assert set(body_json) == {"successful_rows", "quarantined_rows"}
