"""Tokens and scopes: the Tokens API, append-only and create scopes, READ for /v0/sql."""

from __future__ import annotations

import json
import os

import pytest
from emulator_testlib import assert_error, assert_ok

pytestmark = pytest.mark.timeout(60)

LINE = b'{"a": 1}\n'


def _create(client, name, scopes, token=None):
    return client.session.post(
        f"{client.server.url}/v0/tokens",
        params=[("name", name)] + [("scope", s) for s in scopes],
        headers={"Authorization": f"Bearer {token or client.server.token}"},
    )


def test_tokens_api_returns_token_name_scopes(client, ds):
    response = _create(client, f"tk_{ds}", [f"DATASOURCE:APPEND:{ds}", "DATASOURCE:CREATE"])
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "name", "scopes"}
    assert body["name"] == f"tk_{ds}"
    assert body["scopes"] == sorted([f"DATASOURCE:APPEND:{ds}", "DATASOURCE:CREATE"])
    assert len(body["token"]) > 30
    assert_ok(client.post(ds, LINE, token=body["token"]), 200, 1)


def test_tokens_api_errors(client, ds):
    assert_error(_create(client, f"x_{ds}", ["DATASOURCE:FLY"]), 400, "scope")
    assert_error(_create(client, f"x_{ds}", []), 400, "scope")
    assert_error(_create(client, "", ["DATASOURCE:CREATE"]), 400, "name")
    assert _create(client, f"dup_{ds}", ["DATASOURCE:CREATE"]).status_code == 200
    assert_error(_create(client, f"dup_{ds}", ["DATASOURCE:CREATE"]), 400, "already exists")
    limited = client.server.create_token(f"lim_{ds}", scopes=["DATASOURCE:CREATE"])
    assert_error(_create(client, f"y_{ds}", ["ADMIN"], token=limited), 403, "ADMIN")
    assert_error(_create(client, f"z_{ds}", ["ADMIN"], token="nope"), 403)


def test_append_only_token(client, ds):
    other = ds + "_b"
    assert_ok(client.post(ds, LINE), 200, 1)
    assert_ok(client.post(other, LINE), 200, 1)
    token = client.server.create_token(f"app_{ds}", scopes=[f"DATASOURCE:APPEND:{ds}"])
    assert_ok(client.post(ds, LINE, token=token), 200, 1)
    assert_error(client.post(other, LINE, token=token), 403, "APPEND")
    # Appending only: no data source of its own.
    assert_error(client.post(ds + "_new", LINE, token=token), 403, "does not exist")
    assert ds + "_new" not in client.server.datasources()
    # Nor reading, nor the admin endpoints.
    response = client.session.get(
        f"{client.server.url}/v0/sql", params={"q": f"SELECT * FROM {ds}"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert_error(response, 403, "READ")
    assert client.count(ds) == 2 and client.count(other) == 1


def test_global_append_and_plural_spelling(client, ds):
    assert_ok(client.post(ds, LINE), 200, 1)
    token = client.server.create_token(f"all_{ds}", scopes=["DATASOURCES:APPEND"])
    assert_ok(client.post(ds, LINE, token=token), 200, 1)
    assert_error(client.post(ds + "_new", LINE, token=token), 403, "CREATE")


def test_create_scope_creates_and_appends(client, ds):
    token = client.server.create_token(f"cr_{ds}", scopes=["DATASOURCE:CREATE"])
    assert_ok(client.post(ds, LINE, token=token), 200, 1)
    assert_ok(client.post(ds, LINE, token=token), 200, 1)
    assert client.count(ds) == 2


def test_read_scope_limits_sql_and_datasources(client, ds):
    other = ds + "_hidden"
    assert_ok(client.post(ds, LINE), 200, 1)
    assert_ok(client.post(other, LINE), 200, 1)
    token = client.server.create_token(f"rd_{ds}", scopes=[f"DATASOURCE:READ:{ds}"])
    assert client.server.query(f"SELECT count(*) AS n FROM {ds}", token=token) == [{"n": 1}]
    assert client.server.query(f"SELECT count(*) AS n FROM {ds}_quarantine", token=token) == [{"n": 0}]
    response = client.session.get(
        f"{client.server.url}/v0/sql", params={"q": f"SELECT * FROM {other}"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert_error(response, 403, "may not read")
    response = client.session.get(f"{client.server.url}/v0/datasources", headers={"Authorization": f"Bearer {token}"})
    assert [d["name"] for d in response.json()["datasources"]] == [ds]
    # Reading is not appending.
    assert_error(client.post(ds, LINE, token=token), 403, "APPEND")


def test_tokens_file_holds_no_plain_token(client, ds):
    token = client.server.create_token(f"secret_{ds}", scopes=["DATASOURCE:CREATE"])
    with open(os.path.join(client.server.data_dir, "tokens.json"), encoding="utf-8") as fh:
        text = fh.read()
    assert token not in text
    entry = next(t for t in json.loads(text)["tokens"] if t["name"] == f"secret_{ds}")
    assert entry["scopes"] == ["DATASOURCE:CREATE"] and len(entry["sha256"]) == 64


def test_tokens_never_logged(client, ds):
    token = client.server.create_token(f"log_{ds}", scopes=["DATASOURCE:CREATE"])
    client.post(ds, LINE, token=None, params={"token": token})
    client.post(ds, LINE, token="wrong-token-value")
    with open(client.server.log_path, encoding="utf-8", errors="replace") as fh:
        log = fh.read()
    assert token not in log
    assert client.server.token not in log
    assert "wrong-token-value" not in log


def test_repr_hides_token(server):
    assert server.token not in repr(server)
    assert server.url in repr(server)
