"""Batching: NDJSON lines into size-bounded requests, per window, across bundles.

Per-element work stays stateless and cheap (stateful work per element is about
ten times slower on the DirectRunner, see REFERENCE.md s.3):

1. :class:`_EncodeAndBatchDoFn` encodes each element once and appends its line
   to a per-window buffer inside the bundle. For bounded input a buffer that
   fills leaves at once as a full :class:`Batch`: with large bundles (batch
   runners) most data is posted without any shuffle, so memory does not grow
   with the input. What is left at the end of the bundle leaves as a *chunk*
   keyed by shard and window (for unbounded input, whose bundles are small, a
   full buffer leaves that way too, see below).
2. Chunks from every bundle are merged into full batches, cut at line
   boundaries: for bounded input by a ``GroupByKey`` and
   :class:`_MergeRemaindersDoFn` (no timers, which batch runners support
   unevenly); for unbounded input by the stateful :class:`_BatchDoFn`, which
   sends a batch as soon as it is full, at the end of its window, and once its
   oldest chunk has waited ``max_buffering_secs``.

The encoder emits everything (batches, chunks, dead letters) straight into the
global window, each keeping its own window as text (and, for chunks, in the
key): batches never mix windows, a runner never drops late data at the
stateful step for an expired window (late rows are sent, not lost), and no
``WindowInto`` step is needed; :class:`IntoGlobalWindow` declares it.
Streaming runners pay for every step on every bundle, however small: for
unbounded input the graph is encode, merge, post (one step of each).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.coders import BytesCoder, TupleCoder, VarIntCoder
from apache_beam.transforms import userstate
from apache_beam.transforms.core import Windowing
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.window import FixedWindows, GlobalWindow, GlobalWindows, Sessions
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from sinks.tinybird._encoding import EncodingError, element_repr, encode_element
from sinks.tinybird._metrics import SinkMetrics
from sinks.tinybird.dead_letters import DeadLetter, DeadLetterKind, iso_utc, window_text

DEAD_LETTERS_TAG = "dead_letters"
FULL_TAG = "full"


class Chunk(NamedTuple):
    """``\\n``-terminated NDJSON lines and how many there are."""

    payload: bytes
    rows: int


class WindowKey(NamedTuple):
    """Where a chunk belongs: a shard of one window (deterministically encodable)."""

    shard: int
    window_max_micros: int
    window: str


class Batch(NamedTuple):
    """One request's worth of lines, and the window (as text) they belong to."""

    window: str
    payload: bytes
    rows: int


# The types Beam sees. Keys, chunks and batches travel as plain tuples of these
# types (the NamedTuples above are views taken on arrival): Beam checks hints at
# construction, and how it infers a GroupByKey's output over NamedTuple keys and
# values differs between releases (2.78 gives plain tuples); plain tuples also get
# Beam's cheap deterministic TupleCoder rather than a row or pickle coder.
KEY_HINT = tuple[int, int, str]
CHUNK_HINT = tuple[bytes, int]
KEYED_CHUNK_HINT = tuple[KEY_HINT, CHUNK_HINT]
GROUPED_CHUNKS_HINT = tuple[KEY_HINT, Iterable[CHUNK_HINT]]
BATCH_HINT = tuple[str, bytes, int]

_GLOBAL_WINDOW = GlobalWindow()
_GLOBAL_WINDOWS = (_GLOBAL_WINDOW,)

_CHUNK_CODER = TupleCoder([BytesCoder(), VarIntCoder()])


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """Bounds on one request, and how long a partial batch may wait.

    Attributes:
        max_batch_bytes: Bound on the uncompressed NDJSON of one request.
        max_batch_rows: Bound on the rows of one request.
        max_buffering_secs: For unbounded input, the longest a row waits in a
            partial batch before it is sent anyway.
        num_shards: Keys the batching state is spread over; each shard posts
            on its own, so this bounds the sink's parallelism.
    """

    max_batch_bytes: int
    max_batch_rows: int
    max_buffering_secs: float
    num_shards: int

    def __post_init__(self) -> None:
        if self.max_batch_bytes < 2:
            raise ValueError(f"max_batch_bytes must be at least 2, got {self.max_batch_bytes!r}")
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be at least 1, got {self.max_batch_rows!r}")
        if not self.max_buffering_secs > 0:
            raise ValueError(f"max_buffering_secs must be positive, got {self.max_buffering_secs!r}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {self.num_shards!r}")


