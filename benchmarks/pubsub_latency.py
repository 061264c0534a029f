"""Publish-to-stored latency of the streaming job under a steady publish rate, per ``max_buffering_secs``.

    python -m benchmarks.pubsub_latency [--rate 20] [--secs 30] [--buffering 1,5] [--quick]

Starts Google's Pub/Sub emulator and the local Events API server on 127.0.0.1,
then for each ``max_buffering_secs`` runs ``python -m pipelines.streaming_to_tinybird``
on Beam's DirectRunner (a subprocess, as a user runs it, ``--wait``: a row counts
as stored once the server has committed it). A publisher sends ``--rate``
messages per second (one event each) for ``--secs`` seconds, then keeps the
same rate for ``max_buffering_secs + 5`` seconds more so that the measured
messages are flushed in a steady state (Beam's DirectRunner stalls for up to
30 s in an empty pull once publishing stops: that tail is not measured). A
poller reads the data source every 0.1 s and notes when each id first
appears. Latency = first seen stored - handed to the publisher client; the
figures include the poll interval (up to 0.1 s). The job is then killed
(SIGKILL): the figures are the only output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pipelines._pubsub_emulator import EmulatorUnavailable, PubSubEmulator, stop_process_group
from tinybird_emulator import LocalServer

REPO_ROOT = Path(__file__).resolve().parents[1]
POLL_SECS = 0.1
TAIL_EXTRA_SECS = 5.0
JOB_START_TIMEOUT_SECS = 90.0
DRAIN_TIMEOUT_SECS = 60.0


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    """One scenario's figures (seconds)."""

    max_buffering_secs: float
    rate_per_sec: float
    published: int
    stored: int
    p50_secs: float
    p99_secs: float
    max_secs: float


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile by the nearest-rank method (p99 of 100 values is the 99th smallest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


class _Poller(threading.Thread):
    """Notes when each id first appears in the data source."""

    def __init__(self, server: LocalServer, datasource: str) -> None:
        super().__init__(daemon=True)
        self.first_seen: dict[int, float] = {}
        self._server, self._datasource = server, datasource
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(POLL_SECS):
            if self._datasource not in self._server.datasources():
                continue
            now = time.time()
            for row in self._server.query(f"SELECT id FROM {self._datasource}"):
                self.first_seen.setdefault(int(row["id"]), now)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _publish_steadily(emulator: PubSubEmulator, topic: str, *, rate: float, secs: float, tail_secs: float,
                      sent_at: dict[int, float]) -> int:
    """Publishes at ``rate`` for ``secs`` (measured ids from 0), then ``tail_secs`` more (ids from 10^9).

    Returns the number of measured messages.
    """
    interval = 1.0 / rate
    measured = 0
    with emulator.publisher() as client:
        started = time.monotonic()
        n = 0
        while True:
            due = started + n * interval
            elapsed = due - started
            if elapsed >= secs + tail_secs:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            in_window = elapsed < secs
            event_id = measured if in_window else 1_000_000_000 + n
            data = json.dumps({"id": event_id, "kind": "latency", "n": n}).encode()
            if in_window:
                sent_at[event_id] = time.time()
                measured += 1
            client.publish(topic, data)
            n += 1
    return measured


def _start_job(emulator: PubSubEmulator, server: LocalServer, *, subscription: str, datasource: str,
               max_buffering_secs: float, work_dir: Path) -> subprocess.Popen[bytes]:
    env = emulator.environ()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    log = work_dir / f"job-{max_buffering_secs:g}.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.streaming_to_tinybird", "--input_subscription", subscription,
             "--api_url", server.url, "--token", server.token, "--datasource", datasource, "--wait",
             "--max_buffering_secs", f"{max_buffering_secs:g}", "--window_secs", "60"],
            cwd=work_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)
    deadline = time.monotonic() + JOB_START_TIMEOUT_SECS
    while b"Running on" not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_group(process, sig=signal.SIGKILL)
            raise RuntimeError(f"the streaming job did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    return process


def measure(emulator: PubSubEmulator, server: LocalServer, *, max_buffering_secs: float, rate: float,
            secs: float, work_dir: Path, name: str) -> LatencyResult:
    """One scenario: a job with ``max_buffering_secs``, ``rate`` messages/s for ``secs`` s."""
    topic = emulator.create_topic(f"latency_{name}")
    subscription = emulator.create_subscription(f"latency_{name}_sub", topic=topic)
    datasource = f"latency_{name}"
    process = _start_job(emulator, server, subscription=subscription, datasource=datasource,
                         max_buffering_secs=max_buffering_secs, work_dir=work_dir)
    poller = _Poller(server, datasource)
    poller.start()
    sent_at: dict[int, float] = {}
    try:
        published = _publish_steadily(emulator, topic, rate=rate, secs=secs,
                                      tail_secs=max_buffering_secs + TAIL_EXTRA_SECS, sent_at=sent_at)
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECS
        while time.monotonic() < deadline and not all(i in poller.first_seen for i in sent_at):
            time.sleep(POLL_SECS)
    finally:
        poller.stop()
        stop_process_group(process, sig=signal.SIGKILL)
    latencies = [poller.first_seen[i] - sent for i, sent in sent_at.items() if i in poller.first_seen]
    if not latencies:
        raise RuntimeError(f"no measured message was stored (see {work_dir})")
    return LatencyResult(
        max_buffering_secs=max_buffering_secs, rate_per_sec=rate, published=published, stored=len(latencies),
        p50_secs=statistics.median(latencies), p99_secs=percentile(latencies, 0.99), max_secs=max(latencies))


def format_results(results: Sequence[LatencyResult], *, secs: float) -> str:
    lines = [
        f"Pub/Sub -> Tinybird, publish-to-stored latency (DirectRunner, Pub/Sub emulator, local server, "
        f"--wait), {secs:g} s of steady publishing per row",
        f"{'max_buffering_secs':>18} {'msg/s':>6} {'published':>9} {'stored':>7} {'p50 s':>6} {'p99 s':>6} {'max s':>6}",
    ]
    for r in results:
        lines.append(f"{r.max_buffering_secs:>18g} {r.rate_per_sec:>6g} {r.published:>9,} {r.stored:>7,} "
                     f"{r.p50_secs:>6.2f} {r.p99_secs:>6.2f} {r.max_secs:>6.2f}")
    return "\n".join(lines) + "\n"


def run(*, rate: float, secs: float, buffering: Sequence[float], out: TextIO,
        emulator: PubSubEmulator | None = None, server: LocalServer | None = None,
        work_dir: Path | None = None) -> list[LatencyResult]:
    """Runs every scenario and prints the table; starts the emulator and the server unless given."""
    with tempfile.TemporaryDirectory(prefix="pubsub-latency-") as scratch:
        base = Path(work_dir or scratch)
        own_emulator = PubSubEmulator(data_dir=base / "pubsub") if emulator is None else None
        own_server = LocalServer(data_dir=base / "tinybird", rate_limit_rps=None) if server is None else None
        try:
            if own_emulator is not None:
                emulator = own_emulator.start()
            if own_server is not None:
                server = own_server.__enter__()
            assert emulator is not None and server is not None
            results = []
            for value in buffering:
                name = f"b{str(value).replace('.', '_')}_{int(time.time())}"
                result = measure(emulator, server, max_buffering_secs=value, rate=rate, secs=secs,
                                 work_dir=base, name=name)
                results.append(result)
                out.write(f"  max_buffering_secs={value:g}: p50 {result.p50_secs:.2f} s, p99 {result.p99_secs:.2f} s "
                          f"({result.stored:,}/{result.published:,} stored)\n")
                out.flush()
        finally:
            if own_server is not None:
                own_server.__exit__(None, None, None)
            if own_emulator is not None:
                own_emulator.stop()
    out.write(format_results(results, secs=secs))
    out.flush()
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pubsub_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20.0, help="messages published per second (default 20)")
    parser.add_argument("--secs", type=float, default=30.0, help="seconds of measured publishing (default 30)")
    parser.add_argument("--buffering", default="1,5",
                        help="comma-separated max_buffering_secs values, one scenario each (default 1,5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 msg/s for 5 s, max_buffering_secs 1")
    args = parser.parse_args(argv)
    rate, secs, buffering = args.rate, args.secs, [float(v) for v in args.buffering.split(",") if v.strip()]
    if args.quick:
        rate, secs, buffering = 10.0, 5.0, [1.0]
    try:
        run(rate=rate, secs=secs, buffering=buffering, out=sys.stdout)
    except EmulatorUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
