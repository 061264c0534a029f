"""N worker processes, each its own Beam pipeline, against one data source's global rate limit.

Issue 22's figure, as a user would meet it: every process runs ``WriteToTinybird``
with its default settings (100-row batches) on its share of the rows, against the
local Events API server limited to ``--rate-limit-rps`` requests/s per data source
(429 with ``Retry-After`` past it). The clock starts once every process has
imported Beam and built its input, and stops when the last pipeline ends.

    python -m benchmarks.throttling_processes --processes 8      # 40,000 rows, 5 req/s: ideal 80 s
    python -m benchmarks.throttling_processes --processes 4 --json out.json

It prints dead letters, rows lost (ids neither stored nor dead-lettered), the wall
time against the ideal (requests needed / capacity), the share of requests the
server answered 429, and each process's rate as a share of a fair split. The exit
status is 1 when a row was lost or dead-lettered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["Figures", "main", "run"]

_DATASOURCE = "throttled_events"
_WORKER_PREFIX = "THROTTLING-WORKER "
_READY_TIMEOUT_SECS = 120.0


@dataclasses.dataclass(frozen=True)
class Figures:
    """What one run shows.

    Attributes:
        processes: Worker processes.
        rows: Rows offered, ids 0..rows-1 split evenly among the processes.
        rate_limit_rps: The server's requests per second per data source.
        stored_ids: Distinct ids the server stored.
        duplicates: Stored rows beyond one per id.
        dead_letters: Rows dead-lettered (by every process).
        lost: Ids neither stored nor dead-lettered.
        requests: Requests the server answered.
        answered_429: Of them, 429.
        wall_secs: From the common start to the end of the last pipeline.
        ideal_secs: Requests needed (rows / batch rows) over the capacity.
        process_secs: Each process's time from the start to its pipeline's end.
        process_shares: Each process's rows per second over a fair split of the
            capacity (rows per second / processes).
        throttled_secs: Each process's ``cumulativeThrottlingSeconds``.
    """

    processes: int
    rows: int
    rate_limit_rps: float
    stored_ids: int
    duplicates: int
    dead_letters: int
    lost: int
    requests: int
    answered_429: int
    wall_secs: float
    ideal_secs: float
    process_secs: tuple[float, ...]
    process_shares: tuple[float, ...]
    throttled_secs: tuple[int, ...]

    @property
    def share_429(self) -> float:
        return self.answered_429 / self.requests if self.requests else 0.0

    def report(self) -> str:
        shares = ", ".join(f"{s:.2f}" for s in self.process_shares)
        return "\n".join([
            f"processes {self.processes}, rows {self.rows:,}, server limit {self.rate_limit_rps:g} requests/s",
            f"dead letters {self.dead_letters}, lost {self.lost}, duplicates {self.duplicates}",
            f"wall {self.wall_secs:.1f} s vs ideal {self.ideal_secs:.1f} s ({self.wall_secs / self.ideal_secs:.2f}x)",
            f"answered 429: {self.answered_429} of {self.requests} requests ({100 * self.share_429:.1f}%)",
            f"each process's rate over a fair share: {shares}",
            f"each process's time: {', '.join(f'{s:.1f}' for s in self.process_secs)} s; "
            f"cumulativeThrottlingSeconds: {', '.join(str(s) for s in self.throttled_secs)}",
        ])


def run(*, processes: int, rows: int, rate_limit_rps: float, batch_rows: int = 100,
        rate_limit_bytes_per_sec: int | None = None, work_dir: Path | None = None,
        timeout_secs: float | None = None) -> Figures:
    """Starts a rate-limited local server and ``processes`` worker processes; returns the figures.

    Raises:
        RuntimeError: A worker failed, or did not end within ``timeout_secs`` of the start.
    """
    from tinybird_emulator import LocalServer

    if processes < 1 or rows < processes:
        raise ValueError(f"need processes >= 1 and rows >= processes, got {processes} and {rows}")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        with LocalServer(data_dir=root / "server", rate_limit_rps=rate_limit_rps,
                         rate_limit_bytes_per_sec=rate_limit_bytes_per_sec) as server:
            go = root / "go"
            workers = []
            for index in range(processes):
                spec = {"index": index, "start": rows * index // processes, "stop": rows * (index + 1) // processes,
                        "batch_rows": batch_rows, "api_url": server.url, "token": server.token,
                        "dead_letter_dir": str(root / f"dead-{index}"), "ready": str(root / f"ready-{index}"),
                        "go": str(go)}
                # The spec (it holds the token) goes through stdin, not the command line.
                worker = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.throttling_processes", "--worker"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
                assert worker.stdin is not None
                worker.stdin.write(json.dumps(spec))
                worker.stdin.close()
                worker.stdin = None  # written and closed: communicate() below only reads
                workers.append(worker)
            deadline = time.monotonic() + _READY_TIMEOUT_SECS
            while not all((root / f"ready-{i}").exists() for i in range(processes)):
                if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                    for w in workers:
                        w.kill()
                    raise RuntimeError("a worker process did not get ready")
                time.sleep(0.05)
            server.reset_stats()
            started = time.time()
            go.write_text(str(started))
            results = []
            for worker in workers:
                assert worker.stdout is not None
                try:
                    out, _ = worker.communicate(
                        timeout=None if timeout_secs is None else max(0.0, started + timeout_secs - time.time()))
                except subprocess.TimeoutExpired:
                    for w in workers:
                        w.kill()
                    raise RuntimeError(f"a worker process did not end within {timeout_secs:g} s") from None
                if worker.returncode != 0:
                    raise RuntimeError(f"a worker process failed with status {worker.returncode}")
                line = next(x for x in out.splitlines() if x.startswith(_WORKER_PREFIX))
                results.append(json.loads(line[len(_WORKER_PREFIX):]))
            server.flush()
            stats = server.stats()["requests"]
            stored = [r["id"] for r in server.query(f"SELECT id FROM {_DATASOURCE}")] \
                if _DATASOURCE in server.datasources() else []
        dead_ids = [json.loads(line)["id"] for index in range(processes) for line in _dead_lines(root / f"dead-{index}")]
    by_status = {int(k): v for k, v in stats["by_status"].items()}
    stored_set = set(stored)
    lost = len(set(range(rows)) - stored_set - set(dead_ids))
    process_secs = tuple(r["ended_at"] - started for r in results)
    fair_rows_per_sec = rate_limit_rps * batch_rows / processes
    shares = tuple((r["stop"] - r["start"]) / secs / fair_rows_per_sec for r, secs in zip(results, process_secs, strict=True))
    requests_needed = sum(-(-(r["stop"] - r["start"]) // batch_rows) for r in results)
    return Figures(
        processes=processes, rows=rows, rate_limit_rps=rate_limit_rps, stored_ids=len(stored_set),
        duplicates=len(stored) - len(stored_set), dead_letters=len(dead_ids), lost=lost,
        requests=stats["total"], answered_429=by_status.get(429, 0), wall_secs=max(process_secs),
        ideal_secs=requests_needed / rate_limit_rps, process_secs=process_secs, process_shares=shares,
        throttled_secs=tuple(r["throttled_secs"] for r in results))


def _dead_lines(folder: Path) -> list[str]:
    """The rows (``line``) of every dead-letter record (JSON lines or Avro) under ``folder``."""
    import fastavro

    lines: list[str] = []
    for path in sorted(folder.glob("*")) if folder.exists() else []:
        with path.open("rb") as fh:
            if path.suffix == ".avro":
                lines += [record["line"] for record in fastavro.reader(fh)]
            else:
                lines += [json.loads(raw)["line"] for raw in fh if raw.strip()]
    return lines


def _worker(spec: dict[str, Any]) -> int:
    """One worker process: its own pipeline, default sink settings but 100-row batches."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from sinks.tinybird import WriteToTinybird

    events = [{"id": i, "kind": "view", "value": i * 0.5} for i in range(spec["start"], spec["stop"])]
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = pipeline | beam.Create(events, reshuffle=False) | WriteToTinybird(
        datasource=_DATASOURCE, token=spec["token"], api_url=spec["api_url"], max_batch_rows=spec["batch_rows"],
        dead_letter_path=spec["dead_letter_dir"])
    Path(spec["ready"]).write_text("ready")
    while not Path(spec["go"]).exists():
        time.sleep(0.01)
    result = pipeline.run()
    result.wait_until_finish()
    ended_at = time.time()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(MetricsFilter())["counters"]
                if c.key.metric.namespace == "tinybird"}
    print(_WORKER_PREFIX + json.dumps({
        "index": spec["index"], "start": spec["start"], "stop": spec["stop"], "ended_at": ended_at,
        "throttled_secs": counters.get("cumulativeThrottlingSeconds", 0),
        "requests": counters.get("requests", 0), "responses_throttled": counters.get("responses_throttled", 0),
    }), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throttling_processes",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--batch-rows", type=int, default=100)
    parser.add_argument("--rate-limit-rps", type=float, default=5.0)
    parser.add_argument("--rate-limit-bytes-per-sec", type=int, default=None)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(json.loads(sys.stdin.read()))
    figures = run(processes=args.processes, rows=args.rows, rate_limit_rps=args.rate_limit_rps,
                  batch_rows=args.batch_rows, rate_limit_bytes_per_sec=args.rate_limit_bytes_per_sec)
    print("Command: python -m benchmarks.throttling_processes " + " ".join(sys.argv[1:] if argv is None else argv))
    print(figures.report())
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(figures) | {"share_429": figures.share_429}, indent=2))
    return 1 if figures.lost or figures.dead_letters else 0


if __name__ == "__main__":
    sys.exit(main())
