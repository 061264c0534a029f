"""Helpers of the pipelines' tests: runner flags, sink flags, reading what a run left, and
the Pub/Sub emulator with the streaming job in a subprocess.

The emulator is :class:`pipelines._pubsub_emulator.PubSubEmulator` (Google's
emulator started on 127.0.0.1 and a free port, in its own process group,
stopped by PID with the whole group). The streaming job runs as a user runs it,
``python -m pipelines.streaming_to_tinybird`` in a process group of its own, and
is stopped with SIGINT once the data source holds what the test expects (or a
deadline passes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from shared_testlib import wait_for as wait_for  # the streaming tests' import of the shared one

from pipelines._pubsub_emulator import PubSubEmulator, stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[2]

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


def count(server, table: str) -> int:
    server.flush()
    return server.query(f"SELECT count(*) AS n FROM {table}")[0]["n"]



def held_messages(emulator: PubSubEmulator, subscription: str, *, settle_secs: float = 1.0) -> list[bytes]:
    """The data of every message ``subscription`` holds, left there (handed back, not acknowledged).

    Pulls until nothing new comes for ``settle_secs``, then gives every
    message back at once (ack deadline 0) for the next reader.
    """
    held: dict[str, bytes] = {}
    ack_ids: list[str] = []
    with emulator.subscriber_client() as client:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle_secs:
            response = client.pull(subscription=subscription, max_messages=1000, return_immediately=True,
                                   timeout=10)
            fresh = 0
            for received in response.received_messages:
                ack_ids.append(received.ack_id)
                if received.message.message_id not in held:
                    held[received.message.message_id] = bytes(received.message.data)
                    fresh += 1
            if fresh:
                quiet_since = time.monotonic()
            else:
                time.sleep(0.1)
        for start in range(0, len(ack_ids), 1000):
            client.modify_ack_deadline(subscription=subscription, ack_ids=ack_ids[start:start + 1000],
                                       ack_deadline_seconds=0)
    return list(held.values())


@dataclasses.dataclass
class StreamingJob:
    """``python -m pipelines.streaming_to_tinybird ARGS`` in its own process group, output to files."""

    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    exit_status: int | None = None

    guard_log: Path | None = None

    @classmethod
    def start(cls, args: Sequence[str], *, emulator: PubSubEmulator, work_dir: Path,
              guard_dir: Path | None = None) -> StreamingJob:
        """Starts the job; with ``guard_dir`` (a folder with a ``sitecustomize.py`` loopback guard)
        first on its path, its connection attempts are logged to ``work_dir/guard.jsonl``."""
        work_dir.mkdir(parents=True, exist_ok=True)
        env = emulator.environ()
        paths = [str(guard_dir)] if guard_dir is not None else []
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*paths, str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        guard_log = work_dir / "guard.jsonl" if guard_dir is not None else None
        if guard_log is not None:
            env["LOOPBACK_GUARD_LOG"] = str(guard_log)
        stdout_path, stderr_path = work_dir / "stdout.txt", work_dir / "stderr.txt"
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipelines.streaming_to_tinybird", *args],
                cwd=work_dir, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                start_new_session=True)
        return cls(process=process, stdout_path=stdout_path, stderr_path=stderr_path, guard_log=guard_log)

    def guard_entries(self) -> list[dict]:
        """Every name lookup and connection the loopback guard saw, allowed or refused."""
        if self.guard_log is None or not self.guard_log.exists():
            return []
        return [json.loads(line) for line in self.guard_log.read_text().splitlines()]

    def refused_connections(self) -> list[dict]:
        """Name lookups and connections outside loopback that the guard refused (none expected)."""
        return [entry for entry in self.guard_entries() if not entry["allowed"]]

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, *, sig: int = signal.SIGINT, timeout_secs: float = 90.0) -> int:
        """Sends ``sig`` to the job's process group and waits for it to exit (SIGKILL after the timeout)."""
        if self.exit_status is None:
            self.exit_status = stop_process_group(self.process, sig=sig, timeout_secs=timeout_secs)
        return self.exit_status

    def describe(self) -> str:
        return f"exit status {self.exit_status}\n--- stdout\n{self.stdout}\n--- stderr (end)\n{self.stderr[-4000:]}"


@contextlib.contextmanager
def streaming_job(args: Sequence[str], *, emulator: PubSubEmulator, work_dir: Path) -> Iterator[StreamingJob]:
    """A :class:`StreamingJob` that is stopped (SIGKILL if it must) when the block ends."""
    job = StreamingJob.start(args, emulator=emulator, work_dir=work_dir)
    try:
        yield job
    finally:
        if job.running():
            job.stop(sig=signal.SIGKILL, timeout_secs=5)


# -- the project as a user installs it: a wheel in a venv of its own ----------------------------


def clean_env() -> dict[str, str]:
    """This process's environment less what would put the checkout or this venv on a child's path
    (``tests/conftest.py`` points PYTHONPATH at the checkout for the runners' worker processes)."""
    return {key: value for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}


def run_checked(command: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Runs ``command`` (environment: :func:`clean_env` unless given); fails the test with its output if it fails."""
    result = subprocess.run(list(command), cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, f"{list(command)[:4]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def copy_sources(sources: Sequence[str], into: Path) -> Path:
    """A copy of the checkout's ``sources`` (files and folders, less bytecode) in ``into``; returns ``into``."""
    into.mkdir(parents=True)
    for name in sources:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, into / name)
    return into


def build_wheel(sources: Sequence[str], into: Path) -> Path:
    """The project's wheel, built offline from a copy of ``sources`` (nothing is written into the
    checkout), with the build backend of this venv (the test extra holds it)."""
    source = copy_sources(sources, into / "source")
    run_checked([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
            "--wheel-dir", str(into / "wheels"), str(source)], cwd=into)
    (wheel,) = (into / "wheels").glob("beam_tinybird-*.whl")
    return wheel


def venv_with_wheel(wheel: Path, into: Path, *, hidden: Sequence[str] = ()) -> Path:
    """A new venv (its directory) holding ``wheel`` (no extras), which reaches this venv's
    third-party packages, less the checkout's editable install and ``hidden`` (name prefixes),
    through a ``.pth`` file (whose folder's own ``.pth`` files are not processed)."""
    venv = into / "venv"
    run_checked([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=into)
    python = venv / "bin" / "python"
    # Installed before the .pth below exists, so pip sees an empty environment.
    run_checked([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
            str(wheel)], cwd=into)
    deps = into / "deps"
    deps.mkdir()
    left_out = ("__editable__", "beam_tinybird", *hidden)
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(left_out) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    purelib = Path(run_checked([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=into).strip())
    (purelib / "_test_dependencies.pth").write_text(f"{deps}\n", encoding="utf-8")
    return venv
