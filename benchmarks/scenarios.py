"""The scenarios: what each one runs, on how many events, and the plain-Python ceiling.

A scenario is named on the command line and implemented by a *prepare*
function, given as ``"module:function"`` so that the parent process never
imports Beam. ``prepare(spec)`` does the imports and builds any input outside
the timing, and returns the callable that the worker times.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

__all__ = [
    "COUNTING", "EVENTS", "LARGE_BUNDLES", "LOCAL_SERVER", "PER_ELEMENT", "SCENARIOS", "STATEFUL", "RunSpec",
    "Scenario", "by_name", "ceiling", "prepare",
]

# Which event count a scenario runs on (the slow ones run on fewer events).
EVENTS = "events"
STATEFUL = "stateful"
LARGE_BUNDLES = "large_bundles"
PER_ELEMENT = "per_element"

# Where a scenario sends: the counting endpoint (it measures the client), or the
# local Events API server (end to end: parsed, checked and stored rows).
COUNTING = "counting"
LOCAL_SERVER = "local_server"

Timed = Callable[[], int | None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything one scenario run needs; JSON-serializable (it is passed to the worker).

    Attributes:
        scenario: The scenario's name.
        data_path: The generated NDJSON file; the run reads its first ``events`` lines.
        events: Events to send.
        api_url: The local Events API server.
        token: A token with every scope on it.
        datasource: A data source name of this run's own.
        max_batch_bytes: Bound on the uncompressed NDJSON of one request.
        bundle_events: Streaming scenarios: events per bundle of the source.
        profile_path: When set, the run is profiled with cProfile into this file.
    """

    scenario: str
    data_path: str
    events: int
    api_url: str
    token: str
    datasource: str
    max_batch_bytes: int
    bundle_events: int = 1000
    profile_path: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scenario:
    """One row of the table.

    Attributes:
        name: Its name on the command line.
        title: Its label in the table.
        size: ``EVENTS``, ``STATEFUL``, ``LARGE_BUNDLES`` or ``PER_ELEMENT``: which
            event count it runs on (``LARGE_BUNDLES``: also the large streaming bundles).
        sends: False for the baselines, which discard instead of sending.
        target: ``"module:function"`` of its prepare function.
        baseline: The discard baseline its events/s are compared with.
        endpoint: ``COUNTING`` or ``LOCAL_SERVER``: where it sends.
    """

    name: str
    title: str
    size: str
    sends: bool
    target: str
    baseline: str = "baseline"
    endpoint: str = COUNTING


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(name="baseline", title="Baseline: source + orjson.dumps, discard",
             size=EVENTS, sends=False, target="benchmarks._pipelines:baseline"),
    Scenario(name="sink_none", title="WriteToTinybird, bounded, no compression",
             size=EVENTS, sends=True, target="benchmarks._pipelines:sink_none"),
    Scenario(name="sink_zstd", title="WriteToTinybird, bounded, zstd",
             size=EVENTS, sends=True, target="benchmarks._pipelines:sink_zstd"),
    Scenario(name="baseline_timestamped", title="Baseline, each event its own timestamp",
             size=EVENTS, sends=False, target="benchmarks._pipelines:baseline_timestamped",
             baseline="baseline_timestamped"),
    Scenario(name="sink_zstd_timestamped", title="WriteToTinybird, bounded, zstd, each event its own timestamp",
             size=EVENTS, sends=True, target="benchmarks._pipelines:sink_zstd_timestamped",
             baseline="baseline_timestamped"),
    Scenario(name="sink_gzip", title="WriteToTinybird, bounded, gzip",
             size=EVENTS, sends=True, target="benchmarks._pipelines:sink_gzip"),
    Scenario(name="sink_zstd_3_destinations", title="WriteToTinybird, bounded, zstd, 3 data sources by a field",
             size=EVENTS, sends=True, target="benchmarks._pipelines:sink_zstd_3_destinations"),
    Scenario(name="sink_zstd_routed", title="WriteToTinybird, bounded, zstd, 1 data source by the same kind of function",
             size=EVENTS, sends=True, target="benchmarks._pipelines:sink_zstd_routed"),
    Scenario(name="sink_zstd_local_server", title="WriteToTinybird, bounded, zstd, to the local Events API server",
             size=EVENTS, sends=True, target="benchmarks._pipelines:sink_zstd", endpoint=LOCAL_SERVER),
    Scenario(name="peer_b_batch_bytes", title="(b) BatchElements by bytes + Session per batch",
             size=EVENTS, sends=True, target="benchmarks.peers:batch_elements_by_bytes"),
    Scenario(name="peer_d_tinybird_beam", title="(d) tinybird-beam approach (NDJSON to /v0/events)",
             size=EVENTS, sends=True, target="benchmarks.peers:tinybird_beam"),
    Scenario(name="ceiling", title="Ceiling: plain loop, orjson, one Session, no Beam",
             size=EVENTS, sends=True, target="benchmarks.scenarios:ceiling"),
    Scenario(name="baseline_streaming", title="Baseline, streaming: source + orjson.dumps, discard",
             size=STATEFUL, sends=False, target="benchmarks._pipelines:baseline_streaming",
             baseline="baseline_streaming"),
    Scenario(name="sink_streaming", title="WriteToTinybird, unbounded (streaming), zstd",
             size=STATEFUL, sends=True, target="benchmarks._pipelines:sink_streaming",
             baseline="baseline_streaming"),
    Scenario(name="sink_streaming_3_destinations", title="WriteToTinybird, unbounded, zstd, 3 data sources",
             size=STATEFUL, sends=True, target="benchmarks._pipelines:sink_streaming_3_destinations",
             baseline="baseline_streaming"),
    Scenario(name="peer_c_gib_streaming", title="(c) GroupIntoBatches on random keys, streaming",
             size=STATEFUL, sends=True, target="benchmarks.peers:group_into_batches_streaming",
             baseline="baseline_streaming"),
    Scenario(name="baseline_streaming_large", title="Baseline, streaming, large bundles",
             size=LARGE_BUNDLES, sends=False, target="benchmarks._pipelines:baseline_streaming",
             baseline="baseline_streaming_large"),
    Scenario(name="sink_streaming_large", title="WriteToTinybird, streaming, zstd, large bundles",
             size=LARGE_BUNDLES, sends=True, target="benchmarks._pipelines:sink_streaming",
             baseline="baseline_streaming_large"),
    Scenario(name="peer_c_gib", title="(c) GroupIntoBatches on random keys, bounded",
             size=STATEFUL, sends=True, target="benchmarks.peers:group_into_batches"),
    Scenario(name="peer_a_post_each", title="(a) requests.post per element, no Session",
             size=PER_ELEMENT, sends=True, target="benchmarks.peers:post_each_element"),
)

