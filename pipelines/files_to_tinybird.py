"""Files to Tinybird: a batch job that reads files and appends their records to a data source.

    python -m pipelines.files_to_tinybird                       # the sample data, local server
    python -m pipelines.files_to_tinybird --datasource_field type   # the same, a data source per type
    python -m pipelines.files_to_tinybird --input 'data/*.parquet' --datasource events \\
        --api_url https://api.tinybird.co --token_env TINYBIRD_TOKEN \\
        --dead_letter_path gs://bucket/dead-letters/ --runner DataflowRunner ...

Formats, chosen by ``--format`` or from the extension of ``--input``:

* NDJSON (``.ndjson``, ``.jsonl``): each line is sent as it is, after the sink checks
  it holds one JSON object.
* JSON (``.json``): one array (each item is a row) or one object per file; a
  ``.json`` file that is not one JSON document is read as JSON lines. Numbers
  go out exactly as written, as from NDJSON.
* CSV (``.csv``): a header row (the first line that is not blank); values are
  typed where unambiguous (integers without a leading zero, decimals,
  ``true``/``false``; empty fields are null), anything else stays a string
  (as does every value of the ``--datasource_field`` column: a name is text). A
  row that cannot be read (bytes that are not UTF-8, a quote never closed) is
  dead-lettered on its own.
* Avro (``.avro``) and Parquet (``.parquet``): records as they are; binary values
  become base64 text (JSON has no bytes).

NDJSON, JSON and CSV files may be compressed (``.gz``, ``.bz2``, ``.zst``,
``.deflate``, ``.xz``): each file is read as its own suffix says, whatever the
pattern, and one cut short ends with a dead letter saying so. Avro and Parquet
compress inside the file, and a compression suffix on them is refused before
anything runs.

A record that is not one JSON object (a truncated line, a CSV row with too many
values) is dead-lettered with the reason, never dropped. With
``--datasource_field FIELD`` (and ``--datasource_prefix``) instead of
``--datasource``, each record goes to the data source its field names; one
that names none is dead-lettered as ``unroutable``.
Without ``--api_url`` the job starts the local Events API server itself (data in
``./tinybird-local/``), writes dead letters to ``./dead-letters/``, and without
``--input`` reads the sample data set shipped in ``pipelines/sample_data/``.
Any other option (``--runner``, ``--direct_num_workers``...) goes to Beam.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines._dead_letter_ratio import CheckDeadLetterRatio, in_job_max_ratio
from pipelines._endpoint import Endpoint
from pipelines._formats import FORMATS, ReadRecords, check_compression, format_from_path
from pipelines._options import (
    SinkConfig,
    UsageError,
    add_argument_once,
    add_sink_arguments,
    config_or_usage_error,
)
from pipelines._progress import CountRowsDoFn
from pipelines._running import check_input_exists, configure_logging, exit_on_usage_error, run_pipeline
from pipelines._summary import RunSummary

TITLE = "Files to Tinybird"
SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data" / "events.ndjson"
"""The sample data set read when no ``--input`` is given."""
LOCAL_DEAD_LETTER_DIR = "dead-letters"
"""Dead letters go to ``./dead-letters/`` with the embedded local server."""


class FilesToTinybirdOptions(PipelineOptions):
    """Options of the files pipeline; see ``--help``."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        add_argument_once(
            parser, "--input",
            help="Files to read: a path or glob on any Beam filesystem (local, gs://, s3://). "
                 "NDJSON, JSON and CSV files may be compressed (.gz, .bz2, .zst, .deflate, .xz); "
                 "Avro and Parquet may not (they compress inside the file, with a codec). "
                 "Default: the sample data set shipped with the pipelines.")
        add_argument_once(
            parser, "--format", choices=("auto", *FORMATS), default="auto",
            help="ndjson, json (one array or one object per file), csv (header row), avro or "
                 "parquet. Default auto: from the extension of --input (.ndjson/.jsonl, .json, "
                 ".csv, .avro, .parquet; the first three optionally followed by "
                 ".gz/.bz2/.zst/.deflate/.xz).")
        add_sink_arguments(parser)


def resolve_input(options: FilesToTinybirdOptions) -> str:
    """``--input``, or the sample data set when it is absent."""
    return options.input or str(SAMPLE_DATA)


def resolve_format(file_pattern: str, requested: str) -> str:
    """The format to read ``file_pattern`` with.

    Raises :class:`UsageError` when it cannot be told, or when ``file_pattern``
    is compressed and the format is read only uncompressed (``x.avro.gz``).
    """
    file_format = format_from_path(file_pattern) if requested == "auto" else requested
    if file_format is None:
        raise UsageError(
            f"cannot tell the format of --input {file_pattern!r} from its extension; "
            f"pass --format ({', '.join(FORMATS)})")
    try:
        check_compression(file_pattern, file_format)
    except ValueError as error:
        raise UsageError(f"--input {error}") from error
    return file_format


def build(pipeline: beam.Pipeline, *, file_pattern: str, file_format: str,
          write: beam.PTransform, max_dead_letter_ratio: float | None = None,
          datasource_field: str | None = None) -> beam.pvalue.PValue:
    """Adds read -> count -> write to ``pipeline``; returns the sink's result.

    With ``max_dead_letter_ratio``, the job itself fails when more than that
    share of the rows read is dead-lettered (for runners the launcher does not wait for).
    ``datasource_field``, the field ``write`` routes by, is read from CSV as
    the text written, not typed: a name is text.
    """
    text_columns = () if datasource_field is None else (datasource_field,)
    rows = (
        pipeline
        | "Read" >> ReadRecords(file_pattern, file_format=file_format, text_columns=text_columns)
        | "CountRows" >> beam.ParDo(CountRowsDoFn())
    )
    result = rows | "WriteToTinybird" >> write
    if max_dead_letter_ratio is not None:
        _ = (rows, result.dead_letters) | "CheckDeadLetterRatio" >> CheckDeadLetterRatio(max_dead_letter_ratio)
    return result


def run(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
        data_dir: Path | None = None) -> RunSummary | None:
    """Parses ``argv``, runs the job to the end, prints the summary and returns it.

    Raises:
        UsageError: A bad option value, an unknown format, or no matching file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    options = FilesToTinybirdOptions(argv)
    config = config_or_usage_error(lambda: SinkConfig.from_options(options))
    if config.embedded and config.dead_letter_path is None:
        config = config.with_dead_letter_path(LOCAL_DEAD_LETTER_DIR + "/")
    else:
        config = config.with_dead_letter_path(config.dead_letter_path)
    file_pattern = resolve_input(options)
    file_format = resolve_format(file_pattern, options.format)
    check_input_exists(file_pattern, argv=argv)

    in_job_ratio = in_job_max_ratio(options, options.max_dead_letter_ratio)

    def _build(pipeline: beam.Pipeline, endpoint: Endpoint, sink: SinkConfig) -> None:
        build(pipeline, file_pattern=file_pattern, file_format=file_format,
              write=sink.write_transform(endpoint), max_dead_letter_ratio=in_job_ratio,
              datasource_field=sink.datasource_field)

    return run_pipeline(title=TITLE, argv=argv, config=config, build=_build,
                        dead_letter_path=config.dead_letter_path, out=out, data_dir=data_dir)


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    exit_on_usage_error(run, sys.argv[1:] if argv is None else argv, description=__doc__)


if __name__ == "__main__":
    main()
