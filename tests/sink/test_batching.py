"""The batch cutter: limits, order, and every line in exactly one batch."""

from __future__ import annotations

import orjson
import pytest
from apache_beam.transforms.core import Windowing
from apache_beam.transforms.window import FixedWindows, GlobalWindow, GlobalWindows
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.tinybird._batching import BatchLimits, Chunk, _refused_element, cut_batches
from sinks.tinybird.dead_letters import window_text


def _c(payload: bytes, rows: int) -> Chunk:
    """A chunk whose lines all have timestamp 0."""
    return Chunk(payload, rows, bytes(8 * rows))


def _chunk(*lines: bytes) -> Chunk:
    return _c(b"".join(line + b"\n" for line in lines), len(lines))


def test_remainder_is_kept_when_no_limit_is_reached():
    batches, rest = cut_batches([_chunk(b"aaa", b"bbb")], max_bytes=9, max_rows=10, flush=False)
    assert batches == []
    assert rest == _c(b"aaa\nbbb\n", 2)


@pytest.mark.parametrize(
    ("max_bytes", "expected_batches", "expected_rest"),
    [
        # limit - 1: the second line does not fit in the first batch.
        (7, [_c(b"aaa\n", 1)], _c(b"bbb\n", 1)),
        # limit: both lines make exactly one full batch.
        (8, [_c(b"aaa\nbbb\n", 2)], None),
        # limit + 1: not full yet.
        (9, [], _c(b"aaa\nbbb\n", 2)),
    ],
)
def test_byte_limit_at_its_edges(max_bytes, expected_batches, expected_rest):
    batches, rest = cut_batches([_chunk(b"aaa"), _chunk(b"bbb")], max_bytes=max_bytes, max_rows=100, flush=False)
    assert batches == expected_batches
    assert rest == expected_rest


def test_row_limit_cuts_on_the_nth_line():
    batches, rest = cut_batches([_chunk(b"a", b"b", b"c", b"d", b"e")], max_bytes=1000, max_rows=2, flush=False)
    assert batches == [_c(b"a\nb\n", 2), _c(b"c\nd\n", 2)]
    assert rest == _c(b"e\n", 1)


def test_flush_returns_the_remainder_as_the_last_batch():
    batches, rest = cut_batches([_chunk(b"aaa", b"bbb", b"c")], max_bytes=8, max_rows=100, flush=True)
    assert batches == [_c(b"aaa\nbbb\n", 2), _c(b"c\n", 1)]
    assert rest is None


@pytest.mark.parametrize("flush", [False, True])
def test_a_line_longer_than_the_limit_is_a_batch_of_its_own(flush):
    """Only state kept under a larger max_batch_bytes (a streaming pipeline updated in place with a
    smaller one) holds such a line: raising failed every bundle of its key, for ever."""
    batches, rest = cut_batches([_chunk(b"ab", b"abcdefgh", b"c"), _chunk(b"d")], max_bytes=5, max_rows=10, flush=flush)
    assert batches + ([rest] if rest else []) == [_c(b"ab\n", 1), _c(b"abcdefgh\n", 1), _c(b"c\nd\n", 2)]
    assert (rest is None) == flush


def test_limits_are_validated_with_the_bad_value_named():
    with pytest.raises(ValueError, match="max_batch_bytes must be at least 2, got 0"):
        BatchLimits(max_batch_bytes=0, max_batch_rows=1, max_buffering_secs=1, num_shards=1)
    with pytest.raises(ValueError, match="num_shards must be at least 1, got 0"):
        BatchLimits(max_batch_bytes=10, max_batch_rows=1, max_buffering_secs=1, num_shards=0)
    with pytest.raises(ValueError, match="max_buffering_secs must be positive, got -1"):
        BatchLimits(max_batch_bytes=10, max_batch_rows=1, max_buffering_secs=-1, num_shards=1)