def never_sent(
    *, datasource: str, kind: DeadLetterKind, message: str, window: object,
    line: str | None = None, element: str | None = None,
) -> DeadLetter:
    """A dead letter for an element refused before any request."""
    now = iso_utc(time.time())
    return DeadLetter(
        line=line, element=element, datasource=datasource, kind=kind.value,
        status=None, message=message, attempts=0,
        first_attempt_at=now, last_attempt_at=now, window=window_text(window),
    )


class _WindowBuffer:
    """One window's lines in a bundle: one growing ``bytearray``, not a list of lines.

    orjson over-allocates the bytes it returns (about 4 KiB for a 200-byte
    line), so a list of 40,000 lines would hold some 160 MiB for an 8 MiB batch.
    """

    __slots__ = ("data", "min_timestamp_micros", "rows")

    def __init__(self, timestamp_micros: int) -> None:
        self.data = bytearray()
        self.rows = 0
        self.min_timestamp_micros = timestamp_micros


class IntoGlobalWindow(beam.ParDo):
    """A ``ParDo`` whose DoFn emits every output into the global window itself.

    Declaring it (as ``WindowInto`` does) gives the outputs the global window's
    windowing, which a following ``GroupByKey`` or stateful DoFn needs, without
    a ``WindowInto`` step that would only move each element.
    """

    def get_windowing(self, inputs) -> Windowing:
        return Windowing(GlobalWindows())


class _Refusal(NamedTuple):
    """Why an element has no line to send: the fields of its dead letters."""

    kind: DeadLetterKind
    message: str
    line: str | None
    element: str | None


_MIN_MICROS = MIN_TIMESTAMP.micros


def _unencodable(element, error: EncodingError) -> _Refusal:
    return _Refusal(DeadLetterKind.UNENCODABLE, error.reason, None, element_repr(element))


def _oversize(line: bytes, max_bytes: int) -> _Refusal:
    """For a line that does not fit in a batch with its newline."""
    message = f"the encoded row is {len(line) + 1} bytes, over max_batch_bytes={max_bytes}"
    return _Refusal(DeadLetterKind.OVERSIZE, message, line.decode("utf-8"), None)


def _line_or_refusal(element, max_bytes: int) -> bytes | _Refusal:
    try:
        line = encode_element(element)
    except EncodingError as error:
        return _unencodable(element, error)
    return _oversize(line, max_bytes) if len(line) >= max_bytes else line


def _dead_letter(
    refusal: _Refusal, *, datasource: str, window, timestamp: Timestamp | None, metrics: SinkMetrics,
) -> beam.pvalue.TaggedOutput:
    """The dead letter for one window, in the global window (``timestamp`` None: the input's, already global)."""
    metrics.dead_letters(refusal.kind.value, 1)
    letter = never_sent(datasource=datasource, kind=refusal.kind, message=refusal.message,
                        window=window, line=refusal.line, element=refusal.element)
    return beam.pvalue.TaggedOutput(
        DEAD_LETTERS_TAG, letter if timestamp is None else WindowedValue(letter, timestamp, _GLOBAL_WINDOWS))


