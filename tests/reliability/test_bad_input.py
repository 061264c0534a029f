"""Bad input never fails the pipeline: each bad element is sent as valid JSON or
dead-lettered with a clear reason, and the rest of the data is delivered.

The bad elements are built inside the pipeline (a Map fused with the sink), so
that values no Beam coder can carry (a lone surrogate, ``object()``, a mapping
whose methods raise) reach the sink as a user's DoFn would hand them over.
Also here: every value type the encoder documents, stored by the local server
with its documented spelling.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import itertools
import typing

import apache_beam as beam
import numpy as np
import orjson
import pandas as pd
import pytest
import requests
from apache_beam.pvalue import Row
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_testlib import events, run, sink, stored_ids
from shared_testlib import TOKEN, HugeRepr, RaisingMapping, ReprRaises, Unprintable, dead_letters_in

from sinks.tinybird._encoding import MAX_REASON_CHARS
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


class Money(decimal.Decimal):
    """A money type whose text is not a JSON number."""

    def __str__(self):
        return f"{decimal.Decimal.__str__(self)} EUR"


class Injecting(decimal.Decimal):
    """Its text would end the row and start another."""

    def __str__(self):
        return '1}\n{"injected":true'


class Symbol(str):
    """A str compared by identity: two keys can have one text."""

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


class Wrapped(typing.NamedTuple):
    n: object


def _named_tuples(levels: int) -> object:
    """``levels`` NamedTuples, one in the other, around a value only the slow path encodes."""
    value: object = datetime.time(1, 2, tzinfo=datetime.UTC)
    for _ in range(levels):
        value = Wrapped(value)
    return value


# name -> (element factory, expected outcome)
#   ("stored", id, {column: value})      sent, stored with these values
#   ("quarantined", id as text, error)   sent, put in <datasource>_quarantine by the server
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
        lambda: _Carried({"id": 100_007, "s": "\ud800"}),
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
    "empty_object": (lambda: {}, ("quarantined", None, "column 'id' (Int64) is missing")),
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
    "set_value": (lambda: {"id": 100_015, "tags": {"b", "a"}}, ("stored", 100_015, {"tags": ["a", "b"]})),
    "int_beyond_64_bits": (
        lambda: {"id": 100_016, "big": 2**70},
        ("quarantined", "100016", "is not a valid Nullable(Int64)")),
    "decimal_subclass_with_its_own_str": (
        lambda: {"id": 100_017, "score": Money("9.99")}, ("stored", 100_017, {"score": 9.99})),
    "decimal_subclass_whose_str_splits_the_line": (
        lambda: {"id": 100_018, "score": Injecting("1.25")}, ("stored", 100_018, {"score": 1.25})),
    "fragment_with_a_raw_newline": (
        lambda: {"id": 100_019, "s": orjson.Fragment(b'"two"\n')},
        ("dead", "unencodable", None, "an orjson.Fragment holds a raw newline: the line would be two NDJSON rows")),
    "fragment_not_utf8_over_max_batch_bytes": (
        lambda: {"id": 100_020, "pad": orjson.Fragment(b'"\xff' + b"y" * 50_000 + b'"')},
        ("dead", "oversize", None, "the encoded row is 50024 bytes, over max_batch_bytes=40000")),
    "str_subclass_keys_with_one_text": (
        lambda: {"id": 100_021, "score": 1.5, Symbol("score"): 2.5},
        ("dead", "unencodable", None, "two dict keys have the text 'score' (at $)")),
    "key_with_a_lone_surrogate": (
        lambda: _Carried({"id": 100_022, "name\udcff": object()}),
        ("dead", "unencodable", None, "Type is not JSON serializable: object (at $.name\\udcff)")),
    "named_tuples_254_levels_through_the_slow_path": (
        lambda: {"id": 100_023, "deep": _named_tuples(253)}, ("stored", 100_023, {})),
    "named_tuples_255_levels": (
        lambda: {"id": 100_024, "deep": _named_tuples(254)},
        ("dead", "unencodable", None, "nesting deeper than 254 levels (at $.deep" + ".n" * 253 + ")")),
}
_NAMES = sorted(BAD)


class _Carried(dict):
    """A dict that Beam carries by pickling. Beam's coder writes a plain dict's str as UTF-8, which
    a lone surrogate cannot be, and Beam encodes a random sample of every PCollection's elements to
    size them (``OperationCounters.do_sample``): a plain dict holding one failed a bundle of this
    test at random, in the step that made it, before the sink saw it (once in a run of the whole
    suite). A pipeline carrying such dicts meets the same in Beam, whatever its sink."""


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
    quarantined_expected = sorted(((o[1], o[2]) for o in expected.values() if o[0] == "quarantined"),
                                  key=lambda q: str(q[0]))
    dead_expected = sorted((o[1], o[2], o[3]) for o in expected.values() if o[0] == "dead")

    # Every good event and every bad element that could be sent is stored, once.
    stored = stored_ids(server, datasource)
    assert stored == {i: 1 for i in [-2, -1, *range(GOOD), *stored_expected]}
    for row_id, values in stored_expected.items():
        row = server.query(f"SELECT * FROM {datasource} WHERE id = {row_id}")[0]
        got = {column: _listed(row[column]) if isinstance(v, list) else row[column] for column, v in values.items()}
        assert got == values, row

    # The server quarantined what does not fit its columns; the sink sent it as valid JSON.
    quarantined = server.query(f"SELECT id, c__error FROM {datasource}_quarantine")
    quarantined.sort(key=lambda row: str(row["id"]))
    assert [row["id"] for row in quarantined] == [row_id for row_id, _ in quarantined_expected]
    for row, (_, error) in zip(quarantined, quarantined_expected, strict=True):
        assert any(error in message for message in _listed(row["c__error"])), row

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
    # Text that is not UTF-8 is escaped, never a failed bundle: bytes as \\x, a lone surrogate as \\u.
    assert next(d.line for d in letters if d.kind == "oversize" and "100020" in d.line).startswith(
        '{"id":100020,"pad":"\\xffyyy')
    assert "'name\\udcff': <object object at" in next(d.element for d in letters if "name\\udcff" in d.message)

    assert counters["elements_in"] == GOOD + len(BAD)
    assert counters["rows_acknowledged"] == GOOD + len(stored_expected) + len(quarantined_expected)
    assert counters["rows_quarantined"] == len(quarantined_expected)
    assert counters["dead_letters"] == len(dead_expected)
    assert counters["retries_413"] > 0  # batches over the server's limit were split, not lost


def _fragments(index: int):
    if index < FRAGMENT_GOOD:
        return events(1, start=index)[0]
    # What a Fragment can hold that the sink does not parse per element: not JSON, not UTF-8.
    return {"id": 100_000 + index, "kind": "fragment", "pad": orjson.Fragment(
        [b"9.99 EUR", b'"\xff\xfe"', b'{"a":[1,2]}'][index - FRAGMENT_GOOD])}


FRAGMENT_GOOD = 3000
FRAGMENTS = 3


def test_fragments_the_server_cannot_parse_are_quarantined_and_their_batch_delivered(small_server, tmp_path):
    server, datasource = small_server, "fragments"
    counters, _ = run(lambda p: (
        p | beam.Create(list(range(FRAGMENT_GOOD + FRAGMENTS)), reshuffle=False)
          | "MakeElements" >> beam.Map(_fragments)
          | sink(server, datasource, wait=True, dead_letter_path=f"{tmp_path}/dlq/")))
    assert dead_letters_in(tmp_path / "dlq") == []
    stored = stored_ids(server, datasource)
    assert sorted(stored) == [*range(FRAGMENT_GOOD), 100_000 + FRAGMENT_GOOD + 2]
    errors = sorted(e for row in server.query(f"SELECT c__error FROM {datasource}_quarantine")
                    for e in _listed(row["c__error"]))
    assert [e.split(":")[0] for e in errors] == ["invalid JSON", "invalid UTF-8"]
    assert counters["rows_acknowledged"] == FRAGMENT_GOOD + FRAGMENTS and counters["rows_quarantined"] == 2


def test_a_refused_batch_holding_bytes_that_are_not_utf8_is_dead_lettered_line_by_line(small_server, tmp_path):
    server, datasource = small_server, "fragments_refused"
    dead_dir = tmp_path / "dlq"
    counters, _ = run(lambda p: (
        p | beam.Create(list(range(FRAGMENT_GOOD + FRAGMENTS)), reshuffle=False)
          | "MakeElements" >> beam.Map(_fragments)
          | sink(server, datasource, token="p.not-the-token", dead_letter_path=f"{dead_dir}/")))
    letters = dead_letters_in(dead_dir)
    assert len(letters) == FRAGMENT_GOOD + FRAGMENTS == counters["dead_letters_rejected"]
    assert {(d.kind, d.status) for d in letters} == {("rejected", 403)}
    assert sorted(d.line for d in letters if '"fragment"' in d.line) == [
        '{"id":103000,"kind":"fragment","pad":9.99 EUR}',
        '{"id":103001,"kind":"fragment","pad":"\\xff\\xfe"}',
        '{"id":103002,"kind":"fragment","pad":{"a":[1,2]}}',
    ]
    assert stored_ids(server, datasource) == {}


# -- hostile elements: one element's exception never fails its bundle ------------------


def _columns(row_id: int, **values) -> dict:
    """A row with the data source's required columns (a row without them is quarantined)."""
    return {"id": row_id, "kind": "hostile", "pad": "", **values}


