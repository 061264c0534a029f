"""The Beam scenarios of the sink itself and of the baselines, and the shared sources.

Bounded scenarios run on the in-process ``FnApiRunner``; their source is
``Impulse`` + a ``FlatMap`` that reads the generated file and yields dicts as it
reads, so that memory does not hold the input. Streaming scenarios run on the
``BundleBasedDirectRunner`` with ``--streaming``: a ``TestStream`` hands out where
each bundle's events are in the file and a ``FlatMap`` reads them; the output is
unbounded, so ``WriteToTinybird`` takes its stateful, cross-bundle batching path. These are the runners the ``DirectRunner`` would pick, named
explicitly because Beam 2.77's ``DirectRunner`` first tries to download the
Prism runner from github.com.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
import orjson
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from benchmarks._data import read_events
from benchmarks.scenarios import RunSpec, Timed
from sinks.tinybird import WriteToTinybird

__all__ = [
    "baseline",
    "baseline_streaming",
    "baseline_timestamped",
    "bounded_source",
    "pipeline_options",
    "run_pipeline",
    "sink_gzip",
    "sink_none",
    "sink_streaming",
    "sink_zstd",
    "sink_zstd_timestamped",
    "stream_chunks",
    "streaming_source",
    "timed_pipeline",
]


def pipeline_options(*, streaming: bool) -> PipelineOptions:
    args = ["--runner=BundleBasedDirectRunner" if streaming else "--runner=FnApiRunner"]
    if streaming:
        args.append("--streaming")
    return PipelineOptions(args)


def _read(_: bytes, path: str, events: int) -> Iterator[dict[str, Any]]:
    return read_events(path, events)


def _read_timestamped(_: bytes, path: str, events: int) -> Iterator[TimestampedValue]:
    for second, event in enumerate(read_events(path, events)):
        yield TimestampedValue(event, second)


def bounded_source(p: beam.Pipeline, spec: RunSpec, *, timestamped: bool = False) -> beam.PCollection:
    """The events of ``spec`` as dicts, read lazily from the generated file (bounded).

    ``timestamped``: each event gets a timestamp of its own (event ``i`` at ``i``
    seconds), in the global window still, as events with their time read from a
    field would have; otherwise every event has the source's ``MIN_TIMESTAMP``.
    """
    read = _read_timestamped if timestamped else _read
    return p | "Impulse" >> beam.Impulse() | "ReadEvents" >> beam.FlatMap(read, spec.data_path, spec.events)


def stream_chunks(spec: RunSpec) -> list[tuple[int, int]]:
    """Where each streaming bundle's events are in the generated file: ``(offset, count)``
    per ``spec.bundle_events`` events (found before the timing)."""
    chunks: list[tuple[int, int]] = []
    offset = 0
    with open(spec.data_path, "rb", buffering=1 << 20) as fh:
        for start in range(0, spec.events, spec.bundle_events):
            count = min(spec.bundle_events, spec.events - start)
            chunks.append((offset, count))
            for _ in range(count):
                offset += len(fh.readline())
    return chunks


def _read_chunk(chunk: tuple[int, int], path: str) -> Iterator[dict[str, Any]]:
    offset, count = chunk
    loads = orjson.loads
    with open(path, "rb", buffering=1 << 20) as fh:
        fh.seek(offset)
        for _ in range(count):
            yield loads(fh.readline())


def streaming_source(p: beam.Pipeline, chunks: list[tuple[int, int]], path: str) -> beam.PCollection:
    """An unbounded PCollection: a TestStream delivers one ``(offset, count)`` at a time
    (each its own bundle), which a ``FlatMap`` reads from the generated file.

    The TestStream carries where the events are, not the events: its own cost
    (it pickles and compresses what it holds into the pipeline, and replays it
    element by element) is then per bundle, and what is measured per event is
    the runner and the transforms, as with a real source. Every element has the
    same event time and the processing-time clock never moves: a backlog is
    drained as fast as the runner goes, batches fill by size, and what is left
    leaves when the watermark goes to infinity.
    """
    stream = TestStream()
    for chunk in chunks:
        stream.add_elements([chunk])
    stream.advance_watermark_to_infinity()
    return p | "TestStream" >> stream | "ReadEvents" >> beam.FlatMap(_read_chunk, path)


def _zero_clock() -> float:
    """TestStream's processing-time clock starts at 0 and does not move here."""
    return 0.0


class _Discard(beam.DoFn):
    """Drops every element; counts them per bundle, into this process's tally.

    Not a Beam counter: the DirectRunner's streaming mode reports a counter of
    one bundle only (seen with Beam 2.77 and a TestStream), and both runners
    used here run DoFns in this process.
    """

    def start_bundle(self) -> None:
        self._count = 0

    def process(self, element: Any) -> None:
        self._count += 1

    def finish_bundle(self) -> None:
        with _TALLY_LOCK:
            _TALLY[0] += self._count


_TALLY = [0]
_TALLY_LOCK = threading.Lock()


def run_pipeline(options: PipelineOptions, build) -> beam.runners.runner.PipelineResult:
    p = beam.Pipeline(options=options)
    build(p)
    result = p.run()
    result.wait_until_finish()
    return result


