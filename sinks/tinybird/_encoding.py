"""Element -> one NDJSON line: the only place where elements become bytes.

Each element is encoded once, with orjson, to one compact JSON object without the
trailing newline; what cannot be encoded raises :class:`EncodingError` with a reason
that the sink puts in the dead letter.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import re
import reprlib
from collections.abc import Mapping
from typing import Any

import orjson
from apache_beam.pvalue import Row
from apache_beam.utils.timestamp import Timestamp

__all__ = ["MAX_NESTING_DEPTH", "EncodingError", "element_repr", "encode_element"]

MAX_NESTING_DEPTH = 254
"""Deepest nesting of objects and arrays that can be encoded (orjson's own limit)."""

# Naive datetimes are written as UTC; UTC is written with a "Z" suffix, as in
# Tinybird's examples ("2022-10-27T11:43:02.099Z").
_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_SERIALIZE_NUMPY

# orjson accepts integers in [-2**63, 2**64 - 1]; wider ones are written as exact
# JSON numbers by the slow path.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

# A JSON string, or a run of whitespace outside strings. Only used on text already
# validated by orjson.loads, where raw whitespace can only sit between tokens.
_STRING_OR_WHITESPACE = re.compile(rb'("(?:[^"\\]|\\.)*")|[ \t\n\r]+', re.DOTALL)


class EncodingError(ValueError):
    """An element could not be encoded as one JSON object.

    Attributes:
        reason: A human-readable explanation naming the offending type or problem,
            for example ``"Type is not JSON serializable: object (at $.user)"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_element(element: Any) -> bytes:
    """Encodes one element as one NDJSON line, without the trailing newline.

    Accepted elements:

    * ``dict`` (and other mappings with ``str`` keys), ``beam.Row``, NamedTuples and
      dataclass instances; these may nest each other, lists, tuples and sets.
      Dataclass fields whose name starts with ``_`` are left out.
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
    * ``Decimal``: an exact JSON number (``Decimal("1.10")`` -> ``1.10``).
    * ``UUID`` -> its canonical string; ``Enum`` -> its value; numpy scalars and
      arrays -> numbers and arrays.
    * ``set``/``frozenset`` -> an array, sorted when its items can be compared (so
      the output does not depend on hash order), else in iteration order.
    * Integers wider than 64 bits -> exact JSON numbers.
    * NaN and +/-Infinity (float or Decimal) -> ``null``. JSON has no such numbers;
      ``null`` keeps the line valid and the rest of the row delivered, and lands
      in a Nullable column or the column's default, the same as a missing value.
      Dead-lettering the whole row for one non-finite number would lose more than
      it protects.

    Args:
        element: The element to encode.

    Returns:
        The UTF-8 bytes of one JSON object, with no newline in them.

    Raises:
        EncodingError: The element is not a JSON object (a list, a number, JSON
            text holding an array...), holds a value that cannot be serialized,
            a non-``str`` dict key, a string that is not valid UTF-8, or nests
            deeper than :data:`MAX_NESTING_DEPTH` levels.
    """
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
        return orjson.dumps(obj, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        # Rare: find out exactly what and where, and encode what orjson alone refuses
        # but JSON can hold (wide integers, str subclass keys, time with tzinfo).
        return _encode_slowly(obj)


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


def _default(obj: Any) -> Any:
    """orjson's hook for the types it does not know."""
    if isinstance(obj, decimal.Decimal):
        return orjson.Fragment(str(obj)) if obj.is_finite() else None
    if isinstance(obj, Row):
        return obj.as_dict()
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return obj._asdict()
    if isinstance(obj, (set, frozenset)):
        return _set_to_list(obj)
    if isinstance(obj, Timestamp):
        return obj.to_utc_datetime()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError


def _set_to_list(items: set | frozenset) -> list:
    try:
        return sorted(items)
    except TypeError:
        return list(items)


def _encode_slowly(obj: Any) -> bytes:
    normalized = _normalize(obj, 0, "$")
    try:
        return orjson.dumps(normalized, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as e:
        raise EncodingError(_reason_from_orjson(str(e))) from None


def _reason_from_orjson(message: str) -> str:
    if "Recursion limit" in message:
        return f"nesting deeper than {MAX_NESTING_DEPTH} levels"
    return message


def _normalize(obj: Any, depth: int, path: str) -> Any:
    """Rebuilds ``obj`` from types orjson serializes, or raises a precise EncodingError."""
    if obj is None or isinstance(obj, (bool, float)):
        return obj
    if isinstance(obj, int):
        if _INT_MIN <= obj <= _INT_MAX:
            return obj
        return orjson.Fragment(str(int(obj)))
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise EncodingError(f"str is not valid UTF-8 (lone surrogate) (at {path})") from None
        return obj
    if isinstance(obj, (datetime.datetime, datetime.date)):
        return obj
    if isinstance(obj, datetime.time):
        return obj.isoformat() if obj.tzinfo is not None else obj
    if type(obj).__module__ == "numpy":
        return obj
    depth += 1
    if depth > MAX_NESTING_DEPTH:
        raise EncodingError(f"nesting deeper than {MAX_NESTING_DEPTH} levels (at {path})")
    if isinstance(obj, Row):
        obj = obj.as_dict()
    elif isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        obj = obj._asdict()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {
            f.name: getattr(obj, f.name)
            for f in dataclasses.fields(obj)
            if not f.name.startswith("_")
        }
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise EncodingError(
                    f"dict key {_short_repr(key)} is {_type_name(key)}, not str (at {path})"
                )
            key = "" + key  # a plain str, also for str subclasses and str enums
            out[key] = _normalize(value, depth, f"{path}.{key}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalize(v, depth, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [_normalize(v, depth, f"{path}[{i}]") for i, v in enumerate(_set_to_list(obj))]
    try:
        # UUID, Enum and the like are serialized by orjson itself.
        orjson.dumps(obj, option=_OPTIONS)
        return obj
    except orjson.JSONEncodeError:
        pass
    try:
        converted = _default(obj)
    except TypeError:
        raise EncodingError(f"Type is not JSON serializable: {_type_name(obj)} (at {path})") from None
    if isinstance(converted, orjson.Fragment) or converted is None:
        return converted
    return _normalize(converted, depth - 1, path)


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
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _short_repr(value: Any) -> str:
    return element_repr(value, limit=60)
