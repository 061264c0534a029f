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

from tinybird_emulator import LocalServer

pytestmark = pytest.mark.timeout(60)

ROOT = str(Path(__file__).resolve().parents[2])


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TB_LOCAL_ADMIN_TOKEN", None)
    return env


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = _env()
    return subprocess.run([sys.executable, "-m", "tinybird_emulator", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_serve_generates_token_prints_url_and_stops_on_sigterm(tmp_path):
    env = _env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinybird_emulator", "serve", "--port", "0", "--data-dir", str(tmp_path)],
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


def test_server_stops_when_the_process_that_started_it_dies(tmp_path):
    import time

    script = (
        "import sys, time\n"
        "from tinybird_emulator import LocalServer\n"
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


def test_local_server_keeps_the_token_out_of_argv(server):
    with open(f"/proc/{server.pid}/cmdline", "rb") as fh:
        argv = fh.read().split(b"\0")
    assert server.token.encode() not in b" ".join(argv)
    assert b"serve" in argv


# -- sql and datasources with --data-dir ------------------------------------------------


def _main(capsys, *args: str) -> tuple:
    """Runs the command line in this process: (exit code, stdout, stderr)."""
    from tinybird_emulator.__main__ import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _without_elapsed(stdout: str) -> dict:
    body = json.loads(stdout)
    assert stdout == json.dumps(body, indent=2, ensure_ascii=False) + "\n"
    assert body["statistics"]["elapsed"] >= 0
    del body["statistics"]["elapsed"]
    return body


READS = [
    "SELECT id, name FROM cli_a ORDER BY id",
    "SELECT count(*) AS n, sum(id) AS s, avg(id) AS mean FROM cli_a FORMAT JSON",
    "SELECT c__error_column, c__error, insertion_date IS NOT NULL AS dated FROM cli_a_quarantine",
    "SELECT name FROM cli_b WHERE name IS NULL",
]
WRITES = [
    "DELETE FROM cli_a",
    "INSERT INTO cli_a (id) VALUES (99)",
    "UPDATE cli_a SET id = 0 RETURNING id",
    "DROP TABLE cli_b",
    "CREATE TABLE x (a)",
    "ATTACH DATABASE ':memory:' AS other",
    "PRAGMA journal_mode=DELETE",
    "VACUUM",
    "SELECT 1; DELETE FROM cli_a",
    "SELECT * FROM does_not_exist",
    "   ",
]


def _load(server: LocalServer) -> None:
    headers = {"Authorization": f"Bearer {server.token}"}
    for name, body in (
        ("cli_a", '{"id": 1, "name": "año"}\n{"id": 2, "name": "b"}\n'),
        ("cli_a", '{"id": "not a number", "name": "c"}\n'),  # quarantined
        ("cli_b", '{"id": 7, "name": "x"}\n'),
    ):
        response = requests.post(f"{server.url}/v0/events?name={name}&wait=true", data=body.encode(), headers=headers)
        assert response.status_code == 200, response.text


def test_sql_and_datasources_on_a_data_dir_answer_as_the_server_does(tmp_path, capsys):
    with LocalServer(data_dir=tmp_path, token="cli-admin-token", rate_limit_rps=None) as server:
        _load(server)
        by_url = ("--url", server.url, "--token", server.token)
        by_dir = ("--data-dir", str(tmp_path))
        for sql in READS:
            code, out, err = _main(capsys, "sql", *by_url, sql)
            assert (code, err) == (0, "")
            code_dir, out_dir, err_dir = _main(capsys, "sql", *by_dir, sql)
            assert (code_dir, err_dir) == (0, "")
            assert _without_elapsed(out_dir) == _without_elapsed(out), sql
        # The type is the schema's (cli_b.name was never missing), even with no row to show.
        assert _without_elapsed(out)["meta"] == [{"name": "name", "type": "String"}]
        for sql in WRITES:
            answer = _main(capsys, "sql", *by_url, sql)
            assert answer[0] == 1 and answer[1] == "" and "error" in json.loads(answer[2]), sql
            assert _main(capsys, "sql", *by_dir, sql) == answer, sql
        listing = _main(capsys, "datasources", *by_url)
        assert listing[0] == 0 and [d["name"] for d in json.loads(listing[1])["datasources"]] == ["cli_a", "cli_b"]
        assert _main(capsys, "datasources", *by_dir) == listing
        assert server.query("SELECT count(*) AS n FROM cli_a") == [{"n": 2}]
        before = _without_elapsed(_main(capsys, "sql", *by_url, READS[0])[1])
    # With no server running: the same answers, and the database file is not written.
    db_file = tmp_path / "events.sqlite3"
    content = db_file.read_bytes()
    assert _main(capsys, "datasources", *by_dir) == listing
    assert _without_elapsed(_main(capsys, "sql", *by_dir, READS[0])[1]) == before
    for sql in WRITES:
        code, out, err = _main(capsys, "sql", *by_dir, sql)
        assert code == 1 and out == "" and list(json.loads(err)) == ["error"], sql
    assert db_file.read_bytes() == content
    assert not (tmp_path / "x").exists()


def test_sql_on_a_data_dir_from_the_command_line(tmp_path):
    with LocalServer(data_dir=tmp_path, rate_limit_rps=None) as server:
        _load(server)
        out = _run("sql", "--data-dir", str(tmp_path), "SELECT sum(id) AS s FROM cli_a")
        assert (out.returncode, out.stderr) == (0, "")
        assert json.loads(out.stdout)["data"] == [{"s": 3}]
    out = _run("datasources", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert [(d["name"], d["rows"], d["quarantined_rows"]) for d in json.loads(out.stdout)["datasources"]] == [
        ("cli_a", 2, 1), ("cli_b", 1, 0)]
    out = _run("sql", "--data-dir", str(tmp_path), "DELETE FROM cli_a")
    assert out.returncode == 1 and json.loads(out.stderr) == {"error": "query failed: not authorized"}


def test_sql_and_datasources_refuse_bad_sources(tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    for command in (("sql", "--data-dir", missing, "SELECT 1"), ("datasources", "--data-dir", missing)):
        code, out, err = _main(capsys, *command)
        assert (code, out) == (2, "")
        assert err == f"error: no database in {missing} (expected {missing}/events.sqlite3)\n"
    code, out, err = _main(capsys, "datasources", "--url", "http://127.0.0.1:9", "--token", "t")
    assert (code, out) == (2, "") and err.startswith("error: cannot reach http://127.0.0.1:9: ")
    for command, message in (
        (("sql", "--url", "http://127.0.0.1:9", "SELECT 1"), "--url needs --token"),
        (("datasources", "--data-dir", missing, "--token", "t"), "--token goes with --url"),
        (("sql", "--url", "http://127.0.0.1:9", "--data-dir", missing, "SELECT 1"), "not allowed with argument"),
        (("datasources",), "one of the arguments --url --data-dir is required"),
    ):
        with pytest.raises(SystemExit) as exited:
            _main(capsys, *command)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
