"""A counting ``/v0/events`` endpoint: the benchmark's target when it measures the sink, not a server.

It runs in its own process on 127.0.0.1 and answers like the Events API does
(``Authorization: Bearer``, ``?name=``, ``Content-Encoding`` gzip or zstd, 202, or
200 with ``wait=true``, the body ``{"successful_rows": N, "quarantined_rows": 0}``,
JSON errors), but it neither parses nor stores rows: it reads and decodes each
body, and per data source adds up the lines and the sum of every line's CRC32.
A run sent every event exactly once when both equal what was sent (a lost line
and a duplicated one would leave the count right and the checksum wrong).

Built on the standard library's ``ThreadingHTTPServer`` (a thread per
connection, keep-alive): the work per request is a decode, a split and a CRC32
per line, all in C, so it needs no event loop and no dependency, and spends
about 0.1 us per line (the local Events API server spends about 5 us a row).

    with CountingEndpoint() as endpoint:
        ...  # post to endpoint.url with endpoint.token
        endpoint.counts()["events"]  # {"requests": 1, "lines": 2, "checksum": ..., ...}
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import urllib.request
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import zstandard

__all__ = ["TOKEN_ENV", "CountingEndpoint", "line_checksum", "main"]

TOKEN_ENV = "COUNTING_ENDPOINT_TOKEN"
_READY_PREFIX = "counting endpoint listening on "
_MAX_BODY_BYTES = 100 * 1024 * 1024
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            411: "Length Required", 413: "Payload Too Large"}


def line_checksum(lines: Iterable[bytes]) -> tuple[int, int]:
    """``(lines, sum of each line's CRC32)`` of lines given without their newline."""
    count = checksum = 0
    for line in lines:
        count += 1
        checksum += zlib.crc32(line)
    return count, checksum


def _count(data: bytes) -> tuple[int, int]:
    """Lines in an NDJSON body (a trailing newline is optional) and the sum of their CRC32."""
    if not data:
        return 0, 0
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    # The empty piece after the last newline adds crc32(b"") == 0.
    return lines, sum(map(zlib.crc32, data.split(b"\n")))


class _Tally:
    """Per data source: requests, lines, checksum, bytes on the wire and decoded; answers by status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, dict[str, int]] = {}
        self._statuses: dict[str, dict[str, int]] = {}

    def status(self, name: str, status: int) -> None:
        with self._lock:
            by_status = self._statuses.setdefault(name, {})
            by_status[str(status)] = by_status.get(str(status), 0) + 1

    def add(self, name: str, *, lines: int, checksum: int, wire_bytes: int, raw_bytes: int) -> None:
        with self._lock:
            source = self._sources.setdefault(
                name, {"requests": 0, "lines": 0, "checksum": 0, "wire_bytes": 0, "raw_bytes": 0})
            source["requests"] += 1
            source["lines"] += lines
            source["checksum"] += checksum
            source["wire_bytes"] += wire_bytes
            source["raw_bytes"] += raw_bytes

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            names = set(self._sources) | set(self._statuses)
            return {name: {**self._sources.get(name, {"requests": 0, "lines": 0, "checksum": 0,
                                                      "wire_bytes": 0, "raw_bytes": 0}),
                           "by_status": dict(self._statuses.get(name, {}))}
                    for name in names}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Answers leave in one write; no Nagle delay behind a small body.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: one line per request would cost more than counting it."""

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/_counts":
            self._answer(404, {"error": "not found"})
            return
        self._answer(200, self.server.tally.snapshot())

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        name = (query.get("name") or [""])[0]
        status, answer = self._ingest(url.path, name, query)
        if name:
            self.server.tally.status(name, status)
        self._answer(status, answer)

    def _ingest(self, path: str, name: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return 411, {"error": "a Content-Length is required"}
        if int(length) > _MAX_BODY_BYTES:
            self.close_connection = True
            return 413, {"error": f"the body is over {_MAX_BODY_BYTES} bytes"}
        body = self.rfile.read(int(length))
        if path != "/v0/events":
            return 404, {"error": "not found"}
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            return 403, {"error": "invalid token"}
        if not name:
            return 400, {"error": "the name parameter is required"}
        try:
            data = self._decode(body, self.headers.get("Content-Encoding"))
        except ValueError as error:
            return 400, {"error": str(error)}
        lines, checksum = _count(data)
        self.server.tally.add(name, lines=lines, checksum=checksum, wire_bytes=len(body), raw_bytes=len(data))
        wait = (query.get("wait") or ["false"])[0].lower() == "true"
        return (200 if wait else 202), {"successful_rows": lines, "quarantined_rows": 0}

    @staticmethod
    def _decode(body: bytes, encoding: str | None) -> bytes:
        encoding = (encoding or "").strip().lower()
        if encoding in ("", "identity"):
            return body
        try:
            if encoding == "gzip":
                return zlib.decompress(body, wbits=16 + zlib.MAX_WBITS)
            if encoding == "zstd":
                # A streaming reader: a frame need not state its content size.
                return zstandard.ZstdDecompressor().decompressobj().decompress(body)
        except (zlib.error, zstandard.ZstdError) as error:
            raise ValueError(f"the body is not valid {encoding}: {error}") from None
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")

    def _answer(self, status: int, answer: dict[str, Any]) -> None:
        body = json.dumps(answer).encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                + ("Connection: close\r\n" if self.close_connection else "") + "\r\n")
        self.wfile.write(head.encode("ascii") + body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Peer (a) opens a connection per event.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], token: str) -> None:
        super().__init__(address, _Handler)
        self.token = token
        self.tally = _Tally()


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks._counting_endpoint [--port N]``: serves until stdin closes.

    The token is read from the ``COUNTING_ENDPOINT_TOKEN`` environment variable
    (never from argv, which other local users can read).
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks._counting_endpoint")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    token = os.environ.get(TOKEN_ENV)
    if not token:
        parser.error(f"set {TOKEN_ENV}")
    server = _Server(("127.0.0.1", args.port), token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"{_READY_PREFIX}http://127.0.0.1:{server.server_address[1]}", flush=True)
    # Stops when the parent closes stdin, or dies.
    sys.stdin.read()
    server.shutdown()
    return 0


class CountingEndpoint:
    """The counting endpoint in a subprocess on a free loopback port (a context manager).

    Attributes:
        url: ``http://127.0.0.1:PORT``, once started.
        token: The one token it accepts.
        pid: The subprocess's id, once started.
    """

    def __init__(self, *, startup_timeout_secs: float = 30.0) -> None:
        self.token = secrets.token_urlsafe(24)
        self.url: str | None = None
        self._startup_timeout_secs = startup_timeout_secs
        self._proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"CountingEndpoint(url={self.url!r})"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def __enter__(self) -> CountingEndpoint:
        env = dict(os.environ)
        env[TOKEN_ENV] = self.token
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._counting_endpoint"], cwd=_PROJECT_ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        stdout = self._proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=self._startup_timeout_secs)
        except queue.Empty:
            line = ""
        if not line.startswith(_READY_PREFIX):
            self.__exit__()
            raise RuntimeError(f"the counting endpoint did not start: {line!r}")
        self.url = line[len(_READY_PREFIX):].strip()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per data source: ``requests``, ``lines``, ``checksum``, ``wire_bytes``, ``raw_bytes``,
        ``by_status`` (answers by status, the refused ones included)."""
        # No proxy: the endpoint is on loopback, whatever the environment says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.url}/_counts", timeout=30) as response:
            return json.loads(response.read())


if __name__ == "__main__":
    sys.exit(main())
