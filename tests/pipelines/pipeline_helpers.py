"""Helpers of the pipelines' tests: runner flags, sink flags, reading what a run left."""

from __future__ import annotations

import glob
import io
import os
from typing import Dict, List, Sequence

import fastavro
import orjson

from sinks.tinybird import DeadLetter

RUNNERS: Dict[str, List[str]] = {
    "direct": ["--runner=FnApiRunner"],
    "multi_processing": [
        "--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}


def sink_flags(server, datasource: str, *extra: str) -> List[str]:
    """Flags that send to ``server`` with its admin token, waiting for commits (exact quarantine counts)."""
    return ["--api_url", server.url, "--token", server.token, "--datasource", datasource,
            "--wait", "--num_shards", "2", *extra]


def run_quietly(run, argv: Sequence[str]):
    """Runs a pipeline's ``run(argv)``; returns (summary, printed text)."""
    out = io.StringIO()
    summary = run(list(argv), out=out)
    return summary, out.getvalue()


def dead_letters_in(path) -> List[DeadLetter]:
    """Every record of the dead-letter files under ``path``, read without the sink's reader."""
    records: List[DeadLetter] = []
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
