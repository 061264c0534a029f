"""The classifier (sinks/tinybird/_http/classify.py) as a pure function: exact decisions
for every kind of answer, with no server, no clock and no sleeping."""

from __future__ import annotations

import dataclasses
import email.utils
import types

import orjson
import pytest

from sinks.tinybird._http.classify import AttemptContext, budget_check, classify
from sinks.tinybird._http.outcomes import BoundedResponse, Deliver, GiveUp, Retry, Split, TransportFailure
from sinks.tinybird.dead_letters import DeadLetterKind
from sinks.tinybird.retry import RetryPolicy

POLICY = RetryPolicy()  # backoff before retry n with rand 0.5: 0.375, 0.75, 1.5, ...
CONTEXT = AttemptContext(rows=10, raw_bytes=100, wire_bytes=60, attempt=1, elapsed_secs=0.0, pause_ahead_secs=0.0,
                         now_epoch=1_700_000_000.0, rand=0.5, api_url="https://api.example")


def response(status: int, body: bytes | None = b"", headers: dict | None = None, message: str = "m",
             body_error: str | None = None) -> BoundedResponse:
    return BoundedResponse(status=status, headers=types.MappingProxyType(headers or {}), body=body,
                           body_error=body_error, message=message)


def at(**changes) -> AttemptContext:
    return dataclasses.replace(CONTEXT, **changes)


@pytest.mark.parametrize("body, expected", [
    (b'{"successful_rows":10,"quarantined_rows":0}', Deliver(status=200, quarantined_rows=0, counts_read=True)),
    (b'{"successful_rows":7,"quarantined_rows":3}', Deliver(status=200, quarantined_rows=3, counts_read=True)),
    (b'{"successful_rows":10}', Deliver(status=200, quarantined_rows=0, counts_read=True)),
    (b'{"successful_rows":12,"quarantined_rows":0}', Deliver(status=200, quarantined_rows=0, counts_read=True)),
    (b"", Deliver(status=200, quarantined_rows=0, counts_read=False)),
    (None, Deliver(status=200, quarantined_rows=0, counts_read=False)),
    (b"[10]", Deliver(status=200, quarantined_rows=0, counts_read=False)),
    (b'{"successful_rows":true}', Deliver(status=200, quarantined_rows=0, counts_read=False)),
    (b'{"successful_rows":"10"}', Deliver(status=200, quarantined_rows=0, counts_read=False)),
])
def test_2xx_is_delivered_when_its_counts_add_up_or_cannot_be_read(body, expected):
    assert classify(response(200, body), CONTEXT, POLICY) == expected


@pytest.mark.parametrize("body", [b'{"successful_rows":6,"quarantined_rows":3}',
                                  # null quarantined as left out: 9 counted (was unreadable: all 10 delivered).
                                  b'{"successful_rows":9,"quarantined_rows":null}'])
def test_2xx_counting_fewer_rows_gives_up_as_rows_unaccounted(body):
    decision = classify(response(202, body), CONTEXT, POLICY)
    counted = orjson.loads(body)
    stored, quarantined = counted["successful_rows"], counted["quarantined_rows"] or 0
    assert decision == GiveUp(
        kind=DeadLetterKind.ROWS_UNACCOUNTED,
        message=f"HTTP 202: the server counted {stored} rows stored and {quarantined} quarantined of 10 sent; "
                "not retried, since it may have stored some")


def test_413_splits_several_rows_and_refuses_one():
    assert classify(response(413), CONTEXT, POLICY) == Split()
    assert classify(response(413, message="too big"), at(rows=1, raw_bytes=51, wire_bytes=40), POLICY) == GiveUp(
        kind=DeadLetterKind.PAYLOAD_TOO_LARGE,
        message="HTTP 413: a single row of 50 bytes (40 on the wire) is larger than the server accepts: too big")


