"""A property test of the bounded sink's batching over window functions, bundles and producers (issue 21).

Random elements (some unencodable), in global, fixed, sliding or session
windows, split into random bundles, produced as fresh dicts or as one dict
mutated between elements (Beam calls a fused consumer at each yield, so the
consumer sees each state in turn), go through the DoFns as a runner calls them:
the encoder per bundle (its per-window call once per window for sliding
windows), a shuffle that groups the chunks by key (and, for sessions, merges
their windows per shard as a ``GroupByKey`` does), then the merge step.

Checked: every element is stored once per window it is in, or dead-lettered
once per window, never both, with its own timestamp; no batch over a limit;
and the requests within a stated bound of the minimum (see
:func:`_request_bound`).
"""

from __future__ import annotations

import collections
import math
import random
import re

import orjson
from apache_beam.transforms.core import Windowing
from apache_beam.transforms.window import FixedWindows, GlobalWindow, GlobalWindows, Sessions, SlidingWindows
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.tinybird._batching import (
    DEAD_LETTERS_TAG,
    FULL_TAG,
    BatchLimits,
    Chunk,
    _EncodeAndBatchPerWindowDoFn,
    _MergeContext,
    _MergeMergedWindowsDoFn,
    _MergeRemaindersDoFn,
    encoder_for,
    timestamps_of,
)
from sinks.tinybird.dead_letters import window_text

_WINDOW_FNS = st.one_of(
    st.just(GlobalWindows()),
    st.integers(1, 40).map(FixedWindows),
    st.tuples(st.integers(1, 40), st.integers(1, 40)).map(lambda sp: SlidingWindows(max(sp), min(sp))),
    st.integers(1, 15).map(Sessions),
)


class _Assign:
    def __init__(self, timestamp: Timestamp) -> None:
        self.timestamp = timestamp


def _elements(draw_ts, draw_pad, draw_bad):
    return [({"id": i, "pad": "p" * pad} if not bad else {"id": i, "bad": complex(1, 2)}, Timestamp(ts))
            for i, (ts, pad, bad) in enumerate(zip(draw_ts, draw_pad, draw_bad, strict=True))]


def _run_encoder(windowfn, limits, elements, bundle_sizes, reused: bool) -> list:
    """Every output of the encoder over ``elements`` cut into bundles, as the sink's bounded path wires it."""
    merging = windowfn.is_merging()
    dofn = encoder_for(windowfn, bounded=True)(datasource="events", limits=limits, windowing=Windowing(windowfn),
                                               full_to_merge=merging, keep_windows=merging)
    dofn.setup()
    outputs: list = []
    shared: dict = {}
    position = 0
    sizes = iter(bundle_sizes)
    while position < len(elements):
        size = next(sizes, len(elements))
        dofn.start_bundle()
        for value, timestamp in elements[position:position + size]:
            if reused:
                # One object mutated between yields: what the encoder is called with is the object as it
                # is at that call, and it is mutated right after.
                shared.clear()
                shared.update(value)
                value = shared
            windows = windowfn.assign(_Assign(timestamp))
            if isinstance(dofn, _EncodeAndBatchPerWindowDoFn):
                for window in windows:
                    outputs += dofn.process(value, window=window, timestamp=timestamp) or ()
            else:
                outputs += dofn.process(value, wv=WindowedValue(value, timestamp, tuple(windows))) or ()
            if reused:
                shared["id"] = -1  # a mutation after the call: must not show in what was sent
        outputs += dofn.finish_bundle()
        position += size
    return outputs


def _shuffle_and_merge(windowfn, limits, chunks: list) -> list[tuple]:
    """The chunks grouped as the sink's GroupByKey groups them, then cut by the merge step."""
    rng = random.Random(len(chunks))
    batches: list[tuple] = []
    if not windowfn.is_merging():
        groups: dict = collections.defaultdict(list)
        for wv in chunks:
            key, chunk = wv.value
            groups[tuple(key)].append(chunk)
        merger = _MergeRemaindersDoFn(limits=limits)
        for key, group in groups.items():
            rng.shuffle(group)
            batches += merger.process((key, group))
        return batches
    # Merging windows: per key (the shard and data source), the windows of the chunks are merged as a GroupByKey does.
    by_shard: dict = collections.defaultdict(list)
    for wv in chunks:
        (window,) = wv.windows
        by_shard[tuple(wv.value[0])].append((window, wv.value[1]))
    merger = _MergeMergedWindowsDoFn(limits=limits, windowing=Windowing(windowfn))
    for key, pieces in by_shard.items():
        context = _MergeContext(list({window for window, _ in pieces}))
        windowfn.merge(context)
        merged_into = {w: result for to_merge, result in context.merges for w in to_merge}
        groups = collections.defaultdict(list)
        for window, chunk in pieces:
            groups[merged_into.get(window, window)].append(chunk)
        for window, group in groups.items():
            rng.shuffle(group)
            batches += [out.value for out in merger.process((key, group), window=window)]
    return batches