_lines = st.lists(st.binary(min_size=0, max_size=30).map(lambda b: b.replace(b"\n", b"_")), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    groups=st.lists(_lines, min_size=1, max_size=6),
    max_bytes=st.integers(min_value=2, max_value=200),
    max_rows=st.integers(min_value=1, max_value=50),
    flush=st.booleans(),
)
def test_every_line_in_exactly_one_batch_in_order_and_within_limits(groups, max_bytes, max_rows, flush):
    chunks = [_chunk(*lines) for lines in groups]
    batches, rest = cut_batches(chunks, max_bytes=max_bytes, max_rows=max_rows, flush=flush)
    outputs = batches + ([rest] if rest is not None else [])
    assert b"".join(c.payload for c in outputs) == b"".join(c.payload for c in chunks)
    for batch in outputs:
        assert len(batch.payload) <= max_bytes or batch.rows == 1  # a line over the limit: alone
        assert 1 <= batch.rows <= max_rows
        assert batch.payload.count(b"\n") == batch.rows
        assert batch.payload.endswith(b"\n")
    if flush:
        assert rest is None
    else:
        # Whatever is kept back fills neither limit.
        assert rest is None or (len(rest.payload) < max_bytes and rest.rows < max_rows)
    # Every batch but the last is full: the next line would not have fitted.
    payload = b"".join(c.payload for c in outputs)
    offset = 0
    for batch in batches[:-1] if flush else batches:
        offset += len(batch.payload)
        if offset == len(payload):
            assert batch.rows == max_rows or len(batch.payload) >= max_bytes
        else:
            next_line_end = payload.find(b"\n", offset) + 1
            assert batch.rows == max_rows or len(batch.payload) + (next_line_end - offset) > max_bytes


def _run_bundle(dofn, elements):
    """Drives a DoFn through one bundle, as a runner would; returns its outputs."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue

    dofn.start_bundle()
    outputs = []
    for element in elements:
        outputs.extend(dofn.process(element, wv=WindowedValue(element, Timestamp(0), (GlobalWindow(),))) or ())
    outputs.extend(dofn.finish_bundle())
    return outputs


@settings(max_examples=30, deadline=None)
@given(
    bundle_sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=60),
    num_shards=st.integers(min_value=1, max_value=8),
    global_variant=st.booleans(),
)
def test_bounded_batches_are_full_whatever_the_bundle_size(bundle_sizes, num_shards, global_variant):
    """Small bundles (Flink batch, Dataflow streaming) still give full batches."""
    import collections

    from sinks.tinybird._batching import Batch, _EncodeAndBatchDoFn, _EncodeAndBatchGlobalDoFn, _MergeRemaindersDoFn

    limits = BatchLimits(max_batch_bytes=4096, max_batch_rows=10_000, max_buffering_secs=5, num_shards=num_shards)
    encoder_class = _EncodeAndBatchGlobalDoFn if global_variant else _EncodeAndBatchDoFn
    encoder = encoder_class(datasource="events", limits=limits, windowing=Windowing(GlobalWindows()))
    encoder.setup()
    batches, groups, next_id = [], collections.defaultdict(list), 0
    for size in bundle_sizes:
        events = [{"id": next_id + i, "pad": "p" * ((next_id + i) % 50)} for i in range(size)]
        next_id += size
        for output in _run_bundle(encoder, events):
            value = getattr(output, "value", output)        # TaggedOutput, WindowedValue
            value = getattr(value, "value", value)           # TimestampedValue
            if isinstance(value, Batch):
                batches.append(value)
            else:
                key, chunk = value
                groups[key].append(chunk)
    merger = _MergeRemaindersDoFn(limits=limits)
    for key, chunks in groups.items():
        batches.extend(merger.process((key, chunks)))
    ids = [orjson.loads(line)["id"] for batch in batches for line in batch.payload.splitlines()]
    assert sorted(ids) == list(range(next_id))
    assert all(len(b.payload) <= limits.max_batch_bytes for b in batches)
    total = sum(len(b.payload) for b in batches)
    # At most one partial batch per shard (lines are < 100 bytes: a full batch is within 100 of the limit).
    partial = [b for b in batches if len(b.payload) < limits.max_batch_bytes - 100]
    assert len(groups) <= num_shards and len(partial) <= len(groups)
    if total >= 20 * limits.max_batch_bytes * num_shards:
        assert total / len(batches) >= 0.9 * limits.max_batch_bytes


def test_an_element_in_two_windows_goes_into_each_windows_batch_once():
    """Sliding windows: Beam calls once per window; the element goes in each window's batch, counted once."""
    from apache_beam.transforms.window import GlobalWindow, IntervalWindow, SlidingWindows
    from apache_beam.utils.timestamp import Timestamp

    from sinks.tinybird._batching import WindowKey, _EncodeAndBatchPerWindowDoFn, timestamps_of

    limits = BatchLimits(max_batch_bytes=1024, max_batch_rows=100, max_buffering_secs=5, num_shards=1)
    windowing = Windowing(SlidingWindows(10, 5))
    encoder = _EncodeAndBatchPerWindowDoFn(datasource="events", limits=limits, windowing=windowing)
    encoder.setup()
    encoder.start_bundle()
    first, second = IntervalWindow(0, 10), IntervalWindow(5, 15)
    # The runner calls once per window (the latest first), with the same element.
    # process returns None when nothing leaves.
    outputs = list(encoder.process({"id": 1}, window=second, timestamp=Timestamp(7)) or ())
    outputs += encoder.process({"id": 1}, window=first, timestamp=Timestamp(7)) or ()
    # Its window (-5, 5) is not in this bundle's test: only the call for its latest window counts it.
    outputs += encoder.process({"id": 2}, window=first, timestamp=Timestamp(3)) or ()
    assert encoder._count == 2
    outputs += encoder.finish_bundle()
    chunks = {WindowKey(*out.value[0]).window: (out.value, out.timestamp, out.windows) for out in outputs}
    assert len(outputs) == 2
    # Emitted into the global window; the window is in the key, as text and encoded.
    (key, chunk), timestamp, windows = chunks[window_text(first)]
    assert (chunk.payload, chunk.rows, list(timestamps_of(chunk.timestamps)), timestamp, windows) == (
        b'{"id":1}\n{"id":2}\n', 2, [7_000_000, 3_000_000], Timestamp(3), (GlobalWindow(),))
    assert windowing.windowfn.get_window_coder().decode(key.window_bytes) == first
    (key, chunk), timestamp, windows = chunks[window_text(second)]
    assert (chunk.payload, chunk.rows, timestamp, windows) == (b'{"id":1}\n', 1, Timestamp(7), (GlobalWindow(),))


