"""The counting endpoint answers like /v0/events and counts exactly what arrived, line by line."""

from __future__ import annotations

import gzip
import zlib

import pytest
import requests
import zstandard

from benchmarks._counting_endpoint import CountingEndpoint, line_checksum

_LINES = [b'{"id":%d,"pad":"%s"}' % (i, b"x" * (i % 7)) for i in range(50)]
_BODY = b"".join(line + b"\n" for line in _LINES)


@pytest.fixture(scope="module")
def endpoint():
    with CountingEndpoint() as running:
        yield running


def _post(endpoint, name: str | None, body: bytes, *, encoding: str | None = None, token: str | None = None,
          wait: bool = False) -> requests.Response:
    headers = {"Authorization": f"Bearer {token or endpoint.token}"}
    if encoding:
        headers["Content-Encoding"] = encoding
    query = ("?" + "&".join(p for p in (f"name={name}" if name else "", "wait=true" if wait else "") if p))
    return requests.post(f"{endpoint.url}/v0/events{query}", data=body, headers=headers, timeout=10)


def test_each_encoding_is_decoded_and_answered_like_the_events_api(endpoint):
    compressed = {
        None: _BODY,
        "gzip": gzip.compress(_BODY),
        "zstd": zstandard.ZstdCompressor(level=1).compress(_BODY),
        # A frame that does not state its content size, as a streaming writer makes it.
        "ZSTD": zstandard.ZstdCompressor(write_content_size=False).compress(_BODY),
    }
    for encoding, body in compressed.items():
        response = _post(endpoint, "encodings", body, encoding=encoding)
        assert (response.status_code, response.json()) == (202, {"successful_rows": 50, "quarantined_rows": 0})
    response = _post(endpoint, "encodings", _BODY, wait=True)
    assert (response.status_code, response.json()["successful_rows"]) == (200, 50)
    counts = endpoint.counts()["encodings"]
    assert counts["requests"] == 5 and counts["lines"] == 250
    assert counts["checksum"] == 5 * sum(zlib.crc32(line) for line in _LINES)
    assert counts["raw_bytes"] == 5 * len(_BODY)
    assert counts["by_status"] == {"202": 4, "200": 1}


def test_a_lost_and_a_duplicated_line_keep_the_count_but_not_the_checksum(endpoint):
    expected = line_checksum(_LINES)
    # The last line without its newline still counts.
    _post(endpoint, "exact", _BODY[:-1])
    _post(endpoint, "swapped", b"\n".join([*_LINES[:-1], _LINES[0]]))
    counts = endpoint.counts()
    assert (counts["exact"]["lines"], counts["exact"]["checksum"]) == expected
    assert counts["swapped"]["lines"] == expected[0]
    assert counts["swapped"]["checksum"] != expected[1]


def test_refused_requests_are_answered_and_not_counted(endpoint):
    assert _post(endpoint, "refused", _BODY, token="wrong").status_code == 403
    assert _post(endpoint, "refused", _BODY, encoding="br").json() == {"error": "unsupported Content-Encoding 'br'"}
    bad_gzip = _post(endpoint, "refused", b"not gzip at all", encoding="gzip")
    assert bad_gzip.status_code == 400 and "not valid gzip" in bad_gzip.json()["error"]
    assert _post(endpoint, None, _BODY).status_code == 400
    counts = endpoint.counts()["refused"]
    assert (counts["requests"], counts["lines"], counts["checksum"]) == (0, 0, 0)
    assert counts["by_status"] == {"403": 1, "400": 2}


def test_many_connections_one_request_each(endpoint):
    """Peer (a) opens a connection per event."""
    for line in _LINES:
        with requests.Session() as session:
            response = session.post(f"{endpoint.url}/v0/events?name=one_each", data=line,
                                    headers={"Authorization": f"Bearer {endpoint.token}"}, timeout=10)
            assert response.json()["successful_rows"] == 1
    counts = endpoint.counts()["one_each"]
    assert (counts["lines"], counts["checksum"]) == line_checksum(_LINES)
