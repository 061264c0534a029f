"""Streaming to Tinybird: Pub/Sub messages holding JSON, in fixed windows, into a data source.

    python -m pipelines.streaming_to_tinybird \\
        --input_subscription projects/P/subscriptions/S --datasource events --window_secs 60 \\
        --api_url https://api.tinybird.co --token_secret projects/P/secrets/tinybird/versions/latest \\
        --dead_letter_path gs://bucket/dead-letters/ --runner DataflowRunner ...

A message holds one JSON object (compact or pretty-printed) or several as
NDJSON lines. Messages are not parsed here: the sink validates each one as it
encodes it, and one that is not a JSON object (invalid JSON, an array, bytes
that are not UTF-8) becomes a dead letter with the reason, never a loss.
With ``--datasource_field FIELD`` (and ``--datasource_prefix``) instead of
``--datasource``, each row goes to the data source its field names, batched
per window and data source; a row that names none is dead-lettered as ``unroutable``.
Reading Pub/Sub needs the ``gcp`` extra. The body of the job is :func:`build`,
which takes a ``PCollection`` of message bytes (tests feed it a ``TestStream``).

Without ``--runner`` the job runs here, on Beam's DirectRunner, until Ctrl-C,
SIGTERM or ``--stop_after_secs N``; it then waits for the rows in flight to be
delivered or dead-lettered, and prints the summary (``pipelines/_streaming_run.py``
says what a stop can lose there). With ``PUBSUB_EMULATOR_HOST`` set it reads
from the Pub/Sub emulator (``./dev stream-demo``).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import apache_beam as beam
import orjson
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.window import FixedWindows

from pipelines._endpoint import Endpoint
from pipelines._options import (
    SinkConfig,
    UsageError,
    add_argument_once,
    add_sink_arguments,
    config_or_usage_error,
)
from pipelines._progress import CountRowsDoFn
from pipelines._running import configure_logging, exit_on_usage_error, run_pipeline
from pipelines._streaming_run import StopRequest, is_local_runner, run_until_stopped
from pipelines._summary import RunSummary

TITLE = "Streaming to Tinybird"
DEFAULT_WINDOW_SECS = 60
MAX_WINDOW_SECS = 10**9
"""The longest window (about 31 years). A window must end within Beam's timestamps (the year
294,247): a longer one made every bundle of the sink's first step fail encoding it."""
PROJECT_PATTERN = r"[a-z][-a-z0-9:.]{4,61}[a-z0-9]"
"""A project id as Beam's ``ReadFromPubSub`` takes one (its ``PROJECT_ID_REGEXP``), checked here
before anything starts: Beam checks it only when the job's graph is built, with a traceback."""
SUBSCRIPTION_PATTERN = rf"^projects/{PROJECT_PATTERN}/subscriptions/[^/]+$"
TOPIC_PATTERN = rf"^projects/{PROJECT_PATTERN}/topics/[^/]+$"
_PROJECT_RULE = "PROJECT a project id: lower case letters, digits and -, starting with a letter, at least 6 characters"


