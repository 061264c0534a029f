"""Reading files as records for the sink: NDJSON, JSON, CSV, Avro and Parquet.

Every reader yields what :class:`sinks.tinybird.WriteToTinybird` accepts: a
``dict``, or ``bytes`` holding one JSON object. A record that cannot be read as
one JSON object (a truncated NDJSON line, a CSV row with more values than the
header has columns) is not dropped: it is passed on in a form the sink refuses,
so it ends in the dead letters with the reason. Files go through Beam's
filesystems, so local paths, ``gs://`` (gcp extra) and ``s3://`` (aws extra)
all work. NDJSON, JSON and CSV files may be compressed (``.gz``, ``.bz2``,
``.zst``, ``.deflate``, ``.xz``); Avro and Parquet compress inside the file
(with a codec) and are refused with a compression suffix.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
import lzma
import math
import re
import sys
import zlib
from collections.abc import Collection, Iterable, Iterator
from typing import Any, Union

import apache_beam as beam
import orjson
import zstandard
from apache_beam.io import ReadFromAvro, ReadFromParquetBatched, fileio
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.restriction_trackers import OffsetRange

from sinks.tinybird._encoding import EncodingError, encode_element

FORMATS = ("ndjson", "json", "csv", "avro", "parquet")
COMPRESSIBLE_FORMATS = ("ndjson", "json", "csv")
"""Formats whose files may be compressed as a whole (``x.csv.gz``). Avro and
Parquet compress their blocks inside the file, and Beam's readers of them do not
decompress a whole file: a compressed one would fail with an unhelpful error."""

CSV_MAX_FIELD_CHARS = 10 * 1024 * 1024
"""Longest CSV field read. A longer one makes its row larger than the Events API
takes in one request (10 MB), so the row could never be sent: it is an
:class:`UnreadableRecord` instead of a field held in memory without bound."""

_EXTENSIONS = {
    ".ndjson": "ndjson", ".jsonl": "ndjson", ".jsonlines": "ndjson", ".ldjson": "ndjson",
    ".json": "json",
    ".csv": "csv",
    ".avro": "avro",
    ".parquet": "parquet", ".pq": "parquet",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".deflate", ".zst", ".zstd", ".xz", ".lzma")
_UTF8_BOM = b"\xef\xbb\xbf"
# Bytes asked of a Beam file at once when a whole file is read (Beam's own read size).
_READ_BYTES = 16 * 1024 * 1024
# Bytes of an uncompressed NDJSON file read as one part, by any worker (ReadAllFromText's default).
_RANGE_BYTES = 64 * 1024 * 1024
# Bytes that are not UTF-8, as decoded with errors="surrogateescape".
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_CUT_SHORT = "the compressed data stops before its end (a truncated file): what followed is lost"
# The sink keeps this much of an element's repr in a dead letter, cutting out the
# middle of a longer one (sinks.tinybird._encoding.element_repr): an
# UnreadableRecord's text gets what its file, position and reason leave, and a
# reader keeps no more of a record's text than this.
_REPR_CHARS = 400

# CSV values that are typed; anything else stays a string. Integers with a
# leading zero ("007", zip codes) stay strings, as do "NaN", "1,5" and "1e".
_CSV_INT = re.compile(r"^[+-]?(?:0|[1-9][0-9]*)$")
_CSV_FLOAT = re.compile(r"^[+-]?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+)$")
_CSV_BOOLS = {"true": True, "false": False}
# Any decimal of at most 15 significant digits comes back digit for digit from the
# nearest double (DBL_DIG), in the range of normal doubles; longer ones are checked.
_FLOAT_EXACT_DIGITS = sys.float_info.dig

Record = Union[dict[str, Any], bytes, "UnreadableRecord"]


def compression_suffix(path: str) -> str | None:
    """The compression suffix ``path`` ends with (``.gz``, ``.zst``...), or None."""
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def format_from_path(path: str) -> str | None:
    """The format named by ``path``'s extension (a compression suffix is skipped), or None.

    ``x.avro.gz`` is ``avro``: :func:`check_compression` then says why it cannot be read.
    """
    name = path.rsplit("/", 1)[-1].lower()
    suffix = compression_suffix(name)
    if suffix:
        name = name[: -len(suffix)]
    for extension, file_format in _EXTENSIONS.items():
        if name.endswith(extension):
            return file_format
    return None


def check_compression(file_pattern: str, file_format: str) -> None:
    """Raises ValueError when ``file_pattern`` names compressed files of a format read only uncompressed."""
    suffix = compression_suffix(file_pattern)
    if suffix and file_format not in COMPRESSIBLE_FORMATS:
        raise ValueError(
            f"{file_pattern!r} is compressed ({suffix}), but {file_format} files are read only "
            f"uncompressed: they compress inside the file (with a codec such as snappy, zstd or "
            f"deflate), and Beam's reader does not decompress a whole one. Decompress it; only "
            f"{', '.join(COMPRESSIBLE_FORMATS)} files may be compressed")


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
        # A lone surrogate (a local file name that is not UTF-8) would make the dead
        # letter unwritable as JSON or Avro: shown escaped.
        head = _escaped(f"UnreadableRecord({self.path} {self.position}: {self.reason}; text=")
        room = max(_REPR_CHARS - len(head) - 1, 5)
        text = _escaped(repr(self.text[:room]))
        if len(text) > room:  # escapes made it longer
            text = text[: room - 3] + "..."
        return f"{head}{text})"


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _rebuild_unreadable(path: str, position: str, reason: str, text: str) -> UnreadableRecord:
    return UnreadableRecord(path=path, position=position, reason=reason, text=text)


def csv_value(text: str) -> Any:
    """One CSV field, typed where unambiguous.

    Empty -> None (JSON null); ``true``/``false`` (any case) -> bool; an
    integer without a leading zero -> int; a decimal or exponent number -> float
    when the float is that number (a normal double whose shortest text has the
    same digits: any number of up to 15 significant digits in the range, and
    whatever a program wrote from a double), else a ``Decimal``, which the sink
    sends exactly as written, as an NDJSON line would be: ``1e999`` is not sent
    as infinity, which JSON writes as ``null``, and
    ``0.1000000000000000055511`` keeps its digits. Anything else is kept as
    the string it is; so is an integer longer than Python converts (4,300
    digits) and an exponent no ``Decimal`` holds: no Tinybird column holds such
    a number (Int256 has 77 digits), and the string keeps it exactly.
    """
    if not text:
        return None
    if _CSV_INT.match(text):
        try:
            return int(text)
        except ValueError:  # longer than sys.get_int_max_str_digits()
            return text
    number = _CSV_FLOAT.match(text)
    if number:
        value = float(text)
        if sys.float_info.min <= abs(value) < math.inf:  # a normal double
            # At most 15 digits (a "." or "e" is among the characters), or the float's shortest text.
            shortest = repr(value) if len(text) > _FLOAT_EXACT_DIGITS + 1 else text
            if shortest == text or _significant_digits(text) == _significant_digits(shortest):
                return value
        elif value == 0.0 and not _significant_digits(text):
            return value
        try:
            return decimal.Decimal(text)
        except decimal.InvalidOperation:  # an exponent of more than 18 digits
            return text
    flag = _CSV_BOOLS.get(text.lower())
    if flag is not None:
        return flag
    return text


def _significant_digits(number: str) -> str:
    """``"-1.2345e+16"`` -> ``"12345"``, ``"0.0"`` -> ``""``."""
    return number.lower().split("e")[0].lstrip("+-").replace(".", "").strip("0")


def _non_blank_lines(line: bytes) -> Iterator[bytes]:
    """The records of one NDJSON line: the line without a UTF-8 BOM, unless it is blank.

    A line that holds a bare ``\\r`` and is not one JSON document is split there:
    a file with classic Mac line ends (``\\r`` alone) arrives as one line. In a
    JSON document a raw ``\\r`` can only be whitespace between tokens, so a line
    that parses whole is kept whole.
    """
    if line.startswith(_UTF8_BOM):
        line = line[len(_UTF8_BOM):]
    if b"\r" in line and not _is_json(line):
        yield from (part for part in line.split(b"\r") if part and not part.isspace())
    elif line and not line.isspace():
        yield line


def _is_json(text: bytes) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


class _CutShort(EOFError):
    """Compressed data that stops before its end marker, or that is corrupt; its text says which."""


# What the decompressors raise on data that is not theirs (trailing zero padding after a .gz,
# a flipped bit).
_DECOMPRESSION_ERRORS = (zlib.error, lzma.LZMAError, zstandard.ZstdError)
# bz2's: a bare OSError, as an I/O error is, told apart by its exact text (CPython's _bz2 module
# raises it for BZ_DATA_ERROR and BZ_DATA_ERROR_MAGIC alone). Any other OSError fails the bundle.
_BZ2_DATA_ERROR = ("Invalid data stream",)


def _decompressed(file: Any, size: int) -> bytes:
    """``file.read(size)``; corrupt compressed data raises :class:`_CutShort`, saying so."""
    try:
        return file.read(size)
    except (*_DECOMPRESSION_ERRORS, OSError) as error:
        if isinstance(error, OSError) and (type(error) is not OSError or error.args != _BZ2_DATA_ERROR):
            raise
        raise _CutShort(f"the compressed data is corrupt ({type(error).__name__}: {error}): "
                        "what followed is lost") from error


class _RawFile(io.RawIOBase):
    """A file from Beam's filesystems as a raw binary stream, for ``io.BufferedReader``.

    Beam opens a compressed file as a ``CompressedFile``, which is no ``io``
    object (TextIOWrapper asks it for ``writable``), whatever the compression.
    Beam's reader also ends quietly where compressed data stops short (a
    truncated upload: half a ``.gz``, nothing of a ``.bz2``): here the read
    that finds the end raises :class:`_CutShort` instead. The Beam file is
    not closed here: whoever opened it closes it.
    """

    def __init__(self, file: Any) -> None:
        super().__init__()
        self._file = file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = _decompressed(self._file, len(buffer))
        if not data and _cut_short(self._file):
            raise _CutShort(_CUT_SHORT)
        buffer[: len(data)] = data
        return len(data)


def _cut_short(file: Any) -> bool:
    """Whether ``file``, read to its end, is compressed data without its end marker.

    Beam's ``CompressedFile`` keeps its decompressor (zlib, bz2, lzma or zstd,
    each with ``eof``) in ``_decompressor`` and does not look at ``eof`` itself;
    a plain file has none. tests/pipelines/test_files_pipeline.py cuts a file of
    each compression, so that a Beam that renames it is noticed.
    """
    decompressor = getattr(file, "_decompressor", None)
    return decompressor is not None and not decompressor.eof


def _read_whole(readable: fileio.ReadableFile) -> tuple[bytes, str | None]:
    """The file's data, decompressed, and why it stopped short of its end (None: it did not)."""
    chunks = []
    with readable.open(mime_type="application/octet-stream") as file:
        try:
            while chunk := _decompressed(file, _READ_BYTES):
                chunks.append(chunk)
            cut = _CUT_SHORT if _cut_short(file) else None
        except _CutShort as error:
            cut = str(error)
    return b"".join(chunks), cut


