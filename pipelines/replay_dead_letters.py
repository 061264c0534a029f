"""Replay dead letters: resends what an earlier run could not deliver, once the cause is fixed.

    python -m pipelines.replay_dead_letters --input 'dead-letters/*' \\
        --dead_letter_path dead-letters-replayed/ [--api_url https://api.tinybird.co ...]

Reads dead-letter files (JSON lines ``*.jsonl`` and Avro ``*.avro``) and resends
each record's ``line`` exactly as it was, byte for byte, to the data source the
record names (its ``datasource``), or, with ``--datasource NAME``, every line to
``NAME``. A record that names no data source (``datasource`` empty: an
unroutable element whose function gave no name) needs ``--datasource``: without
it, it is dead-lettered again as ``unroutable``. What fails again is written to
``--dead_letter_path``, which must be a new location: the job refuses, before
anything runs, a path equal to or containing the input's folder, or inside it
where the input's pattern may read (``replayed/`` next to ``dead-letters-<run>-*``
is taken), so the files being read are never overwritten nor read again.

Records without a ``line`` (elements that could not be encoded at all), or whose
line the sink would refuse as an element (one an ``orjson.Fragment`` made that
is not JSON), cannot be replayed: they are counted as ``unreplayable`` and
copied unchanged to the new dead-letter path, so that it holds everything
still undelivered and the old location can be deleted. Without ``--api_url``
the job uses the local Events API server on ``./tinybird-local/``, like the
files pipeline.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines._dead_letter_ratio import CheckDeadLetterRatio, in_job_max_ratio
from pipelines._endpoint import Endpoint
from pipelines._options import (
    SinkConfig,
    UsageError,
    add_argument_once,
    add_sink_arguments,
    config_or_usage_error,
)
from pipelines._progress import METRICS_NAMESPACE, CountRowsDoFn
from pipelines._running import check_input_exists, configure_logging, exit_on_usage_error, run_pipeline
from pipelines._summary import UNREPLAYABLE_KIND, RunSummary
from sinks.tinybird._encoding import EncodingError, encode_element

TITLE = "Replay dead letters"
UNREPLAYABLE = f"dead_letters_{UNREPLAYABLE_KIND}"
"""Counter (namespace ``pipelines``) of records without a line to send, carried over unchanged."""
_UNREPLAYABLE_TAG = "unreplayable"
_GLOB_CHARS = re.compile(r"[*?\[{]")


class ReplayDeadLettersOptions(PipelineOptions):
    """Options of the replay pipeline; see ``--help``."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        add_argument_once(
            parser, "--input",
            help="Dead-letter files to replay: a path or glob on any Beam filesystem, e.g. "
                 "'dead-letters/*' or gs://bucket/dead-letters/*. *.avro files are read as Avro, "
                 "others as JSON lines.")
        # No --datasource_field: each line goes back to the data source its record names.
        add_sink_arguments(parser, datasource_field=False)


class _RoutedLine(bytes):
    """A dead letter's line, as the bytes to send, carrying the data source its record names.

    The sink sends a ``bytes`` element as it is (it only checks that it holds one
    JSON object), so the line keeps every byte; the data source rides along as an
    attribute, for :func:`record_datasource`. Beam's coders encode only an exact
    ``bytes`` as bytes: the replay declares this type for its lines, which gets
    the pickling coder, and ``__reduce__`` keeps the attribute through it.
    """

    datasource: str

    def __new__(cls, line: bytes, datasource: str) -> _RoutedLine:
        routed = super().__new__(cls, line)
        routed.datasource = datasource
        return routed

    def __reduce__(self) -> tuple[Any, ...]:
        return _RoutedLine, (bytes(self), self.datasource)


def record_datasource(line: _RoutedLine) -> str:
    """The data source a line goes back to without ``--datasource``: the one its record names.

    Raises:
        ValueError: The record names none (an element that was unroutable): its
            new dead letter says so and how to send it, rather than that ``''``
            is not a valid name.
    """
    if not line.datasource:
        raise ValueError("the dead letter names no data source (its element was unroutable); "
                         "replay it with --datasource NAME")
    return line.datasource


