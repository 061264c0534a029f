"""What the Beam model promises on every window (issue 21): merging windows batched as
full as fixed ones, no line reused for a mutated object, a bound on open buffers
per bundle, dead letters in their element's window at its timestamp, and
``raise_on_failure`` that neither double-posts nor raises on what must not be retried.

Pipelines run on the FnApiRunner (bounded) and the DirectRunner with ``TestStream``
(unbounded) against a scripted server on 127.0.0.1 that records every request.
"""

from __future__ import annotations

import collections
import tracemalloc

import apache_beam as beam
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to, equal_to_per_window
from apache_beam.transforms.core import Windowing
from apache_beam.transforms.window import (
    FixedWindows,
    GlobalWindow,
    GlobalWindows,
    IntervalWindow,
    Sessions,
    SlidingWindows,
    TimestampedValue,
)
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Timestamp
from sink_testlib import ScriptedServer, decoded_body

from sinks.tinybird import DeliveryError, RetryPolicy, WriteToTinybird
from sinks.tinybird._batching import Batch, BatchLimits, _BundleBuffers

TOKEN = "p.test-token-21"


def _sink(url: str, **overrides) -> WriteToTinybird:
    settings = dict(datasource="events", token=TOKEN, api_url=url, compression=None, num_shards=2,
                    retry_policy=RetryPolicy(max_attempts=2, initial_backoff_secs=0.01, max_backoff_secs=0.01,
                                             max_total_secs=5))
    settings.update(overrides)
    return WriteToTinybird(**settings)


def _posted_ids(server: ScriptedServer) -> collections.Counter:
    ids: collections.Counter = collections.Counter()
    for _, headers, body in server.requests:
        ids.update(orjson.loads(line)["id"] for line in decoded_body(headers, body).splitlines())
    return ids


def _run_bounded(build) -> None:
    p = beam.Pipeline(runner=FnApiRunner())
    build(p)
    p.run().wait_until_finish()


class _ReusedDict(beam.DoFn):
    """Yields one dict, mutated between yields (against Beam's advice, but common)."""

    def process(self, n: int):
        reused: dict = {}
        for i in range(n):
            reused["id"] = i
            yield TimestampedValue(reused, i * 0.1)


# -- merging windows ------------------------------------------------------------------


def test_one_session_of_500_rows_one_second_apart_is_a_few_full_requests_and_nothing_lost():
    """Before a GroupByKey each row is in its own unmerged session window: the sink merges them (issue 21, 1)."""
    with ScriptedServer() as server:
        _run_bounded(lambda p: (
            p | beam.Create([TimestampedValue({"id": i}, i) for i in range(500)])
            | beam.WindowInto(Sessions(10)) | _sink(server.url)))
        assert len(server.requests) <= 10
        assert _posted_ids(server) == collections.Counter(range(500))


def test_sessions_across_bundles_are_merged_by_the_group_by_key():
    """Rows of one session spread over many bundles (a Reshuffle) still make one session's batches."""
    with ScriptedServer() as server:
        _run_bounded(lambda p: (
            p | beam.Create([TimestampedValue({"id": i}, i) for i in range(300)]) | beam.Reshuffle()
            | beam.WindowInto(Sessions(10)) | _sink(server.url)))
        assert _posted_ids(server) == collections.Counter(range(300))
        assert len(server.requests) <= 2  # one session, one shard or two


def test_two_sessions_never_share_a_request():
    with ScriptedServer() as server:
        rows = [TimestampedValue({"id": i}, i) for i in range(50)] + [
            TimestampedValue({"id": 1000 + i}, 1000 + i) for i in range(50)]
        _run_bounded(lambda p: p | beam.Create(rows) | beam.WindowInto(Sessions(10)) | _sink(server.url, num_shards=1))
        sessions = [{orjson.loads(line)["id"] >= 1000 for line in decoded_body(h, b).splitlines()}
                    for _, h, b in server.requests]
        assert sorted(map(sorted, sessions)) == [[False], [True]]


