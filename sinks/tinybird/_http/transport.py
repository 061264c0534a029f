"""One HTTP attempt, bounded in time and in memory, that never raises.

:meth:`Transport.post` returns a :class:`BoundedResponse` (a final answer whose
body was read up to :data:`MAX_BODY_BYTES` and decoded by us up to the same
cap) or a :class:`TransportFailure`. Every exception of the HTTP stack becomes
one of the two (anything else is a bug, and fails the bundle).

Why the stack is adjusted: ``requests``/urllib3 timeouts bound each socket
operation, not the attempt, so a server that drips one byte at a time keeps a
request alive forever. The sockets made here take, before every send, receive
and TLS handshake, the smaller of their own timeout and what is left of the
attempt's wall-clock deadline (kept per thread while the attempt runs); the
name lookup and the connect also end by that deadline (:class:`_Resolver`). And
``http.client`` takes a ``103 Early Hints`` for the answer and reads a negative
chunk size as "read to the end": its response class here skips interim answers
and refuses negative chunk sizes. Two more: requests never looks for a
redirect (:class:`_NoRedirectSession`), so a 3xx is read within the caps like
any answer; and an answer whose header block the stack refuses keeps the
status it began with (:meth:`_FinalResponse.begin`).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import threading
import time
import types
import urllib.parse
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import requests
import requests.auth
import urllib3
import zstandard
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError
from urllib3.util.ssl_ import create_urllib3_context

from sinks.tinybird._http.outcomes import BoundedResponse, TransportFailure
from sinks.tinybird._http.redaction import Redactor

__all__ = ["MAX_BODY_BYTES", "MESSAGE_CHARS", "Transport"]

_LOG = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
"""Most bytes of a response body read, and most bytes it decodes to (Events API
answers are a few dozen bytes)."""
MESSAGE_CHARS = 1000
"""Longest server message kept (after the token is scrubbed)."""
_HEADER_CHARS = 256
# Only these headers of an answer are kept; everything else the server sends is dropped.
_ALLOWED_HEADERS = (
    "Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
    "Location", "Content-Type", "Content-Encoding", "Content-Length",
)
_READ_CHUNK_BYTES = 16 * 1024
_MAX_INTERIM_ANSWERS = 16
# A socket timeout fires when its time is up, measured in whole milliseconds.
_DEADLINE_SLACK_SECS = 0.005
# Threads that run name lookups, per Transport (see _Resolver).
_LOOKUP_THREADS = 2

# The deadline (time.monotonic()) of the attempt running in this thread, if any,
# the Transport's _Resolver, and the status of the final answer once its status
# line was read (see _FinalResponse.begin).
_ATTEMPT = threading.local()

# Every error the HTTP stack raises for what a server or the network does:
# requests' and urllib3's own, http.client's (a bad status line, a line too
# long, a body cut short), socket and TLS errors, and the ValueError and
# OverflowError of numbers it parses (a chunk size). Anything else is a bug, or
# a worker failure: it fails the bundle, which the runner retries.
_HTTP_STACK_ERRORS = (
    requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
    ValueError, OverflowError,
)


def _arm(sock: socket.socket, op_timeout: float | None) -> None:
    """Sets ``sock``'s timeout to the smaller of ``op_timeout`` and what is left of the attempt."""
    deadline = getattr(_ATTEMPT, "deadline", None)
    if deadline is None:
        socket.socket.settimeout(sock, op_timeout)
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the attempt's deadline passed")
    socket.socket.settimeout(sock, remaining if op_timeout is None else min(op_timeout, remaining))