class _BundleBuffers:
    """One bundle's open buffers, one per window, and the outputs that leave them.

    A buffer leaves as a full :class:`Batch` on ``FULL_TAG`` as soon as the next
    line would not fit or it holds ``max_batch_rows`` (with ``full_to_merge``,
    as a ``(WindowKey, Chunk)`` on the main output instead, with the line that
    did not fit: a chunk over a limit, which the merge step cuts at once); :meth:`drain`
    hands what is left as ``(WindowKey, Chunk)``. Every output is a
    ``WindowedValue`` in the global window, its own window kept as text.
    """

    __slots__ = ("_buffers", "_full_to_merge", "_max_bytes", "_max_rows", "_num_shards", "_shard")

    def __init__(self, limits: BatchLimits, *, full_to_merge: bool) -> None:
        self._max_bytes = limits.max_batch_bytes
        self._max_rows = limits.max_batch_rows
        self._num_shards = limits.num_shards
        self._full_to_merge = full_to_merge
        self._buffers: dict[Any, _WindowBuffer] = {}
        self._shard = random.randrange(limits.num_shards)

    def get(self, window) -> _WindowBuffer | None:
        """The window's open buffer, if any (appending a line that fits is the caller's right)."""
        return self._buffers.get(window)

    def add(self, window, line: bytes, timestamp_micros: int) -> beam.pvalue.TaggedOutput | WindowedValue | None:
        """Adds a line (that fits in a batch) to its window's buffer; returns a full batch when one leaves."""
        buffer = self._buffers.get(window)
        full = None
        if buffer is None:
            buffer = self._buffers[window] = _WindowBuffer(timestamp_micros)
        elif len(buffer.data) + len(line) + 1 > self._max_bytes:
            if self._full_to_merge:
                # Sent with the line that does not fit: the merge step sees a
                # chunk over the limit and cuts the full batch at once.
                self._append(buffer, line, timestamp_micros)
                del self._buffers[window]
                return self._chunk(window, buffer)
            # Checked before adding, so that no batch is over the limit.
            full = self._full(window, buffer)
            buffer = self._buffers[window] = _WindowBuffer(timestamp_micros)
        elif timestamp_micros < buffer.min_timestamp_micros:
            buffer.min_timestamp_micros = timestamp_micros
        data = buffer.data
        data += line
        data += b"\n"
        buffer.rows += 1
        if buffer.rows >= self._max_rows:
            # Then ``full`` is None: a buffer that was kept holds fewer rows than
            # the limit, and a new one holds a single row.
            del self._buffers[window]
            return self._full(window, buffer)
        return full

    @staticmethod
    def _append(buffer: _WindowBuffer, line: bytes, timestamp_micros: int) -> None:
        buffer.data += line
        buffer.data += b"\n"
        buffer.rows += 1
        if timestamp_micros < buffer.min_timestamp_micros:
            buffer.min_timestamp_micros = timestamp_micros

    def drain(self) -> Iterator[WindowedValue]:
        buffers, self._buffers = self._buffers, {}
        for window, buffer in buffers.items():
            yield self._chunk(window, buffer)

    def _full(self, window, buffer: _WindowBuffer) -> beam.pvalue.TaggedOutput | WindowedValue:
        if self._full_to_merge:
            return self._chunk(window, buffer)
        batch = Batch(window_text(window), bytes(buffer.data), buffer.rows)
        timestamp = Timestamp(micros=buffer.min_timestamp_micros)
        return beam.pvalue.TaggedOutput(FULL_TAG, WindowedValue(batch, timestamp, _GLOBAL_WINDOWS))

    def _chunk(self, window, buffer: _WindowBuffer) -> WindowedValue:
        """The buffer as ``(WindowKey, Chunk)``, on the next shard, for the merge step."""
        self._shard = (self._shard + 1) % self._num_shards
        key = WindowKey(self._shard, window.max_timestamp().micros, window_text(window))
        chunk = Chunk(bytes(buffer.data), buffer.rows)
        return WindowedValue((key, chunk), Timestamp(micros=buffer.min_timestamp_micros), _GLOBAL_WINDOWS)


