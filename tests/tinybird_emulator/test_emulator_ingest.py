"""Ingestion: statuses 200/202, bodies, encodings, auth forms, schema inference, quarantine."""

from __future__ import annotations

import gzip
import json
import os
import re

import pytest
import zstandard
from emulator_testlib import RATE_HEADERS, assert_error, assert_ok

from tinybird_emulator._storage import DB_FILE, ReadOnlyDatabase

pytestmark = pytest.mark.timeout(60)

ROW = {"date": "2020-04-05 00:05:38", "city": "Chicago", "n": 1}


def ndjson(*rows: dict) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def test_wait_true_answers_200_with_counts_and_rows_are_committed(client, ds):
    response = client.post(ds, ndjson(ROW, {**ROW, "n": 2}), wait=True)
    assert_ok(response, 200, 2)
    assert response.headers["Content-Type"].startswith("application/json")
    assert client.server.query(f"SELECT city, n FROM {ds} ORDER BY n") == [
        {"city": "Chicago", "n": 1},
        {"city": "Chicago", "n": 2},
    ]


def test_wait_false_and_default_answer_202(client, ds):
    assert_ok(client.post(ds, ndjson(ROW), wait=False), 202, 1)
    assert_ok(client.post(ds, ndjson(ROW), wait=False, params={"wait": "false"}), 202, 1)
    client.server.flush()
    assert client.count(ds) == 2


def test_rate_limit_headers_on_success(client, ds):
    response = client.post(ds, ndjson(ROW))
    assert response.status_code == 200
    # The session server has no request limit: the reported limit is a large sentinel.
    assert int(response.headers["X-RateLimit-Limit"]) == 1_000_000_000
    assert int(response.headers["X-RateLimit-Remaining"]) == 1_000_000_000 - 1
    assert int(response.headers["X-RateLimit-Reset"]) in (0, 1)
    assert "Retry-After" not in response.headers


def test_ndjson_without_trailing_newline_with_crlf_and_blank_lines(client, ds):
    body = b'{"a": 1}\r\n\r\n{"a": 2}\n\n{"a": 3}'
    assert_ok(client.post(ds, body), 200, 3)
    assert [r["a"] for r in client.server.query(f"SELECT a FROM {ds} ORDER BY a")] == [1, 2, 3]


def test_single_pretty_printed_json_object(client, ds):
    body = json.dumps({"date": "2020-04-05 00:05:38", "city": "Chicago"}, indent=4)
    assert "\n" in body
    assert_ok(client.post(ds, body, params={"format": "json"}), 200, 1)
    # Without format=json, a multi-line single document is recognised too.
    assert_ok(client.post(ds, body), 200, 1)
    assert client.server.query(f"SELECT city FROM {ds}") == [{"city": "Chicago"}] * 2


def test_format_ndjson_explicit(client, ds):
    assert_ok(client.post(ds, ndjson(ROW, ROW), params={"format": "ndjson"}), 200, 2)


def test_unknown_format_is_400(client, ds):
    assert_error(client.post(ds, ndjson(ROW), params={"format": "csv"}), 400, "format")


def test_gzip_body(client, ds):
    body = gzip.compress(ndjson(*[{**ROW, "n": i} for i in range(100)]))
    assert_ok(client.post(ds, body, headers={"Content-Encoding": "gzip"}), 200, 100)
    assert client.server.query(f"SELECT sum(n) AS s FROM {ds}") == [{"s": sum(range(100))}]


def test_concatenated_gzip_members(client, ds):
    body = gzip.compress(ndjson({"a": 1})) + gzip.compress(ndjson({"a": 2}))
    assert_ok(client.post(ds, body, headers={"Content-Encoding": "gzip"}), 200, 2)


