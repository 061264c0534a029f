"""The sink's options on the pipelines' command lines (and Flex Template parameters).

Each pipeline declares its own ``PipelineOptions`` subclass and adds the sink's
options with :func:`add_sink_arguments`; :class:`SinkConfig` is the frozen
form of those options, and :meth:`SinkConfig.write_transform` the sink it builds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines._endpoint import LOCAL_DATA_DIR

if TYPE_CHECKING:
    from pipelines._endpoint import Endpoint

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
_SECRET_FLAGS = ("--token",)


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


class UsageError(ValueError):
    """A bad command line: reported before anything runs, with exit status 2."""


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
