"""Tests of element -> NDJSON line encoding (sinks/tinybird/_encoding.py)."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import math
import pickle
import typing
import uuid

import orjson
import pytest
from apache_beam.pvalue import Row
from apache_beam.utils.timestamp import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.tinybird._encoding import MAX_NESTING_DEPTH, EncodingError, element_repr, encode_element

UTC = datetime.UTC


class Point(typing.NamedTuple):
    x: int
    y: int


class Trip(typing.NamedTuple):
    id: str
    start: Point
    stops: list


@dataclasses.dataclass
class Purchase:
    sku: str
    price: decimal.Decimal
    at: datetime.datetime
    where: Point
    _internal: int = 0


class Color(enum.Enum):
    RED = "red"


class StrKey(enum.StrEnum):
    CITY = "city"


def nested_lists(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


# -- accepted types, exact bytes ----------------------------------------------


@pytest.mark.parametrize(
    "element, expected",
    [
        ({}, b"{}"),
        ({"a": 1, "b": "x", "c": None, "d": True, "e": 1.5}, b'{"a":1,"b":"x","c":null,"d":true,"e":1.5}'),
        ({"nested": {"l": [1, [2, {"k": "v"}]]}}, b'{"nested":{"l":[1,[2,{"k":"v"}]]}}'),
        ({"t": (1, 2)}, b'{"t":[1,2]}'),
        ({"s": "caf\u00e9 \u2603 \U0001f600"}, '{"s":"caf\u00e9 \u2603 \U0001f600"}'.encode()),
        ({"s": 'quote " backslash \\ nl \n cr \r tab \t'}, b'{"s":"quote \\" backslash \\\\ nl \\n cr \\r tab \\t"}'),
        # naive datetime = UTC
        ({"d": datetime.datetime(2024, 1, 2, 3, 4, 5)}, b'{"d":"2024-01-02T03:04:05Z"}'),
        ({"d": datetime.datetime(2024, 1, 2, 3, 4, 5, 123456)}, b'{"d":"2024-01-02T03:04:05.123456Z"}'),
        ({"d": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)}, b'{"d":"2024-01-02T03:04:05Z"}'),
        (
            {"d": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))},
            b'{"d":"2024-01-02T03:04:05+02:00"}',
        ),
        ({"d": datetime.date(2024, 1, 2)}, b'{"d":"2024-01-02"}'),
        ({"t": datetime.time(3, 4, 5)}, b'{"t":"03:04:05"}'),
        ({"t": datetime.time(3, 4, 5, 600)}, b'{"t":"03:04:05.000600"}'),
        ({"t": datetime.time(3, 4, 5, tzinfo=UTC)}, b'{"t":"03:04:05+00:00"}'),
        ({"ts": Timestamp(1.5)}, b'{"ts":"1970-01-01T00:00:01.500000Z"}'),
        ({"p": decimal.Decimal("1.10")}, b'{"p":1.10}'),
        ({"p": decimal.Decimal("-0.000001")}, b'{"p":-0.000001}'),
        ({"p": decimal.Decimal("1E+2")}, b'{"p":1E+2}'),
        ({"p": decimal.Decimal("123456789012345678901234567890.123")}, b'{"p":123456789012345678901234567890.123}'),
        ({"u": uuid.UUID(int=1)}, b'{"u":"00000000-0000-0000-0000-000000000001"}'),
        ({"e": Color.RED}, b'{"e":"red"}'),
        ({"s": {3, 1, 2}}, b'{"s":[1,2,3]}'),
        ({"s": frozenset({"b", "a"})}, b'{"s":["a","b"]}'),
        ({"s": set()}, b'{"s":[]}'),
        ({"i": 2**63 - 1, "j": -(2**63), "k": 2**64 - 1}, b'{"i":9223372036854775807,"j":-9223372036854775808,"k":18446744073709551615}'),
        ({"big": 2**70, "neg": -(2**65)}, b'{"big":1180591620717411303424,"neg":-36893488147419103232}'),
        ({StrKey.CITY: "Madrid"}, b'{"city":"Madrid"}'),
    ],
)
def test_encodes_dicts_exactly(element, expected):
    assert encode_element(element) == expected


def test_unsortable_set_keeps_iteration_order():
    value = {1, "a"}
    assert orjson.loads(encode_element({"s": value})) == {"s": list(value)}


def test_beam_row():
    row = Row(city="Madrid", at=datetime.datetime(2024, 1, 2), inner=Row(n=1))
    assert encode_element(row) == b'{"city":"Madrid","at":"2024-01-02T00:00:00Z","inner":{"n":1}}'


def test_named_tuples_nested():
    trip = Trip(id="t1", start=Point(1, 2), stops=[Point(3, 4)])
    assert encode_element(trip) == b'{"id":"t1","start":{"x":1,"y":2},"stops":[{"x":3,"y":4}]}'


def test_named_tuple_inside_dict():
    assert encode_element({"p": Point(1, 2)}) == b'{"p":{"x":1,"y":2}}'


def test_dataclass_with_nested_values_and_private_field_left_out():
    purchase = Purchase(
        sku="A1", price=decimal.Decimal("9.99"), at=datetime.datetime(2024, 1, 2, tzinfo=UTC), where=Point(1, 2)
    )
    assert encode_element(purchase) == (
        b'{"sku":"A1","price":9.99,"at":"2024-01-02T00:00:00Z","where":{"x":1,"y":2}}'
    )


def test_dataclass_through_slow_path_gives_same_fields():
    # A wide integer forces the slow path; the private field is still left out.
    purchase = Purchase(sku="A1", price=decimal.Decimal("1"), at=datetime.datetime(2024, 1, 2), where=Point(2**70, 0))
    assert encode_element(purchase) == (
        b'{"sku":"A1","price":1,"at":"2024-01-02T00:00:00Z","where":{"x":1180591620717411303424,"y":0}}'
    )


def test_mapping_that_is_not_a_dict():
    import types

    assert encode_element(types.MappingProxyType({"a": 1})) == b'{"a":1}'


def test_numpy_values():
    import numpy as np

    assert encode_element({"i": np.int64(3), "f": np.float32(0.5), "a": np.array([1, 2])}) == b'{"i":3,"f":0.5,"a":[1,2]}'


# -- NaN / Infinity -----------------------------------------------------------


def test_nan_and_infinity_become_null():
    element = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "dnan": decimal.Decimal("NaN"), "dinf": decimal.Decimal("-Infinity")}
    assert encode_element(element) == b'{"nan":null,"inf":null,"ninf":null,"dnan":null,"dinf":null}'


# -- str / bytes holding JSON -------------------------------------------------


def test_compact_bytes_pass_through_unchanged():
    raw = b'{"a": 1, "b": [1, 2],  "c": 123456789012345678901234567890}'
    assert encode_element(raw) == raw


def test_surrounding_whitespace_is_stripped():
    assert encode_element(b'  \t{"a":1}\r\n') == b'{"a":1}'
    assert encode_element('\n{"a":1}\n') == b'{"a":1}'


def test_str_is_utf8_encoded():
    assert encode_element('{"s": "caf\u00e9"}') == '{"s": "caf\u00e9"}'.encode()


def test_bytearray_and_memoryview():
    assert encode_element(bytearray(b'{"a":1}')) == b'{"a":1}'
    assert encode_element(memoryview(b'{"a":1}')) == b'{"a":1}'


def test_pretty_printed_json_is_compacted_losslessly():
    pretty = b'{\n  "a": 1,\r\n  "s": "two  spaces \\n \\" x",\n  "big": 123456789012345678901234567890,\n  "l": [\n    1.50,\n    2\n  ]\n}\n'
    assert encode_element(pretty) == b'{"a":1,"s":"two  spaces \\n \\" x","big":123456789012345678901234567890,"l":[1.50,2]}'


def test_pretty_printed_str_is_compacted():
    assert encode_element('{\n "k" : "v"\n}') == b'{"k":"v"}'


@pytest.mark.parametrize(
    "text, reason",
    [
        (b"[1, 2]", "JSON value is a list, not an object"),
        (b'"x"', "JSON value is a string, not an object"),
        (b"3", "JSON value is a number, not an object"),
        (b"null", "JSON value is null, not an object"),
        (b"true", "JSON value is a boolean, not an object"),
        (b'{"a": 1}\xff', "bytes are not valid UTF-8"),
        (b'{"a": "\xc3"}', "bytes are not valid UTF-8"),
    ],
)
def test_json_text_errors(text, reason):
    with pytest.raises(EncodingError) as info:
        encode_element(text)
    assert info.value.reason == reason
    assert str(info.value) == reason


@pytest.mark.parametrize(
    "text, starts",
    [
        (b"", "invalid JSON: Input is a zero-length, empty document"),
        (b"   ", "invalid JSON: Input is a zero-length, empty document"),
        (b'{"a": NaN}', "invalid JSON: unexpected character"),
        (b'{"a":1}\n{"b":2}', "invalid JSON: unexpected content after document"),
        (b'{"a":1', "invalid JSON: "),
    ],
)
def test_invalid_json_text(text, starts):
    with pytest.raises(EncodingError) as info:
        encode_element(text)
    assert info.value.reason.startswith(starts)


def test_str_with_lone_surrogate():
    with pytest.raises(EncodingError) as info:
        encode_element('{"a": "\ud800"}')
    assert info.value.reason == "str is not valid UTF-8 (lone surrogate)"


# -- errors on Python values --------------------------------------------------

NOT_AN_OBJECT = (
    "element is %s, not a JSON object "
    "(expected a dict, beam.Row, NamedTuple, dataclass, or str/bytes holding one JSON object)"
)


@pytest.mark.parametrize(
    "element, reason",
    [
        ([{"a": 1}], NOT_AN_OBJECT % "a list"),
        (3, NOT_AN_OBJECT % "a number"),
        (None, NOT_AN_OBJECT % "null"),
        ((1, 2), NOT_AN_OBJECT % "a tuple"),
        (object(), NOT_AN_OBJECT % "an object"),
        ({"o": object()}, "Type is not JSON serializable: object (at $.o)"),
        ({"a": {"b": [1, b"raw"]}}, "Type is not JSON serializable: bytes (at $.a.b[1])"),
        ({"p": Point(1, object())}, "Type is not JSON serializable: object (at $.p.y)"),
        ({"td": datetime.timedelta(seconds=1)}, "Type is not JSON serializable: datetime.timedelta (at $.td)"),
        ({1: "a"}, "dict key 1 is int, not str (at $)"),
        ({"x": {(1, 2): "a"}}, "dict key (1, 2) is tuple, not str (at $.x)"),
        ({"x": {None: "a"}}, "dict key None is NoneType, not str (at $.x)"),
        ({"s": "\ud800"}, "str is not valid UTF-8 (lone surrogate) (at $.s)"),
    ],
)
def test_value_errors_name_type_and_place(element, reason):
    with pytest.raises(EncodingError) as info:
        encode_element(element)
    assert info.value.reason == reason


def test_nesting_limit():
    # The dict itself is one level: 253 lists inside make 254 levels, the maximum.
    assert encode_element({"x": nested_lists(MAX_NESTING_DEPTH - 1)}).startswith(b'{"x":[[[')
    with pytest.raises(EncodingError) as info:
        encode_element({"x": nested_lists(MAX_NESTING_DEPTH)})
    assert info.value.reason.startswith("nesting deeper than 254 levels (at $.x[0][0]")


def test_cycle_is_reported_as_nesting():
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with pytest.raises(EncodingError) as info:
        encode_element(cyclic)
    assert info.value.reason.startswith("nesting deeper than 254 levels (at $.self.self")


def test_encoding_error_is_a_value_error_and_pickles():
    error = EncodingError("Type is not JSON serializable: object")
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.reason == "Type is not JSON serializable: object"


# -- element_repr ---------------------------------------------------------------


def test_element_repr_short_and_truncated():
    assert element_repr({"a": 1}) == "{'a': 1}"
    text = element_repr({"k": "x" * 10_000})
    assert len(text) <= 500
    assert text.startswith("{'k': 'xxxx")
    long_bytes = element_repr(b"y" * 1_000_000, limit=100)
    assert len(long_bytes) <= 100
    assert long_bytes.startswith("b'yyyy")


def test_element_repr_never_raises():
    class Broken:
        def __repr__(self):
            raise RuntimeError("no")

    text = element_repr(Broken())
    assert "Broken" in text
    # A silly limit is raised to 16 characters rather than raising.
    tiny = element_repr(object(), limit=-5)
    assert len(tiny) == 16 and tiny.startswith("<ob")


# -- properties -------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_json_dicts_round_trip_on_one_line(d):
    line = encode_element(d)
    assert b"\n" not in line and b"\r" not in line
    assert orjson.loads(line) == d
    # Encoded text is accepted as an element and passed through as it is.
    assert encode_element(line) == line
    assert encode_element(orjson.dumps(d, option=orjson.OPT_INDENT_2)) == line
