"""WriteToTinybird: the PTransform that delivers a PCollection to the Events API."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.transforms.core import Windowing
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from sinks.tinybird._arguments import check_argument_types, check_dead_letter_path
from sinks.tinybird._batching import (
    BATCH_HINT,
    DEAD_LETTERS_TAG,
    FULL_TAG,
    KEYED_CHUNK_HINT,
    WINDOWED_DEAD_LETTER_HINT,
    Batch,
    BatchLimits,
    IntoGlobalWindow,
    IntoWindowing,
    _BatchDoFn,
    _MergeMergedWindowsDoFn,
    _MergeRemaindersDoFn,
    _RestoreWindowsDoFn,
    encoder_for,
    timestamps_of,
)
from sinks.tinybird._beam_compat import declare_tagged_types
from sinks.tinybird._events_api import ClientSettings, EventsApiClient, Failed, SendReport
from sinks.tinybird._metrics import SinkMetrics
from sinks.tinybird._routing import check_datasource
from sinks.tinybird._token import DEFAULT_TOKEN_ENV, TokenSource
from sinks.tinybird.dead_letters import (
    DEAD_LETTER_FORMATS,
    DEAD_LETTER_LABEL,
    DeadLetter,
    DeadLetterKind,
    DeliveryError,
    WriteDeadLetterFiles,
    iso_utc,
    line_text,
    utf8_text,
)
from sinks.tinybird.retry import RetryPolicy

_LOG = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.tinybird.co"
DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_BATCH_ROWS = 200_000
DEFAULT_MAX_BUFFERING_SECS = 5.0
DEFAULT_NUM_SHARDS = 8
DEFAULT_MAX_IN_FLIGHT = 4
DEFAULT_MAX_WINDOWS_PER_BUNDLE = 20
_PROGRESS_EVERY_SECS = 10.0
# Failures that raise_on_failure raises on: a bundle retry may deliver them. A
# 422 (partially stored) and a short 2xx must not be sent again, and a single
# row refused with 413 never fits: those are dead-lettered whatever the option.
_RAISE_KINDS = frozenset({DeadLetterKind.REJECTED, DeadLetterKind.RETRIES_EXHAUSTED})

_GLOBAL_WINDOWS = (GlobalWindow(),)


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A batch handed to a thread, and when its send must have ended."""

    future: concurrent.futures.Future
    batch: Batch
    timestamp: Timestamp
    deadline: float


