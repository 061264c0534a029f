"""Bad input never fails the pipeline: each bad element is sent as valid JSON or
dead-lettered with a clear reason, and the rest of the data is delivered.

The bad elements are built inside the pipeline (a Map fused with the sink), so
that values no Beam coder can carry (a lone surrogate, ``object()``) reach the
sink as a user's DoFn would hand them over.
"""

from __future__ import annotations

import decimal

import apache_beam as beam
import pytest
import requests
from reliability_testlib import TOKEN, dead_letters_in, events, run, sink, stored_ids

from tinybird_emulator import LocalServer

pytestmark = pytest.mark.timeout(120)

GOOD = 5_000
MAX_BATCH_BYTES = 40_000
SERVER_LIMIT_BYTES = 32_000  # smaller than a batch: some batches are split on 413


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def _not_serializable():
    return {"id": 100_001, "obj": object()}


# name -> (element factory, expected outcome)
#   ("stored", id, {column: value})      sent, stored with these values
#   ("quarantined", raw line, error)     sent, put in <datasource>_quarantine by the server
#   ("dead", kind, status, reason)       dead-lettered with exactly this kind, status and reason
BAD = {
    "not_serializable": (_not_serializable, ("dead", "unencodable", None, "Type is not JSON serializable: object (at $.obj)")),
    "nan": (lambda: {"id": 100_002, "score": float("nan")}, ("stored", 100_002, {"score": None})),
    "infinity": (lambda: {"id": 100_003, "score": float("inf")}, ("stored", 100_003, {"score": None})),
    "decimal_minus_infinity": (
        lambda: {"id": 100_004, "score": decimal.Decimal("-Infinity")}, ("stored", 100_004, {"score": None})),
    "finite_decimal": (lambda: {"id": 100_005, "score": decimal.Decimal("2.50")}, ("stored", 100_005, {"score": 2.5})),
    "invalid_utf8_in_json_bytes": (
        lambda: b'{"id": 100006, "s": "\xff\xfe"}', ("dead", "unencodable", None, "bytes are not valid UTF-8")),
    "invalid_utf8_bytes": (lambda: b"\xff\xfe not json", ("dead", "unencodable", None, "bytes are not valid UTF-8")),
    "lone_surrogate": (
        lambda: {"id": 100_007, "s": "\ud800"},
        ("dead", "unencodable", None, "str is not valid UTF-8 (lone surrogate) (at $.s)")),
    "over_max_batch_bytes": (
        lambda: {"id": 100_008, "pad": "y" * 50_000},
        ("dead", "oversize", None, "the encoded row is 50023 bytes, over max_batch_bytes=40000")),
    "over_the_servers_limit": (
        lambda: {"id": 100_009, "pad": "z" * 36_000},
        ("dead", "payload_too_large", 413,
         "HTTP 413: a single row of 36022 bytes (42 on the wire) is larger than the server accepts: "
         "decoded body is larger than the limit of 32000 bytes")),
    "nested_300_levels": (
        lambda: {"id": 100_010, "deep": _nested(300)},
        ("dead", "unencodable", None, "nesting deeper than 254 levels (at $.deep" + ".n" * 253 + ")")),
    "nested_100_levels": (lambda: {"id": 100_011, "deep": _nested(100)}, ("stored", 100_011, {})),
    "empty_object": (lambda: {}, ("quarantined", "{}", "column 'id' (Int64) is missing")),
    "json_array_text": (lambda: "[1, 2]", ("dead", "unencodable", None, "JSON value is a list, not an object")),
    "json_number_bytes": (lambda: b"42", ("dead", "unencodable", None, "JSON value is a number, not an object")),
    "json_null_text": (lambda: "null", ("dead", "unencodable", None, "JSON value is null, not an object")),
    "json_string_text": (lambda: '"text"', ("dead", "unencodable", None, "JSON value is a string, not an object")),
    "json_nan_text": (
        lambda: '{"id": 100012, "score": NaN}',
        ("dead", "unencodable", None, "invalid JSON: unexpected character")),
    "truncated_json_text": (
        lambda: '{"id": 100013,',
        ("dead", "unencodable", None, "invalid JSON: unexpected end of data")),
    "python_list": (lambda: [1, 2], ("dead", "unencodable", None, "element is a list, not a JSON object")),
    "python_int": (lambda: 7, ("dead", "unencodable", None, "element is a number, not a JSON object")),
    "python_none": (lambda: None, ("dead", "unencodable", None, "element is null, not a JSON object")),
    "int_key": (lambda: {1: "a"}, ("dead", "unencodable", None, "dict key 1 is int, not str (at $)")),
    "pretty_printed_text": (
        lambda: '{\n  "id": 100014,\n  "s": "two\\nlines"\n}', ("stored", 100_014, {"s": "two\nlines"})),
    "set_value": (lambda: {"id": 100_015, "tags": {"b", "a"}}, ("stored", 100_015, {"tags": '["a","b"]'})),
    "int_beyond_64_bits": (
        lambda: {"id": 100_016, "big": 2**70},
        ("quarantined", '{"id":100016,"big":1180591620717411303424}', "is not a valid Nullable(Int64)")),
}
_NAMES = sorted(BAD)