def _raising(row_id: int, where: str, error: type[BaseException], message: str) -> RaisingMapping:
    """A row whose method ``where`` raises ``error(message)``."""
    return RaisingMapping(_columns(row_id), where, error, message)


HOSTILE_GOOD = 300
# Not here: elements whose pickling raises (a __class__ property that raises, a
# __getattr__ that recurses). Beam pickles a sample of each step's outputs to
# estimate their size, so such an element fails the step that makes it, before
# any sink; tests/sink/test_encoding.py shows the encoder's answer to them.
# name -> (element factory taking an id, expected outcome): ("stored",) or ("dead", reason prefix)
HOSTILE = {
    # The three of issue 12, each of which used to fail the whole job.
    "set_holding_decimal_nan": (
        lambda i: _columns(i, nums={decimal.Decimal("NaN"), decimal.Decimal("2.5")}), ("stored",)),
    "int_over_4300_digits": (
        lambda i: {"id": i, "big": 10**4301},
        ("dead", "int with more digits than Python converts to text (4300) (at $.big)")),
    "mapping_whose_getitem_raises": (
        lambda i: _raising(i, "getitem", KeyError, "id"), ("dead", "KeyError raised while encoding (at $): 'id'")),
    "nested_mapping_whose_iter_raises": (
        lambda i: {"id": i, "a": [{"m": _raising(i, "iter", OSError, "disk")}]},
        ("dead", "OSError raised while encoding (at $.a[0].m): disk")),
    "exception_with_a_huge_message": (
        lambda i: _raising(i, "keys", RuntimeError, "x" * 1_000_000),
        ("dead", "RuntimeError raised while encoding (at $): " + "x" * 200 + "...[1000000 chars]")),
    "exception_whose_str_raises": (
        lambda i: _raising(i, "getitem", Unprintable, ""),
        ("dead", "shared_testlib.Unprintable raised while encoding (at $): <its message could not be read>")),
    "repr_raises": (
        lambda i: {"id": i, "o": ReprRaises()}, ("dead", "Type is not JSON serializable: shared_testlib.ReprRaises (at $.o)")),
    "huge_repr": (
        lambda i: {"id": i, "o": HugeRepr()}, ("dead", "Type is not JSON serializable: shared_testlib.HugeRepr (at $.o)")),
    "pandas_timestamp": (lambda i: _columns(i, at=pd.Timestamp("2024-01-02 03:04:05.123456789")), ("stored",)),
}
_HOSTILE_NAMES = sorted(HOSTILE)
_HOSTILE_FIRST_ID = 200_000


