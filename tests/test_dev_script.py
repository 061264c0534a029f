"""``./dev``, the README's entry point: its set-up steps never wait forever, on another run or on a proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

DEV = Path(__file__).resolve().parents[1] / "dev"


def _lock_is_held() -> bool:
    return subprocess.run(["flock", "-n", str(DEV), "true"], check=False).returncode != 0


def test_dev_test_goes_on_when_another_run_holds_the_set_up_lock_past_the_deadline():
    """Two ``./dev test`` runs in one checkout share one set-up (the clients, the engines) under a
    lock on ``dev``. A run that holds it and hangs (a download that never ends) must not hold the
    others forever: past ``DEV_LOCK_WAIT_SECS`` they go on, and say so."""
    # In a session of its own: flock and its sleep (which inherits the lock) are killed together.
    holder = subprocess.Popen(["flock", str(DEV), "sleep", "120"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _lock_is_held():
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        started = time.monotonic()
        run = subprocess.run([str(DEV), "test", "--version"], capture_output=True, text=True, timeout=110,
                             env={**os.environ, "DEV_LOCK_WAIT_SECS": "1"})
        elapsed = time.monotonic() - started
        still_held = _lock_is_held()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert still_held  # it went on while the other run still held the lock
    assert run.returncode == 0 and run.stdout.startswith("pytest "), (run.stdout, run.stderr)
    assert "another ./dev test has been building the engines for over 1 s; going on without it" in run.stderr
    # Bounded by the deadline it was given (1 s, plus pytest's start), far below the holder's 120 s.
    assert elapsed < 60, elapsed
    assert not _lock_is_held()  # and the test leaves the lock free for the next run


def test_engine_builds_and_downloads_that_never_end_are_stopped_at_their_deadline(tmp_path):
    """``./dev test`` builds the engines with ``go install`` and fetches jars with ``mvn``, through a
    proxy that may answer slowly or never. Each is stopped after ``ENGINES_FETCH_TIMEOUT_SECS``,
    leaves nothing half-written in the cache, and the script says which and why."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for tool in ("go", "mvn"):  # a go and an mvn that wait for ever, as on a proxy that never answers
        fake = fakes / tool
        fake.write_text("#!/bin/sh\nexec sleep 600\n")
        fake.chmod(0o755)
    cache = tmp_path / "cache"
    env = {**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "BEAM_TINYBIRD_ENGINES_CACHE": str(cache), "ENGINES_FETCH_TIMEOUT_SECS": "2"}
    python = DEV.parent / ".venv" / "bin" / "python"
    started = time.monotonic()
    run = subprocess.run([str(DEV.parent / "scripts" / "provision_engines.sh"), str(python), "prism", "flink"],
                         capture_output=True, text=True, timeout=300, env=env)
    elapsed = time.monotonic() - started

    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "engines: prism: go install github.com/apache/beam/sdks/v2/go/cmd/prism@v" in run.stderr
    assert "did not finish in 2 s (ENGINES_FETCH_TIMEOUT_SECS); stopped" in run.stderr
    assert ("engines: beam-runners-flink-2.2-job-server: Maven Central did not finish in 2 s "
            "(ENGINES_FETCH_TIMEOUT_SECS) with org.apache.beam:beam-runners-flink-2.2-job-server:") in run.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["mvn-beam-runners-flink-2.2-job-server.log"]  # no binary
    # Two deadlines of 2 s, plus the interpreter's start to read Beam's version: far below the fakes' 600 s.
    assert elapsed < 120, elapsed
