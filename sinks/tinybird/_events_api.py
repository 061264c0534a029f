"""HTTP layer of the sink: one batch of NDJSON lines in, delivered and failed parts out.

:class:`EventsApiClient` posts to the Tinybird Events API with one pooled
``requests.Session``, retries under a :class:`~sinks.tinybird.retry.RetryPolicy`
(the only retry layer), paces every thread of the client on the server's
rate-limit headers, splits a batch answered with 413, and never raises for an
HTTP or network outcome: it returns a :class:`SendReport` instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import ipaddress
import logging
import math
import random
import re
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
import zstandard
from requests.adapters import HTTPAdapter

from sinks.tinybird.dead_letters import DeadLetterKind
from sinks.tinybird.retry import RETRY_AFTER_STATUS_CODES, RetryPolicy

__all__ = [
    "Attempt",
    "ClientSettings",
    "Delivered",
    "EventsApiClient",
    "Failed",
    "SendReport",
]

_LOG = logging.getLogger(__name__)

_DATASOURCE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
_COMPRESSIONS = ("zstd", "gzip", None)
# Measured on this project's machines with 0.25-15 MB batches of typical events
# (zstandard 0.25, zlib): zstd level 1 compressed both faster (~700 MB/s vs
# ~350 MB/s) and smaller (ratio 3.8 vs 3.6) than level 3; gzip level 1 ran at
# ~160 MB/s for a ratio of 3.2, level 6 at ~66 MB/s for 3.6. Encoding runs at
# ~70 MB/s per core, so a slower level would make compression the bottleneck.
DEFAULT_COMPRESSION_LEVELS: Mapping[str, int] = types.MappingProxyType({"zstd": 1, "gzip": 1})
_COMPRESSION_LEVEL_RANGES: Mapping[str, tuple[int, int]] = types.MappingProxyType(
    {"zstd": (1, 22), "gzip": (1, 9)}
)
_MESSAGE_LIMIT_CHARS = 1000
# Above this, an X-RateLimit-Reset value is an epoch time, not a delta (some
# gateways send that; Tinybird sends a delta).
_EPOCH_THRESHOLD_SECS = 1e9
_USER_AGENT = "beam-tinybird"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """Where and how to post; everything but the token and the retry policy.

    Attributes:
        api_url: Base URL of the region's API host, e.g. ``"https://api.tinybird.co"``
            or ``"https://api.us-east.aws.tinybird.co"``. A trailing slash is removed.
        datasource: Target data source (``[A-Za-z_][A-Za-z0-9_]{0,99}``, as the server accepts).
        wait: Ask the server to answer only once the rows are committed
            (``&wait=true``, status 200) instead of on acceptance (202).
        compression: ``"zstd"``, ``"gzip"`` or ``None``.
        compression_level: ``None`` picks :data:`DEFAULT_COMPRESSION_LEVELS`
            (1 for both: measured fastest, and for zstd also smallest on NDJSON);
            else 1-22 for zstd, 1-9 for gzip.
        connect_timeout_secs: Timeout to open a connection.
        read_timeout_secs: Timeout between bytes of the response; allow at least
            10 s with ``wait=True``.
        max_in_flight: Size of the connection pool: how many ``send`` calls can
            run at the same time without opening extra connections.
        ca_bundle_path: A CA bundle to verify the server's certificate with.
            Verification of ``https`` is always on.
        allow_insecure_http: Without it, an ``http://`` URL to a host that is not
            loopback (127.0.0.0/8, ::1, localhost) is refused, since the token
            would travel in clear text.
    """

    api_url: str
    datasource: str
    wait: bool = False
    compression: str | None = "zstd"
    compression_level: int | None = None
    connect_timeout_secs: float = 5.0
    read_timeout_secs: float = 30.0
    max_in_flight: int = 4
    ca_bundle_path: str | None = None
    allow_insecure_http: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.api_url, str) or not self.api_url:
            raise ValueError(f"api_url must be a non-empty string, got {self.api_url!r}")
        api_url = self.api_url.strip().rstrip("/")
        parts = urllib.parse.urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"api_url must be an http:// or https:// URL with a host, got {self.api_url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("api_url must not hold credentials; pass the token separately")
        if parts.query or parts.fragment:
            raise ValueError(f"api_url must not have a query or a fragment, got {self.api_url!r}")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"api_url has an invalid port: {self.api_url!r}") from None
        if parts.scheme == "http" and not self.allow_insecure_http and not _is_loopback(parts.hostname):
            raise ValueError(
                f"api_url {api_url!r} is plain http:// to a host that is not loopback: the token "
                "would be sent in clear text. Use https://, or set allow_insecure_http=True."
            )
        object.__setattr__(self, "api_url", api_url)
        if not isinstance(self.datasource, str) or not _DATASOURCE_NAME.fullmatch(self.datasource):
            raise ValueError(
                f"datasource must match [A-Za-z_][A-Za-z0-9_]{{0,99}}, got {self.datasource!r}"
            )
        if self.datasource.endswith("_quarantine"):
            raise ValueError(
                f"datasource {self.datasource!r} is a quarantine data source: the server fills it, "
                "nothing can be appended to it")
        if not isinstance(self.wait, bool):
            raise ValueError(f"wait must be a bool, got {self.wait!r}")
        if self.compression not in _COMPRESSIONS:
            raise ValueError(f"compression must be 'zstd', 'gzip' or None, got {self.compression!r}")
        if self.compression_level is not None:
            if self.compression is None:
                raise ValueError("compression_level needs a compression ('zstd' or 'gzip')")
            low, high = _COMPRESSION_LEVEL_RANGES[self.compression]
            level = self.compression_level
            if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
                raise ValueError(
                    f"compression_level for {self.compression} must be an int in {low}..{high}, got {level!r}"
                )
        for name in ("connect_timeout_secs", "read_timeout_secs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.max_in_flight, bool) or not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {self.max_in_flight!r}")
        if self.ca_bundle_path is not None and (not isinstance(self.ca_bundle_path, str) or not self.ca_bundle_path):
            raise ValueError(f"ca_bundle_path must be a non-empty string or None, got {self.ca_bundle_path!r}")
        if not isinstance(self.allow_insecure_http, bool):
            raise ValueError(f"allow_insecure_http must be a bool, got {self.allow_insecure_http!r}")

    @property
    def effective_compression_level(self) -> int | None:
        """The level really used: ``compression_level`` or the codec's default."""
        if self.compression is None:
            return None
        if self.compression_level is not None:
            return self.compression_level
        return DEFAULT_COMPRESSION_LEVELS[self.compression]

    @property
    def events_url(self) -> str:
        """The full URL posted to (it never holds the token)."""
        url = f"{self.api_url}/v0/events?name={self.datasource}"
        return url + "&wait=true" if self.wait else url