def _hostile_element(index: int):
    if index < HOSTILE_GOOD:
        return events(1, start=index)[0]
    position = index - HOSTILE_GOOD
    return HOSTILE[_HOSTILE_NAMES[position]][0](_HOSTILE_FIRST_ID + position)


def _check_unencodable_letters(letters) -> None:
    for letter in letters:
        assert letter.kind == "unencodable" and letter.line is None and letter.attempts == 0, letter
        assert 0 < len(letter.message) <= MAX_REASON_CHARS
        assert isinstance(letter.element, str) and 0 < len(letter.element) <= 500


def test_hostile_elements_are_dead_lettered_and_the_rest_of_their_bundle_delivered(small_server, tmp_path):
    server, datasource = small_server, "hostile_input"
    dead_dir = tmp_path / "dlq"

    counters, _ = run(lambda p: (
        # One bundle: the good rows and the hostile elements are processed together.
        p | beam.Create(list(range(HOSTILE_GOOD + len(HOSTILE))), reshuffle=False)
          | "MakeElements" >> beam.Map(_hostile_element)
          | sink(server, datasource, wait=True, dead_letter_path=f"{dead_dir}/")))

    hostile_ids = {name: _HOSTILE_FIRST_ID + k for k, name in enumerate(_HOSTILE_NAMES)}
    stored_names = [name for name in _HOSTILE_NAMES if HOSTILE[name][1][0] == "stored"]
    assert stored_ids(server, datasource) == {i: 1 for i in [*range(HOSTILE_GOOD), *(hostile_ids[n] for n in stored_names)]}

    letters = dead_letters_in(dead_dir)
    _check_unencodable_letters(letters)
    expected = sorted(outcome[1] for _, outcome in HOSTILE.values() if outcome[0] == "dead")
    unmatched = list(letters)
    for reason in expected:
        match = next((d for d in unmatched if d.message.startswith(reason)), None)
        assert match is not None, (reason, [d.message[:120] for d in unmatched])
        unmatched.remove(match)
    assert unmatched == []
    shown = next(d.element for d in letters if "ReprRaises" in d.message)
    assert shown.startswith(f"{{'id': {hostile_ids['repr_raises']}, 'o': <ReprRaises instance at"), shown
    shown = next(d.element for d in letters if "HugeRepr" in d.message)
    assert shown.startswith(f"{{'id': {hostile_ids['huge_repr']}, 'o': HHHH") and len(shown) <= 500, shown
    assert counters["elements_in"] == HOSTILE_GOOD + len(HOSTILE)
    assert counters["dead_letters"] == counters["dead_letters_unencodable"] == len(expected)


