"""The in-bundle step's cost per element: one data source against three (issue 23).

    python -m benchmarks.destinations [--events N] [--repeats K]

Drives the sink's first step (encode, route, buffer) directly over the same
events, in the global window and in one-minute fixed windows, in three shapes:
to one data source by name (``datasource="events"``), to one by a function
(``DatasourceFromField`` over a field that holds one value), and to three
(``DatasourceFromField`` over a field of three values). It alternates them
``K`` times and keeps each one's fastest run: on a shared machine the minimum
of many short runs is the figure least moved by the neighbours (``python -m
benchmarks`` times whole pipelines, whose spread here is larger than the
difference looked for). Prints the microseconds per element and two ratios of
throughputs, which split what three data sources cost: calling a function per
element (one by a function over one by name) and filling three batches
instead of one (three over one by a function).

Run it in an older checkout too (``git worktree add``) for "no slower than before".
"""

from __future__ import annotations

import argparse
import sys
import time

_TYPES = ("click", "view", "purchase")


def _events(n: int) -> list[dict]:
    return [{"id": i, "type": _TYPES[i % 3], "kind": "all", "user": f"u{i % 9973}", "price": i * 0.25,
             "pad": "x" * 150} for i in range(n)]


def _one_run(events: list[dict], *, windowed: bool, field: str | None) -> float:
    """One pass of the step; ``field``: route by this field (``None``: one data source by name)."""
    from apache_beam.transforms.core import Windowing
    from apache_beam.transforms.window import FixedWindows, GlobalWindows, IntervalWindow
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue

    from sinks.tinybird import _batching

    windowfn = FixedWindows(60) if windowed else GlobalWindows()
    limits = _batching.BatchLimits(max_batch_bytes=8 * 1024 * 1024, max_batch_rows=200_000, max_buffering_secs=5,
                                   num_shards=8)
    kwargs = {}
    if field is not None:
        from sinks.tinybird import DatasourceFromField

        kwargs["routed"] = True
        datasource = DatasourceFromField(field, prefix="events_")
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
        shapes = {"one data source": None, "one by a function": "kind", "three data sources": "type"}
    except ImportError:  # a checkout from before issue 23: one data source only
        shapes = {"one data source": None}
    for windowed in (False, True):
        best = {name: float("inf") for name in shapes}
        for _ in range(args.repeats):
            for name, field in shapes.items():
                best[name] = min(best[name], _one_run(events, windowed=windowed, field=field))
        label = "fixed windows" if windowed else "global window"
        line = ", ".join(f"{name}: {best[name] / args.events * 1e6:.2f} us/element" for name in shapes)
        print(f"{label}: {line} (fastest of {args.repeats} runs of {args.events:,} elements)", flush=True)
        if len(shapes) > 1:
            one, function, three = (best[name] for name in shapes)
            print(f"  throughput ratios: three / one {one / three:.3f} = the function {one / function:.3f}"
                  f" x three batches instead of one {function / three:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