class _EncodeAndBatchDoFn(beam.DoFn):
    """Encodes elements to NDJSON lines and batches them inside the bundle.

    For input whose elements are each in one window (global, fixed, session
    windows: see :func:`encoder_for`). Lines go to the bundle's
    :class:`_BundleBuffers`: full batches leave as soon as they fill, what is
    left at ``finish_bundle``, all in the global window (apply the DoFn with
    :class:`IntoGlobalWindow`). :class:`DeadLetter` records go to
    ``DEAD_LETTERS_TAG``, one per window, for elements that cannot be encoded
    or whose line alone is larger than ``max_batch_bytes``.

    ``process`` takes the whole ``WindowedValue``: Beam calls a method that asks
    for the window and the timestamp as separate parameters through a path about
    three times slower per element. It returns a list of outputs, or nothing
    (most elements): cheaper for Beam than a generator. The helpers live
    outside the DoFn: the DirectRunner inspects the signature of every method
    of a DoFn on every bundle.

    Args:
        full_to_merge: Send full buffers to the merge step with the remainders
            rather than on ``FULL_TAG``. For unbounded input: its bundles are
            small, so a buffer rarely fills inside one, and a posting step of
            their own would run on every bundle for (nearly) nothing.
    """

    def __init__(self, *, datasource: str, limits: BatchLimits, full_to_merge: bool = False) -> None:
        self._datasource = datasource
        self._limits = limits
        self._full_to_merge = full_to_merge

    def setup(self) -> None:
        self._metrics = SinkMetrics()
        self._max_bytes = self._limits.max_batch_bytes
        self._max_rows = self._limits.max_batch_rows

    def start_bundle(self) -> None:
        self._buffers = _BundleBuffers(self._limits, full_to_merge=self._full_to_merge)
        self._count = 0

    def process(self, element, wv=beam.DoFn.WindowedValueParam):
        windows = wv.windows
        if len(windows) != 1:
            # Beam would emit each output of this call once per window of the input.
            raise ValueError(f"{type(self).__name__} takes elements in one window, got {len(windows)}")
        self._count += 1
        line = _line_or_refusal(element, self._max_bytes)
        if isinstance(line, _Refusal):
            return [_dead_letter(line, datasource=self._datasource, window=windows[0], timestamp=wv.timestamp,
                                 metrics=self._metrics)]
        full = self._buffers.add(windows[0], line, wv.timestamp_micros)
        return None if full is None else [full]

    def finish_bundle(self) -> Iterator[WindowedValue]:
        self._metrics.inc("elements_in", self._count)
        yield from self._buffers.drain()


class _EncodeAndBatchGlobalDoFn(_EncodeAndBatchDoFn):
    """:class:`_EncodeAndBatchDoFn` for bounded input in the global window.

    ``process`` takes the element alone, Beam's cheapest call (about a third of
    the cost of the ``WindowedValue``): every element is in the one window, and
    its timestamp is not needed, as nothing downstream waits on a watermark.
    A line that fits in the open buffer is appended right there (most lines),
    without the general path's look-up of the window's buffer.
    """

    def start_bundle(self) -> None:
        super().start_bundle()
        self._open: _WindowBuffer | None = None

    # Beam passes what the signature asks for: here the element alone.
    def process(self, element):  # type: ignore[override]
        self._count += 1
        try:
            line = encode_element(element)
        except EncodingError as error:
            # The input is in the global window already: the output inherits it.
            return [_dead_letter(_unencodable(element, error), datasource=self._datasource, window=_GLOBAL_WINDOW,
                                 timestamp=None, metrics=self._metrics)]
        buffer = self._open
        if buffer is not None and len(buffer.data) + len(line) < self._max_bytes and buffer.rows + 1 < self._max_rows:
            data = buffer.data
            data += line
            data += b"\n"
            buffer.rows += 1
            # A bare return: Beam warns, at construction, about a process that says "return None".
            return
        if len(line) >= self._max_bytes:
            return [_dead_letter(_oversize(line, self._max_bytes), datasource=self._datasource,
                                 window=_GLOBAL_WINDOW, timestamp=None, metrics=self._metrics)]
        full = self._buffers.add(_GLOBAL_WINDOW, line, _MIN_MICROS)
        self._open = self._buffers.get(_GLOBAL_WINDOW)
        return None if full is None else [full]


