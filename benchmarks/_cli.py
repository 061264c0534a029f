"""``python -m benchmarks``: runs the scenarios and prints the table.

One run generates the events once (deterministic seed) and starts, each in a
process of its own, the counting endpoint (the target of every scenario that
measures a client: it decodes each body and counts lines and their CRC32, and
nothing more) and, when the end-to-end scenario is selected, the local Events
API server with its limits lifted. Then it runs each scenario ``--repeats``
times, each time in a fresh worker subprocess (so that CPU time and peak RSS
are the scenario's own) and into a data source of its own, whose lines (or,
end to end, stored rows) are checked afterwards. Repeats go round the
scenarios in turn, so that a noisy moment on the machine does not land on one
scenario only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from benchmarks._counting_endpoint import CountingEndpoint
from benchmarks._data import DEFAULT_SEED, DataFile, write_events
from benchmarks._report import RunResult, Summary, evaluate_targets, ratio_pairs, render, summarize
from benchmarks._worker import RESULT_PREFIX
from benchmarks.scenarios import (
    EVENTS,
    LARGE_BUNDLES,
    LOCAL_SERVER,
    PER_ELEMENT,
    SCENARIOS,
    STATEFUL,
    RunSpec,
    Scenario,
    by_name,
)
from tinybird_emulator import LocalServer, LocalServerError

__all__ = ["main"]

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# The sink's default (sinks.tinybird._transform.DEFAULT_MAX_BATCH_BYTES), not
# imported so that this process does not load Beam.
DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024
_SERVER_MAX_BODY_BYTES = 10_000_000
MEMORY_LIMIT_BYTES = 64 << 20

_QUICK = {"events": 3000, "stateful_events": 2000, "large_bundles_events": 4000, "per_element_events": 300,
          "repeats": 1, "max_batch_bytes": 64 * 1024, "bundle_events": 250, "large_bundle_events": 1000}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="WriteToTinybird side by side with a baseline, what users write instead, "
                    "and a plain-Python ceiling, against a counting /v0/events endpoint (and once "
                    "end to end against the local Events API server).")
    parser.add_argument("--events", type=int, default=500_000,
                        help="events for the baseline, the bounded sink, peers (b) and (d), the ceiling "
                             "(default 500,000)")
    parser.add_argument("--stateful-events", type=int, default=100_000,
                        help="events for the streaming scenarios and peer (c) (default 100,000)")
    parser.add_argument("--large-bundles-events", type=int, default=200_000,
                        help="events for the streaming scenarios with large bundles (default 200,000)")
    parser.add_argument("--per-element-events", type=int, default=5_000,
                        help="events for peer (a), one request per event (default 5,000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per scenario; the table shows medians (default 3)")
    parser.add_argument("--max-batch-bytes", type=int, default=DEFAULT_MAX_BATCH_BYTES,
                        help="the sink's max_batch_bytes, also used by peer (b) and the ceiling "
                             f"(default {DEFAULT_MAX_BATCH_BYTES}, the sink's default)")
    parser.add_argument("--bundle-events", type=int, default=1000,
                        help="streaming scenarios: events per bundle (default 1000)")
    parser.add_argument("--large-bundle-events", type=int, default=10_000,
                        help="the *_streaming_large scenarios: events per bundle (default 10000)")
    parser.add_argument("--scenarios", nargs="+", metavar="NAME",
                        help="scenarios to run, by name (comma or space separated; default all): "
                             + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one repeat, for a smoke run: "
                             + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in _QUICK.items()))
    parser.add_argument("--memory-check", action="store_true",
                        help="instead of the table: run the bounded sink (zstd) once at each of "
                             "--memory-sizes and compare the peak RSS")
    parser.add_argument("--memory-sizes", default="500000,5000000",
                        help="event counts for --memory-check (default 500000,5000000)")
    parser.add_argument("--profile", metavar="DIR",
                        help="instead of the table: run each selected scenario once under cProfile, "
                             "write DIR/<scenario>.prof and print the top functions")
    parser.add_argument("--instructions", action="store_true",
                        help="instead of the table: count the instructions each selected scenario's worker "
                             "executes per event, under valgrind's cachegrind (each scenario at its size and "
                             "at a tenth of it; the difference per event, so imports and set-up cancel), and "
                             "compare the pairs the targets compare")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"data seed (default {DEFAULT_SEED})")
    parser.add_argument("--json", metavar="PATH", help="also write every run's figures as JSON to PATH")
    parser.add_argument("--work-dir", help="where the data and the server's database go "
                                           "(default: a temporary folder, removed at the end)")
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        given = list(argv if argv is not None else sys.argv[1:])
        for key, value in _QUICK.items():
            flag = f"--{key.replace('_', '-')}"
            if not any(a == flag or a.startswith(flag + "=") for a in given):
                setattr(args, key, value)
    names = [n for item in (args.scenarios or [s.name for s in SCENARIOS]) for n in item.split(",") if n]
    try:
        args.selected = [by_name(n) for n in names]
    except ValueError as e:
        parser.error(str(e))
    for key in ("events", "stateful_events", "large_bundles_events", "per_element_events", "repeats",
                "bundle_events", "large_bundle_events"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.max_batch_bytes < 1024:
        parser.error("--max-batch-bytes must be at least 1024")
    try:
        args.memory_sizes = [int(x) for x in args.memory_sizes.split(",")]
    except ValueError:
        parser.error("--memory-sizes must be comma-separated integers")
    return args


def _process_cpu_secs(pid: int | None) -> float:
    """CPU seconds (user + system, every thread) used so far by process ``pid``; 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Bench:
    """The data file, the endpoints, and the runs made against them.

    Args:
        endpoint: The counting endpoint (every sending scenario but the end-to-end one).
        server: The local Events API server, or None when no selected scenario needs it.
    """

    def __init__(self, *, endpoint: CountingEndpoint, server: LocalServer | None, data: DataFile,
                 args: argparse.Namespace) -> None:
        self.endpoint = endpoint
        self.server = server
        self.data = data
        self.max_batch_bytes = args.max_batch_bytes
        self._bundle_events = {STATEFUL: args.bundle_events, LARGE_BUNDLES: args.large_bundle_events}
        self._default_bundle_events = args.bundle_events
        self._run_id = uuid.uuid4().hex[:8]
        self._runs = 0
        self._env = dict(os.environ)
        self._env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PROJECT_ROOT, self._env.get("PYTHONPATH", "")) if p)

    def run(self, scenario: Scenario, *, events: int, repeat: int, profile_path: str | None = None,
            instructions_path: str | None = None) -> RunResult:
        self._runs += 1
        datasource = f"bench_{scenario.name}_{self._run_id}_{self._runs}"
        local = scenario.endpoint == LOCAL_SERVER
        if local and self.server is None:
            raise ValueError(f"{scenario.name} needs the local Events API server")
        target: CountingEndpoint | LocalServer = self.server if local and self.server else self.endpoint
        assert target.url is not None
        spec = RunSpec(
            scenario=scenario.name, data_path=self.data.path, events=events, api_url=target.url,
            token=target.token, datasource=datasource, max_batch_bytes=self.max_batch_bytes,
            bundle_events=self._bundle_events.get(scenario.size, self._default_bundle_events),
            profile_path=profile_path)
        if local and self.server is not None:
            self.server.reset_stats()
        target_cpu_before = _process_cpu_secs(target.pid)
        # Under cachegrind without its cache simulation: only the instruction count is wanted,
        # with one hash seed, so that two runs lay out their dicts and sets alike, and without
        # OpenBLAS's pool (Beam imports numpy): its threads spin on a clock, so under valgrind
        # they counted 15-44 million instructions of busy waiting that grew with the run.
        under, env = [], self._env
        if instructions_path is not None:
            under = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={instructions_path}"]
            env = {**env, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
        proc = subprocess.run(
            [*under, sys.executable, "-m", "benchmarks._worker", json.dumps(dataclasses.asdict(spec))],
            cwd=_PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        measured = None
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                measured = json.loads(line[len(RESULT_PREFIX):])
        if local and self.server is not None:
            self.server.flush()
        checked = self._check_local(datasource) if local else self._check_counted(datasource, events)
        server_cpu = _process_cpu_secs(target.pid) - target_cpu_before
        counted = None if measured is None else measured.get("counted")
        problem = None
        if measured is None:
            tail = (proc.stderr or "").strip()[-3000:]
            problem = f"the worker failed (exit {proc.returncode}):\n{tail}"
        elif scenario.sends:
            problem = checked.problem(events)
        elif counted != events:
            problem = f"the discard saw {counted} elements for {events:,} events"
        return RunResult(
            scenario=scenario.name, repeat=repeat, events=events, ndjson_bytes=self.data.ndjson_bytes_of(events),
            elapsed_secs=measured["elapsed_secs"] if measured else 0.0,
            cpu_secs=measured["cpu_secs"] if measured else 0.0,
            max_rss_bytes=measured["max_rss_bytes"] if measured else 0, server_cpu_secs=server_cpu,
            requests=checked.requests, non_2xx=checked.non_2xx,
            lines_received=checked.lines if not local else None,
            checksum_ok=None if local or not scenario.sends else checked.checksum_ok,
            rows_stored=checked.rows if local else None, distinct_events=checked.distinct if local else None,
            quarantined=checked.quarantined, counted=counted, ok=problem is None, problem=problem)

    def _check_counted(self, datasource: str, events: int) -> _Checked:
        # The run's data source, and those it routes to (``<datasource>__<suffix>``), added up:
        # every line once in one of them, whichever.
        sources = [c for name, c in self.endpoint.counts().items()
                   if name == datasource or name.startswith(f"{datasource}__")]
        statuses = [(s, n) for c in sources for s, n in c.get("by_status", {}).items()]
        return _Checked(
            requests=sum(n for _, n in statuses), non_2xx=sum(n for s, n in statuses if not s.startswith("2")),
            lines=sum(c.get("lines", 0) for c in sources),
            checksum_ok=sum(c.get("checksum", 0) for c in sources) == self.data.checksum_of(events))

    def _check_local(self, datasource: str) -> _Checked:
        assert self.server is not None
        stats = self.server.stats()
        by_status: dict[str, int] = stats["requests"]["by_status"]
        try:
            row = self.server.query(f"SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM {datasource}")[0]
            rows, distinct = row["n"], row["d"]
        except LocalServerError:
            rows, distinct = 0, 0  # nothing arrived: the data source was never created
        return _Checked(
            requests=stats["requests"]["total"],
            non_2xx=sum(n for status, n in by_status.items() if not status.startswith("2")),
            rows=rows, distinct=distinct, quarantined=stats["rows"]["quarantined"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Checked:
    """What arrived for one run: lines and checksum at the counting endpoint, or stored rows."""

    requests: int
    non_2xx: int
    lines: int | None = None
    checksum_ok: bool | None = None
    rows: int | None = None
    distinct: int | None = None
    quarantined: int = 0

    def problem(self, events: int) -> str | None:
        if self.rows is not None:
            if self.rows == self.distinct == events and not self.quarantined:
                return None
            return (f"{self.rows:,} rows stored ({self.distinct:,} distinct events, {self.quarantined:,} "
                    f"quarantined) for {events:,} events sent")
        if self.lines == events and self.checksum_ok:
            return None
        return (f"{self.lines:,} lines received for {events:,} events sent, "
                f"checksum {'equal' if self.checksum_ok else 'DIFFERENT'}")


def _server(work_dir: str, max_batch_bytes: int) -> LocalServer:
    """The local server with its limits lifted: the sink's rate-limit handling is tested elsewhere."""
    return LocalServer(
        data_dir=os.path.join(work_dir, "server"),
        rate_limit_rps=None,
        rate_limit_bytes_per_sec=None,
        max_body_bytes=max(_SERVER_MAX_BODY_BYTES, max_batch_bytes + 1024),
        queue_max_bytes=4_000_000_000,
        queue_max_requests=1_000_000,
        # The benchmark measures clients; FULL would add an fsync per commit.
        synchronous="NORMAL",
    )


@contextlib.contextmanager
def _bench(args: argparse.Namespace, work_dir: str, data: DataFile, scenarios: Sequence[Scenario]):
    """The counting endpoint, and the local server when one of ``scenarios`` needs it."""
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(CountingEndpoint())
        server = None
        if any(s.endpoint == LOCAL_SERVER for s in scenarios):
            server = stack.enter_context(_server(work_dir, args.max_batch_bytes))
        yield _Bench(endpoint=endpoint, server=server, data=data, args=args)


def _events_for(scenario: Scenario, args: argparse.Namespace) -> int:
    return {EVENTS: args.events, STATEFUL: args.stateful_events, LARGE_BUNDLES: args.large_bundles_events,
            PER_ELEMENT: args.per_element_events}[scenario.size]


def machine_description() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import importlib.metadata as md
        beam_version = md.version("apache-beam")
    except Exception:
        beam_version = "unknown"
    return (f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"Apache Beam {beam_version}, {platform.system()} {platform.release()}")


def _generate(work_dir: str, counts: Sequence[int], seed: int) -> DataFile:
    started = time.perf_counter()
    data = write_events(os.path.join(work_dir, "events.ndjson"), max(counts), seed=seed, marks=counts)
    _log(f"generated {data.events:,} events ({data.ndjson_bytes / 1e6:.1f} MB of NDJSON, "
         f"{data.ndjson_bytes / data.events:.0f} bytes/event, seed {seed}) in {time.perf_counter() - started:.1f} s")
    return data


def _run_table(args: argparse.Namespace, work_dir: str) -> int:
    counts = {s.name: _events_for(s, args) for s in args.selected}
    data = _generate(work_dir, list(counts.values()), args.seed)
    results: dict[str, list[RunResult]] = {s.name: [] for s in args.selected}
    total = len(args.selected) * args.repeats
    started = time.perf_counter()
    with _bench(args, work_dir, data, args.selected) as bench:
        done = 0
        for repeat in range(1, args.repeats + 1):
            for scenario in args.selected:
                done += 1
                result = bench.run(scenario, events=counts[scenario.name], repeat=repeat)
                results[scenario.name].append(result)
                _log(_progress(done, total, result))
    summaries = [summarize(s, results[s.name]) for s in args.selected]
    print(f"Machine: {machine_description()}")
    print(f"Command: python -m benchmarks {' '.join(args.argv)}".rstrip())
    print(f"max_batch_bytes={args.max_batch_bytes:,}; {args.repeats} run(s) per scenario, medians shown; "
          f"streaming bundles of {args.bundle_events:,} events (*_large: {args.large_bundle_events:,}); "
          f"{time.perf_counter() - started:.0f} s in all")
    print("Every sending scenario posts to the counting endpoint (decode, count lines and their CRC32), "
          "except sink_zstd_local_server (the local Events API server, rows stored).")
    print()
    print(render(summaries, max_batch_bytes=args.max_batch_bytes))
    targets = evaluate_targets(summaries, max_batch_bytes=args.max_batch_bytes)
    if targets:
        print()
        print("Targets:")
        for target in targets:
            print(target.line())
    failed = [s for s in summaries if not s.ok]
    if failed:
        print()
        for s in failed:
            for problem in s.problems:
                print(f"FAILED {s.scenario.name}: {problem}")
    else:
        print()
        print(_exactly_once_line(summaries))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({
                "machine": machine_description(),
                "max_batch_bytes": args.max_batch_bytes,
                "scenarios": [
                    {"name": s.scenario.name, "title": s.scenario.title, "events": s.events,
                     "events_per_sec": s.events_per_sec, "mb_per_sec": s.mb_per_sec, "requests": s.requests,
                     "mean_request_bytes": s.mean_request_bytes, "cpu_secs": s.cpu_secs,
                     "max_rss_bytes": s.max_rss_bytes, "ok": s.ok, "problems": list(s.problems),
                     "runs": [dataclasses.asdict(r) for r in s.runs]}
                    for s in summaries],
                "targets": [dataclasses.asdict(t) for t in targets],
            }, fh, indent=2)
    return 1 if failed else 0


def _exactly_once_line(summaries: Sequence[Summary]) -> str:
    """The closing line when every run passed its check: what was checked, and the stored rows end to end."""
    line = ("Exactly once: in every run every event arrived once (at the counting endpoint: lines and the "
            "sum of their CRC32 equal to what was sent")
    stored = [r for s in summaries for r in s.runs if r.rows_stored is not None]
    if stored:
        outcomes = sorted({(r.rows_stored, r.distinct_events, r.quarantined, r.events) for r in stored})
        line += f"; end to end, in {len(stored)} run(s), the local Events API server stored " + ", ".join(
            f"{rows:,} rows ({distinct:,} distinct event_id, {quarantined} quarantined) for {events:,} events"
            for rows, distinct, quarantined, events in outcomes)
    return line + "); the baselines saw every event."


def _received(r: RunResult) -> str:
    if r.rows_stored is not None:
        return f"rows stored {r.rows_stored:,}/{r.events:,} ({r.distinct_events:,} distinct)"
    if r.lines_received is not None and r.checksum_ok is not None:
        return f"lines {r.lines_received:,}/{r.events:,}, checksum {'equal' if r.checksum_ok else 'DIFFERENT'}"
    return f"seen {r.counted}/{r.events:,}"


def _progress(done: int, total: int, r: RunResult) -> str:
    checked = "OK" if r.ok else "FAILED"
    rows = _received(r)
    return (f"[{done}/{total}] {r.scenario} run {r.repeat}: {r.events:,} events in {r.elapsed_secs:.2f} s = "
            f"{r.events_per_sec:,.0f} events/s, CPU {r.cpu_secs:.2f} s (server {r.server_cpu_secs:.2f} s), peak RSS {r.max_rss_bytes / 2**20:.0f} MiB, "
            f"{r.requests:,} requests ({r.non_2xx} not 2xx), {rows} {checked}"
            + (f"\n  {r.problem}" if r.problem else ""))


def _run_memory_check(args: argparse.Namespace, work_dir: str) -> int:
    scenario = by_name("sink_zstd")
    sizes = args.memory_sizes
    data = _generate(work_dir, sizes, args.seed)
    results = []
    with _bench(args, work_dir, data, [scenario]) as bench:
        for i, events in enumerate(sizes, 1):
            result = bench.run(scenario, events=events, repeat=1)
            results.append(result)
            _log(_progress(i, len(sizes), result))
    print(f"Machine: {machine_description()}")
    print(f"Command: python -m benchmarks {' '.join(args.argv)}".rstrip())
    print(f"Memory check: {scenario.name} ({scenario.title}), events read lazily from a file, "
          f"max_batch_bytes={args.max_batch_bytes:,}")
    print()
    print("| events | seconds | events/s | requests | peak RSS | exactly once (lines, checksum) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.events:,} | {r.elapsed_secs:.1f} | {r.events_per_sec:,.0f} | {r.requests:,} | "
              f"{r.max_rss_bytes / 2**20:.1f} MiB | {'OK' if r.ok else 'FAILED'} |")
    ok = all(r.ok for r in results)
    if len(results) >= 2:
        smallest, largest = results[0], results[-1]
        growth = largest.max_rss_bytes - smallest.max_rss_bytes
        within = growth <= MEMORY_LIMIT_BYTES
        print()
        print(f"Peak RSS at {largest.events:,} events minus at {smallest.events:,}: {growth / 2**20:+.1f} MiB "
              f"(target: within {MEMORY_LIMIT_BYTES >> 20} MiB): {'met' if within else 'MISSED'}")
    for r in results:
        if r.problem:
            print(f"FAILED at {r.events:,} events: {r.problem}")
    return 0 if ok else 1


def _run_profile(args: argparse.Namespace, work_dir: str) -> int:
    import pstats

    os.makedirs(args.profile, exist_ok=True)
    counts = {s.name: _events_for(s, args) for s in args.selected}
    data = _generate(work_dir, list(counts.values()), args.seed)
    ok = True
    with _bench(args, work_dir, data, args.selected) as bench:
        for scenario in args.selected:
            path = os.path.abspath(os.path.join(args.profile, f"{scenario.name}.prof"))
            result = bench.run(scenario, events=counts[scenario.name], repeat=1, profile_path=path)
            _log(_progress(1, 1, result))
            ok = ok and result.ok
            if os.path.exists(path):
                print(f"== {scenario.name}: {result.events:,} events in {result.elapsed_secs:.2f} s "
                      f"under cProfile (main thread only); {path}")
                stats = pstats.Stats(path, stream=sys.stdout)
                stats.sort_stats("tottime").print_stats(25)
    return 0 if ok else 1


def _instructions_of(path: str) -> int:
    """The instructions a cachegrind run executed (its output file's ``summary:`` line)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise ValueError(f"no summary line in {path}")


def _run_instructions(args: argparse.Namespace, work_dir: str) -> int:
    if shutil.which("valgrind") is None:
        _log("--instructions needs valgrind on PATH (Debian: apt-get install valgrind)")
        return 2
    sizes = {s.name: (max(1, _events_for(s, args) // 10), _events_for(s, args)) for s in args.selected}
    data = _generate(work_dir, sorted({n for pair in sizes.values() for n in pair}), args.seed)
    per_event: dict[str, float] = {}
    ok = True
    with _bench(args, work_dir, data, args.selected) as bench:
        for scenario in args.selected:
            counted: list[int | None] = []
            for events in sizes[scenario.name]:
                path = os.path.join(work_dir, f"cachegrind.{scenario.name}.{events}")
                result = bench.run(scenario, events=events, repeat=1, instructions_path=path)
                _log(_progress(1, 1, result))
                ok = ok and result.ok
                counted.append(_instructions_of(path) if result.ok else None)
            (small, large), (small_ir, large_ir) = sizes[scenario.name], counted
            if small_ir is not None and large_ir is not None and large > small:
                per_event[scenario.name] = (large_ir - small_ir) / (large - small)
                print(f"{scenario.name}: {per_event[scenario.name]:,.0f} instructions per event "
                      f"({large:,} events: {large_ir / 1e9:.2f} G; {small:,}: {small_ir / 1e9:.2f} G)", flush=True)
    print()
    print(f"Machine: {machine_description()}")
    print(f"Command: python -m benchmarks {' '.join(args.argv)}".rstrip())
    print("Events per instruction, as ratios (throughput on a CPU-bound run, without the machine's noise):")
    for a, b, threshold, description in ratio_pairs():
        if a in per_event and b in per_event:
            value = per_event[b] / per_event[a]
            bar = "" if threshold is None else f" (target >= {threshold:g}x): {'met' if value >= threshold else 'MISSED'}"
            print(f"- {description.replace('events/s', 'events per instruction')}: {value:.3f}x{bar}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="tinybird-bench-")
    os.makedirs(work_dir, exist_ok=True)
    try:
        if args.memory_check:
            return _run_memory_check(args, work_dir)
        if args.profile:
            return _run_profile(args, work_dir)
        if args.instructions:
            return _run_instructions(args, work_dir)
        return _run_table(args, work_dir)
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
