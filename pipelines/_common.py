"""What the pipelines share: sink options, the embedded local server, progress and the summary.

Each pipeline declares its own ``PipelineOptions`` subclass and adds the sink's
options with :func:`add_sink_arguments`; :class:`SinkConfig` is the validated,
frozen form of those options. :func:`run_pipeline` starts the local Events API
server when no ``--api_url`` is given, runs the pipeline, and prints a
:class:`RunSummary` built from the job's metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

_LOG = logging.getLogger(__name__)

METRICS_NAMESPACE = "pipelines"
"""Namespace of the pipelines' own counters (the sink's are under ``tinybird``)."""
SINK_METRICS_NAMESPACE = "tinybird"
ROWS_READ = "rows_read"
"""Counter of the rows (records, lines, messages) a pipeline read and handed to the sink."""

LOCAL_DATA_DIR = "tinybird-local"
"""Where the embedded local server keeps its data, under the working directory."""
DEFAULT_DATASOURCE = "events"
"""The data source used when no ``--datasource`` is given to the embedded server."""
DEFAULT_COMPRESSION = "zstd"
COMPRESSIONS = ("zstd", "gzip", "none")
DEAD_LETTER_FORMATS = ("json", "avro")
DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_BATCH_ROWS = 200_000
DEFAULT_NUM_SHARDS = 8
DEFAULT_MAX_BUFFERING_SECS = 5.0
DEFAULT_TOKEN_ENV = "TINYBIRD_TOKEN"

DATASOURCE_PATTERN = r"^(?!.*_quarantine$)[A-Za-z_][A-Za-z0-9_]{0,99}$"
API_URL_PATTERN = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"
TOKEN_SECRET_PATTERN = r"^projects/[^/]+/secrets/[^/]+/versions/[^/]+$"
ENV_VAR_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

_PROGRESS_EVERY_SECS = 2.0
_SECRET_FLAGS = ("--token",)


# -- options -----------------------------------------------------------------


def parse_bool(text: Any) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``), as Flex Templates pass booleans."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_argument_once(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """Adds ``flag`` unless the parser has it already.

    Beam builds one parser from every ``PipelineOptions`` subclass imported in
    the process (``get_all_options``), so two pipelines that share an option
    name would otherwise make argparse raise a conflict.
    """
    if flag in parser._option_string_actions:  # pylint: disable=protected-access
        return
    parser.add_argument(flag, **kwargs)


def add_sink_arguments(parser: argparse.ArgumentParser, *, streaming: bool = False) -> None:
    """Adds the options of :class:`sinks.tinybird.WriteToTinybird` that the pipelines expose."""
    add_argument_once(
        parser, "--datasource",
        help=f"Tinybird data source to append to (created from the first events if the token may). "
             f"Required with --api_url; default {DEFAULT_DATASOURCE!r} for the embedded local server.")
    add_argument_once(
        parser, "--api_url",
        help="Events API host of the workspace's region, e.g. https://api.tinybird.co or "
             "https://api.us-east.aws.tinybird.co. Without it, the job starts the local Events API "
             f"server itself, keeps its data in ./{LOCAL_DATA_DIR}/ and uses its admin token.")
    add_argument_once(
        parser, "--token",
        help="Tinybird token with DATASOURCE:APPEND (and DATASOURCE:CREATE for a new data source). "
             "Prefer --token_secret or --token_env: a value given here is kept out of the job's "
             "pipeline options but still travels inside the pipeline graph.")
    add_argument_once(
        parser, "--token_env", default=DEFAULT_TOKEN_ENV,
        help="Environment variable that holds the token, read on the workers when neither --token "
             f"nor --token_secret is given. Default {DEFAULT_TOKEN_ENV}.")
    add_argument_once(
        parser, "--token_secret",
        help="Secret Manager secret version holding the token, "
             "projects/PROJECT/secrets/NAME/versions/VERSION, read on the workers (gcp extra).")
    add_argument_once(
        parser, "--wait", type=parse_bool, nargs="?", const=True, default=None, metavar="true|false",
        help="Ask the Events API to answer only once the rows are committed (200) rather than "
             "accepted (202): slower, safer, and the quarantine counts are exact. Default false; "
             "true with the embedded local server, so that its summary is exact.")
    add_argument_once(
        parser, "--compression", choices=COMPRESSIONS, default=DEFAULT_COMPRESSION,
        help=f"Request body compression. Default {DEFAULT_COMPRESSION}.")
    add_argument_once(
        parser, "--max_batch_bytes", type=_positive_int, default=DEFAULT_MAX_BATCH_BYTES,
        help=f"Bound on the uncompressed NDJSON of one request; a single row larger than this is "
             f"dead-lettered. Default {DEFAULT_MAX_BATCH_BYTES} (8 MiB).")
    add_argument_once(
        parser, "--max_batch_rows", type=_positive_int, default=DEFAULT_MAX_BATCH_ROWS,
        help=f"Bound on the rows of one request. Default {DEFAULT_MAX_BATCH_ROWS}.")
    add_argument_once(
        parser, "--num_shards", type=_positive_int, default=DEFAULT_NUM_SHARDS,
        help=f"Keys the sink's batching is spread over; bounds its parallelism. Default {DEFAULT_NUM_SHARDS}.")
    add_argument_once(
        parser, "--dead_letter_path",
        help="Directory (any Beam filesystem path, e.g. gs://bucket/dead-letters/) where rows that "
             "could not be delivered are written, with the reason. Without it they are only counted "
             "(the files pipeline defaults to ./dead-letters/ with the embedded local server).")
    add_argument_once(
        parser, "--dead_letter_format", choices=DEAD_LETTER_FORMATS, default="json",
        help="Dead-letter files as JSON lines (json, *.jsonl) or Avro (avro, *.avro). Default json.")
    if streaming:
        add_argument_once(
            parser, "--max_buffering_secs", type=_positive_float, default=DEFAULT_MAX_BUFFERING_SECS,
            help=f"Longest a row waits in a partial batch before it is sent anyway. "
                 f"Default {DEFAULT_MAX_BUFFERING_SECS:g}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SinkConfig:
    """The sink's settings from the command line, validated.

    ``api_url`` None means: start the local Events API server and send there.

    Raises:
        ValueError: naming the option and the bad value (never the token's value).
    """

    datasource: str
    api_url: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)
    token_env: str = DEFAULT_TOKEN_ENV
    token_secret: str | None = None
    wait: bool = False
    compression: str | None = DEFAULT_COMPRESSION
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    num_shards: int = DEFAULT_NUM_SHARDS
    max_buffering_secs: float = DEFAULT_MAX_BUFFERING_SECS
    dead_letter_path: str | None = None
    dead_letter_format: str = "json"

    def __post_init__(self) -> None:
        if not isinstance(self.datasource, str) or not re.fullmatch(DATASOURCE_PATTERN, self.datasource):
            raise ValueError(
                f"--datasource must be a data source name (1-100 letters, digits, _; not a *_quarantine one), "
                f"got {self.datasource!r}")
        if self.api_url is not None and not re.fullmatch(API_URL_PATTERN, self.api_url):
            raise ValueError(f"--api_url must be an http(s) URL such as https://api.tinybird.co, got {self.api_url!r}")
        if self.token is not None and not self.token.strip():
            raise ValueError("--token is empty")
        if self.token is not None and self.token_secret is not None:
            raise ValueError("give either --token or --token_secret, not both")
        if self.token_secret is not None and not re.fullmatch(TOKEN_SECRET_PATTERN, self.token_secret):
            raise ValueError(
                "--token_secret must look like projects/PROJECT/secrets/NAME/versions/VERSION, "
                f"got {self.token_secret!r}")
        if not re.fullmatch(ENV_VAR_PATTERN, self.token_env or ""):
            raise ValueError(f"--token_env must name an environment variable, got {self.token_env!r}")
        if self.compression not in ("zstd", "gzip", None):
            raise ValueError(f"--compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        for name in ("max_batch_bytes", "max_batch_rows", "num_shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if self.max_batch_bytes < 2:
            raise ValueError(f"--max_batch_bytes must be at least 2, got {self.max_batch_bytes!r}")
        if not self.max_buffering_secs > 0:
            raise ValueError(f"--max_buffering_secs must be positive, got {self.max_buffering_secs!r}")
        if self.dead_letter_path is not None and not self.dead_letter_path.strip():
            raise ValueError("--dead_letter_path is empty")
        if self.dead_letter_format not in DEAD_LETTER_FORMATS:
            raise ValueError(
                f"--dead_letter_format must be one of {DEAD_LETTER_FORMATS}, got {self.dead_letter_format!r}")

    def with_dead_letter_path(self, path: str | None) -> SinkConfig:
        """A copy writing dead letters to ``path`` (a local path made absolute: workers may have another cwd)."""
        return dataclasses.replace(self, dead_letter_path=None if path is None else absolute_local_path(path))

    @property
    def embedded(self) -> bool:
        """True when the job starts and uses the local Events API server."""
        return self.api_url is None

    @classmethod
    def from_options(cls, options: PipelineOptions) -> SinkConfig:
        """Reads the options added by :func:`add_sink_arguments`."""
        values = options.get_all_options(current_only=True)
        api_url = values.get("api_url") or None
        datasource = values.get("datasource")
        if datasource is None:
            if api_url is not None:
                raise ValueError("--datasource is required with --api_url")
            datasource = DEFAULT_DATASOURCE
        compression = values.get("compression", DEFAULT_COMPRESSION)
        return cls(
            datasource=datasource,
            api_url=api_url,
            token=values.get("token") or None,
            token_env=values.get("token_env") or DEFAULT_TOKEN_ENV,
            token_secret=values.get("token_secret") or None,
            wait=api_url is None if values.get("wait") is None else bool(values["wait"]),
            compression=None if compression in (None, "none") else compression,
            max_batch_bytes=values.get("max_batch_bytes", DEFAULT_MAX_BATCH_BYTES),
            max_batch_rows=values.get("max_batch_rows", DEFAULT_MAX_BATCH_ROWS),
            num_shards=values.get("num_shards", DEFAULT_NUM_SHARDS),
            max_buffering_secs=values.get("max_buffering_secs") or DEFAULT_MAX_BUFFERING_SECS,
            dead_letter_path=values.get("dead_letter_path") or None,
            dead_letter_format=values.get("dead_letter_format") or "json",
        )

    def write_transform(self, endpoint: Endpoint, *, write_dead_letter_files: bool = True) -> beam.PTransform:
        """A :class:`~sinks.tinybird.WriteToTinybird` with these settings, sending to ``endpoint``.

        Args:
            endpoint: Where to send, and the token when the endpoint has one.
            write_dead_letter_files: False to leave writing ``dead_letter_path`` to the caller.
        """
        from sinks.tinybird import WriteToTinybird

        return WriteToTinybird(
            datasource=self.datasource,
            token=endpoint.token if endpoint.token is not None else self.token,
            token_env=self.token_env,
            token_secret=None if endpoint.token is not None else self.token_secret,
            api_url=endpoint.api_url,
            wait=self.wait,
            compression=self.compression,
            max_batch_bytes=self.max_batch_bytes,
            max_batch_rows=self.max_batch_rows,
            max_buffering_secs=self.max_buffering_secs,
            num_shards=self.num_shards,
            dead_letter_path=self.dead_letter_path if write_dead_letter_files else None,
            dead_letter_format=self.dead_letter_format,
        )


def beam_options_without_secrets(argv: Sequence[str]) -> PipelineOptions:
    """The pipeline's options, less ``--token``: options are shown on job pages and stored with the job."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in _SECRET_FLAGS:
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    return PipelineOptions(kept)


# -- the endpoint: a real workspace or the embedded local server ------------------------


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where the sink sends.

    Attributes:
        api_url: The Events API host.
        token: The embedded server's admin token, or None to let the sink find
            the user's token (``--token``, ``--token_secret``, ``--token_env``).
        server: The embedded :class:`tinybird_emulator.LocalServer`, or None.
        data_dir: The embedded server's data directory, or None.
    """

    api_url: str
    token: str | None = dataclasses.field(default=None, repr=False)
    server: Any = None
    data_dir: Path | None = None


@contextlib.contextmanager
def tinybird_endpoint(config: SinkConfig, *, data_dir: Path | None = None) -> Iterator[Endpoint]:
    """Yields the endpoint to send to; with no ``api_url``, a local server started for the run.

    The embedded server keeps its data in ``data_dir`` (default
    ``./tinybird-local/``), so consecutive runs add to the same data sources, and
    is stopped when the block ends.
    """
    if not config.embedded:
        yield Endpoint(api_url=str(config.api_url))
        return
    try:
        from tinybird_emulator import LocalServer
    except ImportError as error:
        raise RuntimeError(
            "without --api_url the job starts the local Events API server, which needs the "
            "'local' extra: pip install 'beam-tinybird[local]' (or pass --api_url and a token)"
        ) from error
    data_dir = Path(data_dir if data_dir is not None else Path.cwd() / LOCAL_DATA_DIR).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with LocalServer(data_dir=data_dir, token=config.token) as server:
        _LOG.info("Started the local Events API server at %s (data in %s)", server.url, data_dir)
        yield Endpoint(api_url=server.url, token=server.token, server=server, data_dir=data_dir)


# -- progress ----------------------------------------------------------------


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


# -- the summary -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSummary:
    """What a run did, from its metrics.

    Attributes:
        rows_read: Rows the pipeline read and handed to the sink.
        rows_acknowledged: Rows the server accepted (2xx), quarantined ones included.
        rows_quarantined: Of those, rows the server put in ``<datasource>_quarantine``.
        dead_letters: Rows that were not delivered (or, for replay, still not delivered).
        dead_letters_by_kind: ``dead_letters`` split by :class:`~sinks.tinybird.DeadLetterKind` value.
        requests: HTTP requests made, retries included.
        retries: Requests that were retries.
        extra: Other counters of the pipeline's own namespace (e.g. ``unreplayable``).
        elapsed_secs: Wall time of the run.
        dead_letter_files: Dead-letter files found under the dead-letter path after the run.
    """

    rows_read: int
    rows_acknowledged: int
    rows_quarantined: int
    dead_letters: int
    dead_letters_by_kind: Mapping[str, int]
    requests: int
    retries: int
    extra: Mapping[str, int]
    elapsed_secs: float
    dead_letter_files: tuple[str, ...] = ()

    @property
    def rows_stored(self) -> int:
        """Rows that reached the data source itself (acknowledged, not quarantined)."""
        return self.rows_acknowledged - self.rows_quarantined


def counter_totals(result: PipelineResult, namespace: str) -> dict[str, int]:
    """Counters of ``namespace``, summed over steps; committed values where the runner has them."""
    totals: dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(namespace))
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def summarise(result: PipelineResult, *, elapsed_secs: float,
              dead_letter_files: Sequence[str] = ()) -> RunSummary:
    """A :class:`RunSummary` from a finished pipeline's metrics.

    The pipeline's own ``dead_letters_<kind>`` counters (e.g. replay's
    ``dead_letters_unreplayable``) add to the sink's dead letters.
    """
    sink = counter_totals(result, SINK_METRICS_NAMESPACE)
    own = counter_totals(result, METRICS_NAMESPACE)
    prefix = "dead_letters_"
    by_kind: dict[str, int] = {}
    for name, value in sorted(sink.items()) + sorted(own.items()):
        if name.startswith(prefix) and value:
            by_kind[name[len(prefix):]] = by_kind.get(name[len(prefix):], 0) + value
    own_dead_letters = sum(value for name, value in own.items() if name.startswith(prefix))
    return RunSummary(
        rows_read=own.get(ROWS_READ, 0),
        rows_acknowledged=sink.get("rows_acknowledged", 0),
        rows_quarantined=sink.get("rows_quarantined", 0),
        dead_letters=sink.get("dead_letters", 0) + own_dead_letters,
        dead_letters_by_kind=by_kind,
        requests=sink.get("requests", 0),
        retries=sink.get("retries", 0),
        extra={name: value for name, value in own.items() if name != ROWS_READ and not name.startswith(prefix)},
        elapsed_secs=elapsed_secs,
        dead_letter_files=tuple(dead_letter_files),
    )


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


def list_dead_letter_files(path: str | None, *, since_epoch_secs: float = 0.0) -> list[str]:
    """Dead-letter files under ``path`` (a directory) written since ``since_epoch_secs``, sorted.

    Files of earlier runs stay in the same directory (their names never
    collide); the time filter keeps them out of this run's summary.
    """
    if not path:
        return []
    pattern = FileSystems.join(path.rstrip("/"), "dead-letters*")
    try:
        matches = FileSystems.match([pattern])[0].metadata_list
    except Exception:
        _LOG.debug("could not list %s", pattern, exc_info=True)
        return []
    return sorted(m.path for m in matches
                  if not m.last_updated_in_seconds or m.last_updated_in_seconds >= since_epoch_secs)


def display_path(path: str) -> str:
    """``path`` relative to the working directory when it is under it (``./x``), else as is."""
    if "://" in path:
        return path
    try:
        relative = Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path
    text = "./" + relative.as_posix() if str(relative) != "." else "."
    return text + "/" if path.endswith("/") and not text.endswith("/") else text


def _python_command() -> str:
    """The interpreter running this job as the user can type it: ``.venv/bin/python``
    from the checkout, else its full path (not resolved: a venv's python is a symlink)."""
    executable = sys.executable or "python"
    try:
        executable = Path(executable).relative_to(Path.cwd()).as_posix()
    except ValueError:
        pass
    return _shell_quote(executable)


def _shell_quote(text: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:=@%+-]+", text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


def format_summary(summary: RunSummary, *, title: str, config: SinkConfig, endpoint: Endpoint,
                   dead_letter_path: str | None, replay_hint: bool = True) -> str:
    """The text printed at the end of a run."""
    n = lambda value: f"{value:,}"  # noqa: E731
    lines = [
        f"{title}: finished in {summary.elapsed_secs:.1f} s, data source {config.datasource!r} at {endpoint.api_url}",
        f"  rows read            {n(summary.rows_read):>10}",
        f"  rows acknowledged    {n(summary.rows_acknowledged):>10}",
        f"  rows quarantined     {n(summary.rows_quarantined):>10}"
        + (f"   (in {config.datasource}_quarantine)" if summary.rows_quarantined else "")
        + ("" if config.wait else "   (counted only with --wait: a 202 answer need not count them)"),
        f"  rows stored          {n(summary.rows_stored):>10}   (acknowledged - quarantined)",
    ]
    kinds = ", ".join(f"{kind}: {n(count)}" for kind, count in summary.dead_letters_by_kind.items())
    lines.append(f"  dead letters         {n(summary.dead_letters):>10}" + (f"   ({kinds})" if kinds else ""))
    for name, value in sorted(summary.extra.items()):
        lines.append(f"  {name.replace('_', ' '):<20} {n(value):>10}")
    lines.append(f"  requests (retries)   {n(summary.requests):>10}   ({n(summary.retries)} retries)")
    if dead_letter_path:
        shown = display_path(dead_letter_path)
        if summary.dead_letter_files:
            lines.append(f"  dead-letter files in {shown}:")
            lines.extend(f"    {display_path(path)}" for path in summary.dead_letter_files)
        else:
            lines.append(f"  dead-letter files in {shown}: none written")
    elif summary.dead_letters:
        lines.append("  dead letters were not written to files: pass --dead_letter_path")
    if endpoint.server is not None and endpoint.data_dir is not None:
        data_dir = display_path(str(endpoint.data_dir))
        with contextlib.suppress(Exception):
            endpoint.server.flush()
            held = endpoint.server.datasources().get(config.datasource) or {}
            lines.append(
                f"  {config.datasource} now holds {n(int(held.get('rows', 0)))} rows "
                f"({n(int(held.get('quarantined', 0)))} quarantined) in {data_dir}")
        # The embedded server stops with the job; its data stays in data_dir.
        python = _python_command()
        sql = f"{python} -m tinybird_emulator sql --data-dir {_shell_quote(data_dir)}"
        lines += [
            "",
            "Look at the data (read-only, straight from the data dir; no server needed):",
            f"  {sql} \"SELECT count(*) FROM {config.datasource}\"",
        ]
        if summary.rows_quarantined:
            lines.append(
                f"  {sql} \"SELECT c__error, c__raw FROM {config.datasource}_quarantine LIMIT 5\"")
        lines.append(f"Or serve it again: {python} -m tinybird_emulator serve --data-dir {_shell_quote(data_dir)} --port 7181")
    # Unencodable and unreplayable dead letters have no line to resend.
    replayable = summary.dead_letters - sum(
        summary.dead_letters_by_kind.get(kind, 0) for kind in ("unencodable", "unreplayable"))
    if replay_hint and dead_letter_path and replayable > 0:
        source = display_path(dead_letter_path).rstrip("/")
        command = [
            f"{_python_command()} -m pipelines.replay_dead_letters",
            f"--input {_shell_quote(source + '/*')}",
            f"--datasource {config.datasource}",
            f"--dead_letter_path {_shell_quote(source + '-replayed/')}",
        ]
        if not config.embedded:
            command.append(f"--api_url {config.api_url}")
        lines += ["", "Resend the dead letters once their cause is fixed:", "  " + " ".join(command)]
    return "\n".join(lines) + "\n"


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
    without running it here (a Flex Template launch writes a job spec).
    Without ``--runner``, a batch job runs on Beam's in-process ``FnApiRunner``.

    Args:
        title: The pipeline's name, for the summary.
        argv: The command line; passed to Beam without ``--token``.
        config: The sink's settings.
        build: Adds the pipeline's transforms to the (empty) pipeline.
        dead_letter_path: Where dead letters are written, to list in the summary.
        out: Where the summary goes; default stdout.
        data_dir: The embedded server's data directory; default ``./tinybird-local``.

    Raises:
        RuntimeError: The pipeline failed or was cancelled.
    """
    out = out if out is not None else sys.stdout
    options = beam_options_without_secrets(argv)
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
        if state in (PipelineState.FAILED, PipelineState.CANCELLED, PipelineState.UPDATED,
                     PipelineState.DRAINED):
            raise RuntimeError(f"{title} ended in state {state}")
        if state not in (None, PipelineState.DONE):
            # E.g. a Flex Template launch: the runner wrote a job spec (state
            # UNKNOWN, no job to wait for, no metrics); the runner's console has the figures.
            out.write(f"{title}: submitted (state {state}); follow the job on its runner.\n")
            out.flush()
            return None
        summary = summarise(
            result, elapsed_secs=time.monotonic() - started,
            dead_letter_files=list_dead_letter_files(dead_letter_path, since_epoch_secs=started_epoch_secs))
        out.write(format_summary(summary, title=title, config=config, endpoint=endpoint,
                                 dead_letter_path=dead_letter_path))
        out.flush()
    return summary


def configure_logging() -> None:
    """INFO from the pipelines and the sink (progress), WARNING from everything else."""
    # force: importing Beam may already have given the root logger a handler.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    for name in ("pipelines", "sinks"):
        logging.getLogger(name).setLevel(logging.INFO)


class UsageError(ValueError):
    """A bad command line: reported before anything runs, with exit status 2."""


def exit_on_usage_error(main: Callable[[Sequence[str]], Any], argv: Sequence[str], *,
                        description: str | None = None) -> None:
    """Runs ``main(argv)``; a :class:`UsageError` becomes ``error: ...`` on stderr and status 2.

    With ``-h``/``--help``, ``description`` (the pipeline's module docstring)
    is printed before the options.
    """
    if description and {"-h", "--help"} & set(argv):
        print(description.strip() + "\n")
    try:
        main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def config_or_usage_error(make: Callable[[], Any]) -> Any:
    """Calls ``make()``; a ValueError from validation becomes a :class:`UsageError`."""
    try:
        return make()
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(str(error)) from error


def absolute_local_path(path: str) -> str:
    """``path`` made absolute when it is a local path (workers may run elsewhere in the tree)."""
    if "://" in path:
        return path
    absolute = os.path.abspath(os.path.expanduser(path))
    return absolute + "/" if path.endswith(("/", os.sep)) else absolute
