"""When a run counts as failed: more than ``--max_dead_letter_ratio`` of the rows read dead-lettered.

Checked twice, by the same rule: from the metrics when the job ran here
(:func:`pipelines._summary.judge`, the summary's ``FAILED:`` line and exit status 1),
and inside the job by :class:`CheckDeadLetterRatio` on Dataflow, where a Flex
Template launch does not wait for the job: there the job itself fails.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions


class DeadLetterRatioExceeded(RuntimeError):
    """Raised inside the job (so that the runner marks it failed) when too much was dead-lettered."""


def dead_letter_ratio(*, rows_read: int, dead_letters: int) -> float:
    """Dead letters per row read (1.0 when dead letters came with no row read)."""
    if rows_read:
        return dead_letters / rows_read
    return 1.0 if dead_letters else 0.0


def ratio_failure(*, rows_read: int, dead_letters: int, max_ratio: float) -> str | None:
    """Why the run failed, or None when ``dead_letters`` is at most ``max_ratio`` of ``rows_read``."""
    ratio = dead_letter_ratio(rows_read=rows_read, dead_letters=dead_letters)
    if ratio <= max_ratio:
        return None
    return (f"{dead_letters:,} of {rows_read:,} rows read were dead-lettered ({ratio:.2%}), "
            f"more than --max_dead_letter_ratio {max_ratio:g} ({max_ratio:.2%})")


def in_job_max_ratio(options: PipelineOptions, max_ratio: float) -> float | None:
    """``max_ratio`` when the job itself must check it (a batch job on Dataflow), else None.

    Locally the launcher waits for the end and judges from the metrics; a
    streaming job has no end to count at.
    """
    standard = options.view_as(StandardOptions)
    runner = standard.runner if isinstance(standard.runner, str) else type(standard.runner).__name__
    # A Flex Template launch names the Dataflow runner and, writing a job spec, a template location.
    on_dataflow = "dataflow" in (runner or "").lower() or bool(
        options.view_as(GoogleCloudOptions).template_location)
    if standard.streaming or not on_dataflow:
        return None
    return max_ratio


def _check(rows_read: int, dead_letters: int, *, max_ratio: float) -> None:
    failure = ratio_failure(rows_read=rows_read, dead_letters=dead_letters, max_ratio=max_ratio)
    if failure is not None:
        raise DeadLetterRatioExceeded(failure)


class CheckDeadLetterRatio(beam.PTransform):
    """Fails the (batch) job when the dead letters are more than ``max_ratio`` of the rows read.

    Takes ``(rows, dead_letters)``: two PCollections, each counted once the
    input is complete. Nothing is lost by failing: it runs after the sink, on counts.
    """

    def __init__(self, max_ratio: float) -> None:
        super().__init__()
        self._max_ratio = max_ratio

    def expand(self, pcolls: Any) -> beam.PCollection:
        rows, dead_letters = pcolls
        rows_read = rows | "CountRowsRead" >> beam.combiners.Count.Globally()
        undelivered = dead_letters | "CountDeadLetters" >> beam.combiners.Count.Globally()
        return rows_read | "Check" >> beam.Map(
            _check, beam.pvalue.AsSingleton(undelivered), max_ratio=self._max_ratio)