_BY_NAME: dict[str, Scenario] = {s.name: s for s in SCENARIOS}


def by_name(name: str) -> Scenario:
    """The scenario called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(_BY_NAME)}") from None


def prepare(spec: RunSpec) -> Timed:
    """Imports the scenario's module, prepares its input, returns what is timed."""
    module_name, _, function = by_name(spec.scenario).target.partition(":")
    return getattr(importlib.import_module(module_name), function)(spec)


def ceiling(spec: RunSpec) -> Timed:
    """What the machine can do at best: no Beam, full batches, one connection.

    A plain loop reads the same events, encodes each with ``orjson.dumps``,
    fills batches up to ``max_batch_bytes`` (checked before adding, as the sink
    does) and posts each, uncompressed, with one ``requests.Session``.
    """
    import orjson
    import requests

    from benchmarks._data import read_events

    url = f"{spec.api_url}/v0/events?name={spec.datasource}"
    headers = {"Authorization": f"Bearer {spec.token}", "Content-Type": "application/x-ndjson"}

    def run() -> None:
        with requests.Session() as session:
            def post(body: bytearray) -> None:
                response = session.post(url, data=bytes(body), headers=headers, timeout=(5, 60))
                response.raise_for_status()

            # A bytearray, not a list of lines: orjson over-allocates the bytes it
            # returns (about 4 KiB for a 200-byte line), so a batch kept as a list of
            # them takes about twenty times its size in memory.
            body = bytearray()
            for element in read_events(spec.data_path, spec.events):
                line = orjson.dumps(element)
                if len(body) + len(line) + 1 > spec.max_batch_bytes and body:
                    post(body)
                    body = bytearray()
                body += line
                body += b"\n"
            if body:
                post(body)
        return None

    return run
