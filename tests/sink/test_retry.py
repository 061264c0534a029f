"""Tests of the RetryPolicy value object (sinks/tinybird/retry.py)."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest

from sinks.tinybird.retry import RETRY_AFTER_STATUS_CODES, RETRYABLE_STATUS_CODES, RetryPolicy


def test_constants():
    assert frozenset({408, 429, 500, 502, 503, 504}) == RETRYABLE_STATUS_CODES
    assert frozenset({429, 503}) == RETRY_AFTER_STATUS_CODES


def test_defaults():
    policy = RetryPolicy()
    assert policy.max_attempts == 6
    assert policy.initial_backoff_secs == 0.5
    assert policy.backoff_multiplier == 2.0
    assert policy.max_backoff_secs == 30.0
    assert policy.max_total_secs == 300.0
    assert policy.max_retry_after_secs == 120.0
    assert policy.retry_status_codes == RETRYABLE_STATUS_CODES


def test_is_frozen_keyword_only_and_picklable():
    policy = RetryPolicy(max_attempts=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        RetryPolicy(3)  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert dataclasses.replace(policy, max_attempts=5).max_attempts == 5


@pytest.mark.parametrize(
    "retry_number, rand, expected",
    [
        # base 0.5, 1, 2, 4, 8, ...; equal jitter: base/2 + rand*base/2
        (1, 0.0, 0.25),
        (1, 1.0, 0.5),
        (1, 0.5, 0.375),
        (2, 0.0, 0.5),
        (2, 0.5, 0.75),
        (3, 0.25, 1.25),
        (4, 1.0, 4.0),
        (5, 0.0, 4.0),
        (6, 0.0, 8.0),
        (6, 1.0, 16.0),
        # 0.5 * 2**6 = 32 is capped to 30
        (7, 0.0, 15.0),
        (7, 1.0, 30.0),
        (100, 0.5, 22.5),
        # no overflow for absurd retry numbers
        (10_000, 1.0, 30.0),
    ],
)
def test_backoff_exact_numbers(retry_number, rand, expected):
    assert RetryPolicy().backoff_secs(retry_number, rand=rand) == expected


def test_the_default_policys_retries_wait_what_its_docstring_says():
    """5 retries of errors, 0.25-0.5, 0.5-1, 1-2, 2-4 and 4-8 s: 7.75 to 15.5 s in all."""
    policy = RetryPolicy()
    retries = range(1, policy.max_attempts)
    assert len(retries) == 5
    assert sum(policy.backoff_secs(n, rand=0.0) for n in retries) == 7.75
    assert sum(policy.backoff_secs(n, rand=1.0) for n in retries) == 15.5
    assert "7.75 to 15.5 s in all" in " ".join((RetryPolicy.__doc__ or "").split())


def test_backoff_with_other_multiplier_and_cap():
    policy = RetryPolicy(initial_backoff_secs=0.2, backoff_multiplier=3.0, max_backoff_secs=5.0)
    assert [policy.backoff_secs(n, rand=1.0) for n in (1, 2, 3, 4)] == pytest.approx([0.2, 0.6, 1.8, 5.0])
    assert policy.backoff_secs(4, rand=0.0) == 2.5


def test_zero_backoff():
    policy = RetryPolicy(initial_backoff_secs=0.0, max_backoff_secs=0.0)
    assert policy.backoff_secs(3, rand=0.7) == 0.0


@pytest.mark.parametrize(
    "server_wait, expected",
    [
        (None, 0.375),  # backoff only
        (0.1, 0.375),  # the server cannot shorten the backoff
        (2.0, 2.0),  # honoured
        (120.0, 120.0),  # up to the cap
        (500.0, 120.0),  # capped
        (math.inf, 120.0),
        (-3.0, 0.375),  # nonsense counts as 0
        (math.nan, 0.375),
    ],
)
def test_delay_honours_server_wait_up_to_cap(server_wait, expected):
    assert RetryPolicy().delay_secs(1, rand=0.5, server_wait_secs=server_wait) == expected


def test_delay_cap_is_configurable():
    policy = RetryPolicy(max_retry_after_secs=5.0)
    assert policy.delay_secs(1, rand=0.0, server_wait_secs=60.0) == 5.0
    # The backoff still applies when it is longer than the capped server wait.
    assert policy.delay_secs(7, rand=1.0, server_wait_secs=60.0) == 30.0


def test_retryable_statuses():
    policy = RetryPolicy(retry_status_codes=[503])
    assert policy.retry_status_codes == frozenset({503})
    assert policy.is_retryable_status(503)
    assert not policy.is_retryable_status(500)
    assert RetryPolicy().is_retryable_status(429)
    assert not RetryPolicy().is_retryable_status(501)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_attempts": 0}, "max_attempts must be an int >= 1, got 0"),
        ({"max_attempts": 2.0}, "max_attempts must be an int >= 1, got 2.0"),
        ({"max_attempts": True}, "max_attempts must be an int >= 1, got True"),
        ({"initial_backoff_secs": -1}, "initial_backoff_secs must be a finite number >= 0.0, got -1"),
        ({"initial_backoff_secs": math.nan}, "initial_backoff_secs must be a finite number >= 0.0, got nan"),
        ({"initial_backoff_secs": "1"}, "initial_backoff_secs must be a finite number >= 0.0, got '1'"),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier must be a finite number >= 1.0, got 0.5"),
        ({"max_backoff_secs": math.inf}, "max_backoff_secs must be a finite number >= 0.0, got inf"),
        ({"max_backoff_secs": 0.1}, "max_backoff_secs (0.1) must be >= initial_backoff_secs (0.5)"),
        ({"max_total_secs": 0}, "max_total_secs must be a finite number > 0.0, got 0"),
        ({"max_retry_after_secs": -0.5}, "max_retry_after_secs must be a finite number >= 0.0, got -0.5"),
        ({"retry_status_codes": 503}, "retry_status_codes must be a set of ints, got 503"),
        ({"retry_status_codes": "503"}, "retry_status_codes must be a set of ints, got '503'"),
        ({"retry_status_codes": {200}}, "retry_status_codes must hold HTTP error statuses (400-599), got 200"),
        ({"retry_status_codes": {"503"}}, "retry_status_codes must hold HTTP error statuses (400-599), got '503'"),
        ({"retry_status_codes": {503, 413}}, "retry_status_codes must not hold 413"),
        ({"retry_status_codes": {422}}, "retry_status_codes must not hold 422"),
    ],
)
def test_validation_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError) as info:
        RetryPolicy(**kwargs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "retry_number, rand, message",
    [
        (0, 0.5, "retry_number must be an int >= 1, got 0"),
        (1.0, 0.5, "retry_number must be an int >= 1, got 1.0"),
        (1, 1.5, "rand must be a number in [0, 1], got 1.5"),
        (1, -0.1, "rand must be a number in [0, 1], got -0.1"),
    ],
)
def test_backoff_argument_errors(retry_number, rand, message):
    with pytest.raises(ValueError) as info:
        RetryPolicy().backoff_secs(retry_number, rand=rand)
    assert str(info.value) == message