def test_zstd_body_single_and_multi_frame(client, ds):
    cctx = zstandard.ZstdCompressor()
    assert_ok(client.post(ds, cctx.compress(ndjson(ROW)), headers={"Content-Encoding": "zstd"}), 200, 1)
    two_frames = cctx.compress(ndjson(ROW)) + cctx.compress(ndjson(ROW, ROW))
    assert_ok(client.post(ds, two_frames, headers={"Content-Encoding": "zstd"}), 200, 3)
    # A streamed frame has no content size in its header.
    streamed = cctx.compressobj().compress(ndjson(ROW)) + b""
    obj = cctx.compressobj()
    streamed = obj.compress(ndjson(ROW)) + obj.flush()
    assert_ok(client.post(ds, streamed, headers={"Content-Encoding": "zstd"}), 200, 1)
    assert client.count(ds) == 5


def test_token_in_query_string(client, ds):
    response = client.post(ds, ndjson(ROW), token=None, params={"token": client.server.token})
    assert_ok(response, 200, 1)


def test_schema_inference_types_and_jsonpaths(client, ds):
    rows = [
        {
            "i": 1,
            "f": 1.5,
            "s": "x",
            "b": True,
            "dt": "2020-04-05 00:05:38",
            "iso": "2022-10-27T11:43:02Z",
            "dt64": "2022-10-27T11:43:02.099Z",
            "d": "2020-04-05",
            "ai": [1, 2],
            "af": [1.5, 2],
            "as": ["a"],
            "purchase": {"datetime": "2020-04-05 00:05:38", "item": {"price": 10}},
            "maybe": None,
            "mixed_num": 1,
            "sometimes": "here",
        },
        {
            "i": 2,
            "f": 2,
            "s": "y",
            "b": False,
            "dt": "2020-04-05 00:05:39",
            "iso": "2022-10-27T11:43:03+02:00",
            "dt64": "2022-10-27 11:43:02.5",
            "d": "2020-04-06",
            "ai": [],
            "af": [],
            "as": [],
            "purchase": {"datetime": "2020-04-05 00:05:40", "item": {"price": 11}},
            "maybe": 3,
            "mixed_num": 2.5,
        },
    ]
    assert_ok(client.post(ds, ndjson(*rows)), 200, 2)
    columns = {c["name"]: c for c in client.server.datasources()[ds]["columns"]}
    assert {name: c["type"] for name, c in columns.items()} == {
        "i": "Int64",
        "f": "Float64",
        "s": "String",
        "b": "Bool",
        "dt": "DateTime",
        "iso": "DateTime",
        "dt64": "DateTime64",
        "d": "Date",
        "ai": "Array(Int64)",
        "af": "Array(Float64)",
        "as": "Array(String)",
        "purchase_datetime": "DateTime",
        "purchase_item_price": "Int64",
        "maybe": "Nullable(Int64)",
        "mixed_num": "Float64",
        "sometimes": "Nullable(String)",
    }
    assert columns["purchase_datetime"]["jsonpath"] == "$.purchase.datetime"
    assert columns["purchase_item_price"]["jsonpath"] == "$.purchase.item.price"
    stored = client.server.query(f"SELECT * FROM {ds} ORDER BY i")
    assert stored[0] == {
        "i": 1, "f": 1.5, "s": "x", "b": True, "dt": "2020-04-05 00:05:38", "iso": "2022-10-27 11:43:02",
        "dt64": "2022-10-27 11:43:02.099", "d": "2020-04-05", "ai": [1, 2], "af": [1.5, 2], "as": ["a"],
        "purchase_datetime": "2020-04-05 00:05:38", "purchase_item_price": 10, "maybe": None,
        "mixed_num": 1.0, "sometimes": "here",
    }
    # ISO 8601 with an offset is stored in UTC.
    assert stored[1]["iso"] == "2022-10-27 09:43:03"
    assert stored[1]["dt64"] == "2022-10-27 11:43:02.500"
    assert stored[1]["sometimes"] is None
    assert stored[1]["b"] is False


def test_keys_that_are_not_identifiers(client, ds):
    assert_ok(client.post(ds, ndjson({"user-id": 7, "a b": "x", "1st": True})), 200, 1)
    columns = {c["name"]: c for c in client.server.datasources()[ds]["columns"]}
    assert columns["user_id"]["jsonpath"] == "$['user-id']"
    assert columns["a_b"]["type"] == "String"
    assert columns["_1st"]["type"] == "Bool"
    assert client.server.query(f"SELECT user_id, a_b, _1st FROM {ds}") == [{"user_id": 7, "a_b": "x", "_1st": 1}]