class _EncodeAndBatchPerWindowDoFn(_EncodeAndBatchDoFn):
    """:class:`_EncodeAndBatchDoFn` for windowing that may put an element in several windows (sliding windows).

    Beam emits whatever one call of ``process`` yields once per window of its
    input, so this ``process`` asks for the window: the runner then calls it
    once per window (the slower path, for this windowing only). The calls for
    one element come in a row with the same object: it is encoded and counted
    once.
    """

    def start_bundle(self) -> None:
        super().start_bundle()
        self._last: tuple[object, bytes | _Refusal] | None = None

    # Beam passes what the signature asks for: here the window and timestamp, one window a call.
    def process(self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        last = self._last
        if last is not None and last[0] is element:
            line = last[1]
        else:
            self._count += 1
            line = _line_or_refusal(element, self._max_bytes)
            self._last = (element, line)
        if isinstance(line, _Refusal):
            return [_dead_letter(line, datasource=self._datasource, window=window, timestamp=timestamp,
                                 metrics=self._metrics)]
        full = self._buffers.add(window, line, timestamp.micros)
        return None if full is None else [full]


# Window functions that put every element in exactly one window.
_ONE_WINDOW_FNS = (GlobalWindows, FixedWindows, Sessions)


def encoder_for(windowfn, *, bounded: bool) -> type[_EncodeAndBatchDoFn]:
    """The encoder for input windowed by ``windowfn``: the cheapest call that stays exact."""
    if bounded and type(windowfn) is GlobalWindows:
        return _EncodeAndBatchGlobalDoFn
    if type(windowfn) in _ONE_WINDOW_FNS:
        return _EncodeAndBatchDoFn
    return _EncodeAndBatchPerWindowDoFn


def cut_batches(
    chunks: Iterable[Chunk], *, max_bytes: int, max_rows: int, flush: bool,
) -> tuple[list[Chunk], Chunk | None]:
    """Cuts chunks into batches at line boundaries.

    Returns the full batches and, unless ``flush``, the remainder that fills
    neither limit (``None`` when nothing remains). With ``flush`` the remainder
    is returned as the last batch. Every line of the input is in exactly one
    output, in order; no batch is over ``max_bytes`` or ``max_rows``, given
    that no single line (with its newline) is over ``max_bytes``.
    """
    chunks = list(chunks)
    if not chunks:
        return [], None
    data = chunks[0].payload if len(chunks) == 1 else b"".join(c.payload for c in chunks)
    rows_left = sum(c.rows for c in chunks)
    batches: list[Chunk] = []
    start, total = 0, len(data)
    while start < total and (total - start >= max_bytes or rows_left >= max_rows):
        end = data.rfind(b"\n", start, start + max_bytes) + 1
        if end <= start:
            raise ValueError(f"a line at offset {start} is longer than max_bytes={max_bytes}")
        rows = data.count(b"\n", start, end)
        if rows > max_rows:
            end = start
            for _ in range(max_rows):
                end = data.index(b"\n", end) + 1
            rows = max_rows
        batches.append(Chunk(data[start:end], rows))
        rows_left -= rows
        start = end
    if start == total:
        return batches, None
    rest = Chunk(data[start:] if start else data, rows_left)
    if flush:
        batches.append(rest)
        return batches, None
    return batches, rest


class _BatchDoFn(beam.DoFn):
    """Per shard and window, turns chunks into full batches across bundles.

    Emits :class:`Batch` values. A batch leaves as soon as it is full; what is left
    leaves when the watermark passes the end of the window, and, when
    ``buffer_in_processing_time`` (unbounded input), once the oldest buffered
    chunk has waited ``max_buffering_secs``. Timers are overwritten, never
    deleted (deleting is not supported by every runner in batch mode), and a
    timer that finds nothing to do does nothing.
    """

    BUFFER = userstate.BagStateSpec("buffer", _CHUNK_CODER)
    # (bytes, rows) in BUFFER, so that a chunk that does not fill a batch costs no bag read.
    HELD = userstate.ReadModifyWriteStateSpec("held", TupleCoder([VarIntCoder(), VarIntCoder()]))
    WINDOW_END = userstate.TimerSpec("window_end", TimeDomain.WATERMARK)
    STALE = userstate.TimerSpec("stale", TimeDomain.REAL_TIME)

    def __init__(self, *, limits: BatchLimits, buffer_in_processing_time: bool, clock=time.time) -> None:
        self._limits = limits
        self._processing_time = buffer_in_processing_time
        self._clock = clock

    def process(
        self,
        element: KEYED_CHUNK_HINT,
        buffer=beam.DoFn.StateParam(BUFFER),
        held=beam.DoFn.StateParam(HELD),
        window_end=beam.DoFn.TimerParam(WINDOW_END),
        stale=beam.DoFn.TimerParam(STALE),
    ) -> Iterator[Batch]:
        key, chunk = WindowKey(*element[0]), Chunk(*element[1])
        limits = self._limits
        held_bytes, held_rows = held.read() or (0, 0)
        if (held_bytes + len(chunk.payload) < limits.max_batch_bytes
                and held_rows + chunk.rows < limits.max_batch_rows):
            buffer.add(chunk)
            held.write((held_bytes + len(chunk.payload), held_rows + chunk.rows))
            if held_bytes == 0:
                _arm(key, window_end, stale, clock=self._clock,
                     stale_after_secs=self._limits.max_buffering_secs if self._processing_time else None)
            return
        chunks = [Chunk(*c) for c in buffer.read()] if held_bytes else []
        chunks.append(chunk)
        batches, rest = cut_batches(
            chunks, max_bytes=limits.max_batch_bytes, max_rows=limits.max_batch_rows, flush=False)
        buffer.clear()
        if rest is None:
            held.clear()
        else:
            buffer.add(rest)
            held.write((len(rest.payload), rest.rows))
            if held_bytes == 0:
                _arm(key, window_end, stale, clock=self._clock,
                     stale_after_secs=self._limits.max_buffering_secs if self._processing_time else None)
        for batch in batches:
            yield Batch(key.window, *batch)

    @userstate.on_timer(WINDOW_END)
    def on_window_end(
        self,
        key=beam.DoFn.KeyParam,
        buffer=beam.DoFn.StateParam(BUFFER),
        held=beam.DoFn.StateParam(HELD),
    ) -> Iterator[Batch]:
        yield from _flush(key, buffer, held, self._limits)

    @userstate.on_timer(STALE)
    def on_stale(
        self,
        key=beam.DoFn.KeyParam,
        buffer=beam.DoFn.StateParam(BUFFER),
        held=beam.DoFn.StateParam(HELD),
    ) -> Iterator[Batch]:
        yield from _flush(key, buffer, held, self._limits)


def _arm(key: WindowKey, window_end, stale, *, clock, stale_after_secs: float | None) -> None:
    """Called when a shard's buffer goes from empty to not empty (``stale_after_secs`` None: no processing-time flush)."""
    window_end.set(Timestamp(micros=key.window_max_micros))
    if stale_after_secs is not None:
        # Overwritten, never deleted. Set when the buffer stops being empty,
        # so when it fires the oldest buffered row has waited its time
        # (younger rows leave with it: early, never late). A flush that
        # empties the buffer leaves it to fire on nothing, or to be replaced
        # when the next chunk arrives.
        stale.set(Timestamp.of(clock() + stale_after_secs))


def _flush(key, buffer, held, limits: BatchLimits) -> list[Batch]:
    """Everything a shard holds, as batches (a timer that finds nothing does nothing)."""
    if not held.read():
        return []
    chunks, _ = cut_batches(
        (Chunk(*c) for c in buffer.read()), max_bytes=limits.max_batch_bytes,
        max_rows=limits.max_batch_rows, flush=True)
    buffer.clear()
    held.clear()
    return [Batch(WindowKey(*key).window, *chunk) for chunk in chunks]


class _MergeRemaindersDoFn(beam.DoFn):
    """Bounded input: cuts the grouped remainders of one shard and window into batches.

    Follows a ``GroupByKey``, which every batch runner supports without timers;
    the group is read as it streams in, holding about one batch at a time.
    """

    def __init__(self, *, limits: BatchLimits) -> None:
        self._limits = limits

    def process(self, element: GROUPED_CHUNKS_HINT) -> Iterator[Batch]:
        key, chunks = WindowKey(*element[0]), element[1]
        limits = self._limits
        pending: list[Chunk] = []
        pending_bytes = pending_rows = 0
        for raw in chunks:
            chunk = Chunk(*raw)
            pending.append(chunk)
            pending_bytes += len(chunk.payload)
            pending_rows += chunk.rows
            if pending_bytes >= limits.max_batch_bytes or pending_rows >= limits.max_batch_rows:
                batches, rest = cut_batches(
                    pending, max_bytes=limits.max_batch_bytes, max_rows=limits.max_batch_rows, flush=False)
                for batch in batches:
                    yield Batch(key.window, *batch)
                pending = [rest] if rest is not None else []
                pending_bytes = len(rest.payload) if rest is not None else 0
                pending_rows = rest.rows if rest is not None else 0
        batches, _ = cut_batches(
            pending, max_bytes=limits.max_batch_bytes, max_rows=limits.max_batch_rows, flush=True)
        for batch in batches:
            yield Batch(key.window, *batch)
