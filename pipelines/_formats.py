"""Reading files as records for the sink: NDJSON, JSON, CSV, Avro and Parquet.

Every reader yields what :class:`sinks.tinybird.WriteToTinybird` accepts: a
``dict``, or ``bytes`` holding one JSON object. A record that cannot be read as
one JSON object (a truncated NDJSON line, a CSV row with more values than the
header has columns) is not dropped: it is passed on in a form the sink refuses,
so it ends in the dead letters with the reason. Files go through Beam's
filesystems, so local paths, ``gs://`` (gcp extra) and ``s3://`` (aws extra)
all work, compressed or not (``.gz``, ``.bz2``, ``.zst``, ``.deflate``, ``.xz``).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import Any, Union

import apache_beam as beam
import orjson
from apache_beam.coders import BytesCoder
from apache_beam.io import ReadFromAvro, ReadFromParquet, ReadFromText, fileio
from apache_beam.io.filesystem import CompressionTypes

from sinks.tinybird._encoding import EncodingError, encode_element

FORMATS = ("ndjson", "json", "csv", "avro", "parquet")

_EXTENSIONS = {
    ".ndjson": "ndjson", ".jsonl": "ndjson", ".jsonlines": "ndjson", ".ldjson": "ndjson",
    ".json": "json",
    ".csv": "csv",
    ".avro": "avro",
    ".parquet": "parquet", ".pq": "parquet",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".deflate", ".zst", ".zstd", ".xz", ".lzma")
_UTF8_BOM = b"\xef\xbb\xbf"

# CSV values that are typed; anything else stays a string. Integers with a
# leading zero ("007", zip codes) stay strings, as do "NaN", "1,5" and "1e".
_CSV_INT = re.compile(r"^[+-]?(?:0|[1-9][0-9]*)$")
_CSV_FLOAT = re.compile(r"^[+-]?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+)$")
_CSV_BOOLS = {"true": True, "false": False}

Record = Union[dict[str, Any], bytes, "UnreadableRecord"]


def format_from_path(path: str) -> str | None:
    """The format named by ``path``'s extension (a compression suffix is skipped), or None."""
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for extension, file_format in _EXTENSIONS.items():
        if name.endswith(extension):
            return file_format
    return None


class UnreadableRecord:
    """A record that a reader could not turn into one JSON object.

    The sink refuses it (it is not a JSON object), so it becomes an
    ``unencodable`` dead letter whose ``element`` is this ``repr``: the file,
    the record's position, the reason and the text as read.
    """

    __slots__ = ("path", "position", "reason", "text")

    def __init__(self, *, path: str, position: str, reason: str, text: str) -> None:
        self.path = path
        self.position = position
        self.reason = reason
        self.text = text

    def __reduce__(self):
        return _rebuild_unreadable, (self.path, self.position, self.reason, self.text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnreadableRecord) and self.__reduce__() == other.__reduce__()

    def __hash__(self) -> int:
        return hash(self.__reduce__()[1])

    def __repr__(self) -> str:
        return (f"UnreadableRecord({self.path} {self.position}: {self.reason}; "
                f"text={self.text[:300]!r})")


def _rebuild_unreadable(path: str, position: str, reason: str, text: str) -> UnreadableRecord:
    return UnreadableRecord(path=path, position=position, reason=reason, text=text)


def csv_value(text: str) -> Any:
    """One CSV field, typed where unambiguous.

    Empty -> None (JSON null); ``true``/``false`` (any case) -> bool; an
    integer without a leading zero -> int; a decimal or exponent number -> float;
    anything else is kept as the string it is.
    """
    if not text:
        return None
    if _CSV_INT.match(text):
        return int(text)
    if _CSV_FLOAT.match(text):
        return float(text)
    flag = _CSV_BOOLS.get(text.lower())
    if flag is not None:
        return flag
    return text


def _non_blank_lines(line: bytes) -> Iterator[bytes]:
    if line.startswith(_UTF8_BOM):
        line = line[len(_UTF8_BOM):]
    if line and not line.isspace():
        yield line