def test_an_object_mutated_between_yields_is_sent_as_it_was_at_each_yield():
    """Issue 21: an upstream DoFn that yields one dict mutated between yields, in sliding windows;
    each element is encoded when it arrives, never reused by identity."""
    from apache_beam.transforms.window import IntervalWindow, SlidingWindows
    from apache_beam.utils.timestamp import Timestamp

    from sinks.tinybird._batching import _EncodeAndBatchPerWindowDoFn

    limits = BatchLimits(max_batch_bytes=1024, max_batch_rows=100, max_buffering_secs=5, num_shards=1)
    encoder = _EncodeAndBatchPerWindowDoFn(datasource="events", limits=limits,
                                           windowing=Windowing(SlidingWindows(10, 5)))
    encoder.setup()
    encoder.start_bundle()
    reused = {}
    windows = (IntervalWindow(5, 15), IntervalWindow(0, 10))
    for i in range(3):
        reused["id"] = i
        for window in windows:
            assert encoder.process(reused, window=window, timestamp=Timestamp(7)) is None
    assert encoder._count == 3
    payloads = sorted(out.value[1].payload for out in encoder.finish_bundle())
    assert payloads == [b'{"id":0}\n{"id":1}\n{"id":2}\n'] * 2


def test_the_encoder_is_chosen_by_the_window_function():
    from apache_beam.transforms.window import FixedWindows, GlobalWindows, Sessions, SlidingWindows

    from sinks.tinybird._batching import (
        _EncodeAndBatchDoFn,
        _EncodeAndBatchGlobalDoFn,
        _EncodeAndBatchGlobalRoutedDoFn,
        _EncodeAndBatchPerWindowDoFn,
        encoder_for,
    )

    assert encoder_for(GlobalWindows(), bounded=True) is _EncodeAndBatchGlobalDoFn
    assert encoder_for(GlobalWindows(), bounded=True, routed=True) is _EncodeAndBatchGlobalRoutedDoFn
    assert encoder_for(FixedWindows(10), bounded=True, routed=True) is _EncodeAndBatchDoFn
    assert encoder_for(GlobalWindows(), bounded=False) is _EncodeAndBatchDoFn
    assert encoder_for(FixedWindows(10), bounded=True) is _EncodeAndBatchDoFn
    assert encoder_for(Sessions(10), bounded=False) is _EncodeAndBatchDoFn
    assert encoder_for(SlidingWindows(10, 5), bounded=True) is _EncodeAndBatchPerWindowDoFn

    class Custom(FixedWindows):
        pass

    # A subclass may assign several windows: only the exact classes take the one-window path.
    assert encoder_for(Custom(10), bounded=True) is _EncodeAndBatchPerWindowDoFn


def test_the_one_window_encoder_refuses_an_element_in_two_windows():
    """Beam would repeat each output once per window: failing is better than duplicating rows."""
    from apache_beam.transforms.window import IntervalWindow

    from sinks.tinybird._batching import _EncodeAndBatchDoFn

    limits = BatchLimits(max_batch_bytes=1024, max_batch_rows=100, max_buffering_secs=5, num_shards=1)
    encoder = _EncodeAndBatchDoFn(datasource="events", limits=limits, windowing=Windowing(FixedWindows(10)))
    encoder.setup()
    encoder.start_bundle()
    with pytest.raises(ValueError, match="takes elements in one window, got 2"):
        encoder.process({"id": 1}, wv=_windowed({"id": 1}, 7, IntervalWindow(0, 10), IntervalWindow(5, 15)))


