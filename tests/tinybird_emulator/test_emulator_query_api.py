"""/v0/sql formats and types, the quarantine data source's columns, the CLI's append jobs."""

from __future__ import annotations

import json
import time

import pytest
import requests
from emulator_testlib import assert_error, assert_ok

ROWS = (
    b'{"id": 1, "name": "a\\tb", "at": "2024-05-01 10:00:00", "tags": ["x", "it\'s"], "ok": true, "score": 1.5}\n'
    b'{"id": 2, "name": "c,\\"d\\"", "at": "2024-05-02 10:00:00", "tags": [], "ok": false, "score": null}\n'
)


@pytest.fixture
def loaded(client, ds):
    assert_ok(client.post(ds, ROWS), 200, 2)
    return ds


def _sql(client, q: str) -> requests.Response:
    return client.session.get(
        f"{client.server.url}/v0/sql", params={"q": q}, headers={"Authorization": f"Bearer {client.server.token}"}
    )


def test_json_meta_types_come_from_the_schema(client, loaded):
    answer = _sql(client, f"SELECT * FROM (SELECT * FROM {loaded}) LIMIT 1 FORMAT JSON").json()
    assert answer["meta"] == [
        {"name": "id", "type": "Int64"},
        {"name": "name", "type": "String"},
        {"name": "at", "type": "DateTime"},
        {"name": "tags", "type": "Array(String)"},
        {"name": "ok", "type": "Bool"},
        {"name": "score", "type": "Nullable(Float64)"},
    ]
    assert answer["data"] == [
        {"id": 1, "name": "a\tb", "at": "2024-05-01 10:00:00", "tags": ["x", "it's"], "ok": True, "score": 1.5}
    ]
    assert answer["rows"] == 1 and answer["rows_before_limit_at_least"] == 2
    assert answer["statistics"]["rows_read"] == 2
    assert answer["statistics"]["bytes_read"] == len(ROWS)


def test_count_is_uint64_and_aliases_keep_their_column_type(client, loaded):
    answer = _sql(client, f"SELECT count() AS n, count(*), max(id) AS top, at AS day FROM {loaded} GROUP BY at").json()
    assert answer["meta"] == [
        {"name": "n", "type": "UInt64"},
        {"name": "count(*)", "type": "UInt64"},
        {"name": "top", "type": "Int64"},
        {"name": "day", "type": "DateTime"},
    ]
    assert "rows_before_limit_at_least" not in answer  # no LIMIT, as ClickHouse


@pytest.mark.parametrize(
    ("fmt", "content_type", "body"),
    [
        ("JSONEachRow", "application/x-ndjson",
         '{"id":1,"name":"a\\tb","tags":["x","it\'s"],"ok":true,"score":1.5}\n'
         '{"id":2,"name":"c,\\"d\\"","tags":[],"ok":false,"score":null}\n'),
        ("CSV", "text/csv", "1,\"a\tb\",\"['x','it\\'s']\",true,1.5\n2,\"c,\"\"d\"\"\",\"[]\",false,\\N\n"),
        ("CSVWithNames", "text/csv",
         '"id","name","tags","ok","score"\n' "1,\"a\tb\",\"['x','it\\'s']\",true,1.5\n2,\"c,\"\"d\"\"\",\"[]\",false,\\N\n"),
        ("TSV", "text/tab-separated-values", "1\ta\\tb\t['x','it\\'s']\ttrue\t1.5\n2\tc,\"d\"\t[]\tfalse\t\\N\n"),
        ("TabSeparatedWithNames", "text/tab-separated-values",
         "id\tname\ttags\tok\tscore\n1\ta\\tb\t['x','it\\'s']\ttrue\t1.5\n2\tc,\"d\"\t[]\tfalse\t\\N\n"),
    ],
)
def test_output_formats(client, loaded, fmt, content_type, body):
    response = _sql(client, f"SELECT id, name, tags, ok, score FROM {loaded} ORDER BY id FORMAT {fmt}")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith(content_type)
    assert response.text == body


def test_unknown_format_is_a_clear_400(client, loaded):
    body = assert_error(_sql(client, f"SELECT * FROM {loaded} FORMAT Parquet"), 400, "unknown output format 'Parquet'")
    assert "JSONEachRow" in body["error"] and "TSVWithNames" in body["error"]


