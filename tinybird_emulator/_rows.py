"""Rows ready to bind: the parsed values of a body converted into the columns of a schema.

The schema's SQL (see ``_schema``) reads each row's JSON text with SQLite's JSON
functions, checks each value and converts it: that is the reference, and it costs
several microseconds per row. This module hands the writer the same rows as plain
values to bind, for each row whose outcome is known without SQLite: its text is
exactly what ``orjson.dumps`` writes for its parsed values, so SQLite would read the
same values (no duplicate key, no escape or number spelled another way; rows with
U+0000, at which ``->>`` cuts a string, excepted), and every value fits its column
in a form whose stored value is known. Every other row keeps its JSON text and goes
through the SQL, which also writes the quarantine rows. The tests store bodies
both ways and compare the tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import operator
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, repeat
from typing import Any

import orjson

from tinybird_emulator._body import json_array
from tinybird_emulator._schema import Column, Schema

__all__ = ["PreparedRows", "prepare_rows"]

# Rows converted (and stored) together: their objects stay in the CPU's caches meanwhile.
_CHUNK_ROWS = 1024
_DICT_ONLY = frozenset({dict})

# A value the SQL must judge: its row is left to SQLite.
_LEFT: Any = object()
_NONE = type(None)
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_is_not_none = functools.partial(operator.is_not, None)
# ``->>`` ends a string at U+0000; orjson writes that character as this escape.
_NUL_ESCAPE = "\\u0000"
# Years below 1000 and invalid dates are left to SQLite, whose date functions
# treat them differently from one version to the next.
_DATE = r"[1-9][0-9]{3}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_DATE_UP_TO_28 = r"[1-9][0-9]{3}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
# Fractions of 1-2 or 4+ digits are left to SQLite: its rounding of them is its own.
_DATETIME_RE = re.compile(rf"(?P<date>{_DATE})(?:[ T](?P<time>{_TIME})(?P<fraction>\.[0-9]{{3}})?)?")
_DATE_RE = re.compile(_DATE)
# Values that SQLite stores unchanged (``strftime``/``datetime``/``date`` give them back).
_STORED_AS_SENT = {
    "DateTime64": rf"{_DATE_UP_TO_28} {_TIME}\.[0-9]{{3}}",
    "DateTime": rf"{_DATE_UP_TO_28} {_TIME}",
    "Date": _DATE_UP_TO_28,
}
# SQLite compares a path's key with the key's text as written in the JSON; orjson
# escapes these characters, so such a key is never found by SQLite.
_ESCAPED_IN_KEYS_RE = re.compile(r'["\\\x00-\x1f]')
_PATH_STEP_RE = re.compile(r'\.(?:"([^"]*)"|([^."\[]+))')


@dataclasses.dataclass
class PreparedRows:
    """Consecutive valid rows of one request, as prepared for ``schema``.

    Attributes:
        schema: The schema the values were converted for.
        columns: Per column of the schema, the value to bind for each row (whatever
            is there for the rows of a JSON segment is not used).
        segments: Consecutive rows ``(start, end, array_text)``: ``array_text`` is None
            when the rows are bound from ``columns``, else the JSON array of their
            texts, for the schema's SQL to check, store or quarantine.
    """

    schema: Schema
    columns: list[list[Any]]
    segments: list[tuple[int, int, str | None]]


def _path_keys(sql_path: str) -> tuple[str, ...] | None:
    """The object keys of an SQLite path such as ``$.a."b c"``; None when some key
    would not be matched as orjson writes it."""
    if not sql_path.startswith("$"):
        return None
    keys: list[str] = []
    pos = 1
    while pos < len(sql_path):
        match = _PATH_STEP_RE.match(sql_path, pos)
        if match is None:
            return None
        key = match.group(1) if match.group(1) is not None else match.group(2)
        if _ESCAPED_IN_KEYS_RE.search(key):
            return None
        keys.append(key)
        pos = match.end()
    return tuple(keys) if keys else None


def _lookup(objects: Sequence[dict[str, Any]], keys: tuple[str, ...]) -> list[Any]:
    """The value at ``keys`` in each object, None where absent (as ``->>`` gives NULL)."""
    values = list(map(dict.get, objects, repeat(keys[0])))
    for key in keys[1:]:
        if set(map(type, values)) == {dict}:
            values = list(map(dict.get, values, repeat(key)))
        else:
            values = [v.get(key) if type(v) is dict else None for v in values]
    return values


# -- per type: which values fit, and what SQLite would store ------------------------------


def _fits_int64(v: Any) -> bool:
    return _INT64_MIN <= v <= _INT64_MAX


def _int64(v: Any) -> Any:
    kind = type(v)
    if kind is bool or (kind is int and _fits_int64(v)):
        return v
    return _LEFT


def _float64(v: Any) -> Any:
    kind = type(v)
    if kind is float or kind is bool or (kind is int and _fits_int64(v)):
        return v
    return _LEFT


def _bool(v: Any) -> Any:
    kind = type(v)
    if kind is bool or (kind is int and (v == 0 or v == 1)):
        return v
    return _LEFT


def _string(v: Any) -> Any:
    kind = type(v)
    if kind is str or kind is float or kind is bool or (kind is int and _fits_int64(v)):
        return v
    if kind is dict or kind is list:
        # ``->>`` gives an object or array as its JSON text, which for a row
        # written as orjson writes it is orjson's text.
        return orjson.dumps(v).decode()
    return _LEFT


_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _real_date(date: str) -> bool:
    day = int(date[8:10])
    if day <= 28:
        return True
    year, month = int(date[:4]), int(date[5:7])
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return day <= (29 if leap else 28)
    return day <= _DAYS_IN_MONTH[month - 1]


def _datetime_parts(v: Any) -> re.Match[str] | None:
    if type(v) is not str:
        return None
    match = _DATETIME_RE.fullmatch(v)
    if match is None or not _real_date(match["date"]):
        return None
    return match


def _datetime64(v: Any) -> Any:
    match = _datetime_parts(v)
    if match is None:
        return _LEFT
    # strftime('%Y-%m-%d %H:%M:%f'): a space, milliseconds always.
    return f"{match['date']} {match['time'] or '00:00:00'}{match['fraction'] or '.000'}"


def _datetime(v: Any) -> Any:
    match = _datetime_parts(v)
    if match is None:
        return _LEFT
    # datetime(): a space, whole seconds (a fraction is cut off).
    return f"{match['date']} {match['time'] or '00:00:00'}"


def _date(v: Any) -> Any:
    if type(v) is str and _DATE_RE.fullmatch(v) and _real_date(v):
        return v
    return _LEFT


def _array(element_kinds: frozenset[type]) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        # ``->`` gives the array's JSON text: orjson's text for such a row.
        if type(v) is list and set(map(type, v)) <= element_kinds:
            return orjson.dumps(v).decode()
        return _LEFT

    return convert


_LIST_ONLY = frozenset({list})


class _Kind:
    """How the values of one column type are bound.

    Args:
        as_sent: Python types whose values are bound unchanged (ints only within
            Int64).
        convert: Any one value to what is bound, or _LEFT.
        absent: What is bound for a missing or null value of a Nullable column.
        stored_as_sent: The form of the strings stored unchanged (a regex), if any.
        elements: For arrays, the Python types their elements may have.
    """

    def __init__(
        self,
        as_sent: frozenset[type],
        convert: Callable[[Any], Any],
        *,
        absent: Any = None,
        stored_as_sent: str | None = None,
        elements: frozenset[type] | None = None,
    ) -> None:
        self.as_sent = as_sent
        self.convert = convert
        self.absent = absent
        self.elements = elements
        self.one = None if stored_as_sent is None else re.compile(stored_as_sent)
        self.lines = None if stored_as_sent is None else re.compile(f"(?:{stored_as_sent}\n)*")


# The JSON types each array element may have (see _schema._ELEMENT_JSON_TYPES).
_INTS = frozenset({int})
_NUMBERS = frozenset({int, float})
_BOOLS = frozenset({bool})
_SCALARS = frozenset({str, int, float})
_KINDS: dict[str, _Kind] = {
    "Int64": _Kind(frozenset({int, bool}), _int64),
    "Float64": _Kind(frozenset({int, float, bool}), _float64),
    "Bool": _Kind(frozenset({bool}), _bool),
    "String": _Kind(frozenset({str, int, float, bool}), _string),
    "DateTime64": _Kind(frozenset({str}), _datetime64, stored_as_sent=_STORED_AS_SENT["DateTime64"]),
    "DateTime": _Kind(frozenset({str}), _datetime, stored_as_sent=_STORED_AS_SENT["DateTime"]),
    "Date": _Kind(frozenset({str}), _date, stored_as_sent=_STORED_AS_SENT["Date"]),
    "Array(Int64)": _Kind(frozenset(), _array(_INTS), absent="[]", elements=_INTS),
    "Array(Float64)": _Kind(frozenset(), _array(_NUMBERS), absent="[]", elements=_NUMBERS),
    "Array(Bool)": _Kind(frozenset(), _array(_BOOLS), absent="[]", elements=_BOOLS),
    "Array(String)": _Kind(frozenset(), _array(_SCALARS), absent="[]", elements=_SCALARS),
}


def _needing_conversion(kind: _Kind, values: list[Any], nullable: bool) -> Iterable[int]:
    """Indices of the values that cannot be bound as they are (whole-column checks first)."""
    everything = range(len(values))
    types = set(map(type, values))
    present: Iterable[Any] = values
    if _NONE in types:
        if not nullable or kind.absent is not None:
            return everything
        types.discard(_NONE)
        present = list(filter(_is_not_none, values))
    if not types:
        return ()
    if not types <= kind.as_sent:
        return everything
    if int in types and (
        not types <= {int, float, bool} or not (_fits_int64(min(present)) and _fits_int64(max(present)))
    ):
        return everything
    if kind.one is None or kind.lines is None:
        return ()
    # One match over all the strings, one per line (when none holds a line break).
    joined = "\n".join(present) + "\n"  # type: ignore[arg-type]
    if joined.count("\n") == len(present) and kind.lines.fullmatch(joined):  # type: ignore[arg-type]
        return ()
    fullmatch = kind.one.fullmatch
    return [i for i, v in enumerate(values) if v is not None and not fullmatch(v)]


def _bind_values(column: Column, values: list[Any], left: set[int]) -> list[Any]:
    """``values`` made ready to bind, in place; adds the rows left to SQLite to ``left``."""
    kind = _KINDS[column.base]
    if (
        kind.elements is not None
        and set(map(type, values)) <= _LIST_ONLY
        and set(map(type, chain.from_iterable(values))) <= kind.elements
    ):
        values[:] = map(bytes.decode, map(orjson.dumps, values))
        return values
    convert = kind.convert
    for i in _needing_conversion(kind, values, column.nullable):
        if i in left:
            continue
        value = values[i]
        if value is None:
            bound = kind.absent if column.nullable else _LEFT
        else:
            bound = convert(value)
        if bound is _LEFT:
            left.add(i)
        else:
            values[i] = bound
    return values


def _dumps_or_none(obj: dict[str, Any]) -> bytes | None:
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        return None


def _not_as_orjson_writes(lines: Sequence[str], objects: Sequence[dict[str, Any]], array_text: str) -> set[int]:
    """Rows whose text SQLite could read differently from orjson's values;
    ``array_text`` is the lines joined into a JSON array."""
    try:
        # One comparison for all the rows: each line is one whole JSON object, so
        # the two arrays are equal only when every line is.
        same = orjson.dumps(objects) == array_text.encode()
    except orjson.JSONEncodeError:
        same = False
    left: set[int] = set()
    if not same:
        written = map(_dumps_or_none, objects)
        left.update(i for i, (a, b) in enumerate(zip(written, map(str.encode, lines), strict=False)) if a != b)
    if "\\" in array_text and _NUL_ESCAPE in array_text:
        left.update(i for i, line in enumerate(lines) if _NUL_ESCAPE in line)
    return left


def _segments(lines: Sequence[str], left: set[int]) -> list[tuple[int, int, str | None]]:
    """Runs of consecutive rows, bound or left to SQLite, in order."""
    segments: list[tuple[int, int, str | None]] = []
    ordered = sorted(left)
    bound_from = 0
    i = 0
    while i < len(ordered):
        run_start = run_end = ordered[i]
        while i < len(ordered) and ordered[i] == run_end:
            run_end += 1
            i += 1
        if bound_from < run_start:
            segments.append((bound_from, run_start, None))
        segments.append((run_start, run_end, json_array(lines[run_start:run_end])))
        bound_from = run_end
    if bound_from < len(lines):
        segments.append((bound_from, len(lines), None))
    return segments


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector (for the whole process) meanwhile.

    Parsed rows hold no reference cycles, yet nested objects and arrays are
    containers the collector keeps scanning as they are made: about half the cost
    of parsing such rows.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def prepare_rows(schema: Schema, lines: Sequence[str]) -> Iterator[PreparedRows]:
    """Parses the valid rows of a body (their texts) and converts them for ``schema``,
    yielding them a thousand or so at a time, in order.

    Each run is parsed, checked and converted while its objects are still in the
    CPU's caches, and is best stored before the next one is asked for, while its
    values still are: the passes over them cost much less than over a whole body.
    Most of the work is done a column at a time by loops in C (type sets, min/max,
    pattern matches); a value is converted on its own only when its column holds
    other values than those bound as they are.
    """
    keys = [_path_keys(c.sql_path) for c in schema.columns]
    paths = keys if schema.columns and all(k is not None for k in keys) else None
    with _cyclic_gc_paused():
        for offset in range(0, len(lines), _CHUNK_ROWS):
            yield _prepare_chunk(schema, paths, lines[offset : offset + _CHUNK_ROWS])  # type: ignore[arg-type]


def _prepare_chunk(schema: Schema, paths: list[tuple[str, ...]] | None, lines: Sequence[str]) -> PreparedRows:
    """One run of :func:`prepare_rows`; ``paths`` (the keys of each column) is None
    when no row can be bound."""
    objects: Any = None
    if paths is not None:
        # The lines are validated JSON objects: as one array they parse into one
        # element each, in a single call.
        array_text = json_array(lines)
        try:
            objects = orjson.loads(array_text)
        except orjson.JSONDecodeError:  # a line only SQLite's parser reads
            pass
    if objects is None or len(objects) != len(lines) or not set(map(type, objects)) <= _DICT_ONLY:
        left: set[int] = set(range(len(lines)))
    else:
        left = _not_as_orjson_writes(lines, objects, array_text)
    columns: list[list[Any]] = []
    if paths is not None and len(left) < len(lines):
        columns = [_bind_values(column, _lookup(objects, keys), left) for column, keys in zip(schema.columns, paths, strict=False)]
    return PreparedRows(schema=schema, columns=columns, segments=_segments(lines, left))
