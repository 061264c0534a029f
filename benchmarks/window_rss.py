"""Peak RSS of the bounded sink against the number of windows in one bundle (issue 21).

    python -m benchmarks.window_rss [--rows N] [--modes M,...] [--runner fnapi|multiprocess|prism] [WINDOWS ...]
        (default: 100000 rows; 10 100000 windows; every mode; the FnApiRunner)

``N`` rows of about 2 KB in ``WINDOWS`` one-second fixed windows, all in one
bundle (``Create`` without reshuffle), each measured in a subprocess of its own
(its VmHWM is its own), three ways:

- ``sink``: the whole pipeline on the FnApiRunner, posting to the counting
  endpoint (``benchmarks/_counting_endpoint.py``, which counts lines and
  answers without storing, so 100,000 one-row requests take a minute or two);
  every line is checked to have arrived once (count and checksum).
- ``encoder``: the sink's in-bundle step alone (``_EncodeAndBatchDoFn`` driven
  directly through one bundle, its outputs counted and dropped): what the sink
  itself holds.
- ``shuffle``: the same rows through a plain ``GroupByKey`` and nothing else:
  what the FnApiRunner's in-process shuffle holds of them, whatever the sink
  does (a runner with an external shuffle, as Dataflow's, holds it elsewhere).

With many windows the sink keeps ``max_windows_per_bundle`` buffers open and
sends the others to the cross-bundle merge (a ``GroupByKey``), as Beam's
``WriteToFiles`` spills writers past ``max_writers_per_bundle``: the
``sink`` figure on the FnApiRunner then includes the runner's shuffle of
those rows.

``--runner multiprocess`` runs them on the FnApiRunner with
``--direct_running_mode=multi_processing`` (one worker): the SDK worker is a
subprocess (``sdk_worker_main``) and the runner, holding the shuffle, is the
measured process, as a Dataflow worker's SDK harness is apart from its
shuffle. The bundles' data goes between them over the data plane in chunks of
at most 10 MB, with at most 5 chunks queued on the worker's side. The worker's
peak is its VmHWM, read every 0.1 s while it runs (the high-water mark, so
only a peak in its last 0.1 s could be missed).

``--runner prism`` runs ``sink`` and ``shuffle`` on Prism instead (the Go
binary ``./dev engines prism`` builds, at this environment's Beam version, or
``--prism-location``), with a LOOPBACK worker: the SDK worker runs in the
measured process, and Prism, a process of its own, holds the shuffle. Both
peaks are printed: the worker's (what the sink holds) and Prism's (its
VmHWM, read from ``/proc`` when the pipeline is done, Prism still running).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

_PAD = "x" * 2000
_MODES = ("sink", "encoder", "shuffle")
_RUNNERS = ("fnapi", "multiprocess", "prism")


def _peak_rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def _default_prism() -> str:
    import apache_beam as beam

    cache = Path(os.environ.get("BEAM_TINYBIRD_ENGINES_CACHE", Path.home() / ".cache" / "beam-tinybird-engines"))
    return str(cache / f"prism-v{beam.__version__}" / "prism")


def _pipeline(runner: str, prism: str):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    if runner == "fnapi":
        return beam.Pipeline(runner=FnApiRunner())
    if runner == "multiprocess":
        return beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(
            ["--direct_running_mode=multi_processing", "--direct_num_workers=1"]))
    return beam.Pipeline(options=PipelineOptions(
        ["--runner=PrismRunner", f"--prism_location={prism}", "--environment_type=LOOPBACK"]))


def _descendants(matches: Callable[[str], bool]) -> list[int]:
    """The pids of this process's descendants whose ``/proc/PID`` entry ``matches``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # gone meanwhile
    pids = []
    for pid in parents:
        ancestor = parents[pid]
        while ancestor not in (0, 1, os.getpid()):
            ancestor = parents.get(ancestor, 0)
        try:
            if ancestor == os.getpid() and matches(f"/proc/{pid}"):
                pids.append(pid)
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return pids


def _runs(binary: str) -> Callable[[str], bool]:
    return lambda proc: os.path.realpath(f"{proc}/exe") == os.path.realpath(binary)


def _is_sdk_worker(proc: str) -> bool:
    """A Python running ``sdk_worker_main`` (not the shell that started it)."""
    with open(f"{proc}/cmdline", "rb") as fh:
        command = fh.read()
    return b"sdk_worker_main" in command and os.path.basename(os.path.realpath(f"{proc}/exe")).startswith("python")


