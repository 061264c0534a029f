"""Request bodies: bounded decompression (gzip, zstd) and NDJSON/JSON validation.

Decompression streams with a cap on the output, so a small compressed bomb is
refused (413) without being inflated in memory. The valid lines are kept as they
are; the writer stores them with the schema's SQL (see ``_storage``).

Validation has a fast path that does no per-line Python work: the lines are
joined and SQLite's JSON parser (which releases the GIL) checks that the array
holds exactly one object per line. That proves each line is one object only when
no line holds ``}`` ``,`` ``{`` at its top level, so a body where that sequence
appears anywhere (say, arrays of objects) takes the slow path: orjson line by
line, which also tells which lines are invalid. So does a body holding what SQLite
takes and orjson refuses (a lone surrogate escape, a number beyond a double), so
that such a row is quarantined whatever its neighbours.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import orjson
import zstandard

__all__ = ["BodyError", "ParsedBody", "decompress", "json_array", "parse_body"]

_READ_CHUNK_BYTES = 1 << 20
_DICT_ONLY = frozenset({dict})
# Two objects side by side on one line: the joined array could then hold as many
# elements as there are lines without each line being one object.
_OBJECTS_SIDE_BY_SIDE_RE = re.compile(r"\}[ \t\r]*,[ \t\r]*\{")
# What SQLite's JSON parser accepts and orjson refuses: a surrogate escape (a lone
# one is stored as bytes that are not UTF-8, and then no SELECT of the table can
# read it back) and a number too large for a double (stored as infinity): an
# exponent of three digits, or 200 digits in a row. A false alarm (a valid pair of
# surrogates, such digits inside a string) only costs the fast path.
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}", re.IGNORECASE)
# Digits to 0, E to e, - to +: three substring searches then find the numbers, several
# times faster than regular expressions over the whole body.
_NUMBER_SHAPES = bytes.maketrans(b"123456789E-", b"000000000e+")
_HUGE_NUMBER_SHAPES = (b"e000", b"e+000", b"0" * 200)
_local = threading.local()
# A backslash right before a newline can appear nowhere in valid JSON (raw
# newlines are not allowed inside strings); the documented curl example for
# format=json sends such shell line continuations, so they are removed.
_CONTINUATION_RE = re.compile(r"\\\r?\n")


class BodyError(Exception):
    """The body cannot be used at all; ``status`` is 400 or 413."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    out: list[bytes] = []
    total = 0
    pending = data
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while True:
            try:
                chunk = d.decompress(pending, max_bytes - total + 1)
            except zlib.error as exc:
                raise BodyError(400, f"invalid gzip body: {exc}") from None
            total += len(chunk)
            if total > max_bytes:
                raise BodyError(413, f"decoded body is larger than the limit of {max_bytes} bytes")
            out.append(chunk)
            pending = d.unconsumed_tail
            if d.eof or not pending:
                break
        if not d.eof:
            raise BodyError(400, "invalid gzip body: truncated")
        pending = d.unused_data
        # Concatenated gzip members form one valid gzip stream; trailing zero padding is tolerated.
        if not pending.strip(b"\x00"):
            return b"".join(out)


def _unzstd(data: bytes, max_bytes: int) -> bytes:
    out: list[bytes] = []
    total = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        while True:
            chunk = reader.read(min(_READ_CHUNK_BYTES, max_bytes - total + 1))
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise BodyError(413, f"decoded body is larger than the limit of {max_bytes} bytes")
            out.append(chunk)
        # The reader ends quietly on a truncated frame; walking the frames with a
        # decompressobj (whose output is now known to be bounded) tells.
        pending = data
        while pending:
            d = zstandard.ZstdDecompressor().decompressobj()
            d.decompress(pending)
            if not d.eof:
                raise BodyError(400, "invalid zstd body: truncated")
            pending = d.unused_data
    except zstandard.ZstdError as exc:
        raise BodyError(400, f"invalid zstd body: {exc}") from None
    return b"".join(out)


def decompress(data: bytes, encoding: str, *, max_bytes: int) -> bytes:
    """Decodes a body sent with ``Content-Encoding: encoding`` (already lower-cased).

    Raises:
        BodyError: 400 for an unknown encoding or a corrupt body, 413 when the
            decoded body exceeds ``max_bytes``.
    """
    if encoding in ("", "identity"):
        return data
    if encoding in ("gzip", "x-gzip"):
        return _gunzip(data, max_bytes)
    if encoding == "zstd":
        return _unzstd(data, max_bytes)
    raise BodyError(400, f"unsupported Content-Encoding {encoding!r}; use gzip or zstd")


