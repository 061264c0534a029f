"""The in-bundle step's cost per element: one data source against three (issue 23).

    python -m benchmarks.destinations [--events N] [--repeats K]

Drives the sink's first step (encode, route, buffer) directly over the same
events, in the global window and in one-minute fixed windows, to one data
source (``datasource="events"``) and to three (``DatasourceFromField`` over a
field of three values), alternating the two ``K`` times and keeping each one's
fastest run: on a shared machine the minimum of many short runs is the figure
least moved by the neighbours (``python -m benchmarks`` times whole pipelines,
whose spread here is larger than the difference looked for). Prints the
microseconds per element and the ratio of the throughputs (three over one).

Run it in an older checkout too (``git worktree add``) for "no slower than before".
"""

from __future__ import annotations

import argparse
import sys
import time

_TYPES = ("click", "view", "purchase")


def _events(n: int) -> list[dict]:
    return [{"id": i, "type": _TYPES[i % 3], "user": f"u{i % 9973}", "price": i * 0.25, "pad": "x" * 150}
            for i in range(n)]


def _one_run(events: list[dict], *, windowed: bool, routed: bool) -> float:
    from apache_beam.transforms.core import Windowing
    from apache_beam.transforms.window import FixedWindows, GlobalWindows, IntervalWindow
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird import _batching

    windowfn = FixedWindows(60) if windowed else GlobalWindows()
    limits = _batching.BatchLimits(max_batch_bytes=8 * 1024 * 1024, max_batch_rows=200_000, max_buffering_secs=5,
                                   num_shards=8)
    kwargs = {}
    if routed:
        from sinks.tinybird import DatasourceFromField

        kwargs["routed"] = True
        datasource = DatasourceFromField("type", prefix="events_")
    else:
        datasource = "events"
    dofn = _batching.encoder_for(windowfn, bounded=True, **kwargs)(
        datasource=datasource, limits=limits, windowing=Windowing(windowfn))
    dofn.setup()
    dofn.start_bundle()
    if windowed:
        values = [WindowedValue(e, Timestamp(e["id"] // 100), (IntervalWindow(e["id"] // 6000 * 60,
                                                                           e["id"] // 6000 * 60 + 60),))
                  for e in events]
        started = time.perf_counter()
        for wv in values:
            dofn.process(wv.value, wv=wv)
    else:
        from apache_beam.transforms.window import GlobalWindow

        values = [WindowedValue(e, Timestamp(0), (GlobalWindow(),)) for e in events]
        started = time.perf_counter()
        for wv in values:
            dofn.process(wv.value, wv=wv)
    for _ in dofn.finish_bundle():
        pass
    return time.perf_counter() - started


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.destinations")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    events = _events(args.events)
    try:
        from sinks.tinybird import DatasourceFromField  # noqa: F401
        shapes = [("one", False), ("three", True)]
    except ImportError:  # a checkout from before issue 23: one data source only
        shapes = [("one", False)]
    for windowed in (False, True):
        best = {name: float("inf") for name, _ in shapes}
        for _ in range(args.repeats):
            for name, routed in shapes:
                best[name] = min(best[name], _one_run(events, windowed=windowed, routed=routed))
        label = "fixed windows" if windowed else "global window"
        line = ", ".join(f"{name} data source{'s' if name != 'one' else ''}: "
                         f"{best[name] / args.events * 1e6:.2f} us/element" for name, _ in shapes)
        ratio = f"; three / one throughput {best['one'] / best['three']:.3f}" if "three" in best else ""
        print(f"{label}: {line}{ratio} (fastest of {args.repeats} runs of {args.events:,} elements)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