def test_unknown_fields_are_ignored(client, ds):
    assert_ok(client.post(ds, ndjson({"a": 1})), 200, 1)
    assert_ok(client.post(ds, ndjson({"a": 2, "extra": "ignored", "nested": {"x": 1}})), 200, 1)
    assert [c["name"] for c in client.server.datasources()[ds]["columns"]] == ["a"]
    assert client.count(ds) == 2


def test_misfits_go_to_quarantine_with_errors_and_raw_values(client, ds):
    assert_ok(client.post(ds, ndjson({"id": 1, "name": "a", "when": "2020-04-05 00:05:38", "tags": [1]})), 200, 1)
    body = (
        ndjson({"id": "not-a-number", "name": "b", "when": "2020-04-05 00:05:38", "tags": [2]})
        + b'{"id": 3, "name": \n'  # invalid JSON line
        + ndjson({"name": "c", "when": "2020-04-05 00:05:38", "tags": []})  # missing id
        + ndjson({"id": 4, "name": "d", "when": "yesterday", "tags": ["x"]})  # bad DateTime, bad Array(Int64)
        + ndjson({"id": 5, "name": "e", "when": "2020-04-05 00:05:38", "tags": [5]})
        + b"[1, 2]\n"  # valid JSON, not an object
    )
    response = client.post(ds, body)
    assert_ok(response, 200, 1, 5)
    assert client.count(ds) == 2
    q = client.quarantined(ds)
    assert len(q) == 5
    by_raw = {row["c__raw"]: row for row in q}
    first = q[0]
    assert first["c__error_column"] == ["id"]
    assert first["id"] == "not-a-number" and first["name"] == "b"
    assert "Int64" in first["c__error"][0]
    assert len(first["c__import_id"]) == 32
    assert len(first["insertion_date"]) == 19
    missing = next(r for r in q if r["name"] == "c")
    assert missing["c__error_column"] == ["id"]
    assert "missing" in missing["c__error"][0]
    two = next(r for r in q if r["name"] == "d")
    assert two["c__error_column"] == ["when", "tags"]
    assert two["when"] == "yesterday" and two["tags"] == '["x"]'
    assert len(two["c__error"]) == 2
    invalid = by_raw['{"id": 3, "name": ']
    assert invalid["c__error_column"] == [] and invalid["c__error"][0].startswith("invalid JSON")
    assert invalid["id"] is None
    not_object = by_raw["[1, 2]"]
    assert "JSON object" in not_object["c__error"][0]
    # Every quarantined row of one request shares its import id.
    assert len({r["c__import_id"] for r in q}) == 1
    info = client.server.datasources()[ds]
    assert (info["rows"], info["quarantined"]) == (2, 5)


def test_null_in_non_nullable_column_is_quarantined(client, ds):
    assert_ok(client.post(ds, ndjson({"a": 1, "b": None})), 200, 1)
    assert_ok(client.post(ds, ndjson({"a": None, "b": None}, {"a": 2, "b": 7})), 200, 1, 1)
    q = client.quarantined(ds)
    assert q[0]["c__error_column"] == ["a"]
    assert "null" in q[0]["c__error"][0]
    assert client.server.query(f"SELECT a, b FROM {ds} ORDER BY rowid") == [{"a": 1, "b": None}, {"a": 2, "b": "7"}]
    # A column that was always null in the first batch is a Nullable(String).
    assert client.server.datasources()[ds]["columns"][1]["type"] == "Nullable(String)"


def test_202_counts_invalid_lines_as_quarantined(client, ds):
    assert_ok(client.post(ds, ndjson({"a": 1})), 200, 1)
    response = client.post(ds, b'{"a": 2}\nnope\n', wait=False)
    assert_ok(response, 202, 1, 1)
    client.server.flush()
    assert client.count(ds) == 2
    assert len(client.quarantined(ds)) == 1


def test_first_batch_of_only_invalid_lines_creates_nothing(client, ds):
    assert_error(client.post(ds, b"nope\nnot json either\n"), 400, "no valid JSON object")
    assert ds not in client.server.datasources()


