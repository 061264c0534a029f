"""Running a streaming job on Beam's local DirectRunner until it is stopped, then its summary.

Beam's Python DirectRunner runs a streaming pipeline until it is cancelled: it
cannot drain, keeps state (the sink's partial batches) in memory, and
acknowledges each Pub/Sub pull as soon as the pull returns, before the messages
are processed. So a stop (Ctrl-C, SIGTERM, or a time limit) here first waits, at
most ``settle_timeout_secs``, until the job's own counters show every row read
acknowledged by the server or dead-lettered, and every dead letter in a final
file, for ``SETTLE_STABLE_SECS`` running; only then is the runner cancelled.
Rows still in flight when the wait gives up are lost (Pub/Sub will not deliver
them again): the summary counts them and the run fails. Also lost: messages
that a pull hands over while the runner is being cancelled (only when messages
are still being published during the stop), and, on SIGKILL or a crash,
everything read and not yet acknowledged by the server or dead-lettered.
Messages not pulled stay in the subscription for the next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineResult

from pipelines._endpoint import Endpoint, tinybird_endpoint
from pipelines._options import DEFAULT_MAX_DEAD_LETTER_RATIO, SinkConfig, beam_options_without_secrets
from pipelines._progress import METRICS_NAMESPACE, ROWS_READ
from pipelines._summary import (
    SINK_METRICS_NAMESPACE,
    RunSummary,
    counter_totals,
    format_summary,
    judge,
    list_dead_letter_files,
    summarise,
)
from sinks.tinybird.dead_letters import DEAD_LETTER_RECORDS_WRITTEN, STREAMING_FILE_EVERY_SECS

_LOG = logging.getLogger(__name__)

LOCAL_STREAMING_RUNNERS = frozenset({"directrunner", "bundlebaseddirectrunner", "switchingdirectrunner"})
"""Runners that run the job in this process, where a stop is handled here (lower case: Beam takes
a runner's name in any case, with or without ``Runner``, or as its class's dotted path)."""
DIRECT_RUNNER_PULL_SECS = 30.0
"""Beam's DirectRunner pulls Pub/Sub with a 30 s timeout on its only worker thread: on a quiet
subscription, nothing else (timers, posts, dead-letter files) runs until the pull returns."""
SETTLE_MARGIN_SECS = 15.0
SETTLE_STABLE_SECS = 1.0
PROGRESS_EVERY_SECS = 5.0


def settle_timeout_secs(max_buffering_secs: float) -> float:
    """How long a stop waits for the rows in flight: a partial batch's wait, a blocked pull, the
    wait of a dead letter for its file, a margin."""
    return max_buffering_secs + DIRECT_RUNNER_PULL_SECS + STREAMING_FILE_EVERY_SECS + SETTLE_MARGIN_SECS


def is_local_runner(runner: object) -> bool:
    """True for the runners whose streaming jobs run here (and for no ``--runner``)."""
    if runner is None:
        return True
    name = (runner.rsplit(".", 1)[-1] if isinstance(runner, str) else type(runner).__name__).lower()
    return name in LOCAL_STREAMING_RUNNERS or f"{name}runner" in LOCAL_STREAMING_RUNNERS


@dataclasses.dataclass(frozen=True)
class InFlight:
    """Where the rows of a running job are, from its committed counters."""

    rows_read: int
    rows_acknowledged: int
    dead_letters: int
    dead_letters_in_files: int | None
    """None when dead letters are not written to files."""

    @property
    def rows_unaccounted(self) -> int:
        """Rows read that are neither acknowledged nor dead-lettered yet (in a batch or a request)."""
        return max(self.rows_read - self.rows_acknowledged - self.dead_letters, 0)

    @property
    def dead_letters_unwritten(self) -> int:
        """Dead letters not yet in a final file."""
        if self.dead_letters_in_files is None:
            return 0
        return max(self.dead_letters - self.dead_letters_in_files, 0)

    @property
    def settled(self) -> bool:
        return self.rows_unaccounted == 0 and self.dead_letters_unwritten == 0

    @classmethod
    def of(cls, result: PipelineResult, *, dead_letter_files: bool) -> InFlight:
        sink = counter_totals(result, SINK_METRICS_NAMESPACE)
        own = counter_totals(result, METRICS_NAMESPACE)
        return cls(
            rows_read=own.get(ROWS_READ, 0),
            rows_acknowledged=sink.get("rows_acknowledged", 0),
            dead_letters=sink.get("dead_letters", 0),
            dead_letters_in_files=sink.get(DEAD_LETTER_RECORDS_WRITTEN, 0) if dead_letter_files else None,
        )

    def describe(self) -> str:
        text = (f"{self.rows_read:,} rows read, {self.rows_acknowledged:,} acknowledged, "
                f"{self.dead_letters:,} dead-lettered")
        if self.dead_letters_in_files is not None:
            text += f" ({self.dead_letters_in_files:,} in files)"
        return text + f", {self.rows_unaccounted:,} in flight"


class _Watcher:
    """Waits for the pipeline in a daemon thread, so that the main thread stays free for signals."""

    def __init__(self, result: PipelineResult) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._wait, args=(result,), name="wait-until-finish", daemon=True)
        self._thread.start()

    def _wait(self, result: PipelineResult) -> None:
        try:
            result.wait_until_finish()
        except BaseException as error:  # handed to the main thread, which raises it
            self.error = error

    @property
    def ended(self) -> bool:
        return not self._thread.is_alive()


class StopRequest:
    """Set by SIGINT or SIGTERM (while installed) or by the caller; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout_secs: float) -> bool:
        return self._event.wait(timeout_secs)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handles SIGINT and SIGTERM while the block runs (in the main thread only; elsewhere, a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handle(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            _LOG.warning("%s: stopping once the rows in flight are delivered or dead-lettered "
                         "(Ctrl-C again to abort at once)", name)
            self.set(name)

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def direct_runner_counts_every_bundle() -> Iterator[None]:
    """Works around a bug of Beam's streaming DirectRunner (2.77): counters keep the first bundle only.

    ``TransformExecutor.call(state_sampler)`` makes a new ``MetricsContainer``
    for each bundle, but ``StateSampler.scoped_state()`` caches each step's
    state by name with the container it was first given: every later bundle
    counts into the first bundle's container, which is never reported again.
    While this block runs, each bundle gets a tracker of its own (as the
    worker thread gets one when it starts), so each bundle's counters are
    reported; the job's figures and its stop depend on them. Without the
    hooks it needs (another Beam version), a warning says the figures may be
    short.
    """
    try:
        from apache_beam.runners.direct import executor
        from apache_beam.runners.worker import statesampler
        from apache_beam.utils import counters

        original = executor.TransformExecutor.call
    except (ImportError, AttributeError):
        _LOG.warning("Beam's DirectRunner has changed: its streaming counters may keep only the first bundle")
        yield
        return

    def call(self: Any, state_sampler: Any) -> Any:
        statesampler.set_current_tracker(statesampler.StateSampler("", counters.CounterFactory()))
        try:
            return original(self, statesampler.get_current_tracker())
        finally:
            statesampler.set_current_tracker(state_sampler)

    setattr(executor.TransformExecutor, "call", call)  # noqa: B010 (patched for the block only, see above)
    try:
        yield
    finally:
        setattr(executor.TransformExecutor, "call", original)  # noqa: B010


def run_until_stopped(
    *,
    title: str,
    argv: Sequence[str],
    config: SinkConfig,
    build: Callable[[beam.Pipeline, Endpoint, SinkConfig], None],
    dead_letter_path: str | None,
    stop_after_secs: float | None = None,
    stop: StopRequest | None = None,
    out: TextIO,
    data_dir: Path | None = None,
) -> RunSummary:
    """Runs a streaming job on the DirectRunner until it is stopped; prints and returns its summary.

    Args:
        title: The job's name, for the summary.
        argv: The command line; passed to Beam without ``--token``.
        config: The sink's settings.
        build: Adds the job's transforms to the (empty) pipeline.
        dead_letter_path: Where dead letters are written, to list in the summary.
        stop_after_secs: Stop this long after the job started; None: only on a signal or ``stop``.
        stop: Set it to stop the job (tests); SIGINT and SIGTERM also do.
        out: Where the summary goes.
        data_dir: The embedded server's data directory.

    Raises:
        RuntimeError: The pipeline failed.
    """
    options = beam_options_without_secrets(argv)
    standard = options.view_as(StandardOptions)
    standard.streaming = True
    if standard.runner is None:
        # Named: "DirectRunner" may first try the Prism runner, a download from github.com.
        standard.runner = "BundleBasedDirectRunner"
    max_dead_letter_ratio = options.get_all_options().get("max_dead_letter_ratio")
    if max_dead_letter_ratio is None:
        max_dead_letter_ratio = DEFAULT_MAX_DEAD_LETTER_RATIO
    stop = stop if stop is not None else StopRequest()
    with tinybird_endpoint(config, data_dir=data_dir) as endpoint, direct_runner_counts_every_bundle():
        started = time.monotonic()
        started_epoch_secs = time.time() - 1.0  # file times have a one-second resolution on some filesystems
        pipeline = beam.Pipeline(options=options)
        build(pipeline, endpoint, config)
        result = pipeline.run()
        _LOG.info("Running on %s until %s", standard.runner,
                  f"{stop_after_secs:g} s have passed" if stop_after_secs else "Ctrl-C or SIGTERM")
        watcher = _Watcher(result)
        with_files = bool(dead_letter_path)
        try:
            with stop.installed():
                _wait_for_stop(result, watcher, stop, started=started, stop_after_secs=stop_after_secs,
                               dead_letter_files=with_files)
                in_flight = _settle(result, watcher, timeout_secs=settle_timeout_secs(config.max_buffering_secs),
                                    dead_letter_files=with_files)
        finally:
            _cancel_without_waiting(result)
        summary = judge(summarise(
            result, elapsed_secs=time.monotonic() - started,
            dead_letter_files=list_dead_letter_files(dead_letter_path, label=config.dead_letter_label,
                                                     since_epoch_secs=started_epoch_secs)),
            max_dead_letter_ratio=max_dead_letter_ratio)
        summary = _with_losses(summary, in_flight)
        out.write(stop_note(title=title, reason=stop.reason, in_flight=in_flight))
        out.write(format_summary(summary, title=title, config=config, endpoint=endpoint,
                                 dead_letter_path=dead_letter_path))
        out.flush()
    return summary


def _wait_for_stop(result: PipelineResult, watcher: _Watcher, stop: StopRequest, *, started: float,
                   stop_after_secs: float | None, dead_letter_files: bool) -> None:
    """Returns when a stop is asked for or the time is up; raises if the pipeline failed."""
    next_report = started + PROGRESS_EVERY_SECS
    while True:
        now = time.monotonic()
        if stop_after_secs is not None and now - started >= stop_after_secs:
            stop.set(f"--stop_after_secs {stop_after_secs:g}")
        if stop.is_set():
            return
        _raise_if_ended(watcher)
        if now >= next_report:
            _LOG.info("%.0f s: %s", now - started, InFlight.of(result, dead_letter_files=dead_letter_files).describe())
            next_report = now + PROGRESS_EVERY_SECS
        stop.wait(0.2)


def _settle(result: PipelineResult, watcher: _Watcher, *, timeout_secs: float, dead_letter_files: bool) -> InFlight:
    """Waits until every row read is accounted for and in a file when dead-lettered; at most ``timeout_secs``.

    Settled means settled for ``SETTLE_STABLE_SECS`` with no new row read: a
    pull returns at once when messages are waiting, so what was published
    before the stop has been read by then, not left in a pull that the
    cancel would cut short after it acknowledged them.
    """
    deadline = time.monotonic() + timeout_secs
    in_flight = InFlight.of(result, dead_letter_files=dead_letter_files)
    _LOG.info("Stopping: %s", in_flight.describe())
    settled_since: tuple[float, int] | None = None  # (when, rows read then)
    while time.monotonic() < deadline:
        if in_flight.settled:
            if settled_since is None or settled_since[1] != in_flight.rows_read:
                settled_since = (time.monotonic(), in_flight.rows_read)
            elif time.monotonic() - settled_since[0] >= SETTLE_STABLE_SECS:
                break
        else:
            settled_since = None
        _raise_if_ended(watcher)
        time.sleep(0.2)
        in_flight = InFlight.of(result, dead_letter_files=dead_letter_files)
    if not in_flight.settled:
        _LOG.warning("Stopped after waiting %.0f s for the rows in flight: %s", timeout_secs, in_flight.describe())
    return in_flight


def _raise_if_ended(watcher: _Watcher) -> None:
    if watcher.ended:
        error = watcher.error
        if error is not None:
            raise RuntimeError(f"the streaming pipeline failed: {error}") from error
        raise RuntimeError("the streaming pipeline ended by itself")


def _cancel_without_waiting(result: PipelineResult, *, wait_secs: float = 2.0) -> None:
    """Cancels the runner; does not wait for a pull that may block its worker thread for 30 s."""
    def cancel() -> None:
        with contextlib.suppress(Exception):
            result.cancel()

    thread = threading.Thread(target=cancel, name="cancel", daemon=True)
    thread.start()
    thread.join(wait_secs)


def _with_losses(summary: RunSummary, in_flight: InFlight) -> RunSummary:
    if in_flight.settled or summary.failure is not None:
        return summary
    return dataclasses.replace(summary, failure=(
        f"{in_flight.rows_unaccounted:,} rows read were neither acknowledged nor dead-lettered, and "
        f"{in_flight.dead_letters_unwritten:,} dead letters not in a file, when the runner was cancelled"))


def stop_note(*, title: str, reason: str, in_flight: InFlight) -> str:
    """What the stop did, printed before the summary."""
    if in_flight.settled:
        return (f"{title}: stopped ({reason}) once every row read was acknowledged or dead-lettered"
                + (" and every dead letter was in a file" if in_flight.dead_letters_in_files is not None else "")
                + ".\n")
    return (f"{title}: stopped ({reason}) with rows in flight: {in_flight.describe()}. Beam's DirectRunner "
            f"acknowledged them to Pub/Sub when it read them: they are lost.\n")