def test_streaming_sessions_are_merged_within_each_bundle():
    """Unbounded input: a bundle's rows of one session are one buffer (state per merged window, not per row)."""
    with ScriptedServer() as server:
        stream = TestStream().advance_watermark_to(0)
        for start in range(0, 200, 50):
            stream = stream.add_elements([TimestampedValue({"id": i}, i) for i in range(start, start + 50)])
        stream = stream.advance_watermark_to(1000).advance_watermark_to_infinity()
        with TestPipeline(options=_streaming()) as p:
            _ = p | stream | beam.WindowInto(Sessions(10)) | _sink(server.url, num_shards=1, max_buffering_secs=3600)
        assert _posted_ids(server) == collections.Counter(range(200))
        # At most one request per bundle of the session (four bundles), not one per row.
        assert len(server.requests) <= 4


# -- mutated objects ------------------------------------------------------------------


def test_a_reused_dict_in_sliding_windows_is_stored_once_per_window():
    """Issue 21, 2: 2,000 ids in SlidingWindows(60, 30): 4,000 rows, every id twice."""
    with ScriptedServer() as server:
        _run_bounded(lambda p: (
            p | beam.Create([2000]) | beam.ParDo(_ReusedDict()) | beam.WindowInto(SlidingWindows(60, 30))
            | _sink(server.url)))
        ids = _posted_ids(server)
        assert sum(ids.values()) == 4000 and len(ids) == 2000 and set(ids.values()) == {2}


@pytest.mark.parametrize("windowfn", [FixedWindows(10), Sessions(1)])
def test_a_reused_dict_in_one_window_functions_is_stored_once(windowfn):
    with ScriptedServer() as server:
        _run_bounded(lambda p: (
            p | beam.Create([500]) | beam.ParDo(_ReusedDict()) | beam.WindowInto(windowfn) | _sink(server.url)))
        assert _posted_ids(server) == collections.Counter(range(500))


# -- open buffers per bundle ------------------------------------------------------------


def test_past_max_windows_per_bundle_the_least_recently_used_buffer_leaves_for_the_merge():
    from apache_beam.coders import coders

    limits = BatchLimits(max_batch_bytes=1000, max_batch_rows=100, max_buffering_secs=5, num_shards=1,
                         max_windows_per_bundle=2)
    coder = FixedWindows(10).get_window_coder()
    assert isinstance(coder, coders.IntervalWindowCoder)
    buffers = _BundleBuffers(limits, full_to_merge=False, window_coder=coder)
    a, b, c = IntervalWindow(0, 10), IntervalWindow(10, 20), IntervalWindow(20, 30)
    assert buffers.add(("ev", a), b"1", 1) is None
    assert buffers.add(("ev", b), b"2", 11) is None
    assert buffers.add(("ev", a), b"3", 2) is None  # a is now the most recently used
    (evicted,) = buffers.add(("other", c), b"4", 21)  # buffers of every data source count against the bound
    key, chunk = evicted.value
    assert (key.window, key.datasource, chunk.payload, evicted.windows) == (
        "[1970-01-01T00:00:10Z, 1970-01-01T00:00:20Z)", "ev", b"2\n", (GlobalWindow(),))
    left = {(out.value[0].datasource, out.value[0].window): out.value[1].payload for out in buffers.drain()}
    assert left == {("ev", "[1970-01-01T00:00:00Z, 1970-01-01T00:00:10Z)"): b"1\n3\n",
                    ("other", "[1970-01-01T00:00:20Z, 1970-01-01T00:00:30Z)"): b"4\n"}


