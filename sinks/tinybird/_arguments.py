"""The type of every argument of :class:`~sinks.tinybird.WriteToTinybird`, checked when it is built.

A wrong type (``retry_policy="fast"``, ``wait="yes"``, ``num_shards="8"``)
would otherwise pass the constructor and fail on the workers. Ranges and formats
are checked by the records the arguments go into (``ClientSettings``,
``BatchLimits``, ``TokenSource``, ``RetryPolicy``); each rule lives in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from sinks.tinybird.retry import RetryPolicy

_Check = Callable[[str, object], None]


def _describe(value: object) -> str:
    # The type, not the value: a misplaced token must not end up in an error message.
    return type(value).__name__


def _text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {_describe(value)}")


def _text_or_callable(name: str, value: object) -> None:
    if not isinstance(value, str) and not callable(value):
        raise TypeError(f"{name} must be a str or a callable (element -> str), got {_describe(value)}")


def _optional_text(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {_describe(value)}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)} {value!r}")


def _whole(name: str, value: object) -> None:
    # bool is an int subclass, and num_shards=True is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_describe(value)} {value!r}")


def _number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds (int or float), got {_describe(value)} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _retry_policy(name: str, value: object) -> None:
    if value is not None and not isinstance(value, (RetryPolicy, Mapping)):
        raise TypeError(
            f"{name} must be a sinks.tinybird.RetryPolicy, a mapping of its fields (Beam YAML) or None, "
            f"got {_describe(value)} {value!r}; e.g. RetryPolicy(max_attempts=3)")


def _clock(name: str, value: object) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be a callable returning epoch seconds, got {_describe(value)}")


def _token(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        # Never the value: this may be a token passed in the wrong place or form.
        raise TypeError(f"{name} must be a str or None, got {_describe(value)} (value not shown)")


CHECKS: Mapping[str, _Check] = {
    "datasource": _text_or_callable,
    "token": _token,
    "token_env": _text,
    "token_secret": _optional_text,
    "api_url": _text,
    "wait": _flag,
    "compression": _optional_text,
    "max_batch_bytes": _whole,
    "max_batch_rows": _whole,
    "max_buffering_secs": _number,
    "num_shards": _whole,
    "max_windows_per_bundle": _whole,
    "max_in_flight": _whole,
    "retry_policy": _retry_policy,
    "connect_timeout_secs": _number,
    "read_timeout_secs": _number,
    "dead_letter_path": _optional_text,
    "dead_letter_format": _text,
    "dead_letter_label": _optional_text,
    "raise_on_failure": _flag,
    "ca_bundle_path": _optional_text,
    "allow_insecure_http": _flag,
    "clock": _clock,
}
"""Argument name -> its type check; every argument of ``WriteToTinybird`` has one (a test says so)."""


def check_argument_types(arguments: Mapping[str, object]) -> None:
    """Raises TypeError (ValueError for a non-finite number) naming the first bad argument.

    Raises:
        KeyError: An argument without a check (a programming error in the sink).
    """
    for name, value in arguments.items():
        CHECKS[name](name, value)


def check_dead_letter_path(path: str | None) -> None:
    """An empty path is a mistake, not a way to say "no files" (that is None)."""
    if path is not None and not path.strip():
        raise ValueError("dead_letter_path is empty: give a directory, or None for no dead-letter files")