def _exact_json(data: bytes) -> Any:
    """``data`` as one JSON document, every number exactly as written.

    orjson reads numbers as doubles and 64-bit integers (a wider one becomes a
    float, ``0.1000000000000000055511151231257827`` becomes ``0.1``), losing
    digits that the same row as an NDJSON line keeps: decimals here become
    ``Decimal`` and integers Python ``int``, both of which the sink writes
    exactly. Refused, as orjson refuses them: NaN and Infinity, which JSON has
    not, and an escaped lone surrogate (``"\\ud800"``), which stdlib json lets
    through into a string that no coder can write (Beam's would fail the bundle).
    """
    document = json.loads(data.decode("utf-8"), parse_float=decimal.Decimal, parse_constant=_not_json)
    if (b"\\ud" in data or b"\\uD" in data) and not _is_json(data):
        # orjson refuses a lone surrogate, but also a number no double holds (1E+400), which
        # is kept: only a string holding a lone surrogate cannot be encoded (UnicodeEncodeError).
        json.dumps(document, ensure_ascii=False, default=str).encode("utf-8")
    return document


def _not_json(name: str) -> Any:
    """NaN, Infinity or -Infinity in a document: Python's json writes them, JSON has none."""
    raise ValueError(f"{name} is not a JSON value")


