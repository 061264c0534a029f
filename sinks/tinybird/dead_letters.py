"""Dead letters: what the sink could not deliver, one record per element, and why.

A record keeps the exact NDJSON line that was (or would have been) sent, so a
dead-letter file can be replayed as it is. It never holds the token.
"""

from __future__ import annotations

import enum
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import fastavro
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindow, GlobalWindows, IntervalWindow, TimestampCombiner
from apache_beam.utils.timestamp import Timestamp

from sinks.tinybird._encoding import element_repr

_LOG = logging.getLogger(__name__)

__all__ = ["DeadLetter", "DeadLetterKind", "DeliveryError", "ReadDeadLetters", "WriteDeadLetterFiles"]


class DeadLetterKind(enum.StrEnum):
    """Why an element ended in the dead letters."""

    UNENCODABLE = "unencodable"
    """The element could not be encoded as one JSON object; it was never sent."""
    UNROUTABLE = "unroutable"
    """The ``datasource`` function raised, returned something other than a ``str``,
    or a name that is not a data source one can append to; never sent."""
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

    Text that cannot be written as UTF-8 is escaped: a lone surrogate in any
    field as ``\\udcff``, bytes of ``line`` that are not UTF-8 (only an
    ``orjson.Fragment`` can put them there) as ``\\xff``.

    Attributes:
        line: The exact NDJSON line (without the newline) that was or would have
            been sent; replaying it as is re-sends the element. ``None`` when the
            element could not be encoded.
        element: A ``repr`` of the element when it could not be encoded, else
            ``None``: whole for a ``str`` or ``bytes`` of up to
            ``max_batch_bytes`` (``ast.literal_eval`` reads it back), cut to 500
            characters for anything else.
        datasource: The data source the element was meant for (with a
            ``datasource`` function: what it returned for the element, or ``""``
            when it gave no ``str``).
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
    """The window of an element as text: ``"global"`` or ``"[start, end)"`` in UTC.

    Never raises: a bound outside the years 1-9999, which Beam's timestamps
    reach and Python's datetime does not (``beam.Create``'s elements sit at
    Beam's minimum timestamp; a time in microseconds read as milliseconds is
    in the year 55,000), is written in microseconds since the epoch, ``"<n>us"``.
    """
    if isinstance(window, GlobalWindow):
        return "global"
    if isinstance(window, IntervalWindow):
        return f"[{_instant_text(window.start)}, {_instant_text(window.end)})"
    return str(window)


def _instant_text(instant: Timestamp) -> str:
    try:
        return instant.to_rfc3339()
    except (OverflowError, ValueError):
        return f"{instant.micros}us"