def test_quarantine_shows_the_documented_columns_and_types_only(client, ds):
    assert_ok(client.post(ds, b'{"id": 1, "at": "2024-05-01 10:00:00"}\n'), 200, 1)
    assert_ok(client.post(ds, b'{"id": "x", "at": "2024-05-01 10:00:00"}\n'), 200, 0, 1)
    answer = _sql(client, f"SELECT * FROM {ds}_quarantine").json()
    assert answer["meta"] == [
        {"name": "c__error_column", "type": "Array(String)"},
        {"name": "c__error", "type": "Array(String)"},
        {"name": "c__import_id", "type": "Nullable(String)"},
        {"name": "id", "type": "Nullable(String)"},
        {"name": "at", "type": "Nullable(String)"},
        {"name": "insertion_date", "type": "DateTime"},
    ]
    (row,) = answer["data"]
    assert row["c__error_column"] == ["id"] and row["id"] == "x" and row["at"] == "2024-05-01 10:00:00"
    # What the server keeps beside them (the row as received) is not a column, nor readable apart.
    assert_error(_sql(client, f"SELECT c__raw FROM {ds}_quarantine"), 400, "no such column")
    assert_error(_sql(client, f"SELECT * FROM _emulator_quarantine_{ds}"), 403, "may not read")
    assert_error(_sql(client, "SELECT * FROM _emulator_datasources"), 403, "internal")
    assert json.loads(client.server.quarantined_lines(ds)[0]["c__raw"]) == {"id": "x", "at": "2024-05-01 10:00:00"}


def _get(client, path: str, token: str | None = None) -> requests.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return client.session.get(client.server.url + path, headers=headers)


def test_v1_append_answers_a_job_that_reports_the_counts(client, loaded):
    token = client.server.token
    response = client.session.post(
        f"{client.server.url}/v1/datasources/{loaded}/append?format=ndjson",
        data=b'{"id": 3, "name": "e", "at": "2024-05-03 10:00:00", "tags": [], "ok": true, "score": 2}\n'
        b'{"id": "bad", "name": "f", "at": "2024-05-03 10:00:00", "tags": [], "ok": true, "score": 2}\n',
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    assert response.json()["job_url"].endswith(f"/v0/jobs/{job_id}")
    deadline = time.monotonic() + 10
    while (job := _get(client, f"/v0/jobs/{job_id}", token).json())["status"] != "done":
        assert job["status"] == "waiting" and time.monotonic() < deadline
        time.sleep(0.05)
    assert job["blocks"][0]["process_return"][0]["lines"] == 1
    assert job["blocks"][0]["process_return"][0]["quarantine"] == 1
    assert job["datasource"]["name"] == loaded
    assert next(j["id"] for j in _get(client, "/v0/jobs?kind=import", token).json()["jobs"]) == job_id
    assert client.count(loaded) == 3


def test_v1_append_needs_an_existing_data_source_and_a_token(client, ds):
    url = f"{client.server.url}/v1/datasources/{ds}/append"
    assert_error(client.session.post(url, data=b'{"a": 1}\n'), 403, "token")
    assert_error(
        client.session.post(url, data=b'{"a": 1}\n', headers={"Authorization": f"Bearer {client.server.token}"}),
        404,
        "not found",
    )
    assert_error(_get(client, "/v0/jobs/nope", client.server.token), 404, "not found")


def test_workspace_and_tinybird_local_endpoints(client):
    token = client.server.token
    workspace = _get(client, "/v1/workspace", token).json()
    assert workspace["name"] == "tinybird_local" and workspace["id"]
    assert_error(_get(client, "/v1/workspace", "wrong"), 403, "token")
    # tb --local: /tokens (no token, loopback clients only), then workspaces by name.
    assert _get(client, "/tokens").json() == {"user_token": token, "admin_token": token, "workspace_admin_token": token}
    created = client.session.post(f"{client.server.url}/v1/workspaces?name=Build_1&token={token}").json()
    listing = _get(client, f"/v1/user/workspaces?with_organization=true&token={token}").json()
    assert {"id": created["id"], "name": "Build_1", "is_branch": False, "token": token} in listing["workspaces"]
    assert json.dumps(_get(client, "/v0/regions").json()["regions"][0]["api_host"]) == json.dumps(client.server.url)