class _Unsendable:
    """A value of a document that no JSON text sent can hold, left in its place (:func:`_tolerant_json`):
    its text as written, and why it cannot be sent."""

    __slots__ = ("reason", "text")

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason

    def __repr__(self) -> str:
        return self.text


def _constant(name: str) -> _Unsendable:
    return _Unsendable(name, "NaN, Infinity and -Infinity are not JSON values")


def _int_or_huge(text: str) -> int | _Unsendable:
    try:
        return int(text)
    except ValueError:  # more digits than Python reads (sys.get_int_max_str_digits)
        return _Unsendable(text, "an integer of more than 4,300 digits")


def _tolerant_json(data: bytes) -> Any:
    """``data`` as one JSON document, as :func:`_exact_json` reads it, but whatever no JSON text can
    hold left in place, for :func:`_refusal` to find in its item: NaN and Infinity and integers
    Python will not read (as :class:`_Unsendable`), bytes that are not UTF-8 (as lone surrogates,
    ``surrogateescape``) and escaped lone surrogates."""
    return json.loads(data.decode("utf-8", "surrogateescape"), parse_float=decimal.Decimal,
                      parse_int=_int_or_huge, parse_constant=_constant)


def _refusal(value: Any) -> str | None:
    """Why an item of :func:`_tolerant_json` cannot be sent, or None when it can."""
    try:
        return _walk_for_refusal(value)
    except RecursionError:  # nested deeper than Python recurses: nothing it holds can be checked
        return "nested deeper than this reader can check"


