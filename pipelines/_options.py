"""The sink's options on the pipelines' command lines (and Flex Template parameters).

Each pipeline declares its own ``PipelineOptions`` subclass and adds the sink's
options with :func:`add_sink_arguments`; :class:`SinkConfig` is the frozen
form of those options, and :meth:`SinkConfig.write_transform` the sink it builds.
Defaults are read from :class:`~sinks.tinybird.WriteToTinybird`'s signature and
values are checked by building it: each default and each rule exists once, in the sink.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines._endpoint import LOCAL_DATA_DIR, Endpoint
from sinks.tinybird import DatasourceFromField, WriteToTinybird
from sinks.tinybird._batching import MAX_BATCH_BYTES
from sinks.tinybird._beam_compat import option_values

_SINK_PARAMETERS = inspect.signature(WriteToTinybird).parameters


def sink_default(name: str) -> Any:
    """The default of ``WriteToTinybird``'s argument ``name``."""
    return _SINK_PARAMETERS[name].default


DEFAULT_DATASOURCE = "events"
"""The data source used when no ``--datasource`` is given to the embedded server."""
DEFAULT_MAX_DEAD_LETTER_RATIO = 0.01
"""A run fails (exit status 1) when more than this share of the rows read was dead-lettered.

1%: a few bad records in a large input pass, but more than one row in a hundred
not delivered means a cause that affects the whole input (a wrong schema,
token or format, a server down), which a scheduler must hear about. The sample
data dead-letters 2 of 5,000 rows (0.04%) on purpose.
"""
# An address for checking the options before the embedded server starts (its
# port is known only then): a loopback http URL passes the same checks.
_EMBEDDED_PLACEHOLDER_URL = "http://127.0.0.1"
_SECRET_FLAGS = ("--token",)
DATASOURCE_PREFIX_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,98}$"
"""A ``--datasource_prefix``: the start of a data source name, leaving room for one character."""


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