@pytest.mark.parametrize("status, kind", [
    (400, DeadLetterKind.REJECTED), (404, DeadLetterKind.REJECTED), (422, DeadLetterKind.PARTIAL),
    (501, DeadLetterKind.REJECTED), (307, DeadLetterKind.REJECTED), (101, DeadLetterKind.REJECTED),
    (999, DeadLetterKind.REJECTED),
])
def test_statuses_that_are_not_retried(status, kind):
    decision = classify(response(status), CONTEXT, POLICY)
    assert isinstance(decision, GiveUp) and decision.kind is kind


@pytest.mark.parametrize("attempt, expected_wait", [(1, 0.375), (2, 0.75), (5, 6.0)])
def test_retryable_status_waits_the_backoff(attempt, expected_wait):
    assert classify(response(503), at(attempt=attempt), POLICY) == Retry(after_secs=expected_wait, cause="503")


def test_429_with_retry_after_waits_and_pauses_every_thread():
    decision = classify(response(429, headers={"Retry-After": "7"}), CONTEXT, POLICY)
    assert decision == Retry(after_secs=7.0, cause="429", pause_secs=7.0, throttled=True)


def test_429_without_a_hint_pauses_every_thread_for_the_backoff():
    assert classify(response(429), CONTEXT, POLICY) == Retry(
        after_secs=0.375, cause="429", pause_secs=0.375, throttled=True)


def test_throttling_spends_no_attempt_and_ends_at_max_throttled_secs():
    # The 6th error attempt is the last; a 429 after 5 errors is still waited out.
    assert classify(response(429, headers={"Retry-After": "2"}), at(attempt=6), POLICY) == Retry(
        after_secs=2.0, cause="429", pause_secs=2.0, throttled=True)
    # 503 with Retry-After is throttling, and pauses every thread as a 429 does; without it, an error.
    assert classify(response(503, headers={"Retry-After": "2"}), CONTEXT, POLICY) == Retry(
        after_secs=2.0, cause="503", pause_secs=2.0, throttled=True)
    assert classify(response(503), CONTEXT, POLICY) == Retry(after_secs=0.375, cause="503")
    policy = RetryPolicy(max_throttled_secs=10)
    assert classify(response(429, headers={"Retry-After": "2"}, message="slow"),
                    at(throttled=4, throttled_secs=8.5), policy) == GiveUp(
        kind=DeadLetterKind.THROTTLED,
        message="throttled 5 times, 8.5 s in all; the next wait would bring it to 10.5 s, past "
                "max_throttled_secs=10; last: HTTP 429: slow",
        pause_secs=2.0)


# The date is 7 s after CONTEXT.now_epoch; X-RateLimit-Reset counts on a 429 only.
_IN_7_SECS = "Tue, 14 Nov 2023 22:13:27 GMT"


@pytest.mark.parametrize("status, headers, wait", [
    (429, {"Retry-After": "7"}, 7.0),
    (429, {"Retry-After": _IN_7_SECS}, 7.0),
    (429, {"X-RateLimit-Reset": "7"}, 7.0),
    (429, {}, 0.375),  # no hint: the backoff
    (429, {"Retry-After": "garbled"}, 0.375),
    (429, {"Retry-After": "500"}, 120.0),  # up to max_retry_after_secs
    (503, {"Retry-After": "7"}, 7.0),
    (503, {"Retry-After": _IN_7_SECS}, 7.0),
    (503, {"Retry-After": "500"}, 120.0),
    (503, {"Retry-After": "7, 7"}, 7.0),  # sent twice (a proxy's and the service's), joined by the HTTP stack
    (429, {"Retry-After": "2, 7"}, 7.0),
])
def test_every_throttling_answer_pauses_every_thread_as_long_as_the_batch_waits(status, headers, wait):
    assert email.utils.parsedate_to_datetime(_IN_7_SECS).timestamp() == CONTEXT.now_epoch + 7
    decision = classify(response(status, headers=headers), CONTEXT, POLICY)
    assert decision == Retry(after_secs=wait, cause=str(status), pause_secs=wait, throttled=True)
    # The same pause when the batch gives up, throttled too long.
    gave_up = classify(response(status, headers=headers), at(throttled_secs=POLICY.max_throttled_secs), POLICY)
    assert (type(gave_up), gave_up.kind, gave_up.pause_secs) == (GiveUp, DeadLetterKind.THROTTLED, wait)