def _walk_for_refusal(value: Any) -> str | None:
    if isinstance(value, _Unsendable):
        return value.reason
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a string holds a lone surrogate or bytes that are not UTF-8"
        return None
    if isinstance(value, dict):
        return next(filter(None, (_walk_for_refusal(v) for pair in value.items() for v in pair)), None)
    if isinstance(value, list):
        return next(filter(None, map(_walk_for_refusal, value)), None)
    return None


def _exact_number(value: decimal.Decimal) -> orjson.Fragment:
    return orjson.Fragment(str(value))


class _NdjsonPartsDoFn(beam.DoFn):
    """A matched NDJSON file as the parts that workers read apart: ``(metadata, start, stop)``.

    An uncompressed file is cut into byte ranges, as ``ReadFromText`` splits one.
    A file whose name has a compression suffix is one part, read whole: compressed
    data cannot be read from its middle.
    """

    def __init__(self, range_bytes: int) -> None:
        self._range_bytes = range_bytes

    def process(self, metadata: FileMetadata) -> Iterator[tuple[FileMetadata, int, int]]:
        if compression_suffix(metadata.path):
            yield metadata, 0, metadata.size_in_bytes
            return
        for part in OffsetRange(0, metadata.size_in_bytes).split(self._range_bytes):
            yield metadata, part.start, part.stop


class _NdjsonDoFn(beam.DoFn):
    """A part of an NDJSON file (see :class:`_NdjsonPartsDoFn`), line by line.

    Each file is read as its own name says, whatever the pattern that matched it:
    one with a compression suffix is decompressed, and where its compressed data
    stops short (a cut ``.gz`` gives its first lines, a cut ``.bz2`` or ``.zst``
    none) it ends with an :class:`UnreadableRecord` that says so, which
    ``ReadFromText`` does not; any other is read uncompressed.
    """

    def process(self, part: tuple[FileMetadata, int, int]) -> Iterator[Record]:
        metadata, start, stop = part
        if compression_suffix(metadata.path):
            yield from _compressed_ndjson(metadata.path)
            return
        for line in _lines_starting_in(metadata.path, start, stop):
            yield from _non_blank_lines(line)