class _PostDoFn(beam.DoFn):
    """Posts batches, a bounded number at a time, and dead-letters what fails.

    One client (one connection pool) and one thread pool per instance, made in
    ``setup()``; the pacing and the concurrency limit are not the instance's
    but the worker process's: every instance, step and thread posting to one
    data source with one token shares one limiter (see
    ``sinks/tinybird/_http/limiter.py``). A batch is handed to a thread only
    when one is free, so its send starts at once and ends within the client's
    ``max_send_secs`` (the policy's error and throttling budgets plus one
    attempt's deadline): no wait of
    ``process``, ``finish_bundle`` or ``teardown`` is longer. Every request of
    a bundle is finished, delivered or dead-lettered, before ``finish_bundle``
    returns. Metrics and outputs are produced in the bundle's thread. Dead
    letters are emitted in the global window, one per line, at the timestamp
    of that line's element, with its window encoded (``_RestoreWindowsDoFn``
    puts them back in it).

    With ``raise_on_failure``, a rejected batch (400/401/403/404...) or one
    whose retries ran out does not raise at once: the bundle stops handing out
    new batches, waits for every request in flight, dead-letters what must not
    be sent again (422, a short 2xx, a single row refused with 413), then
    raises :class:`DeliveryError` from ``finish_bundle``. The runner retries
    the bundle, which re-posts every batch of it, including those delivered
    before the failure.
    """

    def __init__(
        self, *, settings: ClientSettings, token: TokenSource, retry_policy: RetryPolicy,
        raise_on_failure: bool,
    ) -> None:
        self._settings = settings
        self._token = token
        self._retry_policy = retry_policy
        self._raise_on_failure = raise_on_failure

    def setup(self) -> None:
        self._client = EventsApiClient(
            self._settings, token=self._token.resolve(), retry_policy=self._retry_policy)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._settings.max_in_flight, thread_name_prefix="tinybird-post")
        self._metrics = SinkMetrics()
        self._started = time.monotonic()
        self._next_progress = self._started + _PROGRESS_EVERY_SECS
        self._acknowledged = 0
        self._dead_lettered = 0
        self._label = self._settings.datasource or "(a data source per element)"

    def start_bundle(self) -> None:
        self._pending: collections.deque[_InFlight] = collections.deque()
        self._failure: DeliveryError | None = None
        self._not_posted_rows = 0

    def process(self, element, timestamp=beam.DoFn.TimestampParam) -> Iterator[Any]:
        batch = Batch(*element)
        if self._failure is not None:
            # The bundle will fail and be retried with this batch in it: posting it now would duplicate it.
            self._not_posted_rows += batch.rows
            return
        self._metrics.batch(payload_bytes=len(batch.payload), rows=batch.rows)
        # Results leave in order; at most max_in_flight requests are under way,
        # and a new one is submitted only to a free thread.
        while len(self._pending) >= self._settings.max_in_flight:
            yield from self._complete(self._pending.popleft())
        if self._failure is not None:
            self._not_posted_rows += batch.rows
            return
        future = self._pool.submit(self._client.send, batch.payload, batch.rows, batch.datasource)
        self._pending.append(_InFlight(
            future=future, batch=batch, timestamp=timestamp,
            deadline=time.monotonic() + self._client.max_send_secs))
        while self._pending and self._pending[0].future.done():
            yield from self._complete(self._pending.popleft())

    def finish_bundle(self) -> Iterator[Any]:
        while self._pending:
            yield from self._complete(self._pending.popleft())
        if self._failure is not None:
            failure = self._failure
            if self._not_posted_rows:
                _LOG.warning("Tinybird %s: %d rows of the failed bundle not posted; the bundle's retry posts them",
                             self._label, self._not_posted_rows)
            raise failure

    def teardown(self) -> None:
        # Never waits: after finish_bundle nothing is in flight, and after a
        # failed bundle (which the runner retries) what is left is abandoned:
        # queued sends are cancelled, and the closed client makes those under
        # way end with their attempt in progress.
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    def _complete(self, in_flight: _InFlight) -> Iterator[Any]:
        try:
            report: SendReport = in_flight.future.result(timeout=max(in_flight.deadline - time.monotonic(), 0.0))
        except concurrent.futures.TimeoutError:
            report = self._overdue(in_flight)
        datasource = in_flight.batch.datasource
        self._metrics.report(report)
        acknowledged = sum(part.rows for part in report.delivered)
        if acknowledged:
            self._metrics.acknowledged(datasource, acknowledged)
        self._acknowledged += acknowledged
        for failed in report.failed:
            if self._raise_on_failure and failed.kind in _RAISE_KINDS:
                if self._failure is None:
                    self._failure = DeliveryError(
                        datasource=datasource, kind=failed.kind.value, status=failed.status,
                        message=failed.message, rows=failed.rows)
                continue
            self._metrics.dead_letters(failed.kind.value, failed.rows, datasource=datasource)
            self._dead_lettered += failed.rows
            yield from self._dead_letters(failed, in_flight.batch)
        self._progress()

    def _overdue(self, in_flight: _InFlight) -> SendReport:
        """A send past the client's own bound (it keeps its bound by construction: this is
        a safety net): its rows are dead-lettered rather than waited for."""
        in_flight.future.cancel()
        now = time.time()
        batch = in_flight.batch
        message = (
            f"no outcome within {self._client.max_send_secs:g} s (the retry policy's max_total_secs and "
            "max_throttled_secs plus one attempt's deadline); the request may still complete, so a replay "
            "may duplicate rows")
        _LOG.warning("Tinybird %s: %d rows dead-lettered: %s", batch.datasource, batch.rows, message)
        return SendReport(delivered=(), failed=(Failed(
            payload=batch.payload, rows=batch.rows, kind=DeadLetterKind.RETRIES_EXHAUSTED, status=None,
            message=message, attempts=0, first_attempt_at=now, last_attempt_at=now),), attempts=())

    def _dead_letters(self, failed: Failed, batch: Batch) -> Iterator[beam.pvalue.TaggedOutput]:
        """One dead letter per line of ``failed``, each at its own element's timestamp."""
        first, last = iso_utc(failed.first_attempt_at), iso_utc(failed.last_attempt_at)
        kind = failed.kind.value
        # The server's text cannot hold a lone surrogate (the transport decodes it), an exception's might.
        message = utf8_text(failed.message)
        # A failed part is a run of whole lines of the batch, starting at its first_row.
        first_row = failed.first_row
        stamps = timestamps_of(batch.timestamps)
        for i, line in enumerate(failed.payload.split(b"\n")[:-1]):
            letter = DeadLetter(
                line=line_text(line), element=None, datasource=batch.datasource,
                kind=kind, status=failed.status, message=message, attempts=failed.attempts,
                first_attempt_at=first, last_attempt_at=last, window=batch.window)
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS_TAG, WindowedValue(
                (letter, batch.window_bytes), Timestamp(micros=stamps[first_row + i]), _GLOBAL_WINDOWS))

    def _progress(self) -> None:
        now = time.monotonic()
        if now < self._next_progress:
            return
        self._next_progress = now + _PROGRESS_EVERY_SECS
        _LOG.info(
            "Tinybird %s: %d rows acknowledged (%.0f rows/s), %d dead-lettered, by this worker",
            self._label, self._acknowledged,
            self._acknowledged / max(now - self._started, 1e-9), self._dead_lettered)