class _WorkerPeaks:
    """Reads the VmHWM of this process's SDK worker subprocesses every 0.1 s while running
    (with ``runner`` ``"multiprocess"``; for the others there are none, and it does nothing)."""

    def __init__(self, runner: str) -> None:
        self._enabled = runner == "multiprocess"

    def __enter__(self) -> _WorkerPeaks:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        if self._enabled:
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            for pid in _descendants(_is_sdk_worker):
                try:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), _peak_rss_kib(pid))
                except (OSError, StopIteration):
                    continue  # it ended meanwhile

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._enabled:
            self._thread.join()


def _runner_peak(runner: str, prism: str, workers: _WorkerPeaks) -> dict:
    """The peak RSS of what runs beside this process: Prism's (it runs until this process exits),
    or the SDK worker's (multiprocess); nothing for the in-process FnApiRunner."""
    if runner == "prism":
        (pid,) = _descendants(_runs(prism))
        return {"runner_peak_rss_kib": _peak_rss_kib(pid)}
    if runner == "multiprocess":
        (peak,) = workers.peaks.values()
        return {"worker_peak_rss_kib": peak}
    return {}


def _row(i: int) -> dict:
    return {"id": i, "pad": _PAD}


def _bundle_probe():
    """A pass-through DoFn recording how many elements each bundle held (distribution ``bundle_elements``)."""
    import apache_beam as beam
    from apache_beam.metrics.metric import Metrics

    class BundleSizes(beam.DoFn):
        def setup(self) -> None:
            self._sizes = Metrics.distribution("window_rss", "bundle_elements")

        def start_bundle(self) -> None:
            self._in_bundle = 0

        def process(self, element):
            self._in_bundle += 1
            yield element

        def finish_bundle(self) -> None:
            self._sizes.update(self._in_bundle)

    return beam.ParDo(BundleSizes())


def _bundles(result) -> str:
    """``"COUNT (largest N)"``: the bundles the sink's first step was handed."""
    from apache_beam.metrics.metric import MetricsFilter

    (sizes,) = [d.committed for d in result.metrics().query(MetricsFilter().with_namespace("window_rss"))[
        "distributions"]]
    return f"{sizes.count} (largest {sizes.max})"


def _sink(rows: int, windows: int, runner: str, prism: str) -> dict:
    import apache_beam as beam
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    from benchmarks._counting_endpoint import CountingEndpoint, line_checksum
    from sinks.tinybird import WriteToTinybird
    from sinks.tinybird._encoding import encode_element

    with CountingEndpoint() as endpoint, _WorkerPeaks(runner) as workers:
        p = _pipeline(runner, prism)
        _ = (p | beam.Create(range(rows), reshuffle=False)
             | beam.Map(lambda i: TimestampedValue(_row(i), i % windows))
             | beam.WindowInto(FixedWindows(1))
             | "Probe" >> _bundle_probe()
             | WriteToTinybird(datasource="rss", token=endpoint.token, api_url=endpoint.url, compression=None,
                               num_shards=1))
        result = p.run()
        result.wait_until_finish()
        counts = endpoint.counts()["rss"]
    runner_peak = _runner_peak(runner, prism, workers)
    expected = line_checksum(encode_element(_row(i)) for i in range(rows))
    if (counts["lines"], counts["checksum"]) != expected:
        raise SystemExit(f"lines or checksum differ: got {counts['lines']}, expected {expected[0]}")
    return {"bundles": _bundles(result), "requests": counts["requests"], "lines": counts["lines"], **runner_peak}


def _encoder(rows: int, windows: int, runner: str, prism: str) -> dict:
    from apache_beam.transforms.core import Windowing
    from apache_beam.transforms.window import FixedWindows, IntervalWindow
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird._batching import BatchLimits, _EncodeAndBatchDoFn
    from sinks.tinybird._transform import (
        DEFAULT_MAX_BATCH_BYTES,
        DEFAULT_MAX_BATCH_ROWS,
        DEFAULT_MAX_WINDOWS_PER_BUNDLE,
    )

    limits = BatchLimits(max_batch_bytes=DEFAULT_MAX_BATCH_BYTES, max_batch_rows=DEFAULT_MAX_BATCH_ROWS,
                         max_buffering_secs=5, num_shards=1, max_windows_per_bundle=DEFAULT_MAX_WINDOWS_PER_BUNDLE)
    dofn = _EncodeAndBatchDoFn(datasource="rss", limits=limits, windowing=Windowing(FixedWindows(1)))
    dofn.setup()
    dofn.start_bundle()
    outputs = most_open = 0
    for i in range(rows):
        start = i % windows
        wv = WindowedValue(_row(i), Timestamp(start), (IntervalWindow(start, start + 1),))
        outputs += len(dofn.process(wv.value, wv=wv) or ())
        most_open = max(most_open, len(dofn._buffers._buffers))
    outputs += sum(1 for _ in dofn.finish_bundle())
    return {"outputs": outputs, "most_open_buffers": most_open}