def _compressed_ndjson(path: str) -> Iterator[Record]:
    """The records of a compressed NDJSON file, then one saying so if it stops short.

    ``ReadFromText`` cannot split a compressed file either, but it ends quietly
    where the compressed data stops: a cut ``.bz2`` or ``.zst`` gave no line at all.
    """
    lines_read = 0
    with FileSystems.open(path, "application/octet-stream", compression_type=CompressionTypes.AUTO) as file:
        try:
            for line in io.BufferedReader(_RawFile(file)):
                lines_read += 1
                yield from _non_blank_lines(line.rstrip(b"\r\n"))
        except _CutShort as cut:
            yield UnreadableRecord(path=path, position=f"after line {lines_read}", reason=str(cut), text="")


def _lines_starting_in(path: str, start: int, stop: int) -> Iterator[bytes]:
    """The lines of an uncompressed file that start at a byte in ``[start, stop)``, without their ends.

    As ``ReadFromText`` reads a range: a line that starts in it is read whole,
    past ``stop`` if need be, and the line that the byte before ``start`` belongs
    to is the range before's. A line ends at ``\\n``; a ``\\r`` before it goes
    with it. Read through a buffer: a Beam file may have no ``readline`` of its
    own (a GCS one reads a line byte by byte).
    """
    with FileSystems.open(path, "application/octet-stream",
                          compression_type=CompressionTypes.UNCOMPRESSED) as file:
        position = max(start - 1, 0)
        file.seek(position)
        lines = io.BufferedReader(_RawFile(file))
        if start:
            position += len(lines.readline())
        while position < stop and (line := lines.readline()):
            position += len(line)
            yield line[:-2] if line.endswith(b"\r\n") else line.removesuffix(b"\n")


class _JsonDocumentDoFn(beam.DoFn):
    """A ``.json`` file: one array (each item is a record) or one object.

    A file that is not one JSON document is read as JSON lines instead, since
    many ``.json`` files (BigQuery exports, for one) are NDJSON. The whole file
    is held in memory: prefer NDJSON for large files. Numbers are kept exactly
    (see :func:`_exact_json`), which costs about a quarter more time than orjson
    (a 50 MB array read and encoded: 3.2 s against 2.6 s, medians of three).
    A compressed file that stops short yields an :class:`UnreadableRecord`
    saying so, besides what could be read. A document that is JSON but for
    values no JSON text sent can hold (NaN or Infinity, as Python's ``json``
    writes them; a lone surrogate escape; bytes that are not UTF-8 in a string;
    an integer of more than 4,300 digits) is read as one: each item holding one
    is an :class:`UnreadableRecord` with its whole text, as NDJSON refuses such a line.
    """

    def process(self, readable: fileio.ReadableFile) -> Iterator[Record]:
        data, cut = _read_whole(readable)
        if cut is not None:
            yield UnreadableRecord(path=readable.metadata.path, position=f"after byte {len(data)}",
                                   reason=cut, text=data[-_REPR_CHARS:].decode("utf-8", "replace"))
        if data.startswith(_UTF8_BOM):
            data = data[len(_UTF8_BOM):]
        path, tolerant = readable.metadata.path, False
        try:
            try:
                document = _exact_json(data)
            except ValueError:
                # Maybe a document but for some items no JSON text can hold (NaN as Python's
                # json writes it, a lone surrogate, bytes that are not UTF-8): only they are
                # refused, as NDJSON refuses such a line.
                document, tolerant = _tolerant_json(data), True
        except (ValueError, RecursionError):  # not one document (or nested deeper than Python recurses)
            for line in data.split(b"\n"):
                yield from _non_blank_lines(line.rstrip(b"\r"))
            return
        items = document if isinstance(document, list) else [document]
        for number, item in enumerate(items, 1):
            reason = _refusal(item) if tolerant else None
            if reason is not None:
                yield UnreadableRecord(
                    path=path, position=f"item {number}" if isinstance(document, list) else "the document",
                    reason=reason, text=repr(item))
            elif isinstance(item, dict):
                yield item
            elif isinstance(document, list):
                # A non-object item goes on as JSON text; the sink dead-letters it with the reason.
                yield _item_text(item)
            else:
                yield data