class _Post(beam.PTransform):
    """Posts batches with :class:`_PostDoFn`; returns its dead letters, typed."""

    def __init__(self, settings: ClientSettings, token: TokenSource, retry_policy: RetryPolicy,
                 raise_on_failure: bool) -> None:
        super().__init__()
        self._dofn = _PostDoFn(settings=settings, token=token, retry_policy=retry_policy,
                               raise_on_failure=raise_on_failure)

    def expand(self, batches):
        outputs = batches | beam.ParDo(self._dofn).with_outputs(DEAD_LETTERS_TAG, main="done")
        return declare_tagged_types(outputs, **{DEAD_LETTERS_TAG: WINDOWED_DEAD_LETTER_HINT})[DEAD_LETTERS_TAG]


class WriteToTinybirdResult(dict):
    """What :class:`WriteToTinybird` returns: its outputs by name.

    A ``dict`` of ``PCollection`` s, because that is the shape Beam (and Beam
    YAML, where a later step reads ``ToTinybird.dead_letters``) takes as the
    named outputs of a transform; the attributes are the same ``PCollection`` s.

    Attributes:
        dead_letters: A ``PCollection`` of :class:`DeadLetter`, one per element
            (and window) that was not delivered, in the element's window (for
            merging windows, the window the sink merged it into) at the
            element's timestamp, with the input's windowing; the window is
            also kept as text in ``window``. Output ``"dead_letters"``.
        dead_letter_files: When ``dead_letter_path`` was given, the
            ``PCollection`` of ``fileio.FileResult`` for the files written
            (output ``"dead_letter_files"``), else ``None`` (and no such output).
    """

    def __init__(self, *, dead_letters: beam.PCollection, dead_letter_files: beam.PCollection | None) -> None:
        super().__init__(dead_letters=dead_letters)
        if dead_letter_files is not None:
            self["dead_letter_files"] = dead_letter_files

    @property
    def dead_letters(self) -> beam.PCollection:
        return self["dead_letters"]

    @property
    def dead_letter_files(self) -> beam.PCollection | None:
        return self.get("dead_letter_files")


def _retry_policy_of(value: RetryPolicy | Mapping[str, Any] | None) -> RetryPolicy:
    """``WriteToTinybird(retry_policy=)`` as a :class:`RetryPolicy`: a mapping gives its fields by name."""
    if value is None:
        return RetryPolicy()
    if isinstance(value, RetryPolicy):
        return value
    fields = {field.name for field in dataclasses.fields(RetryPolicy)}
    unknown = sorted(str(key) for key in value if key not in fields)
    if unknown:
        raise ValueError(f"retry_policy has no field {', '.join(map(repr, unknown))}; its fields: "
                         f"{', '.join(sorted(fields))}")
    return RetryPolicy(**value)


