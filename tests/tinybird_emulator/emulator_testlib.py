"""Helpers shared by the local server tests (a unique module name: no clash with other test folders)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import requests
from shared_testlib import TOKEN

from tinybird_emulator import LocalServer

ADMIN_TOKEN = TOKEN
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class EventsClient:
    """Posts to one LocalServer's /v0/events with a keep-alive session."""

    def __init__(self, server: LocalServer) -> None:
        self.server = server
        self.session = requests.Session()

    def post(
        self,
        name: str | None,
        body: bytes | str,
        *,
        wait: bool = True,
        token: str | None = "admin",
        headers: Mapping[str, str] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> requests.Response:
        query: dict[str, Any] = {}
        if name is not None:
            query["name"] = name
        if wait:
            query["wait"] = "true"
        query.update(params or {})
        all_headers = dict(headers or {})
        if token == "admin":
            token = self.server.token
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if isinstance(body, str):
            body = body.encode()
        return self.session.post(
            f"{self.server.url}/v0/events", params=query, data=body, headers=all_headers, timeout=timeout
        )

    def count(self, name: str) -> int:
        return self.server.query(f"SELECT count(*) AS n FROM {name}")[0]["n"]

    def quarantined(self, name: str) -> list:
        """``NAME_quarantine`` in arrival order, each row with ``c__raw`` (the row as
        received, kept by the server but not shown by /v0/sql) added."""
        rows = self.server.query(f"SELECT * FROM {name}_quarantine ORDER BY rowid")
        raws = self.server.quarantined_lines(name)
        assert len(raws) == len(rows)
        for row, raw in zip(rows, raws, strict=False):
            assert (row["c__error_column"], row["c__error"]) == (raw["c__error_column"], raw["c__error"])
            row["c__raw"] = raw["c__raw"]
        return rows


def assert_error(response: requests.Response, status: int, fragment: str = "") -> dict[str, Any]:
    """The response has this status, a JSON {"error": ...} body and the rate-limit headers."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"], body
    assert isinstance(body["error"], str) and body["error"]
    assert fragment.lower() in body["error"].lower(), body
    for header in RATE_HEADERS:
        assert int(response.headers[header]) >= 0, header
    return body


def assert_ok(response: requests.Response, status: int, ok_rows: int, quarantined: int = 0) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.json() == {"successful_rows": ok_rows, "quarantined_rows": quarantined}
    for header in RATE_HEADERS:
        assert int(response.headers[header]) >= 0, header