class _JsonDocumentDoFn(beam.DoFn):
    """A ``.json`` file: one array (each item is a record) or one object.

    A file that is not one JSON document is read as JSON lines instead, since
    many ``.json`` files (BigQuery exports, for one) are NDJSON. The whole file
    is held in memory: prefer NDJSON for large files.
    """

    def process(self, readable: fileio.ReadableFile) -> Iterator[Record]:
        data = readable.read()
        if data.startswith(_UTF8_BOM):
            data = data[len(_UTF8_BOM):]
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            for line in data.split(b"\n"):
                yield from _non_blank_lines(line.rstrip(b"\r"))
            return
        if isinstance(document, list):
            for item in document:
                # A non-object item goes on as JSON text; the sink dead-letters it with the reason.
                yield item if isinstance(item, dict) else orjson.dumps(item)
        elif isinstance(document, dict):
            yield document
        else:
            yield data


class _CsvDoFn(beam.DoFn):
    """A CSV file with a header row: one dict per row, values typed by :func:`csv_value`.

    Quoted fields may span lines. A row with fewer values than columns gets
    nulls for the missing ones; a row with more values is an
    :class:`UnreadableRecord` (which value belongs to which column is unknown).
    """

    def process(self, readable: fileio.ReadableFile) -> Iterator[Record]:
        path = readable.metadata.path
        with readable.open(mime_type="application/octet-stream") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.reader(text)
            header = next(reader, None)
            if not header:
                return
            columns = len(header)
            for values in reader:
                if not values:
                    continue  # a blank line
                if len(values) > columns:
                    buffer = io.StringIO()
                    csv.writer(buffer, lineterminator="").writerow(values)
                    yield UnreadableRecord(
                        path=path, position=f"line {reader.line_num}",
                        reason=f"{len(values)} values for {columns} columns", text=buffer.getvalue())
                    continue
                record = {name: csv_value(value) for name, value in zip(header, values, strict=False)}
                for name in header[len(values):]:
                    record[name] = None
                yield record


def binary_safe_record(record: dict[str, Any]) -> bytes | dict[str, Any]:
    """An Avro or Parquet record as one JSON object, by the sink's own rules.

    Encoded here, once, with :func:`sinks.tinybird._encoding.encode_element`, so
    that what crosses to the sink is bytes: binary values become base64 text
    (RFC 4648), datetimes RFC 3339 (naive as UTC, ``Z`` for UTC; pandas
    ``Timestamp`` values, which pyarrow hands out for ``timestamp[ns]`` columns
    when pandas is installed, in UTC with their nanoseconds), decimals exact
    numbers. A record that cannot be encoded is returned unchanged, for the sink
    to dead-letter with its reason.
    """
    try:
        return encode_element(record)
    except EncodingError:
        return record


class ReadRecords(beam.PTransform):
    """Reads files matching ``file_pattern`` in ``file_format`` as records for the sink.

    Args:
        file_pattern: A glob on any Beam filesystem.
        file_format: One of :data:`FORMATS`.
    """

    def __init__(self, file_pattern: str, *, file_format: str) -> None:
        super().__init__()
        if file_format not in FORMATS:
            raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")
        self._pattern = file_pattern
        self._format = file_format

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        if self._format == "ndjson":
            return (
                pbegin
                | "ReadLines" >> ReadFromText(self._pattern, coder=BytesCoder(), validate=False)
                | "SkipBlankLines" >> beam.FlatMap(_non_blank_lines)
            )
        if self._format == "avro":
            return (
                pbegin
                | "ReadAvro" >> ReadFromAvro(self._pattern, validate=False)
                | "BinaryAsBase64" >> beam.Map(binary_safe_record)
            )
        if self._format == "parquet":
            return (
                pbegin
                | "ReadParquet" >> ReadFromParquet(self._pattern, validate=False)
                | "BinaryAsBase64" >> beam.Map(binary_safe_record)
            )
        parse = _JsonDocumentDoFn() if self._format == "json" else _CsvDoFn()
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._pattern)
            # Spread the files over workers before reading them whole.
            | "SpreadFiles" >> beam.Reshuffle()
            | "OpenFiles" >> fileio.ReadMatches(compression=CompressionTypes.AUTO)
            | f"Parse{self._format.upper()}" >> beam.ParDo(parse)
        )

