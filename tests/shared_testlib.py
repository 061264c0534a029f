"""What every test folder shares: the admin token of the session's local server, and a
few hostile elements, and a reader of dead-letter files.

Each folder has one helper module of its own, named after it
(``sink_testlib``, ``emulator_testlib``, ``pipelines_testlib``,
``reliability_testlib``); the fixtures they all use are in ``tests/conftest.py``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping
from typing import Any

import fastavro
import orjson

from sinks.tinybird import DeadLetter

# Distinctive, so that a test can search logs, files, reprs and metrics for it.
TOKEN = "p.SECRET-test-token-7f3a9c51d2"


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