def _shuffle(rows: int, windows: int, runner: str, prism: str) -> dict:
    import apache_beam as beam
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    from sinks.tinybird._encoding import encode_element

    with _WorkerPeaks(runner) as workers:
        p = _pipeline(runner, prism)
        _ = (p | beam.Create(range(rows), reshuffle=False)
             | beam.Map(lambda i: TimestampedValue(_row(i), i % windows))
             | beam.WindowInto(FixedWindows(1))
             # A key per row: one window per key, as the sink's merge keys by window (one key
         # holding 100,000 windows is far slower to group on this runner).
             | beam.Map(lambda row: (row["id"], encode_element(row)))
             | beam.GroupByKey()
             | beam.Map(lambda kv: len(kv[1])))
        p.run().wait_until_finish()
    return _runner_peak(runner, prism, workers)


def _child(mode: str, rows: int, windows: int, runner: str, prism: str) -> None:
    started = time.monotonic()
    result = {"sink": _sink, "encoder": _encoder, "shuffle": _shuffle}[mode](rows, windows, runner, prism)
    print(json.dumps({"mode": mode, "windows": windows, "rows": rows, "secs": round(time.monotonic() - started, 1),
                      "peak_rss_kib": _peak_rss_kib(), **result}))


def _mib(kib: int) -> str:
    return f"{kib / 1024:7.1f} MiB"


def _against(kib: int, base_kib: int) -> str:
    return f"({(kib - base_kib) / 1024:+7.1f} MiB, x{kib / base_kib:.2f})"


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        _child(argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5])
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.window_rss")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--modes", default=",".join(_MODES), help=f"comma-separated, of {', '.join(_MODES)}")
    parser.add_argument("--runner", choices=_RUNNERS, default="fnapi",
                        help="the runner of the sink and shuffle modes (the encoder needs none)")
    parser.add_argument("--prism-location", default=None, help="the Prism binary (default: where ./dev engines puts it)")
    parser.add_argument("windows", type=int, nargs="*", default=[10, 100_000])
    args = parser.parse_args(argv)
    prism = args.prism_location or _default_prism()
    if args.runner == "prism" and not os.access(prism, os.X_OK):
        raise SystemExit(f"{prism} is missing: run `./dev engines prism`, or give --prism-location")
    for mode in args.modes.split(","):
        base: dict | None = None
        for windows in args.windows:
            child = subprocess.run([sys.executable, "-m", "benchmarks.window_rss", "--child", mode, str(args.rows),
                                    str(windows), args.runner, prism], capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"{mode}, {windows} windows: exit status {child.returncode}\n{child.stderr[-3000:]}")
            r = json.loads(child.stdout.strip().splitlines()[-1])
            base = base or r
            extra = ", ".join(f"{k} {r[k]}" for k in ("bundles", "requests", "lines", "outputs", "most_open_buffers") if k in r)
            runner = "" if mode == "encoder" else f" on {args.runner}"
            peaks = f"peak RSS {_mib(r['peak_rss_kib'])} {_against(r['peak_rss_kib'], base['peak_rss_kib'])}"
            if "runner_peak_rss_kib" in r:
                peaks = (f"worker {peaks}; Prism {_mib(r['runner_peak_rss_kib'])} "
                         f"{_against(r['runner_peak_rss_kib'], base['runner_peak_rss_kib'])}")
            if "worker_peak_rss_kib" in r:
                peaks = (f"worker peak RSS {_mib(r['worker_peak_rss_kib'])} "
                         f"{_against(r['worker_peak_rss_kib'], base['worker_peak_rss_kib'])}; runner {peaks}")
            print(f"{mode + runner:>16}: {r['windows']:>7} windows, {r['rows']} rows, {r['secs']:>6.1f} s: {peaks}"
                  + (f"; {extra}" if extra else ""), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
