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
global window, each keeping its own window as text and encoded (and, for
chunks, in the key), and each line its element's timestamp: batches never mix
windows, a runner never drops late data at the stateful step for an expired
window (late rows are sent, not lost), no ``WindowInto`` step is needed
(:class:`IntoGlobalWindow` declares it), and :class:`_RestoreWindowsDoFn`
puts every dead letter back in its element's window at its timestamp.
Merging windows are merged within the bundle; for bounded input the chunks
then keep their windows and the ``GroupByKey`` merges them across bundles
(:class:`_MergeMergedWindowsDoFn`).
Streaming runners pay for every step on every bundle, however small: for
unbounded input the graph is encode, merge, post (one step of each).
"""

from __future__ import annotations

import array
import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.coders import BytesCoder, TupleCoder, VarIntCoder
from apache_beam.transforms import userstate
from apache_beam.transforms.core import Windowing
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.window import FixedWindows, GlobalWindow, GlobalWindows, Sessions, SlidingWindows, WindowFn
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from sinks.tinybird._encoding import EncodingError, element_repr, encode_element
from sinks.tinybird._metrics import SinkMetrics
from sinks.tinybird._routing import Router, Unroutable, raised
from sinks.tinybird.dead_letters import DeadLetter, DeadLetterKind, iso_utc, line_text, utf8_text, window_text

DEAD_LETTERS_TAG = "dead_letters"
FULL_TAG = "full"


class Chunk(NamedTuple):
    """``\\n``-terminated NDJSON lines, how many there are, and each line's timestamp.

    ``timestamps`` holds one signed 64-bit microsecond timestamp per line
    (``array("q")`` bytes, in line order): a line that is dead-lettered after a
    merge still gets its own element's timestamp.
    """

    payload: bytes
    rows: int
    timestamps: bytes


class WindowKey(NamedTuple):
    """Where a chunk belongs: a shard of one window of one data source (deterministically encodable).

    ``window`` is the window as text (as dead letters show it), ``window_bytes``
    the window encoded with the input's window coder (so a dead letter can be
    put back in its window). For merging windows of bounded input the key holds
    the shard and data source alone (the rest empty) and the chunk travels in
    its window, which the ``GroupByKey`` merges.
    """

    shard: int
    window_max_micros: int
    window: str
    window_bytes: bytes
    datasource: str


class Batch(NamedTuple):
    """One request's worth of lines, their window and data source, and each line's timestamp."""

    window: str
    payload: bytes
    rows: int
    window_bytes: bytes
    timestamps: bytes
    datasource: str


# The types Beam sees. Keys, chunks and batches travel as plain tuples of these
# types (the NamedTuples above are views taken on arrival): Beam checks hints at
# construction, and how it infers a GroupByKey's output over NamedTuple keys and
# values differs between releases (2.78 gives plain tuples); plain tuples also get
# Beam's cheap deterministic TupleCoder rather than a row or pickle coder.
KEY_HINT = tuple[int, int, str, bytes, str]
CHUNK_HINT = tuple[bytes, int, bytes]
KEYED_CHUNK_HINT = tuple[KEY_HINT, CHUNK_HINT]
GROUPED_CHUNKS_HINT = tuple[KEY_HINT, Iterable[CHUNK_HINT]]
BATCH_HINT = tuple[str, bytes, int, bytes, bytes, str]
# A dead letter on its way to the user's windowing: the record and its window,
# encoded with the input's window coder; the element's timestamp is the value's own.
WINDOWED_DEAD_LETTER_HINT = tuple[DeadLetter, bytes]

# The buffers' timestamps: int64, as "l" where a C long is 64 bits (the same bytes as "q",
# which converts every int through _PyLong_AsByteArray: some 400 instructions per line under
# cachegrind, for a timestamp such as MIN_TIMESTAMP's that takes more than one digit).
_MICROS_TYPECODE = "l" if array.array("l").itemsize == 8 else "q"

_GLOBAL_WINDOW = GlobalWindow()
_GLOBAL_WINDOWS = (_GLOBAL_WINDOW,)

_CHUNK_CODER = TupleCoder([BytesCoder(), VarIntCoder(), BytesCoder()])

# The longest max_buffering_secs (about 31 years: "never" in practice). A buffering timer is
# set at now + max_buffering_secs, which must be a Beam timestamp (they end in the year 294,247).
MAX_BUFFERING_SECS = 1e9
# Shards are 0 .. num_shards - 1, in keys that Beam codes as 64-bit integers.
MAX_NUM_SHARDS = 2**63
MAX_BATCH_BYTES = 100_000_000
"""The largest ``max_batch_bytes``: 100 MB, the largest request the Events API takes on any plan
(10 MB on the free plan), measured, as its documentation measures it, on the uncompressed NDJSON.
Past it every full batch would only be refused with a 413 and split."""


def timestamps_of(timestamps: bytes) -> array.array:
    """The per-line microsecond timestamps of a chunk or batch."""
    values = array.array("q")
    values.frombytes(timestamps)
    return values


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """Bounds on one request, how long a partial batch may wait, and open buffers per bundle.

    Attributes:
        max_batch_bytes: Bound on the uncompressed NDJSON of one request, at most
            ``MAX_BATCH_BYTES`` (100 MB, the Events API's limit on paid plans).
        max_batch_rows: Bound on the rows of one request.
        max_buffering_secs: For unbounded input, the longest a row waits in a
            partial batch before it is sent anyway (at most ``MAX_BUFFERING_SECS``).
        num_shards: Keys the batching state is spread over; each shard posts
            on its own, so this bounds the sink's parallelism.
        max_windows_per_bundle: Bound on the windows a bundle keeps a buffer
            open for (as Beam's ``WriteToFiles(max_writers_per_bundle=)``):
            past it, the least recently used buffer leaves for the cross-bundle
            merge, so a bundle's memory does not grow with its windows.
    """

    max_batch_bytes: int
    max_batch_rows: int
    max_buffering_secs: float
    num_shards: int
    max_windows_per_bundle: int = 20

    def __post_init__(self) -> None:
        if self.max_batch_bytes < 2:
            raise ValueError(f"max_batch_bytes must be at least 2, got {self.max_batch_bytes!r}")
        if self.max_batch_bytes > MAX_BATCH_BYTES:
            raise ValueError(
                f"max_batch_bytes must be at most {MAX_BATCH_BYTES} (100 MB: the Events API refuses larger "
                f"requests on every plan, and over 10 MB on the free plan), got {self.max_batch_bytes!r}")
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be at least 1, got {self.max_batch_rows!r}")
        if not self.max_buffering_secs > 0:
            raise ValueError(f"max_buffering_secs must be positive, got {self.max_buffering_secs!r}")
        if self.max_buffering_secs > MAX_BUFFERING_SECS:
            raise ValueError(f"max_buffering_secs must be at most {MAX_BUFFERING_SECS:g} (about 31 years), "
                             f"got {self.max_buffering_secs!r}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {self.num_shards!r}")
        if self.num_shards > MAX_NUM_SHARDS:
            raise ValueError(f"num_shards must be at most 2**63 (a shard is a 64-bit key), got {self.num_shards!r}")
        if self.max_windows_per_bundle < 1:
            raise ValueError(f"max_windows_per_bundle must be at least 1, got {self.max_windows_per_bundle!r}")


def never_sent(
    *, datasource: str, kind: DeadLetterKind, message: str, window: object,
    line: str | None = None, element: str | None = None,
) -> DeadLetter:
    """A dead letter for an element refused before any request.

    Its text comes from the element and the user's functions (a key or an
    exception message in ``message``, a ``repr``, the name a ``datasource``
    function gave): a lone surrogate in it is escaped here, once, so that no
    coder, metric or file writer meets it.
    """
    now = iso_utc(time.time())
    return DeadLetter(
        line=line, element=None if element is None else utf8_text(element), datasource=utf8_text(datasource),
        kind=kind.value, status=None, message=utf8_text(message), attempts=0,
        first_attempt_at=now, last_attempt_at=now, window=utf8_text(window_text(window)),
    )


class _WindowBuffer:
    """One window's lines in a bundle: one growing ``bytearray``, not a list of lines.

    orjson over-allocates the bytes it returns (about 4 KiB for a 200-byte
    line), so a list of 40,000 lines would hold some 160 MiB for an 8 MiB batch.
    """

    __slots__ = ("data", "rows", "timestamps", "used")

    def __init__(self) -> None:
        self.data = bytearray()
        self.rows = 0
        self.timestamps = array.array(_MICROS_TYPECODE)
        self.used = 0

    def append(self, line: bytes, timestamp_micros: int) -> None:
        data = self.data
        data += line
        data += b"\n"
        self.rows += 1
        self.timestamps.append(timestamp_micros)

    def extend(self, other: _WindowBuffer) -> None:
        self.data += other.data
        self.rows += other.rows
        self.timestamps.extend(other.timestamps)


class IntoGlobalWindow(beam.ParDo):
    """A ``ParDo`` whose DoFn emits every output into the global window itself.

    Declaring it (as ``WindowInto`` does) gives the outputs the global window's
    windowing, which a following ``GroupByKey`` or stateful DoFn needs, without
    a ``WindowInto`` step that would only move each element.
    """

    def get_windowing(self, inputs) -> Windowing:
        return Windowing(GlobalWindows())


class IntoWindowing(beam.ParDo):
    """A ``ParDo`` whose DoFn emits every output in a window of ``windowing`` itself (see :class:`IntoGlobalWindow`)."""

    def __init__(self, dofn: beam.DoFn, windowing: Windowing) -> None:
        super().__init__(dofn)
        self._windowing = windowing

    def get_windowing(self, inputs) -> Windowing:
        return self._windowing


class _Refusal(NamedTuple):
    """Why an element has no line to send: the fields of its dead letters."""

    kind: DeadLetterKind
    message: str
    line: str | None
    element: str | None


def _unencodable(element, error: EncodingError, max_bytes: int) -> _Refusal:
    return _Refusal(DeadLetterKind.UNENCODABLE, error.reason, None, _refused_element(element, max_bytes))


def _refused_element(element, max_bytes: int) -> str:
    """What a dead letter shows of an element that could not be encoded.

    Text (``str``, ``bytes``: a Pub/Sub message, a line of a file that is not
    JSON) is often the only copy of what it held once its source has moved on:
    its whole ``repr`` (which ``ast.literal_eval`` reads back) when it is no
    longer than ``max_bytes``, the bound on a line, and its ``repr`` no longer
    than four times that (a byte shown as ``\\xff``). Anything else, and longer
    text, as :func:`element_repr`'s ``repr`` cut to 500 characters.
    """
    kind = type(element)  # not isinstance(): an element's __class__ (a property) may raise
    if issubclass(kind, str):
        if str.__len__(element) <= max_bytes:
            text = str.__repr__(element)  # the text, not what a subclass's __repr__ says
            if len(text) <= 4 * max_bytes + 2:  # not every character shown as \U000e0000
                return text
    elif issubclass(kind, (bytes, bytearray, memoryview)):
        with memoryview(element) as view:  # no copy of a long one
            if view.nbytes <= max_bytes:
                return repr(view.tobytes())
    return element_repr(element)


def _oversize(line: bytes, max_bytes: int) -> _Refusal:
    """For a line that does not fit in a batch with its newline."""
    message = f"the encoded row is {len(line) + 1} bytes, over max_batch_bytes={max_bytes}"
    return _Refusal(DeadLetterKind.OVERSIZE, message, line_text(line), None)


def _unroutable(element, unroutable: Unroutable, max_bytes: int) -> _Refusal:
    """For an element without a data source: its line when it has one that fits (a replay can send it)."""
    line = _line_or_refusal(element, max_bytes)
    if isinstance(line, bytes):
        return _Refusal(DeadLetterKind.UNROUTABLE, unroutable.message, line_text(line), None)
    return _Refusal(DeadLetterKind.UNROUTABLE, unroutable.message, line.line, line.element)


def _line_or_refusal(element, max_bytes: int) -> bytes | _Refusal:
    try:
        line = encode_element(element)
    except EncodingError as error:
        return _unencodable(element, error, max_bytes)
    return _oversize(line, max_bytes) if len(line) >= max_bytes else line


class _MergeContext(WindowFn.MergeContext):
    """Records the merges a merging ``WindowFn`` asks for, as ``(windows, result)``."""

    def __init__(self, windows) -> None:
        super().__init__(windows)
        self.merges: list[tuple[list, Any]] = []

    def merge(self, to_be_merged, merge_result) -> None:
        self.merges.append((list(to_be_merged), merge_result))


class _BundleBuffers:
    """One bundle's open buffers, one per window and data source, and the outputs that leave them.

    A buffer is known by its *slot*, ``(datasource, window)``. It leaves as a
    full :class:`Batch` on ``FULL_TAG`` as soon as the next line would not fit
    or it holds ``max_batch_rows`` (with ``full_to_merge``, as a ``(WindowKey,
    Chunk)`` on the main output instead, with the line that did not fit: a
    chunk over a limit, which the merge step cuts at once). When a line opens
    a buffer past ``max_windows_per_bundle`` (open buffers of every window and
    data source), the least recently used buffer leaves as a chunk;
    :meth:`drain` hands what is left as chunks.

    Outputs are ``WindowedValue`` s in the global window, their own window kept
    in the key, except with ``keep_windows`` (merging windows of bounded
    input): chunks then travel in their own window under a key of the shard
    and data source alone, so that a ``GroupByKey`` merges them as Beam merges
    windows.

    With a merging ``windowfn`` the buffers of a bundle are merged as Beam would
    merge their windows (each data source's apart): a session of 500 rows in
    one bundle is one buffer, not 500 (before a ``GroupByKey`` every element is
    in its own unmerged window).
    """

    __slots__ = ("_buffers", "_full_to_merge", "_keep_windows", "_max_bytes", "_max_rows",
                 "_max_windows", "_merging", "_num_shards", "_shard", "_uses", "_window_coder")

    def __init__(self, limits: BatchLimits, *, full_to_merge: bool, window_coder, merging_windowfn=None,
                 keep_windows: bool = False) -> None:
        self._max_bytes = limits.max_batch_bytes
        self._max_rows = limits.max_batch_rows
        self._max_windows = limits.max_windows_per_bundle
        self._num_shards = limits.num_shards
        self._full_to_merge = full_to_merge
        self._window_coder = window_coder
        self._merging = merging_windowfn
        self._keep_windows = keep_windows
        self._buffers: dict[tuple[str, Any], _WindowBuffer] = {}
        # A use count: each line stamps its buffer, and an eviction (rare) looks for the oldest stamp.
        self._uses = 0
        self._shard = random.randrange(limits.num_shards)

    def get(self, slot: tuple[str, Any]) -> _WindowBuffer | None:
        """The slot's open buffer, if any (appending a line that fits is the caller's right)."""
        return self._buffers.get(slot)

    def add(self, slot: tuple[str, Any], line: bytes, timestamp_micros: int) -> list | None:
        """Adds a line (that fits in a batch) to its ``(datasource, window)`` buffer; returns what leaves, if anything."""
        buffers = self._buffers
        buffer = buffers.get(slot)
        out: list | None = None
        if buffer is None:
            if self._merging is not None:
                slot, buffer, out = self._merge_into(slot)
            if buffer is None:
                if len(buffers) >= self._max_windows:
                    out = out or []
                    out.append(self._evict())
                buffer = buffers[slot] = _WindowBuffer()
        self._uses += 1
        buffer.used = self._uses
        if len(buffer.data) + len(line) + 1 > self._max_bytes and buffer.rows:
            if self._full_to_merge:
                # Sent with the line that does not fit: the merge step sees a
                # chunk over the limit and cuts the full batch at once.
                buffer.append(line, timestamp_micros)
                out = out or []
                out.append(self._leave(slot, as_chunk=True))
                return out
            # Checked before adding, so that no batch is over the limit.
            out = out or []
            out.append(self._leave(slot, as_chunk=False))
            buffer = buffers[slot] = _WindowBuffer()
        buffer.append(line, timestamp_micros)
        if buffer.rows >= self._max_rows:
            out = out or []
            out.append(self._leave(slot, as_chunk=self._full_to_merge))
        return out

    def _merge_into(self, slot: tuple[str, Any]) -> tuple[tuple[str, Any], _WindowBuffer | None, list | None]:
        """Merges a new window with the data source's open ones as the window function says.

        Returns the slot the line goes to, its buffer (None: a new one is
        needed) and the chunks of a merged buffer over a limit (the merge step
        cuts them).
        """
        datasource, window = slot
        context = _MergeContext([*(w for ds, w in self._buffers if ds == datasource), window])
        self._merging.merge(context)
        target, target_buffer, out = slot, None, None
        for to_merge, result in context.merges:
            merged = _WindowBuffer()
            for merged_window in to_merge:
                old = self._buffers.pop((datasource, merged_window), None)
                if old is not None:
                    merged.extend(old)
            result_slot = (datasource, result)
            if window in to_merge:
                target = result_slot
                target_buffer = merged
            self._buffers[result_slot] = merged
            if len(merged.data) >= self._max_bytes or merged.rows >= self._max_rows:
                out = out or []
                out.append(self._leave(result_slot, as_chunk=True))
                if target == result_slot:
                    target_buffer = None
        if target_buffer is not None and not target_buffer.rows:
            # The new window merged with nothing open: an empty buffer is as good as none.
            del self._buffers[target]
            target_buffer = None
        return target, target_buffer, out

    def _evict(self) -> beam.pvalue.TaggedOutput | WindowedValue:
        """The least recently used buffer, as a chunk (at most ``max_windows_per_bundle`` to look at)."""
        oldest = min(self._buffers.items(), key=lambda item: item[1].used)[0]
        return self._leave(oldest, as_chunk=True)

    def drain(self) -> Iterator[beam.pvalue.TaggedOutput | WindowedValue]:
        while self._buffers:
            yield self._leave(next(iter(self._buffers)), as_chunk=True)

    def _leave(self, slot: tuple[str, Any], *, as_chunk: bool) -> beam.pvalue.TaggedOutput | WindowedValue:
        """Removes the slot's buffer and returns it as a full batch (on FULL_TAG) or a chunk for the merge step."""
        datasource, window = slot
        window_bytes = self._window_coder.encode(window)
        buffer = self._buffers.pop(slot)
        timestamps = buffer.timestamps
        timestamp = Timestamp(micros=min(timestamps))
        if not as_chunk:
            batch = Batch(window_text(window), bytes(buffer.data), buffer.rows, window_bytes, timestamps.tobytes(),
                          datasource)
            return beam.pvalue.TaggedOutput(FULL_TAG, WindowedValue(batch, timestamp, _GLOBAL_WINDOWS))
        self._shard = (self._shard + 1) % self._num_shards
        chunk = Chunk(bytes(buffer.data), buffer.rows, timestamps.tobytes())
        if self._keep_windows:
            return WindowedValue((WindowKey(self._shard, 0, "", b"", datasource), chunk), timestamp, (window,))
        key = WindowKey(self._shard, window.max_timestamp().micros, window_text(window), window_bytes, datasource)
        return WindowedValue((key, chunk), timestamp, _GLOBAL_WINDOWS)


class _EncodeAndBatchDoFn(beam.DoFn):
    """Encodes elements to NDJSON lines and batches them inside the bundle.

    For input whose elements are each in one window (global, fixed, session
    windows: see :func:`encoder_for`). Each element is routed to its data
    source (once, when ``datasource`` is a function) and encoded when it
    arrives: no line is ever reused for another element, so an upstream step
    that yields one object mutated between yields is sent as it was at each
    yield. Lines go to the bundle's :class:`_BundleBuffers`, one buffer per
    window and data source: full batches leave as soon as they fill, what is
    left at ``finish_bundle``, all in the global window (apply the DoFn with
    :class:`IntoGlobalWindow`). :class:`DeadLetter` records go to
    ``DEAD_LETTERS_TAG`` as ``(DeadLetter, window bytes)`` in the global window
    at the element's timestamp, one per window, for elements that have no data
    source, cannot be encoded, or whose line alone is larger than
    ``max_batch_bytes``.

    ``process`` takes the whole ``WindowedValue``: Beam calls a method that asks
    for the window and the timestamp as separate parameters through a path about
    three times slower per element. It returns a list of outputs, or nothing
    (most elements): cheaper for Beam than a generator. The helpers live
    outside the DoFn: the DirectRunner inspects the signature of every method
    of a DoFn on every bundle.

    Args:
        datasource: The data source name, or a function of the element giving it.
        windowing: The input's windowing: its window coder encodes the windows
            that dead letters are put back in; a merging window function merges
            the bundle's buffers.
        full_to_merge: Send full buffers to the merge step with the remainders
            rather than on ``FULL_TAG``. For unbounded input: its bundles are
            small, so a buffer rarely fills inside one, and a posting step of
            their own would run on every bundle for (nearly) nothing. Also for
            merging windows, whose windows are merged by the merge step.
        keep_windows: Emit chunks and dead letters in their own windows (for
            merging windows of bounded input, merged by a ``GroupByKey``; apply
            with :class:`IntoWindowing`).
    """

    def __init__(self, *, datasource: str | Callable[[Any], str], limits: BatchLimits, windowing: Windowing,
                 full_to_merge: bool = False, keep_windows: bool = False) -> None:
        self._datasource = datasource
        self._limits = limits
        self._windowfn = windowing.windowfn
        self._full_to_merge = full_to_merge
        self._keep_windows = keep_windows

    def setup(self) -> None:
        self._metrics = SinkMetrics()
        self._max_bytes = self._limits.max_batch_bytes
        self._max_rows = self._limits.max_batch_rows
        self._window_coder = self._windowfn.get_window_coder()
        self._merging = self._windowfn if self._windowfn.is_merging() else None
        self._router = Router(self._datasource)
        self._static = self._router.static

    def start_bundle(self) -> None:
        self._buffers = _BundleBuffers(
            self._limits, full_to_merge=self._full_to_merge, window_coder=self._window_coder,
            merging_windowfn=self._merging, keep_windows=self._keep_windows)
        self._count = 0

    def process(self, element, wv=beam.DoFn.WindowedValueParam):
        windows = wv.windows
        if len(windows) != 1:
            # Beam repeats each WindowedValue returned by this call once per window of the input.
            raise ValueError(f"{type(self).__name__} takes elements in one window, got {len(windows)}")
        self._count += 1
        # Inline, not a shared helper: a call and a Timestamp object (``wv.timestamp`` makes
        # one) per element measured about a fifth of this step (python -m benchmarks.destinations).
        datasource = self._static or self._router.route(element)
        if isinstance(datasource, Unroutable):
            return [self._dead_letter(_unroutable(element, datasource, self._max_bytes), windows[0], wv.timestamp,
                                      datasource.name)]
        line = _line_or_refusal(element, self._max_bytes)
        if isinstance(line, _Refusal):
            return [self._dead_letter(line, windows[0], wv.timestamp, datasource)]
        return self._buffers.add((datasource, windows[0]), line, wv.timestamp_micros)

    def finish_bundle(self) -> Iterator[beam.pvalue.TaggedOutput | WindowedValue]:
        self._metrics.inc("elements_in", self._count)
        yield from self._buffers.drain()

    def _dead_letter(self, refusal: _Refusal, window, timestamp: Timestamp,
                     datasource: str) -> beam.pvalue.TaggedOutput:
        """The dead letter for one window of an element, with that window as bytes and the element's timestamp.

        An unroutable element's ``datasource`` is what the function gave, not a
        data source: it is counted under none (a counter namespace per invalid
        name would be unbounded, and a lone surrogate in one fails the bundle).
        """
        kind = refusal.kind
        self._metrics.dead_letters(
            kind.value, 1, datasource="" if kind is DeadLetterKind.UNROUTABLE else datasource)
        if refusal.line is None:
            self._metrics.without_line()
        letter = never_sent(datasource=datasource, kind=kind, message=refusal.message,
                            window=window, line=refusal.line, element=refusal.element)
        windows = (window,) if self._keep_windows else _GLOBAL_WINDOWS
        return beam.pvalue.TaggedOutput(
            DEAD_LETTERS_TAG, WindowedValue((letter, self._window_coder.encode(window)), timestamp, windows))


class _EncodeAndBatchGlobalDoFn(_EncodeAndBatchDoFn):
    """:class:`_EncodeAndBatchDoFn` for bounded input in the global window, to one data source.

    ``process`` takes the ``WindowedValue`` and reads its timestamp as
    microseconds: asking Beam for ``TimestampParam`` costs one more parameter
    comparison in its invoker and a ``Timestamp`` object per element, nearly a quarter
    of the instructions of a whole bounded run (``python -m benchmarks
    --instructions``: 47,728 against 36,503-36,661 per event). A line that fits
    in the open buffer is appended right there (most lines), without the
    general path's look-up of the ``(datasource, window)`` slot. A batched
    ``process_batch`` was tried: Beam groups a batch by timestamp first, so
    elements with timestamps of their own cost 1.5 times as much (README,
    "Benchmarks"). The most
    common shape of all (a batch job to one data source) gets this loop alone,
    without a test for routing (the routed loop's few extra steps per element
    showed in ``python -m benchmarks --profile``).
    """

    def setup(self) -> None:
        super().setup()
        if self._static is None:
            raise ValueError(f"{type(self).__name__} takes one data source name, not a function")
        self._only: str = self._static
        self._slot = (self._only, _GLOBAL_WINDOW)

    def start_bundle(self) -> None:
        super().start_bundle()
        self._open: _WindowBuffer | None = None

    def finish_bundle(self) -> Iterator[beam.pvalue.TaggedOutput | WindowedValue]:
        # The runner keeps this instance for later bundles: the open buffer leaves with the bundle.
        self._open = None
        return super().finish_bundle()

    # Beam passes what the signature asks for: here the element and its WindowedValue, whose
    # timestamp is read as micros (``wv.timestamp`` makes a Timestamp object: only for dead letters).
    def process(self, element, wv=beam.DoFn.WindowedValueParam):
        self._count += 1
        try:
            line = encode_element(element)
        except EncodingError as error:
            return [self._dead_letter(_unencodable(element, error, self._max_bytes), _GLOBAL_WINDOW, wv.timestamp,
                                      self._only)]
        buffer = self._open
        if buffer is not None and len(buffer.data) + len(line) < self._max_bytes and buffer.rows + 1 < self._max_rows:
            # _WindowBuffer.append, inline: a call less per element.
            data = buffer.data
            data += line
            data += b"\n"
            buffer.rows += 1
            buffer.timestamps.append(wv.timestamp_micros)
            # A bare return: Beam warns, at construction, about a process that says "return None".
            return
        if len(line) >= self._max_bytes:
            return [self._dead_letter(_oversize(line, self._max_bytes), _GLOBAL_WINDOW, wv.timestamp, self._only)]
        full = self._buffers.add(self._slot, line, wv.timestamp_micros)
        self._open = self._buffers.get(self._slot)
        return full


class _EncodeAndBatchGlobalRoutedDoFn(_EncodeAndBatchDoFn):
    """:class:`_EncodeAndBatchGlobalDoFn` with a data source per element (a ``datasource`` function).

    The same loop, with an open buffer per data source: a line that fits in
    its data source's open buffer is appended right there, and the name the
    function returned is checked (and made a plain ``str``) only when it has no
    open buffer, since a name has one only once it was checked.
    """

    def start_bundle(self) -> None:
        super().start_bundle()
        # Each data source's open buffer: emptied whenever a buffer leaves (a full one, or the
        # least recently used past max_windows_per_bundle), so that none is appended to after.
        self._open: dict[str, _WindowBuffer | None] = {}

    def finish_bundle(self) -> Iterator[beam.pvalue.TaggedOutput | WindowedValue]:
        # As above: the open buffers leave with the bundle.
        self._open = {}
        return super().finish_bundle()

    def setup(self) -> None:
        super().setup()
        self._name_of = self._router.function

    # Beam passes what the signature asks for: here the element and its WindowedValue (as above).
    def process(self, element, wv=beam.DoFn.WindowedValueParam):
        self._count += 1
        try:
            name = self._name_of(element)
        except Exception as error:  # any element, any exception: it must not fail the bundle
            return [self._dead_letter(_unroutable(element, raised(error), self._max_bytes), _GLOBAL_WINDOW,
                                      wv.timestamp, "")]
        # A name with an open buffer was checked when that buffer opened: for most elements
        # this one look-up is all the routing there is.
        buffer = self._open.get(name) if type(name) is str else None
        if buffer is None:
            name = self._router.check(name)
            if isinstance(name, Unroutable):
                return [self._dead_letter(_unroutable(element, name, self._max_bytes), _GLOBAL_WINDOW, wv.timestamp,
                                          name.name)]
        try:
            line = encode_element(element)
        except EncodingError as error:
            return [self._dead_letter(_unencodable(element, error, self._max_bytes), _GLOBAL_WINDOW, wv.timestamp, name)]
        if buffer is not None and len(buffer.data) + len(line) < self._max_bytes and buffer.rows + 1 < self._max_rows:
            # _WindowBuffer.append, inline (as above).
            data = buffer.data
            data += line
            data += b"\n"
            buffer.rows += 1
            buffer.timestamps.append(wv.timestamp_micros)
            return
        if len(line) >= self._max_bytes:
            return [self._dead_letter(_oversize(line, self._max_bytes), _GLOBAL_WINDOW, wv.timestamp, name)]
        slot = (name, _GLOBAL_WINDOW)
        left = self._buffers.add(slot, line, wv.timestamp_micros)
        if left:
            self._open.clear()
        self._open[name] = self._buffers.get(slot)
        return left


class _EncodeAndBatchPerWindowDoFn(_EncodeAndBatchDoFn):
    """:class:`_EncodeAndBatchDoFn` for windowing that may put an element in several windows (sliding windows).

    Beam repeats each ``WindowedValue`` one call returns once per window of its
    input, so this ``process`` asks for the window: the runner then calls it
    once per window. The element is routed and encoded on every call, never
    reused from an earlier call by identity: an upstream step may yield one
    object mutated between yields, and the line must be the element as it was
    when yielded. ``elements_in`` counts an element once, on the call for its
    latest window (sliding windows: the one whose start is within a period of
    the timestamp); for other window functions, once per window.
    """

    def setup(self) -> None:
        super().setup()
        self._period_micros = (self._windowfn.period.micros if isinstance(self._windowfn, SlidingWindows)
                               else None)

    # Beam passes what the signature asks for: here the window and timestamp, one window a call.
    def process(self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        period = self._period_micros
        if period is None or window.start.micros > timestamp.micros - period:
            self._count += 1
        datasource = self._static or self._router.route(element)
        if isinstance(datasource, Unroutable):
            return [self._dead_letter(_unroutable(element, datasource, self._max_bytes), window, timestamp,
                                      datasource.name)]
        line = _line_or_refusal(element, self._max_bytes)
        if isinstance(line, _Refusal):
            return [self._dead_letter(line, window, timestamp, datasource)]
        return self._buffers.add((datasource, window), line, timestamp.micros)


# Window functions that put every element in exactly one window.
_ONE_WINDOW_FNS = (GlobalWindows, FixedWindows, Sessions)


def encoder_for(windowfn, *, bounded: bool, routed: bool = False) -> type[_EncodeAndBatchDoFn]:
    """The encoder for input windowed by ``windowfn`` (``routed``: a data source per element):
    the cheapest call that stays exact."""
    if bounded and type(windowfn) is GlobalWindows:
        return _EncodeAndBatchGlobalRoutedDoFn if routed else _EncodeAndBatchGlobalDoFn
    if type(windowfn) in _ONE_WINDOW_FNS:
        return _EncodeAndBatchDoFn
    return _EncodeAndBatchPerWindowDoFn


def cut_batches(
    chunks: Iterable[Chunk], *, max_bytes: int, max_rows: int, flush: bool,
) -> tuple[list[Chunk], Chunk | None]:
    """Cuts chunks into batches at line boundaries, each line keeping its timestamp.

    Returns the full batches and, unless ``flush``, the remainder that fills
    neither limit (``None`` when nothing remains). With ``flush`` the remainder
    is returned as the last batch. Every line of the input is in exactly one
    output, in order; no batch is over ``max_rows``, nor over ``max_bytes``
    but one holding a single line over it (a batch of its own).
    """
    chunks = list(chunks)
    if not chunks:
        return [], None
    if len(chunks) == 1:
        data, stamps = chunks[0].payload, chunks[0].timestamps
    else:
        data = b"".join(c.payload for c in chunks)
        stamps = b"".join(c.timestamps for c in chunks)
    rows_left = sum(c.rows for c in chunks)
    batches: list[Chunk] = []
    start, total, row = 0, len(data), 0
    while start < total and (total - start >= max_bytes or rows_left >= max_rows):
        end = data.rfind(b"\n", start, start + max_bytes) + 1
        if end <= start:
            # A line longer than the limit: only state kept under a larger max_batch_bytes (a
            # pipeline updated in place) holds one. A batch of its own, which the service takes or
            # refuses with a 413 (a dead letter): raising would fail its key's every bundle.
            end = data.index(b"\n", start) + 1
        rows = data.count(b"\n", start, end)
        if rows > max_rows:
            end = start
            for _ in range(max_rows):
                end = data.index(b"\n", end) + 1
            rows = max_rows
        batches.append(Chunk(data[start:end], rows, stamps[row * 8:(row + rows) * 8]))
        rows_left -= rows
        row += rows
        start = end
    if start == total:
        return batches, None
    rest = Chunk(data[start:] if start else data, rows_left, stamps[row * 8:] if row else stamps)
    if flush:
        batches.append(rest)
        return batches, None
    return batches, rest


def _batch(key: WindowKey, chunk: Chunk) -> Batch:
    return Batch(key.window, chunk.payload, chunk.rows, key.window_bytes, chunk.timestamps, key.datasource)


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
    ) -> Iterator[BATCH_HINT]:
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
            yield _batch(key, batch)

    @userstate.on_timer(WINDOW_END)
    def on_window_end(
        self,
        key=beam.DoFn.KeyParam,
        buffer=beam.DoFn.StateParam(BUFFER),
        held=beam.DoFn.StateParam(HELD),
    ) -> Iterator[BATCH_HINT]:
        yield from _flush(key, buffer, held, self._limits)

    @userstate.on_timer(STALE)
    def on_stale(
        self,
        key=beam.DoFn.KeyParam,
        buffer=beam.DoFn.StateParam(BUFFER),
        held=beam.DoFn.StateParam(HELD),
    ) -> Iterator[BATCH_HINT]:
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


def _flush(key, buffer, held, limits: BatchLimits) -> list[BATCH_HINT]:
    """Everything a shard holds, as batches (a timer that finds nothing does nothing)."""
    if not held.read():
        return []
    chunks, _ = cut_batches(
        (Chunk(*c) for c in buffer.read()), max_bytes=limits.max_batch_bytes,
        max_rows=limits.max_batch_rows, flush=True)
    buffer.clear()
    held.clear()
    key = WindowKey(*key)
    return [_batch(key, chunk) for chunk in chunks]


def _merge_grouped(key: WindowKey, chunks: Iterable[CHUNK_HINT], limits: BatchLimits) -> Iterator[BATCH_HINT]:
    """Cuts a group of chunks into batches, reading it as it streams in (about one batch held at a time)."""
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
                yield _batch(key, batch)
            pending = [rest] if rest is not None else []
            pending_bytes = len(rest.payload) if rest is not None else 0
            pending_rows = rest.rows if rest is not None else 0
    batches, _ = cut_batches(
        pending, max_bytes=limits.max_batch_bytes, max_rows=limits.max_batch_rows, flush=True)
    for batch in batches:
        yield _batch(key, batch)


class _MergeRemaindersDoFn(beam.DoFn):
    """Bounded input: cuts the grouped remainders of one shard and window into batches.

    Follows a ``GroupByKey``, which every batch runner supports without timers.
    """

    def __init__(self, *, limits: BatchLimits) -> None:
        self._limits = limits

    def process(self, element: GROUPED_CHUNKS_HINT) -> Iterator[BATCH_HINT]:
        yield from _merge_grouped(WindowKey(*element[0]), element[1], self._limits)


class _MergeMergedWindowsDoFn(beam.DoFn):
    """Bounded input in merging windows: cuts the chunks of one shard and merged window into batches.

    Follows a ``GroupByKey`` over chunks in their own windows, keyed by shard
    and data source alone: Beam merged the windows (sessions of chunks from every bundle make
    one), and this DoFn takes the merged window from the runner. Batches leave
    in the global window (apply with :class:`IntoGlobalWindow`).
    """

    def __init__(self, *, limits: BatchLimits, windowing: Windowing) -> None:
        self._limits = limits
        self._window_coder = windowing.windowfn.get_window_coder()

    def process(self, element: GROUPED_CHUNKS_HINT, window=beam.DoFn.WindowParam) -> Iterator[WindowedValue]:
        key = WindowKey(element[0][0], window.max_timestamp().micros, window_text(window),
                        self._window_coder.encode(window), element[0][4])
        for batch in _merge_grouped(key, element[1], self._limits):
            yield WindowedValue(batch, Timestamp(micros=min(timestamps_of(batch[4]))), _GLOBAL_WINDOWS)


class _RestoreWindowsDoFn(beam.DoFn):
    """Puts each dead letter back in its element's window, at its element's timestamp.

    Dead letters travel in the global window with their window encoded (the
    batching steps run in the global window); this step, applied with
    :class:`IntoWindowing` and the input's windowing, decodes it.
    """

    def __init__(self, windowing: Windowing) -> None:
        self._window_coder = windowing.windowfn.get_window_coder()

    def process(self, element: WINDOWED_DEAD_LETTER_HINT, timestamp=beam.DoFn.TimestampParam):
        letter, window_bytes = element
        return [WindowedValue(letter, timestamp, (self._window_coder.decode(window_bytes),))]