@dataclasses.dataclass(frozen=True, kw_only=True)
class Attempt:
    """One HTTP attempt, for metrics.

    Attributes:
        started_at: Wall-clock time (epoch seconds) when the request started.
        latency_secs: Time until the response (or the error), by the client's clock.
        status: HTTP status, or ``None`` when there was no response.
        error: ``None`` when a response arrived, else ``"timeout"`` (read timeout:
            the server may have stored the rows), ``"connect_timeout"``,
            ``"connection_error"`` (refused, reset, closed), ``"protocol_error"``
            (a broken response) or ``"tls_verification_failed"``.
        raw_bytes: Uncompressed NDJSON bytes carried.
        wire_bytes: Bytes of the request body as sent (compressed).
        retry_cause: Why these rows are sent again: the status as text (``"429"``,
            ``"503"``, ``"413"`` when the part is split in two) or the ``error``;
            ``None`` when they are not sent again.
    """

    started_at: float
    latency_secs: float
    status: int | None
    error: str | None
    raw_bytes: int
    wire_bytes: int
    retry_cause: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Delivered:
    """A part of the payload that the server accepted (2xx).

    Attributes:
        rows: Lines in the part.
        raw_bytes: Uncompressed bytes of the part.
        status: 200 (committed, ``wait=True``) or 202 (accepted).
        quarantined_rows: Rows the server put in ``<datasource>_quarantine``
            (0 when the response body did not say).
        attempts: HTTP attempts that carried these rows, including those of the
            larger parts they were split from.
    """

    rows: int
    raw_bytes: int
    status: int
    quarantined_rows: int
    attempts: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Failed:
    """A part of the payload that was not delivered, with everything to replay it.

    Attributes:
        payload: The ``\\n``-terminated NDJSON lines of the part, as sent.
        rows: Lines in the part.
        kind: Why (:class:`DeadLetterKind`).
        status: The last HTTP status, or ``None`` when the last attempt got no response.
        message: The server's error message or the client's own explanation.
        attempts: HTTP attempts that carried these rows (split parents included).
        first_attempt_at: Wall-clock time (epoch seconds) of the first of them.
        last_attempt_at: Wall-clock time (epoch seconds) of the last of them.
    """

    payload: bytes
    rows: int
    kind: DeadLetterKind
    status: int | None
    message: str
    attempts: int
    first_attempt_at: float
    last_attempt_at: float

    def __repr__(self) -> str:
        # Never print row data (it can be large or sensitive).
        return (
            f"Failed(rows={self.rows}, payload_bytes={len(self.payload)}, kind={self.kind.value!r}, "
            f"status={self.status!r}, message={self.message!r}, attempts={self.attempts})"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SendReport:
    """The outcome of one :meth:`EventsApiClient.send`.

    Every byte of the payload is in exactly one ``delivered`` or ``failed`` part,
    in payload order within each tuple.

    Attributes:
        delivered: Parts the server accepted.
        failed: Parts that were not delivered.
        attempts: Every HTTP attempt, in order.
        paced_secs: Time spent waiting for the server's rate-limit window to
            reset before starting attempts (shared pacing), not counting backoff.
    """

    delivered: tuple[Delivered, ...]
    failed: tuple[Failed, ...]
    attempts: tuple[Attempt, ...]
    paced_secs: float = 0.0

    @property
    def delivered_rows(self) -> int:
        return sum(d.rows for d in self.delivered)

    @property
    def failed_rows(self) -> int:
        return sum(f.rows for f in self.failed)


class EventsApiClient:
    """Posts NDJSON batches to the Events API; thread-safe.

    Create it in ``DoFn.setup()`` and :meth:`close` it in ``teardown()``: it holds
    a connection pool and cannot be pickled.

    Delivery is at least once. A batch may be stored twice when an attempt is
    retried after the server stored it: a read timeout, a connection reset after
    the body was sent, or a 500/502/504 whose request was in fact committed. A
    429 or 503 stores nothing, and 422 (partially ingested) is never retried.

    Args:
        settings: Where and how to post.
        token: A token with ``DATASOURCE:APPEND`` (or ``DATASOURCE:CREATE``) scope;
            sent only in the ``Authorization`` header.
        retry_policy: When and how long to retry.
        clock: Monotonic clock (seconds) for latencies, deadlines and pacing.
        wall_clock: Epoch clock (seconds) for attempt timestamps and HTTP dates.
        sleep: Sleeps for backoff and pacing.
        rand: Uniform random numbers in [0, 1) for jitter.
        session: A session to use instead of creating one; it is then the
            caller's to configure and to close.
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        token: str,
        retry_policy: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        session: requests.Session | None = None,
    ) -> None:
        if not isinstance(settings, ClientSettings):
            raise TypeError(f"settings must be a ClientSettings, got {type(settings).__name__}")
        if not isinstance(retry_policy, RetryPolicy):
            raise TypeError(f"retry_policy must be a RetryPolicy, got {type(retry_policy).__name__}")
        if not isinstance(token, str) or not token or not all("!" <= c <= "~" for c in token):
            # Visible ASCII only: with a control character the Authorization header
            # is malformed, and servers echo a malformed header line (escaped, so
            # _scrub misses it) in their 400 answer and their logs.
            # Never echo the value: it may be a real token with a stray newline.
            raise ValueError("token must be a non-empty string without whitespace or control characters")
        self._settings = settings
        self._policy = retry_policy
        self._token = token
        self._auth = _BearerAuth(token)
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._rand = rand
        self._url = settings.events_url
        self._timeout = (settings.connect_timeout_secs, settings.read_timeout_secs)
        self._verify: str | bool = settings.ca_bundle_path or True
        self._headers = {
            "Content-Type": "application/x-ndjson",
            "User-Agent": _USER_AGENT,
            "Accept": "application/json",
        }
        if settings.compression is not None:
            self._headers["Content-Encoding"] = settings.compression
        self._level = settings.effective_compression_level
        self._local = threading.local()
        self._pacer = _Pacer(clock=clock, sleep=sleep)
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(
                pool_connections=1, pool_maxsize=settings.max_in_flight, max_retries=0
            )
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session: requests.Session | None = session

    def __repr__(self) -> str:
        s = self._settings
        return (
            f"EventsApiClient(api_url={s.api_url!r}, datasource={s.datasource!r}, wait={s.wait}, "
            f"compression={s.compression!r}, max_in_flight={s.max_in_flight})"
        )

    def __getstate__(self) -> Any:
        raise TypeError(
            "EventsApiClient cannot be pickled: it holds a connection pool and the token. "
            "Create it in DoFn.setup() and close it in teardown()."
        )

    def close(self) -> None:
        """Closes the connection pool (only when the client created the session)."""
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            session.close()

    def __enter__(self) -> EventsApiClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def send(self, payload: bytes, rows: int) -> SendReport:
        """Posts ``payload`` (``rows`` lines, each ending with ``\\n``) and reports.

        Retries what can be retried, splits the payload in two on 413 (down to
        single rows), and waits while the server's rate-limit window is exhausted.
        Never raises for an HTTP or network outcome.

        Raises:
            ValueError: ``payload`` is not ``\\n``-terminated bytes of ``rows`` lines.
            RuntimeError: The client is closed.
        """
        if not isinstance(payload, bytes):
            raise ValueError(f"payload must be bytes, got {type(payload).__name__}")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"rows must be an int >= 0, got {rows!r}")
        if self._session is None:
            raise RuntimeError("EventsApiClient is closed")
        if not payload and rows == 0:
            return SendReport(delivered=(), failed=(), attempts=())
        if not payload.endswith(b"\n"):
            raise ValueError("payload must end with a newline")
        lines = payload.count(b"\n")
        if lines != rows:
            raise ValueError(f"rows={rows} but the payload holds {lines} lines")
        state = _SendState()
        self._send_part(payload, rows, state, prior_attempts=0, first_attempt_at=None)
        return SendReport(
            delivered=tuple(state.delivered),
            failed=tuple(state.failed),
            attempts=tuple(state.attempts),
            paced_secs=state.paced_secs,
        )

    # -- internals -----------------------------------------------------------

    def _send_part(
        self,
        payload: bytes,
        rows: int,
        state: _SendState,
        *,
        prior_attempts: int,
        first_attempt_at: float | None,
    ) -> None:
        """Sends one part with its own retries; on 413 recurses on both halves."""
        settings, policy = self._settings, self._policy
        body = self._compress(payload)  # once per part, reused by every retry
        raw_bytes, wire_bytes = len(payload), len(body)
        own_attempts = 0
        first_started: float | None = None
        while True:
            state.paced_secs += self._pacer.wait()
            own_attempts += 1
            attempts = prior_attempts + own_attempts
            started_at = self._wall_clock()
            if first_attempt_at is None:
                first_attempt_at = started_at
            t0 = self._clock()
            if first_started is None:
                first_started = t0
            result = self._post(body)
            latency = self._clock() - t0
            status = result.status

            def record(retry_cause: str | None) -> None:
                state.attempts.append(
                    Attempt(
                        started_at=started_at,
                        latency_secs=latency,
                        status=status,
                        error=result.error,
                        raw_bytes=raw_bytes,
                        wire_bytes=wire_bytes,
                        retry_cause=retry_cause,
                    )
                )
                _LOG.debug(
                    "Tinybird %s: attempt %d: status=%s error=%s latency=%.3fs rows=%d raw=%dB wire=%dB",
                    settings.datasource, attempts, status, result.error, latency, rows,
                    raw_bytes, wire_bytes,
                )

            def fail(kind: DeadLetterKind, message: str) -> None:
                record(None)
                message = self._scrub(message)
                state.failed.append(
                    Failed(
                        payload=payload,
                        rows=rows,
                        kind=kind,
                        status=status,
                        message=message,
                        attempts=attempts,
                        first_attempt_at=first_attempt_at,
                        last_attempt_at=started_at,
                    )
                )
                _LOG.info(
                    "Tinybird %s: %d rows (%d bytes) dead-lettered as %s after %d attempts: %s",
                    settings.datasource, rows, raw_bytes, kind.value, attempts,
                    _truncate(message, 300),
                )

            server_wait: float | None = None
            if status is not None:
                server_wait = self._server_wait_secs(status, result.headers)
                self._update_pacing(status, result.headers, server_wait)

            if status is not None and 200 <= status < 300:
                record(None)
                state.delivered.append(
                    Delivered(
                        rows=rows,
                        raw_bytes=raw_bytes,
                        status=status,
                        quarantined_rows=_quarantined_rows(result.body, rows),
                        attempts=attempts,
                    )
                )
                return
            if status == 413:
                if rows > 1:
                    record("413")
                    first, second = _split_at_line(payload)
                    first_rows = first.count(b"\n")
                    _LOG.info(
                        "Tinybird %s: 413 for %d rows (%d bytes); splitting into %d + %d rows",
                        settings.datasource, rows, raw_bytes, first_rows, rows - first_rows,
                    )
                    for part, part_rows in ((first, first_rows), (second, rows - first_rows)):
                        self._send_part(
                            part, part_rows, state,
                            prior_attempts=attempts, first_attempt_at=first_attempt_at,
                        )
                    return
                fail(
                    DeadLetterKind.PAYLOAD_TOO_LARGE,
                    f"HTTP 413: a single row of {raw_bytes - 1} bytes ({wire_bytes} on the wire) "
                    f"is larger than the server accepts: {result.message}",
                )
                return
            if status == 422:
                fail(
                    DeadLetterKind.PARTIAL,
                    "HTTP 422: partially ingested (a materialized view failed); not retried "
                    f"because retrying may duplicate rows: {result.message}",
                )
                return
            if status is not None and not policy.is_retryable_status(status):
                fail(DeadLetterKind.REJECTED, self._rejection_message(status, result))
                return
            if status is None and not result.retryable:
                fail(DeadLetterKind.REJECTED, result.message)
                return

            # Retryable: a status in the policy, a timeout or a connection failure.
            cause = str(status) if status is not None else str(result.error)
            last = f"HTTP {status}: {result.message}" if status is not None else result.message
            elapsed = self._clock() - first_started
            give_up: str | None = None
            delay = 0.0
            if own_attempts >= policy.max_attempts:
                give_up = f"max_attempts={policy.max_attempts} reached"
            else:
                delay = policy.delay_secs(own_attempts, rand=self._rand(), server_wait_secs=server_wait)
                wait = max(delay, self._pacer.remaining())
                if elapsed + wait > policy.max_total_secs:
                    give_up = (
                        f"the next attempt would start {elapsed + wait:.1f} s after the first, "
                        f"past max_total_secs={policy.max_total_secs:g}"
                    )
            if give_up is not None:
                fail(
                    DeadLetterKind.RETRIES_EXHAUSTED,
                    f"gave up after {own_attempts} attempts in {elapsed:.1f} s ({give_up}); last: {last}",
                )
                return
            if status == 429 and server_wait is None:
                # A 429 without a hint: every thread of the client backs off too.
                self._pacer.hold_for(delay)
            record(cause)
            _LOG.info(
                "Tinybird %s: attempt %d of %d failed (%s); retrying %d rows in %.2f s",
                settings.datasource, own_attempts, policy.max_attempts, cause, rows, delay,
            )
            self._sleep(delay)

    def _post(self, body: bytes) -> _Result:
        session = self._session
        if session is None:
            raise RuntimeError("EventsApiClient is closed")
        try:
            response = session.post(
                self._url,
                data=body,
                headers=self._headers,
                auth=self._auth,
                timeout=self._timeout,
                verify=self._verify,
                allow_redirects=False,
            )
        except requests.exceptions.ConnectTimeout as exc:
            return _Result.network("connect_timeout", f"connect timeout after {self._timeout[0]:g} s: {exc}")
        except requests.exceptions.Timeout as exc:
            return _Result.network(
                "timeout",
                f"read timeout after {self._timeout[1]:g} s (the server may have stored the rows): {exc}",
            )
        except requests.exceptions.SSLError as exc:
            if _is_cert_verification_error(exc):
                return _Result.network(
                    "tls_verification_failed",
                    f"TLS certificate verification failed for {self._settings.api_url}: {exc}. "
                    "Set ca_bundle_path to the CA bundle that signs the server's certificate.",
                    retryable=False,
                )
            return _Result.network("connection_error", f"TLS error: {exc}")
        except requests.exceptions.ConnectionError as exc:
            return _Result.network("connection_error", f"connection error: {exc}")
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
            return _Result.network("protocol_error", f"broken response: {exc}")
        content = response.content
        parsed: Any = None
        try:
            parsed = orjson.loads(content) if content else None
        except orjson.JSONDecodeError:
            parsed = None
        return _Result(
            status=response.status_code,
            headers=response.headers,
            body=parsed,
            message=_server_message(parsed, content),
            error=None,
            retryable=True,
        )

    def _compress(self, payload: bytes) -> bytes:
        codec = self._settings.compression
        if codec is None:
            return payload
        if codec == "gzip":
            # zlib.compress keeps no state between calls: safe from any thread.
            return zlib.compress(payload, self._level, wbits=31)
        compressor = getattr(self._local, "zstd", None)
        if compressor is None:
            # ZstdCompressor is not thread-safe: one per thread, reused.
            compressor = zstandard.ZstdCompressor(level=self._level)
            self._local.zstd = compressor
        return compressor.compress(payload)

    def _server_wait_secs(self, status: int, headers: Mapping[str, str]) -> float | None:
        """How long the server asks to wait: Retry-After, else X-RateLimit-Reset on 429."""
        if status in RETRY_AFTER_STATUS_CODES:
            wait = _parse_retry_after(headers.get("Retry-After"), self._wall_clock)
            if wait is not None:
                return wait
        if status == 429:
            return _parse_reset(headers.get("X-RateLimit-Reset"), self._wall_clock)
        return None

    def _update_pacing(self, status: int, headers: Mapping[str, str], server_wait: float | None) -> None:
        cap = self._policy.max_retry_after_secs
        if status == 429 and server_wait is not None:
            self._pacer.hold_for(min(server_wait, cap))
        remaining = headers.get("X-RateLimit-Remaining")
        if remaining is None:
            return
        try:
            exhausted = float(remaining) <= 0
        except ValueError:
            return
        if exhausted:
            reset = _parse_reset(headers.get("X-RateLimit-Reset"), self._wall_clock)
            if reset is not None:
                _LOG.debug(
                    "Tinybird %s: rate-limit window exhausted; pausing new requests for %.3f s",
                    self._settings.datasource, min(reset, cap),
                )
                self._pacer.hold_for(min(reset, cap))

    def _rejection_message(self, status: int, result: _Result) -> str:
        if status == 404:
            return (
                "HTTP 404: the token's workspace is not on this host; check the API host/region "
                f"(api_url={self._settings.api_url}). Server said: {result.message}"
            )
        if status in (401, 403):
            return (
                f"HTTP {status}: {result.message} (check the token and its DATASOURCE:APPEND "
                "or DATASOURCE:CREATE scope)"
            )
        if 300 <= status < 400:
            location = result.headers.get("Location", "") if result.headers is not None else ""
            return f"HTTP {status}: unexpected redirect to {location!r}; check api_url"
        return f"HTTP {status}: {result.message}"

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token in text else text


# -- helpers -------------------------------------------------------------------


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


@dataclasses.dataclass
class _SendState:
    delivered: list[Delivered] = dataclasses.field(default_factory=list)
    failed: list[Failed] = dataclasses.field(default_factory=list)
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    paced_secs: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Result:
    """A response (status set) or a network error (error set)."""

    status: int | None
    headers: Any
    body: Any
    message: str
    error: str | None
    retryable: bool

    @classmethod
    def network(cls, error: str, message: str, *, retryable: bool = True) -> _Result:
        return cls(
            status=None, headers={}, body=None, message=_truncate(message, _MESSAGE_LIMIT_CHARS),
            error=error, retryable=retryable,
        )


class _Pacer:
    """A "not before" time shared by every thread of a client."""

    def __init__(self, *, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._not_before = -math.inf

    def hold_for(self, secs: float) -> None:
        if secs <= 0:
            return
        with self._lock:
            self._not_before = max(self._not_before, self._clock() + secs)

    def remaining(self) -> float:
        with self._lock:
            return max(0.0, self._not_before - self._clock())

    def wait(self) -> float:
        """Sleeps until no hold is active; returns the time slept."""
        slept = 0.0
        waited_for = None
        while True:
            with self._lock:
                not_before = self._not_before
                remaining = not_before - self._clock()
            # Sleep again only when another thread extended the hold meanwhile, so
            # that a clock that does not move (a test's) cannot make this spin.
            if remaining <= 0 or not_before == waited_for:
                return slept
            waited_for = not_before
            self._sleep(remaining)
            slept += remaining


def _is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_retry_after(value: str | None, wall_clock: Callable[[], float]) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP-date); None if absent or garbled."""
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        pass
    else:
        return max(secs, 0.0) if math.isfinite(secs) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(when.timestamp() - wall_clock(), 0.0)


def _parse_reset(value: str | None, wall_clock: Callable[[], float]) -> float | None:
    """X-RateLimit-Reset: seconds until the window resets (an epoch time is tolerated)."""
    if value is None:
        return None
    try:
        secs = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(secs):
        return None
    if secs > _EPOCH_THRESHOLD_SECS:
        secs -= wall_clock()
    return max(secs, 0.0)


def _quarantined_rows(body: Any, rows: int) -> int:
    if isinstance(body, dict):
        value = body.get("quarantined_rows")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return min(value, rows)
    return 0


def _server_message(parsed: Any, content: bytes) -> str:
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return _truncate(parsed["error"], _MESSAGE_LIMIT_CHARS)
    text = content[: _MESSAGE_LIMIT_CHARS * 4].decode("utf-8", "replace").strip()
    return _truncate(text, _MESSAGE_LIMIT_CHARS) if text else "(empty body)"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _split_at_line(payload: bytes) -> tuple[bytes, bytes]:
    """Splits ``\\n``-terminated lines (at least two) at the line boundary nearest the middle."""
    middle = len(payload) // 2
    cuts = []
    after = payload.find(b"\n", middle)
    if after != -1 and after + 1 < len(payload):
        cuts.append(after + 1)
    before = payload.rfind(b"\n", 0, middle)
    if before != -1:
        cuts.append(before + 1)
    cut = min(cuts, key=lambda c: abs(c - middle))
    return payload[:cut], payload[cut:]


def _is_cert_verification_error(exc: BaseException) -> bool:
    seen = set()
    stack: list[Any] = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        stack.extend((current.__cause__, current.__context__, getattr(current, "reason", None)))
        stack.extend(current.args)
    return False