def _windowed(element, timestamp, *windows):
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue

    return WindowedValue(element, Timestamp(timestamp), windows)


@pytest.mark.parametrize("full_to_merge", [False, True])
def test_a_full_buffer_leaves_in_the_global_window_as_a_batch_or_for_the_merge(full_to_merge):
    """Bounded input posts full batches at once; unbounded input sends them to the merge step."""
    from apache_beam.pvalue import TaggedOutput
    from apache_beam.transforms.window import GlobalWindow, IntervalWindow
    from apache_beam.utils.timestamp import Timestamp

    from sinks.tinybird._batching import FULL_TAG, Batch, Chunk, WindowKey, _EncodeAndBatchDoFn

    window = IntervalWindow(0, 10)
    # Each line is 9 bytes with its newline: two fill a batch of 18 bytes.
    limits = BatchLimits(max_batch_bytes=18, max_batch_rows=100, max_buffering_secs=5, num_shards=3)
    encoder = _EncodeAndBatchDoFn(datasource="events", limits=limits, windowing=Windowing(FixedWindows(10)),
                                  full_to_merge=full_to_merge)
    encoder.setup()
    encoder.start_bundle()
    outputs = []
    for i, timestamp in enumerate((5, 3, 4)):
        outputs += encoder.process({"id": i}, wv=_windowed({"id": i}, timestamp, window)) or ()
    assert len(outputs) == 1
    full = outputs[0]
    if full_to_merge:
        key, chunk = full.value
        assert (WindowKey(*key).window, WindowKey(*key).window_max_micros) == (
            window_text(window), window.max_timestamp().micros)
        # With the line that did not fit: over the limit, so that the merge step cuts the batch at once.
        assert chunk == (b'{"id":0}\n{"id":1}\n{"id":2}\n', 3, _stamps(5, 3, 4))
        assert cut_batches([Chunk(*chunk)], max_bytes=18, max_rows=100, flush=False) == (
            [Chunk(b'{"id":0}\n{"id":1}\n', 2, _stamps(5, 3))], Chunk(b'{"id":2}\n', 1, _stamps(4)))
        assert (full.timestamp, full.windows) == (Timestamp(3), (GlobalWindow(),))
        assert list(encoder.finish_bundle()) == []
        return
    assert isinstance(full, TaggedOutput) and full.tag == FULL_TAG
    full = full.value
    assert full.value == Batch(window_text(window), b'{"id":0}\n{"id":1}\n', 2,
                               FixedWindows(10).get_window_coder().encode(window), _stamps(5, 3), "events")
    assert (full.timestamp, full.windows) == (Timestamp(3), (GlobalWindow(),))
    (rest,) = list(encoder.finish_bundle())
    assert rest.value[1] == Chunk(b'{"id":2}\n', 1, _stamps(4)) and rest.windows == (GlobalWindow(),)


def _stamps(*secs: int) -> bytes:
    import array

    return array.array("q", [s * 1_000_000 for s in secs]).tobytes()


def test_an_unencodable_element_in_two_windows_is_one_dead_letter_per_window_in_the_global_window():
    from apache_beam.pvalue import TaggedOutput
    from apache_beam.transforms.window import GlobalWindow, IntervalWindow, SlidingWindows
    from apache_beam.utils.timestamp import Timestamp

    from sinks.tinybird._batching import DEAD_LETTERS_TAG, _EncodeAndBatchPerWindowDoFn

    limits = BatchLimits(max_batch_bytes=1024, max_batch_rows=100, max_buffering_secs=5, num_shards=1)
    coder = SlidingWindows(10, 5).get_window_coder()
    encoder = _EncodeAndBatchPerWindowDoFn(datasource="events", limits=limits,
                                           windowing=Windowing(SlidingWindows(10, 5)))
    encoder.setup()
    encoder.start_bundle()
    first, second = IntervalWindow(0, 10), IntervalWindow(5, 15)
    bad = {"bad": object()}
    outputs = [out for window in (first, second) for out in encoder.process(bad, window=window, timestamp=Timestamp(7))]
    assert all(isinstance(out, TaggedOutput) and out.tag == DEAD_LETTERS_TAG for out in outputs)
    # Each in the global window at the element's timestamp, its window as text and encoded (restored later).
    assert [(out.value.value[0].window, out.value.value[0].kind, coder.decode(out.value.value[1]),
             out.value.timestamp, out.value.windows) for out in outputs] == [
        (window_text(first), "unencodable", first, Timestamp(7), (GlobalWindow(),)),
        (window_text(second), "unencodable", second, Timestamp(7), (GlobalWindow(),))]
    assert encoder._count == 1
    assert list(encoder.finish_bundle()) == []


