"""WriteToTinybird checks every argument when it is built: a clear TypeError/ValueError naming it.

No server: nothing here runs a pipeline.
"""

from __future__ import annotations

import inspect
import math

import pytest
from shared_testlib import TOKEN

from sinks.tinybird import RetryPolicy, WriteToTinybird
from sinks.tinybird._arguments import CHECKS

_SECRET = "p.very-secret-token-value"


def _build(**changes):
    return WriteToTinybird(**{"datasource": "events", "token": "t", **changes})


def test_every_argument_has_a_check():
    # A new argument without a type check fails here, not on the workers.
    assert set(inspect.signature(WriteToTinybird).parameters) == set(CHECKS)


def test_the_defaults_pass_their_own_checks():
    for name, parameter in inspect.signature(WriteToTinybird).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            CHECKS[name](name, parameter.default)


_WRONG_TYPES = [
    ("retry_policy", "fast", r"^retry_policy must be a sinks.tinybird.RetryPolicy, a mapping of its fields "
                             r"\(Beam YAML\) or None, got str 'fast'"),
    ("wait", "yes", r"^wait must be True or False, got str 'yes'"),
    ("wait", 1, r"^wait must be True or False, got int 1"),
    ("raise_on_failure", None, r"^raise_on_failure must be True or False, got NoneType None"),
    ("allow_insecure_http", "false", r"^allow_insecure_http must be True or False, got str 'false'"),
    ("num_shards", "8", r"^num_shards must be an int, got str '8'"),
    ("num_shards", 8.0, r"^num_shards must be an int, got float 8.0"),
    ("num_shards", True, r"^num_shards must be an int, got bool True"),
    ("max_windows_per_bundle", "20", r"^max_windows_per_bundle must be an int, got str '20'"),
    ("max_windows_per_bundle", 20.0, r"^max_windows_per_bundle must be an int, got float 20.0"),
    ("max_batch_bytes", "8MiB", r"^max_batch_bytes must be an int, got str '8MiB'"),
    ("max_batch_rows", None, r"^max_batch_rows must be an int, got NoneType None"),
    ("max_in_flight", 2.5, r"^max_in_flight must be an int, got float 2.5"),
    ("max_buffering_secs", "5", r"^max_buffering_secs must be a number of seconds \(int or float\), got str '5'"),
    ("connect_timeout_secs", None, r"^connect_timeout_secs must be a number of seconds"),
    ("read_timeout_secs", False, r"^read_timeout_secs must be a number of seconds .*got bool False"),
    ("datasource", 7, r"^datasource must be a str or a callable \(element -> str\), got int"),
    ("api_url", None, r"^api_url must be a str, got NoneType"),
    ("token_env", None, r"^token_env must be a str, got NoneType"),
    ("token_secret", 1, r"^token_secret must be a str or None, got int"),
    ("compression", 3, r"^compression must be a str or None, got int"),
    ("dead_letter_path", b"/tmp/x", r"^dead_letter_path must be a str or None, got bytes"),
    ("dead_letter_format", None, r"^dead_letter_format must be a str, got NoneType"),
    ("dead_letter_label", 7, r"^dead_letter_label must be a str or None, got int"),
    ("ca_bundle_path", 0, r"^ca_bundle_path must be a str or None, got int"),
    ("clock", 0.0, r"^clock must be a callable returning epoch seconds, got float"),
]


def test_every_argument_has_a_wrong_type_case():
    # token's cases are in test_errors_never_show_the_token.
    assert {name for name, _, _ in _WRONG_TYPES} | {"token"} == set(CHECKS)


@pytest.mark.parametrize("name, value, message", _WRONG_TYPES)
def test_wrong_types_are_a_type_error_naming_the_argument(name, value, message):
    with pytest.raises(TypeError, match=message):
        _build(**{name: value})


