"""The benchmark's input: ~200-byte events, generated once per run into an NDJSON file.

Every scenario reads the same file through :func:`read_events`, which yields one
dict per line as it reads (the input never sits in memory), so the source costs
the same in every scenario and the figures differ only by what follows it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import string
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

__all__ = ["DataFile", "event", "read_events", "write_events"]

DEFAULT_SEED = 20240501
_CHUNK_EVENTS = 10_000
_ACTIONS = ("view", "click", "add_to_cart", "purchase", "scroll", "search")
_COUNTRIES = ("ES", "US", "FR", "DE", "JP", "BR", "IN", "GB")
_DEVICES = ("ios", "android", "linux", "windows", "macos")


def event(rng: random.Random, i: int) -> dict[str, Any]:
    """Event number ``i``: a timestamp, strings and numbers; about 200 bytes as JSON."""
    return {
        "timestamp": (
            f"2024-05-{1 + i // 86_400 % 28:02d} {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
            f".{rng.randrange(1000):03d}"
        ),
        "event_id": f"{rng.getrandbits(48):012x}{i:010d}",
        "user_id": rng.randrange(10_000_000),
        "session": "".join(rng.choices(string.ascii_lowercase + string.digits, k=12)),
        "action": rng.choice(_ACTIONS),
        "product": f"SKU-{rng.randrange(100_000):05d}",
        "price": round(rng.random() * 500, 2),
        "country": rng.choice(_COUNTRIES),
        "device": rng.choice(_DEVICES),
    }


@dataclasses.dataclass(frozen=True)
class DataFile:
    """A generated NDJSON file: where, how many events, and their NDJSON bytes.

    Attributes:
        prefix_bytes: Exact NDJSON bytes of the first N events, for the N
            asked for when the file was written.
        prefix_checksums: The sum of each line's CRC32 (without its newline)
            over the first N events, for the same N: what the counting
            endpoint must have received once a run of N events is done.
    """

    path: str
    events: int
    ndjson_bytes: int
    seed: int
    prefix_bytes: Mapping[int, int] = dataclasses.field(default_factory=dict)
    prefix_checksums: Mapping[int, int] = dataclasses.field(default_factory=dict)

    def ndjson_bytes_of(self, events: int) -> int:
        """NDJSON bytes of the first ``events`` events (exact for the marks, else from the mean line)."""
        if events >= self.events:
            return self.ndjson_bytes
        if events in self.prefix_bytes:
            return self.prefix_bytes[events]
        return round(self.ndjson_bytes * events / self.events)

    def checksum_of(self, events: int) -> int:
        """The sum of the CRC32 of each of the first ``events`` lines (read from the file if not recorded)."""
        if events in self.prefix_checksums:
            return self.prefix_checksums[events]
        checksum = 0
        with open(self.path, "rb", buffering=1 << 20) as fh:
            for n, line in enumerate(fh, 1):
                checksum += zlib.crc32(line.rstrip(b"\n"))
                if n >= events:
                    break
        return checksum


def write_events(path: str, events: int, *, seed: int = DEFAULT_SEED, marks: Iterable[int] = ()) -> DataFile:
    """Writes ``events`` events to ``path`` as NDJSON, in chunks (never all in memory).

    ``marks``: event counts whose exact prefix size in bytes and checksum are recorded.
    """
    rng = random.Random(seed)
    wanted = {m for m in marks if 0 < m <= events}
    prefix_bytes: dict[int, int] = {}
    prefix_checksums: dict[int, int] = {}
    total = checksum = 0
    with open(path, "wb") as fh:
        for start in range(0, events, _CHUNK_EVENTS):
            lines = [orjson.dumps(event(rng, i)) for i in range(start, min(start + _CHUNK_EVENTS, events))]
            for mark in wanted:
                if start < mark <= start + len(lines):
                    prefix_bytes[mark] = total + sum(len(line) + 1 for line in lines[:mark - start])
                    prefix_checksums[mark] = checksum + sum(map(zlib.crc32, lines[:mark - start]))
            checksum += sum(map(zlib.crc32, lines))
            lines.append(b"")
            chunk = b"\n".join(lines)
            total += len(chunk)
            fh.write(chunk)
    prefix_checksums[events] = checksum
    return DataFile(path=os.path.abspath(path), events=events, ndjson_bytes=total, seed=seed,
                    prefix_bytes=prefix_bytes, prefix_checksums=prefix_checksums)


def read_events(path: str, events: int) -> Iterator[dict[str, Any]]:
    """Yields the first ``events`` events of ``path`` as dicts, reading as it goes."""
    if events <= 0:
        return
    loads = orjson.loads
    with open(path, "rb", buffering=1 << 20) as fh:
        for n, line in enumerate(fh, 1):
            yield loads(line)
            if n >= events:
                return
