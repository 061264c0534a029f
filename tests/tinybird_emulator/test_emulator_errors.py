"""Error statuses: 400, 403, 413, 429, 503, each with a JSON body and the rate-limit headers."""

from __future__ import annotations

import gzip
import sqlite3
import time
import uuid

import pytest
import zstandard
from emulator_testlib import EventsClient, assert_error, assert_ok
from shared_testlib import RATE_LIMIT_WINDOW_SECS, within_one_window

from tinybird_emulator import LocalServer

pytestmark = pytest.mark.timeout(90)

LINE = b'{"a": 1, "s": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}\n'


def _name() -> str:
    return "e_" + uuid.uuid4().hex[:12]


# -- 400 ------------------------------------------------------------------------


def test_missing_name(client):
    assert_error(client.post(None, LINE), 400, "name")
    assert_error(client.post("", LINE), 400, "name")


@pytest.mark.parametrize(
    "name",
    [
        "1abc",
        "a-b",
        "a b",
        'x"; DROP TABLE events; --',
        "x'); DELETE FROM t; --",
        "événements",
        "a" * 101,
        "events_quarantine",
        "_emulator_datasources",
        "sqlite_master",
        "a.b",
        "a\x00b",
    ],
)
def test_unsafe_or_reserved_names(client, name):
    assert_error(client.post(name, LINE), 400, "data source name")


@pytest.mark.parametrize("other", ["upper", "swapcase"])
def test_a_name_that_differs_only_in_case_from_a_data_source_is_refused_and_sql_keeps_working(client, ds, other):
    """SQLite table names ignore case: this server cannot hold ``t_ab`` beside ``T_AB``. It says so
    (400) rather than storing the second one's rows in the first's table, after which the catalog of
    both broke every /v0/sql query (a run of the whole suite failed six tests that way)."""
    name = ds + "Ab"
    assert_ok(client.post(name, LINE), 200, 1)
    twin = getattr(name, other)()
    body = assert_error(client.post(twin, LINE), 400, f"the data source '{name}' exists")
    assert "ignore case" in body["error"]
    assert [n for n in client.server.datasources() if n.casefold() == name.casefold()] == [name]
    assert client.server.query(f"SELECT count() AS n FROM {name}") == [{"n": 1}]
    assert_ok(client.post(name, LINE), 200, 1)  # the data source itself takes more
    assert client.count(name) == 2


def test_unknown_content_encoding(client, ds):
    assert_error(client.post(ds, LINE, headers={"Content-Encoding": "br"}), 400, "Content-Encoding")
    assert_error(client.post(ds, LINE, headers={"Content-Encoding": "deflate"}), 400, "Content-Encoding")


