"""Peak RSS of the bounded sink against the number of windows in one bundle (issue 21).

    python -m benchmarks.window_rss [--rows N] [WINDOWS ...]   (default: 100000 rows; 10 100000 windows)

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
``sink`` figure then includes the runner's shuffle of those rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

_PAD = "x" * 2000
_MODES = ("sink", "encoder", "shuffle")


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def _row(i: int) -> dict:
    return {"id": i, "pad": _PAD}


def _sink(rows: int, windows: int) -> dict:
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    from benchmarks._counting_endpoint import CountingEndpoint, line_checksum
    from sinks.tinybird import WriteToTinybird
    from sinks.tinybird._encoding import encode_element

    with CountingEndpoint() as endpoint:
        p = beam.Pipeline(runner=FnApiRunner())
        _ = (p | beam.Create(range(rows), reshuffle=False)
             | beam.Map(lambda i: TimestampedValue(_row(i), i % windows))
             | beam.WindowInto(FixedWindows(1))
             | WriteToTinybird(datasource="rss", token=endpoint.token, api_url=endpoint.url, compression=None,
                               num_shards=1))
        p.run().wait_until_finish()
        counts = endpoint.counts()["rss"]
    expected = line_checksum(encode_element(_row(i)) for i in range(rows))
    if (counts["lines"], counts["checksum"]) != expected:
        raise SystemExit(f"lines or checksum differ: got {counts['lines']}, expected {expected[0]}")
    return {"requests": counts["requests"], "lines": counts["lines"]}


def _encoder(rows: int, windows: int) -> dict:
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


def _shuffle(rows: int, windows: int) -> dict:
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    from sinks.tinybird._encoding import encode_element

    p = beam.Pipeline(runner=FnApiRunner())
    _ = (p | beam.Create(range(rows), reshuffle=False)
         | beam.Map(lambda i: TimestampedValue(_row(i), i % windows))
         | beam.WindowInto(FixedWindows(1))
         # A key per row: one window per key, as the sink's merge keys by window (one key
         # holding 100,000 windows is far slower to group on this runner).
         | beam.Map(lambda row: (row["id"], encode_element(row)))
         | beam.GroupByKey()
         | beam.Map(lambda kv: len(kv[1])))
    p.run().wait_until_finish()
    return {}


def _child(mode: str, rows: int, windows: int) -> None:
    started = time.monotonic()
    result = {"sink": _sink, "encoder": _encoder, "shuffle": _shuffle}[mode](rows, windows)
    print(json.dumps({"mode": mode, "windows": windows, "rows": rows, "secs": round(time.monotonic() - started, 1),
                      "peak_rss_kib": _peak_rss_kib(), **result}))


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        _child(argv[1], int(argv[2]), int(argv[3]))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.window_rss")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--modes", default=",".join(_MODES), help=f"comma-separated, of {', '.join(_MODES)}")
    parser.add_argument("windows", type=int, nargs="*", default=[10, 100_000])
    args = parser.parse_args(argv)
    for mode in args.modes.split(","):
        base = None
        for windows in args.windows:
            out = subprocess.run([sys.executable, "-m", "benchmarks.window_rss", "--child", mode, str(args.rows),
                                  str(windows)], check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            base = r["peak_rss_kib"] if base is None else base
            extra = ", ".join(f"{k} {r[k]}" for k in ("requests", "lines", "outputs", "most_open_buffers") if k in r)
            print(f"{mode:>8}: {r['windows']:>7} windows, {r['rows']} rows, {r['secs']:>6.1f} s: "
                  f"peak RSS {r['peak_rss_kib'] / 1024:7.1f} MiB ({(r['peak_rss_kib'] - base) / 1024:+7.1f} MiB)"
                  + (f"; {extra}" if extra else ""), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