def _listed(value):
    """An array column as a list (the local server answers arrays as lists or as JSON text)."""
    return value if isinstance(value, list) else orjson.loads(value)


# Recipes are plain data (picklable, shown by hypothesis); the hostile element is
# built from its recipe inside the pipeline, next to the sink.
_EXCEPTIONS = {
    "ValueError": ValueError, "KeyError": KeyError, "RuntimeError": RuntimeError, "TypeError": TypeError,
    "ZeroDivisionError": ZeroDivisionError, "OverflowError": OverflowError, "RecursionError": RecursionError,
    "MemoryError": MemoryError, "AttributeError": AttributeError, "StopIteration": StopIteration,
    "decimal.InvalidOperation": decimal.InvalidOperation, "shared_testlib.Unprintable": Unprintable,
}
_recipes = st.tuples(
    st.sampled_from(["mapping", "repr", "huge_repr", "big_int", "nan_set", "nat"]),
    st.sampled_from(["getitem", "iter", "len", "keys"]),
    st.sampled_from(sorted(_EXCEPTIONS)),
    st.sampled_from([0, 12, 50_000]),
    st.integers(min_value=0, max_value=3),
)


def _from_recipe(row_id: int, recipe) -> object:
    kind, where, error, message_chars, depth = recipe
    value: object = {
        "mapping": lambda: _raising(row_id, where, _EXCEPTIONS[error], "m" * message_chars),
        "repr": ReprRaises, "huge_repr": HugeRepr,
        "big_int": lambda: 10**5000, "nan_set": lambda: {decimal.Decimal("NaN")}, "nat": lambda: pd.NaT,
    }[kind]()
    if depth == 0 and kind == "mapping":
        return value  # the element itself
    for _ in range(max(depth, 1)):
        value = _columns(row_id, a=[value])
    return value


