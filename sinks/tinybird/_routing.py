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
import inspect
import re
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import orjson
from apache_beam import Row

from sinks.tinybird._encoding import _type_name, element_repr

DATASOURCE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
"""A name the Events API accepts in ``?name=``."""

# Names already checked, per DoFn instance; cleared past this size, so that a
# function that invents names (a bug: one per user id...) costs a check per
# element instead of memory. Each distinct name also opens its own batches.
_MAX_CHECKED_NAMES = 10_000


def datasource_name_problem(name: object) -> str | None:
    """What is wrong with ``name`` as a data source to append to (``"must ..."``), or None."""
    # type(), not isinstance(): an object's __class__ (a property, which may raise) is not asked.
    if not issubclass(type(name), str):
        return f"must be a str, got {_type_name(name)} {element_repr(name, 100)}"
    name = cast(str, name)
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
    ``str`` or is empty, is dead-lettered as ``unroutable``.

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
        if type(element) is dict:  # the common case first: no ABC check, no other test
            value = element[self.field]
            if type(value) is str and value:
                return self.prefix + value
        elif isinstance(element, Mapping):
            value = element[self.field]
        elif isinstance(element, (str, bytes, bytearray, memoryview)):
            obj = orjson.loads(element)
            if not isinstance(obj, dict):
                raise TypeError(f"the element's JSON is {_type_name(obj)}, not an object")
            value = obj[self.field]
        elif isinstance(element, Row) or (isinstance(element, tuple) and hasattr(element, "_asdict")) or (
                dataclasses.is_dataclass(element) and not isinstance(element, type)):
            value = getattr(element, self.field)
        else:
            raise TypeError(f"cannot read field {self.field!r} of {_type_name(element)}")
        if not isinstance(value, str):
            raise TypeError(f"field {self.field!r} holds {_type_name(value)} {element_repr(value, 100)}, not a str")
        if not str.__len__(value):
            # No name, with or without a prefix: not the prefix alone (a data source "events_" no row named).
            raise ValueError(f"field {self.field!r} is empty: it names no data source")
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

    __slots__ = ("_routes", "function", "static")

    def __init__(self, datasource: str | Callable[[Any], str]) -> None:
        self.static = datasource if isinstance(datasource, str) else None
        """The one name, when ``datasource`` is a name (no per-element call)."""
        self.function: Callable[[Any], Any] = _no_function if isinstance(datasource, str) else _cheapest_call(datasource)
        """The function (for a loop that calls it itself, then :meth:`check` or :func:`raised`)."""
        # Each name the function returned (a plain str) -> that name when valid, else its Unroutable.
        self._routes: dict[str, str | Unroutable] = {}

    def route(self, element: Any) -> str | Unroutable:
        try:
            name = self.function(element)
        except Exception as error:  # any element, any exception: it must not fail the bundle
            return raised(error)
        if type(name) is str:
            routed = self._routes.get(name)
            if routed is not None:
                return routed
        return self.check(name)

    def check(self, name: object) -> str | Unroutable:
        """What the function returned, as a plain ``str`` name, or why it is not one (cached)."""
        if type(name) is str:
            routed = self._routes.get(name)
            if routed is not None:
                return routed
        elif not issubclass(type(name), str):
            return Unroutable(f"the datasource function's result {datasource_name_problem(name)}", "")
        else:
            name = str.__str__(name)  # a str subclass: its text, as a plain str
        problem = datasource_name_problem(name)
        routed = name if problem is None else Unroutable(f"the datasource function's result {problem}", name)
        routes = self._routes
        if len(routes) >= _MAX_CHECKED_NAMES:
            routes.clear()
        routes[name] = routed
        return routed


def raised(error: Exception) -> Unroutable:
    """Why an element whose datasource function raised ``error`` has no data source."""
    return Unroutable(f"the datasource function raised {_describe(error)}", "")


def _no_function(element: Any) -> Any:
    raise TypeError("this router has one data source name, not a function")


def _cheapest_call(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``function``, or its bound ``__call__`` when its class defines ``__call__`` in Python.

    Calling such an object looks ``__call__`` up on every call; the bound method
    does not (``DatasourceFromField``: about 140 ns a call instead of 220).
    """
    call = inspect.getattr_static(type(function), "__call__", None)
    # Bound here from the class, as calling the object does (an instance attribute
    # named __call__ is not what ``function(element)`` calls).
    return types.MethodType(call, function) if isinstance(call, types.FunctionType) else function


def _describe(error: Exception) -> str:
    # _type_name: a type that hides its name (a metaclass property that raises) gives a reason too.
    try:
        text = str(error)
    except Exception:
        text = ""
    name = _type_name(error)
    return f"{name}: {text[:200]}" if text else name


def check_datasource(datasource: object) -> None:
    """Construction-time check of ``WriteToTinybird(datasource=)``: a valid name, or a callable."""
    if isinstance(datasource, str):
        problem = datasource_name_problem(datasource)
        if problem is not None:
            raise ValueError(f"datasource {problem}")
    elif not callable(datasource):
        raise TypeError(f"datasource must be a data source name (str) or a callable (element -> str), "
                        f"got {_type_name(datasource)}")