def test_first_batch_with_nothing_to_infer(client, ds):
    assert_error(client.post(ds, b"{}\n"), 400, "no column")


def test_a_first_request_refused_before_storing_does_not_decide_the_schema(client, ds):
    client.server.set_faults([{"status": 503, "when": "before", "datasource": ds, "times": 1}])
    assert_error(client.post(ds, ndjson({"a": 1})), 503)
    assert_ok(client.post(ds, ndjson({"a": "x", "b": 2})), 200, 1)
    assert client.server.query(f"SELECT a, b FROM {ds}") == [{"a": "x", "b": 2}]


def test_datasources_endpoint(client, ds):
    assert_ok(client.post(ds, ndjson({"a": 1, "p": {"q": "x"}})), 200, 1)
    assert_ok(client.post(ds, ndjson({"a": "bad", "p": {"q": "y"}})), 200, 0, 1)
    response = client.session.get(
        f"{client.server.url}/v0/datasources", headers={"Authorization": f"Bearer {client.server.token}"}
    )
    assert response.status_code == 200
    for header in RATE_HEADERS:
        assert header in response.headers
    entry = next(d for d in response.json()["datasources"] if d["name"] == ds)
    assert entry["rows"] == 1 and entry["quarantined_rows"] == 1
    assert [{k: c[k] for k in ("name", "type", "jsonpath", "nullable")} for c in entry["columns"]] == [
        {"name": "a", "type": "Int64", "jsonpath": "$.a", "nullable": False},
        {"name": "p_q", "type": "String", "jsonpath": "$.p.q", "nullable": False},
    ]
    assert entry["statistics"] == {"row_count": 1, "bytes": len(ndjson({"a": 1, "p": {"q": "x"}}))}
    assert entry["updated_at"] >= entry["created_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", entry["updated_at"])
    assert entry["quarantine"] == f"{ds}_quarantine"



def test_datasources_endpoint_and_data_dir_agree_after_a_line_that_is_not_json(client, ds):
    """GET /v0/datasources (the server's memory) and the catalog table (what ``sql
    --data-dir`` and ``datasources --data-dir`` read) give one ``updated_at``."""
    assert_ok(client.post(ds, ndjson({"a": 1})), 200, 1)
    assert_ok(client.post(ds, ndjson({"a": 2}) + b"not json\n"), 200, 1, 1)
    served = next(d for d in client.server._call("GET", "/v0/datasources")["datasources"] if d["name"] == ds)
    on_disk = ReadOnlyDatabase(os.path.join(client.server.data_dir, DB_FILE))
    try:
        stored = next(d for d in on_disk.datasources() if d["name"] == ds)
    finally:
        on_disk.close()
    assert (stored["rows"], stored["quarantined_rows"]) == (served["rows"], served["quarantined_rows"]) == (2, 1)
    assert stored["updated_at"] == served["updated_at"]

def test_sql_endpoint_shape(client, ds):
    assert_ok(client.post(ds, ndjson({"a": 1, "s": "x"}, {"a": 2, "s": "y"})), 200, 2)
    result = client.server.sql(f"SELECT a, s, a * 1.5 AS f FROM {ds} ORDER BY a")
    assert result["meta"] == [
        {"name": "a", "type": "Int64"},
        {"name": "s", "type": "String"},
        {"name": "f", "type": "Float64"},
    ]
    assert result["data"] == [{"a": 1, "s": "x", "f": 1.5}, {"a": 2, "s": "y", "f": 3.0}]
    assert result["rows"] == 2
    assert result["statistics"]["elapsed"] >= 0
    # ClickHouse-style FORMAT JSON suffix is accepted.
    assert client.server.query(f"SELECT count(*) AS n FROM {ds} FORMAT JSON") == [{"n": 2}]


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO {ds} (a) VALUES (5)",
        "DELETE FROM {ds}",
        "DROP TABLE {ds}",
        "UPDATE {ds} SET a = 0",
        "CREATE TABLE x (a)",
        "ATTACH DATABASE '/tmp/x.db' AS x",
        "PRAGMA journal_mode=DELETE",
        "SELECT 1; DELETE FROM {ds}",
        "BEGIN",
        "VACUUM",
    ],
)
def test_sql_refuses_anything_but_reads(client, ds, statement):
    assert_ok(client.post(ds, ndjson({"a": 1})), 200, 1)
    response = client.session.get(
        f"{client.server.url}/v0/sql",
        params={"q": statement.format(ds=ds)},
        headers={"Authorization": f"Bearer {client.server.token}"},
    )
    assert response.status_code in (400, 403), response.text
    assert "error" in response.json()
    assert client.server.query(f"SELECT a FROM {ds}") == [{"a": 1}]


