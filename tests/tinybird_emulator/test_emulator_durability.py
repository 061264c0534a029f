"""Durability and concurrency: acknowledged rows survive restarts and SIGKILL; counts are exact."""

from __future__ import annotations

import concurrent.futures
import os
import signal

import pytest
import requests
from emulator_testlib import EventsClient, assert_ok
from shared_testlib import BUSY_MACHINE_SLACK_SECS, wait_for

from tinybird_emulator import LocalServer, LocalServerError

pytestmark = pytest.mark.timeout(120)


def _rows(start: int, n: int) -> bytes:
    return b"".join(b'{"i": %d, "s": "row"}\n' % i for i in range(start, start + n))


@pytest.fixture(scope="module")
def durable(tmp_path_factory):
    srv = LocalServer(data_dir=tmp_path_factory.mktemp("emulator-durable"), rate_limit_rps=None, token="tok-d")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def running(durable):
    """A test that killed the server and failed leaves it stopped: start it again."""
    if not durable.running:
        durable.start()
    yield


def test_restart_keeps_rows_port_and_data_dir(durable):
    client = EventsClient(durable)
    assert_ok(client.post("keep", _rows(0, 100)), 200, 100)
    port, url = durable.port, durable.url
    durable.restart()
    assert (durable.port, durable.url) == (port, url)
    assert client.count("keep") == 100
    assert durable.datasources()["keep"]["columns"] == [
        {"name": "i", "type": "Int64", "jsonpath": "$.i"},
        {"name": "s", "type": "String", "jsonpath": "$.s"},
    ]
    assert_ok(client.post("keep", _rows(100, 1)), 200, 1)
    assert client.count("keep") == 101


def test_sigkill_after_200_loses_nothing(durable):
    client = EventsClient(durable)
    acknowledged = 0
    for batch in range(20):
        response = client.post("killed", _rows(batch * 50, 50))
        assert_ok(response, 200, 50)
        acknowledged += 50
    durable.kill()
    assert not durable.running
    with pytest.raises(LocalServerError):
        durable.query("SELECT 1")
    durable.restart()
    assert client.count("killed") == acknowledged
    assert durable.query("SELECT min(i) AS lo, max(i) AS hi, count(DISTINCT i) AS d FROM killed") == [
        {"lo": 0, "hi": 999, "d": 1000}
    ]


def test_sigkill_during_load_keeps_every_200(durable):
    """Clients keep posting while the server is killed: every 200 must be on disk."""
    client = EventsClient(durable)
    assert_ok(client.post("storm", _rows(0, 1)), 200, 1)
    acknowledged = [1]
    answered: list[int] = []  # a 200 per item, as the clients read them
    timeout_secs = 10

    def post(k: int) -> int:
        session = requests.Session()
        ok = 0
        for j in range(2000):
            try:
                response = session.post(
                    f"{durable.url}/v0/events",
                    params={"name": "storm", "wait": "true"},
                    data=_rows(1_000_000 * (k + 1) + j * 10, 10),
                    headers={"Authorization": f"Bearer {durable.token}"},
                    timeout=timeout_secs,
                )
            except requests.ConnectionError:
                break
            if response.status_code == 200:
                ok += response.json()["successful_rows"]
                answered.append(k)
        return ok

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, k) for k in range(4)]
        # Killed once the clients have had a few answers, however slow the machine.
        wait_for(lambda: len(answered) >= 4, timeout_secs=timeout_secs + BUSY_MACHINE_SLACK_SECS, poll_secs=0.01,
                 what="the clients' first answers")
        os.kill(durable.pid, signal.SIGKILL)
        acknowledged += [f.result() for f in futures]
    durable.kill()
    durable.restart()
    stored = client.count("storm")
    # The kill interrupted the clients.
    assert 1 < sum(acknowledged) < 1 + 4 * 2000 * 10
    # Rows committed but not yet answered may exist (at most one request in flight per client).
    assert sum(acknowledged) <= stored <= sum(acknowledged) + 4 * 10


def test_202_rows_are_committed_by_a_graceful_stop(durable):
    client = EventsClient(durable)
    assert_ok(client.post("graceful", _rows(0, 1)), 200, 1)
    for k in range(20):
        assert_ok(client.post("graceful", _rows(k * 100, 100), wait=False), 202, 100)
    durable.restart()  # SIGTERM: the queue is committed before the process exits
    assert client.count("graceful") == 2001


def test_tokens_survive_a_restart(durable):
    token = durable.create_token("survivor", scopes=["DATASOURCE:APPEND:keep"])
    durable.restart()
    client = EventsClient(durable)
    assert_ok(client.post("keep", _rows(0, 2), token=token), 200, 2)


def test_concurrent_clients_one_datasource_exact_count(durable):
    client = EventsClient(durable)
    assert_ok(client.post("conc", _rows(0, 1)), 200, 1)
    threads, requests_each, rows_each = 8, 25, 40

    def worker(k: int) -> int:
        session = requests.Session()
        total = 0
        for j in range(requests_each):
            start = 1 + (k * requests_each + j) * rows_each
            response = session.post(
                f"{durable.url}/v0/events",
                params={"name": "conc", "wait": "true" if j % 2 else "false"},
                data=_rows(start, rows_each),
                headers={"Authorization": f"Bearer {durable.token}"},
                timeout=30,
            )
            assert response.status_code in (200, 202), response.text
            total += response.json()["successful_rows"]
        return total

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        totals = list(pool.map(worker, range(threads)))
    durable.flush()
    expected = 1 + threads * requests_each * rows_each
    assert sum(totals) + 1 == expected
    assert durable.query("SELECT count(*) AS n, count(DISTINCT i) AS d, max(i) AS hi FROM conc") == [
        {"n": expected, "d": expected, "hi": expected - 1}
    ]
    assert durable.datasources()["conc"]["rows"] == expected
