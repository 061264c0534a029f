"""Helpers of the sink tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
import zlib

import zstandard

from tinybird_emulator import LocalServer

# Distinctive, so that a test can search logs, reprs and reports for it.
TOKEN = "p.SECRET-test-token-7f3a9c51d2"


# FakeTime.wall() = WALL_EPOCH + FakeTime.clock().
WALL_EPOCH = 1_700_000_000.0


def stored_rows(server: LocalServer, datasource: str) -> int:
    """Rows committed in the data source (0 when it does not exist)."""
    server.flush()
    return server.datasources().get(datasource, {}).get("rows", 0)


class FakeTime:
    """A monotonic clock that only moves when ``sleep`` is called; records the sleeps.

    With ``real_sleep=True`` it also really sleeps, for tests where the server's
    own clock must move (rate-limit windows).
    """

    def __init__(self, *, start: float = 1000.0, real_sleep: bool = False) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._real_sleep = real_sleep
        self.sleeps: list[float] = []

    def clock(self) -> float:
        with self._lock:
            return self._now

    def wall(self) -> float:
        """An epoch clock that moves with :meth:`clock`."""
        with self._lock:
            return WALL_EPOCH + self._now

    def sleep(self, secs: float) -> None:
        with self._lock:
            self.sleeps.append(secs)
            self._now += secs
        if self._real_sleep:
            time.sleep(secs)


# -- scripted server -------------------------------------------------------------

Response = tuple[int, dict[str, str], bytes]


def decoded_body(headers: dict[str, str], body: bytes) -> bytes:
    """A request body as the sink sent it, decoded (zstd, gzip or none)."""
    encoding = {k.lower(): v for k, v in headers.items()}.get("content-encoding")
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if encoding == "gzip":
        return zlib.decompress(body, wbits=31)
    return body


def counted_answer(headers: dict[str, str], body: bytes) -> Response:
    """A 202 that counts every row of the request, as the Events API answers."""
    rows = decoded_body(headers, body).count(b"\n")
    return 202, {"Content-Type": "application/json"}, b'{"successful_rows":%d,"quarantined_rows":0}' % rows


class ScriptedServer:
    """A threaded HTTP(S) server on 127.0.0.1 that answers POSTs from a script.

    Each request takes the next scripted ``(status, headers, body)``; when the
    script is empty it answers :func:`counted_answer`. Requests are recorded as
    ``(path, headers, body)``.
    """

    def __init__(self, *, certfile: str | None = None, keyfile: str | None = None) -> None:
        self.script: list[Response] = []
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with owner._lock:
                    owner.requests.append((self.path, dict(self.headers.items()), body))
                    status, headers, payload = (
                        owner.script.pop(0) if owner.script else counted_answer(dict(self.headers.items()), body))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.tls = certfile is not None
        if certfile is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile, keyfile)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