def utf8_text(text: str) -> str:
    """``text`` with every lone surrogate escaped (``"\\udcff"``), so that it can be written as UTF-8.

    Dead letters quote what elements and functions gave (keys, exception
    messages, a data source function's result), and a lone surrogate there would
    fail the coder, metrics or file writer that meets it.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def line_text(line: bytes) -> str:
    """An NDJSON line as a dead letter's ``line``; bytes that are not UTF-8 (only an
    ``orjson.Fragment`` can put them there) are shown as ``\\x`` escapes."""
    return line.decode("utf-8", "backslashreplace")


def writable(record: DeadLetter) -> DeadLetter:
    """``record`` with its text fields made writable as UTF-8 (see :func:`utf8_text`)."""
    fields = record._asdict()
    for name, value in fields.items():
        if isinstance(value, str):
            fields[name] = utf8_text(value)
    return DeadLetter(**fields)


def to_json_line(record: DeadLetter) -> bytes:
    """One dead letter as a JSON line (with its newline)."""
    try:
        return orjson.dumps(record._asdict()) + b"\n"
    except orjson.JSONEncodeError:
        # A record not made by the sink, with a lone surrogate in its text.
        return orjson.dumps(writable(record)._asdict()) + b"\n"


def from_dict(fields: Any) -> DeadLetter:
    """A dead letter from the fields of a JSON line or Avro record.

    A record may leave fields out (a Beam YAML step that keeps ``kind``,
    ``message`` and ``line``): those that every record has then read as
    ``""`` (``attempts`` as 0), so that it can be written again, as Avro too.

    Raises:
        ValueError: ``fields`` is no dead-letter record: not a mapping, without a
            ``kind``, or with fields no dead letter has (a line of some other file).
    """
    if not isinstance(fields, dict):
        raise ValueError(f"a dead-letter record is a JSON object, got {type(fields).__name__}")
    foreign = sorted(str(name) for name in fields if name not in _FIELDS)
    if foreign:
        raise ValueError(f"a dead-letter record has no field {', '.join(foreign)[:200]}")
    if not isinstance(fields.get("kind"), str):
        raise ValueError("a dead-letter record has a kind (a string)")
    values: dict[str, Any] = {name: fields.get(name) for name in DeadLetter._fields}
    for name, default in _EVERY_RECORD_HAS.items():
        if values[name] is None:
            values[name] = default
    return DeadLetter(**values)


_FIELDS = frozenset(DeadLetter._fields)
# The fields every record written by the sink has (not null in AVRO_SCHEMA), and what a record without one reads as.
_EVERY_RECORD_HAS = {"datasource": "", "message": "", "attempts": 0, "first_attempt_at": "",
                     "last_attempt_at": "", "window": ""}


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
_UTF8_BOM = b"\xef\xbb\xbf"
DEAD_LETTER_SHARDS = 16
"""Bounded input: files written at once (Beam's WriteToFiles shards), so that a
backfill whose every row fails is not funnelled through one writer."""
STREAMING_FILE_EVERY_SECS: int = 10
"""Unbounded input: the longest (in processing time) a dead letter waits to be written, from
when the writing step receives it; each writer key writes at most one file per such period."""
STREAMING_FILE_KEYS = 2
"""Unbounded input: writers (keys of the grouping step); files per hour are at most
``STREAMING_FILE_KEYS * 3600 / STREAMING_FILE_EVERY_SECS`` (720), plus one per key at the end."""


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
        # Made writable first: fastavro fails on a lone surrogate halfway through a record,
        # with the fields before it already in the file (which no longer reads back).
        self._writer.write(writable(record)._asdict())
        self._written.inc()

    def flush(self) -> None:
        self._writer.flush()


DEAD_LETTER_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""What ``WriteDeadLetterFiles(label=)`` accepts: safe in a file name on every Beam filesystem, and in a glob."""


def _prefix(label: str | None) -> str:
    return "dead-letters" if label is None else f"dead-letters-{label}"


# Not fileio.FileNaming: Beam's alias lists seven arguments, and WriteToFiles passes six.
def _file_naming(suffix: str, label: str | None = None) -> Callable[..., str]:
    """``dead-letters-[<label>-][<window>-]<pane>-<shard>-of-<n>-<random><suffix>``: never another file's name.

    Beam's default naming leaves the pane out, so two firings of one window
    would write the same file; the random part also keeps a rerun or a
    replay from overwriting earlier dead letters.
    """

    def name(window, pane, shard_index, total_shards, compression, destination) -> str:
        parts = [_prefix(label)]
        if window != GlobalWindow():
            parts.append(f"{_instant_text(window.start)}-{_instant_text(window.end)}".replace(":", ""))
        parts.append(f"pane{pane.index if pane is not None else 0}")
        parts.append(f"{shard_index or 0:05d}-of-{total_shards or 1:05d}")
        parts.append(uuid.uuid4().hex[:12])
        return "-".join(parts) + suffix + (f".{compression}" if compression else "")

    return name


def streaming_file_name(epoch_secs: float, suffix: str, label: str | None = None) -> str:
    """``dead-letters-[<label>-]<UTC time>-<random><suffix>``: sorts by time, never the name of another file."""
    stamp = iso_utc(epoch_secs).replace(":", "").replace(".", "")
    return f"{_prefix(label)}-{stamp}-{uuid.uuid4().hex[:12]}{suffix}"


class _WritePaneFileDoFn(beam.DoFn):
    """Unbounded input: each pane of grouped dead letters goes to one new file, final when written.

    The file is written under a hidden temporary name (``.in-progress-...``,
    which ``dead-letters*`` patterns do not match and :class:`ReadDeadLetters`
    skips) and renamed to its final
    name in the same call: the pane's bundle does not complete (and the
    grouping step does not count its records as consumed) before they are in a
    final file. A call that fails deletes its temporary file; the runner
    retries the bundle, which writes a new file. The result is emitted at the
    pane's timestamp (see :class:`WriteDeadLetterFiles`); a pane with no
    records (the last one may be) writes no file.
    """

    def __init__(self, *, path: str, file_format: str, label: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._format = file_format
        self._label = label
        self._clock = clock

    def setup(self) -> None:
        self._files_written = Metrics.counter(METRICS_NAMESPACE, DEAD_LETTER_FILES_WRITTEN)

    def process(self, element: tuple[int, Iterable[DeadLetter]]) -> Iterator[fileio.FileResult]:
        records = iter(element[1])
        first = next(records, None)
        if first is None:
            return
        final = FileSystems.join(self._path, streaming_file_name(self._clock(), _SUFFIXES[self._format], self._label))
        temp = FileSystems.join(self._path, _TEMP_PREFIX + final.rsplit("/", 1)[-1])
        handle = FileSystems.create(temp, mime_type="application/octet-stream",
                                    compression_type=CompressionTypes.UNCOMPRESSED)
        try:
            sink = _AvroSink() if self._format == "avro" else _JsonLinesSink()
            sink.open(handle)
            sink.write(first)
            for record in records:
                sink.write(record)
            sink.flush()
            handle.close()
            FileSystems.rename([temp], [final])
        except BaseException:
            # Never a half-written file under a final name: the retried bundle writes the pane again.
            _delete_quietly(handle, temp)
            raise
        self._files_written.inc()
        yield fileio.FileResult(final, shard_index=-1, total_shards=0, window=GlobalWindow(), pane=None,
                                destination=None)


def _delete_quietly(handle: Any, temp: str) -> None:
    """Closes and deletes a temporary file after a failure (whose own exception is the one raised)."""
    try:
        handle.close()
        FileSystems.delete([temp])
    except Exception:
        _LOG.warning("could not delete the temporary dead-letter file %s", temp, exc_info=True)


class _SpreadOverKeys(beam.DoFn):
    """Keys each dead letter to one of ``STREAMING_FILE_KEYS`` writers, in turn."""

    def setup(self) -> None:
        self._next = random.randrange(STREAMING_FILE_KEYS)

    def process(self, record: DeadLetter) -> Iterator[tuple[int, DeadLetter]]:
        self._next = (self._next + 1) % STREAMING_FILE_KEYS
        yield self._next, record


class WriteDeadLetterFiles(beam.PTransform):
    """Writes dead letters to new files under ``path`` (any Beam filesystem path); never overwrites one.

    Bounded input is written once, at the end, by ``fileio.WriteToFiles``.
    Unbounded input is grouped across bundles before it is written: a
    ``GroupByKey`` over ``STREAMING_FILE_KEYS`` keys, in the global window,
    fires a pane ``STREAMING_FILE_EVERY_SECS`` (processing time) after its
    first dead letter, and a last one when the watermark reaches the end (a
    drain, the end of a test stream), whatever the user's windowing, the
    watermark or a late timestamp. Each pane becomes one
    final file (``dead-letters-[<label>-]<UTC time>-<random>``): at most
    ``STREAMING_FILE_KEYS`` files per ``STREAMING_FILE_EVERY_SECS`` (720 an
    hour) rather than one per bundle that has a dead letter (at 1% bad rows,
    nearly every bundle). Until its pane fires a dead letter is in the runner's
    state for the grouping step (durable on Dataflow, where a drain fires
    every pane; a cancelled job, or Beam's DirectRunner stopped, loses what
    that state holds, as it loses the sink's partial batches).

    Each file result is emitted at the newest timestamp of its records
    (``OUTPUT_AT_LATEST``), not at ``MIN_TIMESTAMP`` nor the end of the global
    window: a downstream ``WindowInto`` puts it in a window no older than any
    of its dead letters'.

    Returns a ``PCollection`` of :class:`apache_beam.io.fileio.FileResult`,
    one per file, and counts ``tinybird/dead_letter_records_written`` (both
    kinds of input) and ``tinybird/dead_letter_files_written`` (unbounded).

    Args:
        path: The folder the files go to.
        file_format: ``"json"`` (JSON lines) or ``"avro"``.
        label: Put in every file's name after ``dead-letters-`` (letters,
            digits, ``_.-``, at most 64): which run wrote it, so that
            ``dead-letters-<label>-*`` matches this run's files and no
            earlier run's in the same folder. The pipelines give each run
            its own.
    """

    def __init__(self, path: str, *, file_format: str = "json", label: str | None = None) -> None:
        super().__init__()
        if file_format not in _SUFFIXES:
            raise ValueError(f"dead_letter_format must be one of {DEAD_LETTER_FORMATS}, got {file_format!r}")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"dead_letter_path must be a non-empty path, got {path!r}")
        if label is not None and (not isinstance(label, str) or not DEAD_LETTER_LABEL.fullmatch(label)):
            raise ValueError(f"label must match {DEAD_LETTER_LABEL.pattern}, got {label!r}")
        self._path = path
        self._format = file_format
        self._label = label

    def expand(self, dead_letters):
        # Files are not per window: each record keeps its window as text.
        dead_letters = dead_letters | "IntoGlobalWindow" >> beam.WindowInto(GlobalWindows())
        if not dead_letters.is_bounded:
            return (
                dead_letters
                | "SpreadOverKeys" >> beam.ParDo(_SpreadOverKeys()).with_output_types(tuple[int, DeadLetter])
                | "IntoPanes" >> beam.WindowInto(
                    GlobalWindows(),
                    # Early panes by processing time, and a last one when the watermark reaches
                    # the end (a drain, the end of a TestStream): a Repeatedly(AfterProcessingTime)
                    # alone leaves Beam's DirectRunner waiting on a TestStream's clock forever.
                    trigger=trigger.AfterWatermark(early=trigger.AfterProcessingTime(STREAMING_FILE_EVERY_SECS)),
                    accumulation_mode=trigger.AccumulationMode.DISCARDING,
                    timestamp_combiner=TimestampCombiner.OUTPUT_AT_LATEST)
                | "GroupIntoPanes" >> beam.GroupByKey()
                | "WritePaneFiles" >> beam.ParDo(
                    _WritePaneFileDoFn(path=self._path, file_format=self._format, label=self._label)))
        sink = _AvroSink if self._format == "avro" else _JsonLinesSink
        return dead_letters | "Write" >> fileio.WriteToFiles(
            path=self._path,
            sink=lambda _destination: sink(),
            file_naming=_file_naming(_SUFFIXES[self._format], self._label),
            shards=DEAD_LETTER_SHARDS,
        )


def _read_file(readable: fileio.ReadableFile) -> Iterator[DeadLetter]:
    path = readable.metadata.path
    if path.rsplit("/", 1)[-1].startswith(_TEMP_PREFIX):
        # A pane's file that a killed writer left: its bundle's retry wrote the records to a final file.
        return
    # A file compressed since (dead-letters-....jsonl.gz) is read through its compression.
    compression = CompressionTypes.detect_compression_type(path)
    written = path if compression == CompressionTypes.UNCOMPRESSED else path.rsplit(".", 1)[0]
    with readable.open(compression_type=compression) as fh:
        if written.endswith(".avro"):
            yield from _read_avro(fh, path)
            return
        # readline: a CompressedFile (a .gz) is not iterable.
        for number, raw in enumerate(iter(fh.readline, b""), 1):
            if number == 1:
                raw = raw.removeprefix(_UTF8_BOM)  # a file saved by an editor that marks UTF-8
            if raw.strip():
                try:
                    yield from_dict(orjson.loads(raw))
                except ValueError as error:  # orjson.JSONDecodeError too
                    yield _not_a_record(raw.rstrip(b"\r\n"),
                                        f"line {number} of {path} is not a dead-letter record: {error}")


def _read_avro(fh, path: str) -> Iterator[DeadLetter]:
    """The records of an Avro file; one that stops short (copied while written) gives the records before the
    cut, then a record saying where it stopped, rather than failing a replay that posted those."""
    number = 0
    try:
        records = iter(fastavro.reader(fh))
        while True:
            try:
                fields = next(records)
            except StopIteration:
                return
            number += 1
            try:
                letter = from_dict(fields)
            except ValueError as error:
                letter = _not_a_record(None, f"record {number} of {path} is not a dead-letter record: {error}")
            yield letter
    except Exception as error:  # what the cut bytes make fastavro raise: EOFError, ValueError, ...
        yield _not_a_record(None, f"{path} cannot be read after its record {number} (a file cut short?): "
                                  f"{type(error).__name__}: {error}")


def _not_a_record(raw: bytes | None, message: str) -> DeadLetter:
    """What a dead-letter file holds that is no record (a line cut short, of some other file), as a
    dead letter without a line: failing the read would fail a replay after it posted the lines before it."""
    now = iso_utc(time.time())
    return DeadLetter(
        line=None, element=None if raw is None else element_repr(raw), datasource="",
        kind=DeadLetterKind.UNENCODABLE.value, status=None, message=utf8_text(message), attempts=0,
        first_attempt_at=now, last_attempt_at=now, window="global")


class ReadDeadLetters(beam.PTransform):
    """Reads dead-letter files (``*.avro`` as Avro, anything else as JSON lines).

    A JSON line that holds no record (a file cut short, a line of some other
    file) becomes a record of its own, of kind ``unencodable``, without a
    line, saying which line of which file it was (a replay carries it over).

    A temporary file of the writer (``.in-progress-...``, which ``dead-letters/*`` matches) is
    skipped: one is left only when its writer was killed, and the retried bundle wrote its
    records to a final file.
    """

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
