"""Peak RSS of the bounded sink against the number of windows in one bundle (issue 21).

    python -m benchmarks.window_rss [WINDOWS ...]   (default: 10 100000)

Each run is a subprocess of its own (its VmHWM is its own): ``WINDOWS`` one-row
fixed windows of 1 s, rows of about 2 KB, one bundle (``Create`` without
reshuffle) on the FnApiRunner, posted to a local counting server that answers
every request with its row count. Prints peak RSS per run and the difference
with the first run.
"""

from __future__ import annotations

import json
import subprocess
import sys


def _child(windows: int) -> None:
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    sys.path.insert(0, "tests/sink")
    from sink_testlib import ScriptedServer

    from sinks.tinybird import WriteToTinybird

    rows = 100_000
    pad = "x" * 2000
    with ScriptedServer() as server:
        p = beam.Pipeline(runner=FnApiRunner())
        _ = (p | beam.Create(range(rows), reshuffle=False)
             | beam.Map(lambda i: TimestampedValue({"id": i, "pad": pad}, i % windows))
             | beam.WindowInto(FixedWindows(1))
             | WriteToTinybird(datasource="rss", token="t", api_url=server.url, compression=None, num_shards=1))
        p.run().wait_until_finish()
        requests = len(server.requests)
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"windows": windows, "rows": rows, "requests": requests, "peak_rss_kib": peak}))


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        _child(int(argv[1]))
        return
    sizes = [int(a) for a in argv] or [10, 100_000]
    results = []
    for windows in sizes:
        out = subprocess.run([sys.executable, "-m", "benchmarks.window_rss", "--child", str(windows)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    base = results[0]["peak_rss_kib"]
    for r in results:
        print(f"{r['windows']:>7} windows, {r['rows']} rows, {r['requests']:>6} requests: "
              f"peak RSS {r['peak_rss_kib'] / 1024:7.1f} MiB ({(r['peak_rss_kib'] - base) / 1024:+.1f} MiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