@pytest.mark.parametrize("windowfn", [FixedWindows(1), Sessions(0.5)])
def test_a_bundle_of_5000_windows_never_holds_more_than_max_windows_per_bundle_buffers(windowfn):
    """Issue 21, 3, scaled down and counted rather than measured (benchmarks/window_rss.py measures RSS)."""
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird._batching import _EncodeAndBatchDoFn, timestamps_of

    limits = BatchLimits(max_batch_bytes=10_000, max_batch_rows=100, max_buffering_secs=5, num_shards=3,
                         max_windows_per_bundle=7)
    dofn = _EncodeAndBatchDoFn(datasource="events", limits=limits, windowing=Windowing(windowfn),
                               full_to_merge=windowfn.is_merging(), keep_windows=windowfn.is_merging())
    dofn.setup()
    dofn.start_bundle()
    outputs, most_open = [], 0
    for i in range(5000):
        # Windows revisited out of order: 1,000 distinct windows (sessions: one a second).
        start = (i * 7919) % 1000
        (window,) = windowfn.assign(_AssignContext(Timestamp(start)))
        outputs += dofn.process({"id": i}, wv=WindowedValue({"id": i}, Timestamp(start), (window,))) or ()
        most_open = max(most_open, len(dofn._buffers._buffers))
    outputs += dofn.finish_bundle()
    assert most_open == 7
    ids, stamps = collections.Counter(), []
    for out in outputs:
        _, chunk = out.value
        ids.update(orjson.loads(line)["id"] for line in chunk.payload.splitlines())
        stamps += timestamps_of(chunk.timestamps)
    assert ids == collections.Counter(range(5000))
    assert sorted(stamps) == sorted(((i * 7919) % 1000) * 1_000_000 for i in range(5000))


class _AssignContext:
    def __init__(self, timestamp: Timestamp) -> None:
        self.timestamp = timestamp


