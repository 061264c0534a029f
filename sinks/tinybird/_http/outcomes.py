"""Frozen records of the HTTP layer: what one attempt returned, what to do about
it, and what became of a batch.

The transport returns a :class:`BoundedResponse` or a :class:`TransportFailure`;
the classifier turns either into a :data:`Decision`; the client gathers
:class:`Delivered` and :class:`Failed` parts and every :class:`Attempt` into a
:class:`SendReport`. Every text held here was scrubbed of the token, then capped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from sinks.tinybird.dead_letters import DeadLetterKind

__all__ = [
    "Attempt",
    "BoundedResponse",
    "Decision",
    "Deliver",
    "Delivered",
    "Failed",
    "GiveUp",
    "Retry",
    "SendReport",
    "Split",
    "TransportFailure",
]


# -- what one attempt returned ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoundedResponse:
    """A final (non-1xx) answer, read within the attempt's deadline and size caps.

    Attributes:
        status: The HTTP status.
        headers: Only the allow-listed headers, each value scrubbed and capped (none
            when the HTTP stack refused the header block: then the status alone stands).
        body: The body, decoded (at most the cap), or ``None`` when it could not
            be read whole: cut short, larger than the cap, not decodable, too slow.
        body_error: Why ``body`` is ``None``; else ``None``.
        message: The server's text for people (its JSON ``error``, else the body
            as text), scrubbed and capped; ``"(empty body)"`` or the body error.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes | None
    body_error: str | None
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransportFailure:
    """An attempt that got no final answer.

    Attributes:
        error: ``"connect_timeout"``, ``"timeout"`` (a read timeout: the server may
            have stored the rows), ``"deadline"`` (the attempt's wall-clock
            deadline passed: likewise), ``"connection_error"`` (refused, reset,
            closed), ``"protocol_error"`` (a broken answer),
            ``"tls_verification_failed"`` or ``"closed"`` (the client was closed).
        message: What happened, scrubbed and capped.
        retryable: Whether another attempt may succeed.
    """

    error: str
    message: str
    retryable: bool


# -- what to do about it ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deliver:
    """The rows were taken (2xx): acknowledge them.

    Attributes:
        status: The 2xx status.
        quarantined_rows: Rows the server put in quarantine, as its body said.
        counts_read: Whether the body's row counts were read; ``False`` when the
            body was unreadable (the status decides: resending would duplicate).
        pause_secs: A pause every thread of the client takes before its next
            attempt (the server's rate-limit window is exhausted).
    """

    status: int
    quarantined_rows: int
    counts_read: bool
    pause_secs: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split:
    """413 for several rows: send each half on its own."""

    pause_secs: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Retry:
    """Send the same rows again after ``after_secs``.

    Attributes:
        after_secs: The wait (backoff, or the server's wish up to the policy's cap).
        cause: The status as text (``"503"``) or the transport error (``"timeout"``).
        pause_secs: A pause for every thread of the process (a throttling answer:
            429, 503 with ``Retry-After``).
        throttled: The server said "slow down" (429, 503 with ``Retry-After``):
            the wait counts against ``max_throttled_secs``, not ``max_attempts``.
    """

    after_secs: float
    cause: str
    pause_secs: float = 0.0
    throttled: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class GiveUp:
    """Dead-letter the rows with ``kind`` and ``message``."""

    kind: DeadLetterKind
    message: str
    pause_secs: float = 0.0


Decision = Deliver | Split | Retry | GiveUp


# -- what became of a batch -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Attempt:
    """One HTTP attempt, for metrics.

    Attributes:
        started_at: Wall-clock time (epoch seconds) when the request started.
        latency_secs: Time until the response (or the error), by the client's clock.
        status: HTTP status, or ``None`` when there was no response.
        error: ``None`` when a response arrived, else the :class:`TransportFailure` error.
        raw_bytes: Uncompressed NDJSON bytes carried.
        wire_bytes: Bytes of the request body as sent (compressed).
        retry_cause: Why these rows are sent again: the status as text (``"429"``,
            ``"503"``, ``"413"`` when the part is split in two) or the ``error``;
            ``None`` when they are not sent again.
        body_unreadable: A response arrived but its body could not be read whole.
    """

    started_at: float
    latency_secs: float
    status: int | None
    error: str | None
    raw_bytes: int
    wire_bytes: int
    retry_cause: str | None
    body_unreadable: bool = False


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
        counts_read: Whether the server's row counts were read from its body;
            ``False``: the body was unreadable and the 2xx status alone decided.
    """

    rows: int
    raw_bytes: int
    status: int
    quarantined_rows: int
    attempts: int
    counts_read: bool = True


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
        first_row: The index, in the sent payload, of the part's first line
            (the part is a run of whole lines of it), carried from where the
            payload was split: searching for the part's bytes would find an
            earlier copy of a duplicated line.
    """

    payload: bytes
    rows: int
    kind: DeadLetterKind
    status: int | None
    message: str
    attempts: int
    first_attempt_at: float
    last_attempt_at: float
    first_row: int = 0

    def __repr__(self) -> str:
        # Never print row data (it can be large or sensitive).
        return (
            f"Failed(rows={self.rows}, payload_bytes={len(self.payload)}, kind={self.kind.value!r}, "
            f"status={self.status!r}, message={self.message!r}, attempts={self.attempts})"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SendReport:
    """The outcome of one ``EventsApiClient.send``.

    Every byte of the payload is in exactly one ``delivered`` or ``failed`` part,
    in payload order within each tuple.

    Attributes:
        delivered: Parts the server accepted.
        failed: Parts that were not delivered.
        attempts: Every HTTP attempt, in order.
        paced_secs: Time spent waiting on the process's shared limiter before
            starting attempts (the server's pause, client-side throttling, the
            concurrency limit), not counting backoff.
        throttled_secs: Time spent waiting because the service said "slow
            down": the waits after throttling answers, and the part of
            ``paced_secs`` that is the service's doing (its pause, the paced
            rate, a concurrency limit lowered by back-pressure; not waiting
            for a slot that other requests of the process hold).
        throttled_answers: Answers that were throttling (429, 503 with ``Retry-After``).
        concurrency_limit: The limiter's concurrency limit when the send ended.
    """

    delivered: tuple[Delivered, ...]
    failed: tuple[Failed, ...]
    attempts: tuple[Attempt, ...]
    paced_secs: float = 0.0
    throttled_secs: float = 0.0
    throttled_answers: int = 0
    concurrency_limit: int | None = None

    @property
    def delivered_rows(self) -> int:
        return sum(d.rows for d in self.delivered)

    @property
    def failed_rows(self) -> int:
        return sum(f.rows for f in self.failed)