def _item_text(item: Any) -> Any:
    """A non-object item of a JSON array as JSON text, or as it is when it has no JSON text."""
    try:
        return orjson.dumps(item, default=_exact_number)
    except orjson.JSONEncodeError:  # a lone surrogate, deep nesting: the sink names what
        return item


class _RowLines:
    """The lines of a CSV file for ``csv.reader``, remembering those of the row being read.

    What csv.reader does not tell: where a row starts and ends, its text as
    written, whether it holds bytes that are not UTF-8, whether it holds a
    ``"``, and where a row it stopped reading at an error ends (see
    :meth:`skip_row`). A compressed file that stops short ends the lines, with
    :attr:`cut_short` set.
    """

    def __init__(self, text: Iterable[str]) -> None:
        self._text = iter(text)
        self.line = 0
        self.cut_short: str | None = None
        """Why the lines stopped short of the file's end (compressed data cut or corrupt), if they did."""
        self.new_row()

    def new_row(self) -> None:
        """The next line read starts a row."""
        self.first_line = self.line + 1
        self.quotes = 0
        self.undecodable = False
        self._kept: list[str] = []
        self._kept_chars = 0
        # Every line of the row (csv.reader holds its fields as long, up to the field limit).
        self._row: list[str] = []

    def __iter__(self) -> _RowLines:
        return self

    def __next__(self) -> str:
        try:
            line = next(self._text)
        except _CutShort as cut:
            self.cut_short = str(cut)
            raise StopIteration from None
        self.line += 1
        self.quotes += line.count('"')
        if not line.isascii() and _UNDECODABLE.search(line):
            self.undecodable = True
        self._row.append(line)
        if self._kept_chars < _REPR_CHARS:
            kept = line[: _REPR_CHARS - self._kept_chars]
            self._kept.append(kept)
            self._kept_chars += len(kept)
        return line

    def skip_row(self) -> bool:
        """Reads on to the end of the row csv.reader stopped in; whether a quoted field never closed.

        After an error csv.reader starts again at the next line, which, inside
        a quoted field, is part of this row: read as a row, it would be a
        made-up one. The row ends where csv would end it if it were not strict
        (see :func:`_ends_in_quotes`), or at the end of the file.
        """
        quoted = _ends_in_quotes("".join(self._row))
        while quoted and next(self, None) is not None:
            quoted = _ends_in_quotes(self._row.pop(), quoted=True)
        return quoted

    def position(self) -> str:
        if self.line <= self.first_line:
            return f"line {self.first_line}"
        return f"lines {self.first_line}-{self.line}"

    def covered(self) -> str:
        """How many lines the row took, when more than one: a reason says so."""
        count = self.line - self.first_line + 1
        return f" ({count:,} lines read as this one record)" if count > 1 else ""

    def text(self) -> str:
        """The row as written, at most ``_REPR_CHARS`` characters; bytes that are not UTF-8 as ``\\xNN``."""
        text = "".join(self._kept).rstrip("\r\n")
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_CSV_FIELD_END = re.compile(r"[,\r\n]")


def _ends_in_quotes(text: str, *, quoted: bool = False) -> bool:
    """Whether CSV ``text`` (starting inside a quoted field if ``quoted``) ends inside one.

    As csv reads it when not strict: a ``"`` opens a quoted field only where a
    field starts, and ``""`` inside one is a quote; elsewhere (``12" pipe``, or
    text after the quote that closed a field) a ``"`` is a character. So a
    count of ``"`` cannot tell: ``2,"12" pipe"`` holds three and ends outside.
    """
    position = 0
    if not quoted and text.startswith('"'):
        quoted, position = True, 1
    while True:
        if quoted:
            close = text.find('"', position)
            while close >= 0 and text.startswith('"', close + 1):
                close = text.find('"', close + 2)
            if close < 0:
                return True
            position = close + 1
        end = _CSV_FIELD_END.search(text, position)
        if end is None:
            return False
        position = end.end()
        quoted = text.startswith('"', position)
        position += quoted


