"""Throughput of the local server: rows/s stored (``wait=true``) for ~8 MB NDJSON batches.

Starts a server subprocess on a free loopback port with a temporary data dir,
builds the batches before timing (about 200-byte events), posts them from a few
client threads, and prints the rows/s acknowledged with 200 for each encoding::

    python -m tinybird_emulator.bench [--seconds 10] [--concurrency 2] [--encodings none,zstd,gzip]
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import string
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import orjson
import requests
import zstandard

from tinybird_emulator._process import LocalServer

__all__ = ["build_batches", "main", "run"]


def _event(rng: random.Random, i: int) -> bytes:
    return orjson.dumps(
        {
            "timestamp": f"2024-05-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}",
            "event_id": f"{rng.getrandbits(64):016x}{i:08d}",
            "user_id": rng.randrange(1_000_000),
            "session": "".join(rng.choices(string.ascii_lowercase, k=12)),
            "action": rng.choice(["view", "click", "purchase", "scroll"]),
            "price": round(rng.random() * 100, 2),
            "country": rng.choice(["ES", "US", "FR", "DE", "JP"]),
            "device": {"os": rng.choice(["ios", "android", "linux"]), "mobile": rng.random() < 0.5},
            "tags": rng.sample(["a", "b", "c", "d", "e"], 2),
        }
    )


def build_batches(*, count: int, batch_bytes: int, seed: int = 7) -> list[tuple[bytes, int]]:
    """``count`` NDJSON bodies of about ``batch_bytes`` each, with their row counts."""
    rng = random.Random(seed)
    batches = []
    i = 0
    for _ in range(count):
        lines = []
        size = 0
        while size < batch_bytes:
            line = _event(rng, i)
            i += 1
            if size + len(line) + 1 > batch_bytes:
                break
            lines.append(line)
            size += len(line) + 1
        batches.append((b"\n".join(lines) + b"\n", len(lines)))
    return batches


def _encode(body: bytes, encoding: str) -> bytes:
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(body)
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=6)
    return body


def _cpu_secs(pid: int | None) -> float | None:
    """User+system CPU seconds used so far by a process (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def run(
    server: LocalServer,
    batches: Sequence[tuple[bytes, int]],
    *,
    encoding: str,
    seconds: float,
    concurrency: int,
    datasource: str,
) -> dict[str, float]:
    """Posts the batches in a loop for ``seconds``; returns rows/s and request stats."""
    bodies = [(_encode(body, encoding), rows) for body, rows in batches]
    headers = {"Authorization": f"Bearer {server.token}"}
    if encoding != "none":
        headers["Content-Encoding"] = encoding
    url = f"{server.url}/v0/events?name={datasource}&wait=true"
    lock = threading.Lock()
    totals = {"rows": 0, "requests": 0, "errors": 0, "wire_bytes": 0}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        session = requests.Session()
        n = index
        while time.perf_counter() < deadline:
            body, _rows = bodies[n % len(bodies)]
            n += 1
            started = time.perf_counter()
            response = session.post(url, data=body, headers=headers, timeout=(5, 120))
            elapsed = time.perf_counter() - started
            with lock:
                totals["requests"] += 1
                latencies.append(elapsed)
                if response.status_code == 200:
                    totals["rows"] += response.json()["successful_rows"]
                    totals["wire_bytes"] += len(body)
                else:
                    totals["errors"] += 1
        session.close()

    cpu_before = _cpu_secs(server.pid)
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    cpu_after = _cpu_secs(server.pid)
    server_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    latencies.sort()
    return {
        "rows_per_sec": totals["rows"] / elapsed,
        "rows": totals["rows"],
        "requests": totals["requests"],
        "errors": totals["errors"],
        "wire_mb_per_sec": totals["wire_bytes"] / elapsed / 1e6,
        "p50_latency_secs": latencies[len(latencies) // 2] if latencies else 0.0,
        "seconds": elapsed,
        # Rows per CPU-second of the server process: comparable on a busy machine.
        "rows_per_server_cpu_sec": totals["rows"] / server_cpu if server_cpu else float("nan"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinybird_emulator.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration per encoding (default 10)")
    parser.add_argument("--concurrency", type=int, default=2, help="client threads (default 2)")
    parser.add_argument("--batch-bytes", type=int, default=8_000_000, help="NDJSON bytes per request (default 8e6)")
    parser.add_argument("--batches", type=int, default=4, help="distinct pre-built batches (default 4)")
    parser.add_argument("--encodings", default="none,zstd", help="comma list of none, zstd, gzip (default none,zstd)")
    parser.add_argument("--synchronous", default="FULL", help="server's SQLite synchronous mode (default FULL)")
    parser.add_argument("--server-log", default=None, help="copy the server's log (DEBUG) to this file")
    args = parser.parse_args(argv)

    batches = build_batches(count=args.batches, batch_bytes=args.batch_bytes)
    rows_per_batch = sum(r for _, r in batches) / len(batches)
    avg_row = sum(len(b) for b, _ in batches) / sum(r for _, r in batches)
    print(f"{len(batches)} batches of ~{args.batch_bytes / 1e6:.1f} MB, {rows_per_batch:.0f} rows each, "
          f"{avg_row:.0f} bytes/row; {args.concurrency} client thread(s), wait=true")
    with tempfile.TemporaryDirectory(prefix="tinybird-bench-") as data_dir:
        extra = ["--log-level", "DEBUG"] if args.server_log else []
        with LocalServer(
            data_dir=data_dir, rate_limit_rps=None, synchronous=args.synchronous, extra_args=extra
        ) as server:
            for encoding in args.encodings.split(","):
                encoding = encoding.strip()
                name = f"bench_{encoding}"
                # Warm-up: creates the data source (schema inference) outside the timing.
                run(server, batches[:1], encoding=encoding, seconds=0.01, concurrency=1, datasource=name)
                result = run(
                    server, batches, encoding=encoding, seconds=args.seconds,
                    concurrency=args.concurrency, datasource=name,
                )
                stored = server.query(f"SELECT count(*) AS n FROM {name}")[0]["n"]
                print(
                    f"{encoding:>5}: {result['rows_per_sec']:>10,.0f} rows/s stored "
                    f"({result['rows']:,} rows in {result['seconds']:.1f} s, {result['requests']} requests, "
                    f"{result['errors']} errors, {result['wire_mb_per_sec']:.1f} MB/s on the wire, "
                    f"p50 {result['p50_latency_secs'] * 1000:.0f} ms, "
                    f"{result['rows_per_server_cpu_sec']:,.0f} rows per server CPU-second); "
                    f"table holds {stored:,} rows"
                )
            if args.server_log:
                shutil.copyfile(server.log_path, args.server_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
