"""Runs one scenario in this (fresh) process and prints what it measured.

``python -m benchmarks._worker '<RunSpec as JSON>'``: imports and input
preparation happen before the timing; the timed part is the scenario's run
(pipeline construction included). CPU time is this process's (every thread)
during the timed part; peak RSS is the process's high-water mark
(``ru_maxrss``), imports included. The last stdout line is
``RESULT_PREFIX`` + JSON.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from typing import Any

from benchmarks.scenarios import RunSpec, prepare

RESULT_PREFIX = "BENCHMARK-RESULT "


def _cpu_secs() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(spec: RunSpec) -> dict[str, Any]:
    timed = prepare(spec)
    gc.collect()
    profiler = None
    if spec.profile_path:
        import cProfile
        profiler = cProfile.Profile()
    cpu0, t0 = _cpu_secs(), time.perf_counter()
    counted: int | None = timed() if profiler is None else profiler.runcall(timed)
    elapsed, cpu = time.perf_counter() - t0, _cpu_secs() - cpu0
    if profiler is not None:
        profiler.dump_stats(spec.profile_path)
    return {
        "elapsed_secs": elapsed,
        "cpu_secs": cpu,
        # Linux reports ru_maxrss in KiB.
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "counted": counted,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks._worker '<RunSpec JSON>'", file=sys.stderr)
        return 2
    result = measure(RunSpec(**json.loads(argv[0])))
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
