"""When and how long to wait before re-sending a batch to the Events API.

:class:`RetryPolicy` is an immutable value: the HTTP client counts attempts and
asks the policy for the delay; the backoff is a pure function of the retry number
and a random number, so tests check it against exact values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

__all__ = [
    "DEFAULT_MAX_THROTTLED_SECS", "MAX_WAIT_SECS", "RETRYABLE_STATUS_CODES", "RETRY_AFTER_STATUS_CODES", "RetryPolicy",
]

RETRYABLE_STATUS_CODES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses retried by default: request timeout, rate limit and transient server
errors. 501 (not implemented) is not among them: retrying cannot fix it."""

RETRY_AFTER_STATUS_CODES: frozenset[int] = frozenset({429, 503})
"""Statuses whose ``Retry-After`` header is honoured (up to ``max_retry_after_secs``).
A 429, and a 503 that carries ``Retry-After``, are *throttling*: the server stored
nothing and asked to slow down. They do not spend ``max_attempts``; the time
spent on them is bounded by ``max_throttled_secs`` instead."""

DEFAULT_MAX_THROTTLED_SECS = 1800.0
"""Half an hour of "slow down" per batch before it is dead-lettered as ``throttled``.

Batch (a backfill): the input is all there, and the only cost of waiting is a
longer job; a throttled batch that is dead-lettered has to be replayed by hand.
Many workers sharing one data source's limit can each wait long for their
share, so the budget is far longer than the error budget (``max_total_secs``):
a job offering ten times what the data source accepts still delivers everything.
Streaming: while a batch waits, its bundle does not commit, so the watermark
holds and (on Pub/Sub) its messages stay unacknowledged, which the runner keeps
leased; the runner sees the wait in the throttling counters rather than as
errors. The same half hour is a bound on that stall that an on-call engineer
notices before anything is lost; lower it (say to 300) when fresh data matters
more than complete data, raise it for a backfill."""

MAX_WAIT_SECS = 1e9
"""The longest budget or timeout (about 31 years: "never" in practice). A batch's send is waited
for, and a socket waits, at most a few of them together; a thread or a socket cannot wait past
about 9.2e9 s (OverflowError), which a longer one made every bundle's post step fail with."""