@pytest.mark.parametrize("name, value, message", [
    ("max_buffering_secs", math.inf, r"^max_buffering_secs must be finite, got inf"),
    ("read_timeout_secs", math.nan, r"^read_timeout_secs must be finite, got nan"),
    ("max_buffering_secs", 0, r"^max_buffering_secs must be positive, got 0"),
    # Finite, but its timer (now + this) is past Beam's last timestamp: every streaming bundle failed.
    ("max_buffering_secs", 1.7e308, r"^max_buffering_secs must be at most 1e\+09 \(about 31 years\), got 1.7e\+308"),
    # Finite, but a wait this long is past what a thread or a socket can wait (about 292 years):
    # every bundle's post step failed with OverflowError.
    ("read_timeout_secs", 1e10, r"^read_timeout_secs must be at most 1e\+09 \(about 31 years\), got 10000000000\.0"),
    ("connect_timeout_secs", 1e10, r"^connect_timeout_secs must be at most 1e\+09 \(about 31 years\), got 10000000000\.0"),
    ("retry_policy", {"max_total_secs": 1e10}, r"^max_total_secs must be at most 1e\+09 \(about 31 years\)"),
    ("retry_policy", {"max_throttled_secs": 1e10}, r"^max_throttled_secs must be at most 1e\+09 \(about 31 years\)"),
    ("num_shards", 0, r"^num_shards must be at least 1, got 0"),
    # A shard past a 64-bit key failed every bundle of the first step (OverflowError in Beam's coder).
    ("num_shards", 2**63 + 1, r"^num_shards must be at most 2\*\*63 \(a shard is a 64-bit key\), got 9223372036854775809"),
    ("max_windows_per_bundle", 0, r"^max_windows_per_bundle must be at least 1, got 0"),
    ("max_batch_bytes", 1, r"^max_batch_bytes must be at least 2, got 1"),
    ("max_batch_rows", -1, r"^max_batch_rows must be at least 1, got -1"),
    ("compression", "brotli", r"^compression must be 'zstd', 'gzip' or None, got 'brotli'"),
    ("dead_letter_format", "csv", r"^dead_letter_format must be one of \('json', 'avro'\), got 'csv'"),
    ("dead_letter_path", "  ", r"^dead_letter_path is empty"),
    ("dead_letter_label", "run/1", r"^dead_letter_label must match \[A-Za-z0-9\]"),
    ("dead_letter_label", "-x", r"^dead_letter_label must match "),
    ("dead_letter_label", "*", r"^dead_letter_label must match "),
    ("datasource", "events_quarantine", r"^datasource must not name a quarantine data source .*, got .events_quarantine.$"),
    ("datasource", "web-events", r"^datasource must match"),
    ("api_url", "ftp://x", r"^api_url must be an http:// or https:// URL"),
])
def test_bad_values_are_a_value_error_naming_the_argument(name, value, message):
    with pytest.raises(ValueError, match=message):
        _build(**{name: value})


def test_max_batch_bytes_is_at_most_the_largest_request_the_events_api_takes():
    """A max_batch_bytes over 100 MB (the Events API's request limit on paid plans, 10 MB on the free
    plan) was taken: every full batch was then posted only to be refused with a 413 and split."""
    from sinks.tinybird._batching import MAX_BATCH_BYTES

    assert MAX_BATCH_BYTES == 100_000_000
    for value in (2, 8 * 2**20, 10_000_000, MAX_BATCH_BYTES - 1, MAX_BATCH_BYTES):
        assert _build(max_batch_bytes=value)._limits.max_batch_bytes == value
    for value in (MAX_BATCH_BYTES + 1, 100 * 2**20, 2**31, 2**63, 10**30):
        with pytest.raises(ValueError, match=rf"^max_batch_bytes must be at most 100000000 \(100 MB: the Events API "
                                             rf"refuses larger requests on every plan, and over 10 MB on the free "
                                             rf"plan\), got {value}$"):
            _build(max_batch_bytes=value)


@pytest.mark.parametrize("value", ["", "1TOKEN", "MY-TOKEN", "not a var!", "TOKEN\n", "TÖKEN", "A=B"])
def test_token_env_must_be_an_environment_variable_name(value):
    with pytest.raises(ValueError, match=r"^token_env must be an environment variable name .*got "):
        WriteToTinybird(datasource="events", token_env=value)


@pytest.mark.parametrize("name", ["token_env", "token_secret"])
@pytest.mark.parametrize("token", [TOKEN, "p.eyJ1IjogIjQ2YzdjMGM0In0.SIGNATURE_abc-123", "e30.SIGNATURE"])
def test_a_token_pasted_where_a_name_belongs_is_not_in_the_error(name, token):
    with pytest.raises(ValueError) as raised:
        WriteToTinybird(datasource="events", **{name: token})
    message = str(raised.value)
    assert message.startswith(f"{name} must be ")
    assert "the value is not shown" in message
    for start in range(len(token) - 8):
        assert token[start:start + 8].lower() not in message.lower(), message


