"""Rows bound from their parsed values are stored exactly as the schema's SQL stores them.

Each case stores the same body twice, into two tables of the same schema: once
through the SQL over the JSON text (the reference), once as prepared by
``tinybird_emulator._rows`` (bound values, the rest left to the SQL). Table contents (values
and their SQLite types, in order), counts and quarantine rows must be identical.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from emulator_testlib import assert_ok
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinybird_emulator._body import json_array, parse_body
from tinybird_emulator._rows import prepare_rows
from tinybird_emulator._schema import Schema, _walk, _walk_flat, infer_schema
from tinybird_emulator._storage import Store

pytestmark = pytest.mark.timeout(120)

# A first event per type of column, so that the schema has one column of each.
_SCHEMA_EVENT = {
    "i": 1,
    "f": 1.5,
    "b": True,
    "s": "x",
    "d": "2024-05-01",
    "dt": "2024-05-01 10:00:00",
    "dt64": "2024-05-01 10:00:00.123",
    "ai": [1],
    "af": [1.5],
    "ab": [True],
    "as": ["x"],
    "n": {"x": 1, "y": "z"},
    "sel ect": "q",
}
_NULLABLE_EVENT = {"i": None, "s": None, "dt64": None, "as": None}

_EDGE_VALUES: list[Any] = [
    None, True, False, 0, 1, 2, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 0.0, -0.0, 1.0, 1.5, 1e300, 5e-324,
    "", "x", "é", "\u00e9\u4e2d", "a'b", 'a"b', "a\\b", "line\nbreak", "tab\t", "nul\x00", "\x01", "\u2028",
    "2024-05-01", "2024-02-29", "2023-02-29", "2024-04-31", "2024-05-01 10:00:00", "2024-05-01T10:00:00",
    "2024-05-01 10:00:00.123", "2024-05-01T10:00:00.123", "2024-05-01 10:00:00.1", "2024-05-01 10:00:00.123456",
    "2024-05-01 10:00:00Z", "2024-05-01 10:00:00+02:00", "2024-05-01 24:00:00", "2024-05-01 10:00",
    "0999-01-01", "0999-01-01 00:00:00.000", "2024-13-01", "2024-05-01 10:00:00\n", "2024-05-01 10:00:00.999",
    "١٢٣٤-05-01", [], [1, 2], [0], [1.5, 2.25], [1, 1.5], [True, False], ["a", 1, 2.5], ["a", None], [[1]],
    [{"a": 1}], {"a": 1}, {}, {"x": "deep", "y": [1]},
]


def _dup_keys(text: str, key: str, value: Any) -> str:
    """``text`` (an object) with ``key`` written once more, first."""
    return "{" + json.dumps(key) + ":" + json.dumps(value) + "," + text[1:]


_STYLES = ("orjson", "spaced", "ascii", "dup", "crlf", "pad")


def _compact(obj: Any) -> str:
    try:
        return orjson.dumps(obj).decode()
    except TypeError:  # an integer orjson does not write: compact like orjson otherwise
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _write(obj: dict[str, Any], style: str, extra: Any) -> str:
    if style == "orjson":
        return _compact(obj)
    if style == "spaced":
        return json.dumps(obj)
    if style == "ascii":
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    if style == "dup":
        return _dup_keys(_compact(obj), next(iter(obj), "i"), extra)
    if style == "crlf":
        return _compact(obj) + "\r"
    return " " + _compact(obj) + " "


def _rows_of(conn: sqlite3.Connection, table: str, columns: Sequence[str]) -> list[tuple[Any, ...]]:
    picks = ", ".join(f'typeof("{c}"), "{c}"' for c in columns)
    return conn.execute(f'SELECT {picks} FROM "{table}" ORDER BY rowid').fetchall()


def _store_both_ways(tmp_path, schema: Schema, lines: list[str]) -> tuple[int, int]:
    store = Store(str(tmp_path))
    conn = store._connect()
    try:
        reference = dataclasses.replace(schema, name="reference")
        bound = dataclasses.replace(schema, name="bound")
        for stmt in reference.create_statements() + bound.create_statements():
            conn.execute(stmt)
        parsed = parse_body(("\n".join(lines) + "\n").encode(), fmt="ndjson", keep_objects=False)
        conn.execute("BEGIN")
        ok, quarantined = store._insert_json(conn, reference, json_array(parsed.lines), len(parsed.lines), "imp")
        bound_ok, bound_quarantined = 0, []
        for rows in prepare_rows(bound, parsed.lines):
            run_ok, run_quarantined = store._insert_prepared(conn, bound, rows, "imp")
            bound_ok += run_ok
            bound_quarantined += run_quarantined
        conn.executemany(reference.quarantine_insert_statement(), quarantined)
        conn.executemany(bound.quarantine_insert_statement(), bound_quarantined)
        conn.execute("COMMIT")
        names = [c.name for c in schema.columns]
        assert bound_ok == ok
        assert _rows_of(conn, "bound", names) == _rows_of(conn, "reference", names)
        assert _rows_of(conn, "_emulator_quarantine_bound", ["c__error_column", "c__error", "c__raw", *names]) == _rows_of(
            conn, "_emulator_quarantine_reference", ["c__error_column", "c__error", "c__raw", *names]
        )
        assert [row[:2] + row[4:] for row in bound_quarantined] == [row[:2] + row[4:] for row in quarantined]
        return ok, len(quarantined)
    finally:
        conn.close()
        store.close()


def _left_to_sqlite(schema: Schema, lines: list[str]) -> list[tuple[int, int]]:
    """The runs of rows that prepare_rows leaves to the SQL, numbered in the body."""
    runs: list[tuple[int, int]] = []
    offset = 0
    for rows in prepare_rows(schema, lines):
        runs += [(offset + start, offset + end) for start, end, text in rows.segments if text is not None]
        offset += rows.segments[-1][1]
    assert offset == len(lines)
    return runs


@pytest.fixture(scope="module")
def schema() -> Schema:
    second = {k: v for k, v in _SCHEMA_EVENT.items() if k not in _NULLABLE_EVENT} | _NULLABLE_EVENT
    found = infer_schema("t", [_SCHEMA_EVENT, second])
    assert {c.name: c.type for c in found.columns} == {
        "i": "Nullable(Int64)",
        "f": "Float64",
        "b": "Bool",
        "s": "Nullable(String)",
        "d": "Date",
        "dt": "DateTime",
        "dt64": "Nullable(DateTime64)",
        "ai": "Array(Int64)",
        "af": "Array(Float64)",
        "ab": "Array(Bool)",
        "as": "Array(String)",
        "n_x": "Int64",
        "n_y": "String",
        "sel_ect": "String",
    }
    return found


def test_every_edge_value_in_every_column_is_stored_alike(tmp_path, schema):
    lines = []
    for key in _SCHEMA_EVENT:
        for value in _EDGE_VALUES:
            lines.append(orjson.dumps(_SCHEMA_EVENT | {key: value}).decode())
            lines.append(json.dumps(_SCHEMA_EVENT | {key: value}))
        event = dict(_SCHEMA_EVENT)
        del event[key]
        lines.append(orjson.dumps(event).decode())
    for value in _EDGE_VALUES:
        lines.append(orjson.dumps(_SCHEMA_EVENT | {"n": {"x": value, "y": value}}).decode())
    ok, quarantined = _store_both_ways(tmp_path, schema, lines)
    assert ok > 100 and quarantined > 100  # both kinds of rows are exercised


@pytest.mark.parametrize(
    "line,left",
    [
        ('{"i":1,"i":"one","f":1.5,"b":true,"s":"x"}', [(1, 2)]),  # duplicate key: SQLite reads the first
        ('{"i":"one","f":1.5,"b":true,"s":"x","i":1}', [(1, 2)]),
        ('{"\\u0069":1,"f":1.5,"b":true,"s":"x"}', [(1, 2)]),  # escaped key: SQLite does not find "i"
        ('{"i":-0,"f":1E2,"b":true,"s":"x","ai":[-0,1],"af":[2.50]}', [(1, 2)]),
        ('{"i":1,"f":1.5,"b":true,"s":"a\\u0000b"}', [(1, 2)]),
        ('{"i":1,"f":1.5,"b":true,"s":"\\u00e9\\n\\/"}', [(1, 2)]),
        ('{"i":1,"f":1.5,"b":true,"s":"x","n":{"x":1,"x":2}}', [(1, 2)]),
        ('{"i":1,"f":1.5,"b":true,"s":"x","deep":' + '{"a":' * 300 + "1" + "}" * 300 + "}", [(1, 2)]),
        # Only SQLite's parser reads it (infinity): the rows parsed with it go to SQLite.
        ('{"i":1,"f":1e400,"b":true,"s":"x"}', [(0, 3)]),
    ],
)
def test_rows_read_differently_by_sqlite_and_orjson_are_left_to_sqlite(tmp_path, schema, line, left):
    base = orjson.dumps(_SCHEMA_EVENT).decode()
    assert _left_to_sqlite(schema, [base, line, base]) == left
    _store_both_ways(tmp_path, schema, [base, line, base])


def test_rows_are_stored_in_order_around_those_left_to_sqlite(tmp_path, schema):
    lines = [orjson.dumps(_SCHEMA_EVENT | {"i": i, "s": str(i)}).decode() for i in range(2500)]
    for i in (0, 1, 7, 1023, 1024, 1500, 2499):
        lines[i] = json.dumps(_SCHEMA_EVENT | {"i": i, "f": 2.5 if i % 2 else None})
    # Rows are prepared (and stored) about a thousand at a time: a run is cut there.
    assert _left_to_sqlite(schema, lines) == [(0, 2), (7, 8), (1023, 1024), (1024, 1025), (1500, 1501), (2499, 2500)]
    assert _store_both_ways(tmp_path, schema, lines) == (2500 - 3, 3)  # "f" is not Nullable: None misfits


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from([v for v in _EDGE_VALUES if isinstance(v, str)]),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=4), st.dictionaries(st.sampled_from(["x", "y"]), _scalars))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from(sorted(_SCHEMA_EVENT)), _values, max_size=6),
            st.sampled_from(_STYLES),
            _scalars,
        ),
        min_size=1,
        max_size=30,
    )
)
def test_random_bodies_are_stored_alike(tmp_path_factory, schema, events):
    lines = [_write(_SCHEMA_EVENT | changes, style, extra) for changes, style, extra in events]
    _store_both_ways(tmp_path_factory.mktemp("rows"), schema, lines)


# -- inference ---------------------------------------------------------------------


def _walked(objects: Sequence[dict[str, Any]]) -> dict[tuple[str, ...], tuple[Any, ...]]:
    accs: dict[tuple[str, ...], Any] = {}
    for obj in objects:
        _walk(obj, (), accs)
    return {p: (a.kinds, a.seen, a.nulls, a.ignored) for p, a in accs.items()}


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=5, unique=True),
    rows=st.lists(
        st.lists(st.one_of(_scalars, st.lists(_scalars, max_size=3)), min_size=5, max_size=5), min_size=1, max_size=8
    ),
)
def test_inference_a_key_at_a_time_matches_the_walk(keys, rows):
    objects = [dict(zip(keys, row, strict=False)) for row in rows]
    flat = _walk_flat(objects)
    assert flat is not None
    assert list({p: (a.kinds, a.seen, a.nulls, a.ignored) for p, a in flat.items()}.items()) == list(
        _walked(objects).items()
    )


@pytest.mark.parametrize(
    "column",
    [
        ["2024-05-01 10:00:00", "2024-05-01T10:00:00Z", "2024-05-01 10:00:00+02:00"],
        ["2024-05-01 10:00:00.1", "2024-05-01T10:00:00.123456789Z"],
        ["2024-05-01", "2024-13-45"],
        ["2024-05-01", "2024-05-01 10:00:00"],
        ["2024-05-01 10:00:00", "2024-05-01 10:00:00.5"],
        ["2024-05-01 10:00:00", "x"],
        ["2024-05-01 10:00:00", "2024-05-01 10:00:00\n"],  # $ matches before a final line break
        ["2024-05-01 10:00:00\n2024-05-01 10:00:00"],
        ["2024-05-01 10:00:00.123456789+02:00" + "0" * 10],  # longer than 40
        ["١٢٣٤-٠٥-٠١"],  # other digits are digits to \d
        ["", "2024-05-01"],
        ["x", "y"],
    ],
)
def test_inference_of_string_columns_matches_the_walk(column):
    objects = [{"c": value} for value in column * 3]
    assert list({p: (a.kinds, a.seen, a.nulls, a.ignored) for p, a in _walk_flat(objects).items()}.items()) == list(
        _walked(objects).items()
    )


def test_inference_falls_back_to_the_walk_for_nested_or_uneven_objects():
    assert _walk_flat([{"a": 1}, {"b": 1}]) is None
    assert _walk_flat([{"a": {"b": 1}}]) is None
    assert _walk_flat([]) is None
    nested = [{"a": {"b": 1}, "c": "2024-05-01"}, {"c": "x"}]
    assert [c.name for c in infer_schema("t", nested).columns] == ["a_b", "c"]


# -- through the server --------------------------------------------------------------


def test_a_body_mixing_bound_and_checked_rows_is_stored_in_order(client, ds):
    first = {"n": 0, "at": "2024-05-01 10:00:00.000", "price": 1.5, "tags": ["a"], "ok": True}
    assert_ok(client.post(ds, orjson.dumps(first) + b"\n"), 200, 1)
    lines, expected = [], []
    for n in range(1, 3001):  # days 29-31 and the spaced rows are converted one by one
        event = {"n": n, "at": f"2024-05-{1 + n % 31:02d} 10:00:00.{n % 1000:03d}", "price": n / 4, "tags": [str(n)]}
        event["ok"] = n % 2 == 0
        if n % 500 == 7:
            lines.append(json.dumps(event))  # spaced: checked by SQLite, stored all the same
        elif n % 700 == 3:
            event["n"] = "three"  # misfit
            lines.append(orjson.dumps(event).decode())
            continue
        else:
            lines.append(orjson.dumps(event).decode())
        expected.append((n, event["at"], n / 4, [str(n)], event["ok"]))
    lines.insert(1234, "{not json")
    assert_ok(client.post(ds, "\n".join(lines).encode()), 200, 3000 - 5, 5 + 1)
    rows = client.server.query(f"SELECT n, at, price, tags, ok FROM {ds} WHERE n > 0 ORDER BY rowid")
    assert [(r["n"], r["at"], r["price"], r["tags"], r["ok"]) for r in rows] == expected
    quarantined = client.quarantined(ds)
    assert [(q["c__error_column"], q["n"]) for q in quarantined[:5]] == [(["n"], "three")] * 5
    assert quarantined[5]["c__raw"] == "{not json" and quarantined[5]["c__error"][0].startswith("invalid JSON")
