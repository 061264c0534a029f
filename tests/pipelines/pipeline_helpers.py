"""Helpers of the pipelines' tests: runner flags, sink flags, reading what a run left."""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Sequence

import fastavro
import orjson

from sinks.tinybird import DeadLetter

RUNNERS: dict[str, list[str]] = {
    "direct": ["--runner=FnApiRunner"],
    "multi_processing": [
        "--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}


def sink_flags(server, datasource: str, *extra: str) -> list[str]:
    """Flags that send to ``server`` with its admin token, waiting for commits (exact quarantine counts)."""
    return ["--api_url", server.url, "--token", server.token, "--datasource", datasource,
            "--wait", "--num_shards", "2", *extra]


def run_quietly(run, argv: Sequence[str]):
    """Runs a pipeline's ``run(argv)``; returns (summary, printed text)."""
    out = io.StringIO()
    summary = run(list(argv), out=out)
    return summary, out.getvalue()


def dead_letters_in(path) -> list[DeadLetter]:
    """Every record of the dead-letter files under ``path``, read without the sink's reader."""
    records: list[DeadLetter] = []
    for name in sorted(glob.glob(os.path.join(str(path), "*"))):
        with open(name, "rb") as fh:
            if name.endswith(".avro"):
                records.extend(DeadLetter(**r) for r in fastavro.reader(fh))
            else:
                records.extend(DeadLetter(**orjson.loads(line)) for line in fh if line.strip())
    return records


def count(server, table: str) -> int:
    server.flush()
    return server.query(f"SELECT count(*) AS n FROM {table}")[0]["n"]