def _column_names(header: list[str]) -> list[str]:
    """The header's names; a repeated one gets ``_1``, ``_2``... (as DuckDB names them).

    So that no value is lost to a later column of the same name. pandas
    appends ``.1``, which is not a valid Tinybird column name.
    """
    taken = set(header)
    names: list[str] = []
    for name in header:
        if name in names:
            suffix = 1
            while f"{name}_{suffix}" in taken:
                suffix += 1
            name = f"{name}_{suffix}"
            taken.add(name)
        names.append(name)
    return names


def _csv_records(path: str, text: Iterable[str], text_columns: Collection[str] = ()) -> Iterator[Record]:
    """The records of a CSV file whose lines ``text`` yields (with their line ends).

    See :class:`_CsvDoFn`. ``text`` is decoded with ``errors="surrogateescape"``
    so that a byte that is not UTF-8 affects its own row only.
    """
    lines = _RowLines(text)
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    header_problem: str | None = None
    while True:
        lines.new_row()
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            unclosed = " inside a quoted field never closed" if lines.skip_row() else ""
            reason = f"{error}{unclosed}{lines.covered()}"
            if header is None and header_problem is None:
                header_problem = f"the header ({lines.position()}) could not be read"
                reason = f"the header: {reason}"
            yield UnreadableRecord(path=path, position=lines.position(), reason=reason, text=lines.text())
            continue
        if not values or (len(values) == 1 and values[0].isspace() and not lines.quotes):
            continue  # a blank line, or one of spaces (a quoted " " is a value)
        if header is None:
            if header_problem is None:  # the first row that is not blank
                if lines.undecodable:
                    header_problem = f"the header ({lines.position()}) is not UTF-8"
                else:
                    header = _column_names(values)
                continue
            reason = header_problem
        elif lines.undecodable:
            reason = "not UTF-8 (the bytes that are not are shown as \\xNN)"
        elif len(values) > len(header):
            reason = f"{len(values)} values for {len(header)} columns"
        else:
            record = {name: (value or None) if name in text_columns else csv_value(value)
                      for name, value in zip(header, values, strict=False)}
            for name in header[len(values):]:
                record[name] = None
            yield record
            continue
        yield UnreadableRecord(path=path, position=lines.position(), reason=reason, text=lines.text())
    if lines.cut_short is not None:
        yield UnreadableRecord(path=path, position=f"after line {lines.line}", reason=lines.cut_short, text="")


class _CsvDoFn(beam.DoFn):
    """A CSV file with a header row: one dict per row, values typed by :func:`csv_value`.

    The header is the first line that is not blank; blank lines and lines of
    spaces are skipped everywhere. A repeated column name gets a suffix (see
    :func:`_column_names`). Quoted fields may span lines. A row with fewer
    values than columns gets nulls for the missing ones. Each of these is an
    :class:`UnreadableRecord`, and reading goes on with the next row: a row
    with more values than columns (which value belongs to which column is
    unknown), one with bytes that are not UTF-8, one the csv module refuses
    (text after a closing quote, a field over :data:`CSV_MAX_FIELD_CHARS`), and
    every row of a file whose header could not be read. A quote that is never
    closed makes the rest of the file one such record, whose reason says how
    many lines it covers. A compressed file that stops short ends with one
    saying so.

    The columns in ``text_columns`` are not typed: their values stay the
    strings written (empty is still null). For ``--datasource_field``: a name
    is text, and ``90210`` or ``true`` typed as a number or a boolean would
    name no data source where ``02134`` does.
    """

    def __init__(self, text_columns: Collection[str] = ()) -> None:
        self._text_columns = frozenset(text_columns)

    def setup(self) -> None:
        # The csv module's limit (128 KiB by default) is per process: raised, never lowered.
        if csv.field_size_limit() < CSV_MAX_FIELD_CHARS:
            csv.field_size_limit(CSV_MAX_FIELD_CHARS)

    def process(self, readable: fileio.ReadableFile) -> Iterator[Record]:
        with readable.open(mime_type="application/octet-stream") as file:
            text = io.TextIOWrapper(io.BufferedReader(_RawFile(file)), encoding="utf-8-sig",
                                    errors="surrogateescape", newline="")
            yield from _csv_records(readable.metadata.path, text, self._text_columns)