def test_sql_errors(client):
    headers = {"Authorization": f"Bearer {client.server.token}"}
    url = f"{client.server.url}/v0/sql"
    assert_error(client.session.get(url, headers=headers), 400, "q")
    assert_error(client.session.get(url, params={"q": "SELECT * FROM nope"}, headers=headers), 400, "no such table")
    assert_error(client.session.get(url, params={"q": "SELECT 1"}), 403)


def test_sql_post_form(client, ds):
    assert_ok(client.post(ds, ndjson({"a": 1})), 200, 1)
    response = client.session.post(
        f"{client.server.url}/v0/sql",
        data={"q": f"SELECT a FROM {ds}"},
        headers={"Authorization": f"Bearer {client.server.token}"},
    )
    assert response.status_code == 200
    assert response.json()["data"] == [{"a": 1}]


def test_unknown_route_and_method_are_json_errors(client):
    headers = {"Authorization": f"Bearer {client.server.token}"}
    assert_error(client.session.get(f"{client.server.url}/v0/nope", headers=headers), 404)
    assert_error(client.session.get(f"{client.server.url}/v0/events", headers=headers), 405)


# JSON that SQLite's parser takes and orjson refuses: a lone surrogate escape (stored,
# it would make every SELECT of the table fail) and numbers beyond a double.
SQLITE_ONLY_ROWS = [
    (b'{"a": 2, "s": "\\ud800"}', "surrogate"),
    (b'{"a": 2, "s": "x\\uDFFF"}', "surrogate"),
    (b'{"a": 1e999, "s": "y"}', "infinity"),
    (b'{"a": -1E+400, "s": "y"}', "infinity"),
    (b'{"a": ' + b"9" * 400 + b', "s": "y"}', "infinity"),
]


@pytest.mark.parametrize(("row", "error"), SQLITE_ONLY_ROWS)
def test_json_only_sqlite_reads_is_quarantined_whatever_its_neighbours(client, ds, row, error):
    assert_ok(client.post(ds, b'{"a": 1.5, "s": "x"}\n'), 200, 1)
    assert_ok(client.post(ds, row + b"\n"), 200, 0, 1)  # alone
    assert_ok(client.post(ds, b'{"a": 3, "s": "z"}\n' + row + b"\n"), 200, 1, 1)  # next to a good row
    assert_ok(client.post(ds, row + b"\nnope\n"), 200, 0, 2)  # next to a bad line
    # The table stays readable and holds only the good rows.
    assert client.server.query(f"SELECT a, s FROM {ds} ORDER BY rowid") == [
        {"a": 1.5, "s": "x"},
        {"a": 3.0, "s": "z"},
    ]
    q = client.quarantined(ds)
    assert [r["c__raw"] for r in q] == [row.decode(), row.decode(), row.decode(), "nope"]
    assert all(r["c__error"][0].startswith("invalid JSON") and error in r["c__error"][0] for r in q[:3]), q
    assert client.server.datasources()[ds]["quarantined"] == 4


@pytest.mark.parametrize(("row", "error"), SQLITE_ONLY_ROWS[:3])
def test_json_only_sqlite_reads_in_a_first_batch(client, ds, row, error):
    # Like any line that is not JSON: alone it creates nothing, with a good row it is quarantined.
    assert_error(client.post(ds, row + b"\n"), 400, "no valid JSON object")
    assert_ok(client.post(ds, row + b'\n{"a": 3, "s": "z"}\n'), 200, 1, 1)
    assert client.server.query(f"SELECT a, s FROM {ds}") == [{"a": 3, "s": "z"}]
    assert [r["c__raw"] for r in client.quarantined(ds)] == [row.decode()]