def timed_pipeline(*, streaming: bool, build) -> Timed:
    """The timed callable of a scenario that only runs a pipeline."""
    def run() -> None:
        run_pipeline(pipeline_options(streaming=streaming), build)

    return run


def _discarded(result) -> int:
    return _TALLY[0]


def baseline(spec: RunSpec) -> Timed:
    """The same source and encoding as the sink scenarios, then a discard."""
    def build(p):
        bounded_source(p, spec) | "Encode" >> beam.Map(orjson.dumps) | "Discard" >> beam.ParDo(_Discard())

    return lambda: _discarded(run_pipeline(pipeline_options(streaming=False), build))


def baseline_timestamped(spec: RunSpec) -> Timed:
    """:func:`baseline` with a timestamp of its own on every event."""
    def build(p):
        (bounded_source(p, spec, timestamped=True)
         | "Encode" >> beam.Map(orjson.dumps) | "Discard" >> beam.ParDo(_Discard()))

    return lambda: _discarded(run_pipeline(pipeline_options(streaming=False), build))


def baseline_streaming(spec: RunSpec) -> Timed:
    """The streaming scenarios' source and encoding, then a discard: the runner's own cost."""
    chunks = stream_chunks(spec)

    def build(p):
        (streaming_source(p, chunks, spec.data_path)
         | "Encode" >> beam.Map(orjson.dumps) | "Discard" >> beam.ParDo(_Discard()))

    return lambda: _discarded(run_pipeline(pipeline_options(streaming=True), build))


def _sink(spec: RunSpec, *, compression: str | None, **kwargs: Any) -> WriteToTinybird:
    kwargs.setdefault("datasource", spec.datasource)
    return WriteToTinybird(
        token=spec.token, api_url=spec.api_url, compression=compression, max_batch_bytes=spec.max_batch_bytes,
        **kwargs)


def _sink_bounded(spec: RunSpec, compression: str | None, *, timestamped: bool = False) -> Timed:
    def build(p):
        bounded_source(p, spec, timestamped=timestamped) | "WriteToTinybird" >> _sink(spec, compression=compression)

    return timed_pipeline(streaming=False, build=build)


def sink_none(spec: RunSpec) -> Timed:
    return _sink_bounded(spec, None)


def sink_zstd(spec: RunSpec) -> Timed:
    return _sink_bounded(spec, "zstd")


def sink_zstd_timestamped(spec: RunSpec) -> Timed:
    """``sink_zstd`` on events with a timestamp each: every line's timestamp differs from the last."""
    return _sink_bounded(spec, "zstd", timestamped=True)


def sink_gzip(spec: RunSpec) -> Timed:
    return _sink_bounded(spec, "gzip")


def sink_zstd_3_destinations(spec: RunSpec) -> Timed:
    """As ``sink_zstd``, each event to one of three data sources by its ``device`` (a field of five
    values, mapped to three names): batches per data source, one client."""
    return _sink_routed(spec, _ByDevice(spec.datasource, _THREE_WAYS))


def sink_zstd_routed(spec: RunSpec) -> Timed:
    """As ``sink_zstd_3_destinations``, with a function of the same cost per call that names one data
    source for every event: what a function per element costs, apart from three batches instead of one."""
    return _sink_routed(spec, _ByDevice(spec.datasource, _ONE_WAY))


def _sink_routed(spec: RunSpec, datasource: Callable[[dict], str]) -> Timed:
    def build(p):
        bounded_source(p, spec) | "WriteToTinybird" >> _sink(spec, compression="zstd", datasource=datasource)

    return timed_pipeline(streaming=False, build=build)


def sink_streaming(spec: RunSpec, *, datasource: Any = None) -> Timed:
    """WriteToTinybird on an unbounded PCollection: the stateful ``_BatchDoFn`` path."""
    chunks = stream_chunks(spec)
    routing = {} if datasource is None else {"datasource": datasource}

    def build(p):
        source = streaming_source(p, chunks, spec.data_path)
        assert not source.is_bounded
        source | "WriteToTinybird" >> _sink(spec, compression="zstd", clock=_zero_clock, **routing)

    return timed_pipeline(streaming=True, build=build)


def sink_streaming_3_destinations(spec: RunSpec) -> Timed:
    return sink_streaming(spec, datasource=_ByDevice(spec.datasource, _THREE_WAYS))


# The event's ``device`` (five values) -> the suffix of its data source's name: three data sources,
# or one for every event.
_THREE_WAYS = {"ios": "ios", "android": "android", "linux": "desktop", "windows": "desktop", "macos": "desktop"}
_ONE_WAY = dict.fromkeys(_THREE_WAYS, "all")


@dataclasses.dataclass(frozen=True)
class _ByDevice:
    """Routes an event to ``<datasource>__<suffix>``, the suffix ``names`` gives its ``device`` (the
    counting endpoint adds every data source up): the same cost per call whatever ``names`` says."""

    datasource: str
    names: dict[str, str]

    def __call__(self, event: dict) -> str:
        return f"{self.datasource}__{self.names[event['device']]}"