_runs = itertools.count()


@settings(max_examples=3, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipes=st.lists(_recipes, min_size=1, max_size=12))
def test_hostile_elements_generated_by_hypothesis_never_fail_the_bundle(small_server, tmp_path, recipes):
    server, good = small_server, 40
    datasource = f"hostile_generated_{next(_runs)}"
    dead_dir = tmp_path / f"dlq-{datasource}"
    first_id = 300_000

    def element(index: int):
        if index < good:
            return events(1, start=index)[0]
        return _from_recipe(first_id + index - good, recipes[index - good])

    counters, _ = run(lambda p: (
        p | beam.Create(list(range(good + len(recipes))), reshuffle=False)
          | "MakeElements" >> beam.Map(element)
          | sink(server, datasource, wait=True, dead_letter_path=f"{dead_dir}/")))

    stored = stored_ids(server, datasource)
    letters = dead_letters_in(dead_dir)
    hostile_ids = set(range(first_id, first_id + len(recipes)))
    # Every good row stored once; every hostile element stored once (with its id) or dead-lettered.
    assert {i: n for i, n in stored.items() if i < first_id} == {i: 1 for i in range(good)}
    assert set(stored) - set(range(good)) <= hostile_ids and all(n == 1 for n in stored.values())
    assert len(stored) - good + len(letters) == len(recipes)
    _check_unencodable_letters(letters)
    for letter in letters:
        assert (" raised while encoding (at $" in letter.message
                or letter.message.startswith(("Type is not JSON serializable: ", "int with more digits"))), letter.message
    assert counters["elements_in"] == good + len(recipes)
    assert counters.get("dead_letters", 0) == len(letters)


# -- every documented value type, stored with its documented spelling ------------------


class Color(enum.Enum):
    RED = "red"