class StreamingToTinybirdOptions(PipelineOptions):
    """Options of the streaming pipeline; see ``--help``."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        add_argument_once(
            parser, "--input_subscription",
            help="Pub/Sub subscription to read, projects/PROJECT/subscriptions/NAME. "
                 "Give this or --input_topic.")
        add_argument_once(
            parser, "--input_topic",
            help="Pub/Sub topic to read through a temporary subscription, projects/PROJECT/topics/NAME "
                 "(messages published while the job is down are lost: prefer --input_subscription).")
        add_argument_once(
            parser, "--window_secs", type=_window_secs, default=DEFAULT_WINDOW_SECS,
            help=f"Length of the fixed windows, at most {MAX_WINDOW_SECS} (about 31 years); the rest of a window's batch is sent when the "
                 f"watermark passes its end. Default {DEFAULT_WINDOW_SECS}.")
        add_argument_once(
            parser, "--timestamp_attribute",
            help="Message attribute holding the event time (RFC 3339 or milliseconds since the "
                 "epoch); default: the publish time. Messages behind the watermark are late: sent "
                 "all the same, never dropped. Beam's Pub/Sub read parses it: a message whose value "
                 "it cannot read fails the read, and comes back on every run (see pipelines/README.md).")
        add_sink_arguments(parser, streaming=True)


def _window_secs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 second, got {text!r}")
    if value > MAX_WINDOW_SECS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_WINDOW_SECS} seconds (about 31 years), got {text!r}")
    return value


def take_stop_after_secs(argv: Sequence[str]) -> tuple[float | None, list[str]]:
    """``--stop_after_secs`` and the rest of ``argv``.

    Not a pipeline option: it tells this process when to stop a job that runs
    here, and means nothing to a runner (nor to a Flex Template).
    """
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--stop_after_secs")
    try:
        known, rest = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as error:
        raise UsageError(f"--stop_after_secs: {error.message}") from None
    if known.stop_after_secs is None:
        return None, rest
    try:
        value = float(known.stop_after_secs)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise UsageError(f"--stop_after_secs must be a positive number of seconds, got {known.stop_after_secs!r}")
    return value, rest


def split_message(data: bytes) -> Iterator[bytes]:
    """The rows of one message: the message itself, or its lines when it holds NDJSON.

    A message without a newline is passed on untouched (the sink validates it,
    leaving out the JSON whitespace around it). One with newlines is one
    pretty-printed JSON value if it parses as one, else NDJSON when a line of
    it is a JSON object: each non-blank line is a row, as written. One that is
    neither (a pretty-printed object cut short, not JSON at all) is passed on
    whole, byte for byte, so that its one dead letter holds all of it: for a
    binary message (a protobuf starts with ``0x0a``, a newline) that record is
    the only copy left. A UTF-8 byte order mark before JSON or NDJSON is left
    out, as the files job leaves it out of a file (a message that is neither
    keeps it).
    """
    if data.startswith(_UTF8_BOM):
        rows = list(_split(data[len(_UTF8_BOM):]))
        if len(rows) > 1 or _is_json(rows[0].strip(b" \t\n\r")):
            yield from rows
            return
    yield from _split(data)


def _split(data: bytes) -> Iterator[bytes]:
    body = data.strip()
    if not body:
        yield data  # empty: the sink dead-letters it ("invalid JSON"), so it is not lost silently
        return
    if b"\n" not in body:
        # Around it, only what the sink leaves out itself, or JSON: else the message as it came.
        yield data if len(data.strip(b" \t\n\r")) == len(body) or not _is_json(body) else body
        return
    if _is_json(body):
        yield body
        return
    lines = [line.rstrip(b"\r") for line in data.split(b"\n") if line.strip()]
    yield from lines if any(_is_object(line) for line in lines) else (data,)


_UTF8_BOM = b"\xef\xbb\xbf"


def _is_json(text: bytes) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False


def build(messages: beam.PCollection, *, window_secs: float, write: beam.PTransform) -> beam.pvalue.PValue:
    """The job's body: message bytes -> rows -> fixed windows -> ``write``; returns the sink's result."""
    return (
        messages
        | "SplitMessages" >> beam.FlatMap(split_message)
        | "CountRows" >> beam.ParDo(CountRowsDoFn(verb="received"))
        | "FixedWindows" >> beam.WindowInto(FixedWindows(window_secs))
        | "WriteToTinybird" >> write
    )


def require_pubsub() -> None:
    """Raises :class:`UsageError` when the Pub/Sub client library (gcp extra) is missing."""
    if importlib.util.find_spec("google.cloud.pubsub") is None:
        raise UsageError(
            "reading Pub/Sub needs the gcp extra (google-cloud-pubsub): "
            "pip install 'beam-tinybird[gcp]'")


def read_pubsub(pipeline: beam.Pipeline, *, subscription: str | None, topic: str | None,
                timestamp_attribute: str | None) -> beam.PCollection:
    """Message payloads (bytes) from Pub/Sub."""
    from apache_beam.io.gcp.pubsub import ReadFromPubSub

    return pipeline | "ReadPubSub" >> ReadFromPubSub(
        subscription=subscription, topic=None if subscription else topic,
        timestamp_attribute=timestamp_attribute)


def check_source(options: StreamingToTinybirdOptions) -> None:
    """Exactly one of ``--input_subscription`` and ``--input_topic``, well formed."""
    subscription, topic = options.input_subscription, options.input_topic
    if bool(subscription) == bool(topic):
        raise UsageError("give exactly one of --input_subscription and --input_topic")
    if subscription and not re.fullmatch(SUBSCRIPTION_PATTERN, subscription):
        raise UsageError(f"--input_subscription must look like projects/PROJECT/subscriptions/NAME, "
                         f"{_PROJECT_RULE}, got {subscription!r}")
    if topic and not re.fullmatch(TOPIC_PATTERN, topic):
        raise UsageError(f"--input_topic must look like projects/PROJECT/topics/NAME, {_PROJECT_RULE}, got {topic!r}")


def run(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
        data_dir: Path | None = None, stop: StopRequest | None = None) -> RunSummary | None:
    """Parses ``argv`` and runs the streaming job until it is stopped.

    On the DirectRunner (the default) the job runs here until Ctrl-C,
    SIGTERM, ``--stop_after_secs`` or ``stop``; then it waits for the rows in
    flight and prints the summary (see :mod:`pipelines._streaming_run`). On
    another runner the job is submitted and followed until it ends.
    """
    stop_after_secs, argv = take_stop_after_secs(sys.argv[1:] if argv is None else argv)
    options = StreamingToTinybirdOptions(argv)
    config = config_or_usage_error(lambda: SinkConfig.from_options(options))
    config = config.with_dead_letter_path(config.dead_letter_path)
    check_source(options)
    require_pubsub()
    local = is_local_runner(options.view_as(StandardOptions).runner)
    if stop_after_secs is not None and not local:
        raise UsageError("--stop_after_secs is for the DirectRunner; stop a job on another runner "
                         "with the runner's own drain or cancel")

    def _build(pipeline: beam.Pipeline, endpoint: Endpoint, sink: SinkConfig) -> None:
        messages = read_pubsub(
            pipeline, subscription=options.input_subscription, topic=options.input_topic,
            timestamp_attribute=options.timestamp_attribute)
        build(messages, window_secs=options.window_secs, write=sink.write_transform(endpoint))

    if local:
        return run_until_stopped(
            title=TITLE, argv=argv, config=config, build=_build, dead_letter_path=config.dead_letter_path,
            stop_after_secs=stop_after_secs, stop=stop, out=out if out is not None else sys.stdout,
            data_dir=data_dir)
    return run_pipeline(title=TITLE, argv=[*argv, "--streaming"], config=config, build=_build,
                        dead_letter_path=config.dead_letter_path, out=out, data_dir=data_dir)


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    exit_on_usage_error(run, sys.argv[1:] if argv is None else argv, description=__doc__)


if __name__ == "__main__":
    main()