PARQUET_ROWS_PER_SLICE = 1024
"""Rows of a Parquet row group made Python objects at a time (see :class:`_TableRowsDoFn`)."""


class _TableRowsDoFn(beam.DoFn):
    """Each row of a ``pyarrow.Table`` (one Parquet row group) as a dict, as Beam's ``ReadFromParquet`` gives it.

    Beam's own step makes the whole table Python objects first (``to_pydict``):
    a row group of a million rows (pandas' and pyarrow's default size) of five
    columns (an int, a float, a string, a timestamp, a bool: 34 MiB in Arrow)
    held 192 MiB of Python objects at once, and wider rows hold more. Here
    :data:`PARQUET_ROWS_PER_SLICE` rows at a time are (0.5 MiB at most for the
    same table, measured with ``tracemalloc``): the same values (pyarrow's
    ``as_py`` of each), and the table itself stays columnar.
    """

    def process(self, table: Any) -> Iterator[dict[str, Any]]:
        for batch in table.to_batches(max_chunksize=PARQUET_ROWS_PER_SLICE):
            yield from batch.to_pylist()


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

    Each NDJSON file is read as its own name says, whatever the pattern: one with
    a compression suffix (:func:`compression_suffix`) whole, by one worker,
    ending with an :class:`UnreadableRecord` where its compressed data stops
    short; any other uncompressed, in 64 MiB ranges read in parallel. JSON and
    CSV files are read whole, decompressed by their suffixes.

    Args:
        file_pattern: A glob on any Beam filesystem.
        file_format: One of :data:`FORMATS`.
        text_columns: CSV columns read as the text written, not typed (see :class:`_CsvDoFn`).

    Raises:
        ValueError: An unknown format, or a compression suffix on a format not in
            :data:`COMPRESSIBLE_FORMATS`.
    """

    def __init__(self, file_pattern: str, *, file_format: str, text_columns: Collection[str] = ()) -> None:
        super().__init__()
        if file_format not in FORMATS:
            raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")
        check_compression(file_pattern, file_format)
        self._pattern = file_pattern
        self._format = file_format
        self._text_columns = tuple(text_columns)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        if self._format == "avro":
            return (
                pbegin
                | "ReadAvro" >> ReadFromAvro(self._pattern, validate=False)
                | "BinaryAsBase64" >> beam.Map(binary_safe_record)
            )
        if self._format == "parquet":
            return (
                pbegin
                # Beam's splittable reader, a table per row group; rows made a slice at a time.
                | "ReadParquet" >> ReadFromParquetBatched(self._pattern, validate=False)
                | "TableRows" >> beam.ParDo(_TableRowsDoFn())
                | "BinaryAsBase64" >> beam.Map(binary_safe_record)
            )
        files = pbegin | "MatchFiles" >> fileio.MatchFiles(self._pattern)
        if self._format == "ndjson":
            return (
                files
                | "SplitFiles" >> beam.ParDo(_NdjsonPartsDoFn(_RANGE_BYTES))
                # Spread the parts over workers before reading them.
                | "SpreadFiles" >> beam.Reshuffle()
                | "ParseNDJSON" >> beam.ParDo(_NdjsonDoFn())
            )
        parse = _JsonDocumentDoFn() if self._format == "json" else _CsvDoFn(self._text_columns)
        return (
            files
            # Spread the files over workers before reading them whole.
            | "SpreadFiles" >> beam.Reshuffle()
            | "OpenFiles" >> fileio.ReadMatches(compression=CompressionTypes.AUTO)
            | f"Parse{self._format.upper()}" >> beam.ParDo(parse)
        )