# column -> (value, a seed value that gives the column its type, the value stored)
# Text columns store the exact text sent: the spelling itself is checked.
VALUE_TYPES = {
    "pd_timestamp_ns": (lambda: pd.Timestamp("2024-01-02 03:04:05.123456789"), "text", "2024-01-02T03:04:05.123456789Z"),
    "pd_timestamp_tz": (lambda: pd.Timestamp("2024-07-02 03:04:05.5", tz="Europe/Madrid"), "text", "2024-07-02T01:04:05.500000Z"),
    "pd_nat": (lambda: pd.NaT, "text", None),
    "pd_na": (lambda: pd.NA, 1, None),
    "pd_timedelta": (lambda: pd.Timedelta("1 day 2 ns"), 0.5, 86400.000000002),
    "timedelta": (lambda: datetime.timedelta(minutes=1, microseconds=500), 0.5, 60.0005),
    "np_int64": (lambda: np.int64(-7), 1, -7),
    "np_uint64": (lambda: np.uint64(2**63 - 1), 1, 2**63 - 1),
    "np_float32": (lambda: np.float32(0.5), 0.5, 0.5),
    "np_float_nan": (lambda: np.float64("nan"), 0.5, None),
    "np_bool": (lambda: np.bool_(True), True, True),
    "np_str": (lambda: np.str_("caf\u00e9"), "text", "caf\u00e9"),
    "np_array": (lambda: np.array([3, 1, 2]), [1], [3, 1, 2]),
    "np_datetime64_ns": (lambda: np.datetime64("2024-03-04T05:06:07.123456789", "ns"), "text", "2024-03-04T05:06:07.123456789Z"),
    "np_datetime64_s": (lambda: np.datetime64("2024-03-04T05:06:07", "s"), "text", "2024-03-04T05:06:07Z"),
    "np_datetime64_day": (lambda: np.datetime64("2024-03-04", "D"), "text", "2024-03-04"),
    "np_datetime64_nat": (lambda: np.datetime64("NaT", "ns"), "text", None),
    "np_datetime64_array": (
        lambda: np.array(["2024-01-02T03:04:05", "2024-01-03"], dtype="datetime64[s]"), ["text"],
        ["2024-01-02T03:04:05Z", "2024-01-03T00:00:00Z"]),
    "np_timedelta64_ms": (lambda: np.timedelta64(1500, "ms"), 0.5, 1.5),
    "np_timedelta64_week": (lambda: np.timedelta64(1, "W"), 0.5, 604800.0),
    "np_timedelta64_nat": (lambda: np.timedelta64("NaT", "ns"), 0.5, None),
    "set_of_ints": (lambda: {3, 1, 2}, [1], [1, 2, 3]),
    "decimal_nan": (lambda: decimal.Decimal("NaN"), 0.5, None),
    "decimal_infinity": (lambda: decimal.Decimal("-Infinity"), 0.5, None),
    "decimal": (lambda: decimal.Decimal("12.50"), 0.5, 12.5),
    "decimal_subclass": (lambda: Money("12.50"), 0.5, 12.5),
    "enum": (lambda: Color.RED, "text", "red"),
    "bytes": (lambda: b"\x00\xff", "text", "AP8="),
    "bytearray": (lambda: bytearray(b"ok"), "text", "b2s="),
}
_COLUMNS = sorted(VALUE_TYPES)
_ValueTuple = typing.NamedTuple("_ValueTuple", [("id", int), *((c, object) for c in _COLUMNS)])
_ValueRecord = dataclasses.make_dataclass("_ValueRecord", [("id", int), *((c, object) for c in _COLUMNS)])
_ValueRecord.__module__ = __name__  # so that Beam can pickle it by name


def _value_element(shape: str):
    values = {column: make() for column, (make, _, _) in VALUE_TYPES.items()}
    row_id = {"dict": 1, "row": 2, "named_tuple": 3, "dataclass": 4}[shape]
    if shape == "dict":
        return {"id": row_id, **values}
    if shape == "row":
        return Row(id=row_id, **values)
    if shape == "named_tuple":
        return _ValueTuple(id=row_id, **values)
    return _ValueRecord(id=row_id, **values)


def test_every_value_type_is_stored_with_its_documented_spelling(small_server, tmp_path):
    server, datasource = small_server, "value_types"
    seed = {"id": -1, **{column: seed for column, (_, seed, _) in VALUE_TYPES.items()}}
    body = orjson.dumps(seed) + b'\n{"id": -2}\n'
    response = requests.post(f"{server.url}/v0/events?name={datasource}&wait=true", data=body,
                             headers={"Authorization": f"Bearer {server.token}"}, timeout=10)
    assert response.json() == {"successful_rows": 2, "quarantined_rows": 0}
    dead_dir = tmp_path / "dlq"

    counters, _ = run(lambda p: (
        p | beam.Create(["dict", "row", "named_tuple", "dataclass"], reshuffle=False)
          | "MakeElements" >> beam.Map(_value_element)
          | sink(server, datasource, wait=True, dead_letter_path=f"{dead_dir}/")))

    assert dead_letters_in(dead_dir) == [] and counters["rows_acknowledged"] == 4
    assert server.query(f"SELECT count(*) AS n FROM {datasource}_quarantine") == [{"n": 0}]
    rows = server.query(f"SELECT * FROM {datasource} WHERE id > 0 ORDER BY id")
    assert [row["id"] for row in rows] == [1, 2, 3, 4]
    expected = {column: stored for column, (_, _, stored) in VALUE_TYPES.items()}
    for row in rows:
        got = {column: _listed(row[column]) if isinstance(expected[column], list) else row[column]
               for column in _COLUMNS}
        assert got == expected, (row["id"], {c: (got[c], expected[c]) for c in _COLUMNS if got[c] != expected[c]})