@dataclasses.dataclass
class ParsedBody:
    """A validated body.

    Attributes:
        lines: The text of each valid row.
        invalid: ``(raw line, error)`` for each line that is not a JSON object.
        objects: The parsed valid rows, only when asked for (schema inference).
    """

    lines: list[str]
    invalid: list[tuple[str, str]]
    objects: list[dict[str, Any]] | None

    @property
    def array_chars(self) -> int:
        """``len(json_array(self.lines))``, without joining them."""
        return sum(map(len, self.lines)) + len(self.lines) + 1 if self.lines else 2


def json_array(lines: Sequence[str]) -> str:
    """Row texts joined into the text of one JSON array."""
    return "[" + ",".join(lines) + "]"


def _sqlite_only(data: bytes) -> bool:
    """True when ``data`` may hold JSON that SQLite takes and orjson refuses."""
    if _SURROGATE_ESCAPE_RE.search(data):
        return True
    shapes = data.translate(_NUMBER_SHAPES)
    return any(shape in shapes for shape in _HUGE_NUMBER_SHAPES)


def _one_object_per_line(array_text: str, lines: int) -> bool:
    """True when SQLite reads ``array_text`` as an array of exactly ``lines`` objects."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = sqlite3.connect(":memory:")
    try:
        # json_valid: from SQLite 3.42 json_each also reads JSON5 ({a: 1}, NaN, 0x10), which is not JSON.
        valid, count, objects = conn.execute(
            "SELECT json_valid(?1), count(*), count(*) FILTER (WHERE type = 'object') FROM json_each(?1)",
            (array_text,),
        ).fetchone()
    except sqlite3.Error:
        return False
    return bool(valid) and count == lines and objects == lines


def _whole_document(text: str) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Rows (texts, objects) of a body that is one JSON document (object or array of
    objects), else None."""
    candidate = _CONTINUATION_RE.sub("\n", text).strip()
    if not candidate or candidate[0] not in "{[":
        return None
    try:
        doc = orjson.loads(candidate)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is dict:
        return [orjson.dumps(doc).decode()], [doc]
    if type(doc) is list and doc and all(type(item) is dict for item in doc):
        return [orjson.dumps(item).decode() for item in doc], doc
    return None


def _slow_lines(raw_lines: list[bytes | str]) -> tuple[list[str], list[tuple[str, str]], list[dict[str, Any]]]:
    valid: list[str] = []
    objects: list[dict[str, Any]] = []
    invalid: list[tuple[str, str]] = []
    for raw in raw_lines:
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                invalid.append((raw.decode("utf-8", "replace"), f"invalid UTF-8: {exc.reason}"))
                continue
        else:
            line = raw
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            invalid.append((line, f"invalid JSON: {exc}"))
            continue
        if type(obj) is not dict:
            invalid.append((line, f"a row must be a JSON object, got {type(obj).__name__}"))
            continue
        valid.append(line)
        objects.append(obj)
    return valid, invalid, objects


def parse_body(data: bytes, *, fmt: str, keep_objects: bool) -> ParsedBody:
    """Splits and validates a decoded body.

    Args:
        data: The decoded body.
        fmt: ``"ndjson"``, ``"json"`` or ``""`` (not given: NDJSON, or one JSON
            document spread over several lines when the lines do not parse).
        keep_objects: Return the parsed rows (for inferring a new schema).

    Raises:
        BodyError: 400 when the body is empty or nothing in it is valid UTF-8 JSON.
    """
    if not data or data.isspace():
        raise BodyError(400, "empty body: send NDJSON rows or one JSON object")
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None

    if text is not None and fmt == "json":
        document = _whole_document(text)
        if document is not None:
            return ParsedBody(document[0], [], document[1] if keep_objects else None)

    objects: list[dict[str, Any]] | None
    if text is not None:
        lines = [line for line in text.split("\n") if line]
        if (
            not keep_objects
            and lines
            and not _OBJECTS_SIDE_BY_SIDE_RE.search(text)
            and not _sqlite_only(data)
            and _one_object_per_line(json_array(lines), len(lines))
        ):
            return ParsedBody(lines, [], None)
        try:
            objects = list(map(orjson.loads, lines))
        except orjson.JSONDecodeError:
            objects = None
        if objects is not None and set(map(type, objects)) <= _DICT_ONLY:
            return ParsedBody(lines, [], objects if keep_objects else None)
        valid, invalid, objects = _slow_lines(lines)  # type: ignore[arg-type]
        if invalid and fmt != "ndjson":
            document = _whole_document(text)
            if document is not None:
                (valid, objects), invalid = document, []
    else:
        valid, invalid, objects = _slow_lines(data.split(b"\n"))  # type: ignore[arg-type]
        if not valid:
            raise BodyError(400, "the body is not valid UTF-8 JSON")
    if not valid and not invalid:
        raise BodyError(400, "empty body: send NDJSON rows or one JSON object")
    return ParsedBody(valid, invalid, objects if keep_objects else None)