class _DeadlineSocket(socket.socket):
    """A TCP socket whose every send and receive ends by the attempt's deadline."""

    _op_timeout: float | None = None

    def settimeout(self, value: float | None) -> None:
        self._op_timeout = value
        super().settimeout(value)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        _arm(self, self._op_timeout)
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        _arm(self, self._op_timeout)
        return super().recv(bufsize, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        _arm(self, self._op_timeout)
        return super().send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        # Since Python 3.5 a sendall's timeout bounds the whole call.
        _arm(self, self._op_timeout)
        super().sendall(data, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The TLS counterpart (``SSLContext.sslsocket_class``); its sendall is a loop of sends."""

    _op_timeout: float | None = None

    def settimeout(self, value: float | None) -> None:
        self._op_timeout = value
        super().settimeout(value)

    def do_handshake(self, block: bool = False) -> None:
        # The timeout of one do_handshake call bounds the whole handshake.
        _arm(self, self._op_timeout)
        super().do_handshake(block)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        _arm(self, self._op_timeout)
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        _arm(self, self._op_timeout)
        return super().recv(buflen, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        _arm(self, self._op_timeout)
        return super().send(data, flags)


class _FinalResponse(http.client.HTTPResponse):
    """Skips interim (1xx) answers, refuses negative chunk sizes, and records the final status."""

    def begin(self) -> None:
        try:
            super().begin()
        except (http.client.HTTPException, OSError):
            # The status line came whole (version set) and the header block did not: refused
            # (more than 100 headers, a line over 64 KiB), or cut by the deadline or a reset.
            # The server did answer, so its status decides: a 2xx stored the rows, and
            # resending them would store them twice. Cut before the status line is no answer.
            if self.version in (10, 11):
                _ATTEMPT.status = self.status
            raise
        # Also for what fails after the header block, in urllib3 or requests (two
        # different Content-Length values).
        _ATTEMPT.status = self.status

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(_MAX_INTERIM_ANSWERS):
            version, status, reason = super()._read_status()  # type: ignore[misc]  # private in typeshed
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim answer's headers: read and dropped
        raise http.client.HTTPException(f"more than {_MAX_INTERIM_ANSWERS} interim (1xx) answers")

    def _read_next_chunk_size(self) -> int:
        size = super()._read_next_chunk_size()  # type: ignore[misc]  # private in typeshed
        if size < 0:
            # http.client would read to the end of the stream; the caller turns this into IncompleteRead.
            self._close_conn()  # type: ignore[attr-defined]  # private in typeshed
            raise ValueError(f"negative chunk size {size}")
        return size


def _with_deadlines(sock: socket.socket) -> _DeadlineSocket:
    """The same connected socket, as a :class:`_DeadlineSocket`."""
    timeout = sock.gettimeout()
    wrapped = _DeadlineSocket(sock.family, sock.type, sock.proto, sock.detach())
    wrapped.settimeout(timeout)
    return wrapped


class _Resolver:
    """Name lookups that end by the attempt's deadline.

    ``getaddrinfo`` blocks with no timeout of its own (the system resolver's
    retries can take tens of seconds), and cannot be interrupted: it runs on a
    small pool of threads of its own, and the attempt stops waiting for it at
    its deadline. A hung lookup then holds one of those threads until the
    system gives up; the lookups queued behind it are cancelled when their
    attempt ends, so no request waits past its deadline and no thread is
    added per hung lookup.
    """

    def __init__(self, getaddrinfo: Callable[..., Any] | None) -> None:
        # None: socket.getaddrinfo as it is at each lookup (a test's or a library's patch included).
        self._getaddrinfo = getaddrinfo
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=_LOOKUP_THREADS, thread_name_prefix="tinybird-dns")

    def addresses(self, host: str, port: int, timeout_secs: float) -> list[str]:
        """The host's addresses in the resolver's order (an IP literal as is).

        Raises:
            socket.gaierror: the lookup failed.
            TimeoutError: no answer within ``timeout_secs``.
        """
        try:
            return [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            pass
        future = self._pool.submit(self._getaddrinfo or socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=max(timeout_secs, 0.0))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer to the name lookup within {timeout_secs:.3g} s") from None
        # Order kept, duplicates dropped (one address per family and protocol).
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _connect_by_deadline(conn: HTTPConnection, new_conn: Callable[[], socket.socket]) -> _DeadlineSocket:
    """Resolves the host within what is left of the attempt, then connects to each address in turn,
    each connect bounded by the connect timeout and what is left of the attempt."""
    resolver: _Resolver | None = getattr(_ATTEMPT, "resolver", None)
    deadline: float | None = getattr(_ATTEMPT, "deadline", None)
    if resolver is None or deadline is None:
        return _with_deadlines(new_conn())
    host, connect_timeout = conn._dns_host, conn.timeout
    try:
        addresses = resolver.addresses(host, conn.port or 0, deadline - time.monotonic())
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    except TimeoutError as exc:
        raise ConnectTimeoutError(
            conn, f"name lookup of {conn.host} not done by the attempt's deadline ({exc})") from exc
    last_error: Exception | None = None
    try:
        for address in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # _new_conn connects to _dns_host; TLS still checks the certificate against conn.host.
            conn._dns_host = address
            conn.timeout = remaining if not isinstance(connect_timeout, (int, float)) else min(
                connect_timeout, remaining)
            try:
                return _with_deadlines(new_conn())
            except (ConnectTimeoutError, urllib3.exceptions.NewConnectionError) as exc:
                last_error = exc
    finally:
        conn._dns_host, conn.timeout = host, connect_timeout
    if last_error is not None:
        raise last_error
    raise ConnectTimeoutError(conn, f"no connection to {conn.host} by the attempt's deadline")


class _HTTPConnection(HTTPConnection):
    response_class = _FinalResponse

    def _new_conn(self) -> socket.socket:
        return _connect_by_deadline(self, super()._new_conn)


class _HTTPSConnection(HTTPSConnection):
    response_class = _FinalResponse

    def _new_conn(self) -> socket.socket:
        return _connect_by_deadline(self, super()._new_conn)


class _HTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOL_CLASSES = types.MappingProxyType({"http": _HTTPConnectionPool, "https": _HTTPSConnectionPool})


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter with the pools above (also through a proxy) and a TLS context
    whose sockets keep deadlines. Everything else (proxies from the environment, but
    for a loopback host: see ``_NO_PROXY``; the CA bundle requests picks) is requests' own."""

    def __init__(self, *, pool_maxsize: int) -> None:
        context = create_urllib3_context()
        context.sslsocket_class = _DeadlineSSLSocket
        self._ssl_context = context
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOL_CLASSES)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOL_CLASSES)
        return manager

    def build_connection_pool_key_attributes(self, request: Any, verify: Any, cert: Any = None) -> Any:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if host_params.get("scheme") == "https" and verify is not False:
            # Ours instead of requests' shared one; requests still names the CA bundle to load.
            pool_kwargs["ssl_context"] = self._ssl_context
        return host_params, pool_kwargs


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = (host or "").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Proxies from the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY) are not used for a
# loopback host, as Go's net/http does: the local server is on this machine, and through a
# proxy the token would travel, in clear text for http://, to the proxy's host. requests
# drops the keys set to None after merging the environment's.
_NO_PROXY = types.MappingProxyType({"http": None, "https": None, "all": None})