@pytest.mark.parametrize("status, headers, wait", [
    (429, {"Retry-After": "7"}, 7.0), (429, {"X-RateLimit-Reset": "7"}, 7.0), (503, {"Retry-After": "7"}, 7.0),
    (503, {"Retry-After": _IN_7_SECS}, 7.0), (503, {"Retry-After": "500"}, 120.0),
])
def test_the_servers_wait_pauses_every_thread_even_when_the_policy_does_not_retry_the_status(status, headers, wait):
    decision = classify(response(status, headers=headers), CONTEXT, RetryPolicy(retry_status_codes={500}))
    assert (type(decision), decision.kind, decision.pause_secs) == (GiveUp, DeadLetterKind.REJECTED, wait)


@pytest.mark.parametrize("status, headers", [
    (503, {}), (503, {"Retry-After": "garbled"}), (503, {"X-RateLimit-Reset": "7"}), (500, {"Retry-After": "7"}),
])
def test_an_error_that_is_not_throttling_pauses_no_other_thread(status, headers):
    assert classify(response(status, headers=headers), CONTEXT, POLICY) == Retry(
        after_secs=0.375, cause=str(status))


def test_a_2xx_with_an_exhausted_window_pauses_up_to_the_cap():
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "3600"}
    decision = classify(response(200, b'{"successful_rows":10}', headers), CONTEXT, POLICY)
    assert decision == Deliver(status=200, quarantined_rows=0, counts_read=True, pause_secs=120.0)


def test_max_attempts_and_the_time_budget_end_retries():
    assert classify(response(503, message="busy"), at(attempt=6, elapsed_secs=20.0), POLICY) == GiveUp(
        kind=DeadLetterKind.RETRIES_EXHAUSTED,
        message="gave up after 6 attempts in 20.0 s (max_attempts=6 reached); last: HTTP 503: busy")
    decision = classify(response(503, message="busy"), at(attempt=2, elapsed_secs=299.5), POLICY)
    assert decision == GiveUp(
        kind=DeadLetterKind.RETRIES_EXHAUSTED,
        message="gave up after 2 attempts in 299.5 s (the next attempt would start 300.2 s after the first, "
                "past max_total_secs=300); last: HTTP 503: busy")
    # A pause already under way counts too.
    assert isinstance(classify(response(503), at(elapsed_secs=250.0, pause_ahead_secs=60.0), POLICY), GiveUp)


@pytest.mark.parametrize("error, retryable, expected", [
    ("deadline", True, Retry(after_secs=0.375, cause="deadline")),
    ("connection_error", True, Retry(after_secs=0.375, cause="connection_error")),
    ("tls_verification_failed", False, GiveUp(kind=DeadLetterKind.REJECTED, message="no")),
    ("closed", False, GiveUp(kind=DeadLetterKind.REJECTED, message="no")),
])
def test_transport_failures(error, retryable, expected):
    assert classify(TransportFailure(error=error, message="no", retryable=retryable), CONTEXT, POLICY) == expected


def test_an_unreadable_error_body_does_not_change_the_decision():
    failed = response(503, None, message="(body unreadable: larger than 65536 bytes)", body_error="larger")
    assert classify(failed, CONTEXT, POLICY) == Retry(after_secs=0.375, cause="503")


def test_budget_check_before_an_attempt():
    assert budget_check(elapsed_secs=10.0, pause_ahead_secs=5.0, policy=POLICY) is None
    assert budget_check(elapsed_secs=290.0, pause_ahead_secs=20.0, policy=POLICY) == (
        "the rate-limit pause would end 310.0 s after the batch began, past max_total_secs=300")
    assert budget_check(elapsed_secs=301.0, pause_ahead_secs=0.0, policy=POLICY) == (
        "301.0 s had passed since the batch began, past max_total_secs=300")