def _request_bound(limits: BatchLimits, longest_line: int, window_sizes: dict) -> int:
    """The stated bound: per window (or, for sessions, per window as merged on each shard), the
    full batches a perfect packer of lines up to ``longest_line`` bytes could not avoid, plus one
    partial batch per shard.

    A batch leaves full when its next line does not fit (it holds over ``max_batch_bytes`` minus
    one line) or it has ``max_batch_rows``; what is left is merged per shard and window.
    """
    bound = 0
    for rows, data in window_sizes.values():
        full = data / (limits.max_batch_bytes - longest_line) + rows / limits.max_batch_rows
        bound += math.floor(full) + limits.num_shards
    return bound


@settings(max_examples=60, deadline=None)
@given(
    windowfn=_WINDOW_FNS,
    timestamps=st.lists(st.integers(0, 120), min_size=1, max_size=120),
    data=st.data(),
    max_batch_bytes=st.integers(60, 600),
    max_batch_rows=st.integers(1, 25),
    num_shards=st.integers(1, 3),
    max_windows_per_bundle=st.integers(1, 6),
    reused=st.booleans(),
)
def test_every_element_once_per_window_or_dead_lettered_within_a_bound_of_the_minimum_requests(
        windowfn, timestamps, data, max_batch_bytes, max_batch_rows, num_shards, max_windows_per_bundle, reused):
    n = len(timestamps)
    pads = data.draw(st.lists(st.integers(0, 40), min_size=n, max_size=n), label="pads")
    bad = data.draw(st.lists(st.booleans(), min_size=n, max_size=n).map(
        lambda flags: [f and i % 7 == 0 for i, f in enumerate(flags)]), label="bad")
    bundle_sizes = data.draw(st.lists(st.integers(1, 40), max_size=10), label="bundle_sizes")
    elements = _elements(timestamps, pads, bad)
    limits = BatchLimits(max_batch_bytes=max_batch_bytes, max_batch_rows=max_batch_rows, max_buffering_secs=5,
                         num_shards=num_shards, max_windows_per_bundle=max_windows_per_bundle)
    coder = windowfn.get_window_coder()

    outputs = _run_encoder(windowfn, limits, elements, bundle_sizes, reused)
    full, chunks, letters = [], [], []
    for out in outputs:
        tag = getattr(out, "tag", None)
        if tag == FULL_TAG:
            full.append(out.value.value)
        elif tag == DEAD_LETTERS_TAG:
            letters.append(out.value)
        else:
            assert isinstance(out, WindowedValue) and isinstance(Chunk(*out.value[1]), Chunk)
            chunks.append(out)
    batches = full + _shuffle_and_merge(windowfn, limits, chunks)

    # Where each element went: (id, window) -> [(how, timestamp micros)].
    found: dict = collections.defaultdict(list)
    sizes: dict = collections.defaultdict(lambda: [0, 0])
    for text, payload, rows, window_bytes, stamps, _datasource in batches:
        assert len(payload) <= max_batch_bytes and 1 <= rows <= max_batch_rows
        window = coder.decode(window_bytes)
        assert text == window_text(window)
        lines = payload.splitlines()
        assert len(lines) == rows
        sizes[window][0] += rows
        sizes[window][1] += len(payload)
        for line, stamp in zip(lines, timestamps_of(stamps), strict=True):
            found[(orjson.loads(line)["id"], window)].append(("stored", stamp))
    for wv in letters:
        letter, window_bytes = wv.value
        assert letter.kind == "unencodable"
        # In the global window with their window encoded; for merging windows, in that window (see expand).
        assert wv.windows == ((coder.decode(window_bytes),) if windowfn.is_merging() else (GlobalWindow(),))
        ident = int(re.search(r"'id': (-?\d+)", letter.element).group(1))
        found[(ident, coder.decode(window_bytes))].append(("dead", wv.timestamp.micros))

    expected: dict = {}
    for value, timestamp in elements:
        how = "dead" if "bad" in value else "stored"
        for window in windowfn.assign(_Assign(timestamp)):
            expected[(value["id"], window)] = [(how, timestamp.micros)]
    if windowfn.is_merging():
        # A session comes out as merged: the element's own window is within it.
        regrouped = {}
        for (ident, window), where in found.items():
            (own,) = [w for (i, w) in expected if i == ident]
            assert window.start <= own.start and own.end <= window.end
            regrouped[(ident, own)] = where
        found = regrouped
    assert dict(found) == expected

    longest = max((len(orjson.dumps(v)) + 1 for v, _ in elements if "bad" not in v), default=1)
    assert len(batches) <= _request_bound(limits, longest, sizes)
