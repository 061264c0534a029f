"""Dead letters: what the sink could not deliver, one record per element, and why.

A record keeps the exact NDJSON line that was (or would have been) sent, so a
dead-letter file can be replayed as it is. It never holds the token.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import fastavro
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow, GlobalWindows, IntervalWindow
from apache_beam.utils.windowed_value import WindowedValue

_LOG = logging.getLogger(__name__)

__all__ = ["DeadLetter", "DeadLetterKind", "DeliveryError", "ReadDeadLetters", "WriteDeadLetterFiles"]


class DeadLetterKind(enum.StrEnum):
    """Why an element ended in the dead letters."""

    UNENCODABLE = "unencodable"
    """The element could not be encoded as one JSON object; it was never sent."""
    OVERSIZE = "oversize"
    """Its line alone is larger than ``max_batch_bytes``; it was never sent."""
    PAYLOAD_TOO_LARGE = "payload_too_large"
    """The server answered 413 to a request holding only this row."""
    REJECTED = "rejected"
    """A status that retrying cannot fix: 400, 401, 403, 404 and other 4xx, 501."""
    PARTIAL = "partial"
    """422: the server ingested the request partially; never retried (may duplicate)."""
    RETRIES_EXHAUSTED = "retries_exhausted"
    """Retryable failures (408, 5xx, timeouts, resets) outlasted the RetryPolicy."""
    THROTTLED = "throttled"
    """The server kept saying "slow down" (429, 503 with ``Retry-After``, an
    exhausted rate-limit window) for longer than the policy's
    ``max_throttled_secs``; nothing was stored, a replay is safe."""
    ROWS_UNACCOUNTED = "rows_unaccounted"
    """A 2xx whose body counted fewer rows (successful plus quarantined) than were
    sent; never retried, since the server may have stored some of them."""


class DeadLetter(NamedTuple):
    """One element that was not delivered.

    Attributes:
        line: The exact NDJSON line (without the newline) that was or would have
            been sent; replaying it as is re-sends the element. ``None`` when the
            element could not be encoded.
        element: A truncated ``repr`` of the element when it could not be
            encoded, else ``None``.
        datasource: The target data source.
        kind: A :class:`DeadLetterKind` value.
        status: The last HTTP status, or ``None`` when there was no response.
        message: Why: the server's error message, or the sink's own reason.
        attempts: HTTP attempts made for this element (0 when never sent).
        first_attempt_at: ISO-8601 UTC time of the first attempt, or when it was
            dead-lettered if never sent.
        last_attempt_at: ISO-8601 UTC time of the last attempt.
        window: The element's window, as text (``"global"`` for the global window).
    """

    line: str | None
    element: str | None
    datasource: str
    kind: str
    status: int | None
    message: str
    attempts: int
    first_attempt_at: str
    last_attempt_at: str
    window: str


class DeliveryError(RuntimeError):
    """Raised instead of dead-lettering when ``raise_on_failure`` is set.

    Carries what happened, never the token or the rows themselves.
    """

    def __init__(self, *, datasource: str, kind: str, status: int | None, message: str, rows: int) -> None:
        super().__init__(f"{rows} rows not delivered to {datasource}: {kind} (status {status}): {message}")
        self.datasource = datasource
        self.kind = kind
        self.status = status
        self.message = message
        self.rows = rows

    def __reduce__(self):
        return _rebuild_delivery_error, (self.datasource, self.kind, self.status, self.message, self.rows)


def _rebuild_delivery_error(datasource, kind, status, message, rows) -> DeliveryError:
    return DeliveryError(datasource=datasource, kind=kind, status=status, message=message, rows=rows)


def iso_utc(epoch_secs: float) -> str:
    """An epoch time as ISO 8601 UTC with milliseconds, as dead letters show times."""
    millis = round(epoch_secs * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000)) + f".{millis % 1000:03d}Z"


def window_text(window: object) -> str:
    """The window of an element as text: ``"global"`` or ``"[start, end)"`` in UTC."""
    if isinstance(window, GlobalWindow):
        return "global"
    if isinstance(window, IntervalWindow):
        return f"[{window.start.to_rfc3339()}, {window.end.to_rfc3339()})"
    return str(window)


def to_json_line(record: DeadLetter) -> bytes:
    """One dead letter as a JSON line (with its newline)."""
    return orjson.dumps(record._asdict()) + b"\n"


def from_dict(fields: Any) -> DeadLetter:
    """A dead letter from the fields of a JSON line or Avro record.

    Raises:
        ValueError: ``fields`` is not a mapping (a line of some other file).
    """
    if not isinstance(fields, dict):
        raise ValueError(f"a dead-letter record is a JSON object, got {type(fields).__name__}")
    values: dict[str, Any] = {name: fields.get(name) for name in DeadLetter._fields}
    return DeadLetter(**values)


AVRO_SCHEMA = fastavro.parse_schema({
    "type": "record",
    "name": "DeadLetter",
    "namespace": "sinks.tinybird",
    "doc": "An element that the Tinybird sink could not deliver, and why.",
    "fields": [
        {"name": "line", "type": ["null", "string"], "default": None},
        {"name": "element", "type": ["null", "string"], "default": None},
        {"name": "datasource", "type": "string"},
        {"name": "kind", "type": "string"},
        {"name": "status", "type": ["null", "int"], "default": None},
        {"name": "message", "type": "string"},
        {"name": "attempts", "type": "int"},
        {"name": "first_attempt_at", "type": "string"},
        {"name": "last_attempt_at", "type": "string"},
        {"name": "window", "type": "string"},
    ],
})

_SUFFIXES = {"json": ".jsonl", "avro": ".avro"}
DEAD_LETTER_FORMATS = tuple(_SUFFIXES)
METRICS_NAMESPACE = "tinybird"
DEAD_LETTER_RECORDS_WRITTEN = "dead_letter_records_written"
"""Counter: dead letters written to files (final or, for bounded input, about to be moved there)."""
DEAD_LETTER_FILES_WRITTEN = "dead_letter_files_written"
"""Counter: dead-letter files of unbounded input made final."""
_TEMP_PREFIX = ".in-progress-"


class _JsonLinesSink(fileio.FileSink):
    def __init__(self) -> None:
        self._written = Metrics.counter(METRICS_NAMESPACE, DEAD_LETTER_RECORDS_WRITTEN)

    def open(self, fh) -> None:
        self._fh = fh

    def write(self, record: DeadLetter) -> None:
        self._fh.write(to_json_line(record))
        self._written.inc()

    def flush(self) -> None:
        self._fh.flush()


class _AvroSink(fileio.FileSink):
    def __init__(self) -> None:
        self._written = Metrics.counter(METRICS_NAMESPACE, DEAD_LETTER_RECORDS_WRITTEN)

    def open(self, fh) -> None:
        self._writer = fastavro.write.Writer(fh, AVRO_SCHEMA, codec="deflate")

    def write(self, record: DeadLetter) -> None:
        self._writer.write(record._asdict())
        self._written.inc()

    def flush(self) -> None:
        self._writer.flush()


# Not fileio.FileNaming: Beam's alias lists seven arguments, and WriteToFiles passes six.
def _file_naming(suffix: str) -> Callable[..., str]:
    """``dead-letters-[<window>-]<pane>-<shard>-of-<n>-<random><suffix>``: never the name of another file.

    Beam's default naming leaves the pane out, so two firings of one window
    would write the same file; the random part also keeps a rerun or a
    replay from overwriting earlier dead letters.
    """

    def name(window, pane, shard_index, total_shards, compression, destination) -> str:
        parts = ["dead-letters"]
        if window != GlobalWindow():
            parts.append(f"{window.start.to_rfc3339()}-{window.end.to_rfc3339()}".replace(":", ""))
        parts.append(f"pane{pane.index if pane is not None else 0}")
        parts.append(f"{shard_index or 0:05d}-of-{total_shards or 1:05d}")
        parts.append(uuid.uuid4().hex[:12])
        return "-".join(parts) + suffix + (f".{compression}" if compression else "")

    return name


def streaming_file_name(epoch_secs: float, suffix: str) -> str:
    """``dead-letters-<UTC time>-<random><suffix>``: sorts by time, never the name of another file."""
    stamp = iso_utc(epoch_secs).replace(":", "").replace(".", "")
    return f"dead-letters-{stamp}-{uuid.uuid4().hex[:12]}{suffix}"


class _WriteBundleFilesDoFn(beam.DoFn):
    """Unbounded input: the dead letters of each bundle go to one new file, final when the bundle ends.

    The file is written under a hidden temporary name (``.in-progress-...``,
    which ``dead-letters*`` patterns do not match) and renamed to its final
    name in ``finish_bundle``: a bundle does not complete, and so its input is
    neither checkpointed nor acknowledged, before its dead letters are in a
    final file. A bundle that fails leaves its temporary file, deleted in
    ``teardown``; the runner retries the bundle, which writes a new file.
    Nothing is held in memory between bundles, so stopping a runner never
    strands a dead letter in a temporary file.
    """

    def __init__(self, *, path: str, file_format: str, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._format = file_format
        self._clock = clock

    def setup(self) -> None:
        self._files_written = Metrics.counter(METRICS_NAMESPACE, DEAD_LETTER_FILES_WRITTEN)
        self._open: tuple[str, str, Any, fileio.FileSink] | None = None  # (temp, final, handle, sink)

    def start_bundle(self) -> None:
        self._discard_open_file()

    def process(self, record: DeadLetter) -> None:
        if self._open is None:
            final = FileSystems.join(self._path, streaming_file_name(self._clock(), _SUFFIXES[self._format]))
            temp = FileSystems.join(self._path, _TEMP_PREFIX + final.rsplit("/", 1)[-1])
            handle = FileSystems.create(temp, mime_type="application/octet-stream",
                                        compression_type=CompressionTypes.UNCOMPRESSED)
            sink = _AvroSink() if self._format == "avro" else _JsonLinesSink()
            sink.open(handle)
            self._open = (temp, final, handle, sink)
        self._open[3].write(record)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._open is None:
            return
        temp, final, handle, sink = self._open
        sink.flush()
        handle.close()
        FileSystems.rename([temp], [final])
        self._open = None
        self._files_written.inc()
        yield GlobalWindows.windowed_value(
            fileio.FileResult(final, shard_index=-1, total_shards=0, window=GlobalWindow(), pane=None,
                              destination=None))

    def teardown(self) -> None:
        self._discard_open_file()

    def _discard_open_file(self) -> None:
        """The file of a bundle that failed: its records will be written again when the bundle is retried."""
        if self._open is None:
            return
        temp, _, handle, _ = self._open
        self._open = None
        try:
            handle.close()
            FileSystems.delete([temp])
        except Exception:
            _LOG.warning("could not delete the temporary dead-letter file %s", temp, exc_info=True)


class WriteDeadLetterFiles(beam.PTransform):
    """Writes dead letters to new files under ``path`` (any Beam filesystem path); never overwrites one.

    Bounded input is written once, at the end, by ``fileio.WriteToFiles``.
    Unbounded input is written bundle by bundle: the dead letters a bundle
    receives are in a final file (``dead-letters-<UTC time>-<random>``) when
    that bundle completes, whatever the windowing, the watermark or a late
    timestamp, and before the runner checkpoints the bundle (Dataflow) or
    reports it done. The bound on how long a dead letter waits for its file is
    therefore one bundle of this step: on Dataflow's streaming engine bundles
    last well under a second; on Beam's DirectRunner, the rest of the bundle's
    evaluation (measured in ``tests/pipelines/test_streaming_pubsub.py``). A
    bundle with no dead letters writes no file.

    Returns a ``PCollection`` of :class:`apache_beam.io.fileio.FileResult`,
    one per file, and counts ``tinybird/dead_letter_records_written`` (both
    kinds of input) and ``tinybird/dead_letter_files_written`` (unbounded).
    """

    def __init__(self, path: str, *, file_format: str = "json") -> None:
        super().__init__()
        if file_format not in _SUFFIXES:
            raise ValueError(f"dead_letter_format must be one of {DEAD_LETTER_FORMATS}, got {file_format!r}")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"dead_letter_path must be a non-empty path, got {path!r}")
        self._path = path
        self._format = file_format

    def expand(self, dead_letters):
        if not dead_letters.is_bounded:
            return dead_letters | "WriteBundleFiles" >> beam.ParDo(
                _WriteBundleFilesDoFn(path=self._path, file_format=self._format))
        sink = _AvroSink if self._format == "avro" else _JsonLinesSink
        return dead_letters | "Write" >> fileio.WriteToFiles(
            path=self._path,
            sink=lambda _destination: sink(),
            file_naming=_file_naming(_SUFFIXES[self._format]),
            shards=1,
        )


def _read_file(readable: fileio.ReadableFile) -> Iterator[DeadLetter]:
    with readable.open(compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        if readable.metadata.path.endswith(".avro"):
            for fields in fastavro.reader(fh):
                yield from_dict(fields)
            return
        for raw in fh:
            if raw.strip():
                yield from_dict(orjson.loads(raw))


class ReadDeadLetters(beam.PTransform):
    """Reads dead-letter files (``*.avro`` as Avro, anything else as JSON lines)."""

    def __init__(self, file_pattern: str) -> None:
        super().__init__()
        self._file_pattern = file_pattern

    def expand(self, pbegin):
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self._file_pattern)
            | "Open" >> fileio.ReadMatches()
            | "Parse" >> beam.FlatMap(_read_file)
        )
