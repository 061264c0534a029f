"""Helpers of the reliability tests: pipelines that run in this process, events with
unique ids, and the accounting of where every id ended up.

A unique module name (no ``__init__.py`` in the test folders): no clash with the
helpers of the other test folders.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import apache_beam as beam
import orjson
import requests
import zstandard
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from sinks.tinybird import DeadLetter, RetryPolicy, WriteToTinybird
from tinybird_emulator import LocalServer

# Every event line is exactly this many bytes (newline excluded), whatever its id:
# a full batch then holds a known number of rows.
LINE_BYTES = 64


def quick_retries(**overrides) -> RetryPolicy:
    """Short waits, so that a test with thousands of retries stays quick."""
    settings = dict(
        max_attempts=8, initial_backoff_secs=0.01, max_backoff_secs=0.05, max_total_secs=60,
        max_retry_after_secs=0.05)
    settings.update(overrides)
    return RetryPolicy(**settings)


def events(n: int, *, start: int = 0) -> list[dict]:
    """``n`` events with unique ids from ``start``, each encoded to exactly LINE_BYTES bytes."""
    out = []
    for i in range(start, start + n):
        # {"id":I,"kind":"view","pad":"xx..."}: 30 bytes of fixed text, the digits, the pad.
        pad = LINE_BYTES - 30 - len(str(i))
        out.append({"id": i, "kind": "view", "pad": "x" * pad})
    return out


def rows_per_full_batch(max_batch_bytes: int) -> int:
    """Rows of a full batch of :func:`events` lines (each line plus its newline)."""
    return max_batch_bytes // (LINE_BYTES + 1)


def make_pipeline(*, runner: str = "fn_api", args: Sequence[str] = ()) -> beam.Pipeline:
    """A pipeline on a runner that runs in this process and never looks for Prism.

    ``DirectRunner`` in Beam 2.77 first tries to download the Prism runner from
    GitHub; these tests send nothing anywhere but 127.0.0.1, so they name the
    runner the DirectRunner falls back to for batch (``FnApiRunner``), or the
    ``BundleBasedDirectRunner`` (the one that retries failed bundles).
    """
    options = PipelineOptions(list(args))
    if runner == "fn_api":
        return beam.Pipeline(runner=FnApiRunner(), options=options)
    if runner == "bundle_based":
        return beam.Pipeline(runner=BundleBasedDirectRunner(), options=options)
    raise ValueError(f"unknown runner {runner!r}")


def run(build: Callable[[beam.Pipeline], None], *, runner: str = "fn_api", args: Sequence[str] = ()):
    """Builds and runs a pipeline to the end; returns (tinybird counters, the result)."""
    p = make_pipeline(runner=runner, args=args)
    build(p)
    result = p.run()
    result.wait_until_finish()
    return counters_of(result), result


def counters_of(result) -> dict[str, int]:
    """The counters of the ``tinybird`` namespace, summed over steps."""
    totals: dict[str, int] = collections.Counter()
    for counter in result.metrics().query(MetricsFilter().with_namespace("tinybird"))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] += int(value or 0)
    return dict(totals)


def sink(server: LocalServer, datasource: str, **overrides) -> WriteToTinybird:
    """WriteToTinybird to ``server`` with small batches (many requests) and quick retries."""
    settings = dict(
        datasource=datasource, token=server.token, api_url=server.url, retry_policy=quick_retries(),
        max_batch_bytes=8 * 1024, num_shards=2, max_in_flight=2, read_timeout_secs=10)
    settings.update(overrides)
    return WriteToTinybird(**settings)


def stored_ids(server: LocalServer, datasource: str) -> Counter[int]:
    """How many times each id is in the data source, once everything accepted is committed."""
    server.flush()
    if datasource not in server.datasources():
        return collections.Counter()
    rows = server.query(f"SELECT id, count(*) AS n FROM {datasource} GROUP BY id")
    return collections.Counter({row["id"]: row["n"] for row in rows})


def line_id(letter: DeadLetter) -> int:
    return orjson.loads(letter.line)["id"]


@dataclasses.dataclass
class Accounting:
    """Where every id sent ended up, and why an id is in the data source twice.

    Attributes:
        sent: Ids handed to the sink.
        stored: Times each id is in the data source.
        dead: Ids in the dead letters (a list: an id dead-lettered twice shows).
        acknowledged: The sink's ``rows_acknowledged`` counter (None: not known).
        stored_after_faults: ``rows.stored_by_after_faults`` from the server:
            rows committed for requests whose client was told they failed.
    """

    sent: list[int]
    stored: Counter[int]
    dead: list[int]
    acknowledged: int | None
    stored_after_faults: int

    @property
    def missing(self) -> list[int]:
        return sorted(set(self.sent) - set(self.stored) - set(self.dead))

    @property
    def stored_twice(self) -> int:
        """Copies beyond the first in the data source."""
        return sum(n - 1 for n in self.stored.values() if n > 1)

    @property
    def dead_but_stored(self) -> int:
        """Dead-lettered ids that an earlier attempt did store (replaying them duplicates)."""
        return len(set(self.dead) & set(self.stored))

    @property
    def duplicates(self) -> int:
        return self.stored_twice + self.dead_but_stored

    @property
    def unexpected(self) -> list[int]:
        """Stored or dead-lettered ids that were never sent."""
        return sorted((set(self.stored) | set(self.dead)) - set(self.sent))

    def report(self, title: str) -> str:
        lines = [
            f"{title}:",
            f"  events sent            {len(self.sent)}",
            f"  acknowledged (sink)    {'n/a' if self.acknowledged is None else self.acknowledged}",
            f"  dead-lettered          {len(self.dead)}",
            f"  stored (unique ids)    {len(self.stored)}",
            f"  stored (rows)          {sum(self.stored.values())}",
            f"  missing                {len(self.missing)}",
            f"  duplicates             {self.duplicates} ({self.stored_twice} stored twice, "
            f"{self.dead_but_stored} dead-lettered but stored)",
            f"  stored after a fault   {self.stored_after_faults} (server's count)",
        ]
        text = "\n".join(lines)
        print(text)
        return text

    def check(self) -> None:
        """Nothing missing, nothing unknown, no id dead-lettered twice."""
        assert not self.missing, f"{len(self.missing)} ids lost, e.g. {self.missing[:10]}"
        assert not self.unexpected, self.unexpected[:10]
        assert len(self.dead) == len(set(self.dead)), "an id was dead-lettered twice"


def account(server: LocalServer, datasource: str, sent: Iterable[int], letters: Sequence[DeadLetter],
            counters: dict[str, int] | None) -> Accounting:
    return Accounting(
        sent=list(sent), stored=stored_ids(server, datasource),
        dead=[line_id(letter) for letter in letters if letter.line is not None],
        acknowledged=None if counters is None else counters.get("rows_acknowledged", 0),
        stored_after_faults=server.stats()["rows"]["stored_by_after_faults"])


def fired(server: LocalServer) -> list[int]:
    """How many times each active fault rule fired, in rule order."""
    return [rule["fired"] for rule in server.stats()["faults"]]


# -- what the sink really posted -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Post:
    """One POST the sink made: the ids in its body and the status (None: no response)."""

    ids: tuple[int, ...]
    status: int | None
    message: str


class PostRecorder:
    """Records every ``requests.Session.post`` of this process (the sink's HTTP calls).

    Installed with pytest's ``monkeypatch``; it works for runners that run the
    pipeline in this process (FnApiRunner, BundleBasedDirectRunner). ``after``,
    when given, is called with the response after it was recorded: a test uses it
    to make a worker fail once the server has answered.
    """

    def __init__(self, monkeypatch, *, after: Callable[[Post], None] | None = None) -> None:
        self.posts: list[Post] = []
        self._lock = threading.Lock()
        self._after = after
        real_post = requests.Session.post
        recorder = self

        def post(session, url, data=None, **kwargs):
            ids = tuple(_ids_of(data, (kwargs.get("headers") or {}).get("Content-Encoding")))
            try:
                response = real_post(session, url, data=data, **kwargs)
            except requests.RequestException:
                recorder._add(Post(ids, None, "no response"))
                raise
            try:
                message = response.json().get("error", "")
            except ValueError:
                message = ""
            record = Post(ids, response.status_code, message)
            recorder._add(record)
            if recorder._after is not None:
                recorder._after(record)
            return response

        monkeypatch.setattr(requests.Session, "post", post)

    def _add(self, record: Post) -> None:
        with self._lock:
            self.posts.append(record)

    def ids_answered(self, status: int) -> list[int]:
        return [i for post in self.posts if post.status == status for i in post.ids]


def _ids_of(body: bytes, encoding: str | None) -> list[int]:
    if encoding == "zstd":
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    elif encoding == "gzip":
        body = zlib.decompress(body, wbits=31)
    return [json.loads(line)["id"] for line in body.split(b"\n") if line.strip()]