def test_a_valid_surrogate_pair_and_large_numbers_are_stored(client, ds):
    assert_ok(client.post(ds, b'{"a": 1.5, "s": "x"}\n'), 200, 1)
    body = b'{"a": 1e308, "s": "\\ud83d\\ude00"}\n{"a": 1e-400, "s": "\\u00e9"}\n'
    assert_ok(client.post(ds, body), 200, 2)
    assert client.server.query(f"SELECT a, s FROM {ds} ORDER BY rowid") == [
        {"a": 1.5, "s": "x"},
        {"a": 1e308, "s": "\U0001f600"},
        {"a": 0.0, "s": "\u00e9"},
    ]


IMPOSSIBLE_DATES = [
    # (DateTime value, Date value, the columns quarantine names)
    ("2021-02-30 10:00:00", "2021-02-28", ["ts"]),  # February 30
    ("2021-04-30 10:00:00", "2021-04-31", ["day"]),  # April 31
    ("2021-01-01 24:00:00", "2021-01-01", ["ts"]),  # hour 24
    ("2021-02-29 00:00:00", "2021-02-29", ["ts", "day"]),  # leap day in a year that has none
    ("2021-02-30T10:00:00+02:00", "2021-01-01", ["ts"]),  # February 30 with a time zone
    ("2021-02-31 10:00:00.123", "2021-01-01", ["ts"]),  # February 31 with a fraction
    ("2021-04-31", "2021-01-01", ["ts"]),  # a date alone in a DateTime column
]


@pytest.mark.parametrize(("ts", "day", "columns"), IMPOSSIBLE_DATES)
def test_impossible_dates_are_quarantined(client, ds, ts, day, columns):
    assert_ok(client.post(ds, ndjson({"id": 1, "ts": "2020-04-05 00:05:38", "day": "2020-04-05"})), 200, 1)
    assert [c["type"] for c in client.server.datasources()[ds]["columns"]] == ["Int64", "DateTime", "Date"]
    assert_ok(client.post(ds, ndjson({"id": 2, "ts": ts, "day": day})), 200, 0, 1)
    assert client.server.query(f"SELECT id FROM {ds}") == [{"id": 1}]
    q = client.quarantined(ds)
    assert [(r["ts"], r["day"], r["c__error_column"]) for r in q] == [(ts, day, columns)]


def test_impossible_dates_in_a_date_column(client, ds):
    assert_ok(client.post(ds, ndjson({"id": 1, "day": "2020-04-05"})), 200, 1)
    assert client.server.datasources()[ds]["columns"][1]["type"] == "Date"
    body = ndjson({"id": 2, "day": "2021-04-31"}, {"id": 3, "day": "2021-02-29"}, {"id": 4, "day": "2021-02-30"})
    assert_ok(client.post(ds, body), 200, 0, 3)
    assert [r["day"] for r in client.quarantined(ds)] == ["2021-04-31", "2021-02-29", "2021-02-30"]


def test_possible_dates_at_the_edges_are_stored(client, ds):
    assert_ok(client.post(ds, ndjson({"id": 1, "ts": "2020-04-05 00:05:38", "day": "2020-04-05"})), 200, 1)
    body = ndjson(
        {"id": 2, "ts": "2024-02-29 23:59:59", "day": "2024-02-29"},
        {"id": 3, "ts": "2021-04-30T00:00:00", "day": "2021-12-31"},
        {"id": 4, "ts": "2021-03-01T01:00:00+02:00", "day": "2000-02-29"},
        {"id": 5, "ts": "2021-01-31", "day": "2021-01-31"},
    )
    assert_ok(client.post(ds, body), 200, 4)
    assert client.server.query(f"SELECT id, ts, day FROM {ds} WHERE id > 1 ORDER BY id") == [
        {"id": 2, "ts": "2024-02-29 23:59:59", "day": "2024-02-29"},
        {"id": 3, "ts": "2021-04-30 00:00:00", "day": "2021-12-31"},
        {"id": 4, "ts": "2021-02-28 23:00:00", "day": "2000-02-29"},
        {"id": 5, "ts": "2021-01-31 00:00:00", "day": "2021-01-31"},
    ]


