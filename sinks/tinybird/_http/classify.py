"""What an attempt's answer means for the rows it carried: a pure function.

:func:`classify` takes a :class:`BoundedResponse` or a :class:`TransportFailure`,
what was sent, the time and attempts used and the :class:`RetryPolicy`, and
returns a :data:`Decision`: deliver, split (413), retry after N seconds, or give
up (dead-letter, with a kind). It reads nothing but its arguments, so tests check
it with exact numbers; the client does the waiting, the sending and the counting.
As urllib3's ``Retry.is_retry``/``increment`` do, the policy says what is
retryable, and the time budget covers every attempt, split and pause of a batch.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import math
from collections.abc import Mapping
from typing import Any

import orjson

from sinks.tinybird._http.limiter import RateWindow
from sinks.tinybird._http.outcomes import (
    BoundedResponse,
    Decision,
    Deliver,
    GiveUp,
    Retry,
    Split,
    TransportFailure,
)
from sinks.tinybird.dead_letters import DeadLetterKind
from sinks.tinybird.retry import RETRY_AFTER_STATUS_CODES, RetryPolicy

__all__ = [
    "AttemptContext", "budget_check", "classify", "parse_reset", "parse_retry_after", "rate_window", "throttle_check",
]

# Above this, an X-RateLimit-Reset value is an epoch time, not a delta (some
# gateways send that; Tinybird sends a delta); above the second, in milliseconds
# (1e12 ms is 2001: as seconds, 31,000 years).
_EPOCH_THRESHOLD_SECS = 1e9
_EPOCH_MILLIS_THRESHOLD = 1e12


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttemptContext:
    """What the classifier needs to know besides the answer.

    Attributes:
        rows: Rows carried by the attempt.
        raw_bytes: Their uncompressed bytes.
        wire_bytes: The request body's bytes as sent.
        attempt: Attempts made for these rows that were not throttled, this one
            included (split parents not counted: each part has ``max_attempts``
            of its own).
        elapsed_secs: Time since the batch's ``send`` began, by the client's
            clock, less the time spent throttled (the error budget's clock).
        pause_ahead_secs: What is left of the process's shared rate-limit pause.
        throttled: Throttling answers these rows got before this one.
        throttled_secs: Time the batch has spent throttled so far.
        now_epoch: Wall-clock time, for ``Retry-After`` given as an HTTP date.
        rand: A number in [0, 1] for the jitter.
        api_url: The API host, named in the 404 message.
    """

    rows: int
    raw_bytes: int
    wire_bytes: int
    attempt: int
    elapsed_secs: float
    pause_ahead_secs: float
    now_epoch: float
    rand: float
    api_url: str
    throttled: int = 0
    throttled_secs: float = 0.0


def classify(
    outcome: BoundedResponse | TransportFailure, context: AttemptContext, policy: RetryPolicy
) -> Decision:
    """The decision for one attempt's outcome (never raises for any answer)."""
    if isinstance(outcome, TransportFailure):
        if not outcome.retryable:
            return GiveUp(kind=DeadLetterKind.REJECTED, message=outcome.message)
        return _retry_or_give_up(outcome.error, outcome.message, None, context, policy, pause_secs=0.0)
    status, headers = outcome.status, outcome.headers
    server_wait = server_wait_secs(status, headers, context.now_epoch)
    pause = _pause_secs(headers, server_wait, context.now_epoch, policy)
    if 200 <= status < 300:
        return _delivered(outcome, context, pause)
    if status == 413:
        if context.rows > 1:
            return Split(pause_secs=pause)
        return GiveUp(
            kind=DeadLetterKind.PAYLOAD_TOO_LARGE,
            message=f"HTTP 413: a single row of {context.raw_bytes - 1} bytes ({context.wire_bytes} on the wire) "
            f"is larger than the server accepts: {outcome.message}",
            pause_secs=pause,
        )
    if status == 422:
        return GiveUp(
            kind=DeadLetterKind.PARTIAL,
            message="HTTP 422: partially ingested (a materialized view failed); not retried "
            f"because retrying may duplicate rows: {outcome.message}",
            pause_secs=pause,
        )
    if not policy.is_retryable_status(status):
        return GiveUp(kind=DeadLetterKind.REJECTED, message=_rejection(outcome, context.api_url), pause_secs=pause)
    if status == 429 or (status == 503 and server_wait is not None):
        return _throttled(outcome, server_wait, pause, context, policy)
    return _retry_or_give_up(
        str(status), f"HTTP {status}: {outcome.message}", server_wait, context, policy, pause_secs=pause)


def _throttled(
    outcome: BoundedResponse, server_wait: float | None, pause: float, context: AttemptContext, policy: RetryPolicy,
) -> Decision:
    """429, or 503 with Retry-After: nothing was stored; wait without spending an attempt."""
    number = context.throttled + 1
    # The server's wish, not the growing backoff: the process's limiter already
    # paces every request, and a batch that grew its own waits would lose its share.
    if server_wait is not None:
        delay = min(max(server_wait, 0.0), policy.max_retry_after_secs)
    else:
        delay = policy.backoff_secs(number, rand=context.rand)
    # Every thread of the process waits as long as this batch: the server's wish (a
    # 429 or a 503 with Retry-After), or the backoff when a 429 gives no hint.
    pause = max(pause, delay)
    waited = context.throttled_secs + max(delay, context.pause_ahead_secs, pause)
    last = f"HTTP {outcome.status}: {outcome.message}"
    if waited > policy.max_throttled_secs:
        return GiveUp(
            kind=DeadLetterKind.THROTTLED,
            message=f"throttled {number} times, {context.throttled_secs:.1f} s in all; the next wait would "
            f"bring it to {waited:.1f} s, past max_throttled_secs={policy.max_throttled_secs:g}; last: {last}",
            pause_secs=pause,
        )
    return Retry(after_secs=delay, cause=str(outcome.status), pause_secs=pause, throttled=True)


def throttle_check(*, throttled_secs: float, wait_secs: float, policy: RetryPolicy) -> str | None:
    """Why a batch may not wait ``wait_secs`` more on the service's "slow down", or ``None``."""
    if throttled_secs + wait_secs <= policy.max_throttled_secs:
        return None
    return (f"waiting on the rate limit would bring the batch's throttled time to "
            f"{throttled_secs + wait_secs:.1f} s, past max_throttled_secs={policy.max_throttled_secs:g}")


def budget_check(*, elapsed_secs: float, pause_ahead_secs: float, policy: RetryPolicy) -> str | None:
    """Why no attempt may start now (the batch's time budget), or ``None``."""
    start = elapsed_secs + pause_ahead_secs
    if start <= policy.max_total_secs:
        return None
    if pause_ahead_secs > 0:
        return (f"the rate-limit pause would end {start:.1f} s after the batch began, "
                f"past max_total_secs={policy.max_total_secs:g}")
    return f"{elapsed_secs:.1f} s had passed since the batch began, past max_total_secs={policy.max_total_secs:g}"


def _retry_or_give_up(
    cause: str, last: str, server_wait: float | None, context: AttemptContext, policy: RetryPolicy,
    *, pause_secs: float,
) -> Decision:
    give_up: str | None = None
    delay = 0.0
    if context.attempt >= policy.max_attempts:
        give_up = f"max_attempts={policy.max_attempts} reached"
    else:
        delay = policy.delay_secs(context.attempt, rand=context.rand, server_wait_secs=server_wait)
        start = context.elapsed_secs + max(delay, context.pause_ahead_secs, pause_secs)
        if start > policy.max_total_secs:
            give_up = (f"the next attempt would start {start:.1f} s after the first, "
                       f"past max_total_secs={policy.max_total_secs:g}")
    if give_up is not None:
        return GiveUp(
            kind=DeadLetterKind.RETRIES_EXHAUSTED,
            message=f"gave up after {context.attempt} attempts in {context.elapsed_secs:.1f} s ({give_up}); last: {last}",
            pause_secs=pause_secs,
        )
    return Retry(after_secs=delay, cause=cause, pause_secs=pause_secs)


def _delivered(outcome: BoundedResponse, context: AttemptContext, pause: float) -> Decision:
    counts = _row_counts(outcome.body)
    if counts is None:
        return Deliver(status=outcome.status, quarantined_rows=0, counts_read=False, pause_secs=pause)
    successful, quarantined = counts
    if successful + quarantined < context.rows:
        return GiveUp(
            kind=DeadLetterKind.ROWS_UNACCOUNTED,
            message=f"HTTP {outcome.status}: the server counted {successful} rows stored and {quarantined} "
            f"quarantined of {context.rows} sent; not retried, since it may have stored some",
            pause_secs=pause,
        )
    return Deliver(
        status=outcome.status, quarantined_rows=min(quarantined, context.rows), counts_read=True, pause_secs=pause)


def _row_counts(body: bytes | None) -> tuple[int, int] | None:
    """(successful_rows, quarantined_rows) from a 2xx body, or None when it does not say."""
    if not body:
        return None
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    successful = parsed.get("successful_rows")
    # Left out or null: none quarantined (null read as unreadable let a short count through).
    quarantined = parsed.get("quarantined_rows")
    if quarantined is None:
        quarantined = 0
    if isinstance(successful, int) and isinstance(quarantined, int) and _is_count(successful) and _is_count(quarantined):
        return successful, quarantined
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rejection(outcome: BoundedResponse, api_url: str) -> str:
    status, message = outcome.status, outcome.message
    if status == 404:
        return (
            "HTTP 404: the token's workspace is not on this host; check the API host/region "
            f"(api_url={api_url}). Server said: {message}"
        )
    if status in (401, 403):
        return f"HTTP {status}: {message} (check the token and its DATASOURCE:APPEND or DATASOURCE:CREATE scope)"
    if 300 <= status < 400:
        return f"HTTP {status}: unexpected redirect to {outcome.headers.get('Location', '')!r}; check api_url"
    if status < 200:
        return f"HTTP {status}: an interim answer where a final one was expected: {message}"
    return f"HTTP {status}: {message}"


# -- rate-limit headers ------------------------------------------------------------------


def server_wait_secs(status: int, headers: Mapping[str, str], now_epoch: float) -> float | None:
    """How long the server asks to wait: Retry-After (429/503), else X-RateLimit-Reset on 429."""
    if status in RETRY_AFTER_STATUS_CODES:
        wait = parse_retry_after(headers.get("Retry-After"), now_epoch)
        if wait is not None:
            return wait
    if status == 429:
        return parse_reset(headers.get("X-RateLimit-Reset"), now_epoch)
    return None


def _pause_secs(
    headers: Mapping[str, str], server_wait: float | None, now_epoch: float, policy: RetryPolicy,
) -> float:
    """The pause every thread of the client takes: the wait a throttling answer asks for (a 429,
    a 503 with Retry-After), or until an exhausted window resets."""
    cap = policy.max_retry_after_secs
    # Only a throttling answer has a server_wait (see server_wait_secs).
    pause = min(server_wait, cap) if server_wait is not None else 0.0
    remaining = headers.get("X-RateLimit-Remaining")
    if remaining is not None and _is_exhausted(remaining):
        reset = parse_reset(headers.get("X-RateLimit-Reset"), now_epoch)
        if reset is not None:
            pause = max(pause, min(reset, cap))
    return pause


def rate_window(headers: Mapping[str, str]) -> RateWindow | None:
    """``X-RateLimit-Limit`` and ``X-RateLimit-Remaining``, when both are there and make sense."""
    try:
        limit = float(headers.get("X-RateLimit-Limit", ""))
        remaining = float(headers.get("X-RateLimit-Remaining", ""))
    except ValueError:
        return None
    if not (math.isfinite(limit) and math.isfinite(remaining) and limit > 0 and remaining >= 0):
        return None
    return RateWindow(limit=limit, remaining=remaining)


def _is_exhausted(remaining: str) -> bool:
    try:
        return float(remaining) <= 0
    except ValueError:
        return False


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP-date); None if absent or garbled.

    A header sent twice (a proxy adding its own) reaches us joined, ``"5, 10"``:
    delta-seconds joined that way give the longest (an HTTP-date has a comma
    of its own, and a joined pair of dates reads as the first).
    """
    if value is None:
        return None
    value = value.strip()
    try:
        waits = [float(part) for part in value.split(",")]
    except ValueError:
        pass
    else:
        return max(max(waits), 0.0) if all(math.isfinite(w) for w in waits) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        secs = when.timestamp() - now_epoch
    except (TypeError, ValueError, IndexError, OverflowError):
        # Garbled, or a date (or zone offset) out of datetime's range.
        return None
    return max(secs, 0.0) if math.isfinite(secs) else None


def parse_reset(value: str | None, now_epoch: float) -> float | None:
    """X-RateLimit-Reset: seconds until the window resets (an epoch time, in seconds or milliseconds, is tolerated)."""
    if value is None:
        return None
    try:
        secs = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(secs):
        return None
    if secs > _EPOCH_MILLIS_THRESHOLD:
        secs = secs / 1000 - now_epoch
    elif secs > _EPOCH_THRESHOLD_SECS:
        secs -= now_epoch
    return max(secs, 0.0)
