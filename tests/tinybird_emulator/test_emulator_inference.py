"""Schema inference (a key at a time, checked against the walk) and the order rows are stored in."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from emulator_testlib import assert_ok
from hypothesis import given, settings
from hypothesis import strategies as st

from tinybird_emulator._schema import _walk, _walk_flat, infer_schema

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["2024-05-01", "2024-05-01 10:00:00", "2024-05-01T10:00:00.123Z", "2024-02-30", "9999-12-31"]),
)


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


def test_a_body_with_misfits_and_invalid_lines_is_stored_in_order(client, ds):
    first = {"n": 0, "at": "2024-05-01 10:00:00.000", "price": 1.5, "tags": ["a"], "ok": True}
    assert_ok(client.post(ds, orjson.dumps(first) + b"\n"), 200, 1)
    lines, expected = [], []
    for n in range(1, 3001):
        event = {"n": n, "at": f"2024-05-{1 + n % 31:02d} 10:00:00.{n % 1000:03d}", "price": n / 4, "tags": [str(n)]}
        event["ok"] = n % 2 == 0
        if n % 500 == 7:
            lines.append(json.dumps(event))  # spaced as json.dumps writes it: stored all the same
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
