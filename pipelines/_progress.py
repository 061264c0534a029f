"""Counting the rows a pipeline reads, with a progress line in the logs every few seconds."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

_LOG = logging.getLogger(__name__)

METRICS_NAMESPACE = "pipelines"
"""Namespace of the pipelines' own counters (the sink's are under ``tinybird``)."""
ROWS_READ = "rows_read"
"""Counter of the rows (records, lines, messages) a pipeline read and handed to the sink."""

_PROGRESS_EVERY_SECS = 2.0


class CountRowsDoFn(beam.DoFn):
    """Passes elements through, counts them (``pipelines/rows_read``) and logs progress.

    Every ``report_every_secs`` each worker logs ``read N rows (R rows/s)``:
    rows seen by that worker so far, and its rate since the last report. The
    per-element cost is one addition and one clock read; the Beam counter is
    updated once per report and at the end of each bundle.
    """

    def __init__(self, *, verb: str = "read", report_every_secs: float = _PROGRESS_EVERY_SECS) -> None:
        self._verb = verb
        self._report_every_secs = report_every_secs

    def setup(self) -> None:
        self._counter = Metrics.counter(METRICS_NAMESPACE, ROWS_READ)
        self._total = 0
        self._uncounted = 0
        self._last_report_at = time.monotonic()
        self._last_report_total = 0

    def process(self, element: Any) -> Iterator[Any]:
        self._uncounted += 1
        now = time.monotonic()
        if now - self._last_report_at >= self._report_every_secs:
            self._report(now)
        yield element

    def finish_bundle(self) -> None:
        self._flush_counter()

    def _flush_counter(self) -> None:
        if self._uncounted:
            self._counter.inc(self._uncounted)
            self._total += self._uncounted
            self._uncounted = 0

    def _report(self, now: float) -> None:
        self._flush_counter()
        rate = (self._total - self._last_report_total) / max(now - self._last_report_at, 1e-9)
        _LOG.info("%s %s rows (%s rows/s)", self._verb, f"{self._total:,}", f"{rate:,.0f}")
        self._last_report_at = now
        self._last_report_total = self._total