def test_corrupt_and_truncated_gzip(client, ds):
    good = gzip.compress(LINE * 100)
    assert_error(client.post(ds, good[: len(good) // 2], headers={"Content-Encoding": "gzip"}), 400, "gzip")
    assert_error(client.post(ds, b"not gzip at all", headers={"Content-Encoding": "gzip"}), 400, "gzip")
    assert_error(client.post(ds, good + b"trailing junk", headers={"Content-Encoding": "gzip"}), 400, "gzip")
    # Uncompressed NDJSON claiming to be gzip.
    assert_error(client.post(ds, LINE, headers={"Content-Encoding": "gzip"}), 400, "gzip")


def test_corrupt_and_truncated_zstd(client, ds):
    good = zstandard.ZstdCompressor().compress(LINE * 100)
    assert_error(client.post(ds, good[:-4], headers={"Content-Encoding": "zstd"}), 400, "zstd")
    assert_error(client.post(ds, b"\x28\xb5\x2f\xfd garbage", headers={"Content-Encoding": "zstd"}), 400, "zstd")
    assert_error(client.post(ds, LINE, headers={"Content-Encoding": "zstd"}), 400, "zstd")


def test_empty_bodies(client, ds):
    assert_error(client.post(ds, b""), 400, "empty")
    assert_error(client.post(ds, b"\n\n  \r\n"), 400, "empty")
    assert_error(client.post(ds, gzip.compress(b""), headers={"Content-Encoding": "gzip"}), 400, "empty")
    assert_error(client.post(ds, zstandard.ZstdCompressor().compress(b""), headers={"Content-Encoding": "zstd"}), 400, "empty")


def test_body_that_is_not_utf8_anywhere(client, ds):
    assert_error(client.post(ds, b"\xff\xfe\xfd\xfc" * 100), 400, "UTF-8")


def test_nothing_is_inserted_on_400(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.post(ds, LINE[:-5] + b"\xff", headers={"Content-Encoding": "gzip"})
    client.post(ds, b"", headers={})
    assert client.count(ds) == 1


# -- 403 ------------------------------------------------------------------------


def test_missing_and_invalid_tokens(client, ds):
    assert_error(client.post(ds, LINE, token=None), 403, "token")
    assert_error(client.post(ds, LINE, token="wrong"), 403, "token")
    assert_error(client.post(ds, LINE, token=client.server.token + "x"), 403, "token")
    assert_error(client.post(ds, LINE, token=None, headers={"Authorization": "Basic abc"}), 403, "token")
    assert ds not in client.server.datasources()


# -- 413, 429 on a server with small limits ---------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    with LocalServer(
        data_dir=tmp_path_factory.mktemp("emulator-limits"),
        rate_limit_rps=5,
        rate_limit_bytes_per_sec=3_000,
        max_body_bytes=2_000,
    ) as srv:
        yield srv


@pytest.fixture
def lclient(limited):
    events = EventsClient(limited)
    yield events
    events.session.close()


def test_default_limit_headers(lclient):
    name = _name()
    response = lclient.post(name, LINE)
    assert_ok(response, 200, 1)
    assert response.headers["X-RateLimit-Limit"] == "5"
    assert response.headers["X-RateLimit-Remaining"] == "4"
    assert response.headers["X-RateLimit-Reset"] == "1"


def test_413_on_wire_size_limit_minus_one_limit_plus_one(lclient):
    def body_of(size: int) -> bytes:
        return b'{"s": "' + b"x" * (size - 10) + b'"}\n'

    assert len(body_of(2_000)) == 2_000
    # One data source per request: each has its own byte-rate window.
    names = [_name() for _ in range(3)]
    assert_ok(lclient.post(names[0], body_of(1_999)), 200, 1)
    assert_ok(lclient.post(names[1], body_of(2_000)), 200, 1)
    assert_error(lclient.post(names[2], body_of(2_001)), 413, "2000")
    assert names[2] not in lclient.server.datasources()
    # Still answering, on the same keep-alive connection.
    assert_ok(lclient.post(names[2], body_of(100)), 200, 1)
    assert [lclient.count(n) for n in names] == [1, 1, 1]


def test_413_on_decoded_size_streams_the_bomb(lclient):
    name = _name()
    bomb = gzip.compress(b" " * 50_000_000)  # 50 MB of spaces in ~50 KB... bigger than the wire limit
    small_bomb = gzip.compress(b"{}" + b" " * 100_000)
    assert len(small_bomb) < 2_000
    assert_error(lclient.post(name, small_bomb, headers={"Content-Encoding": "gzip"}), 413, "decoded")
    zbomb = zstandard.ZstdCompressor(level=19).compress(b"{}" + b" " * 10_000_000)
    assert len(zbomb) < 2_000
    assert_error(lclient.post(name, zbomb, headers={"Content-Encoding": "zstd"}), 413, "decoded")
    assert len(bomb) > 2_000
    time.sleep(RATE_LIMIT_WINDOW_SECS)  # a new byte-rate window: the window began before the sleep
    assert_error(lclient.post(name, bomb, headers={"Content-Encoding": "gzip"}), 413)


def _within_one_window(post_all):
    """``(name, post_all(name))`` from a run inside one rate window, each run on a new data source."""

    def step():
        name = _name()
        return name, post_all(name)

    return within_one_window(step, window_secs=RATE_LIMIT_WINDOW_SECS)


def test_429_request_rate_with_retry_after(lclient):
    name, responses = _within_one_window(lambda n: [lclient.post(n, LINE) for _ in range(6)])
    assert [r.status_code for r in responses] == [200] * 5 + [429]
    response = responses[-1]
    assert_error(response, 429, "rate limit")
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert response.headers["X-RateLimit-Limit"] == "5"
    # Another data source has its own window.
    assert_ok(lclient.post(_name(), LINE), 200, 1)
    time.sleep(float(response.headers["Retry-After"]))  # at least what was left of the window
    assert_ok(lclient.post(name, LINE), 200, 1)
    assert lclient.count(name) == 6


def test_429_byte_rate(lclient):
    body = b'{"s": "' + b"x" * 1_400 + b'"}\n'
    name, responses = _within_one_window(lambda n: [lclient.post(n, body) for _ in range(3)])
    assert_ok(responses[0], 200, 1)
    assert_ok(responses[1], 200, 1)
    assert_error(responses[2], 429, "byte rate")
    assert int(responses[2].headers["Retry-After"]) >= 1
    assert lclient.count(name) == 2


# -- 503: the write queue is full --------------------------------------------------


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    with LocalServer(
        data_dir=tmp_path_factory.mktemp("emulator-queue"),
        rate_limit_rps=None,
        queue_max_requests=3,
        queue_max_bytes=20_000,
    ) as srv:
        yield srv


def _hold_write_lock(server: LocalServer) -> sqlite3.Connection:
    """Blocks the server's writer thread by taking SQLite's write lock from outside."""
    conn = sqlite3.connect(f"{server.data_dir}/events.sqlite3", isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_503_when_queue_is_full_by_requests_and_nothing_inserted(small_queue):
    client = EventsClient(small_queue)
    name = _name()
    assert_ok(client.post(name, LINE), 200, 1)
    lock = _hold_write_lock(small_queue)
    try:
        accepted = [client.post(name, LINE, wait=False) for _ in range(3)]
        for response in accepted:
            assert_ok(response, 202, 1)
        refused = client.post(name, LINE, wait=False)
        assert_error(refused, 503, "queue")
        refused_wait = client.post(name, LINE, wait=True)
        assert_error(refused_wait, 503, "queue")
        assert small_queue.stats()["queue"]["requests"] == 3
    finally:
        lock.rollback() if lock.in_transaction else None
        lock.close()
    small_queue.flush()
    assert client.count(name) == 4


def test_503_when_queue_is_full_by_bytes(small_queue):
    client = EventsClient(small_queue)
    name = _name()
    assert_ok(client.post(name, LINE), 200, 1)
    big = LINE * 300  # ~25 KB decoded, over the 20 KB queue
    lock = _hold_write_lock(small_queue)
    try:
        assert_ok(client.post(name, LINE, wait=False), 202, 1)
        assert_error(client.post(name, big, wait=False), 503, "queue")
    finally:
        lock.rollback()
        lock.close()
    small_queue.flush()
    # Alone in the queue, a body larger than the queue budget is still accepted.
    assert_ok(client.post(name, big), 200, 300)
    assert client.count(name) == 302
    stats = small_queue.stats()
    assert stats["requests"]["by_status"]["503"] >= 1


# -- headers on every response ------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,params",
    [
        ("POST", "/v0/events", {"name": "hdr", "wait": "true"}),
        ("POST", "/v0/events", {}),
        ("GET", "/v0/sql", {"q": "SELECT 1 AS one"}),
        ("GET", "/v0/sql", {}),
        ("GET", "/v0/datasources", {}),
        ("POST", "/v0/tokens", {}),
        ("GET", "/_emulator/stats", {}),
        ("GET", "/_emulator/health", {}),
        ("GET", "/nowhere", {}),
    ],
)
def test_every_response_has_rate_limit_headers_and_json(client, method, path, params):
    response = client.session.request(
        method,
        client.server.url + path,
        params=params,
        data=b'{"a": 1}\n' if method == "POST" else None,
        headers={"Authorization": f"Bearer {client.server.token}"},
    )
    for header in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
        assert int(response.headers[header]) >= 0
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    if response.status_code >= 400:
        assert list(body) == ["error"]
    else:
        assert "error" not in body
    assert ("Retry-After" in response.headers) == (response.status_code == 429)