@pytest.mark.parametrize("value, shape", [
    ("projects/my-project/secrets/tb/version/latest", "45 characters, 6 parts between '/', part 5 is not 'versions' ("),
    ("project/my-project/secret/tb/versions/1", "39 characters, 6 parts between '/', part 1 is not 'projects', "
                                                "part 3 is not 'secrets' ("),
    ("projects/my-project/secrets/tb", "30 characters, 4 parts between '/' ("),
    ("projects/my-project/secrets/tb/versions/", "40 characters, 6 parts between '/', one of them empty ("),
    ("projects/my project/secrets/tb/versions/1", "41 characters, a space at position 11 ("),
    ("tinybird-token", "14 characters, 1 part between '/' ("),
])
def test_a_bad_token_secret_is_described_by_its_shape(value, shape):
    """Not by a character a valid secret version holds (the '-' of a project id): by what makes it
    no secret version, without showing it."""
    with pytest.raises(ValueError) as raised:
        WriteToTinybird(datasource="events", token_secret=value)
    message = str(raised.value)
    assert message.endswith(f"got {shape}the value is not shown: it may be a token)"), message
    assert "'-'" not in message and "my-project" not in message


@pytest.mark.parametrize("value", ["TINYBIRD_TOKEN", "_t", "tb_token2", "A"])
def test_token_env_accepts_names(value):
    assert WriteToTinybird(datasource="events", token_env=value) is not None


@pytest.mark.parametrize("value", [
    "", "tinybird", "projects/p/secrets/tinybird", "projects/p/secrets/s/versions/",
    "projects//secrets/s/versions/1", "projects/p/secrets/s/versions/1/extra",
    "projects/p/secrets/s/versions/1\n", "secrets/s/versions/1",
])
def test_token_secret_must_be_a_secret_manager_version_path(value):
    with pytest.raises(ValueError, match=r"^token_secret must be a Secret Manager secret version, projects/"):
        WriteToTinybird(datasource="events", token_secret=value)


@pytest.mark.parametrize("value", ["projects/p/secrets/tinybird/versions/latest", "projects/123/secrets/tb/versions/3"])
def test_token_secret_accepts_version_paths(value):
    assert WriteToTinybird(datasource="events", token_secret=value) is not None


def test_good_values_of_every_type_are_accepted():
    transform = WriteToTinybird(
        datasource="events", token="t", api_url="http://127.0.0.1:1", wait=True, compression=None,
        max_batch_bytes=2, max_batch_rows=1, max_buffering_secs=1, num_shards=1, max_in_flight=1,
        retry_policy=RetryPolicy(max_attempts=1), connect_timeout_secs=0.5, read_timeout_secs=1,
        dead_letter_path="/tmp/dl/", dead_letter_format="avro", raise_on_failure=True,
        ca_bundle_path="/etc/ssl/cert.pem", allow_insecure_http=True, clock=lambda: 0.0)
    assert transform is not None


@pytest.mark.parametrize("changes", [
    {"token": 12345},
    {"token": [_SECRET]},
    {"token": _SECRET, "token_secret": "projects/p/secrets/s/versions/1"},
    {"token": _SECRET, "num_shards": "x"},
    {"token": _SECRET, "retry_policy": "fast"},
])
def test_errors_never_show_the_token(changes):
    with pytest.raises((TypeError, ValueError)) as error:
        WriteToTinybird(datasource="events", **changes)
    assert _SECRET not in str(error.value) and "12345" not in str(error.value)


def test_retry_policy_may_be_a_mapping_of_its_fields_as_beam_yaml_writes_it():
    sink = WriteToTinybird(datasource="events", retry_policy={"max_attempts": 3, "retry_status_codes": [500, 503]})
    assert sink._retry_policy == RetryPolicy(max_attempts=3, retry_status_codes=frozenset({500, 503}))
    with pytest.raises(ValueError, match=r"^retry_policy has no field 'attempts', 'x'; its fields: backoff_multiplier, "):
        WriteToTinybird(datasource="events", retry_policy={"attempts": 3, "x": 1})
    with pytest.raises(ValueError, match=r"max_attempts"):
        WriteToTinybird(datasource="events", retry_policy={"max_attempts": 0})
