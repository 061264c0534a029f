"""The command line: serve (ready line, generated token, --port 0), token create, sql, datasources."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.timeout(60)

ROOT = str(Path(__file__).resolve().parents[2])


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TB_LOCAL_ADMIN_TOKEN", None)
    return env


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = _env()
    return subprocess.run([sys.executable, "-m", "emulator", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_serve_generates_token_prints_url_and_stops_on_sigterm(tmp_path):
    env = _env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "serve", "--port", "0", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        token_line = proc.stdout.readline()
        assert token_line.startswith("Admin token: ")
        token = token_line.split(": ", 1)[1].strip()
        ready = proc.stdout.readline().strip()
        assert ready.startswith("Tinybird local Events API listening on http://127.0.0.1:")
        url = ready.rsplit(" ", 1)[1]
        port = int(url.rsplit(":", 1)[1])
        assert 0 < port < 65536
        response = requests.post(
            f"{url}/v0/events?name=cli&wait=true", data=b'{"a": 1}\n', headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200
        # Token creation from the CLI while the server runs: usable at once.
        created = _run("token", "create", "--data-dir", str(tmp_path), "--name", "appender", "--scope", "DATASOURCE:APPEND:cli")
        assert created.returncode == 0, created.stderr
        narrow = created.stdout.strip()
        response = requests.post(
            f"{url}/v0/events?name=cli&wait=true", data=b'{"a": 2}\n', headers={"Authorization": f"Bearer {narrow}"}
        )
        assert response.status_code == 200, response.text
        dup = _run("token", "create", "--data-dir", str(tmp_path), "--name", "appender", "--scope", "ADMIN")
        assert dup.returncode == 2 and "already exists" in dup.stderr
        bad = _run("token", "create", "--data-dir", str(tmp_path), "--name", "x", "--scope", "NOPE")
        assert bad.returncode == 2 and "unknown scope" in bad.stderr

        out = _run("sql", "--url", url, "--token", token, "SELECT sum(a) AS s FROM cli")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["data"] == [{"s": 3}]
        out = _run("sql", "--url", url, "--token", token, "DELETE FROM cli")
        assert out.returncode == 1 and "error" in json.loads(out.stderr)
        out = _run("datasources", "--url", url, "--token", token)
        assert out.returncode == 0
        listing = json.loads(out.stdout)["datasources"]
        assert [(d["name"], d["rows"]) for d in listing] == [("cli", 2)]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert token not in stderr
    assert narrow not in stderr


def test_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0
    for command in ("serve", "token", "sql", "datasources"):
        assert command in out.stdout
    serve_help = _run("serve", "--help").stdout
    for flag in ("--port", "--data-dir", "--token", "--faults", "--rate-limit-rps", "--max-body-bytes", "--queue-max-bytes"):
        assert flag in serve_help


def test_serve_refuses_bad_faults_file(tmp_path):
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"status": 999}]))
    out = _run("serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--faults", str(faults))
    assert out.returncode != 0
    assert "status" in out.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_server_stops_when_the_process_that_started_it_dies(tmp_path):
    import time

    script = (
        "import sys, time\n"
        "from emulator import LocalServer\n"
        "server = LocalServer(data_dir=sys.argv[1]).start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    server_pid = int(parent.stdout.readline())
    assert _alive(server_pid)
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 20
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid)


def test_one_server_per_data_dir_and_port(server, tmp_path):
    out = _run("serve", "--port", "0", "--data-dir", server.data_dir, "--token", "x")
    assert out.returncode == 3 and "another server is using the data dir" in out.stderr
    out = _run("serve", "--port", str(server.port), "--data-dir", str(tmp_path), "--token", "x")
    assert out.returncode == 3 and "address already in use" in out.stderr.lower()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_local_server_keeps_the_token_out_of_argv(server):
    with open(f"/proc/{server.pid}/cmdline", "rb") as fh:
        argv = fh.read().split(b"\0")
    assert server.token.encode() not in b" ".join(argv)
    assert b"serve" in argv