class WriteToTinybird(beam.PTransform):
    """Delivers a PCollection to a Tinybird data source through the Events API.

    Elements may be dicts (datetimes, dates, Decimals and UUIDs included),
    ``beam.Row`` or NamedTuples, dataclasses, or ``str``/``bytes`` that already
    hold one JSON object. Each is encoded once to one NDJSON line.

    **Batching.** Lines are grouped per window into requests of at most
    ``max_batch_bytes`` (uncompressed) and ``max_batch_rows``, across bundles,
    over ``num_shards`` keys. A batch is posted as soon as it is full; what is
    left is posted when the watermark passes the end of its window (for bounded
    input: at the end of the input) and, for unbounded input, once it has
    waited ``max_buffering_secs``. Late data is sent, not dropped.

    **Posting.** Each worker process posts at most ``max_in_flight`` requests
    at once per data source and token, across every step and thread of the
    sink, compressed with ``compression``, with connect and read timeouts.
    408, 500, 502, 503, 504, timeouts and connection errors are retried under
    ``retry_policy`` (exponential backoff with jitter, ``max_attempts``,
    ``max_total_secs``). Throttling is not failure: a 429, a 503 with
    ``Retry-After`` and an exhausted ``X-RateLimit-Remaining`` pause every
    request of the process, slow its paced rate and concurrency, and are
    waited out without spending attempts, for up to the policy's
    ``max_throttled_secs`` per batch (then: dead letter ``throttled``). Time
    spent throttled is reported to the runner. A 413 splits the batch in
    halves, recursively.

    **Failures.** Unencodable elements, rows larger than ``max_batch_bytes``,
    400/401/403/404, 422 (partially ingested, never retried), a single row
    refused with 413, exhausted retries and throttling past its budget become :class:`DeadLetter` records
    in ``result.dead_letters``, written to ``dead_letter_path`` when given. The
    pipeline goes on, unless ``raise_on_failure`` is set. Delivery is
    at-least-once: a duplicate can happen only when a request that the server
    stored is retried (a 500, a timeout or a reset after the body was sent) or
    when the runner retries a bundle whose batches were already posted.

    Args:
        datasource: The target data source name, or a function of the element
            giving it (``lambda e: f"events_{e['type']}"``, or
            :class:`DatasourceFromField`), called once per element (and
            window) on the workers. Batches are per window and data source: a
            request never mixes data sources. An element whose function
            raises, returns no ``str`` or a name that is not a data source is
            dead-lettered as ``unroutable``.
        token: The token, or None to read it on the workers from
            ``token_secret`` or the ``token_env`` environment variable.
        token_env: Environment variable read on the workers when neither
            ``token`` nor ``token_secret`` is given. Default ``TINYBIRD_TOKEN``.
        token_secret: A Secret Manager secret version
            (``projects/P/secrets/S/versions/V``), read on the workers; needs
            the ``gcp`` extra.
        api_url: The API host of the workspace's region. Default
            ``https://api.tinybird.co``.
        wait: Ask the server to acknowledge only committed writes (200) rather
            than accepted ones (202). Default False.
        compression: ``"zstd"`` (default), ``"gzip"`` or None.
        max_batch_bytes: Bound on the uncompressed NDJSON of one request.
            Default 8 MiB (the Events API refuses requests over 10 MB on the
            free plan); at most 100,000,000 (100 MB, its limit on paid plans).
        max_batch_rows: Bound on the rows of one request. Default 200,000.
        max_buffering_secs: Unbounded input only: the longest a row waits in a
            partial batch. Default 5 s.
        num_shards: Keys batching is spread over. Default 8.
        max_windows_per_bundle: Windows a bundle keeps a buffer open for at
            once (as Beam's ``WriteToFiles(max_writers_per_bundle=)``): past
            it, the least recently used buffer goes to the cross-bundle merge,
            so a bundle's memory is bounded by this many buffers of at most
            ``max_batch_bytes``, however many windows it holds. Default 20.
        max_in_flight: Requests under way at once per worker process, data
            source and token (the ceiling of the adaptive concurrency limit).
            Default 4.
        retry_policy: A :class:`RetryPolicy`, or a mapping of its fields
            (``{"max_attempts": 3}``: what Beam YAML's ``kwargs`` can give);
            default ``RetryPolicy()`` (6 attempts, 0.5 s doubling to 30 s, at
            most 300 s of errors and 1,800 s of throttling per batch).
        connect_timeout_secs: Default 5 s.
        read_timeout_secs: Default 30 s.
        dead_letter_path: Where to write dead-letter files (any Beam filesystem
            path, e.g. ``gs://bucket/dlq/``), or None for no files.
        dead_letter_format: ``"json"`` (JSON lines, default) or ``"avro"``.
        dead_letter_label: Put in every dead-letter file's name, after
            ``dead-letters-`` (letters, digits, ``_.-``, at most 64): which
            run wrote the file, so that a replay can read that run's files
            alone from a folder that collects every run's. Default none.
        raise_on_failure: Fail the bundle with :class:`DeliveryError` instead
            of dead-lettering what the server did not accept. Encoding and
            size failures are still dead-lettered. Default False.
        ca_bundle_path: A CA bundle to verify the server's certificate with.
            Certificates are always verified for https.
        allow_insecure_http: Allow sending the token over plain http to a host
            that is not loopback. Default False.
        clock: The processing-time clock (epoch seconds) that buffering timers
            are set from; tests with ``TestStream`` pass one that starts at 0.
    """

    def __init__(
        self,
        *,
        datasource: str | Callable[[Any], str],
        token: str | None = None,
        token_env: str = DEFAULT_TOKEN_ENV,
        token_secret: str | None = None,
        api_url: str = DEFAULT_API_URL,
        wait: bool = False,
        compression: str | None = "zstd",
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_buffering_secs: float = DEFAULT_MAX_BUFFERING_SECS,
        num_shards: int = DEFAULT_NUM_SHARDS,
        max_windows_per_bundle: int = DEFAULT_MAX_WINDOWS_PER_BUNDLE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        retry_policy: RetryPolicy | Mapping[str, Any] | None = None,
        connect_timeout_secs: float = 5.0,
        read_timeout_secs: float = 30.0,
        dead_letter_path: str | None = None,
        dead_letter_format: str = "json",
        dead_letter_label: str | None = None,
        raise_on_failure: bool = False,
        ca_bundle_path: str | None = None,
        allow_insecure_http: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        check_argument_types({
            "datasource": datasource, "token": token, "token_env": token_env, "token_secret": token_secret,
            "api_url": api_url, "wait": wait, "compression": compression, "max_batch_bytes": max_batch_bytes,
            "max_batch_rows": max_batch_rows, "max_buffering_secs": max_buffering_secs,
            "num_shards": num_shards, "max_windows_per_bundle": max_windows_per_bundle,
            "max_in_flight": max_in_flight, "retry_policy": retry_policy,
            "connect_timeout_secs": connect_timeout_secs, "read_timeout_secs": read_timeout_secs,
            "dead_letter_path": dead_letter_path, "dead_letter_format": dead_letter_format,
            "dead_letter_label": dead_letter_label, "raise_on_failure": raise_on_failure, "ca_bundle_path": ca_bundle_path,
            "allow_insecure_http": allow_insecure_http, "clock": clock,
        })
        check_datasource(datasource)
        self._clock = clock
        self._datasource = datasource
        self._settings = ClientSettings(
            api_url=api_url, datasource=datasource if isinstance(datasource, str) else None, wait=wait, compression=compression,
            connect_timeout_secs=connect_timeout_secs, read_timeout_secs=read_timeout_secs,
            max_in_flight=max_in_flight, ca_bundle_path=ca_bundle_path,
            allow_insecure_http=allow_insecure_http)
        self._limits = BatchLimits(
            max_batch_bytes=max_batch_bytes, max_batch_rows=max_batch_rows,
            max_buffering_secs=max_buffering_secs, num_shards=num_shards,
            max_windows_per_bundle=max_windows_per_bundle)
        self._token = TokenSource(value=token, secret_version=token_secret, env_var=token_env)
        self._retry_policy = _retry_policy_of(retry_policy)
        if dead_letter_format not in DEAD_LETTER_FORMATS:
            raise ValueError(
                f"dead_letter_format must be one of {DEAD_LETTER_FORMATS}, got {dead_letter_format!r}")
        check_dead_letter_path(dead_letter_path)
        if dead_letter_label is not None and not DEAD_LETTER_LABEL.fullmatch(dead_letter_label):
            raise ValueError(f"dead_letter_label must match {DEAD_LETTER_LABEL.pattern}, got {dead_letter_label!r}")
        self._dead_letter_files = (WriteDeadLetterFiles(dead_letter_path, file_format=dead_letter_format,
                                                        label=dead_letter_label)
                                   if dead_letter_path else None)
        self._raise_on_failure = raise_on_failure

    # No return annotation: Beam reads it as an output type hint and warns at
    # construction (from 2.78) that a dict of PCollections is not one.
    def expand(self, pcoll):
        limits = self._limits
        bounded = pcoll.is_bounded
        windowing = pcoll.windowing
        datasource = self._datasource
        # Merging windows of bounded input: chunks keep their windows, and a
        # GroupByKey merges them across bundles as Beam merges windows.
        merge_windows = bounded and windowing.windowfn.is_merging()
        encoder = encoder_for(windowing.windowfn, bounded=bounded, routed=not isinstance(datasource, str))(
            datasource=datasource, limits=limits, windowing=windowing,
            full_to_merge=not bounded or merge_windows, keep_windows=merge_windows)
        tags = (DEAD_LETTERS_TAG, FULL_TAG) if bounded and not merge_windows else (DEAD_LETTERS_TAG,)
        into = (IntoWindowing(encoder, Windowing(windowing.windowfn)) if merge_windows
                else IntoGlobalWindow(encoder))
        # Every other output of the encoder is in the global window, its own
        # window kept as text (and in the chunks' key): no WindowInto step.
        encoded = declare_tagged_types(
            pcoll | "EncodeAndBatch" >> into.with_output_types(KEYED_CHUNK_HINT).with_outputs(*tags, main="remainders"),
            **{tag: BATCH_HINT if tag == FULL_TAG else WINDOWED_DEAD_LETTER_HINT for tag in tags})
        encoder_dead_letters = encoded[DEAD_LETTERS_TAG]
        if merge_windows:
            merged = (
                encoded.remainders
                | "GroupRemainders" >> beam.GroupByKey()
                | "MergeRemainders" >> IntoGlobalWindow(_MergeMergedWindowsDoFn(limits=limits, windowing=windowing))
                .with_output_types(BATCH_HINT))
            posted = [merged | "PostMerged" >> self._post()]
            encoder_dead_letters = encoder_dead_letters | "DeadLettersToGlobal" >> beam.WindowInto(
                GlobalWindows()).with_output_types(WINDOWED_DEAD_LETTER_HINT)
        elif bounded:
            merged = (
                encoded.remainders
                | "GroupRemainders" >> beam.GroupByKey()
                | "MergeRemainders" >> beam.ParDo(_MergeRemaindersDoFn(limits=limits)).with_output_types(BATCH_HINT))
            # The same DoFn twice rather than a Flatten: each posts in the stage
            # that produced its batches, so full batches never wait for the
            # shuffle (a Flatten of two stages' outputs is read after both).
            posted = [encoded[FULL_TAG] | "PostFull" >> self._post(),
                      merged | "PostMerged" >> self._post()]
        else:
            # Streaming bundles are small and every step costs per bundle: full
            # buffers go through the merge step too, and one step posts.
            merged = encoded.remainders | "MergeRemainders" >> beam.ParDo(
                _BatchDoFn(limits=limits, buffer_in_processing_time=True, clock=self._clock)
            ).with_output_types(BATCH_HINT)
            posted = [merged | "Post" >> self._post()]
        dead_letters = (
            (encoder_dead_letters, *posted)
            | "GatherDeadLetters" >> beam.Flatten().with_output_types(WINDOWED_DEAD_LETTER_HINT)
            | "DeadLetters" >> IntoWindowing(_RestoreWindowsDoFn(windowing), windowing).with_output_types(DeadLetter))
        files = None
        if self._dead_letter_files is not None:
            files = dead_letters | "WriteDeadLetters" >> self._dead_letter_files
        return WriteToTinybirdResult(dead_letters=dead_letters, dead_letter_files=files)

    def _post(self) -> beam.PTransform:
        return _Post(self._settings, self._token, self._retry_policy, self._raise_on_failure)
