"""The EXTERNAL environment, as a Flink cluster runs Python: workers that hold the package as a wheel.

A Beam worker pool (``python -m apache_beam.runners.worker.worker_pool_main``,
what ``workers/Dockerfile``'s image runs with ``--worker_pool``) is started from
a separate virtual environment in which this project is installed from a wheel
built from the files the image copies: no repository on the path, no local
server package. The pool alone holds the token (``--token_env``), as a sidecar
would. The jobs are submitted with ``--runner=PortableRunner --job_endpoint=embed
--environment_type=EXTERNAL``: the Job and Fn APIs a Flink job server uses, with
the Python work done in the pool's processes.

The worker venv sees the main venv's third-party packages through a ``.pth``
line (fast: nothing is installed but the wheel). A path in a ``.pth`` file is
only added to ``sys.path``: the ``.pth`` files inside it, the editable install's
among them, are not processed, so the repository's ``sinks`` is out of reach;
``test_the_worker_venv_holds_the_wheel_only`` checks it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import apache_beam as beam
import orjson
import pytest
from apache_beam.internal.cloudpickle import cloudpickle
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.core import RestrictionProvider
from pipelines_testlib import build_wheel, clean_env, run_checked, run_quietly, venv_with_wheel
from shared_testlib import dead_letters_in

from pipelines.files_to_tinybird import run
from sinks.tinybird import WriteToTinybird

REPO_ROOT = Path(__file__).resolve().parents[2]
# What workers/Dockerfile copies into the image to build the wheel: the test builds from the same.
IMAGE_SOURCES = ("pyproject.toml", "setup.py", "README.md", "sinks", "pipelines")
# Only the worker pool has this variable: a sink that runs anywhere else finds no token.
POOL_TOKEN_ENV = "EXTERNAL_POOL_TINYBIRD_TOKEN"
POOL_START_TIMEOUT_SECS = 60.0


def _worker_env(venv: Path) -> dict[str, str]:
    """The pool's environment: the worker venv first on PATH (the pool starts workers as ``python``)."""
    env = clean_env()
    env.pop(POOL_TOKEN_ENV, None)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.fixture(scope="module")
def worker_venv(tmp_path_factory) -> Path:
    """A venv holding this project as a wheel built from the image's sources only."""
    root = tmp_path_factory.mktemp("external-workers")
    wheel = build_wheel(IMAGE_SOURCES, root)
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/", 1)[0] for name in archive.namelist()}
    assert top_level == {"sinks", "pipelines", wheel.name.split("-py3")[0] + ".dist-info"}
    return venv_with_wheel(wheel, root)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + POOL_START_TIMEOUT_SECS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the worker pool exited:\n{log.read_text(errors='replace')[-3000:]}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the worker pool did not listen within {POOL_START_TIMEOUT_SECS} s")


class WorkerPool:
    """A running ``worker_pool_main``: its port, its directory and its log."""

    def __init__(self, *, port: int, directory: Path, log: Path) -> None:
        self.port = port
        self.directory = directory
        self.log = log

    def runner_flags(self) -> list[str]:
        return ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
                f"--environment_config=localhost:{self.port}"]


@pytest.fixture(scope="module")
def worker_pool(worker_venv, local_server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pool-cwd")  # outside the repository: nothing to import from
    log = directory / "pool.log"
    port = _free_port()
    env = {**_worker_env(worker_venv), POOL_TOKEN_ENV: local_server.token}
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [str(worker_venv / "bin" / "python"), "-m", "apache_beam.runners.worker.worker_pool_main",
             f"--service_port={port}"],
            cwd=directory, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, log)
        yield WorkerPool(port=port, directory=directory, log=log)
    finally:
        # SIGINT lets the pool stop its server and, at exit, the workers it started.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_the_worker_venv_holds_the_wheel_only(worker_venv, tmp_path):
    probe = ("import importlib.util, json, apache_beam, pipelines, sinks; print(json.dumps({"
             "'sinks': sinks.__file__, 'pipelines': pipelines.__file__, 'beam': apache_beam.__version__, "
             "'emulator': importlib.util.find_spec('tinybird_emulator') is not None}))")
    found = json.loads(run_checked([str(worker_venv / "bin" / "python"), "-c", probe],
                              cwd=tmp_path, env=_worker_env(worker_venv)).strip().splitlines()[-1])
    site = worker_venv / "lib"
    assert Path(found["sinks"]).is_relative_to(site) and Path(found["pipelines"]).is_relative_to(site)
    assert not Path(found["sinks"]).is_relative_to(REPO_ROOT)
    assert found["emulator"] is False  # the local server is not a production package
    assert found["beam"] == beam.__version__


def _external_facts(pool: WorkerPool) -> dict:
    return json.loads((pool.directory / "facts.json").read_text(encoding="utf-8"))


def _stored_ids(server, datasource: str) -> list[int]:
    server.flush()
    return [row["id"] for row in server.query(f"SELECT id FROM {datasource} ORDER BY id")]


