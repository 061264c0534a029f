"""What every test folder shares: the admin token of the session's local server, a few
hostile elements, a reader of dead-letter files, and how tests bound real time on a busy
machine.

Each folder has one helper module of its own, named after it
(``sink_testlib``, ``emulator_testlib``, ``pipelines_testlib``,
``reliability_testlib``); the fixtures they all use are in ``tests/conftest.py``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fastavro
import orjson

from sinks.tinybird import DeadLetter
from tinybird_emulator._config import ServerConfig

# Distinctive, so that a test can search logs, files, reprs and metrics for it.
TOKEN = "p.SECRET-test-token-7f3a9c51d2"

T = TypeVar("T")


# -- real time on a busy machine ------------------------------------------------------------
#
# The suite runs on 2-core machines that also run other suites and CPU-bound neighbours
# (load 4 to 8): a thread may run a long while after its timer fired. So a test that bounds
# real time from above allows the configured deadline (a timeout, a latency, a time budget)
# plus BUSY_MACHINE_SLACK_SECS, once; it never counts on work being done within a bare number
# of seconds: it counts attempts or requests, uses an injected clock (``FakeTime``), or polls
# with wait_for. Lower bounds (waited at least Retry-After) take no slack: waiting longer is
# never a failure.

# How late a thread may run on a busy machine, on top of a configured deadline. Each upper
# bound that adds it still tells "ends by its deadline" from "waits for the server" or "ignores
# the budget": the tests keep those far apart (a server latency longer than timeout + slack).
BUSY_MACHINE_SLACK_SECS = 2.0

# Runs of a step that must fall within one real window (one rate-limit window of the local
# server) before the test calls the machine too busy. One try fails only when the machine
# stalls for a whole window; this many in a row do not happen on a machine that runs at all.
ONE_WINDOW_TRIES = 10

# The local server's fixed rate-limit window (every LocalServer of the tests runs with the default).
RATE_LIMIT_WINDOW_SECS: float = next(
    f.default for f in dataclasses.fields(ServerConfig) if f.name == "rate_limit_window_secs")


def wait_for(condition: Callable[[], Any], *, timeout_secs: float, what: str, poll_secs: float = 0.25) -> float:
    """Waits until ``condition()`` is true; returns the seconds it took.

    Fails with ``what`` after ``timeout_secs``: derive it from the deadline or latency the
    test configured, plus :data:`BUSY_MACHINE_SLACK_SECS`, never from how long it "usually" takes.
    """
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_secs:
            raise AssertionError(f"timed out after {timeout_secs:.1f} s waiting for {what}")
        time.sleep(poll_secs)
    return time.monotonic() - started


def within_one_window(step: Callable[[], T], *, window_secs: float, tries: int = ONE_WINDOW_TRIES) -> T:
    """``step()``'s result from a run that took less than ``window_secs`` of real time.

    For a test whose setting needs a few requests inside one window of a server's real clock
    (a rate limit). The window starts with the first request and the last one reaches the server
    before ``step`` returns (both clocks are the system's monotonic clock), so a run shorter
    than the window is certainly inside one. A longer run proves nothing either way, so it is
    run again: ``step`` must start afresh each time (a new data source name). Fails after
    ``tries`` runs that were all too slow.
    """
    took = []
    for _ in range(tries):
        started = time.monotonic()
        result = step()
        took.append(time.monotonic() - started)
        if took[-1] < window_secs:
            return result
    raise AssertionError(f"the machine never ran the step within one {window_secs:g} s window in {tries} tries "
                         f"(took {', '.join(f'{t:.2f}' for t in took)} s)")


# -- hostile elements: what real pipelines can hand a sink ---------------------------------


class Unprintable(Exception):
    """An exception whose message cannot even be read."""

    def __str__(self):
        raise ValueError("not even a message")


class ReprRaises:
    def __repr__(self):
        raise RuntimeError("no repr")


class HugeRepr:
    def __repr__(self):
        return "H" * 5_000_000


class RaisingMapping(Mapping):
    """A mapping of ``data`` whose method ``where`` (``getitem``, ``iter``, ``len``, ``keys`` or
    ``items``) raises ``error(*args)``: a hostile element, picklable for ``beam.Create``."""

    def __init__(self, data: dict[str, Any], where: str, error: Callable[..., BaseException], *args: Any) -> None:
        self._data, self._where, self._error, self._args = data, where, error, args

    def _maybe_raise(self, where: str) -> None:
        if where == self._where:
            raise self._error(*self._args)

    def __getitem__(self, key):
        self._maybe_raise("getitem")
        return self._data[key]

    def __iter__(self):
        self._maybe_raise("iter")
        return iter(self._data)

    def __len__(self):
        self._maybe_raise("len")
        return len(self._data)

    def keys(self):
        self._maybe_raise("keys")
        return super().keys()

    def items(self):
        self._maybe_raise("items")
        return super().items()


def dead_letters_in(path) -> list[DeadLetter]:
    """Every record of the dead-letter files (JSON lines or Avro) under ``path``, read
    without the sink's own reader."""
    records: list[DeadLetter] = []
    for name in sorted(glob.glob(os.path.join(str(path), "*"))):
        with open(name, "rb") as fh:
            if name.endswith(".avro"):
                records.extend(DeadLetter(**r) for r in fastavro.reader(fh))
            else:
                records.extend(DeadLetter(**orjson.loads(line)) for line in fh if line.strip())
    return records
