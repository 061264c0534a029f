"""The Events API client: one batch of NDJSON lines in, delivered and failed parts out.

:class:`EventsApiClient` compresses a batch once, then loops: wait for the
process's shared :class:`~sinks.tinybird._http.limiter.Limiter` of its data
source (the server's pause, the paced rate, the concurrency limit), make one
attempt through the
:class:`~sinks.tinybird._http.transport.Transport`, and act on what
:func:`~sinks.tinybird._http.classify.classify` decides (deliver, split on 413,
retry after a wait, or dead-letter). Errors fit in the policy's
``max_total_secs`` and throttling in its ``max_throttled_secs``; every attempt
in its own deadline. It
never raises for an HTTP or network outcome: it returns a :class:`SendReport`.
:class:`ClientSettings` says where and how to post.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
import types
import urllib.parse
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import zstandard

from sinks.tinybird._http.classify import AttemptContext, budget_check, classify, rate_window, throttle_check
from sinks.tinybird._http.limiter import Limiter, LimiterKey, Signal, shared_limiter
from sinks.tinybird._http.outcomes import (
    Attempt,
    BoundedResponse,
    Decision,
    Deliver,
    Delivered,
    Failed,
    GiveUp,
    Retry,
    SendReport,
    Split,
    TransportFailure,
)
from sinks.tinybird._http.redaction import Redactor, cap, install_log_redaction, uninstall_log_redaction
from sinks.tinybird._http.transport import Transport, is_loopback
from sinks.tinybird._routing import datasource_name_problem
from sinks.tinybird.dead_letters import DeadLetterKind
from sinks.tinybird.retry import RetryPolicy, check_wait_secs

__all__ = [
    "Attempt",
    "ClientSettings",
    "Delivered",
    "EventsApiClient",
    "Failed",
    "SendReport",
]

_LOG = logging.getLogger(__name__)

_MAX_CHECKED_NAMES = 10_000
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
_USER_AGENT = "beam-tinybird"
# Slack over the policy's bound for what is not HTTP: compressing a part, threads starting.
_SEND_SLACK_SECS = 5.0
# A thread waiting for a request slot looks at its budget at least this often.
_SLOT_POLL_SECS = 1.0
_CLOSED = TransportFailure(error="closed", message="the client was closed", retryable=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """Where and how to post; everything but the token and the retry policy.

    Attributes:
        api_url: Base URL of the region's API host, e.g. ``"https://api.tinybird.co"``
            or ``"https://api.us-east.aws.tinybird.co"``. A trailing slash is removed.
        datasource: The data source posted to when :meth:`EventsApiClient.send` names
            none (``[A-Za-z_][A-Za-z0-9_]{0,99}``, as the server accepts), or None:
            every send names its own.
        wait: Ask the server to answer only once the rows are committed
            (``&wait=true``, status 200) instead of on acceptance (202).
        compression: ``"zstd"``, ``"gzip"`` or ``None``.
        compression_level: ``None`` picks :data:`DEFAULT_COMPRESSION_LEVELS`
            (1 for both: measured fastest, and for zstd also smallest on NDJSON);
            else 1-22 for zstd, 1-9 for gzip.
        connect_timeout_secs: Timeout to open a connection.
        read_timeout_secs: Timeout between bytes of the response; allow at least
            10 s with ``wait=True``.
        attempt_timeout_secs: Wall-clock bound on one attempt, from connecting to
            the last byte of the answer (a server that drips bytes slower than
            the read timeout is cut off here). ``None``: ``connect_timeout_secs +
            read_timeout_secs``.
        max_in_flight: Size of the connection pool, and the ceiling of the
            concurrency limit of the process's shared limiter for this API host,
            data source and token (every client of the process that targets
            them shares one limiter; the largest ceiling asked wins).
        ca_bundle_path: A CA bundle to verify the server's certificate with.
            Verification of ``https`` is always on.
        allow_insecure_http: Without it, an ``http://`` URL to a host that is not
            loopback (127.0.0.0/8, ::1, localhost) is refused, since the token
            would travel in clear text.
    """

    api_url: str
    datasource: str | None = None
    wait: bool = False
    compression: str | None = "zstd"
    compression_level: int | None = None
    connect_timeout_secs: float = 5.0
    read_timeout_secs: float = 30.0
    attempt_timeout_secs: float | None = None
    max_in_flight: int = 4
    ca_bundle_path: str | None = None
    allow_insecure_http: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_url", _checked_api_url(self.api_url, allow_insecure_http=self.allow_insecure_http))
        if self.datasource is not None:
            _check_datasource(self.datasource)
        if not isinstance(self.wait, bool):
            raise ValueError(f"wait must be a bool, got {self.wait!r}")
        _check_compression(self.compression, self.compression_level)
        for name in ("connect_timeout_secs", "read_timeout_secs"):
            if not _is_positive_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
            check_wait_secs(name, getattr(self, name))
        if self.attempt_timeout_secs is not None:
            if not _is_positive_number(self.attempt_timeout_secs):
                raise ValueError(
                    f"attempt_timeout_secs must be a finite number > 0 or None, got {self.attempt_timeout_secs!r}")
            check_wait_secs("attempt_timeout_secs", self.attempt_timeout_secs)
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
    def effective_attempt_timeout_secs(self) -> float:
        """The wall-clock bound of one attempt really used."""
        if self.attempt_timeout_secs is not None:
            return float(self.attempt_timeout_secs)
        return float(self.connect_timeout_secs + self.read_timeout_secs)

    @property
    def events_url(self) -> str:
        """The full URL posted to for ``datasource`` (it never holds the token)."""
        if self.datasource is None:
            raise ValueError("no datasource: every send names its own (see events_url_for)")
        return self.events_url_for(self.datasource)

    def events_url_for(self, datasource: str) -> str:
        """The full URL posted to for a data source (it never holds the token)."""
        url = f"{self.api_url}/v0/events?name={datasource}"
        return url + "&wait=true" if self.wait else url


class EventsApiClient:
    """Posts NDJSON batches to the Events API; thread-safe.

    Create it in ``DoFn.setup()`` and :meth:`close` it in ``teardown()``: it holds
    a connection pool and cannot be pickled. While it is open, the records of
    urllib3's and requests' loggers are scrubbed of its token.

    Delivery is at least once. A batch may be stored twice when an attempt is
    retried after the server stored it: a read timeout or a passed deadline, a
    connection reset after the body was sent, or a 500/502/504 whose request
    was in fact committed. A 429 or 503 stores nothing, and 422 (partially
    ingested) and a 2xx that counts fewer rows than were sent are never retried.

    Args:
        settings: Where and how to post.
        token: A token with ``DATASOURCE:APPEND`` (or ``DATASOURCE:CREATE``) scope;
            sent only in the ``Authorization`` header.
        retry_policy: When and how long to retry, and the time budget of a batch.
        clock: Monotonic clock (seconds) for latencies, the time budget and pacing.
        wall_clock: Epoch clock (seconds) for attempt timestamps and HTTP dates.
        sleep: Sleeps for backoff and pacing; default: a wait that :meth:`close` ends.
        rand: Uniform random numbers in [0, 1) for jitter.
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        token: str,
        retry_policy: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], object] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not isinstance(settings, ClientSettings):
            raise TypeError(f"settings must be a ClientSettings, got {type(settings).__name__}")
        if not isinstance(retry_policy, RetryPolicy):
            raise TypeError(f"retry_policy must be a RetryPolicy, got {type(retry_policy).__name__}")
        if not isinstance(token, str) or not token or not all("!" <= c <= "~" for c in token):
            # Visible ASCII only: with a control character the Authorization header
            # is malformed, and servers echo a malformed header line (escaped, so
            # scrubbing misses it) in their 400 answer and their logs.
            # Never echo the value: it may be a real token with a stray newline.
            raise ValueError("token must be a non-empty string without whitespace or control characters")
        self._settings = settings
        self._policy = retry_policy
        self._token = token
        self._clock = clock
        self._wall_clock = wall_clock
        # Set by close(): a send abandoned by a torn-down DoFn stops waiting (backoff, Retry-After,
        # the limiter's pause) and sends nothing more, rather than running on for up to
        # max_send_secs, holding its batch and the worker process's exit (which joins its thread).
        self._closing = threading.Event()
        self._sleep = self._closing.wait if sleep is None else sleep
        self._rand = rand
        # Read only when there is a compression, which then has a level.
        self._level = settings.effective_compression_level or 1
        self._local = threading.local()
        self._redactor = Redactor((token,))
        headers = {"Content-Type": "application/x-ndjson", "User-Agent": _USER_AGENT, "Accept": "application/json"}
        if settings.compression is not None:
            headers["Content-Encoding"] = settings.compression
        self._transport: Transport | None = Transport(
            url=settings.events_url_for(settings.datasource or ""), headers=headers, token=token, redactor=self._redactor,
            connect_timeout_secs=settings.connect_timeout_secs, read_timeout_secs=settings.read_timeout_secs,
            attempt_timeout_secs=settings.effective_attempt_timeout_secs,
            ca_bundle_path=settings.ca_bundle_path, max_in_flight=settings.max_in_flight,
        )
        self._token_key = LimiterKey.of(api_url=settings.api_url, datasource=settings.datasource or "", token=token)
        # Data source names a send was given, checked once (a bounded set: past it, checked again).
        self._checked_names: set[str] = set()
        # Sends under way: the log redaction stays until the last one ends, also after close()
        # (a send abandoned by a torn-down DoFn still reads an answer, which urllib3 may log).
        self._lock = threading.Lock()
        self._sends = 0
        install_log_redaction(token)

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

    @property
    def max_send_secs(self) -> float:
        """The longest one :meth:`send` can take: the policy's error budget and
        throttling budget, one attempt's deadline (the last attempt starts within
        the budgets), and a slack for compressing. A caller waiting on a send
        never needs to wait longer."""
        attempt = max(self._settings.effective_attempt_timeout_secs, self._settings.connect_timeout_secs)
        return self._policy.max_total_secs + self._policy.max_throttled_secs + attempt + _SEND_SLACK_SECS

    def limiter(self, datasource: str | None = None) -> Limiter:
        """The process's shared limiter for this client's API host and token and
        ``datasource`` (default: the client's). Looked up per request, so that a
        client posting to several data sources paces each against its own limit."""
        key = self._token_key if datasource is None else LimiterKey(
            api_url=self._token_key.api_url, datasource=datasource, token_digest=self._token_key.token_digest)
        return shared_limiter(key, max_in_flight=self._settings.max_in_flight, clock=self._clock, rand=self._rand)

    def close(self) -> None:
        """Closes the connection pool; a send under way in another thread fails as ``closed``.

        Such a send ends with the attempt it has under way (at most one attempt's deadline), or
        within a second when it is waiting: it starts no attempt after close. The token is
        scrubbed from the HTTP stack's log records until the last send under way ends: its
        attempt in progress still reads an answer.
        """
        with self._lock:
            transport, self._transport = self._transport, None
            last = transport is not None and self._sends == 0
        self._closing.set()
        if transport is not None:
            transport.close()
        if last:
            uninstall_log_redaction(self._token)

    def __enter__(self) -> EventsApiClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def send(self, payload: bytes, rows: int, datasource: str | None = None) -> SendReport:
        """Posts ``payload`` (``rows`` lines, each ending with ``\\n``) to ``datasource``
        (default: the settings') and reports.

        Retries what can be retried, splits the payload in two on 413 (down to
        single rows), and waits while the service says "slow down" (429, 503
        with ``Retry-After``, an exhausted rate-limit window) and for the
        process's shared limiter. Errors are retried within the policy's
        ``max_attempts`` and ``max_total_secs`` (time spent throttled not
        counted), throttling within ``max_throttled_secs``, each attempt
        within its deadline. Never raises for an HTTP or network outcome.

        Raises:
            ValueError: ``payload`` is not ``\\n``-terminated bytes of ``rows`` lines, or
                ``datasource`` is not a valid name (or missing, with none in the settings).
            RuntimeError: The client is closed.
        """
        if not isinstance(payload, bytes):
            raise ValueError(f"payload must be bytes, got {type(payload).__name__}")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"rows must be an int >= 0, got {rows!r}")
        if not payload and rows == 0:
            return SendReport(delivered=(), failed=(), attempts=())
        if not payload.endswith(b"\n"):
            raise ValueError("payload must end with a newline")
        lines = payload.count(b"\n")
        if lines != rows:
            raise ValueError(f"rows={rows} but the payload holds {lines} lines")
        datasource = self._datasource(datasource)
        with self._lock:
            if self._transport is None:
                raise RuntimeError("EventsApiClient is closed")
            self._sends += 1
        try:
            return self._send(payload, rows, datasource)
        finally:
            with self._lock:
                self._sends -= 1
                last = self._transport is None and self._sends == 0
            if last:
                uninstall_log_redaction(self._token)

    # -- internals -----------------------------------------------------------

    def _send(self, payload: bytes, rows: int, datasource: str) -> SendReport:
        batch = _Batch(started=self._clock(), limiter=self.limiter(datasource), datasource=datasource,
                       url=self._settings.events_url_for(datasource))
        # A stack of parts, so that the halves of a split go in payload order.
        parts = [_Part(payload=payload, rows=rows, prior_attempts=0, first_attempt_at=None, first_row=0)]
        while parts:
            parts.extend(reversed(self._send_part(parts.pop(), batch)))
        return SendReport(
            delivered=tuple(batch.delivered),
            failed=tuple(batch.failed),
            attempts=tuple(batch.attempts),
            paced_secs=batch.paced_secs,
            throttled_secs=batch.throttled_secs,
            throttled_answers=batch.throttled_answers,
            concurrency_limit=batch.limiter.concurrency_limit,
        )

    def _datasource(self, datasource: str | None) -> str:
        if datasource is None:
            if self._settings.datasource is None:
                raise ValueError("send needs a datasource: the client's settings name none")
            return self._settings.datasource
        if datasource not in self._checked_names:
            _check_datasource(datasource)
            if len(self._checked_names) >= _MAX_CHECKED_NAMES:
                self._checked_names.clear()
            self._checked_names.add(datasource)
        return datasource

    def _send_part(self, part: _Part, batch: _Batch) -> list[_Part]:
        """Sends one part until it is delivered or dead-lettered ([]) or split (its halves)."""
        body = self._compress(part.payload)  # once per part, reused by every retry
        state = _PartState(part=part, wire_bytes=len(body))
        while True:
            refusal = self._admit(batch)
            if refusal is not None:
                kind, message = refusal
                if state.last_answer is not None:
                    message = f"{message}; last: {state.last_answer}"
                self._fail(state, batch, GiveUp(kind=kind, message=message))
                return []
            decision = self._attempt(body, state, batch)
            if isinstance(decision, Deliver):
                batch.delivered.append(Delivered(
                    rows=part.rows, raw_bytes=len(part.payload), status=decision.status,
                    quarantined_rows=decision.quarantined_rows, attempts=state.attempts,
                    counts_read=decision.counts_read))
                return []
            if isinstance(decision, Split):
                return self._halves(state, batch)
            if isinstance(decision, GiveUp):
                self._fail(state, batch, decision)
                return []
            if decision.throttled:
                state.throttled += 1
                batch.throttled_secs += decision.after_secs
                _LOG.info(
                    "Tinybird %s: throttled (%s), %d rows; retrying in %.2f s (%.1f s throttled so far)",
                    batch.datasource, decision.cause, part.rows, decision.after_secs, batch.throttled_secs)
            else:
                _LOG.info(
                    "Tinybird %s: attempt %d of %d failed (%s); retrying %d rows in %.2f s",
                    batch.datasource, state.error_attempts, self._policy.max_attempts, decision.cause,
                    part.rows, decision.after_secs,
                )
            self._sleep(decision.after_secs)

    def _attempt(self, body: bytes, state: _PartState, batch: _Batch) -> Decision:
        """One attempt: post, classify, apply the pause, record it."""
        transport = self._transport
        limiter = batch.limiter
        state.own_attempts += 1
        started_at = self._wall_clock()
        if state.first_attempt_at is None:
            state.first_attempt_at = started_at
        state.last_attempt_at = started_at
        t0 = self._clock()
        released = False
        try:
            outcome = _CLOSED if transport is None else transport.post(body, batch.url)
            now = self._clock()
            latency = now - t0
            decision, throttled = self._decide(outcome, state, batch, now)
            window = rate_window(outcome.headers) if isinstance(outcome, BoundedResponse) else None
            # Marked first: a second done() would free another request's slot.
            released = True
            limiter.done(now, signal=_signal(outcome, throttled), rtt_secs=latency, pause_secs=decision.pause_secs,
                         window=window, sent_at=t0)
        finally:
            if not released:
                # Whatever raised (the transport, or reading its answer), the process's slot
                # is freed: a slot held for ever would leave the data source fewer requests
                # in flight for the life of the worker, and none once max_in_flight leaked.
                limiter.done(self._clock(), signal=Signal.BACK_PRESSURE, rtt_secs=self._clock() - t0, sent_at=t0)
        self._record(outcome, decision, state, batch, latency, started_at)
        return decision

    def _decide(self, outcome: BoundedResponse | TransportFailure, state: _PartState, batch: _Batch, now: float) -> tuple[Decision, bool]:
        """What the policy makes of one attempt's outcome, answered at ``now``: the decision, and whether it
        was the service's "slow down" (throttled) rather than an error."""
        part = state.part
        context = AttemptContext(
            rows=part.rows, raw_bytes=len(part.payload), wire_bytes=state.wire_bytes,
            attempt=state.error_attempts + 1, elapsed_secs=now - batch.started - batch.throttled_secs,
            pause_ahead_secs=batch.limiter.pause_remaining(now), now_epoch=self._wall_clock(), rand=self._rand(),
            api_url=self._settings.api_url, throttled=state.throttled, throttled_secs=batch.throttled_secs,
        )
        decision = classify(outcome, context, self._policy)
        throttled = (isinstance(decision, Retry) and decision.throttled) or (
            isinstance(decision, GiveUp) and decision.kind is DeadLetterKind.THROTTLED)
        if throttled:
            batch.throttled_answers += 1
        else:
            state.error_attempts += 1
        return decision, throttled

    def _record(self, outcome: BoundedResponse | TransportFailure, decision: Decision, state: _PartState, batch: _Batch, latency: float,
                started_at: float) -> None:
        """Keeps one attempt's outcome: the part's last answer and the batch's list of attempts."""
        part = state.part
        response = outcome if isinstance(outcome, BoundedResponse) else None
        status = None if response is None else response.status
        error = outcome.error if isinstance(outcome, TransportFailure) else None
        state.last_status = status
        state.last_answer = f"HTTP {response.status}: {response.message}" if response is not None else f"no answer ({error})"
        retry_cause = decision.cause if isinstance(decision, Retry) else "413" if isinstance(decision, Split) else None
        batch.attempts.append(Attempt(
            started_at=started_at, latency_secs=latency, status=status, error=error,
            raw_bytes=len(part.payload), wire_bytes=state.wire_bytes, retry_cause=retry_cause,
            body_unreadable=response is not None and response.body is None,
        ))
        _LOG.debug(
            "Tinybird %s: attempt %d: status=%s error=%s latency=%.3fs rows=%d raw=%dB wire=%dB -> %s",
            batch.datasource, state.attempts, status, error, latency,
            part.rows, len(part.payload), state.wire_bytes, type(decision).__name__,
        )

    def _admit(self, batch: _Batch) -> tuple[DeadLetterKind, str] | None:
        """Waits until the shared limiter lets an attempt start, within the budgets; else says why not.

        Only waits that are the service's doing count as throttled (the
        server's pause, the paced rate, a concurrency limit lowered by
        back-pressure): waiting for a slot that another step or thread of the
        process holds is not throttling, and counts against the error budget's
        clock like any other time.
        """
        limiter = batch.limiter
        waited_for = None
        while True:
            if self._transport is None:
                return DeadLetterKind.REJECTED, _CLOSED.message
            now = self._clock()
            refusal = budget_check(
                elapsed_secs=now - batch.started - batch.throttled_secs, pause_ahead_secs=0.0, policy=self._policy)
            if refusal is not None:
                return DeadLetterKind.RETRIES_EXHAUSTED, refusal
            admission = limiter.admit(now, waited_for=waited_for)
            if admission.admitted:
                return None
            budget_left = self._policy.max_throttled_secs - batch.throttled_secs
            if admission.reason == "concurrency":
                if admission.throttled and budget_left <= 0:
                    return DeadLetterKind.THROTTLED, (
                        f"no request slot free (the concurrency limit is lowered by back-pressure) after "
                        f"{batch.throttled_secs:.1f} s throttled, past "
                        f"max_throttled_secs={self._policy.max_throttled_secs:g}")
                poll = min(budget_left, _SLOT_POLL_SECS) if admission.throttled else _SLOT_POLL_SECS
                limiter.wait_for_slot(poll)
                waited = max(self._clock() - now, 0.0)
            else:
                refused = throttle_check(
                    throttled_secs=batch.throttled_secs, wait_secs=admission.wait_secs, policy=self._policy)
                if refused is not None:
                    return DeadLetterKind.THROTTLED, refused
                if admission.reason == "pause":
                    waited_for = admission.not_before
                self._sleep(admission.wait_secs)
                waited = admission.wait_secs
            batch.paced_secs += waited
            if admission.throttled:
                batch.throttled_secs += waited

    def _halves(self, state: _PartState, batch: _Batch) -> list[_Part]:
        part = state.part
        first, second = _split_at_line(part.payload)
        first_rows = first.count(b"\n")
        _LOG.info(
            "Tinybird %s: 413 for %d rows (%d bytes); splitting into %d + %d rows",
            batch.datasource, part.rows, len(part.payload), first_rows, part.rows - first_rows,
        )
        return [
            _Part(payload=payload, rows=rows, prior_attempts=state.attempts, first_attempt_at=state.first_attempt_at,
                  first_row=first_row)
            for payload, rows, first_row in (
                (first, first_rows, part.first_row), (second, part.rows - first_rows, part.first_row + first_rows))
        ]

    def _fail(self, state: _PartState, batch: _Batch, decision: GiveUp) -> None:
        part = state.part
        message = self._redactor.scrub(decision.message)
        now = self._wall_clock()
        batch.failed.append(Failed(
            payload=part.payload, rows=part.rows, kind=decision.kind, status=state.last_status, message=message,
            attempts=state.attempts, first_attempt_at=now if state.first_attempt_at is None else state.first_attempt_at,
            last_attempt_at=now if state.last_attempt_at is None else state.last_attempt_at,
            first_row=part.first_row,
        ))
        _LOG.info(
            "Tinybird %s: %d rows (%d bytes) dead-lettered as %s after %d attempts: %s",
            batch.datasource, part.rows, len(part.payload), decision.kind.value, state.attempts,
            cap(message, 300),
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


# -- helpers -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Part:
    """Lines to send, where they start in the payload, and what the larger parts they were split from used."""

    payload: bytes
    rows: int
    prior_attempts: int
    first_attempt_at: float | None
    first_row: int


@dataclasses.dataclass
class _PartState:
    part: _Part
    wire_bytes: int
    own_attempts: int = 0
    error_attempts: int = 0
    throttled: int = 0
    first_attempt_at: float | None = None
    last_attempt_at: float | None = None
    last_status: int | None = None
    # The server's last answer, for a dead letter refused before its next attempt.
    last_answer: str | None = None

    def __post_init__(self) -> None:
        self.first_attempt_at = self.part.first_attempt_at

    @property
    def attempts(self) -> int:
        return self.part.prior_attempts + self.own_attempts


@dataclasses.dataclass
class _Batch:
    started: float
    limiter: Limiter
    datasource: str
    url: str
    delivered: list[Delivered] = dataclasses.field(default_factory=list)
    failed: list[Failed] = dataclasses.field(default_factory=list)
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    paced_secs: float = 0.0
    throttled_secs: float = 0.0
    throttled_answers: int = 0


def _signal(outcome: BoundedResponse | TransportFailure, throttled: bool) -> Signal:
    if throttled:
        return Signal.THROTTLED
    if isinstance(outcome, TransportFailure):
        return Signal.BACK_PRESSURE if outcome.retryable else Signal.OK
    return Signal.BACK_PRESSURE if outcome.status >= 500 else Signal.OK


def _checked_api_url(api_url: object, *, allow_insecure_http: bool) -> str:
    """``api_url`` without its trailing slash, or ValueError saying what is wrong with it."""
    if not isinstance(api_url, str) or not api_url:
        raise ValueError(f"api_url must be a non-empty string, got {api_url!r}")
    url = api_url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"api_url must be an http:// or https:// URL with a host, got {api_url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("api_url must not hold credentials; pass the token separately")
    if parts.query or parts.fragment:
        raise ValueError(f"api_url must not have a query or a fragment, got {api_url!r}")
    try:
        _ = parts.port  # parsed on access
    except ValueError:
        raise ValueError(f"api_url has an invalid port: {api_url!r}") from None
    if parts.scheme == "http" and allow_insecure_http is not True and not is_loopback(parts.hostname):
        raise ValueError(
            f"api_url {url!r} is plain http:// to a host that is not loopback: the token "
            "would be sent in clear text. Use https://, or set allow_insecure_http=True."
        )
    return url


def _check_compression(compression: object, level: object) -> None:
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be 'zstd', 'gzip' or None, got {compression!r}")
    if level is None:
        return
    if compression is None:
        raise ValueError("compression_level needs a compression ('zstd' or 'gzip')")
    low, high = _COMPRESSION_LEVEL_RANGES[str(compression)]
    if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
        raise ValueError(f"compression_level for {compression} must be an int in {low}..{high}, got {level!r}")


def _check_datasource(name: object) -> None:
    problem = datasource_name_problem(name)
    if problem is not None:
        raise ValueError(f"datasource {problem}")


def _is_positive_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


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