def _encoder_peak_bytes(windowfn, *, windows: int, rows: int) -> int:
    """tracemalloc's peak while one bundle of ``rows`` rows of ~100 bytes, in ``windows`` windows
    visited one after the other, goes through the sink's encoder, its outputs dropped as they leave."""
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird._batching import _EncodeAndBatchPerWindowDoFn, encoder_for

    limits = BatchLimits(max_batch_bytes=10_000, max_batch_rows=1000, max_buffering_secs=5, num_shards=3,
                         max_windows_per_bundle=20)
    merging = windowfn.is_merging()
    dofn = encoder_for(windowfn, bounded=True)(datasource="events", limits=limits, windowing=Windowing(windowfn),
                                               full_to_merge=merging, keep_windows=merging)
    per_window_call = isinstance(dofn, _EncodeAndBatchPerWindowDoFn)
    dofn.setup()
    tracemalloc.start()
    try:
        dofn.start_bundle()
        for i in range(rows):
            timestamp = Timestamp(100 * (i * windows // rows))  # windows 100 s apart: none overlap or merge
            element = {"id": i, "pad": "x" * 80}
            for window in windowfn.assign(_AssignContext(timestamp)):
                if per_window_call:
                    dofn.process(element, window=window, timestamp=timestamp)
                else:
                    dofn.process(element, wv=WindowedValue(element, timestamp, (window,)))
        for _ in dofn.finish_bundle():
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("windowfn", [FixedWindows(10), Sessions(5), SlidingWindows(20, 10)],
                         ids=["fixed", "sessions", "sliding"])
def test_the_encoders_peak_memory_is_flat_in_the_number_of_windows(windowfn):
    """Issue 21, 3: what the sink itself holds in a bundle does not grow with its windows.

    Counted by tracemalloc (every Python allocation, not a timing): 10,000 rows
    (1 MB of lines) in 10,000 one-row windows against the same rows in 10 windows.
    With 10 windows the peak is about 10 buffers filling to ``max_batch_bytes``
    (50 to 120 KB here); with 10,000 it is 20 buffers of one row (about 25 KB).
    Anything kept per window (a dict keyed by window never pruned, a window's
    encoding cached, a metric per window: each 50 bytes or more) would add its
    size 10,000 times, past the 32 KiB allowed.
    """
    _encoder_peak_bytes(windowfn, windows=10, rows=200)  # first-use allocations (coders, caches) out of the way
    few = _encoder_peak_bytes(windowfn, windows=10, rows=10_000)
    many = _encoder_peak_bytes(windowfn, windows=10_000, rows=10_000)
    assert many <= few + 32 * 1024, (few, many)


def _routed_by_kind(element):
    return f"ev_{element['kind']}"


@pytest.mark.parametrize(("windowfn", "bounded", "datasource"), [
    (GlobalWindows(), True, "events"),
    (GlobalWindows(), True, _routed_by_kind),
    (FixedWindows(10), True, _routed_by_kind),
    (Sessions(5), True, "events"),
    (SlidingWindows(20, 10), True, _routed_by_kind),
    (GlobalWindows(), False, _routed_by_kind),
    (FixedWindows(10), False, "events"),
], ids=["global", "global-routed", "fixed-routed", "sessions", "sliding-routed", "unbounded-global-routed",
        "unbounded-fixed"])
def test_an_encoder_holds_no_lines_once_its_bundle_is_finished(windowfn, bounded, datasource):
    """What a bundle buffered leaves with it: a DoFn instance, reused by the runner for the next
    bundles, keeps nothing of it (at 20 open buffers of 8 MiB, a reference kept would be 160 MiB per
    instance, held while it waits).

    Counted by tracemalloc: a bundle of 3 MB of lines in 3 data sources and 3 windows, none of them
    filling a batch of 16 MB, so that everything leaves from ``finish_bundle``; once its outputs are
    dropped, what the process holds is within 64 KiB of what it held before the bundle.
    """
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird._batching import _EncodeAndBatchPerWindowDoFn, encoder_for

    limits = BatchLimits(max_batch_bytes=16 * 2**20, max_batch_rows=100_000, max_buffering_secs=5, num_shards=3)
    merging = windowfn.is_merging()
    routed = callable(datasource)
    dofn = encoder_for(windowfn, bounded=bounded, routed=routed)(
        datasource=datasource, limits=limits, windowing=Windowing(windowfn),
        full_to_merge=merging or not bounded, keep_windows=merging and bounded)
    per_window_call = isinstance(dofn, _EncodeAndBatchPerWindowDoFn)
    dofn.setup()

    def bundle(rows: int) -> int:
        dofn.start_bundle()
        for i in range(rows):
            timestamp = Timestamp(100 * (i % 3))  # three windows 100 s apart (or one global window)
            element = {"id": i, "kind": "abc"[i % 3], "pad": "x" * 980}
            for window in windowfn.assign(_AssignContext(timestamp)):
                if per_window_call:
                    dofn.process(element, window=window, timestamp=timestamp)
                else:
                    dofn.process(element, wv=WindowedValue(element, timestamp, (window,)))
        return sum(1 for _ in dofn.finish_bundle())

    bundle(30)  # first-use allocations (coders, caches, metrics) out of the way
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        outputs = bundle(3000)
        held = tracemalloc.get_traced_memory()[0] - before
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert outputs and peak > 3_000_000  # the lines were buffered, and left from finish_bundle
    assert held < 64 * 1024, held


def test_max_windows_per_bundle_is_validated_with_its_value_named():
    with pytest.raises(ValueError, match="max_windows_per_bundle must be at least 1, got 0"):
        WriteToTinybird(datasource="d", token="t", max_windows_per_bundle=0)
    with pytest.raises(TypeError, match="max_windows_per_bundle must be an int"):
        WriteToTinybird(datasource="d", token="t", max_windows_per_bundle="20")


def test_many_one_row_windows_in_one_bundle_are_all_sent_once():
    with ScriptedServer() as server:
        _run_bounded(lambda p: (
            p | beam.Create([TimestampedValue({"id": i}, i) for i in range(600)]) | beam.WindowInto(FixedWindows(1))
            | _sink(server.url, max_windows_per_bundle=5)))
        assert _posted_ids(server) == collections.Counter(range(600))


# -- dead letters in their windows --------------------------------------------------------


def _letters_by_window(dead_letters):
    return dead_letters | beam.ParDo(_IdAndTimestamp())


class _IdAndTimestamp(beam.DoFn):
    def process(self, letter, timestamp=beam.DoFn.TimestampParam):
        ident = orjson.loads(letter.line)["id"] if letter.line is not None else None
        yield (ident, letter.kind, float(timestamp))


@pytest.mark.parametrize("windowfn", [FixedWindows(100), Sessions(10)])
def test_bounded_dead_letters_are_each_in_their_elements_window_with_its_timestamp(windowfn):
    """Issue 21, 4: refused by the server (a 400, merged and full batches alike) or never encodable."""
    rows = [TimestampedValue({"id": i}, i * 1.5) for i in range(300)]
    rows.append(TimestampedValue({"id": 999, "bad": complex(1, 2)}, 7.0))
    with ScriptedServer() as server:
        server.script = [(400, {"Content-Type": "application/json"}, b'{"error":"bad"}')] * 1000
        p = beam.Pipeline(runner=FnApiRunner())
        # One shard: the sink's GroupByKey then merges every session as Beam would for one key (with
        # more shards, each shard merges the windows of the rows it holds: a session may be split).
        result = (p | beam.Create(rows) | beam.WindowInto(windowfn)
                  | _sink(server.url, max_batch_bytes=200, num_shards=1))
        expected = collections.defaultdict(list)
        for row in rows[:-1]:
            (window,) = _window_of(windowfn, rows[:-1], row.timestamp)
            expected[window].append((row.value["id"], "rejected", float(row.timestamp)))
        (window,) = _window_of(windowfn, [rows[-1]], rows[-1].timestamp)
        expected[window].append((None, "unencodable", 7.0))
        assert_that(_letters_by_window(result.dead_letters), equal_to_per_window(expected),
                    use_global_window=False)
        p.run().wait_until_finish()


def test_a_dead_letter_has_its_own_rows_timestamp_when_its_line_repeats_in_the_batch(tmp_path):
    """The same row twice (t=10 and t=30), each too large for the server alone: the 413 splits the
    batch down to each, and each dead letter is at its own row's timestamp, not the first copy's."""
    from tinybird_emulator import LocalServer

    big = {"id": 7, "pad": "x" * 1500}
    rows = [TimestampedValue(big, 10), TimestampedValue({"id": 1}, 20), TimestampedValue(dict(big), 30),
            TimestampedValue({"id": 2}, 40)]
    with LocalServer(data_dir=tmp_path, token=TOKEN, rate_limit_rps=None, max_body_bytes=1000) as server:
        p = beam.Pipeline(runner=FnApiRunner())
        result = p | beam.Create(rows, reshuffle=False) | _sink(server.url, num_shards=1)
        assert_that(_letters_by_window(result.dead_letters),
                    equal_to([(7, "payload_too_large", 10.0), (7, "payload_too_large", 30.0)]))
        p.run().wait_until_finish()
        server.flush()
        assert server.query("SELECT id FROM events ORDER BY id") == [{"id": 1}, {"id": 2}]


def test_each_line_of_a_failed_part_gets_the_timestamp_of_its_row_in_the_batch():
    import array

    from sinks.tinybird._events_api import Failed
    from sinks.tinybird._transform import _PostDoFn
    from sinks.tinybird.dead_letters import DeadLetterKind

    a, b = b'{"id":1}', b'{"id":2}'
    stamps = array.array("q", [10_000_000, 20_000_000, 30_000_000, 40_000_000]).tobytes()
    batch = Batch("global", a + b"\n" + b + b"\n" + a + b"\n" + b + b"\n", 4, b"", stamps, "events")
    # The last two rows failed (a split's second half): the same lines as the first two.
    failed = Failed(payload=a + b"\n" + b + b"\n", rows=2, kind=DeadLetterKind.RETRIES_EXHAUSTED, status=503,
                    message="HTTP 503", attempts=6, first_attempt_at=0.0, last_attempt_at=1.0, first_row=2)
    outputs = list(_PostDoFn._dead_letters(object.__new__(_PostDoFn), failed, batch))
    assert [(out.value.value[0].line, out.value.timestamp) for out in outputs] == [
        ('{"id":1}', Timestamp(30)), ('{"id":2}', Timestamp(40))]


def _window_of(windowfn, rows, timestamp: Timestamp):
    """The window an element is in after Beam would merge (sessions: over every row)."""
    if isinstance(windowfn, FixedWindows):
        start = int(timestamp) // 100 * 100
        return (IntervalWindow(start, start + 100),)
    # Rows 1.5 s apart with a 10 s gap: one session of them all; the lone bad row its own.
    stamps = sorted(float(r.timestamp) for r in rows)
    return (IntervalWindow(stamps[0], stamps[-1] + 10),)


def test_streaming_dead_letters_keep_their_window_and_timestamp_and_files_a_usable_timestamp(tmp_path):
    with ScriptedServer() as server:
        server.script = [(403, {"Content-Type": "application/json"}, b'{"error":"no"}')] * 100
        stream = (TestStream().advance_watermark_to(0)
                  .add_elements([TimestampedValue({"id": i}, 5 + i) for i in range(3)])
                  .add_elements([TimestampedValue({"id": 10 + i}, 15 + i) for i in range(2)])
                  .add_elements([TimestampedValue({"id": 20, "bad": complex(1, 2)}, 25)])
                  .advance_watermark_to(100).advance_watermark_to_infinity())
        with TestPipeline(options=_streaming()) as p:
            result = (p | stream | beam.WindowInto(FixedWindows(10))
                      | _sink(server.url, num_shards=1, dead_letter_path=str(tmp_path) + "/"))
            assert_that(_letters_by_window(result.dead_letters), equal_to_per_window({
                IntervalWindow(0, 10): [(i, "rejected", 5.0 + i) for i in range(3)],
                IntervalWindow(10, 20): [(10 + i, "rejected", 15.0 + i) for i in range(2)],
                IntervalWindow(20, 30): [(None, "unencodable", 25.0)],
            }), use_global_window=False, label="letters")
            # The files' results are at the newest timestamp of their records (no longer at
            # MIN_TIMESTAMP): a result of dead letters made while their window was open (here the
            # refused row, dead-lettered on arrival) survives a downstream WindowInto and grouping.
            # Those of batches flushed at the window's end are late there, as the dead letters are.
            counted = (result.dead_letter_files | "FilesIntoWindows" >> beam.WindowInto(FixedWindows(10))
                       | "Keyed" >> beam.Map(lambda _: ("files", 1)) | beam.CombinePerKey(sum)
                       | "Key" >> beam.Map(lambda kv: kv[0]))
            assert_that(counted, lambda found: _at_least_one(found), label="files")


def _at_least_one(found) -> None:
    assert found, "every file result was dropped downstream"


# -- raise_on_failure ----------------------------------------------------------------------


def _post_dofn(url: str):
    from sinks.tinybird._events_api import ClientSettings
    from sinks.tinybird._token import TokenSource
    from sinks.tinybird._transform import _PostDoFn

    settings = ClientSettings(api_url=url, datasource="events", wait=False, compression=None,
                              connect_timeout_secs=2, read_timeout_secs=2, max_in_flight=1,
                              ca_bundle_path=None, allow_insecure_http=False)
    dofn = _PostDoFn(settings=settings, token=TokenSource(value=TOKEN, secret_version=None, env_var="X"),
                     retry_policy=RetryPolicy(max_attempts=1), raise_on_failure=True)
    dofn.setup()
    return dofn


def _batch(*ids: int) -> tuple:
    import array

    payload = b"".join(orjson.dumps({"id": i}) + b"\n" for i in ids)
    return ("global", payload, len(ids), b"", array.array("q", [0] * len(ids)).tobytes(), "events")


def _drive(dofn, batches) -> list:
    dofn.start_bundle()
    outputs = []
    try:
        for batch in batches:
            outputs += list(dofn.process(batch, timestamp=Timestamp(0)))
        outputs += list(dofn.finish_bundle())
    finally:
        dofn.teardown()
    return outputs


def test_raise_on_failure_raises_after_the_bundle_and_posts_nothing_more_once_failed():
    with ScriptedServer() as server:
        server.script = [(202, {}, b'{"successful_rows":1,"quarantined_rows":0}'),
                         (403, {"Content-Type": "application/json"}, b'{"error":"no"}')]
        dofn = _post_dofn(server.url)
        with pytest.raises(DeliveryError, match="rejected"):
            _drive(dofn, [_batch(1), _batch(2), _batch(3), _batch(4)])
        # Batch 3 and 4 come after the failure: the bundle's retry posts them, so they are not posted now.
        assert [orjson.loads(b)["id"] for _, _, b in server.requests] == [1, 2]


@pytest.mark.parametrize(("status", "body", "kind"), [
    (422, b'{"error":"partial"}', "partial"),
    (202, b'{"successful_rows":1,"quarantined_rows":0}', "rows_unaccounted"),
])
def test_raise_on_failure_dead_letters_what_must_not_be_sent_again(status, body, kind):
    with ScriptedServer() as server:
        server.script = [(status, {"Content-Type": "application/json"}, body)]
        dofn = _post_dofn(server.url)
        outputs = _drive(dofn, [_batch(1, 2), _batch(3)])
        letters = [out.value.value[0] for out in outputs]
        assert [(orjson.loads(letter.line)["id"], letter.kind) for letter in letters] == [(1, kind), (2, kind)]
        assert len(server.requests) == 2


def _streaming() -> PipelineOptions:
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    return options


def test_windowing_of_the_dead_letters_is_the_inputs():
    p = beam.Pipeline()
    rows = p | beam.Create([{"id": 1}]) | beam.WindowInto(Sessions(10))
    result = rows | WriteToTinybird(datasource="d", token="t", api_url="http://127.0.0.1:9")
    assert isinstance(result.dead_letters.windowing, Windowing)
    assert result.dead_letters.windowing.windowfn == Sessions(10)
    assert equal_to([1])([1]) is None


# -- timestamps past what Python's datetime holds -------------------------------------


def test_elements_at_beams_minimum_timestamp_in_fixed_windows_are_delivered_and_dead_lettered():
    """beam.Create's elements sit at Beam's minimum timestamp (year -290,000): a window there has no
    RFC 3339 text. The batch leaving the bundle and the dead letters both name the window, and the
    bundle failed (no request, no dead letter) before window_text fell back to microseconds."""
    with ScriptedServer() as server:
        p = beam.Pipeline(runner=FnApiRunner())
        result = (p | beam.Create([{"id": i} for i in range(3)] + [{"id": 3, "bad": float("nan"), "x": object()}])
                  | beam.WindowInto(FixedWindows(60)) | _sink(server.url))
        windows = result.dead_letters | beam.Map(lambda d: (d.kind, d.window))
        assert_that(windows, equal_to([("unencodable", "[-9223372036860000000us, -9223372036800000000us)")]))
        p.run().wait_until_finish()
        assert _posted_ids(server) == collections.Counter(range(3))


def test_a_streamed_element_with_a_timestamp_in_the_year_55000_is_delivered():
    """A producer's time in microseconds read as milliseconds: inside Beam's range, past datetime's."""
    far = Timestamp(micros=1_700_000_000_000_000_000)
    with ScriptedServer() as server:
        stream = (TestStream().advance_watermark_to(0)
                  .add_elements([TimestampedValue({"id": 1}, 10), TimestampedValue({"id": 2}, far)])
                  .advance_watermark_to(1000).advance_watermark_to_infinity())
        with TestPipeline(options=_streaming()) as p:
            _ = p | stream | beam.WindowInto(FixedWindows(60)) | _sink(server.url, max_buffering_secs=3600)
        assert _posted_ids(server) == collections.Counter([1, 2])


def test_window_text_never_raises():
    from sinks.tinybird.dead_letters import window_text

    assert window_text(IntervalWindow(Timestamp(0), Timestamp(60))) == "[1970-01-01T00:00:00Z, 1970-01-01T00:01:00Z)"
    assert window_text(IntervalWindow(MIN_TIMESTAMP, MIN_TIMESTAMP + 60)) == (
        f"[{MIN_TIMESTAMP.micros}us, {(MIN_TIMESTAMP + 60).micros}us)")
    assert window_text(IntervalWindow(MAX_TIMESTAMP - 60, MAX_TIMESTAMP)).endswith(f"{MAX_TIMESTAMP.micros}us)")