def test_files_pipeline_on_external_workers(server, datasource, worker_pool, tmp_path):
    rows = 3000
    lines = [orjson.dumps({"id": i, "kind": "view", "pad": "x" * 80}).decode() for i in range(rows)]
    lines.insert(1234, "not json at all")
    (tmp_path / "events.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dead_dir = tmp_path / "dead"
    assert POOL_TOKEN_ENV not in os.environ

    summary, printed = run_quietly(run, [
        "--input", str(tmp_path / "*.ndjson"), "--api_url", server.url, "--token_env", POOL_TOKEN_ENV,
        "--datasource", datasource, "--wait", "--num_shards", "2", "--dead_letter_path", f"{dead_dir}/",
        *worker_pool.runner_flags()])

    assert _stored_ids(server, datasource) == list(range(rows))
    letters = dead_letters_in(dead_dir)
    assert [(letter.kind, letter.element) for letter in letters] == [("unencodable", "b'not json at all'")]
    assert (summary.rows_read, summary.rows_acknowledged, summary.dead_letters) == (rows + 1, rows, 1)
    assert server.token not in printed + worker_pool.log.read_text(errors="replace")


# -- small bundles, as Flink's batch mode makes them ------------------------------------


class _IdRange(RestrictionProvider):
    def initial_restriction(self, element: int) -> OffsetRange:
        return OffsetRange(0, element)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element: int, restriction: OffsetRange) -> int:
        return restriction.size()


_ID_RANGE = beam.DoFn.RestrictionParam(_IdRange())


class _EmitInSmallBundles(beam.DoFn):
    """Emits ids ``0..n-1``, ``bundle_rows`` at a time: then it defers the rest, which the
    runner resumes in a new bundle (Flink's batch mode cuts bundles at 1,000 elements)."""

    def __init__(self, bundle_rows: int) -> None:
        self._bundle_rows = bundle_rows

    def setup(self) -> None:
        self._bundles = Metrics.counter("small_bundles", "bundles")
        self._resumes = Metrics.counter("small_bundles", "process_calls")

    def start_bundle(self) -> None:
        self._bundles.inc()

    def process(self, n: int, tracker=_ID_RANGE):
        self._resumes.inc()
        restriction = tracker.current_restriction()
        stop = min(restriction.start + self._bundle_rows, restriction.stop)
        for position in range(restriction.start, stop):
            if not tracker.try_claim(position):
                return
            yield {"id": position, "kind": "view", "pad": "y" * 80}
        if stop < restriction.stop:
            tracker.defer_remainder()


def _write_worker_facts(element, *, path: str, token_env: str) -> None:
    """Runs on a worker: records which interpreter and which package copy it used."""
    import importlib.util as util
    import os as worker_os
    import sys as worker_sys

    import sinks as worker_sinks

    facts = {"prefix": worker_sys.prefix, "sinks": worker_sinks.__file__, "pid": worker_os.getpid(),
             "cwd": worker_os.getcwd(),
             "emulator": util.find_spec("tinybird_emulator") is not None,
             "token_env_set": bool(worker_os.environ.get(token_env))}
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(facts))


def test_sink_with_flink_sized_bundles_merges_across_bundles(server, datasource, worker_pool, worker_venv):
    rows, bundle_rows, max_batch_rows = 9000, 1000, 2500
    module = sys.modules[__name__]
    # The workers cannot import this test module: its DoFns travel by value.
    cloudpickle.register_pickle_by_value(module)
    try:
        p = beam.Pipeline(options=PipelineOptions(worker_pool.runner_flags()))
        (p | "Count" >> beam.Create([rows])
           | "SmallBundles" >> beam.ParDo(_EmitInSmallBundles(bundle_rows))
           | "ToTinybird" >> WriteToTinybird(
               datasource=datasource, api_url=server.url, token_env=POOL_TOKEN_ENV, wait=True,
               num_shards=2, max_batch_rows=max_batch_rows))
        (p | "One" >> beam.Create([None])
           | "Facts" >> beam.Map(_write_worker_facts, path=str(worker_pool.directory / "facts.json"),
                                 token_env=POOL_TOKEN_ENV))
        result = p.run()
        result.wait_until_finish()
    finally:
        cloudpickle.unregister_pickle_by_value(module)

    assert _stored_ids(server, datasource) == list(range(rows))  # every row, once

    # The sink can only have posted from the pool's processes (only they have the token);
    # what those processes ran is the worker venv's interpreter and the wheel's package.
    facts = _external_facts(worker_pool)
    assert Path(facts["prefix"]) == worker_venv and Path(facts["sinks"]).is_relative_to(worker_venv)
    assert facts["pid"] != os.getpid() and Path(facts["cwd"]) == worker_pool.directory
    assert facts["emulator"] is False and facts["token_env_set"] is True

    metrics = result.metrics().query(MetricsFilter())
    counters = {c.key.metric.name: c.committed for c in metrics["counters"] if c.key.metric.namespace != "tinybird"}
    assert counters["bundles"] == counters["process_calls"] == rows // bundle_rows  # 9 bundles of 1,000 rows
    batch_rows = {d.key.step: d.committed for d in metrics["distributions"] if d.key.metric.name == "batch_rows"}
    full = [d for step, d in batch_rows.items() if "PostFull" in step]
    (merged,) = [d for step, d in batch_rows.items() if "PostMerged" in step]
    # No bundle holds a full batch, so every row goes through the cross-bundle merge, and
    # each merged batch is cut across bundles: 2,500 rows come from at least three of them.
    assert sum(d.sum for d in full) == 0
    assert merged.sum == rows and merged.max == max_batch_rows
    assert merged.count <= -(-rows // max_batch_rows) + 1  # one partial batch per shard at most
