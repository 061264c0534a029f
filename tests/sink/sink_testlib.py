"""Helpers of the sink tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence

import orjson
import zstandard

from tinybird_emulator import LocalServer

# FakeTime.wall() = WALL_EPOCH + FakeTime.clock().
WALL_EPOCH = 1_700_000_000.0


def stored_rows(server: LocalServer, datasource: str) -> int:
    """Rows committed in the data source (0 when it does not exist)."""
    server.flush()
    return server.datasources().get(datasource, {}).get("rows", 0)


class FakeTime:
    """A monotonic clock that only moves when ``sleep`` (or ``advance``) is called; records the sleeps.

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

    def advance(self, secs: float) -> None:
        """Moves the clock without a sleep of the code under test: time a server spends, say."""
        with self._lock:
            self._now += secs


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




# -- byte-level scripted server ------------------------------------------------------


class RawRequest:
    """One request as the raw server read it: head, headers, decoded body and its ids."""

    def __init__(self, head: bytes, headers: dict[str, str], body: bytes) -> None:
        self.head = head
        self.headers = headers
        self.body = decoded_body(headers, body)
        self.rows = self.body.count(b"\n")
        self.ids = [orjson.loads(line)["id"] for line in self.body.splitlines() if line]


# A behaviour answers one request on the raw socket; it returns whether the
# connection may carry another request.
Behaviour = Callable[[socket.socket, RawRequest], bool]


class RawServer:
    """A TCP server on 127.0.0.1 that answers HTTP requests byte by byte, as scripted.

    Unlike :class:`ScriptedServer` (a real HTTP server) it can misbehave at the
    byte level: drip bytes, send interim answers, endless or broken bodies,
    malformed header lines. Each request takes the next behaviour of ``script``,
    then ``default`` once the script is empty. Requests are recorded in order,
    with the status line each behaviour began its answer with (``answered``).
    """

    def __init__(self, default: Behaviour, script: Sequence[Behaviour] = ()) -> None:
        self.default = default
        self.script = list(script)
        self.requests: list[RawRequest] = []
        self.answered: list[tuple[RawRequest, int]] = []
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        # accept() wakes up to see that the server stopped (closing a socket does not wake it).
        self._listener.settimeout(0.05)
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped = True
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._thread.join(timeout=5)

    def acknowledged_ids(self, statuses: Iterable[int] = range(200, 300)) -> list[int]:
        """Ids of the requests whose answer began with one of ``statuses``."""
        wanted = set(statuses)
        with self._lock:
            return [i for request, status in self.answered if status in wanted for i in request.ids]

    def mark(self, request: RawRequest, status: int) -> None:
        with self._lock:
            self.answered.append((request, status))

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while not self._stopped:
                request = _read_request(reader)
                if request is None:
                    return
                with self._lock:
                    self.requests.append(request)
                    behaviour = self.script.pop(0) if self.script else self.default
                if not behaviour(conn, request):
                    return
        except OSError:
            return  # the client went away (what a hostile answer often makes it do)
        finally:
            try:
                conn.close()
            except OSError:
                pass


def _read_request(reader) -> RawRequest | None:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline(65537)
        if not line:
            return None
        head += line
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, value = line.split(b":", 1)
            headers[name.decode("latin-1").strip()] = value.decode("latin-1").strip()
    length = int({k.lower(): v for k, v in headers.items()}.get("content-length", "0"))
    return RawRequest(head, headers, reader.read(length))


def counts_body(request: RawRequest, *, successful: int | None = None, quarantined: int = 0) -> bytes:
    successful = request.rows - quarantined if successful is None else successful
    return b'{"successful_rows":%d,"quarantined_rows":%d}' % (successful, quarantined)


def answer(status: int, body: bytes = b"", *, headers: Sequence[tuple[str, str]] = (), server: RawServer | None = None,
           interim: bytes = b"", length: int | None = None, close: bool = False) -> Behaviour:
    """A behaviour that sends one whole answer (after ``interim`` bytes, e.g. a 103)."""

    def behave(conn: socket.socket, request: RawRequest) -> bool:
        if server is not None:
            server.mark(request, status)
        lines = [f"HTTP/1.1 {status} X".encode()]
        lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
        lines.append(b"Content-Length: %d" % (len(body) if length is None else length))
        if close:
            lines.append(b"Connection: close")
        conn.sendall(interim + b"\r\n".join(lines) + b"\r\n\r\n" + body)
        return not close

    return behave


def counted(server: RawServer, status: int = 202, **kwargs) -> Behaviour:
    """A well-behaved answer: ``status`` with the counts of every row of the request."""

    def behave(conn: socket.socket, request: RawRequest) -> bool:
        return answer(status, counts_body(request), server=server, **kwargs)(conn, request)

    return behave
