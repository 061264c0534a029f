"""Helpers of the engine tests: the tools ``./dev engines`` provides, servers started from them on
127.0.0.1, and the checks every engine must pass (the sample files job, the windowed sink).

The tools are built or downloaded once, outside the checkout, by
``scripts/provision_engines.sh`` (``./dev engines``); a test whose tool is missing
fails with the command that provides it. Each server runs in a process group of
its own on a free loopback port and is stopped, with its group, when its block ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import FixedWindows, IntervalWindow, SlidingWindows, TimestampedValue
from pipelines_testlib import count, run_quietly, sink_flags
from shared_testlib import dead_letters_in

from pipelines._pubsub_emulator import free_port, stop_process_group
from pipelines.files_to_tinybird import run as files_run
from sinks.tinybird import WriteToTinybird
from sinks.tinybird.dead_letters import window_text

ENGINES_CACHE = Path(os.environ.get("BEAM_TINYBIRD_ENGINES_CACHE", Path.home() / ".cache" / "beam-tinybird-engines"))
FAKE_GCS_SERVER_VERSION = "v1.56.1"
SERVER_START_TIMEOUT_SECS = 60.0
PROVIDE = "./dev engines"


def prism_binary() -> Path:
    """The Prism binary built at the Beam version of this environment; fails the test if it is missing."""
    return _tool(ENGINES_CACHE / f"prism-v{beam.__version__}" / "prism", f"{PROVIDE} prism")


def fake_gcs_server_binary() -> Path:
    return _tool(ENGINES_CACHE / f"fake-gcs-server-{FAKE_GCS_SERVER_VERSION}" / "fake-gcs-server",
                 f"{PROVIDE} fake-gcs-server")


def _tool(path: Path, command: str) -> Path:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `{command}` (builds it once, outside the checkout)", pytrace=False)
    return path


# -- servers on 127.0.0.1 ------------------------------------------------------------------


class LoopbackServer:
    """A program listening on a free loopback port, in its own process group, its output in a log."""

    def __init__(self, command: Sequence[str], *, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log = log
        with open(log, "wb") as out:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_SECS
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise AssertionError(f"{self._process.args[0]} exited with status {self._process.returncode}:\n"
                                     f"{self.log_tail()}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError(f"nothing listened on {self.address} within {SERVER_START_TIMEOUT_SECS:.0f} s:\n"
                             f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process)


@contextlib.contextmanager
def loopback_server(command: Sequence[str], *, port: int, log: Path,
                    env: dict[str, str] | None = None) -> Iterator[LoopbackServer]:
    server = LoopbackServer(command, port=port, log=log, env=env)
    try:
        yield server
    finally:
        server.stop()


def new_port() -> int:
    return free_port()


# -- what every engine must do --------------------------------------------------------------


def check_sample_files_job(server, datasource: str, runner_flags: Sequence[str], dead_dir: Path) -> None:
    """The files job on the sample data: 4,988 rows stored, 10 quarantined, 2 dead letters."""
    summary, printed = run_quietly(files_run, sink_flags(
        server, datasource, "--dead_letter_path", f"{dead_dir}/", *runner_flags))
    assert count(server, datasource) == 4988
    assert count(server, f"{datasource}_quarantine") == 10
    assert (summary.rows_read, summary.rows_acknowledged, summary.rows_quarantined, summary.rows_stored) == (
        5000, 4998, 10, 4988)
    assert summary.dead_letters_by_kind == {"unencodable": 2}
    assert sorted(letter.kind for letter in dead_letters_in(dead_dir)) == ["unencodable", "unencodable"]
    assert server.token not in printed


_FILES_MAIN_LOGGING_THE_ENGINE = """
import logging, sys
from pipelines.files_to_tinybird import main
logging.getLogger("apache_beam.runners.direct.direct_runner").setLevel(logging.INFO)
main(sys.argv[1:])
"""


def files_job_in_subprocess(server, datasource: str, args: Sequence[str], *, cwd: Path,
                            timeout_secs: float = 240) -> subprocess.CompletedProcess[str]:
    """The files job's ``main`` on the sample data in a new process, with the DirectRunner's
    choice of engine logged (INFO); the token reaches it in an environment variable only.
    Fails the test if the job fails."""
    env = {**os.environ, "ENGINE_TEST_TINYBIRD_TOKEN": server.token}
    result = subprocess.run(
        [sys.executable, "-c", _FILES_MAIN_LOGGING_THE_ENGINE, "--api_url", server.url,
         "--token_env", "ENGINE_TEST_TINYBIRD_TOKEN", "--datasource", datasource, "--wait", "--num_shards", "2",
         *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_secs)
    assert result.returncode == 0, f"the files job failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert server.token not in result.stdout + result.stderr
    return result


def stored_ids(server, datasource: str) -> list[int]:
    """Every stored id, duplicates included, in order."""
    server.flush()
    return [row["id"] for row in server.query(f"SELECT id FROM {datasource} ORDER BY id")]


class BundleSizes(beam.DoFn):
    """Passes elements through; records how many each bundle held (distribution ``bundle_elements``)."""

    def setup(self) -> None:
        self._sizes = Metrics.distribution("engine_probe", "bundle_elements")

    def start_bundle(self) -> None:
        self._in_bundle = 0

    def process(self, element):
        self._in_bundle += 1
        yield element

    def finish_bundle(self) -> None:
        if self._in_bundle:
            self._sizes.update(self._in_bundle)


class WindowedRun:
    """What a windowed sink pipeline left: the tinybird counters, the bundles the sink was handed."""

    def __init__(self, result) -> None:
        metrics = result.metrics().query(MetricsFilter())
        self.counters: dict[str, int] = {}
        for counter in metrics["counters"]:
            if counter.key.metric.namespace == "tinybird":
                name = counter.key.metric.name
                self.counters[name] = self.counters.get(name, 0) + counter.committed
        distributions = metrics["distributions"]
        (self.bundles,) = [d.committed for d in distributions if d.key.metric.name == "bundle_elements"]
        self.max_batch_bytes = max(d.committed.max for d in distributions if d.key.metric.name == "batch_bytes")


def run_windowed_sink(server, datasource: str, runner_flags: Sequence[str], dead_dir: Path, *,
                      windowing: str) -> WindowedRun:
    """3,000 rows and one unencodable element in 3 windows (``fixed``: 10 s windows over 30 s;
    ``sliding``: 20 s windows every 10 s over 20 s, each row in two windows), into 4 KiB batches."""
    elements = [TimestampedValue({"id": i, "pad": "x" * 40}, i % (30 if windowing == "fixed" else 20))
                for i in range(3000)]
    elements.append(TimestampedValue({"bad": object()}, 15))
    windowfn = FixedWindows(10) if windowing == "fixed" else SlidingWindows(size=20, period=10)
    p = beam.Pipeline(options=PipelineOptions(list(runner_flags)))
    (p | beam.Create(elements)
       | beam.WindowInto(windowfn)
       | "Probe" >> beam.ParDo(BundleSizes())
       | WriteToTinybird(datasource=datasource, api_url=server.url, token=server.token, wait=True,
                         num_shards=2, max_batch_bytes=4 * 1024, dead_letter_path=f"{dead_dir}/"))
    result = p.run()
    result.wait_until_finish()
    return WindowedRun(result)


def check_windowed_sink(server, datasource: str, runner_flags: Sequence[str], dead_dir: Path, *,
                        windowing: str) -> WindowedRun:
    """Every row once per window it is in, the unencodable one dead-lettered once per window,
    every batch within its limit and no batch spanning two windows."""
    outcome = run_windowed_sink(server, datasource, runner_flags, dead_dir, windowing=windowing)
    letters = dead_letters_in(dead_dir)
    if windowing == "fixed":
        assert stored_ids(server, datasource) == list(range(3000))
        assert [(letter.kind, letter.window) for letter in letters] == [
            ("unencodable", window_text(IntervalWindow(10, 20)))]
        assert outcome.counters["rows_acknowledged"] == 3000 and outcome.counters["dead_letters"] == 1
    else:
        assert stored_ids(server, datasource) == sorted(list(range(3000)) * 2)
        assert sorted((letter.kind, letter.window) for letter in letters) == [
            ("unencodable", window_text(IntervalWindow(0, 20))), ("unencodable", window_text(IntervalWindow(10, 30)))]
        assert outcome.counters["rows_acknowledged"] == 6000 and outcome.counters["dead_letters"] == 2
    assert outcome.counters["elements_in"] == 3001
    assert outcome.bundles.sum == 3001  # the probe saw every element once
    assert outcome.max_batch_bytes <= 4 * 1024
    # ~50 bytes a row: 1,000 rows (fixed) or 2 x 1,500 (sliding) per window are 12 or more
    # 4 KiB requests per window; a batch mixing two windows would show as fewer.
    assert outcome.counters["requests"] >= 3 * 12
    return outcome
