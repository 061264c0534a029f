"""Run as a script by test_hostile_server.py: a small pipeline that posts events to a
server, then prints, as JSON, the process's peak RSS and where every id ended.

    python tests/sink/rss_probe.py URL EVENTS DEAD_LETTER_DIR

It runs in a process of its own so that its peak RSS (VmHWM) is the worker's
alone: the FnApiRunner runs the sink's DoFns in this process.
"""

from __future__ import annotations

import glob
import json
import os
import sys

TOKEN = "p.SECRET-test-token-7f3a9c51d2"


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def main() -> None:
    url, events, dead_letter_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from sinks.tinybird import RetryPolicy, WriteToTinybird

    p = beam.Pipeline(runner=FnApiRunner())
    _ = (
        p
        | beam.Create([{"id": i, "pad": "x" * 40} for i in range(events)], reshuffle=False)
        | WriteToTinybird(
            datasource="rss", token=TOKEN, api_url=url, max_batch_bytes=16 * 1024, num_shards=1,
            max_in_flight=2, connect_timeout_secs=2, read_timeout_secs=2,
            retry_policy=RetryPolicy(max_attempts=2, initial_backoff_secs=0.01, max_backoff_secs=0.01,
                                     max_total_secs=10),
            dead_letter_path=dead_letter_dir + "/")
    )
    result = p.run()
    result.wait_until_finish()
    counters = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace("tinybird"))["counters"]:
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + counter.committed
    dead = []
    for name in glob.glob(os.path.join(dead_letter_dir, "*")):
        with open(name) as fh:
            dead += [json.loads(json.loads(line)["line"])["id"] for line in fh if line.strip()]
    print(json.dumps({"peak_rss_kib": _peak_rss_kib(), "counters": counters, "dead_letter_ids": dead}))


if __name__ == "__main__":
    main()