class _NoRedirectSession(requests.Session):
    """A session that never looks for a redirect: the transport never follows one.

    Even with ``allow_redirects=False``, ``Session.send`` fills ``Response.next``
    by running ``resolve_redirects``, which reads and decodes a 301/302/303/307/308's
    whole body, with no cap and past the attempt's deadline, and parses its
    ``Location`` (raising on one it cannot). With no redirect target, a 3xx is an
    answer like any other: its body is read within the caps and its status decides.
    """

    def get_redirect_target(self, resp: requests.Response) -> None:
        return None


class _BearerAuth(requests.auth.AuthBase):
    """Sets the Authorization header. Passing an auth object also keeps requests
    from replacing it with credentials found in ~/.netrc."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._value
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


class Transport:
    """Posts one request body per call, within a deadline; thread-safe.

    Args:
        url: The full URL posted to.
        headers: Request headers (without Authorization).
        token: Sent in the Authorization header only.
        redactor: Scrubs the token from every text returned.
        connect_timeout_secs: Bound on opening a connection.
        read_timeout_secs: Bound on each wait for bytes of the answer.
        attempt_timeout_secs: Wall-clock bound on the whole attempt: connect,
            TLS handshake, sending, the answer's headers and body.
        ca_bundle_path: CA bundle to verify the server with (else requests' default).
        max_in_flight: Connections kept in the pool.
        getaddrinfo: The name lookup (``socket.getaddrinfo``'s signature), or
            None for ``socket.getaddrinfo``; tests inject one that hangs.
    """

    def __init__(
        self, *, url: str, headers: Mapping[str, str], token: str, redactor: Redactor,
        connect_timeout_secs: float, read_timeout_secs: float, attempt_timeout_secs: float,
        ca_bundle_path: str | None, max_in_flight: int,
        getaddrinfo: Callable[..., Any] | None = None,
    ) -> None:
        self._url = url
        self._api_url = url.split("/v0/", 1)[0]
        # Ask for no content coding: whatever comes is decoded here, within the cap.
        self._headers = {**headers, "Accept-Encoding": "identity"}
        self._auth = _BearerAuth(token)
        self._redactor = redactor
        self._timeout = (min(connect_timeout_secs, attempt_timeout_secs), read_timeout_secs)
        self._attempt_timeout = attempt_timeout_secs
        self._verify: str | bool = ca_bundle_path or True
        # requests' stubs say dict[str, str]; a None value is how requests drops a proxy.
        self._proxies: Any = dict(_NO_PROXY) if is_loopback(urllib.parse.urlsplit(url).hostname) else None
        session = _NoRedirectSession()
        adapter = _DeadlineAdapter(pool_maxsize=max_in_flight)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        self._session: requests.Session | None = session
        self._resolver = _Resolver(getaddrinfo)

    def __repr__(self) -> str:
        return f"Transport(url={self._url!r})"

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()
            self._resolver.close()

    def post(self, body: bytes, url: str | None = None) -> BoundedResponse | TransportFailure:
        """One attempt to ``url`` (default: the transport's; same host): never raises, never
        takes longer than ``attempt_timeout_secs`` (name lookup and connect included),
        never holds more than the caps."""
        session = self._session
        if session is None:
            return TransportFailure(error="closed", message="the client was closed", retryable=False)
        deadline = time.monotonic() + self._attempt_timeout
        _ATTEMPT.deadline = deadline
        _ATTEMPT.resolver = self._resolver
        _ATTEMPT.status = None
        try:
            try:
                response = session.post(
                    url or self._url, data=body, headers=self._headers, auth=self._auth, timeout=self._timeout,
                    verify=self._verify, allow_redirects=False, stream=True, proxies=self._proxies,
                )
            except _HTTP_STACK_ERRORS as exc:
                status: int | None = _ATTEMPT.status
                if status is not None:
                    return self._refused(status, exc, deadline)
                return self._failure(exc, deadline)
            return self._bounded(response, deadline)
        finally:
            _ATTEMPT.deadline = None
            _ATTEMPT.resolver = None
            _ATTEMPT.status = None

    # -- the answer ------------------------------------------------------------------

    def _bounded(self, response: requests.Response, deadline: float) -> BoundedResponse:
        headers = {}
        for name in _ALLOWED_HEADERS:
            value = response.headers.get(name)
            if value is not None:
                headers[name] = self._redactor.bounded(value, _HEADER_CHARS)
        raw = response.raw
        body, body_error, complete = None, None, False
        try:
            data, complete = _read_capped(response)
            # The scrubbed value: lower-cased or cut before scrubbing, an echoed token would get past it.
            encoding = headers.get("Content-Encoding", "").strip().lower()
            if not complete:
                body_error = f"larger than {MAX_BODY_BYTES} bytes"
            else:
                body, body_error = _decode(data, encoding)
        except _HTTP_STACK_ERRORS as exc:  # a broken body: the status still stands
            body_error = self._describe_body_error(exc, deadline)
        finally:
            if not complete:
                # Unread bytes are left: the connection cannot carry another request.
                raw.close()
            raw.release_conn()
        return BoundedResponse(
            status=response.status_code,
            headers=types.MappingProxyType(headers),
            body=body,
            body_error=body_error,
            message=self._message(body, body_error),
        )

    def _message(self, body: bytes | None, body_error: str | None) -> str:
        if body is None:
            return f"(body unreadable: {body_error})"
        text = ""
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            text = parsed["error"]
        else:
            text = body.decode("utf-8", "replace").strip()
        return self._redactor.bounded(text, MESSAGE_CHARS) if text else "(empty body)"

    def _describe_body_error(self, exc: BaseException, deadline: float) -> str:
        if time.monotonic() >= deadline - _DEADLINE_SLACK_SECS:
            return f"not complete within the attempt's deadline of {self._attempt_timeout:g} s"
        return self._redactor.bounded(f"cut short ({_describe(exc)})", MESSAGE_CHARS)

    def _refused(self, status: int, exc: BaseException, deadline: float) -> BoundedResponse:
        """An answer whose status line came whole but whose header block did not (refused by
        the HTTP stack, cut by the deadline or a reset): the status stands (a 2xx was
        stored, a 401 is a rejection), with no headers and no body."""
        if time.monotonic() >= deadline - _DEADLINE_SLACK_SECS:
            why = f"not complete within the attempt's deadline of {self._attempt_timeout:g} s"
        else:
            why = f"refused or cut short ({_describe(exc)})"
        body_error = self._redactor.bounded(f"its headers were {why}", MESSAGE_CHARS)
        return BoundedResponse(status=status, headers=types.MappingProxyType({}), body=None,
                               body_error=body_error, message=self._message(None, body_error))

    # -- no answer -------------------------------------------------------------------

    def _failure(self, exc: BaseException, deadline: float) -> TransportFailure:
        error, message, retryable = self._classify_exception(exc)
        if error == "connect_timeout" and time.monotonic() >= deadline - _DEADLINE_SLACK_SECS:
            # Nothing was sent: a name lookup or connect that the attempt's deadline ended.
            message = (f"no connection within the attempt's deadline of {self._attempt_timeout:g} s: "
                       f"{_describe(exc)}")
        elif error in ("timeout", "connection_error", "protocol_error") and (
                time.monotonic() >= deadline - _DEADLINE_SLACK_SECS):
            error, message = "deadline", (
                f"no complete answer within the attempt's deadline of {self._attempt_timeout:g} s "
                "(the server may have stored the rows)")
        return TransportFailure(error=error, message=self._redactor.bounded(message, MESSAGE_CHARS),
                                retryable=retryable)

    def _classify_exception(self, exc: BaseException) -> tuple[str, str, bool]:
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return "connect_timeout", f"connect timeout after {self._timeout[0]:g} s: {_describe(exc)}", True
        if isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
            return ("timeout", f"read timeout after {self._timeout[1]:g} s (the server may have stored the rows): "
                    f"{_describe(exc)}", True)
        if isinstance(exc, (requests.exceptions.SSLError, ssl.SSLError)):
            if _is_cert_verification_error(exc):
                return ("tls_verification_failed",
                        f"TLS certificate verification failed for {self._api_url}: {_describe(exc)}. "
                        "Set ca_bundle_path to the CA bundle that signs the server's certificate.", False)
            return "connection_error", f"TLS error: {_describe(exc)}", True
        if _in_chain(exc, _is_broken_answer):
            return "protocol_error", f"broken response: {_describe(exc)}", True
        if isinstance(exc, (requests.exceptions.ConnectionError, OSError)):
            return "connection_error", f"connection error: {_describe(exc)}", True
        return "protocol_error", f"broken response: {_describe(exc)}", True


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_capped(response: requests.Response) -> tuple[bytes, bool]:
    """At most MAX_BODY_BYTES + 1 raw bytes (no content decoding); True when the body ended."""
    if getattr(response, "_content_consumed", False):
        # A response hook (the test suite's recorder) already read the body into memory.
        content = response.content or b""
        return content[: MAX_BODY_BYTES + 1], len(content) <= MAX_BODY_BYTES
    raw = response.raw
    chunks: list[bytes] = []
    total = 0
    while total <= MAX_BODY_BYTES:
        chunk = raw.read(min(_READ_CHUNK_BYTES, MAX_BODY_BYTES + 1 - total), decode_content=False)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks), False


def _decode(data: bytes, encoding: str) -> tuple[bytes | None, str | None]:
    """The body decoded to at most MAX_BODY_BYTES, or (None, why not)."""
    if encoding in ("", "identity"):
        return data, None
    try:
        if encoding in ("gzip", "x-gzip", "deflate"):
            # 47: a gzip or zlib header, detected; raw deflate is tried after.
            decoded, finished = _inflate(data, 47)
            if decoded is None and encoding == "deflate":
                decoded, finished = _inflate(data, -15)
        elif encoding == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
            decoded = reader.read(MAX_BODY_BYTES + 1)
            finished = len(decoded) <= MAX_BODY_BYTES
        else:
            return None, f"content encoding {encoding[:40]!r} is not supported"
    except (zlib.error, zstandard.ZstdError) as exc:
        return None, f"{encoding} body that does not decode ({exc})"
    if decoded is None or not finished:
        return None, f"{encoding} body that does not decode to a whole body of at most {MAX_BODY_BYTES} bytes"
    return decoded, None


def _inflate(data: bytes, wbits: int) -> tuple[bytes | None, bool]:
    decompressor = zlib.decompressobj(wbits)
    try:
        decoded = decompressor.decompress(data, MAX_BODY_BYTES + 1)
    except zlib.error:
        return None, False
    return decoded, decompressor.eof and len(decoded) <= MAX_BODY_BYTES


def _is_cert_verification_error(exc: BaseException) -> bool:
    return _in_chain(exc, lambda e: isinstance(e, ssl.SSLCertVerificationError))


def _is_broken_answer(exc: BaseException) -> bool:
    """An answer that is not HTTP (a bad status line, too many headers or interim answers),
    as opposed to a connection that closed (RemoteDisconnected is both)."""
    return isinstance(exc, http.client.HTTPException) and not isinstance(exc, ConnectionError)


def _in_chain(exc: BaseException, predicate: Callable[[BaseException], bool]) -> bool:
    """Whether ``exc`` or an exception it wraps (requests and urllib3 nest them) matches."""
    seen = set()
    stack: list[Any] = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if predicate(current):
            return True
        stack.extend((current.__cause__, current.__context__, getattr(current, "reason", None)))
        stack.extend(current.args)
    return False