class _SplitDoFn(beam.DoFn):
    """Replayable records -> their line (a :class:`_RoutedLine`); the others -> the ``unreplayable`` output.

    A line the sink would refuse as an element is not replayable either: one an
    ``orjson.Fragment`` made (not JSON, or bytes that are not UTF-8, shown as
    ``\\x`` escapes). Sent, it would come back as an ``unencodable`` dead
    letter holding only a repr cut to 500 characters; carried over, it keeps
    its whole line.
    """

    def setup(self) -> None:
        self._unreplayable = Metrics.counter(METRICS_NAMESPACE, UNREPLAYABLE)

    def process(self, record) -> Iterator[_RoutedLine | beam.pvalue.TaggedOutput]:
        line = None if record.line is None else record.line.encode("utf-8")
        if line is None or not _sendable(line):
            self._unreplayable.inc()
            yield beam.pvalue.TaggedOutput(_UNREPLAYABLE_TAG, record)
        else:
            yield _RoutedLine(line, record.datasource or "")


def _sendable(line: bytes) -> bool:
    """Whether the sink takes ``line`` as an element (it holds one JSON object), as it takes any ``bytes``."""
    try:
        encode_element(line)
    except EncodingError:
        return False
    return True


def split_replayable(records: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
    """Dead-letter records -> ``lines`` (:class:`_RoutedLine`) and ``unreplayable`` (records without a line to send)."""
    # Declared, so that a fusion break between here and the sink encodes the lines with
    # the pickling coder (an exact-bytes coder would drop their data source).
    return records | "Split" >> beam.ParDo(_SplitDoFn()).with_output_types(_RoutedLine).with_outputs(
        _UNREPLAYABLE_TAG, main="lines")


def build(pipeline: beam.Pipeline, *, input_pattern: str, write: beam.PTransform,
          dead_letter_path: str, dead_letter_format: str, dead_letter_label: str | None = None,
          max_dead_letter_ratio: float | None = None) -> beam.PCollection:
    """Adds read -> split -> resend -> write what is still undelivered; returns the file results.

    ``write`` must not write dead-letter files itself: its dead letters and the
    unreplayable records are written together, once, to ``dead_letter_path``.
    With ``max_dead_letter_ratio``, the job itself fails when more than that
    share of the lines resent failed again (records without a line are not counted).
    """
    from sinks.tinybird import ReadDeadLetters, WriteDeadLetterFiles

    records = (
        pipeline
        | "ReadDeadLetters" >> ReadDeadLetters(input_pattern)
        | "CountRows" >> beam.ParDo(CountRowsDoFn(verb="replaying"))
    )
    split = split_replayable(records)
    result = split.lines | "WriteToTinybird" >> write
    undelivered = (result.dead_letters, split[_UNREPLAYABLE_TAG]) | "StillUndelivered" >> beam.Flatten()
    if max_dead_letter_ratio is not None:
        # Of the lines resent, how many failed again: unreplayable records are carried over, not
        # counted (as pipelines._summary.judge does locally).
        _ = (split.lines, result.dead_letters) | "CheckDeadLetterRatio" >> CheckDeadLetterRatio(
            max_dead_letter_ratio)
    return undelivered | "WriteDeadLetters" >> WriteDeadLetterFiles(
        dead_letter_path, file_format=dead_letter_format, label=dead_letter_label)


def _is_url(path: str) -> bool:
    return "://" in path


def _normalise(path: str) -> str:
    if _is_url(path):
        scheme, rest = path.split("://", 1)
        rest = re.sub(r"/+", "/", rest).rstrip("/")
        return f"{scheme.lower()}://{rest}"
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def input_location(input_pattern: str) -> str:
    """The folder that ``input_pattern`` reads from, normalised.

    The part before the first glob character, cut back to its folder; for a
    pattern without glob characters, the folder itself when it is a local
    folder, else the file's folder.
    """
    match = _GLOB_CHARS.search(input_pattern)
    if match is None:
        if not _is_url(input_pattern) and os.path.isdir(input_pattern):
            return _normalise(input_pattern)
        head = input_pattern.rstrip("/")
        return _normalise(head.rsplit("/", 1)[0] if "/" in head else ".")
    head = input_pattern[: match.start()]
    folder = head.rsplit("/", 1)[0] if "/" in head else "."
    if _is_url(input_pattern) and "://" not in folder:
        folder = head  # e.g. "gs://bucket*": the scheme and bucket prefix
    return _normalise(folder or "/")


def _names_read(input_pattern: str) -> str:
    """How the names ``input_pattern`` reads in its folder start (``dead-letters-x-`` of
    ``gs://b/dead-letters-x-*``); ``""`` when it may read any name there."""
    match = _GLOB_CHARS.search(input_pattern)
    if match is None:
        return ""
    head = input_pattern[: match.start()]
    if "/" not in head or (_is_url(head) and "/" not in head.split("://", 1)[1]):
        return ""  # the working directory's names, or a bucket's: "gs://bucket*"
    return head.rsplit("/", 1)[1]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _overlaps(target: str, input_pattern: str) -> bool:
    """Whether ``target`` is the input's folder, holds it, or is inside it where the pattern may read."""
    source = input_location(input_pattern)
    if _within(source, target):
        return True
    if not _within(target, source):
        return False
    first = target[len(source.rstrip("/")) + 1:].split("/", 1)[0]
    return first.startswith(_names_read(input_pattern))


def check_output_outside_input(input_pattern: str, dead_letter_path: str | None) -> None:
    """Refuses a missing dead-letter path, or one that overlaps the input's location.

    Inside the input's folder, a folder whose name the pattern cannot read is
    no overlap: ``gs://b/replayed/`` for ``gs://b/dead-letters-x-*`` (the
    files of a run whose dead letters are at a bucket's root).

    Raises:
        UsageError: ``dead_letter_path`` is missing, equal to the input's
            folder, contains it, or is inside it where the pattern may read.
    """
    if not dead_letter_path:
        raise UsageError(
            "--dead_letter_path is required: a new location, outside the input's, for what fails again")
    source = input_location(input_pattern)
    target = _normalise(dead_letter_path)
    if _is_url(source) != _is_url(target):
        return
    if _overlaps(target, input_pattern):
        raise UsageError(
            f"--dead_letter_path {dead_letter_path!r} overlaps the input location {source!r} "
            f"(of --input {input_pattern!r}): replaying must never write over or next to the files "
            "it reads; choose a new location outside it")


def run(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
        data_dir: Path | None = None) -> RunSummary | None:
    """Parses ``argv``, checks the paths, replays, prints the summary and returns it.

    Raises:
        UsageError: No ``--input``, nothing matching it, or a dead-letter path
            that is missing or overlaps the input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    options = ReplayDeadLettersOptions(argv)
    for flag in ("--datasource_field", "--datasource_prefix"):
        # Refused, not ignored as Beam ignores options it does not know: a replay routes by record.
        if any(arg == flag or arg.startswith(flag + "=") for arg in argv):
            raise UsageError(f"{flag} is not a replay option: each line goes back to the data source its "
                             "record names, or, with --datasource, to that one")
    config = config_or_usage_error(lambda: SinkConfig.from_options(options, datasource_of=record_datasource))
    if not options.input:
        raise UsageError("--input is required: the dead-letter files to replay, e.g. 'dead-letters/*'")
    check_output_outside_input(options.input, config.dead_letter_path)
    check_input_exists(options.input, argv=argv)
    config = config.with_dead_letter_path(config.dead_letter_path)

    in_job_ratio = in_job_max_ratio(options, options.max_dead_letter_ratio)

    def _build(pipeline: beam.Pipeline, endpoint: Endpoint, sink: SinkConfig) -> None:
        build(pipeline, input_pattern=options.input,
              write=sink.write_transform(endpoint, write_dead_letter_files=False),
              dead_letter_path=str(sink.dead_letter_path), dead_letter_format=sink.dead_letter_format,
              dead_letter_label=sink.dead_letter_label,
              max_dead_letter_ratio=in_job_ratio)

    return run_pipeline(title=TITLE, argv=argv, config=config, build=_build,
                        dead_letter_path=config.dead_letter_path, out=out, data_dir=data_dir)


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    exit_on_usage_error(run, sys.argv[1:] if argv is None else argv, description=__doc__)


if __name__ == "__main__":
    main()
