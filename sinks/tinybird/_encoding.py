"""Element -> one NDJSON line: the only place where elements become bytes.

Each element is encoded once, with orjson, to one compact JSON object without the
trailing newline. Values orjson does not know (pandas, numpy, bytes, durations...)
are converted by one rule per type; what cannot be encoded, and any exception
raised while an element is read, becomes :class:`EncodingError` with a bounded
reason that the sink puts in the dead letter. pandas and numpy are recognised by
their types' names and never imported here: they are not dependencies.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import math
import re
import reprlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import orjson
from apache_beam.pvalue import Row
from apache_beam.utils.timestamp import Timestamp

__all__ = ["MAX_NESTING_DEPTH", "MAX_REASON_CHARS", "EncodingError", "element_repr", "encode_element"]

MAX_NESTING_DEPTH = 254
"""Deepest nesting of objects and arrays that can be encoded (orjson's own limit).

Every container kind is a level (a dict, list, tuple, set, NamedTuple, Row,
dataclass), on either path; but orjson (3.13) counts no level for a tuple held
by a tuple, so tuples nested only in tuples may be written past this depth.
"""

MAX_REASON_CHARS = 1000
"""Longest :attr:`EncodingError.reason`; longer reasons are cut (a dead letter stays small)."""

# Naive datetimes are written as UTC; UTC is written with a "Z" suffix, as in
# Tinybird's examples ("2022-10-27T11:43:02.099Z"). OPT_SERIALIZE_NUMPY is left
# out on purpose: orjson writes a datetime64 NaT inside an array as
# "1677-09-21T00:12:43.145224Z" and cuts nanoseconds; numpy goes through _default.
_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z

# orjson accepts integers in [-2**63, 2**64 - 1]; wider ones are written as exact
# JSON numbers by the slow path.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

_RAW_NEWLINE = "an orjson.Fragment holds a raw newline: the line would be two NDJSON rows"

# Longest exception message and dict key quoted in a reason.
_EXCEPTION_TEXT_CHARS = 200
_PATH_KEY_CHARS = 64

# A JSON string, or a run of whitespace outside strings. Only used on text already
# validated by orjson.loads, where raw whitespace can only sit between tokens.
_STRING_OR_WHITESPACE = re.compile(rb'("(?:[^"\\]|\\.)*")|[ \t\n\r]+', re.DOTALL)

_EPOCH = datetime.datetime(1970, 1, 1)
_EPOCH_DATE = datetime.date(1970, 1, 1)
_NANOS_PER_SECOND = 10**9
_ATTOS_PER_NANO = 10**9
_ATTOS_PER_SECOND = 10**18
# numpy datetime64/timedelta64 units with a fixed length, in attoseconds (the finest unit).
_UNIT_ATTOS = {
    "W": 7 * 86_400 * _ATTOS_PER_SECOND, "D": 86_400 * _ATTOS_PER_SECOND,
    "h": 3_600 * _ATTOS_PER_SECOND, "m": 60 * _ATTOS_PER_SECOND, "s": _ATTOS_PER_SECOND,
    "ms": 10**15, "us": 10**12, "ns": 10**9, "ps": 10**6, "fs": 10**3, "as": 1,
}
_DATE_UNITS = frozenset({"Y", "M", "W", "D"})


class EncodingError(ValueError):
    """An element could not be encoded as one JSON object.

    Attributes:
        reason: A human-readable explanation naming the offending type or problem
            and where it is, for example ``"Type is not JSON serializable: object
            (at $.user)"``, or ``"KeyError raised while encoding (at $.user): 'id'"``
            when reading the element raised. At most :data:`MAX_REASON_CHARS`
            characters.
    """

    def __init__(self, reason: str) -> None:
        if len(reason) > MAX_REASON_CHARS:
            suffix = f"...[{len(reason)} chars]"
            reason = reason[: MAX_REASON_CHARS - len(suffix)] + suffix
        super().__init__(reason)
        self.reason = reason


class _Refused(TypeError):
    """A value of a type (or in a range) that JSON cannot hold; its path is added by the caller.

    A TypeError, as orjson expects from ``default``.
    """


def encode_element(element: Any) -> bytes:
    """Encodes one element as one NDJSON line, without the trailing newline.

    Never raises anything but :class:`EncodingError`: whatever an element raises
    while it is read (a mapping whose ``__getitem__`` fails, a ``__class__``
    property that raises, a comparison that raises inside a set...) is reported
    as an ``EncodingError`` naming the exception's type, where it happened, and
    its message (cut to 200 characters), so one element never fails its bundle.

    Accepted elements:

    * ``dict`` (and other mappings with ``str`` keys), ``beam.Row``, NamedTuples and
      dataclass instances; these may nest each other, lists, tuples and sets, and
      their values follow the rules below. Two keys of a mapping that are
      distinct objects with the same text (``str`` subclasses with their own
      ``__eq__``) are refused rather than one of them dropped.
    * A dataclass instance is written by orjson's rule, whichever path encodes
      it: the attributes in its ``__dict__`` (its fields, and also attributes set
      in ``__post_init__`` or later, and ``functools.cached_property`` values
      once computed), or, when its class defines ``__slots__``
      (``slots=True``) or it has no ``__dict__``, its fields (not ``ClassVar``
      nor ``InitVar``). Names starting with ``_`` are left out. A class without
      ``__slots__`` that inherits from a ``slots=True`` dataclass is written
      from its ``__dict__``, without the inherited slot fields.
    * ``str``/``bytes`` holding exactly one JSON object. Its bytes are sent as they
      are (only surrounding whitespace is stripped); a pretty-printed object
      (with raw ``\\n`` or ``\\r``) is compacted by removing the whitespace between
      tokens, which keeps every number and key exactly as written.

    Values:

    * ``datetime``: RFC 3339. A naive datetime is taken to be UTC; UTC is written
      with a ``Z`` suffix (``"2024-01-02T03:04:05.123456Z"``); other offsets are
      kept (``"...+02:00"``). ``date`` -> ``"2024-01-02"``; ``time`` ->
      ``"03:04:05"`` (with its offset when it has one). A Beam ``Timestamp`` is
      written as a UTC datetime.
    * pandas ``Timestamp``: RFC 3339 in UTC with ``Z``; naive is taken as UTC, an
      aware one is converted to UTC. The fraction has 6 digits, or 9 when the
      nanoseconds are not whole microseconds (``"2024-01-02T03:04:05.123456789Z"``).
    * numpy ``datetime64``: units of a day or longer (``Y``, ``M``, ``W``, ``D``)
      -> the date they start on (``"2024-01-02"``); finer units -> as a pandas
      ``Timestamp`` (picoseconds and finer are cut to nanoseconds). Outside the
      years 1-9999 it cannot be written, and is refused.
    * Durations (``datetime.timedelta``, pandas ``Timedelta``, numpy
      ``timedelta64``) -> seconds as a JSON float (``timedelta(minutes=1,
      microseconds=500)`` -> ``60.0005``, ``timedelta(hours=1)`` -> ``3600.0``).
      Tinybird has no duration type: a number of seconds lands in a ``Float64``
      column that can be summed and compared, and is always written with a
      fraction so that a column inferred from a whole duration is not ``Int64``.
      A float holds nanoseconds exactly up to about 104 days and microseconds
      up to about 285 years. numpy's ``Y`` and ``M`` are converted as numpy
      converts them (365.2425 days a year, a twelfth of that a month).
    * ``NaT`` (pandas and numpy), ``pd.NA``, NaN and +/-Infinity (float, numpy or
      Decimal) -> ``null``. JSON has no such numbers; ``null`` keeps the line valid
      and the rest of the row delivered, and lands in a Nullable column or the
      column's default, the same as a missing value. Dead-lettering the whole
      row for one missing value would lose more than it protects.
    * ``Decimal``: an exact JSON number (``Decimal("1.10")`` -> ``1.10``), also
      for a subclass, whatever its own ``__str__`` says.
    * ``bytes``, ``bytearray``, ``memoryview`` and numpy ``bytes_`` inside a record
      -> standard base64 text with padding (RFC 4648, ``b"\\x00\\xff"`` ->
      ``"AP8="``), the spelling the file readers give Avro and Parquet binary
      values. ClickHouse reads it back with ``base64Decode``.
    * ``UUID`` -> its canonical string; ``Enum`` -> its value (by these rules).
    * numpy scalars -> numbers and booleans; numpy arrays -> arrays (nested for
      several dimensions), their items by these rules; a structured numpy record
      -> an object of its fields. A float16 or float32 is written as the exact
      value it holds (``float32(0.1)`` -> ``0.10000000149011612``); a longdouble
      as the nearest 64-bit float, and refused when that float is infinite or
      0 and it is not. Complex numbers (``clongdouble`` too) are refused.
    * ``set``/``frozenset`` -> an array, sorted when its items can be compared (so
      the output does not depend on hash order), else in iteration order.
    * Integers wider than 64 bits -> exact JSON numbers; integers with more
      digits than Python converts to text (4,300 by default) are refused.
    * ``orjson.Fragment``: its bytes as they are (as orjson writes them), not
      parsed per element: the caller vouches for one JSON value in UTF-8. A row
      whose fragment is not JSON, or not UTF-8, is the server's to judge: it
      puts a row it cannot parse in ``<datasource>_quarantine`` and stores the
      rest of the request. In a dead letter, bytes that are not UTF-8 are
      shown as ``\\x`` escapes. A fragment holding a raw newline is refused:
      the line would be two rows.

    Args:
        element: The element to encode.

    Returns:
        The bytes of one JSON object, with no newline in them: UTF-8, unless
        an ``orjson.Fragment`` in the element holds bytes that are not.

    Raises:
        EncodingError: The element is not a JSON object (a list, a number, JSON
            text holding an array...), holds a value that cannot be serialized,
            a non-``str`` dict key, two keys with the same text, a string that
            is not valid UTF-8, a fragment holding a raw newline, nests deeper
            than :data:`MAX_NESTING_DEPTH` levels (every container kind counts
            as one level, on every path), or raised an exception while it was
            read.
    """
    try:
        kind = type(element)
        if kind is dict:
            obj: Any = element
        elif kind is str or kind is bytes or isinstance(element, (str, bytes, bytearray, memoryview)):
            return _encode_json_text(element)
        elif isinstance(element, Row):
            obj = element.as_dict()
        elif isinstance(element, tuple) and hasattr(element, "_asdict"):
            obj = element._asdict()
        elif isinstance(element, Mapping):
            obj = element if isinstance(element, dict) else dict(element)
        elif dataclasses.is_dataclass(element) and not isinstance(element, type):
            obj = element
        else:
            raise EncodingError(
                f"element is {_json_kind_of(element)}, not a JSON object "
                "(expected a dict, beam.Row, NamedTuple, dataclass, or str/bytes holding one JSON object)"
            )
        try:
            line = orjson.dumps(obj, default=_default, option=_OPTIONS)
        except orjson.JSONEncodeError:
            # Rare: find out exactly what and where, and encode what orjson alone refuses
            # but JSON can hold (wide integers, str subclass keys, time with tzinfo).
            line = _encode_slowly(obj)
        # orjson never writes a raw newline, but an orjson.Fragment is written as it
        # is: one element would be two rows (and its batch's row count wrong). 10 is
        # b"\n" as an int, which bytes look for with memchr at once; b"\n" itself first
        # fails a conversion to int (an exception raised and cleared): 25 ns against 215.
        if 10 in line:
            raise EncodingError(_RAW_NEWLINE)
        return line
    except EncodingError:
        raise
    except Exception as error:  # any element, any exception: it must not fail the bundle
        raise EncodingError(_raised(error, "$")) from None


def _raised(error: BaseException, path: str) -> str:
    """The reason for an exception raised while an element was read: its type, where, its message."""
    try:
        text = str(error)
    except Exception:
        text = "<its message could not be read>"
    if len(text) > _EXCEPTION_TEXT_CHARS:
        text = text[:_EXCEPTION_TEXT_CHARS] + f"...[{len(text)} chars]"
    return f"{_type_name(error)} raised while encoding (at {path}): {text}"


def element_repr(element: Any, limit: int = 500) -> str:
    """A ``repr`` of ``element`` for a dead letter, at most ``limit`` characters.

    Never raises: an element whose ``__repr__`` fails is shown by its type name.
    Large strings, bytes and containers are cut before ``repr`` runs on them, so
    a huge element costs little.
    """
    limit = max(int(limit), 16) if isinstance(limit, int) else 500
    try:
        text = _REPR.repr(element)
    except Exception:
        try:
            text = f"<unrepresentable {type(element).__module__}.{type(element).__qualname__}>"
        except Exception:
            text = "<unrepresentable element>"
    if len(text) > limit:
        suffix = f"...[{len(text)} chars]"
        text = text[: max(limit - len(suffix), 0)] + suffix
    return text


class _BoundedRepr(reprlib.Repr):
    """reprlib.Repr that also bounds bytes and falls back to builtin repr sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 4
        self.maxdict = 20
        self.maxlist = 20
        self.maxtuple = 20
        self.maxset = 20
        self.maxfrozenset = 20
        self.maxstring = 400
        self.maxother = 400
        self.maxlong = 100

    def repr_bytes(self, obj: bytes, level: int) -> str:
        if len(obj) <= self.maxstring:
            return repr(obj)
        return repr(obj[: self.maxstring]) + f"...[{len(obj)} bytes]"

    def repr_bytearray(self, obj: bytearray, level: int) -> str:
        return "bytearray(" + self.repr_bytes(bytes(obj[: self.maxstring + 1]), level) + ")"

    def repr_str(self, obj: str, level: int) -> str:
        if len(obj) <= self.maxstring:
            return repr(obj)
        return repr(obj[: self.maxstring]) + f"...[{len(obj)} chars]"


_REPR = _BoundedRepr()


_Converter = Callable[[Any], Any]

# type -> its converter, found once per type (a dict look-up per value after that).
_CONVERTERS: dict[type, _Converter] = {}
# Bound on the cache, for pipelines that make classes on the fly.
_MAX_CACHED_TYPES = 1024


def _default(obj: Any) -> Any:
    """orjson's hook for the types it does not know: a JSON-ready replacement, or _Refused."""
    kind = type(obj)
    if kind is decimal.Decimal:  # by far the most common: no look-up
        return orjson.Fragment(str(obj)) if obj.is_finite() else None
    convert = _CONVERTERS.get(kind)
    if convert is None:
        convert = _converter_for(kind)
        if len(_CONVERTERS) < _MAX_CACHED_TYPES:
            _CONVERTERS[kind] = convert
    return convert(obj)


def _converter_for(kind: type) -> _Converter:
    """The rule for values of ``kind`` (see :func:`encode_element`)."""
    foreign = _pandas_converter(kind) or _numpy_converter(kind)
    if foreign is not None:
        return foreign
    for base, convert in _PLAIN_CONVERTERS:
        if issubclass(kind, base):
            return convert
    if issubclass(kind, tuple) and hasattr(kind, "_asdict"):
        return _named_tuple
    if dataclasses.is_dataclass(kind):
        return _dataclass_fields
    return _refuse


def _pandas_converter(kind: type) -> _Converter | None:
    for base in kind.__mro__:
        if str(base.__module__).startswith("pandas."):
            name = base.__qualname__
            if name == "Timestamp":
                return _pandas_timestamp
            if name == "Timedelta":
                return _pandas_timedelta
            if name in ("NaTType", "NAType"):
                return _null
    return None


def _numpy_converter(kind: type) -> _Converter | None:
    for base in kind.__mro__:
        if base.__module__ == "numpy":
            convert = _NUMPY_CONVERTERS.get(base.__qualname__)
            if convert is not None:
                return convert
    return None


def _null(obj: Any) -> None:
    return None


def _refuse(obj: Any) -> Any:
    raise _Refused(f"Type is not JSON serializable: {_type_name(obj)}")


def _decimal(obj: decimal.Decimal) -> Any:
    # Decimal's own methods: a subclass's __str__ ("9.99 EUR") would be written as it is.
    return orjson.Fragment(decimal.Decimal.__str__(obj)) if decimal.Decimal.is_finite(obj) else None


def _base64(obj: bytes | bytearray | memoryview) -> str:
    data = obj.tobytes() if isinstance(obj, memoryview) else bytes(obj)
    return base64.b64encode(data).decode("ascii")


def _seconds(obj: datetime.timedelta) -> float:
    # float(): pandas' Timedelta.total_seconds() is a float already; a subclass may not be.
    return float(obj.total_seconds())


def _row(obj: Row) -> dict:
    return obj.as_dict()


def _named_tuple(obj: Any) -> dict:
    return obj._asdict()


def _dataclass_fields(obj: Any) -> dict:
    """The columns orjson writes for a dataclass instance, so that the slow path writes the same ones.

    orjson reads the instance's ``__dict__`` (every attribute, not only fields)
    unless the class itself defines ``__slots__`` or the instance has no
    ``__dict__``, and then its fields; either way it skips names starting with ``_``.
    """
    attributes = getattr(obj, "__dict__", None)
    if not isinstance(attributes, dict) or "__slots__" in type(obj).__dict__:
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    # A key that is not a str is kept, for the slow path to refuse with its reason.
    return {key: value for key, value in attributes.items() if not (isinstance(key, str) and key.startswith("_"))}


def _enum_value(obj: enum.Enum) -> Any:
    return obj.value


def _mapping(obj: Mapping) -> dict:
    return dict(obj)


def _beam_timestamp(obj: Timestamp) -> datetime.datetime:
    return obj.to_utc_datetime()


def _plain_datetime(obj: datetime.datetime) -> datetime.datetime:
    # A datetime subclass (pendulum, arrow...): orjson only knows datetime itself.
    return datetime.datetime(obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second,
                             obj.microsecond, obj.tzinfo, fold=obj.fold)


def _plain_date(obj: datetime.date) -> datetime.date:
    return datetime.date(obj.year, obj.month, obj.day)


def _set_to_list(items: set | frozenset) -> list:
    try:
        return sorted(items)
    except Exception:
        # Not comparable (1 and "a"), or a comparison that raises (Decimal("NaN")
        # signals InvalidOperation): iteration order, as the set holds them.
        return list(items)


# Checked in this order: a datetime is also a date, and must be found first.
_PLAIN_CONVERTERS: tuple[tuple[type | tuple[type, ...], _Converter], ...] = (
    (decimal.Decimal, _decimal),
    (Row, _row),
    ((set, frozenset), _set_to_list),
    ((bytes, bytearray, memoryview), _base64),
    (Timestamp, _beam_timestamp),
    (datetime.timedelta, _seconds),
    (datetime.datetime, _plain_datetime),
    (datetime.date, _plain_date),
    (enum.Enum, _enum_value),
    (Mapping, _mapping),
)


def _utc_text(moment: datetime.datetime, nanos: int) -> str:
    """RFC 3339 text of a naive UTC ``moment`` (whole seconds) plus ``nanos`` (0-999,999,999).

    The fraction is written as orjson writes a datetime's (none, or 6 digits),
    with 9 digits when the nanoseconds are not whole microseconds.
    """
    text = moment.isoformat()
    if nanos == 0:
        return text + "Z"
    if nanos % 1000 == 0:
        return f"{text}.{nanos // 1000:06d}Z"
    return f"{text}.{nanos:09d}Z"


def _pandas_timestamp(obj: Any) -> str | None:
    try:
        # Nanoseconds since the epoch, in UTC for an aware Timestamp: no conversion needed.
        seconds, nanos = divmod(obj.value, _NANOS_PER_SECOND)
    except OverflowError:
        # A second, millisecond or microsecond Timestamp outside 1677-2262: in its own unit.
        return _datetime64(obj.asm8)
    return _utc_text(_EPOCH + datetime.timedelta(seconds=seconds), nanos)


def _pandas_timedelta(obj: Any) -> float | None:
    # Its numpy value, in its own unit: total_seconds() rounds to microseconds.
    return _timedelta64(obj.asm8)


def _numpy_unit(obj: Any) -> tuple[str, int] | None:
    """(unit, ticks) of a datetime64/timedelta64 scalar, or None for NaT."""
    # Only ever reached with a numpy value in hand: numpy is imported already.
    import numpy

    if numpy.isnat(obj):
        return None
    unit, count = numpy.datetime_data(obj.dtype)
    if unit == "generic":
        raise _Refused(f"{_type_name(obj)} without a unit cannot be written")
    return unit, int(obj.astype("int64")) * count


def _datetime64(obj: Any) -> str | None:
    found = _numpy_unit(obj)
    if found is None:
        return None
    unit, ticks = found
    if unit in _DATE_UNITS:
        days = int(obj.astype("datetime64[D]").astype("int64"))
        try:
            return (_EPOCH_DATE + datetime.timedelta(days=days)).isoformat()
        except OverflowError:
            raise _Refused(f"{_type_name(obj)} outside the years 1-9999 cannot be written") from None
    # Floor: picoseconds and finer are cut to nanoseconds, also before the epoch.
    seconds, nanos = divmod(ticks * _UNIT_ATTOS[unit] // _ATTOS_PER_NANO, _NANOS_PER_SECOND)
    try:
        moment = _EPOCH + datetime.timedelta(seconds=seconds)
    except OverflowError:
        raise _Refused(f"{_type_name(obj)} outside the years 1-9999 cannot be written") from None
    return _utc_text(moment, nanos)


def _timedelta64(obj: Any) -> float | None:
    found = _numpy_unit(obj)
    if found is None:
        return None
    unit, ticks = found
    if unit not in _UNIT_ATTOS:
        # Years and months have no fixed length: numpy's own conversion (365.2425 days a year).
        obj = obj.astype("timedelta64[s]", casting="unsafe")
        unit, ticks = "s", int(obj.astype("int64"))
    # int / int is correctly rounded: the float nearest to the exact number of seconds.
    return ticks * _UNIT_ATTOS[unit] / _ATTOS_PER_SECOND


def _numpy_scalar(obj: Any) -> Any:
    if obj.dtype.kind == "c":
        # Complex, clongdouble included (its .item() is itself, and float() of it kept
        # the real part alone).
        return _refuse(obj)
    value = obj.item()
    if type(value) is type(obj):
        # longdouble: .item() keeps it; a float is what JSON can hold, when it holds this one.
        import numpy

        number = float(value)
        if numpy.isfinite(obj) and (math.isinf(number) or (number == 0 and obj != 0)):
            raise _Refused(f"{_type_name(obj)} {obj} is outside the range of a 64-bit float")
        return number
    return value


def _numpy_array(obj: Any) -> Any:
    if obj.ndim == 0:
        return obj[()]
    if obj.dtype.kind in "biuf":
        # Booleans, integers and floats: Python values in one C loop (NaN later becomes null).
        return obj.tolist()
    # Dates, durations, strings, bytes, objects, records: each item by its own rule.
    return list(obj)


def _numpy_record(obj: Any) -> Any:
    names = obj.dtype.names
    if names is None:
        return _base64(obj.tobytes())
    return {name: obj[name] for name in names}


_NUMPY_CONVERTERS: dict[str, _Converter] = {
    "datetime64": _datetime64,
    "timedelta64": _timedelta64,
    "ndarray": _numpy_array,
    "void": _numpy_record,
    "bytes_": _base64,
    "generic": _numpy_scalar,
}


def _encode_slowly(obj: Any) -> bytes:
    normalized = _normalize(obj)
    try:
        return orjson.dumps(normalized, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as e:
        raise EncodingError(_reason_from_orjson(str(e))) from None


def _reason_from_orjson(message: str) -> str:
    if "Recursion limit" in message:
        return f"nesting deeper than {MAX_NESTING_DEPTH} levels"
    return message


class _Open(NamedTuple):
    """A container being rebuilt: its new value, its items still to take, their depth, its path."""

    out: Any
    items: Iterator[tuple[Any, Any]]
    depth: int
    path: str


def _normalize(obj: Any) -> Any:
    """Rebuilds ``obj`` from types orjson serializes, or raises a precise EncodingError.

    A loop over a stack of open containers, not recursion: recursing took
    about six Python frames per NamedTuple, Row or dataclass level, so
    :data:`MAX_NESTING_DEPTH` levels did not fit in Python's recursion limit.
    It walks as recursion would (depth first, each container's items in order,
    taken one at a time): the first problem found is the same, and the stack
    grows with the depth only.
    """
    root: list[Any] = [None]
    stack = [_Open(root, iter(((0, obj),)), 0, "")]
    where = "$"
    try:
        while stack:
            out, items, depth, path = stack[-1]
            where = path
            for key, value in items:
                if out is root:
                    where = "$"
                elif type(out) is dict:
                    key, where = _mapping_key(out, key, path)
                else:
                    where = f"{path}[{key}]"
                normalized = _normalize_value(value, depth, where)
                if type(normalized) is _Open:
                    out[key] = normalized.out
                    stack.append(normalized)
                    break  # its items first; this container's next item after them
                out[key] = normalized
                where = path
            else:
                stack.pop()
    except EncodingError:
        raise
    except _Refused as refused:
        raise EncodingError(f"{refused} (at {where})") from None
    except Exception as error:  # the element's own code raised: report it, do not fail the bundle
        raise EncodingError(_raised(error, where)) from None
    return root[0]


def _normalize_value(obj: Any, depth: int, path: str) -> Any:
    """``obj`` as orjson serializes it, or an :class:`_Open` container whose items are still to normalize.

    ``depth`` is the number of containers holding ``obj``.
    """
    kind = type(obj)
    if obj is None or kind is bool or kind is float:
        return obj
    if kind is int:
        return _normalize_int(obj, path)
    if kind is str:
        return _normalize_str(obj, path)
    if kind is datetime.datetime or kind is datetime.date:
        return obj
    if kind is datetime.time:
        return obj.isoformat() if obj.tzinfo is not None else obj
    if isinstance(obj, Mapping):
        # Read as the fast path reads them: a dict's own items (orjson calls no method
        # of a dict subclass), another mapping through dict() (keys() and __getitem__).
        items = dict.items(obj) if isinstance(obj, dict) else dict(obj).items()
        return _Open({}, iter(items), _deeper(depth, path), path)
    if kind is list or kind is tuple:
        return _open_items(obj, depth, path)
    return _normalize_other(obj, depth, path)


def _normalize_other(obj: Any, depth: int, path: str) -> Any:
    """Subclasses of the plain types, containers by their rule, and the types of _default."""
    kind = type(obj)
    if isinstance(obj, enum.Enum):
        pass  # by its value, below (a StrEnum or an IntEnum is also a str or an int)
    elif isinstance(obj, str):  # np.str_ and other str subclasses
        return _normalize_str(str.__str__(obj), path)
    elif isinstance(obj, float):  # np.float64 and other float subclasses
        return float(obj)
    elif isinstance(obj, int):
        return _normalize_int(int(obj), path)
    elif isinstance(obj, list) or (isinstance(obj, tuple) and not hasattr(kind, "_asdict")):
        return _open_items(list(obj), depth, path)
    elif isinstance(obj, set | frozenset):
        return _open_items(_set_to_list(obj), depth, path)
    if _orjson_knows(obj):
        return obj  # UUID, an Enum of a plain value, and the like
    converted = _default(obj)
    if converted is None or isinstance(converted, orjson.Fragment | str | float):
        return converted
    if type(converted) is kind:
        raise _Refused(f"Type is not JSON serializable: {_type_name(obj)}")
    # The converted value takes the place of obj: same depth, same path. One call
    # deeper per conversion, never per level: a converted container is only opened here.
    return _normalize_value(converted, depth, path)


def _open_items(items: list | tuple, depth: int, path: str) -> _Open:
    return _Open([None] * len(items), enumerate(items), _deeper(depth, path), path)


def _deeper(depth: int, path: str) -> int:
    """The depth of a container's items; refuses one container too many."""
    if depth >= MAX_NESTING_DEPTH:
        raise EncodingError(f"nesting deeper than {MAX_NESTING_DEPTH} levels (at {path})")
    return depth + 1


def _mapping_key(out: dict, key: Any, path: str) -> tuple[str, str]:
    """A mapping's key as a plain ``str``, and its value's path; refuses a key JSON cannot hold."""
    if not isinstance(key, str):
        raise EncodingError(f"dict key {_short_repr(key)} is {_type_name(key)}, not str (at {path})")
    if type(key) is not str:
        key = str.__str__(key)  # a plain str, also for str subclasses and str enums
    if key in out:
        # Two keys that are distinct objects with one text (str subclasses with
        # their own __eq__): one value would silently replace the other.
        raise EncodingError(f"two dict keys have the text {_short_repr(key)} (at {path})")
    return key, f"{path}.{_path_key(key)}"


def _normalize_int(obj: int, path: str) -> Any:
    if _INT_MIN <= obj <= _INT_MAX:
        return obj
    try:
        return orjson.Fragment(str(obj))
    except ValueError:
        raise EncodingError(
            f"int with more digits than Python converts to text ({sys.get_int_max_str_digits()}) (at {path})") from None


def _normalize_str(obj: str, path: str) -> str:
    try:
        obj.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodingError(f"str is not valid UTF-8 (lone surrogate) (at {path})") from None
    return obj


def _orjson_knows(obj: Any) -> bool:
    """Whether orjson serializes ``obj`` without help (UUID, ...)."""
    try:
        orjson.dumps(obj, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return False
    return True


def _path_key(key: str) -> str:
    if len(key) <= _PATH_KEY_CHARS:
        return key
    return key[:_PATH_KEY_CHARS] + f"...[{len(key)} chars]"


def _encode_json_text(text: str | bytes | bytearray | memoryview) -> bytes:
    """Validates text holding one JSON object; returns it as one line of bytes."""
    if isinstance(text, str):
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise EncodingError("str is not valid UTF-8 (lone surrogate)") from None
    else:
        data = bytes(text)
    data = data.strip(b" \t\n\r")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        message = str(e)
        if message.startswith("str is not valid UTF-8"):
            raise EncodingError("bytes are not valid UTF-8") from None
        raise EncodingError(f"invalid JSON: {message}") from None
    if not isinstance(value, dict):
        raise EncodingError(f"JSON value is {_json_kind_of(value)}, not an object")
    if b"\n" in data or b"\r" in data:
        # Pretty printed: drop the whitespace between tokens instead of a
        # loads/dumps round trip, which would turn integers wider than 64 bits
        # into floats.
        data = _STRING_OR_WHITESPACE.sub(lambda m: m.group(1) or b"", data)
    return data


def _json_kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float, decimal.Decimal)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    name = _type_name(value)
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _type_name(value: Any) -> str:
    kind = type(value)
    try:
        if kind.__module__ == "builtins":
            return str(kind.__qualname__)
        return f"{kind.__module__}.{kind.__qualname__}"
    except Exception:  # a metaclass that hides the names: still a reason, not a failed bundle
        return "<a type without a name>"


def _short_repr(value: Any) -> str:
    return element_repr(value, limit=60)