def test_a_string_holding_nul_is_quarantined_not_cut_short(client, ds):
    assert_ok(client.post(ds, ndjson({"id": 1, "s": "x", "ts": "2020-04-05 00:05:38"})), 200, 1)
    nul_in_string = b'{"id": 2, "s": "a\\u0000b", "ts": "2020-04-05 00:05:38"}'
    nul_after_backslash = b'{"id": 3, "s": "\\\\\\u0000", "ts": "2020-04-05 00:05:38"}'
    nul_in_date = b'{"id": 4, "s": "d", "ts": "2020-04-05 00:05:38\\u0000 and more"}'
    escaped_backslash = b'{"id": 5, "s": "a\\\\u0000b", "ts": "2020-04-05 00:05:38"}'  # text: a\u0000b
    nul_elsewhere = b'{"id": 6, "s": "e", "ts": "2020-04-05 00:05:38", "unknown": "\\u0000"}'
    body = b"\n".join([nul_in_string, nul_after_backslash, nul_in_date, escaped_backslash, nul_elsewhere]) + b"\n"
    assert_ok(client.post(ds, body), 200, 2, 3)
    assert client.server.query(f"SELECT id, s, length(s) AS n FROM {ds} ORDER BY id") == [
        {"id": 1, "s": "x", "n": 1},
        {"id": 5, "s": "a\\u0000b", "n": 8},
        {"id": 6, "s": "e", "n": 1},
    ]
    q = client.quarantined(ds)
    assert [(json.loads(r["c__raw"]), r["c__error_column"]) for r in q] == [
        (json.loads(nul_in_string), ["s"]),
        (json.loads(nul_after_backslash), ["s"]),
        (json.loads(nul_in_date), ["ts"]),
    ]
    assert q[0]["c__error"] == [
        "value of column 's' (String) holds \\u0000 (a NUL character), which the local server cannot store"
    ]


def test_a_string_holding_nul_in_a_first_batch(client, ds):
    body = b'{"id": 1, "s": "a\\u0000b"}\n{"id": 2, "s": "c"}\n'
    assert_ok(client.post(ds, body), 200, 1, 1)
    assert client.server.query(f"SELECT id, s FROM {ds}") == [{"id": 2, "s": "c"}]
    assert [r["c__error_column"] for r in client.quarantined(ds)] == [["s"]]


def test_202_counts_rows_that_do_not_fit_the_schema_as_quarantined(client, ds):
    assert_ok(client.post(ds, ndjson({"id": 1, "ts": "2020-04-05 00:05:38"})), 200, 1)
    body = (
        ndjson({"id": 2, "ts": "2020-04-05 00:05:39"})
        + ndjson({"id": "two", "ts": "2020-04-05 00:05:40"})  # not an Int64
        + ndjson({"id": 4, "ts": "2021-02-30 00:00:00"})  # no such day
        + ndjson({"ts": "2020-04-05 00:05:41"})  # id missing
        + b"nope\n"
    )
    assert_ok(client.post(ds, body, wait=False), 202, 1, 4)
    # The same counts as the answer once committed, and as what is stored.
    assert_ok(client.post(ds, body), 200, 1, 4)
    assert client.server.query(f"SELECT id FROM {ds} ORDER BY rowid") == [{"id": 1}, {"id": 2}, {"id": 2}]
    assert len(client.quarantined(ds)) == 8


def test_202_counts_of_a_first_batch_follow_its_inferred_schema(client, ds):
    body = ndjson({"id": 1, "ts": "2020-04-05 00:05:38"}, {"id": 2, "ts": "2021-02-30 00:00:00"}) + b"nope\n"
    assert_ok(client.post(ds, body, wait=False), 202, 1, 2)
    client.server.flush()
    assert client.server.query(f"SELECT id, ts FROM {ds}") == [{"id": 1, "ts": "2020-04-05 00:05:38"}]
    assert len(client.quarantined(ds)) == 2