def parse_ratio(text: str) -> float:
    """A share between 0 and 1 (``0.01`` is 1%)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def add_argument_once(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """Adds ``flag`` unless the parser has it already.

    Beam builds one parser from every ``PipelineOptions`` subclass imported in
    the process (``get_all_options``), so two pipelines that share an option
    name would otherwise make argparse raise a conflict.
    """
    # argparse has no public way to ask whether a flag is taken; this mapping is
    # what its own conflict check reads.
    if flag in parser._option_string_actions:
        return
    parser.add_argument(flag, **kwargs)


def add_sink_arguments(parser: argparse.ArgumentParser, *, streaming: bool = False,
                       datasource_field: bool = True) -> None:
    """Adds the options of :class:`sinks.tinybird.WriteToTinybird` that the pipelines expose,
    then ``--max_dead_letter_ratio``.

    Values are only parsed here (``int``, ``float``, true/false); whether they
    are allowed is the sink's to say, when :class:`SinkConfig` builds it.
    ``datasource_field`` False leaves out ``--datasource_field`` and
    ``--datasource_prefix`` (the replay job routes each line by its record instead).
    """
    if datasource_field:
        add_argument_once(
            parser, "--datasource",
            help=f"Tinybird data source to append to (created from the first events if the token may). "
                 f"Required with --api_url unless --datasource_field is given; default {DEFAULT_DATASOURCE!r} "
                 f"for the embedded local server.")
        _add_datasource_field_arguments(parser)
    else:
        add_argument_once(
            parser, "--datasource",
            help="Tinybird data source to send every line to. Without it, each line goes back to the "
                 "data source its dead-letter record names (a record that names none is dead-lettered "
                 "again as unroutable).")
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
        parser, "--token_env", default=sink_default("token_env"),
        help="Environment variable that holds the token, read on the workers when neither --token "
             f"nor --token_secret is given. Default {sink_default('token_env')}.")
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
        parser, "--compression", default=sink_default("compression"), metavar="zstd|gzip|none",
        help=f"Request body compression: zstd, gzip or none. Default {sink_default('compression')}.")
    add_argument_once(
        parser, "--max_batch_bytes", type=int, default=sink_default("max_batch_bytes"),
        help=f"Bound on the uncompressed NDJSON of one request, at most {MAX_BATCH_BYTES} (100 MB, the "
             f"Events API's limit on paid plans; 10 MB on the free plan); a single row larger than this "
             f"is dead-lettered. Default {sink_default('max_batch_bytes')} "
             f"({sink_default('max_batch_bytes') / 2**20:g} MiB).")
    add_argument_once(
        parser, "--max_batch_rows", type=int, default=sink_default("max_batch_rows"),
        help=f"Bound on the rows of one request. Default {sink_default('max_batch_rows')}.")
    add_argument_once(
        parser, "--num_shards", type=int, default=sink_default("num_shards"),
        help=f"Keys the sink's batching is spread over; bounds its parallelism. "
             f"Default {sink_default('num_shards')}.")
    add_argument_once(
        parser, "--max_windows_per_bundle", type=int, default=sink_default("max_windows_per_bundle"),
        help=f"Windows a bundle keeps a partial batch open for; past it, the least recently used "
             f"one leaves for the cross-bundle merge, so a worker holds at most this many batches "
             f"per bundle however many windows the input has. "
             f"Default {sink_default('max_windows_per_bundle')}.")
    add_argument_once(
        parser, "--dead_letter_path",
        help="Directory (any Beam filesystem path, e.g. gs://bucket/dead-letters/) where rows that "
             "could not be delivered are written, with the reason. Without it they are only counted "
             "(the files pipeline defaults to ./dead-letters/ with the embedded local server).")
    add_argument_once(
        parser, "--dead_letter_format", default=sink_default("dead_letter_format"), metavar="json|avro",
        help="Dead-letter files as JSON lines (json, *.jsonl) or Avro (avro, *.avro). "
             f"Default {sink_default('dead_letter_format')}.")
    if streaming:
        add_argument_once(
            parser, "--max_buffering_secs", type=float, default=sink_default("max_buffering_secs"),
            help=f"Longest a row waits in a partial batch before it is sent anyway. "
                 f"Default {sink_default('max_buffering_secs'):g}.")
    add_argument_once(
        parser, "--max_dead_letter_ratio", type=parse_ratio, default=DEFAULT_MAX_DEAD_LETTER_RATIO,
        help="The run fails (exit status 1, the summary says why) when more than this share of the "
             "rows read was dead-lettered: 0 fails on any dead letter, 1 never fails. "
             f"Default {DEFAULT_MAX_DEAD_LETTER_RATIO:g} (1%%).")


def _add_datasource_field_arguments(parser: argparse.ArgumentParser) -> None:
    add_argument_once(
        parser, "--datasource_field", metavar="FIELD",
        help="Instead of --datasource: send each row to the data source named by its top-level "
             "field FIELD (with --datasource_prefix before it), e.g. --datasource_field type sends "
             "{\"type\": \"click\", ...} to 'click'. A row without the field, whose field is not "
             "a string, or that names no valid data source is dead-lettered as unroutable.")
    add_argument_once(
        parser, "--datasource_prefix", default="", metavar="PREFIX",
        help="Put before the value of --datasource_field: --datasource_prefix events_ sends "
             "{\"type\": \"click\"} to 'events_click'. Letters, digits and _, not starting with "
             "a digit. Default none.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SinkConfig:
    """The sink's settings from the command line, checked by building the sink with them.

    Exactly one of ``datasource`` (one data source), ``datasource_field`` (the
    data source named by a field of each row, after ``datasource_prefix``) and
    ``datasource_of`` (a function of each element: the replay job's) says where
    rows go. ``api_url`` None means: start the local Events API server and send there.
    Defaults are :class:`~sinks.tinybird.WriteToTinybird`'s.

    Raises:
        ValueError, TypeError: the sink's own error, naming the argument (never
            the token's value), or a message naming the ``--datasource*`` options.
    """

    datasource: str | None = None
    datasource_field: str | None = None
    datasource_prefix: str = ""
    datasource_of: Callable[[Any], str] | None = dataclasses.field(default=None, compare=False)
    api_url: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)
    token_env: str = sink_default("token_env")
    token_secret: str | None = None
    wait: bool = sink_default("wait")
    compression: str | None = sink_default("compression")
    max_batch_bytes: int = sink_default("max_batch_bytes")
    max_batch_rows: int = sink_default("max_batch_rows")
    num_shards: int = sink_default("num_shards")
    max_windows_per_bundle: int = sink_default("max_windows_per_bundle")
    max_buffering_secs: float = sink_default("max_buffering_secs")
    dead_letter_path: str | None = None
    dead_letter_format: str = sink_default("dead_letter_format")
    dead_letter_label: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        given = [flag for flag, value in (("--datasource", self.datasource),
                                          ("--datasource_field", self.datasource_field),
                                          ("a datasource function", self.datasource_of)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"give --datasource or --datasource_field, not {' and '.join(given) or 'neither'}")
        if self.datasource_field is not None:
            if not self.datasource_field.strip() or any(c in self.datasource_field for c in "\n\r"):
                raise ValueError(f"--datasource_field must name a field, got {self.datasource_field!r}")
            if self.datasource_prefix and not re.fullmatch(DATASOURCE_PREFIX_PATTERN, self.datasource_prefix):
                raise ValueError(
                    f"--datasource_prefix must be letters, digits and _, not starting with a digit, at most "
                    f"99 characters (the start of a data source name), got {self.datasource_prefix!r}")
        elif self.datasource_prefix:
            raise ValueError(f"--datasource_prefix {self.datasource_prefix!r} is only used with --datasource_field")
        # Built once here only for its checks, so that a bad value is refused before anything starts.
        self.write_transform(Endpoint(api_url=self.api_url or _EMBEDDED_PLACEHOLDER_URL))

    def with_dead_letter_path(self, path: str | None) -> SinkConfig:
        """A copy writing dead letters to ``path`` (a local path made absolute: workers may have another cwd),
        in files labelled with a new :func:`run_label`: this run's, apart from earlier runs' in that folder."""
        if path is None:
            return dataclasses.replace(self, dead_letter_path=None, dead_letter_label=None)
        return dataclasses.replace(self, dead_letter_path=absolute_local_path(path), dead_letter_label=run_label())

    @property
    def routed(self) -> bool:
        """True when each row names its data source (there is no single ``datasource``)."""
        return self.datasource is None

    @property
    def destination(self) -> str | Callable[[Any], str]:
        """What ``WriteToTinybird(datasource=...)`` gets: a name, or a function of the element."""
        if self.datasource is not None:
            return self.datasource
        if self.datasource_field is not None:
            return DatasourceFromField(self.datasource_field, prefix=self.datasource_prefix)
        assert self.datasource_of is not None  # __post_init__ checked that one is given
        return self.datasource_of

    def describe_destination(self) -> str:
        """Where rows go, for the summary: ``data source 'events'``, ``data sources from field 'type'``..."""
        if self.datasource is not None:
            return f"data source {self.datasource!r}"
        if self.datasource_field is not None:
            prefix = f", prefixed {self.datasource_prefix!r}" if self.datasource_prefix else ""
            return f"data sources from field {self.datasource_field!r}{prefix}"
        return "data sources named by each record"

    @property
    def embedded(self) -> bool:
        """True when the job starts and uses the local Events API server."""
        return self.api_url is None

    @classmethod
    def from_options(cls, options: PipelineOptions, *,
                     datasource_of: Callable[[Any], str] | None = None) -> SinkConfig:
        """Reads the options added by :func:`add_sink_arguments`.

        Args:
            options: The pipeline's options.
            datasource_of: Where rows go when neither ``--datasource`` nor
                ``--datasource_field`` is given (the replay job's: each record's
                data source). Without it, ``--datasource`` defaults to
                :data:`DEFAULT_DATASOURCE` for the embedded server and is required with ``--api_url``.
        """
        values = option_values(options)
        api_url = values.get("api_url") or None
        datasource = values.get("datasource")
        datasource_field = values.get("datasource_field")
        if datasource is None and datasource_field is None and datasource_of is None:
            if api_url is not None:
                raise ValueError("--datasource is required with --api_url (or --datasource_field, to send each "
                                 "row to the data source one of its fields names)")
            datasource = DEFAULT_DATASOURCE
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        compression = values.get("compression", defaults["compression"])
        taken = {name: values[name] for name in (
            "token_env", "max_batch_bytes", "max_batch_rows", "num_shards", "max_windows_per_bundle",
            "max_buffering_secs", "dead_letter_format") if values.get(name) is not None}
        return cls(
            datasource=datasource,
            datasource_field=datasource_field,
            datasource_prefix=values.get("datasource_prefix") or "",
            datasource_of=datasource_of if datasource is None and datasource_field is None else None,
            api_url=api_url,
            token=values.get("token") or None,
            token_secret=values.get("token_secret") or None,
            wait=api_url is None if values.get("wait") is None else bool(values["wait"]),
            compression=None if compression == "none" else compression,
            dead_letter_path=values.get("dead_letter_path"),
            **taken,
        )

    def write_transform(self, endpoint: Endpoint, *, write_dead_letter_files: bool = True) -> beam.PTransform:
        """A :class:`~sinks.tinybird.WriteToTinybird` with these settings, sending to ``endpoint``.

        Args:
            endpoint: Where to send, and the token when the endpoint has one.
            write_dead_letter_files: False to leave writing ``dead_letter_path`` to the caller.
        """
        return WriteToTinybird(
            datasource=self.destination,
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
            max_windows_per_bundle=self.max_windows_per_bundle,
            dead_letter_path=self.dead_letter_path if write_dead_letter_files else None,
            dead_letter_format=self.dead_letter_format,
            dead_letter_label=self.dead_letter_label,
        )


def run_label(now: float | None = None) -> str:
    """A label for one run's dead-letter files: its start in UTC and 6 random hex digits,
    ``20261207T081502Z-3fa9c1`` (sortable, all of one length, so that no label starts with another)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(3)}"


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
    """Calls ``make()``; a ValueError or TypeError from validation becomes a :class:`UsageError`.

    The sink names its arguments (``num_shards must be ...``); on a command
    line they are options, so a message that starts with one says ``--num_shards``.
    """
    try:
        return make()
    except UsageError:
        raise
    except (ValueError, TypeError) as error:
        raise UsageError(as_option_message(str(error))) from error


def as_option_message(message: str) -> str:
    """``message`` with a leading sink argument name written as the option (``--name``)."""
    match = re.match(r"[a-z_]+\b", message)
    if match is not None and match.group() in _SINK_PARAMETERS:
        return "--" + message
    return message


def absolute_local_path(path: str) -> str:
    """``path`` made absolute when it is a local path (workers may run elsewhere in the tree)."""
    if "://" in path:
        return path
    absolute = os.path.abspath(os.path.expanduser(path))
    return absolute + "/" if path.endswith(("/", os.sep)) else absolute