_MICROS = st.one_of(st.sampled_from([MIN_TIMESTAMP.micros, GlobalWindow().max_timestamp().micros, -1, 0]),
                    st.integers(min_value=MIN_TIMESTAMP.micros, max_value=GlobalWindow().max_timestamp().micros))


@settings(max_examples=200, deadline=None)
@given(
    pads=st.lists(st.tuples(st.one_of(st.integers(min_value=0, max_value=60), st.none()), _MICROS),
                  min_size=1, max_size=80),
    max_bytes=st.integers(min_value=2, max_value=200),
    max_rows=st.integers(min_value=1, max_value=12),
)
def test_the_global_window_fast_path_batches_exactly_as_the_general_path(pads, max_bytes, max_rows):
    """Lines appended straight to the open buffer: same batches, remainders and dead letters, at every
    limit, and every line with its element's timestamp, from MIN_TIMESTAMP to the global window's end."""
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird._batching import _EncodeAndBatchDoFn, _EncodeAndBatchGlobalDoFn, timestamps_of

    # None: an element that cannot be encoded; a pad: a line of 8 + pad bytes (oversize past max_bytes).
    elements = [({"p": "x" * pad} if pad is not None else {"bad": object()}, micros) for pad, micros in pads]
    limits = BatchLimits(max_batch_bytes=max_bytes, max_batch_rows=max_rows, max_buffering_secs=5, num_shards=1)

    def run(dofn):
        dofn.setup()
        dofn.start_bundle()
        dofn._buffers._shard = 0
        outputs = [out for element, micros in elements
                   for out in (dofn.process(element, wv=WindowedValue(element, Timestamp(micros=micros),
                                                                      (GlobalWindow(),))) or ())]
        outputs += dofn.finish_bundle()
        shown = []
        for out in outputs:
            tag = getattr(out, "tag", None)
            value = getattr(out, "value", out)
            value = getattr(value, "value", value)
            if tag == "dead_letters":
                letter = value[0]
                shown.append((tag, letter.kind, letter.line, letter.window))
            else:
                shown.append((tag, value))
        return shown

    windowing = Windowing(GlobalWindows())
    fast = run(_EncodeAndBatchGlobalDoFn(datasource="d", limits=limits, windowing=windowing))
    general = run(_EncodeAndBatchDoFn(datasource="d", limits=limits, windowing=windowing))
    assert fast == general
    refused = [pad is None or len(b'{"p":""}') + pad + 1 > max_bytes for pad, _ in pads]
    assert sum(1 for out in fast if out[0] == "dead_letters") == sum(refused)
    # Batches (FULL_TAG) and chunks ((key, chunk)) in the order they left: their lines' timestamps
    # are the sent elements' own, in order (one data source, one window, so one buffer at a time).
    stamps = []
    for tag, value, *_ in fast:
        if tag != "dead_letters":
            stamps += timestamps_of(value[4] if tag == "full" else value[1][2])
    assert stamps == [micros for (_, micros), bad in zip(pads, refused, strict=True) if not bad]


def test_a_refused_elements_text_is_kept_whole_within_its_bound():
    """Text that is not JSON is kept whole in its dead letter (a repr ast.literal_eval reads back) up
    to max_bytes characters and a repr four times that; past either, cut to 500 characters."""
    assert _refused_element("x" * 100, 100) == repr("x" * 100)
    assert _refused_element(b"\xff" * 100, 100) == repr(b"\xff" * 100)  # 402 characters: kept
    assert _refused_element(bytearray(b"{" * 100), 100) == repr(b"{" * 100)
    assert _refused_element(memoryview(b"{" * 100), 100) == repr(b"{" * 100)
    for too_long in ("x" * 1000, b"x" * 1000, "\U000e0000" * 100):  # the last: a repr of 1,002 characters
        shown = _refused_element(too_long, 100)
        assert len(shown) <= 500 and shown.endswith(("chars]", "bytes]")), shown
    assert len(_refused_element({"deep": "x" * 1000}, 10_000)) <= 500  # not text: cut whatever the bound