# Never retryable, whatever the policy says: 413 is answered by splitting the
# batch, and re-sending after a 422 (partially ingested) duplicates rows.
_NEVER_RETRIED = frozenset({413, 422})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry a failed request.

    A request is retried when the response status is in ``retry_status_codes`` or
    when it timed out or its connection failed. Retry ``n`` (the ``n``-th attempt
    after the first) waits :meth:`delay_secs`: the jittered exponential backoff,
    or longer when the server asked to wait (``Retry-After``, or
    ``X-RateLimit-Reset`` on a 429), honouring the server up to
    ``max_retry_after_secs``. A throttling answer (429, or 503 with
    ``Retry-After``) is waited out without spending an attempt, for at most
    ``max_throttled_secs`` per batch. The defaults retry errors 5 times, waiting 0.25-0.5,
    0.5-1, 1-2, 2-4 and 4-8 s (7.75 to 15.5 s in all): enough to ride out a short
    overload without stalling a bundle for minutes.

    Attributes:
        max_attempts: Attempts per batch, the first included; 1 disables retries.
        initial_backoff_secs: Backoff before the first retry, before jitter.
        backoff_multiplier: Growth of the backoff per retry (>= 1).
        max_backoff_secs: Cap on the backoff before jitter.
        max_total_secs: The error time budget of one batch: no attempt (a retry
            or a half of a 413 split) starts later than this after the batch's
            send began, not counting time spent throttled; when the next wait
            would end past it, what is left of the batch fails at once. At most
            :data:`MAX_WAIT_SECS`, as ``max_throttled_secs``.
        max_throttled_secs: The throttling budget of one batch: the longest it
            waits, in all, on the server's "slow down" (429, 503 with
            ``Retry-After``, an exhausted ``X-RateLimit-Remaining``) and on the
            worker's shared limiter. When the next wait would end past it, the
            batch is dead-lettered as ``throttled``. Default
            :data:`DEFAULT_MAX_THROTTLED_SECS` (see there why). With
            ``max_total_secs`` and one attempt's deadline on top, it bounds
            how long a batch can take.
        max_retry_after_secs: Cap on a wait asked by the server; a larger value is
            cut to this (the backoff still applies).
        retry_status_codes: HTTP statuses that are retried. 413 (split instead)
            and 422 (partially ingested: retrying duplicates) are refused.
    """

    max_attempts: int = 6
    initial_backoff_secs: float = 0.5
    backoff_multiplier: float = 2.0
    max_backoff_secs: float = 30.0
    max_total_secs: float = 300.0
    max_throttled_secs: float = DEFAULT_MAX_THROTTLED_SECS
    max_retry_after_secs: float = 120.0
    retry_status_codes: frozenset[int] = RETRYABLE_STATUS_CODES

    def __post_init__(self) -> None:
        if not _is_int(self.max_attempts) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        _check_number("initial_backoff_secs", self.initial_backoff_secs, minimum=0.0)
        _check_number("backoff_multiplier", self.backoff_multiplier, minimum=1.0)
        _check_number("max_backoff_secs", self.max_backoff_secs, minimum=0.0)
        if self.max_backoff_secs < self.initial_backoff_secs:
            raise ValueError(
                f"max_backoff_secs ({self.max_backoff_secs!r}) must be >= "
                f"initial_backoff_secs ({self.initial_backoff_secs!r})"
            )
        _check_number("max_total_secs", self.max_total_secs, minimum=0.0, strict=True)
        _check_number("max_throttled_secs", self.max_throttled_secs, minimum=0.0)
        for name in ("max_total_secs", "max_throttled_secs"):
            check_wait_secs(name, getattr(self, name))
        _check_number("max_retry_after_secs", self.max_retry_after_secs, minimum=0.0)
        codes = self.retry_status_codes
        if isinstance(codes, (str, bytes)) or not isinstance(codes, Iterable):
            raise ValueError(f"retry_status_codes must be a set of ints, got {codes!r}")
        codes = frozenset(codes)
        for code in sorted(codes, key=repr):
            if not _is_int(code) or not 400 <= code <= 599:
                raise ValueError(
                    f"retry_status_codes must hold HTTP error statuses (400-599), got {code!r}"
                )
            if code in _NEVER_RETRIED:
                raise ValueError(
                    f"retry_status_codes must not hold {code}: 413 is handled by splitting "
                    "the batch, and retrying a 422 (partially ingested) duplicates rows"
                )
        object.__setattr__(self, "retry_status_codes", codes)

    def is_retryable_status(self, status: int) -> bool:
        """Whether a response with this status is retried."""
        return status in self.retry_status_codes

    def backoff_secs(self, retry_number: int, *, rand: float) -> float:
        """The jittered backoff before retry ``retry_number`` (1 = first retry).

        Equal jitter: ``base = min(max_backoff_secs, initial_backoff_secs *
        backoff_multiplier ** (retry_number - 1))`` and the result is
        ``base / 2 + rand * base / 2``. Half the wait is guaranteed (the backoff
        really grows) and half is spread, so clients that failed together do not
        retry together.

        Args:
            retry_number: 1 for the first retry, 2 for the second, ...
            rand: A number in ``[0, 1]``, normally ``random.random()``.
        """
        if not _is_int(retry_number) or retry_number < 1:
            raise ValueError(f"retry_number must be an int >= 1, got {retry_number!r}")
        if not (isinstance(rand, (int, float)) and 0.0 <= rand <= 1.0):
            raise ValueError(f"rand must be a number in [0, 1], got {rand!r}")
        try:
            raw = self.initial_backoff_secs * self.backoff_multiplier ** (retry_number - 1)
        except OverflowError:
            raw = math.inf
        base = min(self.max_backoff_secs, raw)
        return base / 2.0 + rand * base / 2.0

    def delay_secs(
        self, retry_number: int, *, rand: float, server_wait_secs: float | None = None
    ) -> float:
        """The wait before retry ``retry_number``.

        ``max(backoff_secs(retry_number, rand=rand), min(server_wait_secs,
        max_retry_after_secs))``: the server's wish is honoured up to the cap, and
        never shortens the backoff. A negative server wait counts as 0; ``None``
        means the server did not ask.
        """
        backoff = self.backoff_secs(retry_number, rand=rand)
        if server_wait_secs is None or math.isnan(server_wait_secs):
            return backoff
        server = min(max(float(server_wait_secs), 0.0), self.max_retry_after_secs)
        return max(backoff, server)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_wait_secs(name: str, value: float) -> None:
    """Raises ValueError when ``value`` (a checked number of seconds) is over :data:`MAX_WAIT_SECS`."""
    if value > MAX_WAIT_SECS:
        raise ValueError(f"{name} must be at most {MAX_WAIT_SECS:g} (about 31 years), got {value!r}")


def _check_number(name: str, value: object, *, minimum: float, strict: bool = False) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > minimum if strict else value >= minimum)
    )
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
