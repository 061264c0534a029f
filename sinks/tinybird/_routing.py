"""Which data source each element goes to: one name, or a function of the element.

``WriteToTinybird(datasource=...)`` takes a name, or a callable evaluated once
per element on the workers (as ``WriteToBigQuery(table=...)`` does).
:class:`Router` turns either into a name per element, or a refusal saying why
the element has none: the function raised, returned something other than a
``str``, or a name the Events API would refuse. A refused element is
dead-lettered as ``unroutable``; nothing else fails.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import orjson
from apache_beam import Row

from sinks.tinybird._encoding import element_repr

DATASOURCE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
"""A name the Events API accepts in ``?name=``."""

# Names already checked, per DoFn instance; cleared past this size, so that a
# function that invents names (a bug: one per user id...) costs a check per
# element instead of memory. Each distinct name also opens its own batches.
_MAX_CHECKED_NAMES = 10_000


def datasource_name_problem(name: object) -> str | None:
    """What is wrong with ``name`` as a data source to append to (``"must ..."``), or None."""
    if not isinstance(name, str):
        return f"must be a str, got {type(name).__name__} {element_repr(name, 100)}"
    if not DATASOURCE_NAME.fullmatch(name):
        return f"must match [A-Za-z_][A-Za-z0-9_]{{0,99}}, got {element_repr(name, 120)}"
    if name.endswith("_quarantine"):
        return (f"must not name a quarantine data source (the server fills it, nothing can be appended to it), "
                f"got {name!r}")
    return None


@dataclasses.dataclass(frozen=True)
class DatasourceFromField:
    """The data source named by a field of each element: ``prefix + element[field]``.

    For ``WriteToTinybird(datasource=DatasourceFromField("type", prefix="events_"))``.
    Reads mappings by key, ``beam.Row``, NamedTuples and dataclasses by
    attribute, and ``str``/``bytes`` elements holding one JSON object by
    parsing them. An element without the field, or whose field is not a
    ``str``, is dead-lettered as ``unroutable``.

    Attributes:
        field: The field holding the name (or the part after ``prefix``).
        prefix: Put before the field's value. Default ``""``.
    """

    field: str
    prefix: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.field, str) or not self.field:
            raise ValueError(f"field must be a non-empty str, got {self.field!r}")
        if not isinstance(self.prefix, str):
            raise ValueError(f"prefix must be a str, got {self.prefix!r}")

    def __call__(self, element: Any) -> str:
        if type(element) is dict or isinstance(element, Mapping):  # the common case first: no ABC check
            value = element[self.field]
        elif isinstance(element, (str, bytes, bytearray, memoryview)):
            obj = orjson.loads(element)
            if not isinstance(obj, dict):
                raise TypeError(f"the element's JSON is {type(obj).__name__}, not an object")
            value = obj[self.field]
        elif isinstance(element, Row) or (isinstance(element, tuple) and hasattr(element, "_asdict")) or (
                dataclasses.is_dataclass(element) and not isinstance(element, type)):
            value = getattr(element, self.field)
        else:
            raise TypeError(f"cannot read field {self.field!r} of {type(element).__name__}")
        if not isinstance(value, str):
            raise TypeError(f"field {self.field!r} holds {type(value).__name__} {element_repr(value, 100)}, not a str")
        return self.prefix + value


class Unroutable(NamedTuple):
    """Why an element has no data source: the fields of its dead letter."""

    message: str
    name: str
    """What the function returned, when it is a ``str`` (else ``""``)."""


class Router:
    """Gives each element its data source name, or an :class:`Unroutable`.

    Made on the worker (``DoFn.setup``): it caches the names it has checked.
    """

    __slots__ = ("_checked", "_function", "static")

    def __init__(self, datasource: str | Callable[[Any], str]) -> None:
        self.static = datasource if isinstance(datasource, str) else None
        """The one name, when ``datasource`` is a name (no per-element call)."""
        self._function = None if isinstance(datasource, str) else datasource
        self._checked: dict[str, str | None] = {}

    def route(self, element: Any) -> str | Unroutable:
        try:
            name = self._function(element)  # type: ignore[misc]
        except Exception as error:  # any element, any exception: it must not fail the bundle
            return Unroutable(f"the datasource function raised {_describe(error)}", "")
        if type(name) is not str:
            if not isinstance(name, str):
                return Unroutable(f"the datasource function's result {datasource_name_problem(name)}", "")
            name = str.__str__(name)  # a str subclass: its text, as a plain str
        checked = self._checked
        try:
            problem = checked[name]
        except KeyError:
            if len(checked) >= _MAX_CHECKED_NAMES:
                checked.clear()
            problem = checked[name] = datasource_name_problem(name)
        if problem is not None:
            return Unroutable(f"the datasource function's result {problem}", name)
        return name


def _describe(error: Exception) -> str:
    try:
        text = str(error)
    except Exception:
        text = ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def check_datasource(datasource: object) -> None:
    """Construction-time check of ``WriteToTinybird(datasource=)``: a valid name, or a callable."""
    if isinstance(datasource, str):
        problem = datasource_name_problem(datasource)
        if problem is not None:
            raise ValueError(f"datasource {problem}")
    elif not callable(datasource):
        raise TypeError(f"datasource must be a data source name (str) or a callable (element -> str), "
                        f"got {type(datasource).__name__}")
