"""Running a pipeline to the end: the endpoint around it, the summary after it, usage errors."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineState

from pipelines._endpoint import Endpoint, LocalServerUnavailable, tinybird_endpoint
from pipelines._options import (
    DEFAULT_MAX_DEAD_LETTER_RATIO,
    SinkConfig,
    UsageError,
    beam_options_without_secrets,
)
from pipelines._summary import RunSummary, format_summary, judge, list_dead_letter_files, summarise

_LOG = logging.getLogger(__name__)

STREAMING_ENDS = frozenset({PipelineState.DRAINED, PipelineState.UPDATED})
"""Ends of a streaming job other than DONE that are no failure: a drain (how one is stopped) and an
update in place (a new job goes on from its state)."""


def check_input_exists(file_pattern: str, *, argv: Sequence[str] = ()) -> None:
    """Raises :class:`UsageError` when nothing matches ``file_pattern`` (before anything starts).

    ``argv`` configures the filesystems first, as a pipeline would (``s3://``
    needs its options).
    """
    FileSystems.set_options(beam_options_without_secrets(argv))
    try:
        matched = FileSystems.match([file_pattern])[0].metadata_list
    except Exception as error:
        raise UsageError(f"cannot list --input {file_pattern!r}: {error}") from error
    if not matched:
        raise UsageError(f"no file matches --input {file_pattern!r}")


def run_pipeline(
    *,
    title: str,
    argv: Sequence[str],
    config: SinkConfig,
    build: Callable[[beam.Pipeline, Endpoint, SinkConfig], None],
    dead_letter_path: str | None,
    out: TextIO | None = None,
    data_dir: Path | None = None,
) -> RunSummary | None:
    """Runs one pipeline to the end and prints its summary.

    Returns None, with no summary, when the runner only submitted the job
    without running it here (a Flex Template launch writes a job spec). The
    summary has a ``failure`` when more than ``--max_dead_letter_ratio`` of the
    rows read was dead-lettered.
    Without ``--runner``, a batch job runs on Beam's in-process ``FnApiRunner``.

    Args:
        title: The pipeline's name, for the summary.
        argv: The command line; passed to Beam without ``--token``.
        config: The sink's settings.
        build: Adds the pipeline's transforms to the (empty) pipeline.
        dead_letter_path: Where dead letters are written, to list in the summary.
        out: Where the summary goes; default stdout.
        data_dir: The embedded server's data directory; default ``./tinybird-local``.

    A streaming job that was drained ends as one that is DONE, with its
    summary; one updated in place (UPDATED) is replaced by a new job, and ends
    with a line saying so. Any other end but DONE fails (on a batch job, any end but DONE).

    Raises:
        RuntimeError: The pipeline failed or was cancelled.
    """
    out = out if out is not None else sys.stdout
    options = beam_options_without_secrets(argv)
    max_dead_letter_ratio = options.get_all_options().get("max_dead_letter_ratio")
    if max_dead_letter_ratio is None:
        max_dead_letter_ratio = DEFAULT_MAX_DEAD_LETTER_RATIO
    standard = options.view_as(StandardOptions)
    if standard.runner is None and not standard.streaming:
        # What Beam's DirectRunner runs batch pipelines on, named: in Beam 2.77
        # the DirectRunner first downloads the Prism runner from github.com.
        standard.runner = "FnApiRunner"
    with tinybird_endpoint(config, data_dir=data_dir) as endpoint:
        started = time.monotonic()
        # Files' modification times have a one-second resolution on some filesystems.
        started_epoch_secs = time.time() - 1.0
        pipeline = beam.Pipeline(options=options)
        build(pipeline, endpoint, config)
        result = pipeline.run()
        try:
            state = result.wait_until_finish()
        except KeyboardInterrupt:
            _LOG.warning("Interrupted: cancelling the pipeline")
            with contextlib.suppress(Exception):
                result.cancel()
            raise
        except Exception as error:
            # Beam's Dataflow and portable (Flink) results raise on any end but DONE, a drain
            # included; the result still says which end it was.
            state = getattr(result, "state", None)
            if not (standard.streaming and state in STREAMING_ENDS):
                raise RuntimeError(ended_badly(title, state, streaming=bool(standard.streaming),
                                               error=error)) from error
        if standard.streaming and state == PipelineState.UPDATED:
            out.write(f"{title}: replaced by an update (state UPDATED): the new job goes on from this "
                      "one's state; follow it on its runner.\n")
            out.flush()
            return None
        if standard.streaming and state == PipelineState.DRAINED:
            out.write(f"{title}: drained (state DRAINED), the way a streaming job is stopped: it stopped "
                      "reading and sent what it held.\n")
        elif state in (PipelineState.FAILED, PipelineState.CANCELLED, PipelineState.UPDATED,
                       PipelineState.DRAINED):
            raise RuntimeError(ended_badly(title, state, streaming=bool(standard.streaming)))
        if state not in (None, PipelineState.DONE, PipelineState.DRAINED):
            # E.g. a Flex Template launch: the runner wrote a job spec (state
            # UNKNOWN, no job to wait for, no metrics); the runner's console has the figures.
            out.write(f"{title}: submitted (state {state}); follow the job on its runner.\n")
            out.flush()
            return None
        summary = judge(summarise(
            result, elapsed_secs=time.monotonic() - started,
            dead_letter_files=list_dead_letter_files(dead_letter_path, label=config.dead_letter_label,
                                                     since_epoch_secs=started_epoch_secs)),
            max_dead_letter_ratio=max_dead_letter_ratio)
        out.write(format_summary(summary, title=title, config=config, endpoint=endpoint,
                                 dead_letter_path=dead_letter_path))
        out.flush()
    return summary


def ended_badly(title: str, state: object, *, streaming: bool, error: BaseException | None = None) -> str:
    """Why a run that ended in ``state`` failed, for its ``RuntimeError``."""
    text = f"{title} ended in state {state}"
    if streaming and state == PipelineState.CANCELLED:
        text += (": a cancelled streaming job drops the rows it held whose messages were acknowledged; "
                 "stop one with a drain")
    return text + (f": {error}" if error is not None else "")


def configure_logging() -> None:
    """INFO from the pipelines and the sink (progress), WARNING from everything else."""
    # force: importing Beam may already have given the root logger a handler.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    for name in ("pipelines", "sinks"):
        logging.getLogger(name).setLevel(logging.INFO)


def exit_on_usage_error(main: Callable[[Sequence[str]], Any], argv: Sequence[str], *,
                        description: str | None = None) -> None:
    """Runs ``main(argv)`` and turns its outcome into the process's exit status.

    A :class:`UsageError` (or a missing local server) becomes one ``error: ...``
    line on stderr and status 2, without a traceback; a :class:`RunSummary`
    with a ``failure`` (too many dead letters) becomes status 1, its summary
    having said why. With ``-h``/``--help``, ``description`` (the pipeline's
    module docstring) is printed before the options.
    """
    if description and {"-h", "--help"} & set(argv):
        print(description.strip() + "\n")
    try:
        outcome = main(argv)
    except (UsageError, LocalServerUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(outcome, RunSummary) and outcome.failure is not None:
        raise SystemExit(1)
