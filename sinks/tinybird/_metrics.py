"""The sink's Beam metrics, all under the namespace ``tinybird``.

Counters: ``elements_in``, ``rows_acknowledged``, ``rows_quarantined``,
``requests``, ``responses_2xx``/``3xx``/``4xx``/``5xx``, ``responses_none``
(timeouts, passed deadlines and connection errors), ``responses_2xx_unreadable``
(a 2xx whose body did not give the row counts: unreadable, cut short, not
JSON; delivered on its status) and
``rows_acknowledged_uncounted`` (their rows), ``responses_2xx_unaccounted`` (a
2xx that counted fewer rows than were sent: its rows are dead-lettered as
``rows_unaccounted``), ``retries`` and ``retries_<cause>`` (cause is the status
code, ``413`` for a split, ``timeout``, ``deadline``, ``connect_timeout``,
``connection_error`` or ``protocol_error``), ``bytes_raw`` and
``bytes_wire`` (per attempt, before and after compression), ``dead_letters``
and ``dead_letters_<kind>``, ``lineless_dead_letters``; per data source, in namespace
``tinybird/<datasource>``: ``rows_acknowledged`` and ``dead_letters`` (an
``unroutable`` element has no data source: it counts in ``dead_letters`` and
``dead_letters_unroutable`` alone). Distributions: ``batch_bytes``, ``batch_rows``,
``request_latency_ms``. The dead-letter file writers count
``dead_letter_records_written`` and ``dead_letter_files_written`` (``dead_letters.py``).

Throttling (time spent waiting because the service said "slow down", on the
process's shared limiter or after a 429/503 with ``Retry-After``), for the
runner's autoscaler and for people: ``cumulativeThrottlingSeconds`` in this
namespace (the counter Beam's Python IOs use: BigQuery, GCS, Datastore),
``throttling-msecs`` in namespace ``beam-throttling-metrics`` (Beam Java's
``Metrics.THROTTLE_TIME_*``, read by Dataflow's workers so that a throttled job
is not given more workers), ``responses_throttled`` (429s and 503s with
``Retry-After``), and the gauge ``concurrency_limit`` (the shared limiter's
current requests-in-flight limit).

Beam metric cells are bound to the bundle's thread, so everything is recorded
from there, after the HTTP threads hand their reports back.
"""

from __future__ import annotations

from typing import Any

from apache_beam.metrics import Metrics

from sinks.tinybird._http.outcomes import SendReport
from sinks.tinybird.dead_letters import DeadLetterKind

NAMESPACE = "tinybird"
THROTTLING_NAMESPACE = "beam-throttling-metrics"
THROTTLING_MSECS = "throttling-msecs"
THROTTLING_SECONDS = "cumulativeThrottlingSeconds"
LINELESS_DEAD_LETTERS = "lineless_dead_letters"
"""Counter: dead letters that hold no line (the element could not be encoded), which a replay cannot resend."""
# Counter handles kept per (data source, name); past this many, dropped and made again.
_MAX_DATASOURCE_COUNTERS = 2_000


class SinkMetrics:
    """Records what one batch's :class:`SendReport` says."""

    def __init__(self) -> None:
        self._counters: dict[str, Any] = {}
        self._by_datasource: dict[tuple[str, str], Any] = {}
        self._batch_bytes = Metrics.distribution(NAMESPACE, "batch_bytes")
        self._batch_rows = Metrics.distribution(NAMESPACE, "batch_rows")
        self._latency_ms = Metrics.distribution(NAMESPACE, "request_latency_ms")
        self._throttled_secs = Metrics.counter(NAMESPACE, THROTTLING_SECONDS)
        self._throttled_msecs = Metrics.counter(THROTTLING_NAMESPACE, THROTTLING_MSECS)
        self._concurrency = Metrics.gauge(NAMESPACE, "concurrency_limit")
        # Counters take integers: the fractions are carried to the next report.
        self._throttled_carry_secs = 0.0
        self._throttled_carry_msecs = 0.0

    def inc(self, name: str, value: int = 1) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
        counter.inc(value)

    def batch(self, *, payload_bytes: int, rows: int) -> None:
        self._batch_bytes.update(payload_bytes)
        self._batch_rows.update(rows)

    def report(self, report: SendReport) -> None:
        if report.throttled_secs > 0:
            self._throttled_carry_secs += report.throttled_secs
            self._throttled_carry_msecs += report.throttled_secs * 1000.0
            whole_secs, whole_msecs = int(self._throttled_carry_secs), int(self._throttled_carry_msecs)
            if whole_secs:
                self._throttled_secs.inc(whole_secs)
                self._throttled_carry_secs -= whole_secs
            if whole_msecs:
                self._throttled_msecs.inc(whole_msecs)
                self._throttled_carry_msecs -= whole_msecs
        if report.throttled_answers:
            self.inc("responses_throttled", report.throttled_answers)
        if report.concurrency_limit is not None:
            self._concurrency.set(report.concurrency_limit)
        for attempt in report.attempts:
            self.inc("requests")
            self.inc("bytes_raw", attempt.raw_bytes)
            self.inc("bytes_wire", attempt.wire_bytes)
            self._latency_ms.update(int(attempt.latency_secs * 1000))
            self.inc(f"responses_{attempt.status // 100}xx" if attempt.status else "responses_none")
            if attempt.retry_cause:
                self.inc("retries")
                self.inc(f"retries_{attempt.retry_cause}")
        for part in report.delivered:
            self.inc("rows_acknowledged", part.rows)
            if part.quarantined_rows:
                self.inc("rows_quarantined", part.quarantined_rows)
            if not part.counts_read:
                self.inc("responses_2xx_unreadable")
                self.inc("rows_acknowledged_uncounted", part.rows)
        for failed in report.failed:
            if failed.kind is DeadLetterKind.ROWS_UNACCOUNTED:
                self.inc("responses_2xx_unaccounted")

    def dead_letters(self, kind: str, count: int, *, datasource: str = "") -> None:
        """Dead letters of ``kind``; ``datasource``: a checked data source name, or ``""`` for none.

        A name becomes a counter namespace: never pass one the router did not
        accept (it may be anything a ``datasource`` function returned).
        """
        self.inc("dead_letters", count)
        self.inc(f"dead_letters_{kind}", count)
        if datasource:
            self._of(datasource, "dead_letters").inc(count)

    def without_line(self) -> None:
        """A dead letter that holds no line (the element could not be encoded): nothing to replay."""
        self.inc(LINELESS_DEAD_LETTERS)

    def acknowledged(self, datasource: str, rows: int) -> None:
        """Rows a data source acknowledged (the total is counted from the report)."""
        self._of(datasource, "rows_acknowledged").inc(rows)

    def _of(self, datasource: str, name: str) -> Any:
        key = (datasource, name)
        counter = self._by_datasource.get(key)
        if counter is None:
            if len(self._by_datasource) >= _MAX_DATASOURCE_COUNTERS:
                self._by_datasource.clear()
            counter = self._by_datasource[key] = Metrics.counter(f"{NAMESPACE}/{datasource}", name)
        return counter