def _element(index: int):
    if index < GOOD:
        return events(1, start=index)[0]
    return BAD[_NAMES[index - GOOD]][0]()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    with LocalServer(data_dir=tmp_path_factory.mktemp("bad-input"), token=TOKEN, rate_limit_rps=None,
                     max_body_bytes=SERVER_LIMIT_BYTES) as server:
        yield server


def test_bad_elements_are_sent_as_valid_json_or_dead_lettered_and_the_rest_is_delivered(small_server, tmp_path):
    server, datasource = small_server, "bad_input"
    # The data source exists first, so that its columns (and which are Nullable) are known.
    seed = b'{"id":-1,"kind":"seed","pad":"","score":1.5,"s":"x","tags":["x"],"big":1}\n{"id":-2}\n'
    response = requests.post(f"{server.url}/v0/events?name={datasource}&wait=true", data=seed,
                             headers={"Authorization": f"Bearer {server.token}"}, timeout=10)
    assert response.json() == {"successful_rows": 2, "quarantined_rows": 0}
    dead_dir = tmp_path / "dlq"

    counters, _ = run(lambda p: (
        p | beam.Create(list(range(GOOD + len(BAD))), reshuffle=False)
          | "MakeElements" >> beam.Map(_element)
          | sink(server, datasource, max_batch_bytes=MAX_BATCH_BYTES, wait=True,
                 dead_letter_path=f"{dead_dir}/")))

    expected = {name: outcome for name, (_, outcome) in BAD.items()}
    stored_expected = {o[1]: o[2] for o in expected.values() if o[0] == "stored"}
    quarantined_expected = sorted((o[1], o[2]) for o in expected.values() if o[0] == "quarantined")
    dead_expected = sorted((o[1], o[2], o[3]) for o in expected.values() if o[0] == "dead")

    # Every good event and every bad element that could be sent is stored, once.
    stored = stored_ids(server, datasource)
    assert stored == {i: 1 for i in [-2, -1, *range(GOOD), *stored_expected]}
    for row_id, values in stored_expected.items():
        row = server.query(f"SELECT * FROM {datasource} WHERE id = {row_id}")[0]
        assert {column: row[column] for column in values} == values, row

    # The server quarantined what does not fit its columns; the sink sent it as valid JSON.
    quarantined = server.query(f"SELECT c__raw, c__error FROM {datasource}_quarantine ORDER BY c__raw")
    assert [row["c__raw"] for row in quarantined] == [raw for raw, _ in quarantined_expected]
    for row, (_, error) in zip(quarantined, quarantined_expected):
        assert error in row["c__error"]

    # The rest is in the dead letters, each with its reason.
    letters = dead_letters_in(dead_dir)
    unmatched = list(letters)
    for kind, status, reason in dead_expected:
        match = next((d for d in unmatched
                      if (d.kind, d.status) == (kind, status) and d.message.startswith(reason)), None)
        assert match is not None, (kind, status, reason, [(d.kind, d.message) for d in unmatched])
        unmatched.remove(match)
    assert unmatched == []
    # What was never sent keeps the element (unencodable) or its line (oversize).
    for letter in letters:
        if letter.kind == "unencodable":
            assert letter.line is None and letter.element and letter.attempts == 0
        else:
            assert letter.line is not None and letter.element is None
    assert "<object object at" in next(d.element for d in letters if "JSON serializable" in d.message)

    assert counters["elements_in"] == GOOD + len(BAD)
    assert counters["rows_acknowledged"] == GOOD + len(stored_expected) + len(quarantined_expected)
    assert counters["rows_quarantined"] == len(quarantined_expected)
    assert counters["dead_letters"] == len(dead_expected)
    assert counters["retries_413"] > 0  # batches over the server's limit were split, not lost
