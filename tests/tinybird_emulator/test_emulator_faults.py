"""Fault rules: before/after, status, latency, reset, sequence, probability, times, stats."""

from __future__ import annotations

import json
import time

import pytest
import requests
from emulator_testlib import EventsClient, assert_error, assert_ok
from shared_testlib import BUSY_MACHINE_SLACK_SECS, wait_for

from tinybird_emulator import FaultRule, LocalServer, LocalServerError

pytestmark = pytest.mark.timeout(90)

LINE = b'{"a": 1}\n'


def _rule(stats: dict, index: int) -> dict:
    return stats["faults"][index]


def _statuses(client: EventsClient, name: str, n: int, *, wait: bool = True) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(client.post(name, LINE, wait=wait).status_code)
        except requests.ConnectionError:
            out.append("reset")
    return out


def test_before_fault_inserts_nothing(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.reset_stats()
    client.server.set_faults([{"status": 503, "when": "before", "datasource": ds, "times": 1}])
    response = client.post(ds, LINE)
    assert_error(response, 503, "injected")
    assert_ok(client.post(ds, LINE), 200, 1)
    assert client.count(ds) == 2
    stats = client.server.stats()
    assert stats["requests"]["by_status"] == {"503": 1, "200": 1}
    assert stats["rows"]["stored"] == 1
    assert stats["rows"]["stored_by_after_faults"] == 0
    assert _rule(stats, 0)["fired"] == 1 and _rule(stats, 0)["matched"] == 2


@pytest.mark.parametrize("wait", [True, False])
def test_after_fault_stores_and_commits_but_fails(client, ds, wait):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.reset_stats()
    client.server.set_faults(
        [{"status": 500, "when": "after", "datasource": ds, "sequence": [1], "message": "boom after"}]
    )
    response = client.post(ds, b'{"a": 2}\n{"a": 3}\n', wait=wait)
    assert_error(response, 500, "boom after")
    # Committed before the failure was answered: visible at once, no flush needed.
    assert client.count(ds) == 3
    stats = client.server.stats()
    assert stats["rows"]["stored_by_after_faults"] == 2
    assert _rule(stats, 0)["rows_stored_after"] == 2
    assert stats["requests"]["by_status"] == {"500": 1}


def test_sequence_fires_on_chosen_ordinals(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.set_faults([{"status": 503, "sequence": [1, 2, 5], "datasource": ds}])
    assert _statuses(client, ds, 6) == [503, 503, 200, 200, 503, 200]
    assert client.count(ds) == 4
    assert _rule(client.server.stats(), 0)["fired"] == 3


def test_probability_with_seed_is_reproducible(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    rule = {"status": 502, "probability": 0.3, "seed": 42, "datasource": ds}
    client.server.set_faults([rule])
    first = _statuses(client, ds, 40)
    client.server.set_faults([rule])  # counters and generator start again
    second = _statuses(client, ds, 40)
    assert first == second
    fired = first.count(502)
    assert 4 <= fired <= 22, first
    assert set(first) == {200, 502}
    assert _rule(client.server.stats(), 0)["fired"] == fired
    assert client.count(ds) == 1 + 2 * first.count(200)


def test_times_caps_the_firings(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.set_faults([{"status": 503, "times": 2, "datasource": ds}])
    assert _statuses(client, ds, 4) == [503, 503, 200, 200]
    state = _rule(client.server.stats(), 0)
    assert (state["matched"], state["fired"]) == (4, 2)


def test_times_zero_never_fires(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.set_faults([{"status": 503, "times": 0, "datasource": ds}])
    assert _statuses(client, ds, 2) == [200, 200]


def test_datasource_filter(client, ds):
    other = ds + "_other"
    assert_ok(client.post(ds, LINE), 200, 1)
    assert_ok(client.post(other, LINE), 200, 1)
    client.server.set_faults([{"status": 503, "datasource": other}])
    assert _statuses(client, ds, 2) == [200, 200]
    assert _statuses(client, other, 2) == [503, 503]
    assert _rule(client.server.stats(), 0)["matched"] == 2


def test_retry_after_header_and_429(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.set_faults([{"status": 429, "retry_after_secs": 2.5, "datasource": ds, "times": 1}])
    response = client.post(ds, LINE)
    assert_error(response, 429)
    assert response.headers["Retry-After"] == "3"


def test_latency_before_and_after(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.set_faults([{"latency_secs": 0.4, "datasource": ds, "times": 1}])
    started = time.perf_counter()
    assert_ok(client.post(ds, LINE), 200, 1)
    assert time.perf_counter() - started >= 0.4
    assert_ok(client.post(ds, LINE), 200, 1)
    assert _rule(client.server.stats(), 0)["fired"] == 1  # times=1: the second request was not delayed
    client.server.set_faults([{"latency_secs": 0.3, "when": "after", "status": 504, "datasource": ds, "times": 1}])
    started = time.perf_counter()
    assert_error(client.post(ds, LINE), 504)
    assert time.perf_counter() - started >= 0.3
    assert client.count(ds) == 4


def test_latency_makes_client_timeout(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    timeout_secs = 0.5
    # Later than the client's timeout even when a busy machine runs the client late.
    latency_secs = timeout_secs + BUSY_MACHINE_SLACK_SECS
    client.server.set_faults([{"latency_secs": latency_secs, "datasource": ds, "times": 1}])
    with pytest.raises(requests.ReadTimeout):
        client.post(ds, LINE, timeout=timeout_secs)
    # The delayed request then completes on the server.
    wait_for(lambda: client.server.stats()["requests"]["total"] == 2, poll_secs=0.05,
             timeout_secs=latency_secs + BUSY_MACHINE_SLACK_SECS, what="the delayed request to be answered")
    client.server.flush()
    assert client.count(ds) == 2


def test_reset_before_stores_nothing(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.reset_stats()
    client.server.set_faults([{"reset": True, "when": "before", "datasource": ds, "sequence": [1]}])
    with pytest.raises(requests.ConnectionError):
        client.post(ds, LINE)
    assert_ok(client.post(ds, LINE), 200, 1)
    assert client.count(ds) == 2
    assert client.server.stats()["requests"]["by_status"] == {"reset": 1, "200": 1}


def test_reset_after_stores_the_rows(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.set_faults([{"reset": True, "when": "after", "datasource": ds, "sequence": [1]}])
    with pytest.raises(requests.ConnectionError):
        client.post(ds, b'{"a": 5}\n{"a": 6}\n{"a": 7}\n')
    assert client.count(ds) == 4
    stats = client.server.stats()
    assert _rule(stats, 0)["rows_stored_after"] == 3


def test_first_firing_rule_wins_and_all_rules_count(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.set_faults(
        [
            {"status": 500, "sequence": [2], "datasource": ds},
            {"status": 503, "sequence": [1, 2], "datasource": ds},
        ]
    )
    assert _statuses(client, ds, 3) == [503, 500, 200]
    stats = client.server.stats()
    assert [(r["matched"], r["fired"]) for r in stats["faults"]] == [(3, 1), (3, 1)]


def test_faults_get_and_clear(client, ds):
    rules = client.server.set_faults([FaultRule(status=503, sequence=(3,), datasource=ds)])
    assert rules[0]["status"] == 503 and rules[0]["sequence"] == [3]
    listing = client.server.faults()
    assert listing["rules"] == rules
    client.server.clear_faults()
    assert client.server.faults()["rules"] == []


@pytest.mark.parametrize(
    "rules,fragment",
    [
        ([{"status": 200}], "status"),
        ([{"status": 503, "when": "during"}], "when"),
        ([{"status": 503, "reset": True}], "either"),
        ([{"probability": 0.5}], "needs a status"),
        ([{"status": 503, "probability": 2}], "probability"),
        ([{"status": 503, "sequence": [0]}], "sequence"),
        ([{"status": 503, "bogus": 1}], "unknown"),
        ({"status": 503}, "list"),
    ],
)
def test_invalid_rules_are_400(client, rules, fragment):
    response = client.session.put(
        f"{client.server.url}/_emulator/faults",
        data=json.dumps(rules),
        headers={"Authorization": f"Bearer {client.server.token}"},
    )
    assert_error(response, 400, fragment)
    response = client.session.put(
        f"{client.server.url}/_emulator/faults",
        data=b"{not json",
        headers={"Authorization": f"Bearer {client.server.token}"},
    )
    assert_error(response, 400, "invalid fault rules")


_NUMBER_KEYS = {  # each key that takes a number, with a rule in which it is valid
    "status": {"status": 503},
    "latency_secs": {"latency_secs": 1},
    "probability": {"status": 503, "probability": 1},
    "seed": {"status": 503, "seed": 1},
    "times": {"status": 503, "times": 1},
    "retry_after_secs": {"status": 503, "retry_after_secs": 1},
}


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("key", [*sorted(_NUMBER_KEYS), "sequence"])
def test_a_boolean_where_a_number_is_expected_is_400(client, key, value):
    """JSON true was taken as 1 (and false as 0): Python's bool is an int. Refused, saying so."""
    rule = {**_NUMBER_KEYS.get(key, {"status": 503}), key: [1, value] if key == "sequence" else value}
    response = client.session.put(
        f"{client.server.url}/_emulator/faults", data=json.dumps([rule]),
        headers={"Authorization": f"Bearer {client.server.token}"})
    body = assert_error(response, 400, f"invalid fault rules: fault rule 0: {key} must be")
    assert f"got {json.dumps(value)} (a boolean, not a number)" in body["error"]
    valid = client.session.put(
        f"{client.server.url}/_emulator/faults", data=json.dumps([_NUMBER_KEYS.get(key, {"status": 503, "sequence": [1]})]),
        headers={"Authorization": f"Bearer {client.server.token}"})
    assert valid.status_code == 200, valid.text
    client.server.clear_faults()


def test_emulator_endpoints_need_admin(client, ds):
    token = client.server.create_token(f"app_{ds}", scopes=[f"DATASOURCE:APPEND:{ds}", "DATASOURCE:CREATE"])
    url = client.server.url
    for method, path in [
        ("GET", "/_emulator/faults"),
        ("PUT", "/_emulator/faults"),
        ("DELETE", "/_emulator/faults"),
        ("GET", "/_emulator/stats"),
        ("DELETE", "/_emulator/stats"),
        ("POST", "/_emulator/flush"),
    ]:
        for headers in ({"Authorization": f"Bearer {token}"}, {}):
            response = client.session.request(method, url + path, data=b"[]", headers=headers)
            assert_error(response, 403, "ADMIN")


def test_local_server_validates_rules_before_sending(client):
    with pytest.raises(ValueError):
        client.server.set_faults([{"status": 42}])


def test_faults_file_at_start(tmp_path):
    with LocalServer(data_dir=tmp_path, faults=[{"status": 503, "sequence": [1]}], rate_limit_rps=None) as srv:
        client = EventsClient(srv)
        assert _statuses(client, "ev", 2) == [503, 200]
        assert srv.faults()["rules"][0]["sequence"] == [1]
    with pytest.raises(ValueError):
        LocalServer(data_dir=tmp_path, faults=[{"status": 503, "when": "later"}])


def test_local_server_error_carries_status(client):
    with pytest.raises(LocalServerError) as info:
        client.server.query("SELECT * FROM does_not_exist")
    assert info.value.status == 400


def test_latency_only_after_rule_is_not_counted_as_a_failure(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.reset_stats()
    client.server.set_faults([{"latency_secs": 0.2, "when": "after", "datasource": ds}])
    started = time.perf_counter()
    assert_ok(client.post(ds, LINE, wait=False), 202, 1)
    assert time.perf_counter() - started >= 0.2
    stats = client.server.stats()
    assert stats["rows"]["stored_by_after_faults"] == 0
    assert _rule(stats, 0)["fired"] == 1 and _rule(stats, 0)["rows_stored_after"] == 0
    assert client.count(ds) == 2


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("wait", [True, False])
def test_latency_only_rows_are_stored_and_acknowledged_not_counted_as_behind_a_failure(client, ds, when, wait):
    """A latency-only rule delays a request that then succeeds normally: its rows count as
    stored and the rule as fired, never as "stored while the client was told it failed"."""
    assert_ok(client.post(ds, LINE), 200, 1)
    client.server.reset_stats()
    client.server.set_faults([
        {"latency_secs": 0.2, "when": when, "datasource": ds, "sequence": [1]},
        {"status": 503, "when": "after", "datasource": ds, "sequence": [2]},
    ])
    started = time.perf_counter()
    assert_ok(client.post(ds, b'{"a": 2}\n{"a": 3}\n', wait=wait), 200 if wait else 202, 2)
    assert time.perf_counter() - started >= 0.2
    assert_error(client.post(ds, b'{"a": 4}\n'), 503, "injected")
    client.server.flush()
    stats = client.server.stats()
    assert stats["requests"]["by_status"] == {"200" if wait else "202": 1, "503": 1}
    assert stats["rows"]["stored"] == 3
    assert stats["rows"]["stored_by_after_faults"] == 1  # the 503's row only
    assert [(r["matched"], r["fired"], r["rows_stored_after"]) for r in stats["faults"]] == [(2, 1, 0), (2, 1, 1)]
    assert client.count(ds) == 4
